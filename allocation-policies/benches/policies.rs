//! Each allocation policy ranking 10 hubs for one device. `custom` calls a webhook on
//! localhost (wiremock), so its figure is mostly the HTTP round trip.
//! Run: `cargo bench -p allocation-policies --bench policies`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mmdb.rs"]
mod mmdb;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use allocation_policies::custom::{CustomSettings, CustomWebhook};
use allocation_policies::device_key::DeviceKey;
use allocation_policies::geo::{GeoIp, GeoLatency, GeoSettings};
use allocation_policies::ownership::{Owner, Ownership, OwnershipBook};
use allocation_policies::policy::{
    AllocationPolicy, Candidate, Device, Hashed, PolicyError, Static,
};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

/// An in-memory ownership book: the policy's own cost, without storage.
#[derive(Debug)]
struct Book;

#[async_trait::async_trait]
impl OwnershipBook for Book {
    async fn owner_of(
        &self,
        _instance: &str,
        keys: &[DeviceKey],
    ) -> Result<Option<(DeviceKey, Owner)>, PolicyError> {
        Ok(keys.first().map(|k| {
            (
                k.clone(),
                Owner {
                    name: "acme".into(),
                    hubs: vec!["hub-3.example.com".into(), "hub-7.example.com".into()],
                },
            )
        }))
    }
}

fn hubs() -> Vec<Candidate> {
    (0..10)
        .map(|i| Candidate {
            host_name: format!("hub-{i}.example.com"),
            weight: 1 + i,
            region: None,
            location: Some((f64::from(i) * 8.0 - 40.0, f64::from(i) * 30.0 - 150.0)),
            healthy: true,
        })
        .collect()
}

fn policies(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let candidates = hubs();
    let enrollment = json!({ "registrationId": "sensor-000123" });
    let metadata = BTreeMap::new();
    let device = Device {
        instance: "bench",
        registration_id: "sensor-000123",
        attestation: "symmetricKey",
        enrollment: &enrollment,
        enrollment_group_id: None,
        payload: None,
        source_address: Some("198.51.100.7".parse().unwrap()),
        metadata: &metadata,
        previous_hub: None,
        hardware_ids: &[],
    };
    let mut writer = mmdb::Writer::new();
    writer.insert("198.51.100.0/24", -37.81, 144.96);
    let geo = GeoLatency::new(GeoSettings {
        geoip: Some(Arc::new(GeoIp::from_bytes(writer.finish()).unwrap())),
        ..GeoSettings::default()
    });
    let server = runtime.block_on(wiremock::MockServer::start());
    runtime.block_on(
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(
                wiremock::ResponseTemplate::new(200)
                    .set_body_json(json!({ "iotHubHostName": "hub-4.example.com" })),
            )
            .mount(&server),
    );
    let custom = CustomWebhook::new(
        dps_outbound::Outbound::new(&dps_outbound::OutboundSettings {
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        }),
        CustomSettings {
            timeout: Duration::from_secs(5),
            retries: 0,
            signer: None,
        },
        None,
    );
    let custom_enrollment = json!({ "registrationId": "sensor-000123",
        "customAllocationDefinition": { "webhookUrl": format!("{}/allocate", server.uri()), "apiVersion": "2021-10-01" } });
    let custom_device = Device {
        enrollment: &custom_enrollment,
        ..device
    };
    let ownership = Ownership::new(Arc::new(Book), None);
    let named: [(&str, &dyn AllocationPolicy, &Device<'_>, &[Candidate]); 5] = [
        ("hashed", &Hashed, &device, &candidates),
        ("static", &Static, &device, &candidates[..1]),
        ("geoLatency_geoip", &geo, &device, &candidates),
        ("ownership", &ownership, &device, &candidates),
        ("custom_webhook", &custom, &custom_device, &candidates),
    ];
    for (name, policy, device, hubs) in named {
        c.bench_function(&format!("policy/{name}"), |b| {
            b.to_async(&runtime).iter(|| async {
                let answer: Result<_, PolicyError> = policy.allocate(black_box(device), hubs).await;
                black_box(answer.unwrap())
            })
        });
    }
}

criterion_group!(benches, policies);
criterion_main!(benches);
