//! Small read-through caches for what every device request reads and admins rarely change: the
//! instance an ID scope names, and the instance itself. Entries live a few seconds, so another
//! replica's change shows within that time; this process's own changes clear them at once.
//! Only found entries are kept, so unknown keys cannot grow the map.
//!
//! And the operations this process finished lately, so that a device's polls are answered
//! without a read ([`FinishedOperations`]).

use std::sync::Arc;
use std::time::Duration;

use attestation::SymmetricKey;
use dps_protocol::admin::Instance;
use dps_protocol::device::RegistrationOperationStatus;

/// How long an entry is served before it is read again.
pub const TTL: Duration = Duration::from_secs(5);
/// Most entries of a [`TtlCache`].
const MAX_ENTRIES: u64 = 10_000;

/// A map whose entries expire.
#[derive(Debug)]
pub struct TtlCache<V: Clone + Send + Sync + 'static> {
    entries: moka::sync::Cache<String, V>,
}

impl<V: Clone + Send + Sync + 'static> TtlCache<V> {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(MAX_ENTRIES)
                .build(),
        }
    }

    /// The value under `key`, unless it is missing or expired.
    pub fn get(&self, key: &str) -> Option<V> {
        self.entries.get(key)
    }

    /// Keeps `value` under `key`.
    pub fn insert(&self, key: String, value: V) {
        self.entries.insert(key, value);
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.entries.invalidate_all();
    }
}

/// The instance caches of a server process.
#[derive(Debug)]
pub struct InstanceCache {
    /// Instance name by lower-case ID scope.
    pub scopes: TtlCache<String>,
    /// Instances by name.
    pub instances: TtlCache<Instance>,
}

impl Default for InstanceCache {
    fn default() -> Self {
        Self {
            scopes: TtlCache::new(TTL),
            instances: TtlCache::new(TTL),
        }
    }
}

impl InstanceCache {
    /// Forgets everything (after this process changed an instance).
    pub fn clear(&self) {
        self.scopes.clear();
        self.instances.clear();
    }
}

/// What a device proved itself with, kept with its finished operation so that its polls can be
/// checked again without reading its enrollment.
#[derive(Clone)]
pub enum Credential {
    /// A SAS token must verify with one of these keys (the enrollment's, a group's derived
    /// ones, or a TPM challenge's).
    Keys(Vec<SymmetricKey>),
    /// The device presents this certificate (SHA-256 thumbprint, as `CertificateFacts` shows
    /// it) in its TLS handshake, which proved it holds the key.
    Certificate(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        match self {
            Credential::Keys(keys) => write!(f, "Keys({})", keys.len()),
            Credential::Certificate(thumbprint) => write!(f, "Certificate({thumbprint})"),
        }
    }
}

/// A finished operation as its device polls it.
#[derive(Debug)]
pub struct FinishedOperation {
    /// The device, case-folded.
    pub registration_id: String,
    /// What it must prove again.
    pub credential: Credential,
    /// The answer to a poll.
    pub answer: RegistrationOperationStatus,
}

/// How long a finished operation is answered from memory; later polls read it from the store.
const FINISHED_TTL: Duration = Duration::from_secs(60);
/// Most bytes of answers kept (about 2 KB each).
const FINISHED_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Operations this process finished in the last minute, by (instance, operation key). Another
/// replica's polls read the store instead.
#[derive(Debug)]
pub struct FinishedOperations {
    entries: moka::sync::Cache<(String, String), Arc<FinishedOperation>>,
}

impl Default for FinishedOperations {
    fn default() -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .time_to_live(FINISHED_TTL)
                .weigher(|_, done: &Arc<FinishedOperation>| {
                    let state = done.answer.registration_state.as_ref();
                    let payload = state
                        .and_then(|s| s.payload.as_ref())
                        .map_or(0, |p| p.to_string().len());
                    u32::try_from(1024 + payload).unwrap_or(u32::MAX)
                })
                .max_capacity(FINISHED_MAX_BYTES)
                .build(),
        }
    }
}

impl FinishedOperations {
    /// The finished operation `operation_key` of `instance`, if this process finished it lately.
    pub fn get(&self, instance: &str, operation_key: &str) -> Option<Arc<FinishedOperation>> {
        self.entries
            .get(&(instance.to_ascii_lowercase(), operation_key.to_owned()))
    }

    /// Keeps a finished operation for its polls.
    pub fn insert(&self, instance: &str, operation_key: &str, done: FinishedOperation) {
        self.entries.insert(
            (instance.to_ascii_lowercase(), operation_key.to_owned()),
            Arc::new(done),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_clear() {
        let cache = TtlCache::new(Duration::from_millis(50));
        cache.insert("a".into(), 1);
        assert_eq!(cache.get("a"), Some(1));
        assert_eq!(cache.get("b"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None);
        cache.insert("a".into(), 2);
        cache.clear();
        assert_eq!(cache.get("a"), None);
    }
}
