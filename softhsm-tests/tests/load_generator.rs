//! The load generator works against the real server in every mode and against its ceiling
//! server, and its JSON report says what happened. (Its figures are benchmarks, recorded in
//! docs/benchmarks.md; here only correctness is checked.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;
use softhsm_tests::{ServerProcess, free_port, load_binary};

fn report(args: &[&str]) -> Value {
    let output = Command::new(load_binary().unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "dps-load {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn every_mode_registers_against_the_service_and_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--listen", &format!("127.0.0.1:{port}")],
        &[
            ("DPS_THROTTLE__REQUESTS_PER_ADDRESS_PER_MINUTE", "0"),
            // Every TPM device asks for a challenge from this one address.
            ("DPS_THROTTLE__UNAUTHENTICATED_PER_ADDRESS_PER_MINUTE", "0"),
        ],
    )
    .unwrap();
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    let endpoint = format!("https://localhost:{port}");
    let ca = server.ca_certificate.to_str().unwrap().to_owned();
    for mode in ["individual", "group", "x509", "tpm"] {
        let answer = report(&[
            "run",
            "--endpoint",
            &endpoint,
            "--connection-string",
            &server.connection_string,
            "--id-scope",
            &server.id_scope,
            "--ca-cert",
            &ca,
            "--devices",
            "12",
            "--concurrency",
            "4",
            "--mode",
            mode,
            "--poll-ms",
            "20",
            "--compare-ceiling",
            "--output",
            "json",
        ]);
        let runs = answer["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{answer}");
        for run in runs {
            assert_eq!(run["assigned"], 12, "{mode}: {run}");
            assert_eq!(run["errors"], serde_json::json!({}), "{mode}: {run}");
            assert!(run["registrationMs"]["p50"].as_f64().unwrap() > 0.0);
            let (max, p99) = (
                run["registrationMs"]["max"].as_f64().unwrap(),
                run["registrationMs"]["p99"].as_f64().unwrap(),
            );
            assert!(max >= p99, "{mode}: {run}");
        }
        assert!(answer["ratioOfCeiling"].as_f64().unwrap() > 0.0, "{answer}");
    }
    // The scale benchmark's import: more than one bulk request's worth.
    let output = Command::new(load_binary().unwrap())
        .args([
            "import",
            "--endpoint",
            &endpoint,
            "--connection-string",
            &server.connection_string,
            "--ca-cert",
            &ca,
            "--enrollments",
            "1500",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("imported 1500 individual enrollments"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = server.admin_json(&["enrollment", "list"]).unwrap();
    let scale = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["registrationId"].as_str().unwrap().starts_with("scale-"))
        .count();
    assert_eq!(scale, 1500);

    // The registrations are the server's own: 12 devices per mode on its one hub.
    let hub = server
        .admin_json(&["hub", "show", "hub-a.example.com"])
        .unwrap();
    assert_eq!(hub["deviceCount"], 48, "{hub}");
    // A wrong connection string fails clearly.
    let output = Command::new(load_binary().unwrap())
        .args([
            "run", "--endpoint", &endpoint, "--connection-string",
            "HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==",
            "--id-scope", &server.id_scope, "--ca-cert", &ca, "--devices", "1",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
}
