-- Every stored resource is a JSON document in a namespace (an instance, or '' for the server's
-- own records: instances, their ID scopes and host names). Portable SQL: no functions, no
-- advisory locks, explicit primary key (CockroachDB and YugabyteDB run it unchanged).
CREATE TABLE IF NOT EXISTS documents (
    ns          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    parent      TEXT,
    doc         TEXT NOT NULL,
    etag        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (ns, kind, key)
);

CREATE INDEX IF NOT EXISTS documents_by_parent ON documents (ns, kind, parent, key);
