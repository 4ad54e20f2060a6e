//! End to end with a real TPM stack: the real server, the real device client (`dps-device
//! --tpm`, tss-esapi) and swtpm. Each test starts its own swtpm with a fresh state directory,
//! so no two tests share a TPM.
//!
//! - An individual enrollment of an EK that tpm2-tools created: the client finds the EK where
//!   the Azure SDKs keep it, creates the SRK, imports the challenge's key, registers, and
//!   persists its hub key; a second registration runs a fresh challenge and replaces the key.
//! - A TPM enrollment group: a TPM manufactured by `swtpm_setup --create-ek-cert` registers under
//!   the id its EK gives it with the EK certificate from NV; a TPM from another manufacturer is
//!   refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use softhsm_tests::swtpm::{EK_HANDLE, Swtpm};
use softhsm_tests::{ServerProcess, device_binary, free_port};

/// The server, started with `config` (TOML) in a directory of its own.
fn server(dir: &Path, config: &str) -> (ServerProcess, String) {
    let file = dir.join("dps.toml");
    std::fs::write(&file, config).unwrap();
    let port = free_port().unwrap();
    let server = ServerProcess::start(
        dir,
        &[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    )
    .unwrap();
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    (server, format!("https://localhost:{port}"))
}

/// Runs `dps-device register --tpm` against `tpm`: (success, JSON output, stderr).
fn register(
    server: &ServerProcess,
    endpoint: &str,
    tpm: &Swtpm,
    extra: &[&str],
) -> (bool, Value, String) {
    let output = Command::new(device_binary().unwrap())
        .args([
            "register",
            "--endpoint",
            endpoint,
            "--id-scope",
            &server.id_scope,
            "--tpm",
            &tpm.tcti(),
            "--state-file",
            tpm.dir().join("state.json").to_str().unwrap(),
            "--ca-cert",
            server.ca_certificate.to_str().unwrap(),
            "--output",
            "json",
            "--timeout",
            "30",
            "--force",
        ])
        .args(extra)
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    (
        output.status.success(),
        serde_json::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap_or(Value::Null),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// TPM2_HMAC of a fixed message with the persisted hub key.
fn hub_key_mac(tpm: &Swtpm) -> Vec<u8> {
    std::fs::write(tpm.dir().join("message.bin"), b"hub token").unwrap();
    tpm.tool(
        "tpm2_hmac",
        &["-c", "0x81000100", "-o", "mac.bin", "message.bin"],
    )
    .unwrap();
    std::fs::read(tpm.dir().join("mac.bin")).unwrap()
}

#[test]
fn a_tpm_registers_through_its_individual_enrollment_twice() {
    let tpm = Swtpm::start().unwrap();
    // The EK, as the device's maker would have created it and read it out for enrollment.
    tpm.tool(
        "tpm2_createek",
        &["-c", EK_HANDLE, "-G", "rsa", "-u", "ek.pub"],
    )
    .unwrap();
    let ek = STANDARD.encode(std::fs::read(tpm.dir().join("ek.pub")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (server, endpoint) = server(dir.path(), "");
    server
        .admin_json(&[
            "enrollment",
            "create",
            "tpm-device-1",
            "--endorsement-key",
            &ek,
        ])
        .unwrap();

    let (ok, done, stderr) = register(
        &server,
        &endpoint,
        &tpm,
        &["--registration-id", "tpm-device-1"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(done["assignedHub"], "hub-a.example.com");
    assert_eq!(done["hubKeyHandle"], "0x81000100");
    let first = hub_key_mac(&tpm);
    assert_eq!(first.len(), 32);

    // The next registration runs a fresh challenge and hands the device a new hub key.
    let (ok, again, stderr) = register(
        &server,
        &endpoint,
        &tpm,
        &["--registration-id", "tpm-device-1"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(again["assignedHub"], "hub-a.example.com");
    assert_ne!(hub_key_mac(&tpm), first);
    let shown = server
        .admin_json(&["registration", "show", "tpm-device-1"])
        .unwrap();
    assert_eq!(shown["status"], "assigned");

    // Another TPM (its own EK) cannot register under this enrollment.
    let other = Swtpm::start().unwrap();
    let (ok, _, stderr) = register(
        &server,
        &endpoint,
        &other,
        &["--registration-id", "tpm-device-1"],
    );
    assert!(!ok);
    assert!(stderr.contains("401002"), "{stderr}");
}

#[test]
fn a_tpm_group_admits_a_device_by_its_ek_certificate() {
    let tpm = Swtpm::start_with_ek_certificate().unwrap();
    let manufacturer = tpm.manufacturer_certificates().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[tpm]\nmanufacturer_certificates = [\"{}\"]\n",
        manufacturer.display()
    );
    let (server, endpoint) = server(dir.path(), &config);
    server
        .admin_json(&["group", "create", "tpm-fleet", "--tpm"])
        .unwrap();

    // No --registration-id: the client derives it from the EK, as the Azure SDKs do.
    let (ok, done, stderr) = register(&server, &endpoint, &tpm, &[]);
    assert!(ok, "{stderr}");
    let id = done["registrationId"].as_str().unwrap();
    assert_eq!(id.len(), 52);
    assert!(id.chars().all(|c| matches!(c, 'a'..='z' | '2'..='7')));
    assert_eq!(done["assignedHub"], "hub-a.example.com");
    let shown = server.admin_json(&["registration", "show", id]).unwrap();
    assert_eq!(shown["enrollmentGroupId"], "tpm-fleet");
    assert_eq!(hub_key_mac(&tpm).len(), 32);

    // A TPM whose EK certificate comes from another manufacturer is refused.
    let stranger = Swtpm::start_with_ek_certificate().unwrap();
    let (ok, _, stderr) = register(&server, &endpoint, &stranger, &[]);
    assert!(!ok);
    assert!(stderr.contains("does not chain"), "{stderr}");
}

/// A process that registers several times with one open TPM (a daemon, say) must not leave a
/// challenge's key loaded after a failure: swtpm without a resource manager has three object
/// slots, so leaked keys would soon make the next import fail.
#[test]
fn failed_registrations_leave_no_key_loaded_in_the_tpm() {
    use device_client::tpm::Tpm;
    use device_client::{Proof, RegisterError, Registration, register};

    let tpm = Swtpm::start().unwrap();
    tpm.tool(
        "tpm2_createek",
        &["-c", EK_HANDLE, "-G", "rsa", "-u", "ek.pub"],
    )
    .unwrap();
    let ek = STANDARD.encode(std::fs::read(tpm.dir().join("ek.pub")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (server, endpoint) = server(dir.path(), "");
    let enroll = |extra: &[&str]| {
        let mut args = vec![
            "enrollment",
            "create",
            "tpm-device-2",
            "--endorsement-key",
            &ek,
            "--force",
        ];
        args.extend_from_slice(extra);
        server.admin_json(&args).unwrap();
    };
    enroll(&["--disabled"]);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let proof = Proof::Tpm(Tpm::open(&tpm.tcti()).unwrap());
    let request = Registration {
        endpoint,
        id_scope: server.id_scope.clone(),
        registration_id: "tpm-device-2".into(),
        ca_cert: Some(server.ca_certificate.clone()),
        payload: None,
        timeout: std::time::Duration::from_secs(30),
        transport: device_client::Transport::Https,
        csr: None,
    };
    for _ in 0..4 {
        let refused = runtime.block_on(register(&request, &proof)).unwrap_err();
        assert!(
            matches!(
                refused,
                RegisterError::Ended {
                    status: "disabled",
                    ..
                }
            ),
            "{refused}"
        );
    }
    enroll(&[]);
    let assigned = runtime.block_on(register(&request, &proof)).unwrap();
    assert_eq!(assigned.hub_key_handle.as_deref(), Some("0x81000100"));
}
