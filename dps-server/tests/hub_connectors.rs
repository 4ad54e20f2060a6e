//! Hub connectors against simulated hubs (wiremock): identities created, moved and cleaned up,
//! failing hubs skipped for the next ranked one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, Device, TestServer, device_token, enroll, expect_json, keys_of};
use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header_regex, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn link(t: &TestServer, host: &str, connector: Value) {
    expect_json(
        t.owner(Method::PUT, &format!("/linkedHubs/{host}"))
            .header("If-Match", "*")
            .json(&json!({ "hostName": host, "connector": connector }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
}

async fn requests_to(server: &MockServer, to: &str) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == to)
        .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
        .collect()
}

/// `n` registration ids whose first choice among the instance's (healthy) hubs is `hub`.
async fn ids_ranking_first(t: &TestServer, hub: &str, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    for i in 0..400 {
        let id = format!("probe-{i}");
        let answer = expect_json(
            t.owner(Method::POST, "/allocations:simulate")
                .json(&json!({ "registrationId": id, "policies": ["hashed"] }))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        if answer["results"][0]["hub"] == hub {
            found.push(id);
            if found.len() == n {
                return found;
            }
        }
    }
    panic!("fewer than {n} registration ids rank {hub} first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_connector_creates_moves_and_removes_identities() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&hooks)
        .await;
    link(
        &t,
        "hub-a.example.com",
        json!({ "type": "webhook", "url": format!("{}/hub-a", hooks.uri()) }),
    )
    .await;
    link(
        &t,
        "hub-b.example.com",
        json!({ "type": "webhook", "url": format!("{}/hub-b", hooks.uri()) }),
    )
    .await;

    let mut body = json!({ "registrationId": "dev-w", "attestation": { "type": "symmetricKey" },
        "iotHubs": ["hub-a.example.com"], "capabilities": { "iotEdge": true },
        "initialTwin": { "tags": { "line": "7" } } });
    let enrollment = enroll(&t, body.clone()).await;
    let (primary, _) = keys_of(&enrollment);
    let device = Device::new(&t, "dev-w");
    let token = device_token(&device.scope, "dev-w", &primary);
    let done = device.register(&token).await;
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );

    let created = requests_to(&hooks, "/hub-a").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["operation"], "upsert");
    assert_eq!(created[0]["deviceId"], "dev-w");
    assert_eq!(created[0]["capabilities"]["iotEdge"], true);
    assert_eq!(created[0]["initialTwin"]["tags"]["line"], "7");
    assert_eq!(
        created[0]["authentication"]["symmetricKey"]["primaryKey"],
        primary.to_base64().as_str()
    );

    // Moving the device creates it in the new hub and removes it from the old one.
    body["iotHubs"] = json!(["hub-b.example.com"]);
    body["attestation"] = enrollment["attestation"].clone();
    enroll(&t, body).await;
    let moved = device.register(&token).await;
    assert_eq!(
        moved["registrationState"]["assignedHub"],
        "hub-b.example.com"
    );
    let hubs = expect_json(
        t.owner(Method::GET, "/linkedHubs").send().await.unwrap(),
        200,
    )
    .await;
    let counts: Vec<(String, i64)> = hubs
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["hostName"].as_str().unwrap().to_owned(),
                h["deviceCount"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("hub-a.example.com".to_owned(), 0),
            ("hub-b.example.com".to_owned(), 1)
        ],
        "the device counts where it is now"
    );
    assert_eq!(
        moved["registrationState"]["substatus"],
        "deviceDataMigrated"
    );
    assert_eq!(
        requests_to(&hooks, "/hub-b").await[0]["operation"],
        "upsert"
    );
    let old = requests_to(&hooks, "/hub-a").await;
    assert_eq!(old.len(), 2);
    assert_eq!(
        old[1],
        json!({ "operation": "delete", "hubHostName": "hub-a.example.com", "deviceId": "dev-w" })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hub_is_skipped_for_the_next_ranked_one() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = MockServer::start().await;
    Mock::given(path("/hub-a"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&hooks)
        .await;
    Mock::given(path("/hub-b"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&hooks)
        .await;
    link(
        &t,
        "hub-a.example.com",
        json!({ "type": "webhook", "url": format!("{}/hub-a", hooks.uri()) }),
    )
    .await;
    link(
        &t,
        "hub-b.example.com",
        json!({ "type": "webhook", "url": format!("{}/hub-b", hooks.uri()) }),
    )
    .await;
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "line", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let group_key = keys_of(&group).0;

    // Both devices would go to hub-a while it is healthy.
    let ids = ids_ranking_first(&t, "hub-a.example.com", 2).await;
    let (first, second) = (ids[0].clone(), ids[1].clone());
    let device = Device::new(&t, &first);
    let done = device
        .register(&device_token(
            &device.scope,
            &first,
            &group_key.derive_device_key(&first),
        ))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-b.example.com"
    );
    assert_eq!(requests_to(&hooks, "/hub-a").await.len(), 1);

    // hub-a now counts as unhealthy: the second device goes to hub-b without trying it.
    let device = Device::new(&t, &second);
    let done = device
        .register(&device_token(
            &device.scope,
            &second,
            &group_key.derive_device_key(&second),
        ))
        .await;
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-b.example.com"
    );
    assert_eq!(
        requests_to(&hooks, "/hub-a").await.len(),
        1,
        "the unhealthy hub was not tried again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_hub_fails_the_registration_fails_with_a_code() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&hooks)
        .await;
    link(
        &t,
        "hub-a.example.com",
        json!({ "type": "webhook", "url": format!("{}/hub-a", hooks.uri()) }),
    )
    .await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-f", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "dev-f");
    let done = device
        .register(&device_token(
            &device.scope,
            "dev-f",
            &keys_of(&enrollment).0,
        ))
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["registrationState"]["errorCode"], 503001);
    let message = done["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("hub-a.example.com") && message.contains("503"),
        "{message}"
    );
    let state = expect_json(
        t.owner(Method::GET, "/registrations/dev-f")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(state["status"], "failed");
    assert!(state.get("assignedHub").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_iot_hub_connector_uses_the_registry_api_and_cleans_up() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hub = MockServer::start().await;
    let sas = || {
        header_regex(
            "authorization",
            "^SharedAccessSignature sr=hub-az\\.example\\.com&sig=.+&skn=registryReadWrite$",
        )
    };
    Mock::given(method("PUT"))
        .and(path("/devices/dev-az"))
        .and(sas())
        .and(body_partial_json(
            json!({ "deviceId": "dev-az", "status": "enabled",
            "authentication": { "type": "sas" } }),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "deviceId": "dev-az" })))
        .expect(1)
        .mount(&hub)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/twins/dev-az"))
        .and(sas())
        .and(body_partial_json(json!({ "tags": { "line": "7" } })))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&hub)
        .await;
    // A second device whose twin cannot be applied: its new identity must be deleted again.
    Mock::given(method("PUT"))
        .and(path("/devices/dev-half"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&hub)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/twins/dev-half"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&hub)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/devices/dev-half"))
        .and(header_regex("if-match", "^\\*$"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&hub)
        .await;
    link(
        &t,
        "hub-az.example.com",
        json!({ "type": "azure-iot-hub", "endpoint": hub.uri(),
            "connectionString": "HostName=hub-az.example.com;SharedAccessKeyName=registryReadWrite;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==" }),
    )
    .await;
    let twin = json!({ "tags": { "line": "7" }, "properties": { "desired": { "rate": 5 } } });
    for id in ["dev-az", "dev-half"] {
        let enrollment = enroll(&t, json!({ "registrationId": id, "attestation": { "type": "symmetricKey" }, "initialTwin": twin })).await;
        let device = Device::new(&t, id);
        let done = device
            .register(&device_token(&device.scope, id, &keys_of(&enrollment).0))
            .await;
        let expected = if id == "dev-az" { "assigned" } else { "failed" };
        assert_eq!(done["status"], expected, "{id}: {done}");
    }
    // The hub's secret is not shown on reads.
    let read = expect_json(
        t.owner(Method::GET, "/linkedHubs/hub-az.example.com")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert!(read["connector"].get("connectionString").is_none());
    assert_eq!(read["connector"]["endpoint"], hub.uri().as_str());
    hub.verify().await;
}

/// An azure-iot-hub connector at `server`, for `host`.
fn azure(server: &MockServer, host: &str) -> Value {
    json!({ "type": "azure-iot-hub", "endpoint": server.uri(),
        "connectionString": format!("HostName={host};SharedAccessKeyName=registryReadWrite;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==") })
}

async fn patches(server: &MockServer, device: &str) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == "PATCH" && r.url.path() == format!("/twins/{device}"))
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_are_set_once_and_migrated_or_reset_when_a_device_moves() {
    let t = TestServer::start(Backend::Sqlite).await;
    let (hub_a, hub_b) = (MockServer::start().await, MockServer::start().await);
    for hub in [&hub_a, &hub_b] {
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(200))
            .mount(hub)
            .await;
        Mock::given(method("PATCH"))
            .respond_with(ResponseTemplate::new(200))
            .mount(hub)
            .await;
        Mock::given(method("DELETE"))
            .respond_with(ResponseTemplate::new(204))
            .mount(hub)
            .await;
    }
    // The live twin in hub A: what a migration must carry, without the hub's bookkeeping.
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "deviceId": "x", "etag": "AAAA", "version": 9,
            "tags": { "site": "live" },
            "properties": { "desired": { "rate": 7, "$version": 4, "$metadata": {} }, "reported": { "temp": 20 } } })))
        .mount(&hub_a)
        .await;
    link(&t, "hub-a.example.com", azure(&hub_a, "hub-a.example.com")).await;
    link(&t, "hub-b.example.com", azure(&hub_b, "hub-b.example.com")).await;
    let initial =
        json!({ "tags": { "site": "initial" }, "properties": { "desired": { "rate": 1 } } });

    for (id, migrate, expected_on_b) in [
        (
            "dev-migrate",
            true,
            json!({ "tags": { "site": "live" }, "properties": { "desired": { "rate": 7 } } }),
        ),
        ("dev-reset", false, initial.clone()),
    ] {
        let mut body = json!({ "registrationId": id, "attestation": { "type": "symmetricKey" },
            "iotHubs": ["hub-a.example.com"], "initialTwin": initial,
            "reprovisionPolicy": { "updateHubAssignment": true, "migrateDeviceData": migrate } });
        let enrollment = enroll(&t, body.clone()).await;
        let device = Device::new(&t, id);
        let token = device_token(&device.scope, id, &keys_of(&enrollment).0);
        device.register(&token).await;
        assert_eq!(
            patches(&hub_a, id).await,
            std::slice::from_ref(&initial),
            "{id}: the initial twin, once"
        );

        // Registering again on the same hub leaves the live twin alone.
        let again = device.register(&token).await;
        assert_eq!(
            again["registrationState"]["assignedHub"],
            "hub-a.example.com"
        );
        assert_eq!(
            patches(&hub_a, id).await.len(),
            1,
            "{id}: no second twin patch"
        );

        body["iotHubs"] = json!(["hub-b.example.com"]);
        body["attestation"] = enrollment["attestation"].clone();
        enroll(&t, body).await;
        let moved = device.register(&token).await;
        assert_eq!(
            moved["registrationState"]["assignedHub"],
            "hub-b.example.com"
        );
        assert_eq!(patches(&hub_b, id).await, [expected_on_b], "{id}");
    }
}

/// Security review item 4, hub connectors: the webhook connector and the registry API are
/// refused on addresses the operator did not allow, and the failure names neither the URL's
/// query nor anything the hub answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_do_not_reach_networks_the_operator_did_not_allow() {
    let t = TestServer::start_with(Backend::Sqlite, |c| c.outbound.allowed_networks.clear()).await;
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&hooks)
        .await;
    link(
        &t,
        "hub-a.example.com",
        json!({ "type": "webhook", "url": format!("{}/hub-a?code=secret", hooks.uri()) }),
    )
    .await;
    link(
        &t,
        "hub-b.example.com",
        json!({ "type": "azure-iot-hub", "endpoint": format!("{}/registry", hooks.uri()),
            "connectionString": "HostName=hub-b.example.com;SharedAccessKeyName=registryReadWrite;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==" }),
    )
    .await;
    for hub in ["hub-a.example.com", "hub-b.example.com"] {
        let id = format!("dev-{}", &hub[..5]);
        let enrollment = enroll(
            &t,
            json!({ "registrationId": id, "iotHubs": [hub], "attestation": { "type": "symmetricKey" } }),
        )
        .await;
        let device = Device::new(&t, &id);
        let done = device
            .register(&device_token(&device.scope, &id, &keys_of(&enrollment).0))
            .await;
        assert_eq!(done["status"], "failed", "{done}");
        let message = done["registrationState"]["errorMessage"].as_str().unwrap();
        assert!(message.contains("refused"), "{message}");
        assert!(
            !message.contains("secret") && !message.contains("SharedAccessKey"),
            "{message}"
        );
    }
    assert!(
        hooks
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty(),
        "a request reached the loopback address"
    );
}
