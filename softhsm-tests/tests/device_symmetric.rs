//! End to end: the real server and the real device client (`dps-device`), with the device's
//! symmetric key in a file, in an environment variable, and in a SoftHSM2 token where it is used
//! in place; through an individual enrollment and through an enrollment group; over HTTPS and
//! over MQTT.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use softhsm_tests::{ServerProcess, SoftHsm, device_binary, free_port};

struct Setup {
    server: ServerProcess,
    endpoint: String,
    dir: tempfile::TempDir,
}

fn cli(server: &ServerProcess, args: &[&str]) -> Value {
    server.admin_json(args).unwrap()
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let server =
        ServerProcess::start(dir.path(), &["--listen", &format!("127.0.0.1:{port}")], &[]).unwrap();
    cli(&server, &["hub", "set", "hub-a.example.com"]);
    Setup {
        endpoint: format!("https://localhost:{port}"),
        server,
        dir,
    }
}

fn primary_key(enrollment: &Value) -> String {
    enrollment["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned()
}

impl Setup {
    fn device(
        &self,
        id: &str,
        credential: &[&str],
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Output {
        let state = self.dir.path().join(format!("{id}.state.json"));
        let mut command = Command::new(device_binary().unwrap());
        command
            .args([
                "register",
                "--endpoint",
                &self.endpoint,
                "--id-scope",
                &self.server.id_scope,
            ])
            .args([
                "--registration-id",
                id,
                "--ca-cert",
                self.server.ca_certificate.to_str().unwrap(),
            ])
            .args([
                "--state-file",
                state.to_str().unwrap(),
                "--output",
                "json",
                "--timeout",
                "30",
            ])
            .args(credential)
            .args(extra);
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().unwrap()
    }
}

fn assigned(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "dps-device failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn a_file_key_registers_once_and_then_uses_the_state_file() {
    let s = setup();
    let enrollment = cli(
        &s.server,
        &[
            "enrollment",
            "create",
            "dev-file",
            "--device-id",
            "device-file",
        ],
    );
    let key_file = s.dir.path().join("dev-file.key");
    std::fs::write(&key_file, format!("{}\n", primary_key(&enrollment))).unwrap();
    let key = format!("file:{}", key_file.display());

    let first = assigned(&s.device("dev-file", &["--symmetric-key", &key], &[], &[]));
    assert_eq!(first["assignedHub"], "hub-a.example.com");
    assert_eq!(first["deviceId"], "device-file");
    assert_eq!(first["fresh"], true);

    // The next boot reads the state file and does not call the service.
    let Setup {
        server,
        endpoint,
        dir,
    } = s;
    server
        .terminate(std::time::Duration::from_secs(15))
        .unwrap();
    let offline = Setup {
        server: ServerProcess::start(
            dir.path(),
            &["--listen", &format!("127.0.0.1:{}", free_port().unwrap())],
            &[],
        )
        .unwrap(),
        endpoint,
        dir,
    };
    let second = assigned(&offline.device("dev-file", &["--symmetric-key", &key], &[], &[]));
    assert_eq!(second["fresh"], false);
    assert_eq!(second["assignedHub"], "hub-a.example.com");

    // --force registers again; with the service gone it gives up with exit code 5.
    let forced = offline.device(
        "dev-file",
        &["--symmetric-key", &key],
        &["--force", "--timeout", "3"],
        &[],
    );
    assert_eq!(
        forced.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
}

#[test]
fn an_environment_group_key_is_derived_locally() {
    let s = setup();
    let group = cli(&s.server, &["group", "create", "env-line"]);
    let output = s.device(
        "env-member-1",
        &["--group-key", "env:DPS_TEST_GROUP_KEY"],
        &["--payload", r#"{"modelId":"dtmi:test;1"}"#],
        &[("DPS_TEST_GROUP_KEY", Path::new(&primary_key(&group)))],
    );
    let result = assigned(&output);
    assert_eq!(result["assignedHub"], "hub-a.example.com");
    assert_eq!(result["deviceId"], "env-member-1");
    let members = cli(&s.server, &["registration", "list", "--group", "env-line"]);
    assert_eq!(members[0]["registrationId"], "env-member-1");
}

#[test]
fn keys_in_a_softhsm_token_are_used_in_place() {
    let s = setup();
    let hsm = SoftHsm::new().unwrap();
    hsm.init_token("dev-token", "1234").unwrap();
    let pin_file = hsm.pin_file("1234").unwrap();

    // An individual key in the token.
    let enrollment = cli(
        &s.server,
        &[
            "enrollment",
            "create",
            "dev-hsm",
            "--device-id",
            "device-hsm",
        ],
    );
    hsm.import_secret(
        "dev-token",
        "1234",
        "dps-device-key",
        &primary_key(&enrollment),
    )
    .unwrap();
    let uri = "pkcs11:token=dev-token;object=dps-device-key;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so";
    let output = s.device(
        "dev-hsm",
        &["--symmetric-key", uri],
        &["--pin-file", pin_file.to_str().unwrap()],
        &[hsm.env()],
    );
    let result = assigned(&output);
    assert_eq!(result["deviceId"], "device-hsm");
    assert_eq!(result["assignedHub"], "hub-a.example.com");

    // A group key in the token, PIN named in the URI.
    let group = cli(&s.server, &["group", "create", "hsm-line"]);
    hsm.import_secret("dev-token", "1234", "dps-group-key", &primary_key(&group))
        .unwrap();
    let uri = format!(
        "pkcs11:token=dev-token;object=dps-group-key?pin-source=file:{}",
        pin_file.display()
    );
    let result = assigned(&s.device("hsm-member-7", &["--group-key", &uri], &[], &[hsm.env()]));
    assert_eq!(result["deviceId"], "hsm-member-7");

    // A wrong PIN or a missing object is a configuration error (exit 1), not a crash.
    let wrong_pin = s.dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "9999").unwrap();
    let refused = s.device(
        "dev-hsm",
        &[
            "--symmetric-key",
            "pkcs11:token=dev-token;object=dps-device-key",
        ],
        &["--pin-file", wrong_pin.to_str().unwrap(), "--force"],
        &[hsm.env()],
    );
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("logging in"));
    let missing = s.device(
        "dev-hsm",
        &[
            "--symmetric-key",
            "pkcs11:token=dev-token;object=no-such-key",
        ],
        &["--pin-file", pin_file.to_str().unwrap(), "--force"],
        &[hsm.env()],
    );
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn refusals_and_disabled_enrollments_have_their_own_exit_codes() {
    let s = setup();
    cli(
        &s.server,
        &["enrollment", "create", "dev-off", "--disabled"],
    );
    let enrollment = cli(&s.server, &["enrollment", "keys", "dev-off"]);
    let key_file = s.dir.path().join("off.key");
    std::fs::write(
        &key_file,
        enrollment["symmetricKey"]["primaryKey"].as_str().unwrap(),
    )
    .unwrap();
    let disabled = s.device(
        "dev-off",
        &["--symmetric-key", &format!("file:{}", key_file.display())],
        &[],
        &[],
    );
    assert_eq!(
        disabled.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&disabled.stderr)
    );
    assert!(String::from_utf8_lossy(&disabled.stderr).contains("disabled"));

    let wrong = s.dir.path().join("wrong.key");
    std::fs::write(&wrong, attestation_key()).unwrap();
    let refused = s.device(
        "dev-off",
        &["--symmetric-key", &format!("file:{}", wrong.display())],
        &[],
        &[],
    );
    assert_eq!(
        refused.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401002"));

    let bad_source = s.device("dev-off", &["--symmetric-key", "c2VjcmV0"], &[], &[]);
    assert_eq!(bad_source.status.code(), Some(1));
    assert!(
        !String::from_utf8_lossy(&bad_source.stderr).contains("c2VjcmV0"),
        "keys are never echoed"
    );
}

#[test]
fn the_device_client_registers_over_mqtt() {
    let s = setup();
    let mqtt_port = s.server.mqtt_port().unwrap();
    let mqtt = ["--transport", "mqtt", "--mqtt-port", mqtt_port.as_str()];
    let enrollment = cli(
        &s.server,
        &[
            "enrollment",
            "create",
            "dev-mqtt",
            "--device-id",
            "device-mqtt",
        ],
    );
    let key_file = s.dir.path().join("mqtt.key");
    std::fs::write(&key_file, primary_key(&enrollment)).unwrap();
    let key = format!("file:{}", key_file.display());
    let done = assigned(&s.device("dev-mqtt", &["--symmetric-key", &key], &mqtt, &[]));
    assert_eq!(done["assignedHub"], "hub-a.example.com");
    assert_eq!(done["deviceId"], "device-mqtt");
    let state = cli(&s.server, &["registration", "show", "dev-mqtt"]);
    assert_eq!(state["status"], "assigned");
    // The server saw the register request arrive over MQTT, not HTTPS.
    let over_mqtt = |l: &str| {
        [
            "/register",
            "transport=\"mqtt\"",
            "registration_id=\"dev-mqtt\"",
            "status=202",
        ]
        .iter()
        .all(|part| l.contains(part))
    };
    assert!(
        s.server
            .wait_for_log(over_mqtt, std::time::Duration::from_secs(5)),
        "no MQTT register request in the log: {:?}",
        s.server.log()
    );
    // The log goes to a pipe here: no terminal colour codes in it.
    assert!(!s.server.log().iter().any(|l| l.contains('\u{1b}')));
    // Over a WebSocket at the HTTPS endpoint, for networks that pass only 443.
    let again = assigned(&s.device(
        "dev-mqtt",
        &["--symmetric-key", &key],
        &["--transport", "mqtt-ws", "--force"],
        &[],
    ));
    assert_eq!(again["assignedHub"], "hub-a.example.com");

    // A wrong key for the enrolled device is refused with the service's error code, over MQTT
    // too, and its registration state is left as it was.
    let before = cli(&s.server, &["registration", "show", "dev-mqtt"]);
    let wrong = s.dir.path().join("mqtt-wrong.key");
    std::fs::write(&wrong, attestation_key()).unwrap();
    let forced: Vec<&str> = mqtt.iter().copied().chain(["--force"]).collect();
    let refused = s.device(
        "dev-mqtt",
        &["--symmetric-key", &format!("file:{}", wrong.display())],
        &forced,
        &[],
    );
    assert_eq!(
        refused.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401002"));
    assert_eq!(
        cli(&s.server, &["registration", "show", "dev-mqtt"]),
        before
    );
}

fn attestation_key() -> String {
    // 32 bytes of 0x07, base64: a valid key that no enrollment has.
    "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=".into()
}
