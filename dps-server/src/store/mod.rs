//! Storage: one trait, implemented over sqlx for SQLite (embedded default) and PostgreSQL.
//!
//! Each kind of record has a table of its own (`schema.rs`, `migrations/*/0003_typed_tables.sql`):
//! its identity, relations and the columns that are filtered, counted, unique or swept on are
//! columns ([`Columns`]), the rest a JSON document. The database enforces what it can: unique ID
//! scopes and host names, one TPM group per instance, ownership records only of existing owners,
//! and an instance's records deleted with it. Records are addressed by (namespace, kind, key): the
//! namespace is an instance name, or [`SERVER_NS`] for the instances themselves. Writes carry a
//! precondition and run in one transaction, so that two writers racing on the same key cannot
//! both win.

pub mod audit;
mod group_commit;
mod kept;
mod schema;
#[macro_use]
mod sql;
mod upgrade;

use std::fmt;

pub use sql::{SqlStore, new_etag};

/// Namespace of the server's own records (instances, ID scopes, host names).
pub const SERVER_NS: &str = "";

/// What a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An instance (in [`SERVER_NS`], keyed by name), with its ID scope and host names.
    Instance,
    /// A shared access policy (keyed by key name).
    AccessPolicy,
    /// A linked hub (keyed by lower-case host name).
    LinkedHub,
    /// An individual enrollment (keyed by lower-case registration id).
    IndividualEnrollment,
    /// An enrollment group (keyed by lower-case group id).
    EnrollmentGroup,
    /// A device's registration state (keyed by lower-case registration id).
    RegistrationState,
    /// A registration attempt (keyed by lower-case operation id).
    Operation,
    /// An owner of devices (keyed by lower-case name).
    Owner,
    /// A device's owner (keyed by `<kind>:<normalised id>`).
    OwnershipRecord,
    /// A CA certificate for `caReferences` (keyed by lower-case name).
    CaCertificate,
    /// A TPM device's pending challenges (keyed by lower-case registration id).
    TpmChallenge,
    /// An operational certificate the service issued (keyed by lower-case hex serial).
    IssuedCertificate,
    /// A revoked issued certificate (keyed by lower-case hex serial; its document is the
    /// issued certificate's record).
    RevokedCertificate,
    /// An issuing CA (keyed by lower-case name).
    CertificateAuthority,
    /// An event (keyed by its time in milliseconds, zero-padded, and a random suffix).
    Event,
    /// A credential policy (keyed by lower-case name).
    CredentialPolicy,
    /// An entry of the audit log (keyed like an event). Written only by the store itself,
    /// for the writes it makes under an [`audit::Actor`]: a [`Write`] of this kind is refused.
    AuditEntry,
    /// Changes with every write to an instance's enrollment groups or CA certificates, so
    /// that caches of them know when to read them again (one per instance, read as a record
    /// whose etag is the version; written by [`Write::CredentialsChanged`]).
    CredentialsVersion,
}

impl Kind {
    /// The kind's name (in logs, and in the older `documents` table).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Instance => "instance",
            Kind::AccessPolicy => "access-policy",
            Kind::LinkedHub => "linked-hub",
            Kind::IndividualEnrollment => "enrollment",
            Kind::EnrollmentGroup => "enrollment-group",
            Kind::RegistrationState => "registration",
            Kind::Operation => "operation",
            Kind::Owner => "owner",
            Kind::OwnershipRecord => "ownership-record",
            Kind::CaCertificate => "ca-certificate",
            Kind::TpmChallenge => "tpm-challenge",
            Kind::IssuedCertificate => "issued-certificate",
            Kind::RevokedCertificate => "revoked-certificate",
            Kind::CertificateAuthority => "certificate-authority",
            Kind::Event => "event",
            Kind::CredentialPolicy => "credential-policy",
            Kind::AuditEntry => "audit-entry",
            Kind::CredentialsVersion => "credentials-version",
        }
    }
}

/// A stored document and its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The key it is stored under.
    pub key: String,
    /// The JSON document.
    pub doc: String,
    /// Opaque version, a quoted string; changes on every write.
    pub etag: String,
    /// First write, RFC 3339 UTC.
    pub created: String,
    /// Last write, RFC 3339 UTC.
    pub updated: String,
}

/// When a write may happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Always (create or overwrite; delete if present).
    Always,
    /// Only if nothing is stored under the key.
    MustNotExist,
    /// Only if the stored etag equals this one.
    IfMatch(String),
}

impl Precondition {
    /// What an etag a client sent (`If-Match`, or a bulk item's) asks for: `*` matches
    /// whatever is stored, another etag that version only; without one, `absent`.
    pub fn from_etag(etag: Option<String>, absent: Precondition) -> Self {
        match etag {
            None => absent,
            Some(tag) if tag == "*" => Precondition::Always,
            Some(tag) => Precondition::IfMatch(tag),
        }
    }
}

/// The typed columns a record has beside its document, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Columns {
    /// Access policies, linked hubs, CA certificates, owners, issuing CAs, credential policies.
    #[default]
    None,
    /// An instance: its ID scope (unique) and host names (each unique across instances).
    Instance {
        /// Lower-case ID scope.
        id_scope: String,
        /// Lower-case host names.
        host_names: Vec<String>,
    },
    /// An individual enrollment or an enrollment group: its attestation type (`tpm` groups are
    /// one per instance).
    Attestation {
        /// `symmetricKey`, `x509`, `tpm` or `none`.
        attestation_type: String,
    },
    /// A registration state: the group it came through (lists) and the hub it is assigned to
    /// (counts).
    Registration {
        /// Lower-case group id.
        group: Option<String>,
        /// Lower-case host name, while assigned.
        hub: Option<String>,
    },
    /// An operation: its device, and when the sweeper may delete it (finished ones).
    Operation {
        /// Lower-case registration id.
        registration: String,
        /// Unix seconds; `None` while assigning.
        expires_at: Option<i64>,
    },
    /// An issued certificate: its device, and when it expires (then the sweeper deletes it).
    Issued {
        /// Lower-case registration id.
        registration: String,
        /// Unix seconds: the certificate's notAfter.
        expires_at: i64,
    },
    /// An event: what it is about, and when the sweeper may delete it.
    Event {
        /// Its kind (`registration.assigned`, ...).
        kind: String,
        /// Lower-case registration id.
        registration: Option<String>,
        /// `enrollment:<id>` or `group:<id>`, lower-case.
        enrollment: Option<String>,
        /// Unix seconds.
        expires_at: i64,
    },
    /// An audit entry: what it is about, and when the sweeper may delete it.
    Audit {
        /// The kind of the record written ([`Kind::as_str`]).
        resource_kind: String,
        /// Its key.
        resource_id: String,
        /// The access policy that wrote it (lower-case).
        policy: String,
    },
    /// TPM challenges and revoked certificates: when the sweeper may delete them.
    Expires {
        /// Unix seconds.
        at: i64,
    },
    /// An ownership record: its owner (lists, counts; must exist).
    Owned {
        /// Lower-case owner name.
        owner: String,
    },
}

/// One write of a transaction.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or replace a record.
    Put {
        /// Namespace.
        ns: String,
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
        /// Its typed columns.
        columns: Columns,
        /// The JSON document.
        doc: String,
        /// When it may happen.
        precondition: Precondition,
        /// The etag the record gets: one [`new_etag`] makes when it is chosen before the write
        /// (so that the document can show it), a fresh one when `None`.
        etag: Option<String>,
    },
    /// Delete a record (an instance with everything in it).
    Delete {
        /// Namespace.
        ns: String,
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
        /// When it may happen.
        precondition: Precondition,
    },
    /// Delete a record if it exists.
    Purge {
        /// Namespace.
        ns: String,
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
    },
    /// Give instance `ns` a new credentials version.
    CredentialsChanged {
        /// The instance.
        ns: String,
    },
    /// Nothing changes, but the admin read the record's keys: an audit entry only (refused
    /// outside an [`audit::Actor`]'s request).
    KeysRead {
        /// Namespace.
        ns: String,
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
    },
}

/// One record of a bulk upsert ([`Store::put_all`]).
#[derive(Debug, Clone)]
pub struct BulkDoc {
    /// Key.
    pub key: String,
    /// Its typed columns.
    pub columns: Columns,
    /// The JSON document.
    pub doc: String,
}

/// Which records a listing returns: keys after `after`, in key order, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Page<'a> {
    /// Only records related to this one: registration states of a group, operations and
    /// issued certificates of a device, ownership records of an owner.
    pub parent: Option<&'a str>,
    /// Only keys greater than this one (keyset paging).
    pub after: Option<&'a str>,
    /// At most this many.
    pub limit: usize,
}

/// Which audit entries a listing returns ([`Store::list_audit`]): every filter given must
/// match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// The kind of record ([`Kind::as_str`]).
    pub resource_kind: Option<String>,
    /// Its key.
    pub resource_id: Option<String>,
    /// The access policy.
    pub policy: Option<String>,
    /// Only keys at or after this one (a time: [`event_key_at`]).
    pub from: Option<String>,
    /// Only keys before this one.
    pub to: Option<String>,
}

/// Which events a listing returns ([`Store::list_events`]): every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// The kind.
    pub kind: Option<String>,
    /// The device (lower-case registration id).
    pub registration: Option<String>,
    /// The enrollment (`enrollment:<id>` or `group:<id>`, lower-case).
    pub enrollment: Option<String>,
    /// Only keys at or after this one (a time: [`event_key_at`]).
    pub from: Option<String>,
    /// Only keys before this one.
    pub to: Option<String>,
}

/// The key of the first event of Unix millisecond `ms` (event keys sort as their times).
pub fn event_key_at(ms: i64) -> String {
    format!("{:013}", ms.max(0))
}

/// A new key for an event or audit entry written at `now`: its millisecond, so that key order
/// is time order, and a random suffix, so that keys written in the same millisecond differ.
/// The suffix must differ, not stay secret: it is the first 12 hex digits (6 random bytes) of a
/// version 4 UUID, drawn from the thread's generator rather than a system call per key.
pub fn new_log_key(now: time::OffsetDateTime) -> String {
    let mut hex = uuid::Uuid::encode_buffer();
    let random = uuid::Uuid::new_v4().simple().encode_lower(&mut hex);
    let millis = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    format!("{}-{}", event_key_at(millis), &random[..12])
}

/// Values the database keeps unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unique {
    /// An instance's ID scope.
    IdScope,
    /// An instance's host name.
    HostName,
    /// The one TPM enrollment group of an instance.
    TpmGroup,
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A `Put`/`Delete` with [`Precondition::MustNotExist`] found a document.
    #[error("{kind:?} '{key}' already exists")]
    Exists {
        /// Kind of the document.
        kind: Kind,
        /// Key of the document.
        key: String,
    },
    /// The etag did not match, or there was nothing to match.
    #[error("{kind:?} '{key}' has changed or does not exist (etag mismatch)")]
    EtagMismatch {
        /// Kind of the document.
        kind: Kind,
        /// Key of the document.
        key: String,
    },
    /// A delete found nothing.
    #[error("{kind:?} '{key}' does not exist")]
    NotFound {
        /// Kind of the document.
        kind: Kind,
        /// Key of the document.
        key: String,
    },
    /// A value that must be unique across records is another's.
    #[error("{what:?} '{value}' is taken")]
    Taken {
        /// Which value.
        what: Unique,
        /// The value.
        value: String,
    },
    /// A record names another that does not exist (an ownership record's owner).
    #[error("{kind:?} '{key}' does not exist")]
    Missing {
        /// Kind of the record named.
        kind: Kind,
        /// Its key.
        key: String,
    },
    /// A record cannot be deleted while others name it (an owner of ownership records).
    #[error("{kind:?} '{key}' is still referred to")]
    InUse {
        /// Kind of the record.
        kind: Kind,
        /// Its key.
        key: String,
    },
    /// A write that does not fit its kind (a programming error, refused instead of stored).
    #[error("invalid write: {0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// A transaction the database aborted with no effect, because it could not be serialised
    /// (SQLSTATE 40001) or to break a deadlock with another (40P01): running it again is safe.
    pub fn is_worth_retrying(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("40001" | "40P01")))
    }
}

/// The storage trait the rest of the server uses.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Reads one document.
    async fn get(&self, ns: &str, kind: Kind, key: &str) -> Result<Option<Stored>, StoreError>;

    /// Reads several documents of one namespace in one statement, in the order asked.
    async fn get_many(
        &self,
        ns: &str,
        keys: &[(Kind, &str)],
    ) -> Result<Vec<Option<Stored>>, StoreError>;

    /// Lists documents of a kind in key order.
    async fn list(&self, ns: &str, kind: Kind, page: Page<'_>) -> Result<Vec<Stored>, StoreError>;

    /// How many records of a kind there are per value of its counted column: registration
    /// states per assigned hub, ownership records per owner.
    async fn count_by(&self, ns: &str, kind: Kind) -> Result<Vec<(String, i64)>, StoreError>;

    /// The instance an ID scope (lower-case) names.
    async fn instance_by_scope(&self, id_scope: &str) -> Result<Option<String>, StoreError>;

    /// The instance a host name (lower-case) names.
    async fn instance_by_host(&self, host: &str) -> Result<Option<String>, StoreError>;

    /// Deletes finished operations, TPM challenges and issued certificates whose time ran out
    /// before `now` (Unix seconds); returns how many.
    async fn sweep(&self, now: i64) -> Result<u64, StoreError>;

    /// Deletes the audit entries keyed before `before` (a time: [`event_key_at`]), and, when
    /// `max` is not 0, the oldest of every instance that has more than `max`; returns how many.
    async fn sweep_audit(&self, before: &str, max: u64) -> Result<u64, StoreError>;

    /// Copies SQLite's write-ahead log back into the database (nothing on PostgreSQL): called
    /// every second, so that no device's commit pays for it.
    async fn checkpoint(&self) -> Result<(), StoreError>;

    /// Applies all writes in one transaction, or none of them. Returns, for each write, the
    /// stored document of a `Put` and `None` for deletes. A caller that stops waiting may or
    /// may not have written: on SQLite the writes of a request without an admin are made by
    /// the writer task (group commit) whether or not anyone still waits for the answer; other
    /// writes are rolled back when dropped before their commit.
    async fn write(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError>;

    /// Creates or replaces every document (of one kind, keys unique) in one transaction, or
    /// none of them: the fast path of bulk imports, many rows per statement.
    async fn put_all(&self, ns: &str, kind: Kind, docs: Vec<BulkDoc>) -> Result<(), StoreError>;

    /// Creates every document (of one kind, keys unique) whose key is free, in one
    /// transaction, many rows per statement; returns the keys it created (the others exist).
    async fn insert_all(
        &self,
        ns: &str,
        kind: Kind,
        docs: Vec<BulkDoc>,
    ) -> Result<Vec<String>, StoreError>;

    /// Events of `ns` matching `filter`, in key (time) order, after `after`, at most `limit`.
    async fn list_events(
        &self,
        ns: &str,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError>;

    /// Audit entries of `ns` matching `filter`, in key (time) order, after `after`, at most
    /// `limit`.
    async fn list_audit(
        &self,
        ns: &str,
        filter: &AuditFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError>;

    /// The backend's name (`sqlite` or `postgres`), for logs and metrics.
    fn backend(&self) -> &'static str;
}
