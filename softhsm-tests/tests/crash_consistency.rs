//! kill -9 in the middle of writes: devices registering (outcomes and their events) and an
//! admin importing enrollments (writes and their audit entries) when the server is killed.
//! After a restart on the same database every assigned device has its event and every event
//! its outcome, and every enrollment has its audit entry and every entry its enrollment: each
//! commits with its change or not at all. On SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use softhsm_tests::{
    ServerProcess, drop_postgres_database, free_port, fresh_postgres_database, load_binary,
};

fn ids(items: &Value, field: &str) -> BTreeSet<String> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item[field].as_str().unwrap().to_ascii_lowercase())
        .collect()
}

/// Starts `dps-load ARGS` against `server`, its output discarded (it fails when the server
/// dies, which is the point).
fn load(server: &ServerProcess, endpoint: &str, args: &[&str]) -> Child {
    Command::new(load_binary().unwrap())
        .args(args)
        .args(["--endpoint", endpoint])
        .args(["--connection-string", &server.connection_string])
        .arg("--ca-cert")
        .arg(&server.ca_certificate)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn killed_mid_write_keeps_changes_with_their_records(database: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let endpoint = format!("https://localhost:{port}");
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(database);
    let env = [
        ("DPS_THROTTLE__REQUESTS_PER_ADDRESS_PER_MINUTE", "0"),
        ("DPS_THROTTLE__REGISTRATIONS_PER_DEVICE_PER_MINUTE", "0"),
        ("DPS_THROTTLE__POLLS_PER_DEVICE_PER_MINUTE", "0"),
    ];
    let server = ServerProcess::start(dir.path(), &args, &env).unwrap();
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    let mut loads = vec![
        load(
            &server,
            &endpoint,
            &[
                "run",
                "--mode",
                "group",
                "--devices",
                "3000",
                "--concurrency",
                "16",
                "--poll-ms",
                "20",
                "--id-scope",
                &server.id_scope,
            ],
        ),
        load(
            &server,
            &endpoint,
            // More than can be imported before the kill on any machine: the kill must cut it.
            &["import", "--enrollments", "1000000", "--concurrency", "2"],
        ),
    ];
    // Until devices are registering, then a little more (the import runs meanwhile).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let events = server.admin_json(&["event", "list"]).unwrap();
        if events.as_array().is_some_and(|e| e.len() >= 20) {
            break;
        }
        assert!(Instant::now() < deadline, "the load did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SIGKILL: no shutdown, transactions cut wherever they are.
    drop(server);
    for child in &mut loads {
        let _ = child.kill();
        let _ = child.wait();
    }

    let server = ServerProcess::start(dir.path(), &args, &env).unwrap();
    let group = server.admin_json(&["group", "list"]).unwrap();
    let group = group[0]["enrollmentGroupId"].as_str().unwrap().to_owned();
    let states = server
        .admin_json(&["registration", "list", "--group", &group])
        .unwrap();
    let assigned: BTreeSet<String> = states
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "assigned")
        .map(|s| s["registrationId"].as_str().unwrap().to_ascii_lowercase())
        .collect();
    let events = server
        .admin_json(&["event", "list", "--kind", "registration.assigned"])
        .unwrap();
    let with_events = ids(&events, "registrationId");
    assert!(assigned.len() >= 20, "{} assigned", assigned.len());
    assert_eq!(
        assigned, with_events,
        "every assigned device has its event, every event its outcome"
    );

    let enrollments = ids(
        &server.admin_json(&["enrollment", "list"]).unwrap(),
        "registrationId",
    );
    let entries = server
        .admin_json(&["audit", "list", "--resource-kind", "enrollment"])
        .unwrap();
    let created: BTreeSet<String> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "create")
        .map(|e| e["resourceId"].as_str().unwrap().to_owned())
        .collect();
    assert!(!enrollments.is_empty(), "the import had begun");
    assert!(enrollments.len() < 1_000_000, "the import was cut short");
    assert_eq!(
        enrollments, created,
        "every enrollment has its audit entry, every entry its enrollment"
    );
}

#[test]
fn sqlite_killed_mid_write_keeps_changes_with_their_records() {
    killed_mid_write_keeps_changes_with_their_records(&[]);
}

#[test]
fn postgres_killed_mid_write_keeps_changes_with_their_records() {
    let url = fresh_postgres_database("dps_crash").unwrap();
    killed_mid_write_keeps_changes_with_their_records(&["--database-url", &url]);
    drop_postgres_database(&url);
}
