//! Storage: one trait, implemented over sqlx for SQLite (embedded default) and PostgreSQL.
//!
//! Every resource is a JSON document addressed by (namespace, kind, key). The namespace is an
//! instance name, or [`SERVER_NS`] for the server's own records. Writes carry a precondition
//! and run in one transaction, so that two writers racing on the same key cannot both win.

mod sql;

use std::fmt;

pub use sql::SqlStore;

/// Namespace of the server's own records (instances, ID scopes, host names).
pub const SERVER_NS: &str = "";

/// What a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An instance (in [`SERVER_NS`], keyed by name).
    Instance,
    /// ID scope to instance name (in [`SERVER_NS`], keyed by lower-case scope).
    IdScope,
    /// Host name to instance name (in [`SERVER_NS`], keyed by lower-case host name).
    HostName,
    /// A shared access policy (keyed by key name).
    AccessPolicy,
    /// A linked hub (keyed by lower-case host name).
    LinkedHub,
    /// An individual enrollment (keyed by lower-case registration id).
    IndividualEnrollment,
    /// An enrollment group (keyed by lower-case group id).
    EnrollmentGroup,
    /// A device's registration state (keyed by lower-case registration id, parent = group key).
    RegistrationState,
    /// A registration attempt (keyed by lower-case operation id, parent = registration key).
    Operation,
    /// An owner of devices (keyed by lower-case name).
    Owner,
    /// A device's owner (keyed by `<kind>:<normalised id>`, parent and tag = owner key).
    OwnershipRecord,
    /// A CA certificate for `caReferences` (keyed by lower-case name).
    CaCertificate,
    /// A TPM device's pending challenges (keyed by lower-case registration id).
    TpmChallenge,
    /// Changes with every write to an instance's enrollment groups or CA certificates, so
    /// that caches of them know when to read them again (one per instance).
    CredentialsVersion,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Instance => "instance",
            Kind::IdScope => "id-scope",
            Kind::HostName => "host-name",
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

/// One write of a transaction.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or replace a document.
    Put {
        /// Namespace.
        ns: String,
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
        /// Secondary key for listing (the group of a registration state).
        parent: Option<String>,
        /// A value documents are counted by (the hub of an assigned registration).
        tag: Option<String>,
        /// The JSON document.
        doc: String,
        /// When it may happen.
        precondition: Precondition,
    },
    /// Delete a document.
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
    /// Delete a document if it exists (cascades).
    Purge {
        /// Namespace.
        ns: String,
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
    },
    /// Delete everything in a namespace.
    DeleteNamespace {
        /// Namespace.
        ns: String,
    },
}

/// One document of a bulk upsert ([`Store::put_all`]).
#[derive(Debug, Clone)]
pub struct BulkDoc {
    /// Key.
    pub key: String,
    /// Secondary key for listing.
    pub parent: Option<String>,
    /// A value documents are counted by.
    pub tag: Option<String>,
    /// The JSON document.
    pub doc: String,
}

/// Which documents a listing returns: keys after `after`, in key order, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Page<'a> {
    /// Only documents with this parent.
    pub parent: Option<&'a str>,
    /// Only keys greater than this one (keyset paging).
    pub after: Option<&'a str>,
    /// At most this many.
    pub limit: usize,
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
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// A transaction the database aborted because it could not be serialised (SQLSTATE
    /// 40001): retrying it is safe.
    pub fn is_serialization_failure(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40001"))
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

    /// How many documents of a kind carry each tag (untagged ones are not counted).
    async fn count_by_tag(&self, ns: &str, kind: Kind) -> Result<Vec<(String, i64)>, StoreError>;

    /// Applies all writes in one transaction, or none of them. Returns, for each write, the
    /// stored document of a `Put` and `None` for deletes.
    async fn write(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError>;

    /// Creates or replaces every document (of one kind, keys unique) in one transaction, or
    /// none of them: the fast path of bulk imports, many rows per statement.
    async fn put_all(&self, ns: &str, kind: Kind, docs: &[BulkDoc]) -> Result<(), StoreError>;

    /// The backend's name (`sqlite` or `postgres`), for logs and metrics.
    fn backend(&self) -> &'static str;
}
