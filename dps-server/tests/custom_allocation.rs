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

/// The JSON bodies of the requests to `to`, with their signature and timestamp headers and
/// raw bytes.
async fn bodies(server: &MockServer, to: &str) -> Vec<(Value, Option<(String, String)>, Vec<u8>)> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == to)
        .map(|r| {
            let header = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
            let signed = header("x-dps-signature").zip(header("x-dps-timestamp"));
            (
                serde_json::from_slice(&r.body).unwrap(),
                signed,
                r.body.clone(),
            )
        })
        .collect()
}

/// Checks a signature the way the README tells a receiver to: HMAC-SHA256 over the
/// timestamp, a dot and the raw body, and a timestamp close to now.
fn verify_signature(signed: &Option<(String, String)>, raw: &[u8]) {
    let (signature, timestamp) = signed.as_ref().expect("the request is signed");
    let sent: u64 = timestamp.parse().unwrap();
    assert!(common::now().abs_diff(sent) < 60, "timestamp {sent}");
    let key = SymmetricKey::from_base64(SIGNING_KEY).unwrap();
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(raw);
    let expected: String = key
        .hmac(&message)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, &format!("sha256={expected}"));
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
    // Security review item 16: the signature covers a timestamp, so it cannot be replayed
    // later; the webhook connector's requests are signed the same way.
    verify_signature(signature, raw);

    // The webhook's twin, not the enrollment's, goes to the hub.
    let identities = bodies(&hooks, "/identity").await;
    verify_signature(&identities[0].1, &identities[0].2);
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
    // The status, but neither the answer's body nor the URL's query (its function key).
    assert!(message.contains("400"), "{message}");
    assert!(
        !message.contains("unknown device") && !message.contains("secret"),
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

/// Security review item 4: an outbound call never reaches a loopback or private address
/// unless the operator allows its network, never follows a redirect, reads a bounded answer,
/// and its errors carry neither the URL's query string nor the answer's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_calls_are_confined() {
    // Nothing allowed: the webhook on 127.0.0.1 is refused before any request is sent.
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.outbound.allowed_networks.clear();
    })
    .await;
    let hooks = MockServer::start().await;
    Mock::given(path("/allocate"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "iotHubHostName": "hub-a.example.com" })),
        )
        .mount(&hooks)
        .await;
    t.link_hub("hub-a.example.com").await;
    // Through a name, too: localhost resolves to loopback.
    for (id, base) in [
        ("dev-literal", hooks.uri()),
        ("dev-name", hooks.uri().replace("127.0.0.1", "localhost")),
    ] {
        let mut enrollment = custom_enrollment(id, &hooks, "/allocate", true);
        enrollment["customAllocationDefinition"]["webhookUrl"] =
            json!(format!("{base}/allocate?code=secret"));
        let enrollment = enroll(&t, enrollment).await;
        let done = register(&t, &enrollment, None).await;
        assert_eq!(done["status"], "failed", "{done}");
        let message = done["registrationState"]["errorMessage"].as_str().unwrap();
        assert!(message.contains("refused"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
    assert!(
        bodies(&hooks, "/allocate").await.is_empty(),
        "nothing was sent"
    );

    // Allowed (the test default): a redirect is not followed, a huge answer is not read.
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(path("/moved"))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("{}/allocate", hooks.uri())),
        )
        .mount(&hooks)
        .await;
    Mock::given(path("/allocate"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "iotHubHostName": "hub-a.example.com" })),
        )
        .mount(&hooks)
        .await;
    let huge = format!(
        "{{\"iotHubHostName\":\"hub-a.example.com\",\"payload\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    Mock::given(path("/huge"))
        .respond_with(ResponseTemplate::new(200).set_body_string(huge))
        .mount(&hooks)
        .await;
    let moved = enroll(&t, custom_enrollment("dev-moved", &hooks, "/moved", true)).await;
    let done = register(&t, &moved, None).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        bodies(&hooks, "/allocate").await.is_empty(),
        "the redirect was followed"
    );
    let big = enroll(&t, custom_enrollment("dev-huge", &hooks, "/huge", true)).await;
    let done = register(&t, &big, None).await;
    assert_eq!(done["status"], "failed", "{done}");
    let message = done["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(message.contains("larger"), "{message}");
}

/// Security review item 5: the allocation dry-run calls a custom webhook only for a caller
/// that may write enrollments, and its list of policies is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_calls_webhooks_only_for_writers() {
    let t = TestServer::start(Backend::Sqlite).await;
    let hooks = hooks_and_hubs(&t).await;
    Mock::given(path("/allocate"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "iotHubHostName": "hub-a.example.com" })),
        )
        .mount(&hooks)
        .await;
    enroll(&t, custom_enrollment("dev-sim", &hooks, "/allocate", true)).await;
    let reader = expect_json(
        t.owner(Method::PUT, "/accessPolicies/reader")
            .json(&json!({ "keyName": "reader", "rights": ["EnrollmentRead"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let reader_key = reader["primaryKey"].as_str().unwrap().to_owned();
    let simulate = |policy: &str, key: &str, body: Value| {
        t.signed(Method::POST, "/allocations:simulate", policy, key)
            .json(&body)
    };
    common::expect_error(
        simulate(
            "reader",
            &reader_key,
            json!({ "registrationId": "dev-sim", "policies": ["custom"] }),
        )
        .send()
        .await
        .unwrap(),
        403,
        403001,
    )
    .await;
    let all = expect_json(
        simulate(
            "reader",
            &reader_key,
            json!({ "registrationId": "dev-sim" }),
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    let custom = all["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policy"] == "custom")
        .unwrap();
    assert!(
        custom["error"]
            .as_str()
            .unwrap()
            .contains("EnrollmentWrite"),
        "{custom}"
    );
    assert!(
        bodies(&hooks, "/allocate").await.is_empty(),
        "a reader made the server call out"
    );

    let owner = &t.owner;
    let owner_key = owner.key.to_base64();
    let deduplicated = expect_json(
        simulate(
            &owner.key_name,
            &owner_key,
            json!({ "registrationId": "dev-sim", "policies": ["custom", "CUSTOM", "custom", "hashed"] }),
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        deduplicated["results"].as_array().unwrap().len(),
        2,
        "{deduplicated}"
    );
    assert_eq!(bodies(&hooks, "/allocate").await.len(), 1);
    let many: Vec<String> = (0..100).map(|i| format!("policy-{i}")).collect();
    common::expect_error(
        simulate(
            &owner.key_name,
            &owner_key,
            json!({ "registrationId": "dev-sim", "policies": many }),
        )
        .send()
        .await
        .unwrap(),
        400,
        400004,
    )
    .await;
}
