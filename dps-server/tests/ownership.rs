//! The `ownership` policy end to end: owners and their hubs, records imported from CSV and
//! JSON lines, transfers that move a device on its next registration, the fall-back for
//! devices nobody owns, and imports that are checked whole.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    Backend, Device, TestServer, device_token, enroll, expect_error, expect_json, keys_of,
};
use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const HUBS: [&str; 3] = [
    "hub-a.example.com",
    "hub-b.example.com",
    "hub-c.example.com",
];

/// Three hubs whose identities go to one webhook (`/hub-a`, ...), and two owners.
async fn hubs_and_owners(t: &TestServer) -> MockServer {
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&hooks)
        .await;
    for hub in HUBS {
        let short = hub.split('.').next().unwrap();
        expect_json(
            t.owner(Method::PUT, &format!("/linkedHubs/{hub}"))
                .json(&json!({ "hostName": hub,
                    "connector": { "type": "webhook", "url": format!("{}/{short}", hooks.uri()) } }))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
    }
    put_owner(t, "Acme", &["HUB-A.example.com"]).await;
    put_owner(t, "globex", &["hub-b.example.com", "hub-c.example.com"]).await;
    hooks
}

async fn put_owner(t: &TestServer, name: &str, hubs: &[&str]) -> Value {
    expect_json(
        t.owner(Method::PUT, &format!("/owners/{name}"))
            .header("If-Match", "*")
            .json(&json!({ "name": name, "hubs": hubs }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await
}

async fn import(t: &TestServer, content_type: &str, body: impl Into<Vec<u8>>) -> reqwest::Response {
    t.owner(Method::POST, "/ownershipRecords:import")
        .header("Content-Type", content_type)
        .body(body.into())
        .send()
        .await
        .unwrap()
}

/// Enrolls `id` under the ownership policy, registers it and returns the final status.
async fn enroll_and_register(t: &TestServer, id: &str) -> Value {
    let enrollment = enroll(
        t,
        json!({ "registrationId": id, "attestation": { "type": "symmetricKey" },
            "allocationPolicy": "ownership" }),
    )
    .await;
    register(t, id, &enrollment).await
}

async fn register(t: &TestServer, id: &str, enrollment: &Value) -> Value {
    let device = Device::new(t, id);
    let token = device_token(&device.scope, id, &keys_of(enrollment).0);
    device.register(&token).await
}

async fn calls_to(hooks: &MockServer, to: &str) -> Vec<Value> {
    hooks
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == to)
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

async fn owned_by_registration_id(t: &TestServer, id: &str) -> reqwest::Response {
    t.owner(
        Method::GET,
        &format!("/ownershipRecords/registrationId/{id}"),
    )
    .send()
    .await
    .unwrap()
}

async fn devices_go_to_their_owners_hubs_and_move_when_transferred(backend: Backend) {
    let t = TestServer::start(backend).await;
    let hooks = hubs_and_owners(&t).await;
    // A sales ledger: extra columns are ignored, and a later sale of the same device wins.
    let ledger = "date,registrationId,owner,price\n\
        2026-01-01,dev-1,globex,10\n\
        2026-01-02,DEV-1,acme,10\n\
        2026-01-03,dev-2,Globex,12\n";
    let answer = expect_json(import(&t, "text/csv", ledger).await, 200).await;
    assert_eq!(answer, json!({ "rows": 3, "records": 2 }));

    let first = enroll_and_register(&t, "dev-1").await;
    assert_eq!(first["status"], "assigned", "{first}");
    assert_eq!(
        first["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );
    let second = enroll_and_register(&t, "dev-2").await;
    let globex_hub = second["registrationState"]["assignedHub"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(globex_hub == HUBS[1] || globex_hub == HUBS[2], "{second}");

    let owners = expect_json(t.owner(Method::GET, "/owners").send().await.unwrap(), 200).await;
    let counts: Vec<(&str, i64)> = owners
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap(),
                o["deviceCount"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts, [("Acme", 1), ("globex", 1)]);
    assert_eq!(
        expect_json(owned_by_registration_id(&t, "Dev-1").await, 200).await["owner"],
        "Acme"
    );

    // A transfer from the wrong owner changes nothing.
    let wrong = t
        .owner(Method::POST, "/ownershipRecords:transfer")
        .json(&json!({ "from": "globex", "to": "acme", "devices": [{ "registrationId": "dev-2" }, { "registrationId": "dev-1" }] }))
        .send()
        .await
        .unwrap();
    let error = expect_error(wrong, 409, 409002).await;
    assert!(
        error["message"].as_str().unwrap().contains("dev-1"),
        "{error}"
    );
    assert_eq!(
        expect_json(owned_by_registration_id(&t, "dev-2").await, 200).await["owner"],
        "globex"
    );

    // dev-1 is sold on: its next registration moves it to the new owner's hubs, and it is
    // removed from the old owner's hub.
    let moved = expect_json(
        t.owner(Method::POST, "/ownershipRecords:transfer")
            .json(&json!({ "from": "acme", "to": "globex", "devices": [{ "registrationId": "dev-1" }] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(moved["transferred"], 1);
    let enrollment = expect_json(
        t.owner(Method::POST, "/enrollments/dev-1/attestationmechanism")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let again = register(&t, "dev-1", &json!({ "attestation": enrollment })).await;
    let new_hub = again["registrationState"]["assignedHub"].as_str().unwrap();
    assert!(new_hub == HUBS[1] || new_hub == HUBS[2], "{again}");
    assert_eq!(
        again["registrationState"]["substatus"],
        "deviceDataMigrated"
    );
    let old = calls_to(&hooks, "/hub-a").await;
    assert_eq!(old.last().unwrap()["operation"], "delete", "{old:?}");
    assert_eq!(old.last().unwrap()["deviceId"], "dev-1");

    // Nobody owns dev-3 and no fall-back is configured: it fails with a clear code.
    let orphan = enroll_and_register(&t, "dev-3").await;
    assert_eq!(orphan["status"], "failed", "{orphan}");
    assert_eq!(orphan["registrationState"]["errorCode"], 400208);

    // An owner with devices cannot be deleted; the records list under the owner.
    expect_error(
        t.owner(Method::DELETE, "/owners/globex")
            .send()
            .await
            .unwrap(),
        409,
        409002,
    )
    .await;
    let listed = expect_json(
        t.owner(Method::GET, "/owners/globex/devices")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["registrationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dev-1", "dev-2"]);
    let acme = expect_json(
        t.owner(Method::GET, "/owners/acme").send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(acme["deviceCount"], 0);
    let deleted = t
        .owner(Method::DELETE, "/owners/acme")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
}

async fn imports_are_checked_whole_before_anything_is_stored(backend: Backend) {
    let t = TestServer::start(backend).await;
    hubs_and_owners(&t).await;
    let lines = [
        json!({ "registrationId": "dev-ok", "owner": "acme" }).to_string(),
        String::new(),
        json!({ "registrationId": "dev-x", "owner": "nobody" }).to_string(),
        "{not json".to_owned(),
        json!({ "owner": "acme" }).to_string(),
        json!({ "certificateSerial": "zz", "owner": "acme" }).to_string(),
    ];
    let error = expect_error(
        import(&t, "application/x-ndjson", lines.join("\n")).await,
        400,
        400004,
    )
    .await;
    let message = error["message"].as_str().unwrap();
    for expected in [
        "4 of 5 rows",
        "line 3: owner 'nobody' does not exist",
        "line 4: not an ownership record",
        "line 5: names no device",
        "line 6: certificateSerial",
    ] {
        assert!(message.contains(expected), "{expected}: {message}");
    }
    expect_error(owned_by_registration_id(&t, "dev-ok").await, 404, 404208).await;

    for (content_type, body, status, code) in [
        ("application/json", &b"{}"[..], 400, 400009),
        (
            "text/csv",
            b"registrationId,customer\ndev-1,acme\n",
            400,
            400004,
        ),
        ("text/csv", b"registrationId,owner\n", 400, 400005),
        (
            "text/csv",
            b"owner,registrationId\nacme,dev-\xff\n",
            400,
            400004,
        ),
    ] {
        expect_error(import(&t, content_type, body).await, status, code).await;
    }

    // Serials and EK hashes are normalised, so any spelling finds the record.
    let ek = "AB".repeat(32);
    let csv = format!("certificateSerial,ekHash,owner\n00:1a:2B,{ek},acme\n");
    let answer = expect_json(import(&t, "text/csv; charset=utf-8", csv).await, 200).await;
    assert_eq!(answer["records"], 2);
    let by_serial = expect_json(
        t.owner(Method::GET, "/ownershipRecords/certificateSerial/1A2b")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(by_serial["certificateSerial"], "1A2B");
    assert_eq!(by_serial["owner"], "Acme");
    let simulated = expect_json(
        t.owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": "anything", "certificateSerial": "1a2b", "policies": ["ownership"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(simulated["results"][0]["hub"], "hub-a.example.com");
    let reason = simulated["results"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("'Acme'"), "{reason}");
    expect_error(
        t.owner(Method::GET, "/ownershipRecords/serial/1A2B")
            .send()
            .await
            .unwrap(),
        400,
        400007,
    )
    .await;
    let gone = t
        .owner(Method::DELETE, &format!("/ownershipRecords/ekHash/{ek}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    expect_error(
        t.owner(
            Method::GET,
            &format!("/ownershipRecords/ekHash/{}", ek.to_lowercase()),
        )
        .send()
        .await
        .unwrap(),
        404,
        404208,
    )
    .await;
    // An owner needs hubs.
    expect_error(
        t.owner(Method::PUT, "/owners/empty")
            .json(&json!({ "name": "empty", "hubs": [] }))
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_nobody_owns_follow_the_configured_fallback() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.allocation.ownership_fallback = Some("hashed".into());
    })
    .await;
    hubs_and_owners(&t).await;
    let done = enroll_and_register(&t, "dev-free").await;
    assert_eq!(done["status"], "assigned", "{done}");
    let simulated = expect_json(
        t.owner(Method::POST, "/allocations:simulate")
            .json(&json!({ "registrationId": "dev-free", "policies": ["ownership", "hashed"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let results = simulated["results"].as_array().unwrap();
    assert_eq!(results[0]["hub"], done["registrationState"]["assignedHub"]);
    assert_eq!(results[0]["hub"], results[1]["hub"]);
    assert!(
        results[0]["reason"]
            .as_str()
            .unwrap()
            .contains("fall-back policy hashed"),
        "{simulated}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_that_is_itself_ownership_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = dps_server::config::Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    config.allocation.ownership_fallback = Some("Ownership".into());
    let error = dps_server::server::start(config).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("ownership_fallback cannot be ownership"),
        "{error:#}"
    );
}

/// 100,000 records in one import (the rate is measured by `cargo bench --bench
/// ownership_import`; this checks that it works).
async fn a_hundred_thousand_records_import_in_one_request(backend: Backend) {
    let t = TestServer::start(backend).await;
    hubs_and_owners(&t).await;
    let mut csv = String::from("registrationId,owner\n");
    for i in 0..100_000 {
        let owner = if i % 4 == 0 { "acme" } else { "globex" };
        csv.push_str(&format!("device-{i:06},{owner}\n"));
    }
    let answer = expect_json(import(&t, "text/csv", csv).await, 200).await;
    assert_eq!(answer, json!({ "rows": 100_000, "records": 100_000 }));
    let owners = expect_json(t.owner(Method::GET, "/owners").send().await.unwrap(), 200).await;
    assert_eq!(owners[0]["deviceCount"], 25_000);
    assert_eq!(owners[1]["deviceCount"], 75_000);
    let last = expect_json(owned_by_registration_id(&t, "device-099999").await, 200).await;
    assert_eq!(last["owner"], "globex");
    // A later import replaces existing records.
    let sale = "registrationId,owner\ndevice-000001,acme\n";
    expect_json(import(&t, "text/csv", sale).await, 200).await;
    let owners = expect_json(t.owner(Method::GET, "/owners").send().await.unwrap(), 200).await;
    assert_eq!(owners[0]["deviceCount"], 25_001);
    assert_eq!(owners[1]["deviceCount"], 74_999);
}

on_both_backends!(
    devices_go_to_their_owners_hubs_and_move_when_transferred,
    imports_are_checked_whole_before_anything_is_stored,
    a_hundred_thousand_records_import_in_one_request,
);

/// Security review item 19: an import is parsed as it arrives and refused as soon as it
/// passes the limit (a modest default), without storing anything; a body without a length
/// is held to the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_past_the_limit_are_refused_while_streaming() {
    assert!(
        dps_server::config::Limits::default().max_import_bytes <= 64 * 1024 * 1024,
        "the default import limit is modest"
    );
    let t =
        TestServer::start_with(Backend::Sqlite, |c| c.limits.max_import_bytes = 64 * 1024).await;
    hubs_and_owners(&t).await;
    let rows: String = (0..20_000)
        .map(|i| format!("{{\"registrationId\":\"dev-{i}\",\"owner\":\"acme\"}}\n"))
        .collect();
    assert!(rows.len() > 64 * 1024);
    let (status, answer) = import_chunked(&t, rows.as_bytes()).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("413001"), "{answer}");
    expect_error(
        import(&t, "application/x-ndjson", rows.clone()).await,
        413,
        413001,
    )
    .await;
    expect_error(owned_by_registration_id(&t, "dev-0").await, 404, 404208).await;
    // Under the limit, the same rows import.
    let few: String = rows.lines().take(500).map(|l| format!("{l}\n")).collect();
    let answer = expect_json(import(&t, "application/x-ndjson", few).await, 200).await;
    assert_eq!(answer["records"], 500);
}

/// Posts `body` as an import with `Transfer-Encoding: chunked` (no length known up front) over
/// a raw TLS connection; the status and the whole answer.
async fn import_chunked(t: &TestServer, body: &[u8]) -> (u16, String) {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&t.running().ca_certificate).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(t.running().local_addr)
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let token = common::token(
        &t.owner.host_name,
        &t.owner.key_name,
        &t.owner.key.to_base64(),
        3600,
    );
    let head = format!(
        "POST /ownershipRecords:import?api-version=2021-10-01 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {token}\r\nContent-Type: application/x-ndjson\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(4096) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        // The server may answer and close before the whole body is sent.
        if tls.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = tls.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}
