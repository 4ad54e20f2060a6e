//! Interop: the official Node service client (`azure-iot-provisioning-service`), given the
//! connection string the server prints, manages enrollments and groups. The client builds
//! `https://{HostName}/...` on port 443, so the server listens on 127.0.0.1:443 with the host
//! name `localhost`, and Node trusts the generated CA through `NODE_EXTRA_CA_CERTS`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use softhsm_tests::{ServerProcess, run_node};

#[test]
fn node_service_client_manages_enrollments_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--listen", "127.0.0.1:443"], &[]).unwrap();
    assert!(
        server.connection_string.starts_with("HostName=localhost;"),
        "{}",
        server.connection_string
    );

    // A client call that never answers fails the test (run_node kills node after 2 minutes).
    let output = run_node(
        "service_client.js",
        &server,
        &[("DPS_CONNECTION_STRING", server.connection_string.as_str())],
    )
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
