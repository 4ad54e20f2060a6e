//! `geoLatency` through the real server: the device's region from a trusted edge header, else
//! from the network table; hubs ranked by the latency table, else by distance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, Device, TestServer, device_token, enroll, expect_json, keys_of};
use dps_server::config::{GeoNetwork, GeoRegion};
use reqwest::Method;
use serde_json::{Value, json};

async fn register_with(
    t: &TestServer,
    id: &str,
    key: &attestation::SymmetricKey,
    headers: &[(&str, &str)],
) -> Value {
    let device = Device::new(t, id);
    let token = device_token(&device.scope, id, key);
    device
        .register_with(&token, json!({ "registrationId": id }), headers)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trusted_region_or_the_network_picks_the_nearest_hub() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        let geo = &mut c.allocation.geo;
        geo.region_header = Some("x-edge-region".into());
        geo.networks = vec![GeoNetwork {
            cidr: "127.0.0.0/8".parse().unwrap(),
            region: "us-east".into(),
        }];
        geo.regions = vec![
            GeoRegion {
                name: "us-east".into(),
                latitude: 38.03,
                longitude: -78.48,
            },
            GeoRegion {
                name: "eu-west".into(),
                latitude: 52.37,
                longitude: 4.90,
            },
        ];
        geo.latency_ms = [(
            "EU-West".to_owned(),
            [
                ("hub-eu.example.com".to_owned(), 9.0),
                ("hub-us.example.com".to_owned(), 80.0),
            ]
            .into_iter()
            .collect(),
        )]
        .into_iter()
        .collect();
    })
    .await;
    for (hub, lat, lon) in [
        ("hub-eu.example.com", 52.37, 4.90),
        ("hub-us.example.com", 38.9, -77.0),
    ] {
        expect_json(
            t.owner(Method::PUT, &format!("/linkedHubs/{hub}"))
                .json(&json!({ "hostName": hub, "latitude": lat, "longitude": lon }))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
    }
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "geo", "allocationPolicy": "geoLatency",
        "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let key = keys_of(&group).0;

    // The edge says eu-west: the latency table decides.
    for i in 0..3 {
        let id = format!("geo-eu-{i}");
        let done = register_with(
            &t,
            &id,
            &key.derive_device_key(&id),
            &[("x-edge-region", "eu-west")],
        )
        .await;
        assert_eq!(
            done["registrationState"]["assignedHub"], "hub-eu.example.com",
            "{done}"
        );
    }
    // No header: 127.0.0.1 lies in the us-east network; distance decides.
    for i in 0..3 {
        let id = format!("geo-us-{i}");
        let done = register_with(&t, &id, &key.derive_device_key(&id), &[]).await;
        assert_eq!(
            done["registrationState"]["assignedHub"], "hub-us.example.com",
            "{done}"
        );
    }
    // The simulation explains it.
    let answer = expect_json(
        t.owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": "geo-x", "enrollmentGroupId": "geo", "policies": ["geoLatency"],
                "metadata": { "region": "eu-west" } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(answer["results"][0]["hub"], "hub-eu.example.com");
    assert!(
        answer["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("latency table"),
        "{answer}"
    );
}
