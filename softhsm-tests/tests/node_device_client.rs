//! Interop: the official Node device SDK (`azure-iot-provisioning-device`,
//! `azure-iot-provisioning-device-http`, with `azure-iot-security-symmetric-key` or
//! `azure-iot-security-x509`) registers a device through an individual enrollment and one
//! through an enrollment group, and receives the assigned hub and device id. The SDK talks to
//! `https://{host}:443` and `mqtts://{host}:8883`, so the server listens on 127.0.0.1:443 and
//! 127.0.0.1:8883 as `localhost`, and the tests of this file take turns. Each test runs its
//! script over HTTPS (`azure-iot-provisioning-device-http`), MQTT and MQTT over WebSockets
//! (`-mqtt`'s `Mqtt` and `MqttWs`). Enrollments are made with the admin CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Mutex;

use serde_json::Value;
use softhsm_tests::{ServerProcess, run_node};

/// Ports 443 and 8883 are shared by the tests of this file.
static PORT_443: Mutex<()> = Mutex::new(());

fn cli(server: &ServerProcess, args: &[&str]) -> Value {
    server.admin_json(args).unwrap()
}

#[test]
fn node_device_sdk_registers_with_symmetric_keys() {
    let _turn = PORT_443.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--listen", "127.0.0.1:443"],
        &[("DPS_MQTT_LISTEN", "127.0.0.1:8883")],
    )
    .unwrap();

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
    for transport in ["http", "mqtt", "mqtt-ws"] {
        let output = run_node(
            "device_symmetric_key.js",
            &server,
            &[
                ("DPS_TRANSPORT", transport),
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
            "node over {transport} failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
            server.log().join("\n")
        );
    }

    // The registrations are visible to the admin API, with the group member under its group.
    let state = cli(&server, &["registration", "show", "node-device-1"]);
    assert_eq!(state["assignedHub"], "hub-a.example.com");
    let members = cli(&server, &["registration", "list", "--group", "node-line"]);
    assert_eq!(members[0]["registrationId"], "node-group-member-1");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A certificate for `cn` with clientAuth, self-signed or issued by `issuer`: (cert PEM, key PEM).
fn device_certificate(
    cn: &str,
    issuer: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.pem(), key.serialize_pem())
}

fn ca_certificate(
    cn: &str,
    parent: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = match parent {
        Some(parent) => params.signed_by(&key, parent).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.pem(), rcgen::Issuer::new(params, key))
}

#[test]
fn node_device_sdk_registers_with_x509_certificates() {
    let _turn = PORT_443.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--listen", "127.0.0.1:443"],
        &[("DPS_MQTT_LISTEN", "127.0.0.1:8883")],
    )
    .unwrap();
    cli(&server, &["hub", "set", "hub-a.example.com"]);

    let (individual_cert, individual_key) = device_certificate("node-x509-1", None);
    let individual_pem = write(dir.path(), "individual.pem", &individual_cert);
    cli(
        &server,
        &[
            "enrollment",
            "create",
            "node-x509-1",
            "--certificate",
            &individual_pem,
        ],
    );

    let (_, root) = ca_certificate("Node Test Root", None);
    let (line_pem, line) = ca_certificate("Node Test Line", Some(&root));
    let line_file = write(dir.path(), "line.pem", &line_pem);
    cli(
        &server,
        &[
            "group",
            "create",
            "node-x509-line",
            "--certificate",
            &line_file,
        ],
    );
    let (member_cert, member_key) = device_certificate("node-x509-member", Some(&line));
    let (stranger_cert, stranger_key) = device_certificate("node-x509-stranger", None);

    let files = [
        (
            "DPS_INDIVIDUAL_CERT",
            write(dir.path(), "i.crt", &individual_cert),
        ),
        (
            "DPS_INDIVIDUAL_KEY",
            write(dir.path(), "i.key", &individual_key),
        ),
        (
            "DPS_MEMBER_CERT",
            write(dir.path(), "m.crt", &format!("{member_cert}{line_pem}")),
        ),
        ("DPS_MEMBER_KEY", write(dir.path(), "m.key", &member_key)),
        (
            "DPS_STRANGER_CERT",
            write(dir.path(), "s.crt", &stranger_cert),
        ),
        (
            "DPS_STRANGER_KEY",
            write(dir.path(), "s.key", &stranger_key),
        ),
    ];
    let mut env: Vec<(&str, &str)> = vec![
        ("DPS_HOST", "localhost"),
        ("DPS_ID_SCOPE", server.id_scope.as_str()),
        ("DPS_EXPECTED_HUB", "hub-a.example.com"),
        ("DPS_INDIVIDUAL_ID", "node-x509-1"),
        ("DPS_MEMBER_ID", "node-x509-member"),
        ("DPS_STRANGER_ID", "node-x509-stranger"),
    ];
    env.extend(files.iter().map(|(k, v)| (*k, v.as_str())));
    for transport in ["http", "mqtt", "mqtt-ws"] {
        let mut env = env.clone();
        env.push(("DPS_TRANSPORT", transport));
        let output = run_node("device_x509.js", &server, &env).unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("all checks passed"),
            "node over {transport} failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
            server.log().join("\n")
        );
    }
    let state = cli(&server, &["registration", "show", "node-x509-member"]);
    assert_eq!(state["enrollmentGroupId"], "node-x509-line");
    assert_eq!(state["x509"]["enrollmentGroupId"], "node-x509-line");
}
