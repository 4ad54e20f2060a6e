//! `geoLatency` with a MaxMind-format GeoIP database built by the test (tests/support/mmdb.rs):
//! the database places the source address, and the nearest hub wins; the network table and
//! trusted metadata still come first.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/mmdb.rs"]
mod mmdb;

use std::collections::BTreeMap;
use std::sync::Arc;

use allocation_policies::geo::{GeoIp, GeoLatency, GeoSettings};
use allocation_policies::policy::{AllocationPolicy, Candidate, Device};
use serde_json::Value;

const AMSTERDAM: (f64, f64) = (52.37, 4.90);
const VIRGINIA: (f64, f64) = (38.03, -78.48);
const SYDNEY: (f64, f64) = (-33.87, 151.21);

fn database() -> GeoIp {
    let mut writer = mmdb::Writer::new();
    writer.insert("198.51.100.0/24", -37.81, 144.96); // Melbourne
    writer.insert("203.0.113.0/24", 40.71, -74.0); // New York
    writer.insert("203.0.113.128/25", 48.85, 2.35); // Paris, inside the /24
    writer.insert("2001:db8::/32", 51.51, -0.13); // London
    GeoIp::from_bytes(writer.finish()).unwrap()
}

fn hubs() -> Vec<Candidate> {
    [
        ("hub-us", VIRGINIA),
        ("hub-eu", AMSTERDAM),
        ("hub-au", SYDNEY),
    ]
    .into_iter()
    .map(|(host, at)| Candidate {
        host_name: host.into(),
        weight: 1,
        region: None,
        location: Some(at),
        healthy: true,
    })
    .collect()
}

async fn first(policy: &GeoLatency, source: &str, metadata: &[(&str, &str)]) -> (String, String) {
    let metadata: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    let enrollment = Value::Null;
    let device = Device {
        instance: "tenant",
        registration_id: "dev-1",
        attestation: "symmetricKey",
        enrollment: &enrollment,
        enrollment_group_id: None,
        payload: None,
        source_address: Some(source.parse().unwrap()),
        metadata: &metadata,
        previous_hub: None,
        hardware_ids: &[],
    };
    let answer = policy.allocate(&device, &hubs()).await.unwrap();
    (answer.ranked[0].clone(), answer.reason)
}

#[tokio::test]
async fn the_database_places_addresses_and_the_nearest_hub_wins() {
    let geoip = Arc::new(database());
    assert_eq!(
        geoip.coordinates("198.51.100.7".parse().unwrap()),
        Some((-37.81, 144.96))
    );
    assert_eq!(geoip.coordinates("192.0.2.1".parse().unwrap()), None);
    let policy = GeoLatency::new(GeoSettings {
        networks: vec![("198.51.100.0/28".parse().unwrap(), "us-east".into())],
        regions: [("us-east".to_owned(), VIRGINIA)].into_iter().collect(),
        geoip: Some(geoip),
        ..GeoSettings::default()
    });
    let (hub, reason) = first(&policy, "198.51.100.77", &[]).await;
    assert_eq!(hub, "hub-au");
    assert!(reason.contains("GeoIP database"), "{reason}");
    assert_eq!(first(&policy, "203.0.113.5", &[]).await.0, "hub-us");
    assert_eq!(
        first(&policy, "203.0.113.200", &[]).await.0,
        "hub-eu",
        "the narrower network"
    );
    assert_eq!(first(&policy, "2001:db8::1", &[]).await.0, "hub-eu", "IPv6");
    // The network table comes before the database, trusted metadata before both.
    assert_eq!(first(&policy, "198.51.100.3", &[]).await.0, "hub-us");
    assert_eq!(
        first(&policy, "198.51.100.77", &[("coordinates", "52,5")])
            .await
            .0,
        "hub-eu"
    );
    // An address the database does not know ties every hub: the weighted hash decides.
    let (_, reason) = first(&policy, "192.0.2.1", &[]).await;
    assert!(reason.contains("unknown"), "{reason}");
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let error = GeoIp::from_bytes(b"not a database".to_vec()).unwrap_err();
    assert!(error.to_string().contains("MaxMind DB"), "{error}");
}
