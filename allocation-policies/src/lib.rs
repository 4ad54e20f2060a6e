//! Allocation policies: how a device is assigned to one of an instance's linked hubs.
//!
//! [`policy::AllocationPolicy`] ranks candidate hubs for a device; [`registry::Registry`] holds
//! the policies by name. Built in: `hashed` (weighted rendezvous hashing, [`hashed`]) and
//! `static`, `geoLatency` ([`geo`]), `ownership` ([`ownership`]) and `custom` webhooks
//! ([`custom`]).

pub mod custom;
pub mod device_key;
pub mod geo;
pub mod hashed;
pub mod ownership;
pub mod policy;
pub mod registry;

use std::fmt;

/// The allocation policies an enrollment or instance can name (the Azure DPS names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyName {
    /// Evenly weighted distribution (weighted hashing on the registration id).
    Hashed,
    /// The hub with the lowest latency to the device.
    GeoLatency,
    /// The one hub named on the enrollment.
    Static,
    /// A webhook chooses.
    Custom,
    /// The hubs of the device's owner (an extension of Azure's set).
    Ownership,
}

impl PolicyName {
    /// Every policy, in documentation order.
    pub const ALL: [PolicyName; 5] = [
        PolicyName::Hashed,
        PolicyName::GeoLatency,
        PolicyName::Static,
        PolicyName::Custom,
        PolicyName::Ownership,
    ];

    /// Parses a policy name, ignoring ASCII case.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name))
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Hashed => "hashed",
            PolicyName::GeoLatency => "geoLatency",
            PolicyName::Static => "static",
            PolicyName::Custom => "custom",
            PolicyName::Ownership => "ownership",
        }
    }

    /// Whether an instance may use it as its default (Azure: not `custom`, which needs a
    /// webhook per enrollment, nor `static`, which needs a hub per enrollment).
    pub fn can_be_instance_default(self) -> bool {
        matches!(
            self,
            PolicyName::Hashed | PolicyName::GeoLatency | PolicyName::Ownership
        )
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_ignore_case() {
        for policy in PolicyName::ALL {
            assert_eq!(PolicyName::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(
            PolicyName::parse("GEOLATENCY"),
            Some(PolicyName::GeoLatency)
        );
        assert_eq!(PolicyName::parse("roundRobin"), None);
        assert!(!PolicyName::Custom.can_be_instance_default());
    }
}
