//! The admin API against its own OpenAPI document, with a schema-driven fuzzer: schemathesis
//! (installed by scripts/test-deps.sh) generates requests from `dps-server/openapi/admin.yaml`
//! and checks that the server accepts what the document calls valid, refuses what it calls
//! invalid, and never answers 5xx. What a schema cannot say (a body's id equals the path's,
//! references name existing resources) is pinned in interop/schemathesis/schemathesis.toml.
//!
//! The seed is fixed so that CI is repeatable; `DPS_FUZZ_SEED` and `DPS_FUZZ_EXAMPLES` explore
//! further.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use softhsm_tests::{ServerProcess, free_port, server_binary};

/// A CA certificate for the operations that upload one.
fn ca_certificate_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Fuzz Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

#[test]
fn the_admin_api_does_what_its_openapi_document_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schemathesis = root.join("interop/schemathesis/.venv/bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run scripts/test-deps.sh",
        schemathesis.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    // One address sends every request: no throttling.
    let unthrottled = [
        ("DPS_THROTTLE__REQUESTS_PER_ADDRESS_PER_MINUTE", "0"),
        ("DPS_THROTTLE__UNAUTHENTICATED_PER_ADDRESS_PER_MINUTE", "0"),
        ("DPS_THROTTLE__UNAUTHENTICATED_PER_DEVICE_PER_MINUTE", "0"),
    ];
    let server = ServerProcess::start(dir.path(), &["--listen", &listen], &unthrottled).unwrap();

    // What the pinned values refer to.
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    server
        .admin_json(&["owner", "set", "--hub", "hub-a.example.com", "fuzz-owner"])
        .unwrap();
    let token = Command::new(server_binary().unwrap())
        .args(["admin", "token"])
        .env("DPS_CONNECTION_STRING", &server.connection_string)
        .env("DPS_CA_CERT", &server.ca_certificate)
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();

    let seed = std::env::var("DPS_FUZZ_SEED").unwrap_or_else(|_| "1".to_owned());
    let examples = std::env::var("DPS_FUZZ_EXAMPLES").unwrap_or_else(|_| "40".to_owned());
    let output = Command::new("timeout")
        .arg("--kill-after=5")
        .arg("900")
        .arg(&schemathesis)
        .arg("--config-file")
        .arg(root.join("interop/schemathesis/schemathesis.toml"))
        .arg("run")
        .arg(root.join("dps-server/openapi/admin.yaml"))
        .args(["--url", &format!("https://localhost:{port}")])
        .arg("--tls-verify")
        .arg(&server.ca_certificate)
        .args(["--header", &format!("Authorization: {token}")])
        .args([
            "--checks",
            "not_a_server_error,positive_data_acceptance,negative_data_rejection",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &examples, "--seed", &seed])
        .args([
            "--generation-database",
            "none",
            "--workers",
            "1",
            "--no-color",
        ])
        // Hypothesis's health checks time the generation (too slow, too much filtered): on a
        // shared machine that makes a fixed seed fail now and then. Correctness checks only.
        .args(["--suppress-health-check", "all"])
        .current_dir(dir.path())
        .env("DPS_FUZZ_CA_PEM", ca_certificate_pem())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found requests the server and its document disagree on (seed {seed}):\n{stdout}\n{stderr}\nserver log (tail):\n{}",
        server
            .log()
            .iter()
            .rev()
            .take(40)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // It ran every operation and checked something.
    assert!(stdout.contains("Tested: 65"), "{stdout}");
    assert!(stdout.contains("passed"), "{stdout}");
}
