-- Operational certificates the service issued (keyed by lower-case hex serial number): listed
-- per device, revoked by an admin (a revoked one no longer admits its device), and swept once
-- expired (expires_at: the certificate's notAfter, Unix seconds).
CREATE TABLE IF NOT EXISTS issued_certificates (
    instance        TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key             TEXT NOT NULL,
    registration_id TEXT NOT NULL,
    expires_at      BIGINT,
    doc             TEXT NOT NULL,
    etag            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (instance, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS issued_certificates_by_registration ON issued_certificates (instance, registration_id, key);
CREATE INDEX IF NOT EXISTS issued_certificates_by_expiry ON issued_certificates (expires_at);

-- Issuing CAs and credential policies an instance keeps (beside those of the configuration).
CREATE TABLE IF NOT EXISTS certificate_authorities (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS credential_policies (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
) WITHOUT ROWID;

-- The revoked ones among them, few, read whole into each instance's credentials index (so an
-- X.509 request is checked against them without a read); swept once expired.
CREATE TABLE IF NOT EXISTS revoked_certificates (
    instance   TEXT NOT NULL REFERENCES instances (key) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    expires_at BIGINT,
    doc        TEXT NOT NULL,
    etag       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (instance, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS revoked_certificates_by_expiry ON revoked_certificates (expires_at);
