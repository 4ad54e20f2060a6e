-- Admin writes and key reads, append-only (keyed like events: the time in milliseconds and a
-- random suffix), written by the store in the transaction of the change they describe;
-- filtered by resource and policy; swept by key (its time) after the retention, and past a
-- count per instance.
CREATE TABLE IF NOT EXISTS audit_log (
    instance      TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key           TEXT NOT NULL,
    resource_kind TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    policy        TEXT NOT NULL,
    doc           TEXT NOT NULL,
    etag          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE INDEX IF NOT EXISTS audit_log_by_resource ON audit_log (instance, resource_kind, resource_id, key);
CREATE INDEX IF NOT EXISTS audit_log_by_policy ON audit_log (instance, policy, key);
