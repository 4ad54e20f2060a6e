//! `ownership`: devices go to the hubs of whoever owns them.
//!
//! Ownership records map a device, named by its registration id, its certificate serial or the
//! hash of its TPM endorsement key, to an owner; an owner has hubs. The records live in the
//! server's storage, behind [`OwnershipBook`]. A device owned by someone is ranked over its
//! owner's hubs by the weighted hash, and never placed on another owner's hub; a device nobody
//! owns follows a fall-back policy, or fails when there is none.

use std::fmt;
use std::sync::Arc;

use crate::device_key::{DeviceKey, DeviceKeyKind};
use crate::policy::{Allocation, AllocationPolicy, Candidate, Device, PolicyError, hash_order};

/// An owner and the hubs its devices go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner's name.
    pub name: String,
    /// Host names of the owner's hubs.
    pub hubs: Vec<String>,
}

/// Where ownership is recorded.
#[async_trait::async_trait]
pub trait OwnershipBook: Send + Sync + fmt::Debug {
    /// The owner of the first of `keys` that has a record in `instance`, with the key that
    /// matched.
    async fn owner_of(
        &self,
        instance: &str,
        keys: &[DeviceKey],
    ) -> Result<Option<(DeviceKey, Owner)>, PolicyError>;
}

/// The ownership policy.
#[derive(Debug, Clone)]
pub struct Ownership {
    book: Arc<dyn OwnershipBook>,
    fallback: Option<(String, Arc<dyn AllocationPolicy>)>,
}

impl Ownership {
    /// The policy over `book`, with the policy (and its name) that places devices nobody owns;
    /// without one such devices fail to register.
    pub fn new(
        book: Arc<dyn OwnershipBook>,
        fallback: Option<(String, Arc<dyn AllocationPolicy>)>,
    ) -> Self {
        Self { book, fallback }
    }

    /// The keys a device can be found by, most specific first.
    fn keys_of(device: &Device<'_>) -> Vec<DeviceKey> {
        let mut keys: Vec<DeviceKey> = device.hardware_ids.to_vec();
        keys.sort();
        // A registration id the device sent is checked by the device API already; one that
        // does not fit an ownership key simply has no record.
        keys.extend(DeviceKey::new(DeviceKeyKind::RegistrationId, device.registration_id).ok());
        keys
    }
}

#[async_trait::async_trait]
impl AllocationPolicy for Ownership {
    fn calls_out(&self) -> bool {
        self.fallback
            .as_ref()
            .is_some_and(|(_, fallback)| fallback.calls_out())
    }

    async fn allocate(
        &self,
        device: &Device<'_>,
        candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError> {
        let keys = Self::keys_of(device);
        let Some((key, owner)) = self.book.owner_of(device.instance, &keys).await? else {
            let Some((name, fallback)) = &self.fallback else {
                return Err(PolicyError::NoHub(
                    "no ownership record names the device and no fall-back policy is configured"
                        .into(),
                ));
            };
            let mut allocation = fallback.allocate(device, candidates).await?;
            allocation.reason = format!(
                "no ownership record names the device, so the fall-back policy {name}: {}",
                allocation.reason
            );
            return Ok(allocation);
        };
        let owned: Vec<Candidate> = candidates
            .iter()
            .filter(|c| {
                owner
                    .hubs
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(&c.host_name))
            })
            .cloned()
            .collect();
        if owned.is_empty() {
            return Err(PolicyError::NoHub(format!(
                "the device ({key}) belongs to '{}', and none of that owner's hubs is linked to the enrollment",
                owner.name
            )));
        }
        Ok(Allocation {
            ranked: hash_order(device, &owned)?,
            reason: format!(
                "owned by '{}' (by {key}); weighted hash over the owner's {} hub(s)",
                owner.name,
                owned.len()
            ),
            payload: None,
            initial_twin: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;
    use crate::policy::Hashed;

    #[derive(Debug, Default)]
    struct Book(BTreeMap<String, Owner>);

    #[async_trait::async_trait]
    impl OwnershipBook for Book {
        async fn owner_of(
            &self,
            instance: &str,
            keys: &[DeviceKey],
        ) -> Result<Option<(DeviceKey, Owner)>, PolicyError> {
            assert_eq!(instance, "tenant");
            Ok(keys.iter().find_map(|k| {
                self.0
                    .get(&k.storage_key())
                    .map(|owner| (k.clone(), owner.clone()))
            }))
        }
    }

    fn owner(name: &str, hubs: &[&str]) -> Owner {
        Owner {
            name: name.into(),
            hubs: hubs.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    fn hubs() -> Vec<Candidate> {
        ["hub-a", "hub-b", "hub-c", "hub-d"]
            .into_iter()
            .map(|h| Candidate {
                host_name: h.into(),
                weight: 1,
                region: None,
                location: None,
                healthy: true,
            })
            .collect()
    }

    fn allocate(
        policy: &Ownership,
        id: &str,
        hardware: &[DeviceKey],
    ) -> Result<Allocation, PolicyError> {
        let (enrollment, metadata) = (Value::Null, BTreeMap::new());
        let device = Device {
            instance: "tenant",
            registration_id: id,
            attestation: "x509",
            enrollment: &enrollment,
            enrollment_group_id: None,
            payload: None,
            source_address: None,
            metadata: &metadata,
            previous_hub: None,
            hardware_ids: hardware,
        };
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let hubs = hubs();
        let mut future = std::pin::pin!(policy.allocate(&device, &hubs));
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(answer) => answer,
            std::task::Poll::Pending => panic!("the test book never waits"),
        }
    }

    fn key(kind: DeviceKeyKind, value: &str) -> DeviceKey {
        DeviceKey::new(kind, value).unwrap()
    }

    fn book() -> Arc<Book> {
        let mut records = BTreeMap::new();
        records.insert(
            key(DeviceKeyKind::RegistrationId, "Dev-1").storage_key(),
            owner("acme", &["hub-c", "HUB-D", "hub-elsewhere"]),
        );
        records.insert(
            key(DeviceKeyKind::CertificateSerial, "00:0a:1b").storage_key(),
            owner("globex", &["hub-a"]),
        );
        records.insert(
            key(DeviceKeyKind::RegistrationId, "dev-orphan").storage_key(),
            owner("initech", &["hub-gone"]),
        );
        Arc::new(Book(records))
    }

    #[test]
    fn owned_devices_stay_on_their_owners_hubs() {
        let policy = Ownership::new(book(), None);
        let answer = allocate(&policy, "DEV-1", &[]).unwrap();
        assert_eq!(answer.ranked.len(), 2, "{answer:?}");
        assert!(answer.ranked.iter().all(|h| h == "hub-c" || h == "hub-d"));
        assert!(answer.reason.contains("'acme'"), "{}", answer.reason);
        // The certificate serial is more specific than the registration id.
        let serial = key(DeviceKeyKind::CertificateSerial, "A1B");
        assert_eq!(
            allocate(&policy, "dev-1", &[serial]).unwrap().ranked,
            ["hub-a"]
        );
        let err = allocate(&policy, "dev-orphan", &[]).unwrap_err();
        assert!(
            matches!(&err, PolicyError::NoHub(m) if m.contains("initech")),
            "{err:?}"
        );
    }

    #[test]
    fn unowned_devices_follow_the_fallback_or_fail() {
        let strict = Ownership::new(book(), None);
        assert!(matches!(
            allocate(&strict, "dev-2", &[]),
            Err(PolicyError::NoHub(_))
        ));
        let lenient = Ownership::new(book(), Some(("hashed".into(), Arc::new(Hashed))));
        let answer = allocate(&lenient, "dev-2", &[]).unwrap();
        assert_eq!(answer.ranked.len(), 4);
        assert!(answer.reason.contains("fall-back policy hashed"));
    }
}
