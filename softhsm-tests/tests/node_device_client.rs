//! Interop: the official Node device SDK (`azure-iot-provisioning-device`,
//! `azure-iot-provisioning-device-http`, `azure-iot-security-symmetric-key`) registers a device
//! through an individual enrollment and one through an enrollment group, and receives the
//! assigned hub and device id. The SDK talks to `https://{host}:443`, so the server listens on
//! 127.0.0.1:443 as `localhost`. Enrollments are made with the admin CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use softhsm_tests::{ServerProcess, run_node};

fn cli(server: &ServerProcess, args: &[&str]) -> Value {
    server.admin_json(args).unwrap()
}

#[test]
fn node_device_sdk_registers_with_symmetric_keys() {
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

    let (individual_key, group_key) = (key(&enrollment), key(&group));
    let output = run_node(
        "device_symmetric_key.js",
        &server,
        &[
            ("DPS_HOST", "localhost"),
            ("DPS_ID_SCOPE", server.id_scope.as_str()),
            ("DPS_EXPECTED_HUB", "hub-a.example.com"),
            ("DPS_INDIVIDUAL_ID", "node-device-1"),
            ("DPS_INDIVIDUAL_DEVICE_ID", "node-device-one"),
            ("DPS_INDIVIDUAL_KEY", individual_key.as_str()),
            ("DPS_GROUP_KEY", group_key.as_str()),
        ],
    )
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
