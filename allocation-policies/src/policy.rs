//! The allocation policy interface: a policy ranks the candidate hubs for a device (first
//! choice, then fall-backs), so that the caller can skip an unhealthy or failing hub without
//! asking the policy again. The built-in `hashed` and `static` policies live here too.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::device_key::DeviceKey;
use crate::hashed::{WeightedHub, rank};

/// What a policy knows about the device being allocated.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    /// The instance (tenant) the device registers with.
    pub instance: &'a str,
    /// The registration id, as the device sent it.
    pub registration_id: &'a str,
    /// `symmetricKey`, `x509` or `tpm`.
    pub attestation: &'a str,
    /// The individual enrollment or the enrollment group, as JSON without secrets.
    pub enrollment: &'a Value,
    /// The group, when the device came through one.
    pub enrollment_group_id: Option<&'a str>,
    /// The payload the device sent.
    pub payload: Option<&'a Value>,
    /// The device's address as the server saw it.
    pub source_address: Option<IpAddr>,
    /// Request metadata from a trusted edge (for example a region header).
    pub metadata: &'a BTreeMap<String, String>,
    /// The hub the device is assigned to now, if any.
    pub previous_hub: Option<&'a str>,
    /// Identities its attestation proved beyond the registration id (a certificate serial,
    /// an EK hash).
    pub hardware_ids: &'a [DeviceKey],
}

/// A hub the device may be assigned to.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The hub's host name.
    pub host_name: String,
    /// Allocation weight, 1 to 1000.
    pub weight: u32,
    /// Region name, if configured.
    pub region: Option<String>,
    /// Latitude and longitude in degrees, if configured.
    pub location: Option<(f64, f64)>,
    /// Whether the hub is believed to be up.
    pub healthy: bool,
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// Host names, first choice first; each is one of the candidates.
    pub ranked: Vec<String>,
    /// Why, for people (the simulate call shows it).
    pub reason: String,
    /// A payload for the device (custom allocation).
    pub payload: Option<Value>,
    /// A twin for the device's new identity (custom allocation).
    pub initial_twin: Option<Value>,
}

/// Why a policy gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No hub can take the device.
    #[error("no hub is available: {0}")]
    NoHub(String),
    /// The policy's backing service (a webhook, a database) could not answer.
    #[error("the allocation policy is unavailable: {0}")]
    Unavailable(String),
    /// The policy's backing service refused, or answered something unusable.
    #[error("{0}")]
    Refused(String),
}

/// An allocation policy.
#[async_trait::async_trait]
pub trait AllocationPolicy: Send + Sync + fmt::Debug {
    /// Ranks `candidates` for `device`.
    async fn allocate(
        &self,
        device: &Device<'_>,
        candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError>;

    /// Whether allocating may wait on another service (a webhook). The server then answers
    /// the device before the allocation finishes, instead of deciding within its request.
    fn calls_out(&self) -> bool {
        false
    }
}

/// Evenly weighted distribution (Azure `hashed`): weighted rendezvous hashing on the
/// registration id.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hashed;

#[async_trait::async_trait]
impl AllocationPolicy for Hashed {
    async fn allocate(
        &self,
        device: &Device<'_>,
        candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError> {
        Ok(Allocation {
            ranked: hash_order(device, candidates)?,
            reason: format!(
                "weighted rendezvous hash of the registration id over {} hub(s)",
                candidates.len()
            ),
            payload: None,
            initial_twin: None,
        })
    }
}

/// The candidates in weighted-hash order for the device (what `hashed` answers, and how other
/// policies break ties).
pub fn hash_order(
    device: &Device<'_>,
    candidates: &[Candidate],
) -> Result<Vec<String>, PolicyError> {
    if candidates.is_empty() {
        return Err(PolicyError::NoHub("no candidate hubs".into()));
    }
    let weighted: Vec<WeightedHub<'_>> = candidates
        .iter()
        .map(|c| WeightedHub {
            host_name: &c.host_name,
            weight: c.weight,
        })
        .collect();
    Ok(rank(device.registration_id, &weighted)
        .into_iter()
        .map(str::to_owned)
        .collect())
}

/// Azure `static`: the one hub the enrollment names, or, when it names none, the instance's
/// one linked hub that applies allocation policies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Static;

#[async_trait::async_trait]
impl AllocationPolicy for Static {
    async fn allocate(
        &self,
        _device: &Device<'_>,
        candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError> {
        match candidates {
            [one] => Ok(Allocation {
                ranked: vec![one.host_name.clone()],
                reason: "the enrollment's one hub".into(),
                payload: None,
                initial_twin: None,
            }),
            [] => Err(PolicyError::NoHub(
                "static allocation found no hub: the enrollment's hub is not linked, or it names none and no linked hub applies allocation policies".into(),
            )),
            many => Err(PolicyError::NoHub(format!(
                "static allocation needs one hub: the enrollment names none and {} linked hubs apply allocation policies; name one on the enrollment (iotHubs)",
                many.len()
            ))),
        }
    }
}

/// A policy that is known by name but not available in this build: every allocation fails
/// with a clear message instead of silently using another policy.
#[derive(Debug, Clone)]
pub struct Unsupported(pub &'static str);

#[async_trait::async_trait]
impl AllocationPolicy for Unsupported {
    async fn allocate(
        &self,
        _device: &Device<'_>,
        _candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError> {
        Err(PolicyError::Unavailable(format!(
            "the {} allocation policy is not supported by this server version",
            self.0
        )))
    }
}

/// Moves unhealthy hubs behind healthy ones, keeping the policy's order within each group.
pub fn healthy_first(ranked: Vec<String>, candidates: &[Candidate]) -> Vec<String> {
    let healthy = |host: &String| {
        candidates
            .iter()
            .any(|c| c.host_name.eq_ignore_ascii_case(host) && c.healthy)
    };
    let (mut up, down): (Vec<String>, Vec<String>) = ranked.into_iter().partition(healthy);
    up.extend(down);
    up
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn candidate(host: &str, weight: u32, healthy: bool) -> Candidate {
        Candidate {
            host_name: host.into(),
            weight,
            region: None,
            location: None,
            healthy,
        }
    }

    pub(crate) fn device<'a>(
        id: &'a str,
        enrollment: &'a Value,
        metadata: &'a BTreeMap<String, String>,
    ) -> Device<'a> {
        Device {
            instance: "tenant",
            registration_id: id,
            attestation: "symmetricKey",
            enrollment,
            enrollment_group_id: None,
            payload: None,
            source_address: None,
            metadata,
            previous_hub: None,
            hardware_ids: &[],
        }
    }

    pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
        // The built-in policies never wait, so one poll finishes them.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => unreachable!("built-in policies do not wait"),
        }
    }

    #[test]
    fn hashed_ranks_every_candidate_and_static_needs_exactly_one() {
        let (enrollment, metadata) = (Value::Null, BTreeMap::new());
        let d = device("dev-1", &enrollment, &metadata);
        let hubs = [candidate("a", 1, true), candidate("b", 1, true)];
        let ranked = block_on(Hashed.allocate(&d, &hubs)).unwrap().ranked;
        assert_eq!(ranked.len(), 2);
        assert_eq!(
            block_on(Static.allocate(&d, &hubs[..1])).unwrap().ranked,
            ["a"]
        );
        assert!(block_on(Static.allocate(&d, &hubs)).is_err());
        assert!(block_on(Hashed.allocate(&d, &[])).is_err());
    }

    #[test]
    fn unhealthy_hubs_fall_behind_in_policy_order() {
        let hubs = [
            candidate("a", 1, false),
            candidate("b", 1, true),
            candidate("c", 1, true),
        ];
        let ranked = vec!["a".to_owned(), "c".to_owned(), "b".to_owned()];
        assert_eq!(healthy_first(ranked, &hubs), ["c", "b", "a"]);
    }
}
