//! Registration events (`GET /events`): every outcome of a registration is an event, written
//! with the outcome, filtered by kind, device, enrollment and time, paged, and readable only
//! with a read right.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    Backend, Device, TestServer, device_token, enroll, expect_error, expect_json, keys_of,
    policy_with,
};
use reqwest::Method;
use serde_json::{Value, json};

/// The events at `query` (a path with its query string), every page of `size`.
async fn events(t: &TestServer, query: &str, size: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let mut request = t
            .owner(Method::GET, query)
            .header("x-ms-max-item-count", size.to_string());
        if let Some(token) = &continuation {
            request = request.header("x-ms-continuation", token);
        }
        let response = request.send().await.unwrap();
        continuation = response
            .headers()
            .get("x-ms-continuation")
            .map(|v| v.to_str().unwrap().to_owned());
        let page = expect_json(response, 200).await;
        let items = page.as_array().unwrap();
        assert!(items.len() <= size);
        all.extend(items.iter().cloned());
        if continuation.is_none() {
            return all;
        }
    }
}

/// Assigned, moved, disabled and failed: each registration's outcome is one event, with what
/// an operator asks about it; the filters and paging find them.
async fn each_outcome_is_an_event(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    t.link_hub("hub-b.example.com").await;
    let mut body = json!({ "registrationId": "dev-e", "attestation": { "type": "symmetricKey" },
        "iotHubs": ["hub-a.example.com"] });
    let enrollment = enroll(&t, body.clone()).await;
    let (primary, _) = keys_of(&enrollment);
    let device = Device::new(&t, "dev-e");
    let token = device_token(&device.scope, "dev-e", &primary);
    let first = device.register(&token).await;
    assert_eq!(first["status"], "assigned");

    let seen = events(&t, "/events?registrationId=dev-e", 10).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let assigned = &seen[0];
    assert_eq!(assigned["kind"], "registration.assigned");
    assert_eq!(assigned["registrationId"], "dev-e");
    assert_eq!(assigned["operationId"], first["operationId"]);
    assert_eq!(assigned["enrollmentId"], "dev-e");
    assert_eq!(assigned["attestationType"], "symmetricKey");
    assert_eq!(assigned["transport"], "https");
    assert_eq!(assigned["assignedHub"], "hub-a.example.com");
    assert_eq!(assigned["substatus"], "initialAssignment");
    assert!(assigned.get("errorCode").is_none(), "{assigned}");

    // Moved to another hub.
    body["iotHubs"] = json!(["hub-b.example.com"]);
    body["attestation"] = enrollment["attestation"].clone();
    enroll(&t, body.clone()).await;
    assert_eq!(
        device.register(&token).await["registrationState"]["assignedHub"],
        "hub-b.example.com"
    );
    // Disabled.
    body["provisioningStatus"] = json!("disabled");
    enroll(&t, body.clone()).await;
    assert_eq!(device.register(&token).await["status"], "disabled");
    // Failed: a csr without a credential policy.
    body["provisioningStatus"] = json!("enabled");
    enroll(&t, body).await;
    let failed = device
        .register_with(
            &token,
            json!({ "registrationId": "dev-e", "csr": "MIIB" }),
            &[],
        )
        .await;
    assert_eq!(failed["status"], "failed");

    let all = events(&t, "/events?registrationId=dev-e", 1).await;
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "registration.assigned",
            "registration.moved",
            "registration.disabled",
            "registration.failed"
        ],
        "in time order, page by page"
    );
    let moved = &all[1];
    assert_eq!(moved["previousHub"], "hub-a.example.com");
    assert_eq!(moved["assignedHub"], "hub-b.example.com");
    assert_eq!(all[2]["errorCode"], 403002);
    assert_eq!(all[3]["errorCode"], 400210);
    assert!(
        all[3]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("credentialPolicyName")
    );

    // A group member's event names its group; filters combine.
    let group = enroll(
        &t,
        json!({ "enrollmentGroupId": "fleet", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (group_key, _) = keys_of(&group);
    let member = Device::new(&t, "member-1");
    let member_token = device_token(
        &member.scope,
        "member-1",
        &group_key.derive_device_key("member-1"),
    );
    assert_eq!(member.register(&member_token).await["status"], "assigned");
    let of_group = events(&t, "/events?enrollmentGroupId=fleet", 10).await;
    assert_eq!(of_group.len(), 1, "{of_group:?}");
    assert_eq!(of_group[0]["registrationId"], "member-1");
    assert_eq!(of_group[0]["enrollmentGroupId"], "fleet");
    assert_eq!(events(&t, "/events", 2).await.len(), 5);
    assert_eq!(
        events(&t, "/events?kind=registration.moved", 10)
            .await
            .len(),
        1
    );
    assert_eq!(
        events(
            &t,
            "/events?kind=registration.assigned&enrollmentId=dev-e",
            10
        )
        .await
        .len(),
        1
    );
    assert_eq!(
        events(&t, "/events?from=2200-01-01T00:00:00Z", 10)
            .await
            .len(),
        0
    );
    assert_eq!(
        events(&t, "/events?to=2000-01-01T00:00:00Z", 10)
            .await
            .len(),
        0
    );
    assert_eq!(
        events(
            &t,
            "/events?from=2000-01-01T00:00:00Z&to=2200-01-01T00:00:00Z",
            10
        )
        .await
        .len(),
        5
    );

    // Bad filters are a 400 that says which.
    for (query, code, says) in [
        ("/events?kind=registration.exploded", 400004, "kind"),
        ("/events?from=yesterday", 400004, "from"),
        ("/events?from=2300-01-01T00:00:00Z", 400004, "2286"),
        ("/events?registrationId=a%20b", 400004, "registrationId"),
        (
            "/events?enrollmentId=a&enrollmentGroupId=b",
            400004,
            "not both",
        ),
        ("/events?colour=red", 400006, "colour"),
    ] {
        let response = t.owner(Method::GET, query).send().await.unwrap();
        let refused = expect_error(response, 400, code).await;
        assert!(
            refused["message"].as_str().unwrap().contains(says),
            "{query}: {refused}"
        );
    }
    // Reading them takes RegistrationStatusRead.
    let key = policy_with(
        &t,
        "enrollments-only",
        &["EnrollmentRead", "EnrollmentWrite"],
    )
    .await;
    let response = t
        .signed(Method::GET, "/events", "enrollments-only", &key)
        .send()
        .await
        .unwrap();
    expect_error(response, 403, 403001).await;
}

/// Reads a Server-Sent Events stream until its text holds `wanted` (10 s at most); returns the
/// text read.
async fn read_until(response: &mut reqwest::Response, wanted: &str) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !text.contains(wanted) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?} in the stream; it said: {text}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended; it said: {text}"));
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

/// Registers `id` through a new individual enrollment.
async fn registered(t: &TestServer, id: &str) -> Value {
    let enrollment = enroll(
        t,
        json!({ "registrationId": id, "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (primary, _) = keys_of(&enrollment);
    let device = Device::new(t, id);
    let token = device_token(&device.scope, id, &primary);
    device.register(&token).await
}

/// The live stream sends each new event that matches its filters once it has settled (a few
/// seconds); it outlives the idle timeout; a client that reconnects with the last id it saw
/// gets what came after, not again what it saw; the streams open at once are capped, and a
/// closed one frees its place; a stream past its `to` ends.
async fn events_stream_live(backend: Backend) {
    // Connections idle for 2 s are closed: a stream waiting longer for its event is not idle.
    let t = TestServer::start_with(backend, |config| {
        config.limits.max_event_streams = 1;
        config.limits.idle_timeout_secs = 2;
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    // A stream whose `to` has passed sends what there was and ends; a Last-Event-ID that is
    // not an event id is refused.
    let ended = t
        .owner(Method::GET, "/events/stream?to=2000-01-01T00:00:00Z")
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), 200);
    let body = tokio::time::timeout(std::time::Duration::from_secs(10), ended.text())
        .await
        .expect("a stream past its end did not end")
        .unwrap();
    assert!(!body.contains("data:"), "{body}");
    let refused = t
        .owner(Method::GET, "/events/stream")
        .header("Last-Event-ID", "'; DROP TABLE events; --")
        .send()
        .await
        .unwrap();
    expect_error(refused, 400, 400009).await;
    let mut live = t
        .owner(Method::GET, "/events/stream?kind=registration.assigned")
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    assert!(
        live.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // The cap: a second stream is refused while the first is open.
    let refused = t.owner(Method::GET, "/events/stream").send().await.unwrap();
    expect_error(refused, 503, 503001).await;

    // Longer than the idle timeout before anything happens.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let done = registered(&t, "live-1").await;
    let text = read_until(&mut live, "live-1").await;
    assert!(text.contains("event: registration.assigned"), "{text}");
    assert!(
        text.contains(done["operationId"].as_str().unwrap()),
        "{text}"
    );
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_owned();
    drop(live);

    // Reconnecting after that event: the next one, and not that one again. (The closed
    // stream's place is free again once the server sees it closed.)
    registered(&t, "live-2").await;
    let mut again = None;
    for _ in 0..50 {
        let response = t
            .owner(Method::GET, "/events/stream")
            .header("Last-Event-ID", &id)
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            again = Some(response);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut again = again.expect("the closed stream's place was never freed");
    let text = read_until(&mut again, "live-2").await;
    assert!(!text.contains("live-1"), "{text}");
}

/// A stream whose policy is deleted while it is open ends (its credentials are checked again
/// every 10 s), and nothing more reaches it.
async fn a_stream_ends_when_its_credentials_do(backend: Backend) {
    let t = TestServer::start(backend).await;
    let key = policy_with(&t, "watcher", &["RegistrationStatusRead"]).await;
    let stream = t
        .signed(Method::GET, "/events/stream", "watcher", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let deleted = t
        .owner(Method::DELETE, "/accessPolicies/watcher")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let body = tokio::time::timeout(std::time::Duration::from_secs(20), stream.text())
        .await
        .expect("the stream of a deleted policy went on")
        .unwrap();
    assert!(!body.contains("data:"), "{body}");
}

/// The webhook gets each event this server commits as a CloudEvent, signed; a webhook that
/// fails is tried again; a full queue drops the oldest and counts it.
async fn events_reach_the_webhook_as_cloud_events(backend: Backend) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    const KEY: &str = "c2lnbmluZy1rZXktZm9yLWV2ZW50LXdlYmhvb2tzIQ==";
    let hook = MockServer::start().await;
    // Fails once, then takes every event.
    Mock::given(method("POST"))
        .and(path("/events"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&hook)
        .await;
    Mock::given(method("POST"))
        .and(path("/events"))
        .respond_with(ResponseTemplate::new(204))
        .with_priority(2)
        .mount(&hook)
        .await;
    let url = format!("{}/events", hook.uri());
    let t = TestServer::start_with(backend, move |config| {
        config.events.webhook_url = Some(url);
        config.allocation.webhook_signing_key = Some(KEY.into());
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    let done = registered(&t, "hooked-1").await;
    let mut received = Vec::new();
    for _ in 0..100 {
        received = hook.received_requests().await.unwrap_or_default();
        if received.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(received.len(), 2, "one failed attempt, then the delivery");
    let delivered = &received[1];
    assert_eq!(received[0].body, delivered.body, "the same event again");
    assert_eq!(
        delivered.headers["content-type"],
        "application/cloudevents+json"
    );
    let body: Value = serde_json::from_slice(&delivered.body).unwrap();
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["type"], "dps.registration.assigned");
    assert_eq!(body["subject"], "hooked-1");
    assert_eq!(body["source"], "/instances/default");
    assert_eq!(body["data"]["operationId"], done["operationId"]);
    assert_eq!(body["id"], body["data"]["id"]);
    let timestamp: u64 = delivered.headers["x-dps-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let key = attestation::SymmetricKey::from_base64(KEY).unwrap();
    let signer = dps_outbound::WebhookSigner::new(key.as_bytes().to_vec());
    assert_eq!(
        delivered.headers["x-dps-signature"].to_str().unwrap(),
        signer.signature(timestamp, &delivered.body)
    );
    let metrics = t.metrics().await;
    assert!(
        metrics.contains(r#"dps_event_webhook_total{outcome="delivered"} 1"#),
        "{metrics}"
    );
}

/// A webhook that refuses an event for what it is (400) is not sent it again; the event is
/// counted as failed.
async fn a_refused_event_is_not_sent_again(backend: Backend) {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let hook = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&hook)
        .await;
    let url = hook.uri();
    let t =
        TestServer::start_with(backend, move |config| config.events.webhook_url = Some(url)).await;
    t.link_hub("hub-a.example.com").await;
    registered(&t, "refused-1").await;
    let mut failed = false;
    for _ in 0..100 {
        failed = t
            .metrics()
            .await
            .contains(r#"dps_event_webhook_total{outcome="failed"} 1"#);
        if failed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(failed, "the refusal was not counted");
    // Longer than the first pause between attempts: no second one came.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(hook.received_requests().await.unwrap_or_default().len(), 1);
}

/// A webhook slower than the events: the queue keeps the newest, drops the oldest, and says
/// how many.
async fn a_slow_webhook_drops_the_oldest_events(backend: Backend) {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let hook = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204).set_delay(std::time::Duration::from_secs(5)))
        .mount(&hook)
        .await;
    let url = hook.uri();
    let t = TestServer::start_with(backend, move |config| {
        config.events.webhook_url = Some(url);
        config.events.webhook_queue = 1;
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    // Four deliveries at a time, each held 5 s, and room for one more: of eight, some drop.
    let ids: Vec<String> = (1..=8).map(|n| format!("slow-{n}")).collect();
    for id in &ids {
        registered(&t, id).await;
    }
    let metrics = t.metrics().await;
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"dps_event_webhook_total{outcome="dropped"} "#))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped >= 1, "{metrics}");
    // The events themselves are all stored.
    assert_eq!(events(&t, "/events", 10).await.len(), 8);
}

/// With `events.retention_days = 0`, no events are written.
async fn events_can_be_turned_off(backend: Backend) {
    let t = TestServer::start_with(backend, |config| config.events.retention_days = 0).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "quiet", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let (primary, _) = keys_of(&enrollment);
    let device = Device::new(&t, "quiet");
    let token = device_token(&device.scope, "quiet", &primary);
    assert_eq!(device.register(&token).await["status"], "assigned");
    assert_eq!(events(&t, "/events", 10).await, Vec::<Value>::new());
}

/// A shutdown waits (up to the grace period) for the events still on their way to the
/// webhook: one that failed its first attempt is tried again before the server stops.
async fn a_shutdown_delivers_the_events_still_queued(backend: Backend) {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let hook = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&hook)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&hook)
        .await;
    let url = hook.uri();
    let mut t =
        TestServer::start_with(backend, move |config| config.events.webhook_url = Some(url)).await;
    t.link_hub("hub-a.example.com").await;
    registered(&t, "last-words").await;
    // The first attempt has been answered 503; the next comes after a pause.
    for _ in 0..100 {
        if !hook
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    t.server.take().unwrap().shutdown().await;
    assert_eq!(
        hook.received_requests().await.unwrap_or_default().len(),
        2,
        "the retry was made before the shutdown returned"
    );
}

on_both_backends!(
    a_shutdown_delivers_the_events_still_queued,
    each_outcome_is_an_event,
    events_stream_live,
    a_stream_ends_when_its_credentials_do,
    events_reach_the_webhook_as_cloud_events,
    a_refused_event_is_not_sent_again,
    a_slow_webhook_drops_the_oldest_events,
    events_can_be_turned_off
);
