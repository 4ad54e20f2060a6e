-- Lets documents be counted by a value (the hub of an assigned registration).
ALTER TABLE documents ADD COLUMN tag TEXT;

CREATE INDEX IF NOT EXISTS documents_by_tag ON documents (ns, kind, tag);
