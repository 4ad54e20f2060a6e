//! The device registration API with symmetric keys, end to end over HTTPS, on SQLite and on
//! PostgreSQL: the Azure wire behaviour, every SAS variant clients send, the reprovision
//! policies, and the failures, each leaving the stored state unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use attestation::SymmetricKey;
use attestation::sas::{encode_uri_component, sign};
use common::{
    Backend, Device, TestServer, device_token, enroll, expect_error, expect_json, keys_of, now,
    registration_state,
};
use reqwest::Method;
use serde_json::{Value, json};

async fn individual_enrollment_registers_and_rolls_keys(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-1", "deviceId": "device-one",
        "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (primary, secondary) = keys_of(&enrollment);
    let device = Device::new(&t, "dev-1");

    let done = device
        .register(&device_token(&device.scope, "dev-1", &primary))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let state = &done["registrationState"];
    assert_eq!(state["assignedHub"], "hub-a.example.com");
    assert_eq!(state["deviceId"], "device-one");
    assert_eq!(state["substatus"], "initialAssignment");
    assert_eq!(state["registrationId"], "dev-1");
    assert!(state["symmetricKey"].is_object());
    assert!(state["createdDateTimeUtc"].is_string());

    // The hub counts the device, in the admin API and in /metrics.
    let hub = expect_json(
        t.owner(Method::GET, "/linkedHubs/hub-a.example.com")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(hub["deviceCount"], 1);
    let metrics = t.metrics().await;
    assert!(
        metrics.contains("dps_hub_devices{instance=\"default\",hub=\"hub-a.example.com\"} 1"),
        "{metrics}"
    );

    // The admin API sees the same state.
    let stored = registration_state(&t, "dev-1").await.unwrap();
    assert_eq!(stored["assignedHub"], "hub-a.example.com");
    assert_eq!(stored["status"], "assigned");

    // Rolling to the secondary key keeps the registration.
    let again = device
        .register(&device_token(&device.scope, "dev-1", &secondary))
        .await;
    assert_eq!(again["status"], "assigned");
    assert_eq!(
        again["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );
    assert_eq!(again["registrationState"]["substatus"], "initialAssignment");
    assert_eq!(
        registration_state(&t, "dev-1").await.unwrap()["createdDateTimeUtc"],
        stored["createdDateTimeUtc"]
    );

    // The device's payload is kept with its registration (for allocation webhooks).
    let with_payload = device
        .t
        .anonymous(
            Method::PUT,
            &format!("/{}/registrations/dev-1/register", device.scope),
        )
        .header(
            "Authorization",
            device_token(&device.scope, "dev-1", &primary),
        )
        .json(&json!({ "registrationId": "dev-1", "payload": { "modelId": "dtmi:example;1" } }))
        .send()
        .await
        .unwrap();
    expect_json(with_payload, 202).await;
    let mut kept = None;
    for _ in 0..100 {
        let stored = t
            .running()
            .store()
            .get(
                "default",
                dps_server::store::Kind::RegistrationState,
                "dev-1",
            )
            .await
            .unwrap()
            .unwrap();
        let doc: Value = serde_json::from_str(&stored.doc).unwrap();
        if doc["devicePayload"] != Value::Null {
            kept = Some(doc["devicePayload"].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kept, Some(json!({ "modelId": "dtmi:example;1" })));

    // The status lookup returns the registration state.
    let lookup = expect_json(
        t.anonymous(
            Method::POST,
            &format!("/{}/registrations/dev-1", device.scope),
        )
        .header(
            "Authorization",
            device_token(&device.scope, "dev-1", &primary),
        )
        .json(&json!({ "registrationId": "dev-1" }))
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(lookup["assignedHub"], "hub-a.example.com");
}

async fn group_members_register_with_derived_keys(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    t.link_hub("hub-b.example.com").await;
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "line-7", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (primary, secondary) = keys_of(&group);
    let device = Device::new(&t, "Sensor-42");
    let derived = primary.derive_device_key("Sensor-42");

    let done = device
        .register(&device_token(&device.scope, "Sensor-42", &derived))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["symmetricKey"]["enrollmentGroupId"],
        "line-7"
    );
    assert_eq!(done["registrationState"]["deviceId"], "Sensor-42");
    let hub = done["registrationState"]["assignedHub"]
        .as_str()
        .unwrap()
        .to_owned();

    // The simulation predicts the hub the registration got.
    let simulated = expect_json(
        t.owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": "Sensor-42", "enrollmentGroupId": "line-7", "policies": ["hashed"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(simulated["results"][0]["hub"], hub.as_str());

    // The secondary group key works too; the hashed choice is stable.
    let rolled = device
        .register(&device_token(
            &device.scope,
            "Sensor-42",
            &secondary.derive_device_key("Sensor-42"),
        ))
        .await;
    assert_eq!(rolled["registrationState"]["assignedHub"], hub.as_str());

    // The group key itself is not the device key.
    let wrong = device
        .put(&device_token(&device.scope, "Sensor-42", &primary))
        .send()
        .await
        .unwrap();
    expect_error(wrong, 401, 401002).await;

    let members = expect_json(
        t.owner(Method::POST, "/registrations/line-7/query")
            .json(&json!({"query": "*"}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(members[0]["registrationId"], "Sensor-42");
    assert_eq!(members[0]["enrollmentGroupId"], "line-7");
}

async fn every_client_token_variant_is_accepted(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-v", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (key, _) = keys_of(&enrollment);
    let scope = t.running().admin.id_scope.clone();
    let device = Device::new(&t, "dev-v");
    let raw = format!("{scope}/registrations/dev-v");
    let encoded = encode_uri_component(&raw);
    let expiry = now() + 3600;
    let variants = [
        // Node symmetric: raw sr, skn.
        sign(&raw, &key, expiry, Some("registration")),
        // Python: encoded sr, no skn.
        sign(&encoded, &key, expiry, None),
        // C: lower-case percent-encoding in sr and sig.
        sign(
            &encoded.replace("%2F", "%2f"),
            &key,
            expiry,
            Some("registration"),
        )
        .replace("%2B", "%2b")
        .replace("%3D", "%3d"),
        // aziot: lower-cased audience, 30-second lifetime.
        sign(
            &encode_uri_component(&raw.to_ascii_lowercase()),
            &key,
            now() + 30,
            Some("registration"),
        ),
    ];
    for token in variants {
        let done = device.register(&token).await;
        assert_eq!(done["status"], "assigned", "{token}: {done}");
    }
    // Keys in another order.
    let token = sign(&raw, &key, expiry, Some("registration"));
    let body = token.strip_prefix("SharedAccessSignature ").unwrap();
    let mut fields: Vec<&str> = body.split('&').collect();
    fields.reverse();
    let reordered = format!("SharedAccessSignature {}", fields.join("&"));
    assert_eq!(device.register(&reordered).await["status"], "assigned");
}

async fn failures_are_refused_and_change_nothing(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.max_device_body_bytes = 1024).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-n", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (key, _) = keys_of(&enrollment);
    let device = Device::new(&t, "dev-n");
    let scope = device.scope.clone();
    let resource = format!("{scope}/registrations/dev-n");
    let wrong = SymmetricKey::generate().unwrap();

    let cases: Vec<(String, u16, u32)> = vec![
        (device_token(&scope, "dev-n", &wrong), 401, 401002),
        (sign(&resource, &key, now() - 3600, None), 401, 401002),
        (
            sign(
                &format!("{scope}/registrations/dev-m"),
                &key,
                now() + 3600,
                None,
            ),
            401,
            401002,
        ),
        (
            sign(&resource, &key, now() + 3600, None).replace("dev-n", "dev-m"),
            401,
            401002,
        ),
        ("SharedAccessSignature nonsense".into(), 401, 401002),
    ];
    for (token, status, code) in cases {
        expect_error(device.put(&token).send().await.unwrap(), status, code).await;
    }
    expect_error(
        t.anonymous(
            Method::PUT,
            &format!("/{scope}/registrations/dev-n/register"),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap(),
        401,
        401002,
    )
    .await;
    // Unknown ID scope and unknown registration id look alike.
    let unknown_scope = t
        .anonymous(Method::PUT, "/0ne00000000/registrations/dev-n/register")
        .header("Authorization", device_token("0ne00000000", "dev-n", &key))
        .json(&json!({ "registrationId": "dev-n" }))
        .send()
        .await
        .unwrap();
    let a = expect_error(unknown_scope, 401, 401002).await;
    let unknown_id = Device::new(&t, "nobody");
    let b = expect_error(
        unknown_id
            .put(&device_token(&scope, "nobody", &key))
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    assert_eq!(a["message"], b["message"]);

    let token = device_token(&scope, "dev-n", &key);
    let put = |body: String| {
        t.anonymous(
            Method::PUT,
            &format!("/{scope}/registrations/dev-n/register"),
        )
        .header("Authorization", token.clone())
        .header("Content-Type", "application/json")
        .body(body)
    };
    expect_error(
        put("{\"registrationId\":".into()).send().await.unwrap(),
        400,
        400006,
    )
    .await;
    expect_error(
        put("{\"registrationId\":\"other\"}".into())
            .send()
            .await
            .unwrap(),
        400,
        400008,
    )
    .await;
    expect_error(
        put(format!("{{\"payload\":\"{}\"}}", "x".repeat(2048)))
            .send()
            .await
            .unwrap(),
        413,
        413001,
    )
    .await;
    expect_error(
        t.anonymous(
            Method::PUT,
            &format!("/{scope}/registrations/bad%20id/register"),
        )
        .header("Authorization", token.clone())
        .send()
        .await
        .unwrap(),
        400,
        400007,
    )
    .await;
    expect_error(
        t.anonymous(
            Method::GET,
            &format!("/{scope}/registrations/dev-n/operations/5.nope"),
        )
        .header("Authorization", token.clone())
        .send()
        .await
        .unwrap(),
        404,
        404206,
    )
    .await;
    assert!(
        registration_state(&t, "dev-n").await.is_none(),
        "nothing was stored"
    );

    // A disabled enrollment answers `disabled` with an error code and stores nothing.
    let mut disabled = enrollment.clone();
    disabled["provisioningStatus"] = json!("disabled");
    enroll(&t, disabled).await;
    let done = device.register(&token).await;
    assert_eq!(done["status"], "disabled", "{done}");
    assert_eq!(done["registrationState"]["errorCode"], 403002);
    assert!(
        done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("disabled")
    );
    assert!(registration_state(&t, "dev-n").await.is_none());

    // So does a disabled group, for its members.
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "off", "provisioningStatus": "disabled",
        "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let member = Device::new(&t, "member-1");
    let derived = keys_of(&group).0.derive_device_key("member-1");
    let done = member
        .register(&device_token(&scope, "member-1", &derived))
        .await;
    assert_eq!(done["status"], "disabled");
    assert_eq!(done["registrationState"]["errorCode"], 403002);
    assert!(registration_state(&t, "member-1").await.is_none());
}

async fn no_hub_fails_with_an_error_code(backend: Backend) {
    let t = TestServer::start(backend).await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "lonely", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "lonely");
    let done = device
        .register(&device_token(
            &device.scope,
            "lonely",
            &keys_of(&enrollment).0,
        ))
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["registrationState"]["errorCode"], 400208);
    assert!(
        done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("no linked hub")
    );
    assert_eq!(
        registration_state(&t, "lonely").await.unwrap()["status"],
        "failed"
    );
}

async fn reprovisioning_follows_the_policy(backend: Backend) {
    let t = TestServer::start(backend).await;
    for hub in ["hub-a.example.com", "hub-b.example.com"] {
        t.link_hub(hub).await;
    }
    let scope = t.running().admin.id_scope.clone();
    let cases = [
        (
            "migrate",
            json!({ "updateHubAssignment": true, "migrateDeviceData": true }),
            "hub-b.example.com",
            "deviceDataMigrated",
        ),
        (
            "reset",
            json!({ "updateHubAssignment": true, "migrateDeviceData": false }),
            "hub-b.example.com",
            "deviceDataReset",
        ),
        (
            "never",
            json!({ "updateHubAssignment": false, "migrateDeviceData": true }),
            "hub-a.example.com",
            "initialAssignment",
        ),
    ];
    for (id, policy, expected_hub, expected_substatus) in cases {
        let mut body = json!({ "registrationId": id, "attestation": { "type": "symmetricKey" },
            "iotHubs": ["hub-a.example.com"], "reprovisionPolicy": policy });
        let enrollment = enroll(&t, body.clone()).await;
        let token = device_token(&scope, id, &keys_of(&enrollment).0);
        let device = Device::new(&t, id);
        let first = device.register(&token).await;
        assert_eq!(
            first["registrationState"]["assignedHub"],
            "hub-a.example.com"
        );

        body["iotHubs"] = json!(["hub-b.example.com"]);
        body["attestation"] = enrollment["attestation"].clone();
        enroll(&t, body.clone()).await;
        let second = device.register(&token).await;
        assert_eq!(
            second["registrationState"]["assignedHub"], expected_hub,
            "{id}"
        );
        assert_eq!(
            second["registrationState"]["substatus"], expected_substatus,
            "{id}"
        );

        if id == "migrate" {
            // Back to the first hub: reprovisioned to the initial assignment.
            body["iotHubs"] = json!(["hub-a.example.com"]);
            enroll(&t, body).await;
            let third = device.register(&token).await;
            assert_eq!(
                third["registrationState"]["assignedHub"],
                "hub-a.example.com"
            );
            assert_eq!(
                third["registrationState"]["substatus"],
                "reprovisionedToInitialAssignment"
            );
        }
    }
}

async fn concurrent_registrations_end_in_one_state(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    t.link_hub("hub-b.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "racer", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "racer");
    let token = device_token(&device.scope, "racer", &keys_of(&enrollment).0);
    let results = futures_join(&device, &token, 8).await;
    let hubs: std::collections::BTreeSet<String> = results
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "assigned", "{r}");
            r["registrationState"]["assignedHub"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(hubs.len(), 1, "every attempt lands on the same hub");
    let stored = registration_state(&t, "racer").await.unwrap();
    assert_eq!(
        stored["assignedHub"].as_str().unwrap(),
        hubs.iter().next().unwrap()
    );
    assert_eq!(stored["substatus"], "initialAssignment");
}

async fn futures_join(device: &Device<'_>, token: &str, n: usize) -> Vec<Value> {
    let mut pending = Vec::new();
    for _ in 0..n {
        pending.push(device.register(token));
    }
    let mut results = Vec::new();
    // Poll them together so the PUTs overlap.
    let joined = async {
        let mut futures: Vec<_> = pending.into_iter().map(Box::pin).collect();
        let mut out = Vec::new();
        while !futures.is_empty() {
            let (value, _, rest) = select_all(futures).await;
            out.push(value);
            futures = rest;
        }
        out
    };
    results.extend(joined.await);
    results
}

/// A minimal `select_all` over boxed futures (keeps the test free of extra dependencies).
async fn select_all<F: std::future::Future + Unpin>(
    mut futures: Vec<F>,
) -> (F::Output, usize, Vec<F>) {
    std::future::poll_fn(move |cx| {
        for i in 0..futures.len() {
            if let std::task::Poll::Ready(value) = std::pin::Pin::new(&mut futures[i]).poll(cx) {
                let mut rest = std::mem::take(&mut futures);
                rest.remove(i);
                return std::task::Poll::Ready((value, i, rest));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn operations_survive_a_restart(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "phoenix", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let scope = t.running().admin.id_scope.clone();
    let token = device_token(&scope, "phoenix", &keys_of(&enrollment).0);
    let done = Device::new(&t, "phoenix").register(&token).await;
    let operation = done["operationId"].as_str().unwrap().to_owned();

    let t = t.restart().await;
    let after = expect_json(
        t.anonymous(
            Method::GET,
            &format!("/{}/registrations/phoenix/operations/{operation}", scope),
        )
        .header("Authorization", token)
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(after["status"], "assigned");
    assert_eq!(
        after["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );
}

async fn a_poll_finishes_an_operation_a_stopped_server_left_assigning(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.resume_assigning_after_secs = 0).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "orphan", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "orphan");
    // What a server that stopped right after answering 202 leaves behind: an operation still
    // assigning and no registration state.
    let operation = json!({ "operationId": "5.0000000000000000.orphaned", "registrationId": "orphan",
        "status": "assigning", "enrollment": { "kind": "individual", "id": "orphan" } });
    t.running()
        .store()
        .write(&[dps_server::store::Write::Put {
            ns: "default".into(),
            kind: dps_server::store::Kind::Operation,
            key: "5.0000000000000000.orphaned".into(),
            columns: dps_server::store::Columns::Operation {
                registration: "orphan".into(),
                expires_at: None,
            },
            doc: operation.to_string(),
            precondition: dps_server::store::Precondition::MustNotExist,
            etag: None,
        }])
        .await
        .unwrap();
    let polled = expect_json(
        t.anonymous(
            Method::GET,
            &format!(
                "/{}/registrations/orphan/operations/5.0000000000000000.orphaned",
                device.scope
            ),
        )
        .header(
            "Authorization",
            device_token(&device.scope, "orphan", &keys_of(&enrollment).0),
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(polled["status"], "assigned", "{polled}");
    assert_eq!(
        polled["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );
    assert_eq!(
        registration_state(&t, "orphan").await.unwrap()["status"],
        "assigned"
    );
}

/// The register request waits for its assignment (up to `limits.assign_wait_ms`), so a device's
/// first poll finds it finished; a slower hub does not hold the answer past the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_poll_finds_the_assignment_unless_the_hub_is_slower_than_the_budget() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let t = TestServer::start_with(Backend::Sqlite, |c| c.limits.assign_wait_ms = 300).await;
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204).set_delay(Duration::from_millis(2500)))
        .mount(&slow)
        .await;
    t.link_hub("hub-a.example.com").await;
    expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-slow.example.com")
            .json(&json!({ "hostName": "hub-slow.example.com",
                "connector": { "type": "webhook", "url": format!("{}/slow", slow.uri()) } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let first_poll = |id: &'static str, hub: &'static str| {
        let t = &t;
        async move {
            let enrollment = enroll(
                t,
                json!({ "registrationId": id, "attestation": { "type": "symmetricKey" },
                    "iotHubs": [hub] }),
            )
            .await;
            let device = Device::new(t, id);
            let token = device_token(&device.scope, id, &keys_of(&enrollment).0);
            let accepted = expect_json(device.put(&token).send().await.unwrap(), 202).await;
            let operation = accepted["operationId"].as_str().unwrap().to_owned();
            let poll = t
                .anonymous(
                    Method::GET,
                    &format!(
                        "/{}/registrations/{id}/operations/{operation}",
                        device.scope
                    ),
                )
                .header("Authorization", &token)
                .send()
                .await
                .unwrap();
            (poll.status().as_u16(), poll.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = first_poll("prompt", "hub-a.example.com").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("assigned")),
        "{body}"
    );
    let (status, body) = first_poll("patient", "hub-slow.example.com").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("assigning")),
        "{body}"
    );
}

async fn throttling_answers_429_with_retry_after(backend: Backend) {
    let t = TestServer::start_with(backend, |c| {
        c.throttle.registrations_per_device_per_minute = 2
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "chatty", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "chatty");
    let token = device_token(&device.scope, "chatty", &keys_of(&enrollment).0);
    for _ in 0..2 {
        expect_json(device.put(&token).send().await.unwrap(), 202).await;
    }
    let throttled = device.put(&token).send().await.unwrap();
    let retry: u64 = throttled.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    expect_error(throttled, 429, 429001).await;
}

/// Security review item 2: a key derived from a symmetric-key group does not admit an id that
/// has its own individual enrollment (of any attestation type), and changes nothing.
async fn a_group_key_cannot_claim_an_individually_enrolled_id(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let own = enroll(
        &t,
        json!({ "registrationId": "dev-own", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "fleet", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "dev-own");
    let done = device
        .register(&device_token(&device.scope, "dev-own", &keys_of(&own).0))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let before = registration_state(&t, "dev-own").await.unwrap();

    for key in [keys_of(&group).0, keys_of(&group).1] {
        let derived = key.derive_device_key("dev-own");
        let token = device_token(&device.scope, "dev-own", &derived);
        let error = expect_error(device.put(&token).send().await.unwrap(), 401, 401002).await;
        assert_eq!(
            error["message"], "the device could not be authenticated",
            "the answer says nothing about the enrollment"
        );
    }
    let after = registration_state(&t, "dev-own").await.unwrap();
    assert_eq!(
        before["etag"], after["etag"],
        "the registration state changed"
    );

    // The same for ids enrolled individually with a TPM or X.509, or disabled.
    let tpm = attestation::tpm::soft::SoftTpm::fixture(0).unwrap();
    enroll(
        &t,
        json!({ "registrationId": "dev-tpm", "attestation": { "type": "tpm", "tpm": {
            "endorsementKey": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, tpm.endorsement_key()) } } }),
    )
    .await;
    enroll(
        &t,
        json!({ "registrationId": "dev-off", "provisioningStatus": "disabled",
            "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    for id in ["dev-tpm", "dev-off"] {
        let derived = keys_of(&group).0.derive_device_key(id);
        let member = Device::new(&t, id);
        expect_error(
            member
                .put(&device_token(&member.scope, id, &derived))
                .send()
                .await
                .unwrap(),
            401,
            401002,
        )
        .await;
        assert!(registration_state(&t, id).await.is_none(), "{id}");
    }
}

/// Security review item 7: junk requests for a device's id do not use up its quota; failures
/// are counted per source address, and per id only with a much higher bound.
async fn unauthenticated_requests_do_not_use_up_a_device_quota(backend: Backend) {
    let t = TestServer::start_with(backend, |c| {
        c.throttle.registrations_per_device_per_minute = 3;
        c.throttle.unauthenticated_per_address_per_minute = 5;
        c.throttle.unauthenticated_per_device_per_minute = 40;
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "victim", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&t, "victim");
    let scope = device.scope.clone();
    let junk_token = device_token(&scope, "victim", &SymmetricKey::generate().unwrap());
    let url = format!(
        "{}/{scope}/registrations/victim/register?api-version=2021-10-01",
        t.base
    );
    let junk = |client: &reqwest::Client| {
        client
            .put(&url)
            .header("Authorization", junk_token.clone())
            .json(&json!({ "registrationId": "victim" }))
    };

    // Thirty junk requests from six other addresses (five each, the per-address budget).
    for n in 2..8u8 {
        let attacker = t.client_from(std::net::IpAddr::from([127, 0, 0, n]));
        for _ in 0..5 {
            expect_error(junk(&attacker).send().await.unwrap(), 401, 401002).await;
        }
        // The address is spent: its next attempt is refused before any proof is checked.
        expect_error(junk(&attacker).send().await.unwrap(), 429, 429001).await;
    }
    // The device registers as often as its own quota allows, from its own address.
    let token = device_token(&scope, "victim", &keys_of(&enrollment).0);
    for _ in 0..3 {
        expect_json(device.put(&token).send().await.unwrap(), 202).await;
    }
    expect_error(device.put(&token).send().await.unwrap(), 429, 429001).await;

    // Failures for one id from many addresses reach the much higher per-id bound.
    let other = enroll(
        &t,
        json!({ "registrationId": "target", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let target = Device::new(&t, "target");
    let bad = device_token(&scope, "target", &SymmetricKey::generate().unwrap());
    for n in 10..19u8 {
        let attacker = t.client_from(std::net::IpAddr::from([127, 0, 0, n]));
        for _ in 0..5 {
            let _ = target_put(&attacker, &t, &scope, &bad)
                .send()
                .await
                .unwrap();
        }
    }
    let good = device_token(&scope, "target", &keys_of(&other).0);
    expect_error(target.put(&good).send().await.unwrap(), 429, 429001).await;
}

fn target_put(
    client: &reqwest::Client,
    t: &TestServer,
    scope: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    client
        .put(format!(
            "{}/{scope}/registrations/target/register?api-version=2021-10-01",
            t.base
        ))
        .header("Authorization", token)
        .json(&json!({ "registrationId": "target" }))
}

/// Security review item 14: polls check the token's expiry, with the clock-skew allowance.
async fn polls_check_the_token_expiry(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.clock_skew_secs = 60).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "poller", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let key = keys_of(&enrollment).0;
    let device = Device::new(&t, "poller");
    let resource = format!("{}/registrations/poller", device.scope);
    let accepted = expect_json(
        device
            .put(&device_token(&device.scope, "poller", &key))
            .send()
            .await
            .unwrap(),
        202,
    )
    .await;
    let operation = accepted["operationId"].as_str().unwrap();
    let poll = |token: String| {
        t.anonymous(
            Method::GET,
            &format!(
                "/{}/registrations/poller/operations/{operation}",
                device.scope
            ),
        )
        .header("Authorization", token)
    };
    // An aziot-style 30-second token that ran out a little while ago: within the allowance.
    let recent = sign(&resource, &key, now() - 20, Some("registration"));
    let status = poll(recent).send().await.unwrap().status();
    assert!(status == 200 || status == 202, "{status}");
    // One that ran out longer ago than the allowance: refused.
    let stale = sign(&resource, &key, now() - 3600, Some("registration"));
    expect_error(poll(stale).send().await.unwrap(), 401, 401002).await;
}

/// A poll of an operation this process just finished is answered from memory, but only to a
/// request that proves the same credential again: another key, another device's path, or a
/// token for another device get what they would get from the store.
async fn a_poll_from_memory_still_needs_the_device_s_proof(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let mut keys = Vec::new();
    for id in ["dev-a", "dev-b"] {
        let enrollment = enroll(
            &t,
            json!({ "registrationId": id, "attestation": { "type": "symmetricKey" } }),
        )
        .await;
        keys.push(keys_of(&enrollment));
    }
    let device = Device::new(&t, "dev-a");
    let done = device
        .register(&device_token(&device.scope, "dev-a", &keys[0].0))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let operation = done["operationId"].as_str().unwrap();
    let poll = |path_id: &str, token: String| {
        t.anonymous(
            Method::GET,
            &format!(
                "/{}/registrations/{path_id}/operations/{operation}",
                device.scope
            ),
        )
        .header("Authorization", token)
        .send()
    };
    // The device itself, with either of its keys.
    for key in [&keys[0].0, &keys[0].1] {
        let answer = expect_json(
            poll("dev-a", device_token(&device.scope, "dev-a", key))
                .await
                .unwrap(),
            200,
        )
        .await;
        assert_eq!(answer, done);
    }
    // Another device's key on dev-a's path, and dev-a's key signing for another resource.
    let wrong = device_token(&device.scope, "dev-a", &keys[1].0);
    expect_error(poll("dev-a", wrong).await.unwrap(), 401, 401002).await;
    let elsewhere = device_token(&device.scope, "dev-b", &keys[0].0);
    expect_error(poll("dev-a", elsewhere).await.unwrap(), 401, 401002).await;
    // dev-b, properly authenticated, asking for dev-a's operation.
    let other = device_token(&device.scope, "dev-b", &keys[1].0);
    expect_error(poll("dev-b", other).await.unwrap(), 404, 404206).await;
    // No token at all.
    let anonymous = t
        .anonymous(
            Method::GET,
            &format!(
                "/{}/registrations/dev-a/operations/{operation}",
                device.scope
            ),
        )
        .send()
        .await
        .unwrap();
    expect_error(anonymous, 401, 401002).await;
}

/// Security review item 9: device authentication keeps an instance's groups in memory, so a
/// change made through another replica must count at the next request, not later.
async fn a_replica_sees_group_and_hub_changes_at_once(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let replica = t.replica().await;
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "fleet", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&replica, "member-7");
    let derived = keys_of(&group).0.derive_device_key("member-7");
    let token = device_token(&device.scope, "member-7", &derived);
    let done = device.register(&token).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );

    // The hubs change through the first server: the replica's next registration sees them.
    t.link_hub("hub-b.example.com").await;
    let unlinked = t
        .owner(Method::DELETE, "/linkedHubs/hub-a.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(unlinked.status(), 204);
    let done = device.register(&token).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-b.example.com"
    );

    // Disabled through the first server: the replica answers `disabled` right away.
    let mut disabled = group.clone();
    disabled["provisioningStatus"] = json!("disabled");
    enroll(&t, disabled).await;
    let done = device.register(&token).await;
    assert_eq!(done["status"], "disabled", "{done}");

    // Deleted: the replica refuses the key right away.
    let gone = t
        .owner(Method::DELETE, "/enrollmentGroups/fleet")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    expect_error(device.put(&token).send().await.unwrap(), 401, 401002).await;
}

/// Keys rolled through one server (a group's and an individual enrollment's, both replaced)
/// are refused by a replica at its next request, with the device's state left as it was; the
/// new keys work there at once.
async fn a_replica_refuses_rolled_keys_at_once(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let replica = t.replica().await;
    // Each enrollment (its keys are set in it), the device that uses it on the replica, and
    // how that device's key follows from the enrollment's.
    let member = Device::new(&replica, "member-1");
    let solo = Device::new(&replica, "solo");
    let cases = [
        (
            json!({ "enrollmentGroupId": "fleet" }),
            &member,
            (|key: &SymmetricKey| key.derive_device_key("member-1")) as fn(&SymmetricKey) -> _,
        ),
        (
            json!({ "registrationId": "solo" }),
            &solo,
            SymmetricKey::clone,
        ),
    ];
    let enroll_with_new_keys = |body: &Value| {
        let mut body = body.clone();
        body["attestation"] = json!({ "type": "symmetricKey", "symmetricKey": {
            "primaryKey": SymmetricKey::generate().unwrap().to_base64(),
            "secondaryKey": SymmetricKey::generate().unwrap().to_base64() } });
        let t = &t;
        async move { keys_of(&enroll(t, body).await) }
    };
    let token = |device: &Device, key: SymmetricKey| device_token(&device.scope, &device.id, &key);

    let mut old_keys = Vec::new();
    for (body, device, signing) in &cases {
        let (primary, secondary) = enroll_with_new_keys(body).await;
        assert_eq!(
            device.register(&token(device, signing(&primary))).await["status"],
            "assigned"
        );
        old_keys.push([primary, secondary]);
    }
    let before = (
        registration_state(&t, "member-1").await,
        registration_state(&t, "solo").await,
    );

    // Both keys of each replaced through the first server.
    let mut new_keys = Vec::new();
    for (body, _, _) in &cases {
        new_keys.push(enroll_with_new_keys(body).await);
    }
    for ((_, device, signing), old) in cases.iter().zip(&old_keys) {
        for key in old {
            expect_error(
                device
                    .put(&token(device, signing(key)))
                    .send()
                    .await
                    .unwrap(),
                401,
                401002,
            )
            .await;
        }
    }
    let after = (
        registration_state(&t, "member-1").await,
        registration_state(&t, "solo").await,
    );
    assert_eq!(after, before);
    for ((_, device, signing), (_, new_secondary)) in cases.iter().zip(&new_keys) {
        assert_eq!(
            device
                .register(&token(device, signing(new_secondary)))
                .await["status"],
            "assigned"
        );
    }
}

/// Finished operations stay pollable for a while, then the sweeper deletes them; an operation
/// still assigning is left for a poll to finish.
async fn finished_operations_are_swept_once_they_expire(backend: Backend) {
    use dps_server::store::{Columns, Kind, Precondition, Write};
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-1", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (primary, _) = keys_of(&enrollment);
    let device = Device::new(&t, "dev-1");
    let token = device_token(&device.scope, "dev-1", &primary);
    let done = device.register(&token).await;
    let operation = done["operationId"].as_str().unwrap().to_owned();
    let store = t.running().store();
    let assigning = json!({ "operationId": "5.0000000000000000.pending", "registrationId": "dev-1",
        "status": "assigning", "enrollment": { "kind": "individual", "id": "dev-1" } });
    store
        .write(&[Write::Put {
            ns: "default".into(),
            kind: Kind::Operation,
            key: "5.0000000000000000.pending".into(),
            columns: Columns::Operation {
                registration: "dev-1".into(),
                expires_at: None,
            },
            doc: assigning.to_string(),
            precondition: Precondition::MustNotExist,
            etag: None,
        }])
        .await
        .unwrap();
    let poll = || {
        t.anonymous(
            Method::GET,
            &format!(
                "/{}/registrations/dev-1/operations/{operation}",
                device.scope
            ),
        )
        .header("Authorization", &token)
        .send()
    };
    let now = i64::try_from(now()).unwrap();
    assert_eq!(store.sweep(now).await.unwrap(), 0);
    expect_json(poll().await.unwrap(), 200).await;

    // Five minutes on, the finished operation is gone and its poll is a 404 (asked of a
    // replica: this process would still answer it from memory for a minute).
    assert_eq!(store.sweep(now + 301).await.unwrap(), 1);
    let replica = t.replica().await;
    let polled = replica
        .anonymous(
            Method::GET,
            &format!(
                "/{}/registrations/dev-1/operations/{operation}",
                device.scope
            ),
        )
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    expect_error(polled, 404, 404206).await;
    let pending = store
        .get("default", Kind::Operation, "5.0000000000000000.pending")
        .await
        .unwrap();
    assert!(
        pending.is_some(),
        "an operation still assigning is never swept"
    );
}

/// Seven fractional digits, as Azure writes timestamps (`2026-12-01T11:25:54.1234567Z`).
fn assert_azure_timestamp(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    let fraction = text
        .strip_suffix('Z')
        .and_then(|t| t.rsplit_once('.'))
        .map(|(_, f)| f)
        .unwrap_or_else(|| panic!("no fraction in {text}"));
    assert_eq!(fraction.len(), 7, "{text}");
    assert!(fraction.bytes().all(|b| b.is_ascii_digit()), "{text}");
}

/// Wire fidelity (items 2, 3 and 8): `static` without a hub takes the instance's one linked
/// hub; device tokens may live longer than 30 days unless a bound is set; device answers carry
/// the registration state's etag and Azure's timestamps.
async fn azure_device_wire_details(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "static-1", "allocationPolicy": "static",
                "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let key = keys_of(&enrollment).0;
    let device = Device::new(&t, "static-1");
    // A token for a year, as some fleets flash at the factory.
    let long_lived = sign(
        &format!("{}/registrations/static-1", device.scope),
        &key,
        now() + 365 * 24 * 3600,
        Some("registration"),
    );
    let done = device.register(&long_lived).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let state = &done["registrationState"];
    assert_eq!(state["assignedHub"], "hub-a.example.com");
    assert_azure_timestamp(&state["createdDateTimeUtc"]);
    assert_azure_timestamp(&state["lastUpdatedDateTimeUtc"]);
    let etag = state["etag"].as_str().unwrap().to_owned();
    let stored = registration_state(&t, "static-1").await.unwrap();
    assert_eq!(stored["etag"], etag.as_str(), "{stored}");
    // The status lookup shows the same state.
    let lookup = expect_json(
        t.anonymous(
            Method::POST,
            &format!("/{}/registrations/static-1", device.scope),
        )
        .header("Authorization", &long_lived)
        .json(&json!({ "registrationId": "static-1" }))
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(lookup["etag"], etag.as_str(), "{lookup}");

    // With two linked hubs taking part in allocation, `static` without a hub cannot choose:
    // the registration fails with 400208 and says why.
    t.link_hub("hub-b.example.com").await;
    let done = device.register(&long_lived).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["registrationState"]["errorCode"], 400208);
    let message = done["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(message.contains("static"), "{message}");

    // An operator who wants a bound on device tokens sets one.
    let bounded = TestServer::start_with(backend, |c| {
        c.limits.max_device_token_lifetime_secs = 30 * 24 * 3600;
    })
    .await;
    bounded.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &bounded,
        json!({ "registrationId": "dev-1", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let device = Device::new(&bounded, "dev-1");
    let long_lived = sign(
        &format!("{}/registrations/dev-1", device.scope),
        &keys_of(&enrollment).0,
        now() + 365 * 24 * 3600,
        Some("registration"),
    );
    let refused = device.put(&long_lived).send().await.unwrap();
    expect_error(refused, 401, 401002).await;
    assert!(registration_state(&bounded, "dev-1").await.is_none());
    // A token within the bound still registers.
    let day = sign(
        &format!("{}/registrations/dev-1", device.scope),
        &keys_of(&enrollment).0,
        now() + 24 * 3600,
        Some("registration"),
    );
    assert_eq!(device.register(&day).await["status"], "assigned");
}

on_both_backends!(
    azure_device_wire_details,
    a_poll_from_memory_still_needs_the_device_s_proof,
    finished_operations_are_swept_once_they_expire,
    a_replica_sees_group_and_hub_changes_at_once,
    a_replica_refuses_rolled_keys_at_once,
    a_group_key_cannot_claim_an_individually_enrolled_id,
    unauthenticated_requests_do_not_use_up_a_device_quota,
    polls_check_the_token_expiry,
    individual_enrollment_registers_and_rolls_keys,
    group_members_register_with_derived_keys,
    every_client_token_variant_is_accepted,
    failures_are_refused_and_change_nothing,
    no_hub_fails_with_an_error_code,
    reprovisioning_follows_the_policy,
    concurrent_registrations_end_in_one_state,
    operations_survive_a_restart,
    a_poll_finishes_an_operation_a_stopped_server_left_assigning,
    throttling_answers_429_with_retry_after,
);
