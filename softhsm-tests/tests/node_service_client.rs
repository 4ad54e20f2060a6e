//! Interop: the official Node service client (`azure-iot-provisioning-service`), given the
//! connection string the server prints, manages enrollments and groups. The client builds
//! `https://{HostName}/...` on port 443, so the server listens on 127.0.0.1:443 with the host
//! name `localhost`, and Node trusts the generated CA through `NODE_EXTRA_CA_CERTS`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use softhsm_tests::ServerProcess;

#[test]
fn node_service_client_manages_enrollments_and_groups() {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/node");
    assert!(
        interop
            .join("node_modules/azure-iot-provisioning-service")
            .exists(),
        "npm packages missing: run scripts/test-deps.sh (or npm ci in interop/node)"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--listen", "127.0.0.1:443"], &[]).unwrap();
    assert!(
        server.connection_string.starts_with("HostName=localhost;"),
        "{}",
        server.connection_string
    );

    // A client call that never answers must fail the test, not stall the suite.
    let output = Command::new("timeout")
        .args(["--kill-after=5", "120", "node", "service_client.js"])
        .current_dir(&interop)
        .env("DPS_CONNECTION_STRING", &server.connection_string)
        .env("NODE_EXTRA_CA_CERTS", &server.ca_certificate)
        // The server listens on 127.0.0.1 only; make `localhost` resolve there first.
        .env("NODE_OPTIONS", "--dns-result-order=ipv4first")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        server.log().join("\n")
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
