//! The admin API end to end over HTTPS, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, TestServer, enroll, expect_error, expect_json, policy_with, token};
use dps_server::store::{Columns, Kind, Precondition, Write};
use reqwest::Method;
use serde_json::{Value, json};

fn symmetric_enrollment(id: &str) -> Value {
    json!({ "registrationId": id, "attestation": { "type": "symmetricKey" } })
}

fn ca_certificate_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

async fn enrollment_lifecycle(backend: Backend) {
    let t = TestServer::start(backend).await;
    let created = expect_json(
        t.owner(Method::PUT, "/enrollments/Dev-01")
            .json(&symmetric_enrollment("Dev-01"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let primary = created["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("generated keys are shown on create")
        .to_owned();
    assert_eq!(created["provisioningStatus"], "enabled");
    assert_eq!(created["reprovisionPolicy"]["updateHubAssignment"], true);
    let etag = created["etag"].as_str().unwrap().to_owned();

    // Reads hide keys; ids are case-insensitive.
    let read = expect_json(
        t.owner(Method::GET, "/enrollments/dev-01")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(read["registrationId"], "Dev-01");
    assert_eq!(read["etag"], etag.as_str());
    assert!(
        read["attestation"]["symmetricKey"]
            .get("primaryKey")
            .is_none(),
        "{read}"
    );

    // PUT over an existing id without If-Match is a conflict; a stale etag fails.
    expect_error(
        t.owner(Method::PUT, "/enrollments/Dev-01")
            .json(&symmetric_enrollment("Dev-01"))
            .send()
            .await
            .unwrap(),
        409,
        409001,
    )
    .await;
    expect_error(
        t.owner(Method::PUT, "/enrollments/Dev-01")
            .header("If-Match", "\"stale\"")
            .json(&symmetric_enrollment("Dev-01"))
            .send()
            .await
            .unwrap(),
        412,
        412001,
    )
    .await;

    // Updating with the etag (as the Node client does with the object it read) keeps the keys,
    // without echoing them: the request did not send them.
    let mut update = read.clone();
    update["provisioningStatus"] = json!("disabled");
    let updated = expect_json(
        t.owner(Method::PUT, "/enrollments/Dev-01")
            .header("If-Match", etag.as_str())
            .json(&update)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert!(updated["attestation"]["symmetricKey"]["primaryKey"].is_null());
    assert_ne!(updated["etag"], etag.as_str());
    let kept = expect_json(
        t.owner(Method::POST, "/enrollments/Dev-01/attestationmechanism")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(kept["symmetricKey"]["primaryKey"], primary.as_str());

    // `*` overwrites unconditionally.
    let forced = expect_json(
        t.owner(Method::PUT, "/enrollments/Dev-01")
            .header("If-Match", "*")
            .json(&json!({
                "registrationId": "Dev-01",
                "deviceId": "device-one",
                "attestation": { "type": "symmetricKey", "symmetricKey": { "primaryKey": primary } },
                "initialTwin": { "tags": { "site": "a" }, "properties": { "desired": { "rate": 5 } } }
            }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(forced["deviceId"], "device-one");
    assert_eq!(forced["provisioningStatus"], "enabled");

    let mechanism = expect_json(
        t.owner(Method::POST, "/enrollments/Dev-01/attestationMechanism")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(mechanism["symmetricKey"]["primaryKey"], primary.as_str());
    assert!(mechanism["symmetricKey"]["secondaryKey"].is_string());

    expect_error(
        t.owner(Method::DELETE, "/enrollments/Dev-01")
            .header("If-Match", "\"stale\"")
            .send()
            .await
            .unwrap(),
        412,
        412001,
    )
    .await;
    let current = forced["etag"].as_str().unwrap();
    let deleted = t
        .owner(Method::DELETE, "/enrollments/Dev-01")
        .header("If-Match", current)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    expect_error(
        t.owner(Method::GET, "/enrollments/Dev-01")
            .send()
            .await
            .unwrap(),
        404,
        404201,
    )
    .await;
    expect_error(
        t.owner(Method::DELETE, "/enrollments/Dev-01")
            .send()
            .await
            .unwrap(),
        404,
        404201,
    )
    .await;
}

async fn group_lifecycle_and_registrations(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let group = expect_json(
        t.owner(Method::PUT, "/enrollmentgroups/Line-7")
            .json(&json!({
                "enrollmentGroupId": "Line-7",
                "attestation": { "type": "symmetricKey" },
                "iotHubs": ["HUB-A.example.com"],
                "allocationPolicy": "Static"
            }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(group["allocationPolicy"], "static");
    assert_eq!(group["iotHubs"], json!(["hub-a.example.com"]));
    assert!(group["attestation"]["symmetricKey"]["secondaryKey"].is_string());

    let x509 = expect_json(
        t.owner(Method::PUT, "/enrollmentGroups/x509-group")
            .json(&json!({
                "enrollmentGroupId": "x509-group",
                "attestation": { "type": "x509", "x509": { "signingCertificates": {
                    "primary": { "certificate": ca_certificate_pem() } } } }
            }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let read = expect_json(
        t.owner(Method::GET, "/enrollmentGroups/x509-group")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let primary = &read["attestation"]["x509"]["signingCertificates"]["primary"];
    assert!(
        primary.get("certificate").is_none(),
        "certificate bodies are not returned"
    );
    assert_eq!(primary["info"]["subjectName"], "CN=Test Root");
    assert_eq!(
        primary["info"]["sha256Thumbprint"].as_str().unwrap().len(),
        64
    );
    assert_eq!(x509["etag"], read["etag"]);

    // Registration states are written by device registration; arrange two directly.
    let store = t.running().store();
    for id in ["dev-a", "dev-b"] {
        let doc = json!({ "registrationId": id, "status": "assigned", "assignedHub": "hub-a.example.com",
                          "deviceId": id, "enrollmentGroupId": "Line-7" });
        store
            .write(&[Write::Put {
                ns: "default".into(),
                kind: Kind::RegistrationState,
                key: id.into(),
                columns: Columns::Registration {
                    group: Some("line-7".into()),
                    hub: None,
                },
                doc: doc.to_string(),
                precondition: Precondition::MustNotExist,
                etag: None,
            }])
            .await
            .unwrap();
    }
    let listed = expect_json(
        t.owner(Method::POST, "/registrations/line-7/query")
            .json(&json!({"query": "*"}))
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
    assert_eq!(ids, ["dev-a", "dev-b"]);
    let one = expect_json(
        t.owner(Method::GET, "/registrations/DEV-A")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(one["assignedHub"], "hub-a.example.com");
    assert!(one["etag"].is_string());
    let deleted = t
        .owner(Method::DELETE, "/registrations/dev-a")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    expect_error(
        t.owner(Method::GET, "/registrations/dev-a")
            .send()
            .await
            .unwrap(),
        404,
        404203,
    )
    .await;

    let deleted = t
        .owner(Method::DELETE, "/enrollmentGroups/line-7")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    expect_error(
        t.owner(Method::GET, "/enrollmentGroups/line-7")
            .send()
            .await
            .unwrap(),
        404,
        404202,
    )
    .await;
}

async fn queries_page_with_continuation(backend: Backend) {
    let t = TestServer::start(backend).await;
    let items: Vec<Value> = (0..5)
        .map(|i| symmetric_enrollment(&format!("dev-{i}")))
        .collect();
    let result = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(result["isSuccessful"], true, "{result}");

    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut request = t
            .owner(Method::POST, "/enrollments/query")
            .header("x-ms-max-item-count", "2")
            .json(&json!({ "query": "SELECT * FROM enrollments" }));
        if let Some(token) = &continuation {
            request = request.header("x-ms-continuation", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["x-ms-item-type"], "Enrollment");
        continuation = response
            .headers()
            .get("x-ms-continuation")
            .map(|v| v.to_str().unwrap().to_owned());
        let page = expect_json(response, 200).await;
        let page = page.as_array().unwrap();
        assert!(page.len() <= 2);
        for item in page {
            assert!(
                item["attestation"]["symmetricKey"]
                    .get("primaryKey")
                    .is_none()
            );
            seen.push(item["registrationId"].as_str().unwrap().to_owned());
        }
        pages += 1;
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4"]);

    expect_error(
        t.owner(Method::POST, "/enrollments/query")
            .header("x-ms-max-item-count", "0")
            .json(&json!({"query": "*"}))
            .send()
            .await
            .unwrap(),
        400,
        400009,
    )
    .await;
    expect_error(
        t.owner(Method::POST, "/enrollments/query")
            .header("x-ms-continuation", "!!")
            .json(&json!({"query": "*"}))
            .send()
            .await
            .unwrap(),
        400,
        400009,
    )
    .await;
}

async fn bulk_operations(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.max_bulk_items = 3).await;
    let items = json!([symmetric_enrollment("b-1"), symmetric_enrollment("b-2")]);
    let ok = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(ok, json!({ "isSuccessful": true, "errors": [] }));

    let again = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(again["isSuccessful"], false);
    assert_eq!(again["errors"][0]["registrationId"], "b-1");
    assert_eq!(again["errors"][0]["errorCode"], 409001);
    assert_eq!(again["errors"].as_array().unwrap().len(), 2);

    // One batch: an existing id, a new one, and the new one again; then one of an invalid item
    // and a good one. Only the bad items fail, each on its own; the existing enrollment is
    // left as it was.
    let before = expect_json(
        t.owner(Method::GET, "/enrollments/b-2")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let mixed = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": [
                symmetric_enrollment("b-2"), symmetric_enrollment("b-3"), symmetric_enrollment("B-3") ] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let failed: Vec<&str> = mixed["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["registrationId"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["b-2", "B-3"], "{mixed}");
    let after = expect_json(
        t.owner(Method::GET, "/enrollments/b-2")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(after, before);
    expect_json(
        t.owner(Method::GET, "/enrollments/b-3")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let invalid = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": [
                { "registrationId": "b-4", "attestation": { "type": "none" } }, symmetric_enrollment("b-5") ] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(invalid["errors"].as_array().unwrap().len(), 1, "{invalid}");
    assert_eq!(invalid["errors"][0]["registrationId"], "b-4");
    assert_eq!(invalid["errors"][0]["errorCode"], 400004);
    expect_json(
        t.owner(Method::GET, "/enrollments/b-5")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_error(
        t.owner(Method::GET, "/enrollments/b-4")
            .send()
            .await
            .unwrap(),
        404,
        404201,
    )
    .await;

    // The Node client spells the mode updateIfMatchEtag; an item without etag fails alone.
    let read = expect_json(
        t.owner(Method::GET, "/enrollments/b-1")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let mut with_etag = read.clone();
    with_etag["provisioningStatus"] = json!("disabled");
    let mixed = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "updateIfMatchEtag", "enrollments": [with_etag, symmetric_enrollment("b-2")] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(mixed["errors"].as_array().unwrap().len(), 1, "{mixed}");
    assert_eq!(mixed["errors"][0]["registrationId"], "b-2");
    let read = expect_json(
        t.owner(Method::GET, "/enrollments/b-1")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(read["provisioningStatus"], "disabled");

    let deleted = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "delete", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(deleted["isSuccessful"], true, "{deleted}");

    let groups = expect_json(
        t.owner(Method::POST, "/enrollmentGroups")
            .json(&json!({ "mode": "CREATE", "enrollmentGroups": [
                { "enrollmentGroupId": "g-1", "attestation": { "type": "symmetricKey" } },
                { "enrollmentGroupId": "g 2", "attestation": { "type": "symmetricKey" } } ] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(groups["errors"][0]["enrollmentGroupId"], "g 2");
    assert_eq!(groups["errors"][0]["errorCode"], 400007);

    let four: Vec<Value> = (0..4)
        .map(|i| symmetric_enrollment(&format!("c-{i}")))
        .collect();
    expect_error(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": four }))
            .send()
            .await
            .unwrap(),
        400,
        400010,
    )
    .await;
    expect_error(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "upsert", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        400,
        400010,
    )
    .await;
}

async fn credentials_are_checked(backend: Backend) {
    let t = TestServer::start(backend).await;
    let path = "/enrollments/dev-1";
    let host = t.owner.host_name.clone();
    let key = t.owner.key.to_base64();

    let missing = expect_error(
        t.anonymous(Method::GET, path).send().await.unwrap(),
        401,
        401002,
    )
    .await;
    assert!(
        missing["message"]
            .as_str()
            .unwrap()
            .contains("Authorization")
    );
    let wrong_key = attestation::SymmetricKey::generate().unwrap().to_base64();
    expect_error(
        t.signed(Method::GET, path, "provisioningserviceowner", &wrong_key)
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    let expired = expect_error(
        t.anonymous(Method::GET, path)
            .header(
                "Authorization",
                token(&host, "provisioningserviceowner", &key, -3600),
            )
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    assert!(
        expired["message"].as_str().unwrap().contains("expired"),
        "{expired}"
    );
    expect_error(
        t.anonymous(Method::GET, path)
            .header(
                "Authorization",
                token("other.example.com", "provisioningserviceowner", &key, 3600),
            )
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    expect_error(
        t.anonymous(Method::GET, path)
            .header(
                "Authorization",
                token(&host, "provisioningserviceowner", &key, 400 * 24 * 3600),
            )
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    expect_error(
        t.signed(Method::GET, path, "nobody", &key)
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    expect_error(
        t.anonymous(Method::GET, path)
            .header("Authorization", "SharedAccessSignature garbage")
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;

    // A read-only policy reads but cannot write, reveal keys or configure.
    let policy = expect_json(
        t.owner(Method::PUT, "/accessPolicies/reader")
            .json(&json!({ "keyName": "reader", "rights": ["EnrollmentRead", "RegistrationStatusRead"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let reader_key = policy["primaryKey"].as_str().unwrap().to_owned();
    let secondary = policy["secondaryKey"].as_str().unwrap().to_owned();
    t.owner(Method::PUT, path)
        .json(&symmetric_enrollment("dev-1"))
        .send()
        .await
        .unwrap();
    expect_json(
        t.signed(Method::GET, path, "reader", &reader_key)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_json(
        t.signed(Method::GET, path, "reader", &secondary)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_error(
        t.signed(Method::PUT, "/enrollments/dev-2", "reader", &reader_key)
            .json(&symmetric_enrollment("dev-2"))
            .send()
            .await
            .unwrap(),
        403,
        403001,
    )
    .await;
    expect_error(
        t.signed(
            Method::POST,
            "/enrollments/dev-1/attestationmechanism",
            "reader",
            &reader_key,
        )
        .send()
        .await
        .unwrap(),
        403,
        403001,
    )
    .await;
    expect_error(
        t.signed(Method::GET, "/linkedHubs", "reader", &reader_key)
            .send()
            .await
            .unwrap(),
        403,
        403001,
    )
    .await;
    expect_error(
        t.signed(Method::GET, "/instances", "reader", &reader_key)
            .send()
            .await
            .unwrap(),
        403,
        403001,
    )
    .await;
    expect_error(
        t.signed(
            Method::DELETE,
            "/registrations/dev-1",
            "reader",
            &reader_key,
        )
        .send()
        .await
        .unwrap(),
        403,
        403001,
    )
    .await;
}

async fn bad_input_gets_clear_400s(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.max_body_bytes = 64 * 1024).await;
    let put = |id: &str, body: &str| {
        t.owner(Method::PUT, &format!("/enrollments/{id}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    expect_error(
        put("d", "{\"registrationId\": ").send().await.unwrap(),
        400,
        400006,
    )
    .await;
    expect_error(
        put("d", "{\"registrationId\": 5, \"attestation\": {}}")
            .send()
            .await
            .unwrap(),
        400,
        400006,
    )
    .await;
    expect_error(
        put("d", "{\"registrationId\": \"d\"}")
            .send()
            .await
            .unwrap(),
        400,
        400006,
    )
    .await;
    expect_error(put("d", "").send().await.unwrap(), 400, 400005).await;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    expect_error(put("d", &deep).send().await.unwrap(), 400, 400006).await;
    let huge = json!({ "registrationId": "d", "attestation": { "type": "symmetricKey" }, "pad": "x".repeat(100 * 1024) });
    expect_error(
        put("d", &huge.to_string()).send().await.unwrap(),
        413,
        413001,
    )
    .await;
    expect_error(
        put("bad%20id", &symmetric_enrollment("bad id").to_string())
            .send()
            .await
            .unwrap(),
        400,
        400007,
    )
    .await;
    expect_error(
        put("d", &symmetric_enrollment("e").to_string())
            .send()
            .await
            .unwrap(),
        400,
        400008,
    )
    .await;

    let cases = [
        (
            json!({ "type": "symmetricKey", "symmetricKey": { "primaryKey": "not base64!" } }),
            "primaryKey",
        ),
        (
            json!({ "type": "symmetricKey", "symmetricKey": { "primaryKey": "AAAA" } }),
            "primaryKey",
        ),
        (
            json!({ "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----" } } } }),
            "certificate",
        ),
        (
            json!({ "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": "bm90IGEgY2VydA==" } } } }),
            "certificate",
        ),
        (json!({ "type": "none" }), "attestation.type"),
        (json!({ "type": "x509", "symmetricKey": {} }), "attestation"),
    ];
    for (attestation, field) in cases {
        let body = json!({ "registrationId": "d", "attestation": attestation });
        let error = expect_error(
            put("d", &body.to_string()).send().await.unwrap(),
            400,
            400004,
        )
        .await;
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{field}: {error}"
        );
    }
    t.link_hub("hub-a.example.com").await;
    t.link_hub("hub-b.example.com").await;
    let settings = [
        (
            json!({ "allocationPolicy": "roundRobin" }),
            "allocationPolicy",
        ),
        (
            json!({ "iotHubs": ["not-linked.example.com"] }),
            "not a linked hub",
        ),
        (json!({ "iotHubs": ["bad host!"] }), "iotHubs"),
        (
            json!({ "allocationPolicy": "static", "iotHubs": ["hub-a.example.com", "hub-b.example.com"] }),
            "at most one hub",
        ),
        (
            json!({ "allocationPolicy": "custom" }),
            "customAllocationDefinition",
        ),
        (
            json!({ "allocationPolicy": "custom", "customAllocationDefinition": { "webhookUrl": "http://x.example.com", "apiVersion": "2021-10-01" } }),
            "https",
        ),
        (json!({ "initialTwin": "twin" }), "initialTwin"),
        (json!({ "deviceId": "a/b" }), "deviceId"),
    ];
    for (extra, needle) in settings {
        let mut body = symmetric_enrollment("d");
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let error = expect_error(
            put("d", &body.to_string()).send().await.unwrap(),
            400,
            400004,
        )
        .await;
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{needle}: {error}"
        );
    }
    let group = |attestation: Value| {
        t.owner(Method::PUT, "/enrollmentGroups/g")
            .json(&json!({ "enrollmentGroupId": "g", "attestation": attestation }))
    };
    expect_error(
        group(json!({ "type": "tpm", "tpm": { "endorsementKey": "AAIBAg==" } }))
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
    expect_error(
        group(json!({ "type": "x509", "x509": { "caReferences": { "primary": "my-ca" } } }))
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
    let leaf = {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["leaf".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    };
    expect_error(group(json!({ "type": "x509", "x509": { "signingCertificates": { "primary": { "certificate": leaf } } } })).send().await.unwrap(), 400, 400004).await;

    expect_error(
        t.owner(Method::GET, "/nowhere").send().await.unwrap(),
        404,
        404001,
    )
    .await;
    expect_error(
        t.owner(Method::PATCH, "/enrollments/d")
            .send()
            .await
            .unwrap(),
        405,
        405001,
    )
    .await;

    // Nothing was stored by any of the refused requests.
    let all = expect_json(
        t.owner(Method::POST, "/enrollments/query")
            .json(&json!({"query": "*"}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(all, json!([]));
}

async fn linked_hubs_and_access_policies(backend: Backend) {
    let t = TestServer::start(backend).await;
    let connection = "HostName=hub-b.example.com;SharedAccessKeyName=registryReadWrite;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==";
    let hub = expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-b.example.com")
            .json(&json!({ "hostName": "hub-b.example.com", "allocationWeight": 3, "region": "eu-west",
                           "latitude": 52.37, "longitude": 4.9,
                           "connector": { "type": "azure-iot-hub", "connectionString": connection } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(hub["applyAllocationPolicy"], true);
    let read = expect_json(
        t.owner(Method::GET, "/linkedHubs/HUB-B.example.com")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        read["connector"],
        json!({ "type": "azure-iot-hub" }),
        "secrets hidden"
    );
    assert_eq!(read["allocationWeight"], 3);
    // Updating without the secret keeps it (checked through a second update that must validate it).
    let mut update = read.clone();
    update["allocationWeight"] = json!(5);
    expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-b.example.com")
            .header("If-Match", read["etag"].as_str().unwrap())
            .json(&update)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    for bad in [
        json!({ "hostName": "hub-c.example.com", "allocationWeight": 0 }),
        json!({ "hostName": "hub-c.example.com", "allocationWeight": 1001 }),
        json!({ "hostName": "hub-c.example.com", "latitude": 91, "longitude": 0 }),
        json!({ "hostName": "hub-c.example.com", "latitude": 10 }),
        json!({ "hostName": "hub-c.example.com", "connector": { "type": "azure-iot-hub" } }),
        json!({ "hostName": "hub-c.example.com", "connector": { "type": "webhook", "url": "ftp://x" } }),
    ] {
        expect_error(
            t.owner(Method::PUT, "/linkedHubs/hub-c.example.com")
                .json(&bad)
                .send()
                .await
                .unwrap(),
            400,
            400004,
        )
        .await;
    }
    expect_error(
        t.owner(Method::PUT, "/linkedHubs/hub-c.example.com").json(&json!({ "hostName": "hub-c.example.com", "connector": { "type": "carrier-pigeon" } })).send().await.unwrap(),
        400,
        400006,
    )
    .await;
    t.link_hub("hub-a.example.com").await;
    let hubs = expect_json(
        t.owner(Method::GET, "/linkedHubs").send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(hubs.as_array().unwrap().len(), 2);
    assert_eq!(
        t.owner(Method::DELETE, "/linkedHubs/hub-a.example.com")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );

    let policies = expect_json(
        t.owner(Method::GET, "/accessPolicies")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(policies[0]["keyName"], "provisioningserviceowner");
    assert!(policies[0].get("primaryKey").is_none());
    let keys = expect_json(
        t.owner(
            Method::POST,
            "/accessPolicies/provisioningserviceowner/listKeys",
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(keys["primaryKey"], t.owner.key.to_base64());
    expect_error(
        t.owner(Method::PUT, "/accessPolicies/x")
            .json(&json!({ "keyName": "x", "rights": ["Everything"] }))
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
    let writer = expect_json(
        t.owner(Method::PUT, "/accessPolicies/writer")
            .json(&json!({ "keyName": "writer", "rights": ["enrollmentwrite", "EnrollmentRead"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        writer["rights"],
        json!(["EnrollmentRead", "EnrollmentWrite"])
    );
    let read = expect_json(
        t.owner(Method::GET, "/accessPolicies/Writer")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(read["keyName"], "writer");
    assert!(read.get("primaryKey").is_none());
    let gone = t
        .owner(Method::DELETE, "/accessPolicies/writer")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    expect_error(
        t.owner(Method::GET, "/accessPolicies/writer")
            .send()
            .await
            .unwrap(),
        404,
        404205,
    )
    .await;
    // The last policy holding ServiceConfig cannot go.
    expect_error(
        t.owner(Method::DELETE, "/accessPolicies/provisioningserviceowner")
            .send()
            .await
            .unwrap(),
        409,
        409002,
    )
    .await;
}

async fn instances_are_separate_tenants(backend: Backend) {
    let t = TestServer::start(backend).await;
    let created = expect_json(
        t.owner(Method::PUT, "/instances/factory")
            .json(&json!({ "name": "factory", "hostNames": ["factory.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let scope = created["idScope"].as_str().unwrap();
    assert!(scope.starts_with("0ne") && scope.len() == 11, "{scope}");
    let factory_key = created["ownerPolicy"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    expect_error(
        t.owner(Method::PUT, "/instances/other")
            .json(&json!({ "name": "other", "hostNames": ["FACTORY.example.com"] }))
            .send()
            .await
            .unwrap(),
        409,
        409001,
    )
    .await;
    expect_error(
        t.owner(Method::PUT, "/instances/other")
            .json(&json!({ "name": "other", "idScope": scope }))
            .send()
            .await
            .unwrap(),
        409,
        409001,
    )
    .await;

    // The factory instance's own keys work on its explicit path; the default owner's do not.
    let path = "/instances/factory/enrollments/dev-9";
    let as_factory = |m: Method, p: &str| {
        t.anonymous(m, p).header(
            "Authorization",
            token(
                "factory.example.com",
                "provisioningserviceowner",
                &factory_key,
                3600,
            ),
        )
    };
    expect_json(
        as_factory(Method::PUT, path)
            .json(&symmetric_enrollment("dev-9"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_error(
        t.owner(Method::GET, path).send().await.unwrap(),
        401,
        401002,
    )
    .await;
    expect_error(
        t.owner(Method::GET, "/enrollments/dev-9")
            .send()
            .await
            .unwrap(),
        404,
        404201,
    )
    .await;
    expect_json(as_factory(Method::GET, path).send().await.unwrap(), 200).await;

    let one = expect_json(
        t.owner(Method::GET, "/instances/Factory")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(one["idScope"], scope);
    assert_eq!(one["hostNames"], json!(["factory.example.com"]));
    assert!(
        one.get("ownerPolicy").is_none(),
        "keys are shown only on create"
    );
    let listed = expect_json(
        t.owner(Method::GET, "/instances").send().await.unwrap(),
        200,
    )
    .await;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "factory"]);
    expect_error(
        t.owner(Method::GET, "/instances/nope/enrollments/x")
            .send()
            .await
            .unwrap(),
        404,
        404002,
    )
    .await;
    // With two instances the Host header selects one. The names resolve to the test server;
    // its development certificate predates the instance, so this client skips name checks.
    let port = t.running().local_addr.port();
    let by_name = reqwest::Client::builder()
        .http1_only()
        .danger_accept_invalid_certs(true)
        .resolve("factory.example.com", t.running().local_addr)
        .resolve("nowhere.example.com", t.running().local_addr)
        .build()
        .unwrap();
    let by_host = by_name
        .get(format!(
            "https://factory.example.com:{port}/enrollments/dev-9?api-version=2021-10-01"
        ))
        .header(
            "Authorization",
            token(
                "factory.example.com",
                "provisioningserviceowner",
                &factory_key,
                3600,
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(expect_json(by_host, 200).await["registrationId"], "dev-9");
    let unknown_host = by_name
        .get(format!(
            "https://nowhere.example.com:{port}/enrollments/dev-9?api-version=2021-10-01"
        ))
        .header(
            "Authorization",
            token(
                "nowhere.example.com",
                "provisioningserviceowner",
                &factory_key,
                3600,
            ),
        )
        .send()
        .await
        .unwrap();
    expect_error(unknown_host, 404, 404002).await;

    expect_error(
        t.owner(Method::DELETE, "/instances/default")
            .send()
            .await
            .unwrap(),
        409,
        409002,
    )
    .await;
    assert_eq!(
        t.owner(Method::DELETE, "/instances/factory")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    expect_error(
        as_factory(Method::GET, path).send().await.unwrap(),
        404,
        404002,
    )
    .await;
    // Its host name is free again.
    expect_json(
        t.owner(Method::PUT, "/instances/other")
            .json(&json!({ "name": "other", "hostNames": ["factory.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
}

async fn restart_keeps_all_data(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = expect_json(
        t.owner(Method::PUT, "/enrollments/keep-me")
            .json(&symmetric_enrollment("keep-me"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let scope = t.running().admin.id_scope.clone();
    let key = t.owner.key.to_base64();

    let t = t.restart().await;
    assert_eq!(t.running().admin.id_scope, scope, "the ID scope survives");
    assert_eq!(t.owner.key.to_base64(), key, "the owner key survives");
    let read = expect_json(
        t.owner(Method::GET, "/enrollments/keep-me")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(read["etag"], enrollment["etag"]);
    let keys = expect_json(
        t.owner(Method::POST, "/enrollments/keep-me/attestationmechanism")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        keys["symmetricKey"],
        enrollment["attestation"]["symmetricKey"]
    );
    expect_json(
        t.owner(Method::GET, "/linkedHubs/hub-a.example.com")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
}

async fn concurrent_writers_cannot_both_win(backend: Backend) {
    let t = TestServer::start(backend).await;
    let store = t.running().store();
    let put = |precondition: Precondition, n: usize| Write::Put {
        ns: "default".into(),
        kind: Kind::IndividualEnrollment,
        key: "race".into(),
        columns: Columns::Attestation {
            attestation_type: "symmetricKey".into(),
        },
        doc: json!({ "writer": n }).to_string(),
        precondition,
        etag: None,
    };
    let creates = (0..16).map(|n| {
        let store = store.clone();
        let write = put(Precondition::MustNotExist, n);
        tokio::spawn(async move { store.write(&[write]).await.is_ok() })
    });
    let won: usize = futures_count(creates).await;
    assert_eq!(won, 1, "exactly one create wins");

    let etag = store
        .get("default", Kind::IndividualEnrollment, "race")
        .await
        .unwrap()
        .unwrap()
        .etag;
    let updates = (0..16).map(|n| {
        let store = store.clone();
        let write = put(Precondition::IfMatch(etag.clone()), n);
        tokio::spawn(async move { store.write(&[write]).await.is_ok() })
    });
    assert_eq!(
        futures_count(updates).await,
        1,
        "exactly one update with the same etag wins"
    );
}

async fn futures_count(tasks: impl Iterator<Item = tokio::task::JoinHandle<bool>>) -> usize {
    let mut won = 0;
    for task in tasks.collect::<Vec<_>>() {
        if task.await.unwrap() {
            won += 1;
        }
    }
    won
}

async fn health_metrics_and_openapi(backend: Backend) {
    let t = TestServer::start(backend).await;
    let health = expect_json(
        t.anonymous(Method::GET, "/healthz").send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(health["status"], "ok");
    let ready = expect_json(
        t.anonymous(Method::GET, "/readyz").send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(
        ready["storage"],
        if backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    t.owner(Method::GET, "/enrollments/none")
        .send()
        .await
        .unwrap();
    let metrics = t.metrics().await;
    assert!(
        metrics.contains(
            "dps_http_requests_total{method=\"GET\",route=\"/enrollments/{id}\",status=\"404\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("dps_http_request_duration_seconds_bucket"));
    let openapi = t
        .anonymous(Method::GET, "/openapi.yaml")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(openapi.starts_with("openapi: 3"));

    // Every documented path and method is served: none answers "no such route" or 405.
    let mut path = String::new();
    let mut operations = 0;
    for line in openapi.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = format!("/{p}")
                .replace("{id}", "doc-probe")
                .replace("{kind}", "registrationId");
            continue;
        }
        let method = match line.trim_end() {
            "    get:" => Method::GET,
            "    put:" => Method::PUT,
            "    post:" => Method::POST,
            "    delete:" => Method::DELETE,
            _ => continue,
        };
        let response = t
            .owner(method.clone(), &path)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let code = response
            .headers()
            .get("x-ms-error-code")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            status != 405 && code.as_deref() != Some("404001"),
            "{method} {path}: {status} {code:?}"
        );
        operations += 1;
    }
    assert_eq!(operations, 66, "operations documented and probed");
}

async fn allocation_simulation_explains_each_policy(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-b.example.com")
            .json(&json!({ "hostName": "hub-b.example.com", "allocationWeight": 3 }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let mut pinned = symmetric_enrollment("dev-s");
    pinned["allocationPolicy"] = json!("static");
    pinned["iotHubs"] = json!(["hub-a.example.com"]);
    expect_json(
        t.owner(Method::PUT, "/enrollments/dev-s")
            .json(&pinned)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;

    let simulate = |body: Value| t.owner(Method::POST, "/allocations:Simulate").json(&body);
    let answer = expect_json(
        simulate(json!({ "registrationId": "dev-s" }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(answer["effectivePolicy"], "static");
    assert_eq!(answer["candidates"], json!(["hub-a.example.com"]));
    let by_policy = |answer: &Value, name: &str| {
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["policy"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_policy(&answer, "static")["hub"], "hub-a.example.com");
    assert!(
        by_policy(&answer, "custom")["error"]
            .as_str()
            .unwrap()
            .contains("no customAllocationDefinition")
    );
    assert!(
        by_policy(&answer, "geoLatency")["reason"]
            .as_str()
            .unwrap()
            .contains("ties")
    );

    // A device without an enrollment: every linked hub is a candidate; answers are stable.
    let free = json!({ "registrationId": "someone", "policies": ["hashed", "nope"] });
    let first = expect_json(simulate(free.clone()).send().await.unwrap(), 200).await;
    assert_eq!(first["effectivePolicy"], "hashed");
    assert_eq!(
        first["candidates"],
        json!(["hub-a.example.com", "hub-b.example.com"])
    );
    assert_eq!(first["results"][0]["ranked"].as_array().unwrap().len(), 2);
    assert!(
        first["results"][1]["error"]
            .as_str()
            .unwrap()
            .contains("unknown allocation policy")
    );
    let again = expect_json(simulate(free).send().await.unwrap(), 200).await;
    assert_eq!(first, again);

    for bad in [
        json!({ "registrationId": "bad id" }),
        json!({ "registrationId": "x", "previousHub": "not a host!" }),
        json!({ "registrationId": "x", "policies": vec!["hashed"; 17] }),
    ] {
        expect_error(simulate(bad).send().await.unwrap(), 400, 400004).await;
    }
    expect_error(
        simulate(json!({ "registrationId": "x", "enrollmentGroupId": "missing" }))
            .send()
            .await
            .unwrap(),
        404,
        404202,
    )
    .await;
    // A policy an enrollment names must be registered.
    let mut unknown = symmetric_enrollment("dev-u");
    unknown["allocationPolicy"] = json!("roundRobin");
    let error = expect_error(
        t.owner(Method::PUT, "/enrollments/dev-u")
            .json(&unknown)
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("hashed"),
        "{error}"
    );
}

/// Security review item 3: a PUT that omits a stored secret does not get it back, and the
/// stored connection string is never sent to a new destination without being given again.
async fn stored_secrets_are_not_echoed_or_redirected(backend: Backend) {
    let t = TestServer::start(backend).await;
    let connection = "HostName=hub-b.example.com;SharedAccessKeyName=registryReadWrite;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==";
    let path = "/linkedHubs/hub-b.example.com";
    let created = expect_json(
        t.owner(Method::PUT, path)
            .json(&json!({ "hostName": "hub-b.example.com",
                "connector": { "type": "azure-iot-hub", "connectionString": connection } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        created["connector"]["connectionString"], connection,
        "sent, so shown"
    );
    let updated = expect_json(
        t.owner(Method::PUT, path)
            .header("If-Match", "*")
            .json(
                &json!({ "hostName": "hub-b.example.com", "allocationWeight": 4,
                "connector": { "type": "azure-iot-hub" } }),
            )
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let text = updated.to_string();
    assert!(!text.contains("SharedAccessKey"), "echoed: {text}");
    assert_eq!(updated["allocationWeight"], 4);

    // A new endpoint, or a change of type and back, needs the connection string again.
    for (connector, changed) in [
        (
            json!({ "type": "azure-iot-hub", "endpoint": "https://attacker.example.com" }),
            "endpoint",
        ),
        (
            json!({ "type": "webhook", "url": "https://attacker.example.com/hook" }),
            "type",
        ),
    ] {
        let response = t
            .owner(Method::PUT, path)
            .header("If-Match", "*")
            .json(&json!({ "hostName": "hub-b.example.com", "connector": connector }))
            .send()
            .await
            .unwrap();
        if changed == "endpoint" {
            let error = expect_error(response, 400, 400004).await;
            assert!(
                error["message"]
                    .as_str()
                    .unwrap()
                    .contains("connectionString"),
                "{error}"
            );
        } else {
            expect_json(response, 200).await;
            let back = t
                .owner(Method::PUT, path)
                .header("If-Match", "*")
                .json(&json!({ "hostName": "hub-b.example.com",
                    "connector": { "type": "azure-iot-hub", "endpoint": "https://attacker.example.com" } }))
                .send()
                .await
                .unwrap();
            expect_error(back, 400, 400004).await;
        }
    }

    // Enrollment and policy keys kept from the stored version are not echoed either.
    let enrollment = expect_json(
        t.owner(Method::PUT, "/enrollments/dev-keys")
            .json(&symmetric_enrollment("dev-keys"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let primary = enrollment["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let again = expect_json(
        t.owner(Method::PUT, "/enrollments/dev-keys")
            .header("If-Match", "*")
            .json(
                &json!({ "registrationId": "dev-keys", "provisioningStatus": "disabled",
                "attestation": { "type": "symmetricKey" } }),
            )
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert!(!again.to_string().contains(&primary), "{again}");
    let policy_key = policy_with(&t, "reader", &["EnrollmentRead"]).await;
    let policy = expect_json(
        t.owner(Method::PUT, "/accessPolicies/reader")
            .header("If-Match", "*")
            .json(&json!({ "keyName": "reader", "rights": ["EnrollmentRead", "RegistrationStatusRead"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert!(!policy.to_string().contains(&policy_key), "{policy}");
}

/// Security review item 10: a service token binds to this service: its `sr` must be one of
/// the instance's host names (or the server's own), whatever Host the request names.
async fn service_tokens_bind_to_the_instance_host_names(backend: Backend) {
    let t = TestServer::start(backend).await;
    let key = t.owner.key.to_base64();
    for audience in ["evil.example.com", "hub.azure-devices.net"] {
        let response = t
            .anonymous(Method::GET, "/enrollments/dev-1")
            .header("Host", audience)
            .header(
                "Authorization",
                token(audience, "provisioningserviceowner", &key, 3600),
            )
            .send()
            .await
            .unwrap();
        expect_error(response, 401, 401002).await;
    }
    let ok = t
        .anonymous(Method::GET, "/enrollments/dev-1")
        .header(
            "Authorization",
            token(&t.owner.host_name, "provisioningserviceowner", &key, 3600),
        )
        .send()
        .await
        .unwrap();
    expect_error(ok, 404, 404201).await;
}

/// Security review item 11: instance names are case-insensitive identities; deleting an
/// instance deletes its data, so a new instance of the same name starts empty.
async fn instance_names_are_identities_and_deletion_is_final(backend: Backend) {
    let t = TestServer::start(backend).await;
    let created = expect_json(
        t.owner(Method::PUT, "/instances/tenant")
            .json(&json!({ "name": "tenant", "hostNames": ["tenant.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let tenant_key = created["ownerPolicy"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let as_tenant = |m: Method, p: &str| {
        t.anonymous(m, p).header(
            "Authorization",
            token(
                "tenant.example.com",
                "provisioningserviceowner",
                &tenant_key,
                3600,
            ),
        )
    };
    expect_json(
        as_tenant(Method::PUT, "/instances/tenant/enrollments/dev-t")
            .json(&symmetric_enrollment("dev-t"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    // Renamed by letter case: the same instance, its data and its owner's keys.
    let renamed = expect_json(
        t.owner(Method::PUT, "/instances/TENANT")
            .header("If-Match", "*")
            .json(&json!({ "name": "TENANT", "hostNames": ["tenant.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        renamed["name"], "tenant",
        "the name keeps its first spelling"
    );
    for path in [
        "/instances/tenant/enrollments/dev-t",
        "/instances/Tenant/enrollments/dev-t",
    ] {
        expect_json(as_tenant(Method::GET, path).send().await.unwrap(), 200).await;
    }

    // Deleted and created again: nothing of the old tenant remains.
    assert_eq!(
        t.owner(Method::DELETE, "/instances/TENANT")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let again = expect_json(
        t.owner(Method::PUT, "/instances/tenant")
            .json(&json!({ "name": "tenant", "hostNames": ["tenant.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_error(
        as_tenant(Method::GET, "/instances/tenant/enrollments/dev-t")
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    let new_key = again["ownerPolicy"]["primaryKey"].as_str().unwrap();
    let as_new = t
        .anonymous(Method::GET, "/instances/tenant/enrollments/dev-t")
        .header(
            "Authorization",
            token(
                "tenant.example.com",
                "provisioningserviceowner",
                new_key,
                3600,
            ),
        );
    expect_error(as_new.send().await.unwrap(), 404, 404201).await;
}

/// Security review item 12: every route checks the caller's rights before it reads anything,
/// so a policy without the right learns nothing (not whether a resource exists, not which
/// group names a certificate).
async fn rights_are_checked_before_anything_is_read(backend: Backend) {
    let t = TestServer::start(backend).await;
    expect_json(
        t.owner(Method::PUT, "/certificates/factory-root")
            .json(&json!({ "name": "factory-root", "certificate": ca_certificate_pem() }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_json(
        t.owner(Method::PUT, "/enrollmentGroups/secret-line")
            .json(
                &json!({ "enrollmentGroupId": "secret-line", "attestation": { "type": "x509",
                "x509": { "caReferences": { "primary": "factory-root" } } } }),
            )
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let reader = policy_with(&t, "reader", &["EnrollmentRead"]).await;
    let refused = expect_error(
        t.signed(
            Method::DELETE,
            "/certificates/factory-root",
            "reader",
            &reader,
        )
        .send()
        .await
        .unwrap(),
        403,
        403001,
    )
    .await;
    assert!(!refused.to_string().contains("secret-line"), "{refused}");

    // Every documented operation, with two policies that each lack most rights: for every
    // operation, at least one of them is refused with 403, whatever the resource's state.
    let write_only = policy_with(&t, "registration-writer", &["RegistrationStatusWrite"]).await;
    let read_only = policy_with(&t, "registration-reader", &["RegistrationStatusRead"]).await;
    let openapi = t
        .anonymous(Method::GET, "/openapi.yaml")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut path = String::new();
    let mut checked = 0;
    for line in openapi.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = format!("/{p}")
                .replace("{id}", "secret-line")
                .replace("{kind}", "registrationId");
            continue;
        }
        let method = match line.trim_end() {
            "    get:" => Method::GET,
            "    put:" => Method::PUT,
            "    post:" => Method::POST,
            "    delete:" => Method::DELETE,
            _ => continue,
        };
        if ["/healthz", "/readyz", "/openapi.yaml"].contains(&path.as_str()) {
            continue; // served without authentication, by design
        }
        let mut statuses = Vec::new();
        for (name, key) in [
            ("registration-writer", &write_only),
            ("registration-reader", &read_only),
        ] {
            let response = t
                .signed(method.clone(), &path, name, key)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        assert!(statuses.contains(&403), "{method} {path}: {statuses:?}");
        checked += 1;
    }
    assert!(checked >= 44, "{checked} operations checked");
}

/// Security review item 13: `/metrics` names tenants, hubs and device counts, so it is not on
/// the public listener; it is served on its own address (loopback by default).
async fn metrics_are_served_on_their_own_listener(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    expect_error(
        t.anonymous(Method::GET, "/metrics").send().await.unwrap(),
        404,
        404001,
    )
    .await;
    let metrics_addr = t.running().metrics_addr;
    assert!(metrics_addr.ip().is_loopback());
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("dps_http_requests_total"), "{text}");
}

/// Security review item 9: a stranger's SAS request is tried against every symmetric-key
/// group's derived keys, so their number is bounded (`limits.max_symmetric_key_groups`, 100 by
/// default as in Azure): past it a new symmetric-key group, by PUT, by bulk create or by
/// turning an X.509 group into one, is refused and nothing is stored.
async fn symmetric_key_groups_are_bounded(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.max_symmetric_key_groups = 2).await;
    let sas_group =
        |id: &str| json!({ "enrollmentGroupId": id, "attestation": { "type": "symmetricKey" } });
    for id in ["g-1", "g-2"] {
        let response = t
            .owner(Method::PUT, &format!("/enrollmentGroups/{id}"))
            .json(&sas_group(id))
            .send()
            .await
            .unwrap();
        expect_json(response, 200).await;
    }
    let x509 = json!({
        "enrollmentGroupId": "x-1",
        "attestation": { "type": "x509", "x509": { "signingCertificates": {
            "primary": { "certificate": ca_certificate_pem() } } } }
    });
    let response = t
        .owner(Method::PUT, "/enrollmentGroups/x-1")
        .json(&x509)
        .send()
        .await
        .unwrap();
    let x509_stored = expect_json(response, 200).await;

    // The attacks on the bound: a third group, the same in a bulk request, and the X.509
    // group turned into a symmetric-key one.
    let third = t
        .owner(Method::PUT, "/enrollmentGroups/g-3")
        .json(&sas_group("g-3"))
        .send()
        .await
        .unwrap();
    let body = expect_error(third, 409, 409003).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_symmetric_key_groups"),
        "{body}"
    );
    let bulk = expect_json(
        t.owner(Method::POST, "/enrollmentGroups")
            .json(&json!({ "mode": "create", "enrollmentGroups": [sas_group("g-4")] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(bulk["isSuccessful"], false, "{bulk}");
    assert_eq!(bulk["errors"][0]["errorCode"], 409003, "{bulk}");
    let turned = t
        .owner(Method::PUT, "/enrollmentGroups/x-1")
        .header("If-Match", x509_stored["etag"].as_str().unwrap())
        .json(&sas_group("x-1"))
        .send()
        .await
        .unwrap();
    expect_error(turned, 409, 409003).await;

    // Nothing changed: two symmetric-key groups and the X.509 group as it was.
    for id in ["g-3", "g-4"] {
        let response = t
            .owner(Method::GET, &format!("/enrollmentGroups/{id}"))
            .send()
            .await
            .unwrap();
        expect_error(response, 404, 404202).await;
    }
    let read = expect_json(
        t.owner(Method::GET, "/enrollmentGroups/x-1")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(read["attestation"]["type"], "x509");
    assert_eq!(read["etag"], x509_stored["etag"]);

    // Updating a group that is already counted is not a new one; after a deletion there is
    // room again.
    let response = t
        .owner(Method::PUT, "/enrollmentGroups/g-1")
        .header("If-Match", "*")
        .json(
            &json!({ "enrollmentGroupId": "g-1", "attestation": { "type": "symmetricKey" },
                       "provisioningStatus": "disabled" }),
        )
        .send()
        .await
        .unwrap();
    expect_json(response, 200).await;
    let response = t
        .owner(Method::DELETE, "/enrollmentGroups/g-2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = t
        .owner(Method::PUT, "/enrollmentGroups/g-3")
        .json(&sas_group("g-3"))
        .send()
        .await
        .unwrap();
    expect_json(response, 200).await;
}

/// Wire fidelity (items 1, 5, 6, 7, 9): what Azure's admin clients send and expect.
async fn azure_admin_wire_details(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.limits.max_page_size = 3).await;
    for i in 0..5 {
        enroll(&t, symmetric_enrollment(&format!("w-{i}"))).await;
    }

    // Item 1: a page larger than the limit is clamped (`az ... --top 2000`), and the answer says so.
    let response = t
        .owner(Method::POST, "/enrollments/query")
        .header("x-ms-max-item-count", "2000")
        .json(&json!({ "query": "SELECT *" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-ms-max-item-count"], "3");
    assert!(response.headers().contains_key("x-ms-continuation"));
    let page = expect_json(response, 200).await;
    assert_eq!(page.as_array().unwrap().len(), 3, "{page}");
    let huge = t
        .owner(Method::POST, "/enrollments/query")
        .header("x-ms-max-item-count", "99999999999999999999999")
        .json(&json!({ "query": "SELECT *" }))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.headers()["x-ms-max-item-count"], "3");
    for bad in ["0", "-1", "ten"] {
        let response = t
            .owner(Method::POST, "/enrollments/query")
            .header("x-ms-max-item-count", bad)
            .json(&json!({ "query": "SELECT *" }))
            .send()
            .await
            .unwrap();
        expect_error(response, 400, 400009).await;
    }

    // Any token of the continuation alphabet is a lower bound of the next page; other text is
    // refused.
    for (token, status) in [
        ("x", 200),
        ("dy0y", 200),
        ("w-1", 200),
        ("!!", 400),
        ("a b", 400),
    ] {
        let response = t
            .owner(Method::POST, "/enrollments/query")
            .header("x-ms-continuation", token)
            .json(&json!({ "query": "SELECT *" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{token}");
    }
    // "dy0y" is base64url for "w-2": the page starts after it.
    let after_w2 = expect_json(
        t.owner(Method::POST, "/enrollments/query")
            .header("x-ms-continuation", "dy0y")
            .json(&json!({ "query": "SELECT *" }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let ids: Vec<&str> = after_w2
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["registrationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["w-3", "w-4"]);

    // A bulk item whose JSON is not an enrollment fails the whole request; nothing is stored.
    let malformed = t
        .owner(Method::POST, "/enrollments")
        .json(&json!({ "mode": "create", "enrollments": [
            symmetric_enrollment("w-20"),
            { "registrationId": "w-21", "attestation": { "type": "symmetricKey" }, "capabilities": "yes" } ] }))
        .send()
        .await
        .unwrap();
    let error = expect_error(malformed, 400, 400006).await;
    assert!(
        error["message"].as_str().unwrap().starts_with("item 2:"),
        "{error}"
    );
    let response = t
        .owner(Method::GET, "/enrollments/w-20")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // Item 7: an enrollment that never registered shows Azure's unassigned state.
    let read = expect_json(
        t.owner(Method::GET, "/enrollments/w-0")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        read["registrationState"],
        json!({ "registrationId": "w-0", "status": "unassigned" })
    );
    // Azure's timestamps: seven fractional digits.
    let created = read["createdDateTimeUtc"].as_str().unwrap();
    let fraction = created.trim_end_matches('Z').rsplit_once('.').unwrap().1;
    assert_eq!(fraction.len(), 7, "{created}");

    // Item 5: the C# client quotes the wildcard; it overwrites, and deletes, whatever the etag.
    let mut changed = symmetric_enrollment("w-0");
    changed["provisioningStatus"] = json!("disabled");
    let response = t
        .owner(Method::PUT, "/enrollments/w-0")
        .header("If-Match", "\"*\"")
        .json(&changed)
        .send()
        .await
        .unwrap();
    let replaced = expect_json(response, 200).await;
    assert_eq!(replaced["provisioningStatus"], "disabled");
    let response = t
        .owner(Method::DELETE, "/enrollments/w-0")
        .header("If-Match", "\"*\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    // A bulk updateIfMatchETag with the wildcard (quoted, as C# sends it) updates whatever is
    // stored; with a stale etag it changes nothing.
    let mut w1 = symmetric_enrollment("w-1");
    w1["etag"] = json!("\"*\"");
    w1["provisioningStatus"] = json!("disabled");
    let mut w2 = symmetric_enrollment("w-2");
    w2["etag"] = json!("\"stale\"");
    w2["provisioningStatus"] = json!("disabled");
    let result = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "updateIfMatchETag", "enrollments": [w1, w2] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(result["errors"][0]["registrationId"], "w-2", "{result}");
    assert_eq!(result["errors"].as_array().unwrap().len(), 1, "{result}");
    for (id, status) in [("w-1", "disabled"), ("w-2", "enabled")] {
        let read = expect_json(
            t.owner(Method::GET, &format!("/enrollments/{id}"))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        assert_eq!(read["provisioningStatus"], status, "{id}");
    }

    // Item 6: bulk delete items that carry only the id (and an etag).
    let stale = t
        .owner(Method::POST, "/enrollments")
        .json(&json!({ "mode": "delete", "enrollments": [
            { "registrationId": "w-1" },
            { "registrationId": "w-2", "etag": "\"not-its-etag\"" },
            { "etag": "*" } ] }))
        .send()
        .await
        .unwrap();
    let result = expect_json(stale, 200).await;
    assert_eq!(result["isSuccessful"], false, "{result}");
    let errors = result["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{result}");
    assert_eq!(errors[0]["registrationId"], "w-2");
    assert_eq!(errors[0]["errorCode"], 412001);
    assert_eq!(errors[1]["errorCode"], 400005);
    for (id, status) in [("w-1", 404), ("w-2", 200)] {
        let response = t
            .owner(Method::GET, &format!("/enrollments/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{id}");
    }

    // Item 9: the certificate-policy names of newer API versions survive a GET-then-PUT.
    let mut named = symmetric_enrollment("w-9");
    named["credentialPolicyName"] = json!("default");
    named["namespaceName"] = json!("adr-namespace");
    named["certificateAuthorityName"] = json!("ca-1");
    named["certificatePolicyName"] = json!("policy.1");
    enroll(&t, named).await;
    let mut read = expect_json(
        t.owner(Method::GET, "/enrollments/w-9")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(read["credentialPolicyName"], "default");
    assert_eq!(read["namespaceName"], "adr-namespace");
    assert_eq!(read["certificateAuthorityName"], "ca-1");
    assert_eq!(read["certificatePolicyName"], "policy.1");
    read.as_object_mut().unwrap().remove("registrationState");
    let etag = read["etag"].as_str().unwrap().to_owned();
    let again = expect_json(
        t.owner(Method::PUT, "/enrollments/w-9")
            .header("If-Match", etag)
            .json(&read)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(again["certificatePolicyName"], "policy.1");
    let group = json!({ "enrollmentGroupId": "wg", "attestation": { "type": "symmetricKey" },
                        "credentialPolicyName": "default" });
    assert_eq!(enroll(&t, group).await["credentialPolicyName"], "default");
    // Two of the three names, or a name that is not one (with all three given, so that only
    // the name is at fault), are refused and nothing is stored.
    let mut partial = symmetric_enrollment("w-10");
    partial["namespaceName"] = json!("adr-namespace");
    partial["certificateAuthorityName"] = json!("ca-1");
    let mut bad_name = symmetric_enrollment("w-10");
    bad_name["credentialPolicyName"] = json!("a b");
    let mut bad_adr_name = partial.clone();
    bad_adr_name["certificatePolicyName"] = json!("a b");
    for (body, field) in [
        (partial, "certificatePolicyName"),
        (bad_name, "credentialPolicyName"),
        (bad_adr_name, "certificatePolicyName"),
    ] {
        let response = t
            .owner(Method::PUT, "/enrollments/w-10")
            .json(&body)
            .send()
            .await
            .unwrap();
        let error = expect_error(response, 400, 400004).await;
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{error}"
        );
    }
    let response = t
        .owner(Method::GET, "/enrollments/w-10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

on_both_backends!(
    azure_admin_wire_details,
    symmetric_key_groups_are_bounded,
    stored_secrets_are_not_echoed_or_redirected,
    service_tokens_bind_to_the_instance_host_names,
    instance_names_are_identities_and_deletion_is_final,
    rights_are_checked_before_anything_is_read,
    metrics_are_served_on_their_own_listener,
    enrollment_lifecycle,
    group_lifecycle_and_registrations,
    queries_page_with_continuation,
    bulk_operations,
    credentials_are_checked,
    bad_input_gets_clear_400s,
    linked_hubs_and_access_policies,
    instances_are_separate_tenants,
    restart_keeps_all_data,
    concurrent_writers_cannot_both_win,
    health_metrics_and_openapi,
    allocation_simulation_explains_each_policy,
);

/// Security review item 18: the data directory, the SQLite database (with its WAL files) and
/// the TLS keys are the service's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.data_dir = data.clone();
        c.database_url = None;
    })
    .await;
    // A write, so that the WAL files exist.
    t.link_hub("hub-a.example.com").await;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    let mut checked = 0;
    for entry in walk(&data) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if entry.is_dir() {
            assert_eq!(mode(&entry), 0o700, "{name}");
        } else if name.starts_with("dps.sqlite") || name.ends_with("key.pem") {
            assert_eq!(mode(&entry), 0o600, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 3, "database and keys found: {checked}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}
