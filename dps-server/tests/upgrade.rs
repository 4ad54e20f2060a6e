//! A database written by the storage before typed tables (one `documents` table, migrations 1
//! and 2) is upgraded at start-up without losing anything: the fixture was made by that code
//! (tests/fixtures/documents-v2.sql: two instances, hubs, policies, enrollments of each
//! attestation, groups, a CA certificate, owners and ownership records, registered devices and
//! a pending TPM challenge), and every record reads back through the admin API as that code
//! answered (documents-v2.expected.json), etags and timestamps included. The devices then
//! register again, and the database enforces what the old code checked by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::borrow::Cow;

use attestation::SymmetricKey;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

const FIXTURE: &str = include_str!("fixtures/documents-v2.sql");
const EXPECTED: &str = include_str!("fixtures/documents-v2.expected.json");

/// The migrations the older storage ran, exactly as it recorded them.
fn old_migrations(backend: Backend) -> Migrator {
    let (first, second) = match backend {
        Backend::Sqlite => (
            include_str!("../migrations/sqlite/0001_documents.sql"),
            include_str!("../migrations/sqlite/0002_document_tags.sql"),
        ),
        Backend::Postgres => (
            include_str!("../migrations/postgres/0001_documents.sql"),
            include_str!("../migrations/postgres/0002_document_tags.sql"),
        ),
    };
    let migration = |version, description, sql: &'static str| {
        Migration::new(
            version,
            Cow::Borrowed(description),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    let mut migrator = Migrator::with_migrations(vec![
        migration(1, "documents", first),
        migration(2, "document tags", second),
    ]);
    migrator.set_locking(false);
    migrator
}

/// A database as the older storage left it, holding the fixture.
async fn old_database(backend: Backend, dir: &tempfile::TempDir) -> String {
    let url = fresh_database(backend, dir).await;
    let migrator = old_migrations(backend);
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            sqlx::raw_sql(FIXTURE).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            sqlx::raw_sql(FIXTURE).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
    url
}

async fn read(t: &TestServer, path: &str, factory_key: &str) -> Value {
    let request = if path.starts_with("/instances/factory/") {
        t.signed(Method::GET, path, "provisioningserviceowner", factory_key)
    } else {
        t.owner(Method::GET, path)
    };
    expect_json(request.send().await.unwrap(), 200).await
}

async fn every_record_survives_the_upgrade(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = old_database(backend, &dir).await;
    let t = TestServer::start_with(backend, |config| config.database_url = Some(url)).await;
    let expected: Value = serde_json::from_str(EXPECTED).unwrap();
    let factory_key = expected["factoryKey"].as_str().unwrap();

    // The admin instance kept its ID scope and its owner policy (the printed connection
    // string signs these requests).
    assert_eq!(t.running().admin.id_scope, expected["idScope"]);
    // What the admin API answers for `path` today: the recorded answer, and since it was
    // recorded, an enrollment that never registered shows Azure's unassigned state.
    let answer_now = |path: &str| {
        let mut answer = expected[path].clone();
        if path.contains("/enrollments/") && answer.get("registrationState").is_none() {
            answer["registrationState"] =
                json!({ "registrationId": answer["registrationId"], "status": "unassigned" });
        }
        answer
    };
    for path in expected.as_object().unwrap().keys() {
        if path.starts_with('/') {
            assert_eq!(
                read(&t, path, factory_key).await,
                answer_now(path),
                "{path}"
            );
        }
    }

    // The devices register again on top of their registration states.
    let scope = t.running().admin.id_scope.clone();
    let sensor_key = SymmetricKey::from_base64(expected["sensorKey"].as_str().unwrap()).unwrap();
    let done = Device::new(&t, "sensor-1")
        .register(&device_token(&scope, "sensor-1", &sensor_key))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["createdDateTimeUtc"],
        expected["/registrations/sensor-1"]["createdDateTimeUtc"],
        "the registration state is the upgraded one"
    );
    let member_key = SymmetricKey::from_base64(expected["groupKey"].as_str().unwrap())
        .unwrap()
        .derive_device_key("line-7-dev-1");
    let done = Device::new(&t, "line-7-dev-1")
        .register(&device_token(&scope, "line-7-dev-1", &member_key))
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        expected["/registrations/line-7-dev-1"]["assignedHub"]
    );

    // Uniqueness the old code kept with extra records, now the database's: the factory's ID
    // scope and host names stay its own.
    let taken = t
        .owner(Method::PUT, "/instances/copycat")
        .json(&json!({ "name": "copycat", "idScope": "0ne00FAC70R" }))
        .send()
        .await
        .unwrap();
    expect_error(taken, 409, 409001).await;
    let taken = t
        .owner(Method::PUT, "/instances/copycat")
        .json(&json!({ "name": "copycat", "hostNames": ["FACTORY.example.com"] }))
        .send()
        .await
        .unwrap();
    expect_error(taken, 409, 409001).await;
    let missing = t
        .owner(Method::GET, "/instances/copycat")
        .send()
        .await
        .unwrap();
    expect_error(missing, 404, 404002).await;
    // An owner that records name is not deleted.
    let owned = t
        .owner(Method::DELETE, "/owners/acme")
        .send()
        .await
        .unwrap();
    expect_error(owned, 409, 409002).await;
    assert_eq!(
        read(&t, "/owners/acme", factory_key).await,
        answer_now("/owners/acme")
    );

    // The upgrade ran once: a restart reads the same records.
    let t = t.restart().await;
    assert_eq!(
        read(&t, "/enrollments/tpm-1", factory_key).await,
        answer_now("/enrollments/tpm-1")
    );
    assert_eq!(
        read(&t, "/instances/factory/enrollments/robot-1", factory_key).await,
        answer_now("/instances/factory/enrollments/robot-1")
    );
}

on_both_backends!(every_record_survives_the_upgrade);
