//! The audit log (`GET /auditLog`): every admin write and key read is an entry, written with
//! the change (nothing for a write that was refused or rolled back), naming the policy and the
//! request, with what changed and every secret masked; readable only with `ServiceConfig` of
//! its own instance, and not changeable through the API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Backend, TestServer, expect_error, expect_json, policy_with, token};
use reqwest::Method;
use serde_json::{Value, json};

/// Every entry at `query` (a path with its query string), all pages, and the raw text of
/// every page (to look for secrets in what was answered, not only in what was parsed).
async fn entries_with_text(t: &TestServer, query: &str) -> (Vec<Value>, String) {
    let (mut all, mut text) = (Vec::new(), String::new());
    let mut continuation: Option<String> = None;
    loop {
        let mut request = t
            .owner(Method::GET, query)
            .header("x-ms-max-item-count", "3");
        if let Some(token) = &continuation {
            request = request.header("x-ms-continuation", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        continuation = response
            .headers()
            .get("x-ms-continuation")
            .map(|v| v.to_str().unwrap().to_owned());
        let page = response.text().await.unwrap();
        let items: Vec<Value> = serde_json::from_str(&page).unwrap();
        assert!(items.len() <= 3);
        text.push_str(&page);
        all.extend(items);
        if continuation.is_none() {
            return (all, text);
        }
    }
}

async fn entries(t: &TestServer, query: &str) -> Vec<Value> {
    entries_with_text(t, query).await.0
}

fn change<'a>(entry: &'a Value, field: &str) -> Option<&'a Value> {
    entry["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["field"] == field)
}

const KEY_1: &str = "c2VjcmV0LWtleS1udW1iZXItb25lLTEyMzQ1Njc4OTA=";
const KEY_2: &str = "c2VjcmV0LWtleS1udW1iZXItdHdvLTEyMzQ1Njc4OTA=";
const KEY_3: &str = "c2VjcmV0LWtleS1udW1iZXItdGhyZWUtMTIzNDU2Nzg=";
const HUB_KEY: &str = "aHViLXNlY3JldC1rZXktdGhhdC1tdXN0LW5vdC1sZWFr";
const POLICY_KEY: &str = "cG9saWN5LXNlY3JldC1rZXktdGhhdC1tdXN0LW5vdC1s";

/// Create, update, key read and delete of an enrollment are four entries naming the policy and
/// the request, with the changed fields; no secret the admin sent or read is in the log.
async fn admin_writes_and_key_reads_are_entries_without_secrets(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    t.link_hub("hub-b.example.com").await;
    let writer = policy_with(
        &t,
        "enrollment-writer",
        &["EnrollmentWrite", "EnrollmentRead"],
    )
    .await;

    let body = json!({ "registrationId": "dev-a", "iotHubs": ["hub-a.example.com"],
        "attestation": { "type": "symmetricKey",
            "symmetricKey": { "primaryKey": KEY_1, "secondaryKey": KEY_2 } } });
    let created = expect_json(
        t.signed(
            Method::PUT,
            "/enrollments/dev-a",
            "enrollment-writer",
            &writer,
        )
        .header("x-ms-request-id", "audit-request-1")
        .json(&body)
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    let mut changed = body.clone();
    changed["iotHubs"] = json!(["hub-b.example.com"]);
    changed["attestation"]["symmetricKey"]["primaryKey"] = json!(KEY_3);
    expect_json(
        t.owner(Method::PUT, "/enrollments/dev-a")
            .header("If-Match", created["etag"].as_str().unwrap())
            .json(&changed)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let revealed = expect_json(
        t.owner(Method::POST, "/enrollments/dev-a/attestationmechanism")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(revealed["symmetricKey"]["primaryKey"], KEY_3);
    let deleted = t
        .owner(Method::DELETE, "/enrollments/dev-a")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);

    let log = entries(&t, "/auditLog?resourceKind=enrollment&resourceId=dev-a").await;
    let actions: Vec<&str> = log.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["create", "update", "readKeys", "delete"],
        "{log:?}"
    );
    let owner = t.owner.key_name.clone();
    let policies: Vec<&str> = log.iter().map(|e| e["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["enrollment-writer", &owner, &owner, &owner]);
    for entry in &log {
        assert_eq!(entry["resourceKind"], "enrollment");
        assert_eq!(entry["resourceId"], "dev-a");
        assert_eq!(entry["policyInstance"], "default");
        assert!(entry["time"].as_str().unwrap().ends_with('Z'), "{entry}");
    }
    assert_eq!(log[0]["requestId"], "audit-request-1");
    let generated = log[1]["requestId"].as_str().unwrap();
    assert!(
        !generated.is_empty() && generated != "audit-request-1",
        "{generated}"
    );
    // Created: the fields it was given, secrets masked.
    assert_eq!(
        change(&log[0], "registrationId").unwrap()["new"],
        "dev-a",
        "{}",
        log[0]
    );
    let primary = change(&log[0], "attestation.symmetricKey.primaryKey").unwrap();
    assert_eq!(primary["new"], "***");
    assert!(primary.get("old").is_none(), "{primary}");
    // Updated: what changed, old and new; what did not change is not listed.
    let hubs = change(&log[1], "iotHubs").unwrap();
    assert_eq!(hubs["old"], json!(["hub-a.example.com"]));
    assert_eq!(hubs["new"], json!(["hub-b.example.com"]));
    let rotated = change(&log[1], "attestation.symmetricKey.primaryKey").unwrap();
    assert_eq!(
        (&rotated["old"], &rotated["new"]),
        (&json!("***"), &json!("***"))
    );
    assert!(change(&log[1], "attestation.symmetricKey.secondaryKey").is_none());
    assert!(change(&log[1], "registrationId").is_none());
    // Deleted: what it held.
    assert_eq!(
        change(&log[3], "iotHubs").unwrap()["old"],
        json!(["hub-b.example.com"])
    );
    assert!(change(&log[3], "iotHubs").unwrap().get("new").is_none());

    // Secrets of other kinds: a policy's keys (and their read), a hub's connection string.
    expect_json(
        t.owner(Method::PUT, "/accessPolicies/keyed")
            .json(&json!({ "keyName": "keyed", "rights": ["EnrollmentRead"],
                "primaryKey": POLICY_KEY, "secondaryKey": KEY_2 }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_json(
        t.owner(Method::POST, "/accessPolicies/keyed/listKeys")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-c.example.com")
            .json(&json!({ "hostName": "hub-c.example.com", "connector": { "type": "azure-iot-hub",
                "connectionString": format!("HostName=hub-c.example.com;SharedAccessKeyName=registryReadWrite;SharedAccessKey={HUB_KEY}") } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let (everything, text) = entries_with_text(&t, "/auditLog").await;
    for secret in [KEY_1, KEY_2, KEY_3, HUB_KEY, POLICY_KEY, &writer] {
        assert!(
            !text.contains(secret),
            "a secret is in the audit log: {text}"
        );
    }
    let policy_reads: Vec<&Value> = everything
        .iter()
        .filter(|e| e["resourceKind"] == "access-policy" && e["resourceId"] == "keyed")
        .collect();
    let actions: Vec<&str> = policy_reads
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "readKeys"]);
    let hub = everything
        .iter()
        .find(|e| e["resourceId"] == "hub-c.example.com")
        .unwrap();
    assert_eq!(
        change(hub, "connector.connectionString").unwrap()["new"],
        "***"
    );
    // The policy filter.
    let by_writer = entries(&t, "/auditLog?policy=ENROLLMENT-writer").await;
    assert_eq!(by_writer.len(), 1, "{by_writer:?}");
    // Oldest first, each id once.
    let ids: Vec<&str> = everything
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted);
}

/// Refused writes (a stale etag, a bad body, a missing right, a host name the database finds
/// taken) leave no entry (a transaction that fails after an audited write: the store's tests);
/// the log has no route that changes it; only `ServiceConfig` of its own instance reads it.
async fn refused_writes_leave_no_entry_and_the_log_cannot_be_changed(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let body = json!({ "registrationId": "dev-b", "attestation": { "type": "symmetricKey" } });
    expect_json(
        t.owner(Method::PUT, "/enrollments/dev-b")
            .json(&body)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let factory = expect_json(
        t.owner(Method::PUT, "/instances/factory")
            .json(&json!({ "name": "factory", "hostNames": ["factory.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let before = entries(&t, "/auditLog").await;

    let stale = t
        .owner(Method::PUT, "/enrollments/dev-b")
        .header("If-Match", "\"stale\"")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    let bad = t
        .owner(Method::PUT, "/enrollments/dev-c")
        .json(&json!({ "registrationId": "dev-c", "attestation": { "type": "nonsense" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let reader = policy_with(&t, "reader", &["EnrollmentRead"]).await;
    let after_policy = entries(&t, "/auditLog").await;
    assert_eq!(
        after_policy.len(),
        before.len() + 1,
        "the policy's creation"
    );
    let forbidden = t
        .signed(Method::DELETE, "/enrollments/dev-b", "reader", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    // Refused by the database (its host name is another instance's).
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
    // No route writes the log.
    for method in [Method::PUT, Method::POST, Method::DELETE, Method::PATCH] {
        let response = t
            .owner(method.clone(), "/auditLog")
            .json(&json!([]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method}");
    }
    let id = after_policy[0]["id"].as_str().unwrap();
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let response = t
            .owner(method.clone(), &format!("/auditLog/{id}"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert!([404, 405].contains(&response.status().as_u16()), "{method}");
    }
    assert_eq!(entries(&t, "/auditLog").await, after_policy);

    // Reading needs ServiceConfig.
    expect_error(
        t.signed(Method::GET, "/auditLog", "reader", &reader)
            .send()
            .await
            .unwrap(),
        403,
        403001,
    )
    .await;
    // Another instance's log: its own policy reads it, the first instance's cannot, and
    // neither sees the other's entries.
    let factory_key = factory["ownerPolicy"]["primaryKey"].as_str().unwrap();
    let factory_token = token(
        "factory.example.com",
        "provisioningserviceowner",
        factory_key,
        3600,
    );
    let own_response = t
        .anonymous(Method::GET, "/instances/factory/auditLog")
        .header("Authorization", &factory_token)
        .send()
        .await
        .unwrap();
    assert_eq!(own_response.status(), 200);
    let own_text = own_response.text().await.unwrap();
    let own: Vec<Value> = serde_json::from_str(&own_text).unwrap();
    // Its owner policy, written into it when the admin instance's policy created it.
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0]["resourceKind"], "access-policy");
    assert_eq!(own[0]["policyInstance"], "default");
    assert!(!own_text.contains(factory_key), "{own_text}");
    assert!(
        !before.iter().any(|e| e["resourceKind"] == "access-policy"),
        "the factory's policy is in the default instance's log: {before:?}"
    );
    expect_error(
        t.owner(Method::GET, "/instances/factory/auditLog")
            .send()
            .await
            .unwrap(),
        401,
        401002,
    )
    .await;
    // The instance's creation is in the admin instance's log, with its owner policy's keys
    // masked.
    let created = entries(&t, "/auditLog?resourceKind=instance&resourceId=factory").await;
    assert_eq!(created.len(), 1, "{created:?}");
    let (_, text) = entries_with_text(&t, "/auditLog").await;
    assert!(!text.contains(factory_key), "{text}");
    assert!(
        !text.contains("\"other\""),
        "the rolled-back instance: {text}"
    );

    // Filters are checked.
    for query in [
        "/auditLog?resourceKind=secret",
        "/auditLog?resourceId=dev-b",
        "/auditLog?from=yesterday",
        "/auditLog?policy=a%00b",
        "/auditLog?unknown=1",
    ] {
        let response = t.owner(Method::GET, query).send().await.unwrap();
        assert_eq!(response.status(), 400, "{query}");
    }
}

/// Bulk creates and deletes are an entry per enrollment; an ownership import an entry per
/// record (`import`: what a record held before is not read); bulk-written entries carry no
/// field values.
async fn bulk_writes_and_imports_are_entries(backend: Backend) {
    let t = TestServer::start(backend).await;
    let items: Vec<Value> = (0..3)
        .map(|i| {
            json!({ "registrationId": format!("bulk-{i}"), "attestation": { "type": "symmetricKey",
            "symmetricKey": { "primaryKey": KEY_1, "secondaryKey": KEY_2 } } })
        })
        .collect();
    let created = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(created["isSuccessful"], true, "{created}");
    let deleted = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "delete", "enrollments": [items[1].clone()] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(deleted["isSuccessful"], true, "{deleted}");
    let (log, text) = entries_with_text(&t, "/auditLog?resourceKind=enrollment").await;
    let seen: Vec<(String, String)> = log
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["resourceId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for i in 0..3 {
        assert!(
            seen.contains(&("create".into(), format!("bulk-{i}"))),
            "{seen:?}"
        );
    }
    assert!(
        seen.contains(&("delete".into(), "bulk-1".into())),
        "{seen:?}"
    );
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(!text.contains(KEY_1) && !text.contains(KEY_2), "{text}");

    // A create of ids some of which exist writes, and audits, only the free ones.
    let mut again = items.clone();
    again.push(
        json!({ "registrationId": "bulk-3", "attestation": { "type": "symmetricKey",
        "symmetricKey": { "primaryKey": KEY_1, "secondaryKey": KEY_2 } } }),
    );
    let partly = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": again }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(partly["isSuccessful"], false, "{partly}");
    let log = entries(&t, "/auditLog?resourceKind=enrollment").await;
    let mut created: Vec<&str> = log
        .iter()
        .filter(|e| e["action"] == "create")
        .map(|e| e["resourceId"].as_str().unwrap())
        .collect();
    created.sort_unstable();
    assert_eq!(
        created,
        ["bulk-0", "bulk-1", "bulk-1", "bulk-2", "bulk-3"],
        "{log:?}"
    );

    t.link_hub("hub-a.example.com").await;
    expect_json(
        t.owner(Method::PUT, "/owners/acme")
            .json(&json!({ "name": "acme", "hubs": ["hub-a.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let imported = t
        .owner(Method::POST, "/ownershipRecords:import")
        .header("Content-Type", "text/csv")
        .body("registrationId,owner\ndev-1,acme\ndev-2,acme\n")
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 200);
    let records = entries(&t, "/auditLog?resourceKind=ownership-record").await;
    let actions: Vec<&str> = records
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["import", "import"], "{records:?}");
    // Bulk entries name their records without their fields (reading what a record held, and
    // its diff, would cost more than the write).
    assert!(records[0].get("changes").is_none(), "{}", records[0]);
}

/// Past `audit.max_entries` the oldest entries are swept (at start, then every minute); the
/// newest stay.
async fn the_oldest_entries_past_the_count_are_swept(backend: Backend) {
    let t = TestServer::start_with(backend, |c| c.audit.max_entries = 3).await;
    for i in 0..5 {
        expect_json(
            t.owner(Method::PUT, &format!("/enrollments/count-{i}"))
                .json(&json!({ "registrationId": format!("count-{i}"),
                    "attestation": { "type": "symmetricKey" } }))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
    }
    let t = t.restart().await;
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = entries(&t, "/auditLog").await;
        if kept.len() <= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<&str> = kept
        .iter()
        .map(|e| e["resourceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["count-2", "count-3", "count-4"]);
}

on_both_backends!(
    admin_writes_and_key_reads_are_entries_without_secrets,
    refused_writes_leave_no_entry_and_the_log_cannot_be_changed,
    bulk_writes_and_imports_are_entries,
    the_oldest_entries_past_the_count_are_swept,
);
