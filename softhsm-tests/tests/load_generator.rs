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

/// A `dps-load serve-ceiling` process, killed on drop.
struct Ceiling {
    child: std::process::Child,
    endpoint: String,
    ca_certificate: String,
    /// The port of its MQTT sessions.
    mqtt_port: String,
}

impl Ceiling {
    fn start(dir: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let port = free_port().unwrap();
        let mqtt_port = free_port().unwrap().to_string();
        let mut child = Command::new(load_binary().unwrap())
            .args([
                "serve-ceiling",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--mqtt-listen",
                &format!("127.0.0.1:{mqtt_port}"),
                "--dir",
            ])
            .arg(dir.join("ceiling"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut field = |name: &str| {
            let line = lines.next().unwrap().unwrap();
            line.strip_prefix(name)
                .unwrap_or_else(|| panic!("{line}"))
                .to_owned()
        };
        let endpoint = field("listening: ");
        assert_eq!(field("mqtt: "), format!("127.0.0.1:{mqtt_port}"));
        let ca_certificate = field("ca-certificate: ");
        Self {
            child,
            endpoint,
            ca_certificate,
            mqtt_port,
        }
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let ceiling = Ceiling::start(dir.path());
    for mode in ["individual", "group", "x509", "tpm"] {
        let load = [
            "--devices",
            "12",
            "--concurrency",
            "4",
            "--mode",
            mode,
            "--poll-ms",
            "20",
        ];
        let service = report(
            &[
                &[
                    "run",
                    "--endpoint",
                    &endpoint,
                    "--connection-string",
                    &server.connection_string,
                    "--id-scope",
                    &server.id_scope,
                    "--ca-cert",
                    &ca,
                    "--cpu-pid",
                    &server.pid().to_string(),
                    "--output",
                    "json",
                ][..],
                &load,
            ]
            .concat(),
        );
        // The server's CPU during the registrations, per registration.
        let cpu = &service["cpu"][0];
        assert_eq!(cpu["of"], format!("pid {}", server.pid()), "{service}");
        assert!(cpu["cpuSecs"].as_f64().unwrap() > 0.0, "{service}");
        assert!(cpu["usPerRegistration"].as_f64().is_some(), "{service}");
        // Against the ceiling process, verifying its certificate and (the light client) not.
        let verified = report(
            &[
                &[
                    "ceiling",
                    "--endpoint",
                    &ceiling.endpoint,
                    "--ca-cert",
                    &ceiling.ca_certificate,
                    "--output",
                    "json",
                ][..],
                &load,
            ]
            .concat(),
        );
        let light = report(
            &[
                &[
                    "ceiling",
                    "--endpoint",
                    &ceiling.endpoint,
                    "--light",
                    "--output",
                    "json",
                ][..],
                &load,
            ]
            .concat(),
        );
        for (target, run) in [
            ("service", &service),
            ("ceiling", &verified),
            ("ceiling", &light),
        ] {
            assert_eq!(run["target"], target, "{mode}: {run}");
            assert_eq!(run["assigned"], 12, "{mode}: {run}");
            assert_eq!(run["errors"], serde_json::json!({}), "{mode}: {run}");
            assert!(run["registrationMs"]["p50"].as_f64().unwrap() > 0.0);
            let (max, p99) = (
                run["registrationMs"]["max"].as_f64().unwrap(),
                run["registrationMs"]["p99"].as_f64().unwrap(),
            );
            assert!(max >= p99, "{mode}: {run}");
        }
    }
    // The symmetric-key and X.509 modes over MQTT, against the service and the ceiling.
    let service_mqtt = server.mqtt_port().unwrap();
    for mode in ["individual", "group", "x509"] {
        let load = [
            "--devices",
            "12",
            "--concurrency",
            "4",
            "--mode",
            mode,
            "--poll-ms",
            "20",
            "--output",
            "json",
        ];
        let service = report(
            &[
                &[
                    "run",
                    "--endpoint",
                    &endpoint,
                    "--connection-string",
                    &server.connection_string,
                    "--id-scope",
                    &server.id_scope,
                    "--ca-cert",
                    &ca,
                    "--mqtt-port",
                    &service_mqtt,
                ][..],
                &load,
            ]
            .concat(),
        );
        let light = report(
            &[
                &[
                    "ceiling",
                    "--endpoint",
                    &ceiling.endpoint,
                    "--light",
                    "--mqtt-port",
                    &ceiling.mqtt_port,
                ][..],
                &load,
            ]
            .concat(),
        );
        for run in [&service, &light] {
            assert_eq!(run["mode"], format!("{mode}-mqtt"), "{run}");
            assert_eq!(run["assigned"], 12, "{mode} over MQTT: {run}");
            assert_eq!(
                run["errors"],
                serde_json::json!({}),
                "{mode} over MQTT: {run}"
            );
        }
    }
    // A run that cannot reach its server reports every device as failed.
    let output = Command::new(load_binary().unwrap())
        .args([
            "ceiling",
            "--endpoint",
            &endpoint.replace(&port.to_string(), "1"),
            "--light",
        ])
        .args(["--devices", "1", "--output", "json"])
        .output()
        .unwrap();
    let failed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(failed["assigned"], 0, "{failed}");
    assert_eq!(failed["errors"]["connect"], 1, "{failed}");
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

    // The registrations are the server's own: 12 devices per run (four modes over HTTPS,
    // three over MQTT) on its one hub.
    let hub = server
        .admin_json(&["hub", "show", "hub-a.example.com"])
        .unwrap();
    assert_eq!(hub["deviceCount"], 84, "{hub}");
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
