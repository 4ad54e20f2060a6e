//! Interop: the official Node device SDK (`azure-iot-provisioning-device`,
//! `azure-iot-provisioning-device-http`, `azure-iot-security-symmetric-key`) registers a device
//! through an individual enrollment and one through an enrollment group, and receives the
//! assigned hub and device id. The SDK talks to `https://{host}:443`, so the server listens on
//! 127.0.0.1:443 as `localhost`. Enrollments are made with the admin CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use softhsm_tests::ServerProcess;

fn cli(server: &ServerProcess, args: &[&str]) -> Value {
    server.admin_json(args).unwrap()
}

#[test]
fn node_device_sdk_registers_with_symmetric_keys() {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/node");
    assert!(
        interop
            .join("node_modules/azure-iot-provisioning-device-http")
            .exists(),
        "npm packages missing: run scripts/test-deps.sh (or npm ci in interop/node)"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--listen", "127.0.0.1:443"], &[]).unwrap();

    cli(&server, &["hub", "set", "hub-a.example.com"]);
    let enrollment = cli(
        &server,
        &[
            "enrollment",
            "create",
            "node-device-1",
            "--device-id",
            "node-device-one",
        ],
    );
    let group = cli(&server, &["group", "create", "node-line"]);
    let key = |v: &Value| {
        v["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let output = Command::new("timeout")
        .args(["--kill-after=5", "120", "node", "device_symmetric_key.js"])
        .current_dir(&interop)
        .env("DPS_HOST", "localhost")
        .env("DPS_ID_SCOPE", &server.id_scope)
        .env("DPS_EXPECTED_HUB", "hub-a.example.com")
        .env("DPS_INDIVIDUAL_ID", "node-device-1")
        .env("DPS_INDIVIDUAL_DEVICE_ID", "node-device-one")
        .env("DPS_INDIVIDUAL_KEY", key(&enrollment))
        .env("DPS_GROUP_KEY", key(&group))
        .env("NODE_EXTRA_CA_CERTS", &server.ca_certificate)
        .env("NODE_OPTIONS", "--dns-result-order=ipv4first")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("all checks passed"),
        "node failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        server.log().join("\n")
    );

    // The registrations are visible to the admin API, with the group member under its group.
    let state = cli(&server, &["registration", "show", "node-device-1"]);
    assert_eq!(state["assignedHub"], "hub-a.example.com");
    let members = cli(&server, &["registration", "list", "--group", "node-line"]);
    assert_eq!(members[0]["registrationId"], "node-group-member-1");
}
