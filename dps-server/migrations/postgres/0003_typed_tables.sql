-- Tables per aggregate. Identity, relations and the columns that are filtered, counted or
-- unique are columns; the rest of each record stays a JSON document (`doc`). Every record of an
-- instance goes with it (ON DELETE CASCADE). Portable SQL: explicit primary keys, no functions,
-- no advisory locks. The rows of the older `documents` table are copied into these at start-up,
-- and that table is dropped (store/upgrade.rs).
CREATE TABLE IF NOT EXISTS instances (
    key                 TEXT NOT NULL PRIMARY KEY,
    id_scope            TEXT NOT NULL UNIQUE,
    credentials_version TEXT NOT NULL DEFAULT '',
    doc                 TEXT NOT NULL,
    etag                TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS instance_host_names (
    host     TEXT NOT NULL PRIMARY KEY,
    instance TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS instance_host_names_by_instance ON instance_host_names (instance);

CREATE TABLE IF NOT EXISTS access_policies (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);

CREATE TABLE IF NOT EXISTS linked_hubs (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);

CREATE TABLE IF NOT EXISTS ca_certificates (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);

CREATE TABLE IF NOT EXISTS individual_enrollments (
    instance         TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key              TEXT NOT NULL,
    attestation_type TEXT NOT NULL,
    doc              TEXT NOT NULL,
    etag             TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);

CREATE TABLE IF NOT EXISTS enrollment_groups (
    instance         TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key              TEXT NOT NULL,
    attestation_type TEXT NOT NULL,
    doc              TEXT NOT NULL,
    etag             TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);
-- A device names no group when it asks for a TPM challenge: its EK certificate alone admits
-- it, so an instance has at most one TPM group.
CREATE UNIQUE INDEX IF NOT EXISTS one_tpm_group ON enrollment_groups (instance)
    WHERE attestation_type = 'tpm';

CREATE TABLE IF NOT EXISTS registrations (
    instance     TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key          TEXT NOT NULL,
    group_id     TEXT,
    assigned_hub TEXT,
    doc          TEXT NOT NULL,
    etag         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE INDEX IF NOT EXISTS registrations_by_group ON registrations (instance, group_id, key);
CREATE INDEX IF NOT EXISTS registrations_by_hub ON registrations (instance, assigned_hub);

CREATE TABLE IF NOT EXISTS operations (
    instance        TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key             TEXT NOT NULL,
    registration_id TEXT NOT NULL,
    expires_at      BIGINT,
    doc             TEXT NOT NULL,
    etag            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE INDEX IF NOT EXISTS operations_by_registration ON operations (instance, registration_id, key);
CREATE INDEX IF NOT EXISTS operations_by_expiry ON operations (expires_at);

CREATE TABLE IF NOT EXISTS tpm_challenges (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    expires_at BIGINT,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE INDEX IF NOT EXISTS tpm_challenges_by_expiry ON tpm_challenges (expires_at);

CREATE TABLE IF NOT EXISTS owners (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
);

-- A record names an owner that exists; an owner that records name cannot be deleted.
CREATE TABLE IF NOT EXISTS ownership_records (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    owner      TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key),
    FOREIGN KEY (instance, owner) REFERENCES owners (instance, key)
);
CREATE INDEX IF NOT EXISTS ownership_records_by_owner ON ownership_records (instance, owner, key);
