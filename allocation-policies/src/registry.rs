//! Policies by name: the server looks a policy up by the name on the enrollment, so a new
//! policy needs no change to the server's code paths.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::geo::GeoLatency;
use crate::policy::{AllocationPolicy, Hashed, Static, Unsupported};

/// Policies by name (compared ignoring ASCII case).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    policies: BTreeMap<String, (String, Arc<dyn AllocationPolicy>)>,
}

impl Registry {
    /// The built-in policies: `hashed`, `static`, `geoLatency` without location settings (see
    /// [`crate::geo`]); `custom` and `ownership` are known names whose allocations fail until a
    /// webhook client ([`crate::custom`]) or an ownership book ([`crate::ownership`]) is
    /// registered in their place.
    pub fn with_builtins() -> Self {
        let mut registry = Self::default();
        registry.register("hashed", Arc::new(Hashed));
        registry.register("static", Arc::new(Static));
        registry.register("geoLatency", Arc::new(GeoLatency::default()));
        registry.register("custom", Arc::new(Unsupported("custom")));
        registry.register("ownership", Arc::new(Unsupported("ownership")));
        registry
    }

    /// Adds or replaces a policy.
    pub fn register(&mut self, name: &str, policy: Arc<dyn AllocationPolicy>) {
        self.policies
            .insert(name.to_ascii_lowercase(), (name.to_owned(), policy));
    }

    /// The policy registered under `name`, with its canonical spelling.
    pub fn get(&self, name: &str) -> Option<(&str, Arc<dyn AllocationPolicy>)> {
        self.policies
            .get(&name.to_ascii_lowercase())
            .map(|(canonical, policy)| (canonical.as_str(), policy.clone()))
    }

    /// Every registered name, in canonical spelling.
    pub fn names(&self) -> Vec<&str> {
        self.policies
            .values()
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;
    use crate::policy::tests::{block_on, device};
    use crate::policy::{Allocation, Candidate, Device, PolicyError};

    #[test]
    fn the_registry_finds_policies_ignoring_case_and_takes_new_ones() {
        #[derive(Debug)]
        struct Always(&'static str);
        #[async_trait::async_trait]
        impl AllocationPolicy for Always {
            async fn allocate(
                &self,
                _: &Device<'_>,
                _: &[Candidate],
            ) -> Result<Allocation, PolicyError> {
                Ok(Allocation {
                    ranked: vec![self.0.into()],
                    reason: "always".into(),
                    payload: None,
                    initial_twin: None,
                })
            }
        }
        let mut registry = Registry::with_builtins();
        registry.register("firstHub", Arc::new(Always("a")));
        let (name, policy) = registry.get("FIRSTHUB").unwrap();
        assert_eq!(name, "firstHub");
        let (enrollment, metadata) = (Value::Null, BTreeMap::new());
        let answer = block_on(policy.allocate(&device("x", &enrollment, &metadata), &[])).unwrap();
        assert_eq!(answer.ranked, ["a"]);
        assert_eq!(
            registry.get("geolatency").map(|(n, _)| n),
            Some("geoLatency")
        );
        assert!(registry.get("roundRobin").is_none());
    }
}
