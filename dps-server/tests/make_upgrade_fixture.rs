//! Generates tests/fixtures/documents-v2.sql and documents-v2.expected.json with the storage of
//! this commit (the generic document table). Run once: cargo test --test make_upgrade_fixture
//! -- --ignored
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use attestation::tpm::soft::SoftTpm;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, Row};

async fn ok(response: reqwest::Response) -> Value {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert!((200..300).contains(&status), "{status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[tokio::test]
#[ignore]
async fn make_upgrade_fixture() {
    let t = TestServer::start(Backend::Sqlite).await;
    let scope = t.running().admin.id_scope.clone();
    t.link_hub("hub-a.example.com").await;
    ok(t.owner(Method::PUT, "/linkedHubs/hub-b.example.com")
        .json(
            &json!({ "hostName": "hub-b.example.com", "allocationWeight": 3, "region": "eu-west" }),
        )
        .send()
        .await
        .unwrap())
    .await;
    ok(t.owner(Method::PUT, "/accessPolicies/reader")
        .json(
            &json!({ "keyName": "reader", "rights": ["EnrollmentRead", "RegistrationStatusRead"],
            "primaryKey": "cmVhZGVyLXByaW1hcnkta2V5LTAwMDAwMDAwMDAwMA==",
            "secondaryKey": "cmVhZGVyLXNlY29uZGFyeS1rZXktMDAwMDAwMDAwMA==" }),
        )
        .send()
        .await
        .unwrap())
    .await;
    let key = "c2Vuc29yLTEtcHJpbWFyeS1rZXktMDAwMDAwMDAwMDA=";
    ok(t.owner(Method::PUT, "/enrollments/sensor-1")
        .json(
            &json!({ "registrationId": "sensor-1", "attestation": { "type": "symmetricKey",
            "symmetricKey": { "primaryKey": key, "secondaryKey": key } },
            "initialTwin": { "tags": { "floor": 3 } }, "iotHubs": ["hub-a.example.com"] }),
        )
        .send()
        .await
        .unwrap())
    .await;
    let group_key = "bGluZS03LWdyb3VwLXByaW1hcnkta2V5LTAwMDAwMDA=";
    ok(t.owner(Method::PUT, "/enrollmentGroups/line-7")
        .json(
            &json!({ "enrollmentGroupId": "line-7", "attestation": { "type": "symmetricKey",
            "symmetricKey": { "primaryKey": group_key, "secondaryKey": group_key } },
            "reprovisionPolicy": { "updateHubAssignment": true, "migrateDeviceData": false } }),
        )
        .send()
        .await
        .unwrap())
    .await;
    let tpm = SoftTpm::fixture(0).unwrap();
    ok(t.owner(Method::PUT, "/enrollments/tpm-1")
        .json(
            &json!({ "registrationId": "tpm-1", "attestation": { "type": "tpm", "tpm": {
            "endorsementKey": STANDARD.encode(tpm.endorsement_key()) } } }),
        )
        .send()
        .await
        .unwrap())
    .await;
    // A CA certificate (unverified) and an X.509 group that names it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fixture root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    ok(t.owner(Method::PUT, "/certificates/factory-root")
        .json(&json!({ "name": "factory-root", "certificate": ca_pem }))
        .send()
        .await
        .unwrap())
    .await;
    ok(t.owner(Method::PUT, "/enrollmentGroups/x509-line")
        .json(
            &json!({ "enrollmentGroupId": "x509-line", "attestation": { "type": "x509", "x509": {
            "signingCertificates": { "primary": { "certificate": ca_pem } } } } }),
        )
        .send()
        .await
        .unwrap())
    .await;
    ok(t.owner(Method::PUT, "/owners/acme")
        .header("If-Match", "*")
        .json(&json!({ "name": "acme", "hubs": ["hub-b.example.com"] }))
        .send()
        .await
        .unwrap())
    .await;
    ok(t.owner(Method::POST, "/ownershipRecords:import")
        .header("Content-Type", "text/csv")
        .body("registrationId,owner\nsensor-1,acme\nline-7-dev-1,acme\n")
        .send()
        .await
        .unwrap())
    .await;
    // Registrations: an individual device and a group member.
    let sensor = Device::new(&t, "sensor-1");
    let done = sensor
        .register(&device_token(
            &scope,
            "sensor-1",
            &attestation::SymmetricKey::from_base64(key).unwrap(),
        ))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let member_key = attestation::SymmetricKey::from_base64(group_key)
        .unwrap()
        .derive_device_key("line-7-dev-1");
    let member = Device::new(&t, "line-7-dev-1");
    let done = member
        .register(&device_token(&scope, "line-7-dev-1", &member_key))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    // A pending TPM challenge.
    let response = t
        .anonymous(
            Method::PUT,
            &format!("/{scope}/registrations/tpm-1/register"),
        )
        .json(&json!({ "registrationId": "tpm-1", "tpm": {
            "endorsementKey": STANDARD.encode(tpm.endorsement_key()),
            "storageRootKey": STANDARD.encode(tpm.storage_root_key()) } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // A second instance with host names and its own enrollment.
    let factory = ok(t
        .owner(Method::PUT, "/instances/factory")
        .json(&json!({ "name": "factory", "idScope": "0ne00FAC70R",
            "hostNames": ["factory.example.com", "factory-2.example.com"] }))
        .send()
        .await
        .unwrap())
    .await;
    let factory_key = factory["ownerPolicy"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let factory_owner = |method: Method, path: &str| {
        t.signed(method, path, "provisioningserviceowner", &factory_key)
    };
    ok(
        factory_owner(Method::PUT, "/instances/factory/enrollments/robot-1")
            .json(
                &json!({ "registrationId": "robot-1", "attestation": { "type": "symmetricKey" } }),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;

    // What the admin API answers now, to compare after the upgrade.
    let mut expected = serde_json::Map::new();
    for path in [
        "/enrollments/sensor-1",
        "/enrollments/tpm-1",
        "/enrollmentGroups/line-7",
        "/enrollmentGroups/x509-line",
        "/registrations/sensor-1",
        "/registrations/line-7-dev-1",
        "/linkedHubs/hub-a.example.com",
        "/linkedHubs/hub-b.example.com",
        "/accessPolicies/reader",
        "/certificates/factory-root",
        "/owners/acme",
        "/ownershipRecords/registrationId/sensor-1",
        "/instances/factory",
        "/instances/factory/enrollments/robot-1",
    ] {
        let request = if path.starts_with("/instances/factory/") {
            factory_owner(Method::GET, path)
        } else {
            t.owner(Method::GET, path)
        };
        let body = ok(request.send().await.unwrap()).await;
        expected.insert(path.to_owned(), body);
    }
    expected.insert("idScope".into(), scope.clone().into());
    expected.insert("sensorKey".into(), key.into());
    expected.insert("groupKey".into(), group_key.into());
    expected.insert("factoryKey".into(), factory_key.clone().into());

    let url = t.config.database_url.clone().unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let rows = sqlx::query(
        "SELECT ns, kind, key, parent, doc, etag, created_at, updated_at, tag FROM documents \
         ORDER BY ns, kind, key",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let quote = |v: Option<String>| match v {
        Some(v) => format!("'{}'", v.replace('\'', "''")),
        None => "NULL".to_owned(),
    };
    let mut sql = String::from(
        "-- The documents table as the storage before typed tables wrote it (migrations 1 and 2),\n\
         -- generated by tests/make_upgrade_fixture.rs at that commit. tests/upgrade.rs loads it and\n\
         -- checks that the upgrade keeps every record.\n",
    );
    for row in rows {
        let cols: Vec<String> = (0..9)
            .map(|i| quote(row.try_get::<Option<String>, _>(i).unwrap()))
            .collect();
        sql.push_str(&format!(
            "INSERT INTO documents (ns, kind, key, parent, doc, etag, created_at, updated_at, tag) VALUES ({});\n",
            cols.join(", ")
        ));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("documents-v2.sql"), sql).unwrap();
    std::fs::write(
        dir.join("documents-v2.expected.json"),
        serde_json::to_string_pretty(&Value::Object(expected)).unwrap() + "\n",
    )
    .unwrap();
}
