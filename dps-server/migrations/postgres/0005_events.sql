-- Registration outcomes, append-only (keyed by the time they were written, in milliseconds,
-- and a random suffix, so that key order is time order), written in the transaction of the
-- change they describe; filtered by kind, device and enrollment; swept after the retention.
CREATE TABLE IF NOT EXISTS events (
    instance        TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key             TEXT NOT NULL,
    kind            TEXT NOT NULL,
    registration_id TEXT,
    enrollment      TEXT,
    expires_at      BIGINT,
    doc             TEXT NOT NULL,
    etag            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE INDEX IF NOT EXISTS events_by_registration ON events (instance, registration_id, key);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (instance, kind, key);
CREATE INDEX IF NOT EXISTS events_by_enrollment ON events (instance, enrollment, key);
CREATE INDEX IF NOT EXISTS events_by_expiry ON events (expires_at);
