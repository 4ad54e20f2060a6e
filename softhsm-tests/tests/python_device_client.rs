//! Interop: the official Python device SDK (`azure-iot-device`'s `ProvisioningDeviceClient`,
//! installed by scripts/test-deps.sh), which provisions only over MQTT, registers devices by
//! symmetric key (an individual enrollment and a group member) and by X.509, over MQTT on
//! `{host}:8883` and over MQTT over WebSockets on `wss://{host}:443/$iothub/websocket`, with
//! TLS 1.2 and the host name checked: the server listens on 127.0.0.1:443 and 127.0.0.1:8883
//! as `localhost`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use softhsm_tests::ServerProcess;

#[test]
fn python_device_sdk_registers_over_mqtt_and_websockets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("interop/python/.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test-deps.sh",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--listen", "127.0.0.1:443"],
        &[("DPS_MQTT_LISTEN", "127.0.0.1:8883")],
    )
    .unwrap();
    let cli = |args: &[&str]| -> Value { server.admin_json(args).unwrap() };
    cli(&["hub", "set", "hub-a.example.com"]);
    let key = |v: &Value| {
        v["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let individual = key(&cli(&["enrollment", "create", "python-device-1"]));
    let group = key(&cli(&["group", "create", "python-line"]));

    // A self-signed device certificate, enrolled individually.
    let device_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "python-x509-1");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&device_key).unwrap();
    let cert_file = dir.path().join("device.pem");
    let key_file = dir.path().join("device.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, device_key.serialize_pem()).unwrap();
    cli(&[
        "enrollment",
        "create",
        "python-x509-1",
        "--certificate",
        cert_file.to_str().unwrap(),
    ]);

    for websockets in ["0", "1"] {
        let output = Command::new("timeout")
            .args(["--kill-after=5", "180"])
            .arg(&python)
            .arg(root.join("interop/python/device.py"))
            .env("DPS_WEBSOCKETS", websockets)
            .env("DPS_HOST", "localhost")
            .env("DPS_ID_SCOPE", &server.id_scope)
            .env("DPS_CA_CERT", &server.ca_certificate)
            .env("DPS_EXPECTED_HUB", "hub-a.example.com")
            .env("DPS_INDIVIDUAL_ID", "python-device-1")
            .env("DPS_INDIVIDUAL_KEY", &individual)
            .env("DPS_GROUP_KEY", &group)
            .env("DPS_X509_ID", "python-x509-1")
            .env("DPS_X509_CERT", &cert_file)
            .env("DPS_X509_KEY", &key_file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("all checks passed"),
            "python (websockets={websockets}) failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
            server.log().join("\n")
        );
    }
    let state = cli(&["registration", "show", "python-x509-1"]);
    assert_eq!(state["assignedHub"], "hub-a.example.com");
}
