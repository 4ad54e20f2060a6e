//! Small read-through caches for what every device request reads and admins rarely change: the
//! instance an ID scope names, and the instance itself. Entries live a few seconds, so another
//! replica's change shows within that time; this process's own changes clear them at once.
//! Only found entries are kept, so unknown keys cannot grow the map.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dps_protocol::admin::Instance;

/// How long an entry is served before it is read again.
pub const TTL: Duration = Duration::from_secs(5);

/// A map whose entries expire.
#[derive(Debug)]
pub struct TtlCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, V)>>,
}

impl<V: Clone> TtlCache<V> {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, V)>> {
        // The map holds only copies of stored data: a poisoned one is still usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value under `key`, unless it is missing or expired.
    pub fn get(&self, key: &str) -> Option<V> {
        let entries = self.entries();
        let (at, value) = entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    /// Keeps `value` under `key`.
    pub fn insert(&self, key: String, value: V) {
        let mut entries = self.entries();
        entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
        entries.insert(key, (Instant::now(), value));
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.entries().clear();
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
