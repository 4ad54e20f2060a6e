//! `geoLatency` through the real server: the device's region from a trusted edge header, else
//! from the network table; hubs ranked by the latency table, else by distance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../allocation-policies/tests/support/mmdb.rs"]
mod mmdb;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_geoip_database_places_the_device_by_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("city.mmdb");
    let mut writer = mmdb::Writer::new();
    writer.insert("127.0.0.0/8", -33.87, 151.21); // the test client, "in Sydney"
    std::fs::write(&database, writer.finish()).unwrap();
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.allocation.geo.geoip_database = Some(database.clone());
    })
    .await;
    for (hub, lat, lon) in [
        ("hub-eu.example.com", 52.37, 4.90),
        ("hub-au.example.com", -37.81, 144.96),
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
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-geoip", "allocationPolicy": "geoLatency",
            "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let done = register_with(&t, "dev-geoip", &keys_of(&enrollment).0, &[]).await;
    assert_eq!(
        done["registrationState"]["assignedHub"], "hub-au.example.com",
        "{done}"
    );
    let simulated = expect_json(
        t.owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": "x", "sourceAddress": "10.1.2.3", "policies": ["geoLatency"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let reason = simulated["results"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("unknown"),
        "10/8 is not in the database: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_geoip_file_that_is_not_a_database_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("city.mmdb");
    std::fs::write(&database, "not a database").unwrap();
    let config = dps_server::config::Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        allocation: dps_server::config::AllocationConfig {
            geo: dps_server::config::GeoConfig {
                geoip_database: Some(database),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let error = dps_server::server::start(config).await.unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains("geoip_database") && text.contains("MaxMind DB"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probed_latency_ranks_hubs_for_devices_in_the_servers_region() {
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let hooks = MockServer::start().await;
    Mock::given(path("/slow"))
        .respond_with(ResponseTemplate::new(204).set_delay(std::time::Duration::from_millis(400)))
        .mount(&hooks)
        .await;
    Mock::given(path("/fast"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&hooks)
        .await;
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.allocation.geo.probe_region = Some("Here".into());
        c.allocation.geo.probe_interval_secs = 1;
    })
    .await;
    for name in ["slow", "fast"] {
        let hub = format!("hub-{name}.example.com");
        expect_json(
            t.owner(Method::PUT, &format!("/linkedHubs/{hub}"))
                .json(&json!({ "hostName": hub,
                    "connector": { "type": "webhook", "url": format!("{}/{name}", hooks.uri()) } }))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
    }
    let simulate = |id: String, policy: &'static str| {
        let request = t
            .owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": id, "policies": [policy] }));
        async move { expect_json(request.send().await.unwrap(), 200).await }
    };
    // A device the weighted hash would put on the slow hub.
    let mut id = None;
    for i in 0..100 {
        let candidate = format!("dev-probe-{i}");
        if simulate(candidate.clone(), "hashed").await["results"][0]["hub"]
            == "hub-slow.example.com"
        {
            id = Some(candidate);
            break;
        }
    }
    let id = id.expect("some id hashes to the slow hub");
    let mut answer = Value::Null;
    for _ in 0..50 {
        answer = simulate(id.clone(), "geoLatency").await;
        let reason = answer["results"][0]["reason"].as_str().unwrap_or_default();
        if reason.contains("measured") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let reason = answer["results"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("this server's region"), "{reason}");
    assert!(reason.contains("latency measured"), "{reason}");
    assert_eq!(
        answer["results"][0]["ranked"],
        json!(["hub-fast.example.com", "hub-slow.example.com"]),
        "{answer}"
    );
    let enrollment = enroll(
        &t,
        json!({ "registrationId": id, "allocationPolicy": "geoLatency",
            "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let done = register_with(&t, &id, &keys_of(&enrollment).0, &[]).await;
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-fast.example.com"
    );
    let probes = hooks
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "HEAD")
        .count();
    assert!(probes >= 2, "each hub was probed with HEAD: {probes}");
}
