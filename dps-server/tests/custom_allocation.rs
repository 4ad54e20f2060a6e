//! The custom allocation policy against a simulated webhook (wiremock): Azure's request and
//! answer shapes, validation of the answer, retries, the fall-back when the webhook is down,
//! and request signing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use attestation::SymmetricKey;
use common::{Backend, Device, TestServer, device_token, enroll, expect_json, keys_of};
use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SIGNING_KEY: &str = "AAECAwQFBgcICQoLDA0ODw==";

async fn hooks_and_hubs(t: &TestServer) -> MockServer {
    let hooks = MockServer::start().await;
    for hub in ["hub-a.example.com", "hub-b.example.com"] {
        expect_json(
            t.owner(Method::PUT, &format!("/linkedHubs/{hub}"))
                .json(&json!({ "hostName": hub, "connector": { "type": "webhook", "url": format!("{}/identity", hooks.uri()) } }))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
    }
    Mock::given(path("/identity"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&hooks)
        .await;
    hooks
}

fn custom_enrollment(id: &str, hooks: &MockServer, route: &str, update_hub: bool) -> Value {
    json!({ "registrationId": id, "attestation": { "type": "symmetricKey" },
        "allocationPolicy": "custom",
        "reprovisionPolicy": { "updateHubAssignment": update_hub, "migrateDeviceData": true },
        "customAllocationDefinition": { "webhookUrl": format!("{}{route}?code=secret", hooks.uri()), "apiVersion": "2021-10-01" } })
}

async fn register(t: &TestServer, enrollment: &Value, payload: Option<Value>) -> Value {
    let id = enrollment["registrationId"].as_str().unwrap();
    let device = Device::new(t, id);
    let token = device_token(&device.scope, id, &keys_of(enrollment).0);
    let mut body = json!({ "registrationId": id });
    if let Some(payload) = payload {
        body["payload"] = payload;
    }
    device.register_with(&token, body, &[]).await
}

async fn bodies(server: &MockServer, to: &str) -> Vec<(Value, Option<String>, Vec<u8>)> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == to)
        .map(|r| {
            let signature = r
                .headers
                .get("x-dps-signature")
                .map(|v| v.to_str().unwrap().to_owned());
            (
                serde_json::from_slice(&r.body).unwrap(),
                signature,
                r.body.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_chooses_the_hub_and_returns_payload_and_twin() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.allocation.webhook_signing_key = Some(SIGNING_KEY.into());
    })
    .await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(method("POST"))
        .and(path("/allocate"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "iotHubHostName": "hub-b.example.com",
            "initialTwin": { "tags": { "from": "webhook" } },
            "payload": { "greeting": "hello device" } })))
        .mount(&hooks)
        .await;
    let enrollment = enroll(&t, custom_enrollment("dev-c", &hooks, "/allocate", true)).await;
    let done = register(&t, &enrollment, Some(json!({ "modelId": "dtmi:x;1" }))).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-b.example.com"
    );
    assert_eq!(
        done["registrationState"]["payload"],
        json!({ "greeting": "hello device" })
    );

    // The request has Azure's shape, without secrets, and is signed.
    let calls = bodies(&hooks, "/allocate").await;
    assert_eq!(calls.len(), 1);
    let (request, signature, raw) = &calls[0];
    assert_eq!(request["individualEnrollment"]["registrationId"], "dev-c");
    assert_eq!(
        request["individualEnrollment"]["attestation"],
        json!({ "type": "symmetricKey" })
    );
    assert_eq!(request["deviceRuntimeContext"]["registrationId"], "dev-c");
    assert_eq!(request["deviceRuntimeContext"]["symmetricKey"], json!({}));
    assert_eq!(
        request["deviceRuntimeContext"]["payload"],
        json!({ "modelId": "dtmi:x;1" })
    );
    assert_eq!(
        request["linkedHubs"],
        json!(["hub-a.example.com", "hub-b.example.com"])
    );
    let key = SymmetricKey::from_base64(SIGNING_KEY).unwrap();
    let expected: String = key.hmac(raw).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        signature.as_deref(),
        Some(format!("sha256={expected}").as_str())
    );

    // The webhook's twin, not the enrollment's, goes to the hub.
    let identities = bodies(&hooks, "/identity").await;
    assert_eq!(
        identities[0].0["initialTwin"],
        json!({ "tags": { "from": "webhook" } })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_answers_and_refusals_fail_the_registration() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(path("/elsewhere"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "iotHubHostName": "hub-z.example.com" })),
        )
        .mount(&hooks)
        .await;
    Mock::given(path("/refuse"))
        .respond_with(ResponseTemplate::new(400).set_body_string("unknown device"))
        .mount(&hooks)
        .await;
    let elsewhere = enroll(&t, custom_enrollment("dev-z", &hooks, "/elsewhere", true)).await;
    let done = register(&t, &elsewhere, None).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["registrationState"]["errorCode"], 400208);
    assert!(
        done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("hub-z.example.com")
    );

    let refused = enroll(&t, custom_enrollment("dev-r", &hooks, "/refuse", true)).await;
    let done = register(&t, &refused, None).await;
    assert_eq!(done["status"], "failed");
    let message = done["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("400") && message.contains("unknown device"),
        "{message}"
    );
    assert_eq!(
        bodies(&hooks, "/refuse").await.len(),
        1,
        "a 4xx is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_webhook_is_retried_then_fails_or_falls_back() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.allocation.custom_timeout_secs = 1;
        c.allocation.custom_retries = 1;
    })
    .await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(path("/down"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&hooks)
        .await;
    Mock::given(path("/slow"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
        .mount(&hooks)
        .await;
    let down = enroll(&t, custom_enrollment("dev-d", &hooks, "/down", true)).await;
    let done = register(&t, &down, None).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("down")
    );
    assert_eq!(
        bodies(&hooks, "/down").await.len(),
        2,
        "one call and one retry"
    );
    let slow = enroll(&t, custom_enrollment("dev-s", &hooks, "/slow", true)).await;
    let done = register(&t, &slow, None).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("no answer within")
    );

    // With a fall-back policy the device is assigned anyway.
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.allocation.custom_retries = 0;
        c.allocation.custom_fallback = Some("hashed".into());
    })
    .await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(path("/down"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&hooks)
        .await;
    let enrollment = enroll(&t, custom_enrollment("dev-fb", &hooks, "/down", true)).await;
    let done = register(&t, &enrollment, None).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let reason = expect_json(
        t.owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": "dev-fb", "policies": ["custom"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert!(
        reason["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("hashed fall-back"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_device_still_calls_the_webhook_but_keeps_its_hub() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(path("/first"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({ "iotHubHostName": "hub-a.example.com", "payload": { "n": 1 } }),
            ),
        )
        .mount(&hooks)
        .await;
    let mut body = custom_enrollment("dev-k", &hooks, "/first", false);
    let enrollment = enroll(&t, body.clone()).await;
    assert_eq!(
        register(&t, &enrollment, None).await["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );

    Mock::given(path("/second"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({ "iotHubHostName": "hub-b.example.com", "payload": { "n": 2 } }),
            ),
        )
        .mount(&hooks)
        .await;
    body["customAllocationDefinition"]["webhookUrl"] = json!(format!("{}/second", hooks.uri()));
    body["attestation"] = enrollment["attestation"].clone();
    enroll(&t, body).await;
    let again = register(&t, &enrollment, None).await;
    assert_eq!(
        again["registrationState"]["assignedHub"], "hub-a.example.com",
        "never re-provisioned"
    );
    assert_eq!(
        again["registrationState"]["payload"],
        json!({ "n": 2 }),
        "but the new payload is returned"
    );
    assert_eq!(
        bodies(&hooks, "/second").await[0].0["deviceRuntimeContext"]["currentIotHubHostName"],
        "hub-a.example.com"
    );
}
