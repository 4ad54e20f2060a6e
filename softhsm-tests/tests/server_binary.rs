//! The real `dps-server` binary: start-up on the embedded default, configuration layering,
//! graceful shutdown, PostgreSQL by flag, and the admin CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use softhsm_tests::{ServerProcess, admin, free_port};

#[test]
fn serve_without_configuration_starts_on_the_embedded_default_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let server = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();

    assert!(
        server.id_scope.starts_with("0ne") && server.id_scope.len() == 11,
        "{}",
        server.id_scope
    );
    assert!(
        server.connection_string.starts_with(&format!(
            "HostName=localhost:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
        )),
        "{}",
        server.connection_string
    );
    let data = dir.path().canonicalize().unwrap().join("dps-data");
    assert_eq!(server.ca_certificate, data.join("tls/ca.pem"));
    assert!(data.join("dps.sqlite").exists());
    let ca = std::fs::read(&server.ca_certificate).unwrap();

    let status = server.terminate(Duration::from_secs(15)).unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the server cleanly: {status}"
    );

    let again = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();
    assert_eq!(
        std::fs::read(&again.ca_certificate).unwrap(),
        ca,
        "the CA is reused"
    );
}

#[test]
fn restart_keeps_the_scope_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let first = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();
    let (scope, connection) = (first.id_scope.clone(), first.connection_string.clone());
    first.terminate(Duration::from_secs(15)).unwrap();
    let second = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();
    assert_eq!(second.id_scope, scope);
    assert_eq!(second.connection_string, connection);
}

#[test]
fn file_environment_and_flags_layer_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port) = (free_port().unwrap(), free_port().unwrap());
    let config = dir.path().join("dps.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{file_port}"
data_dir = "from-file"

[[instances]]
name = "plant"
id_scope = "0ne00000A1B"
host_names = ["plant.example.com"]
linked_hubs = [{{ hostName = "hub-a.example.com", allocationWeight = 7 }}]
"#
        ),
    )
    .unwrap();
    let env_listen = format!("127.0.0.1:{env_port}");
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            "from-flag",
        ],
        &[("DPS_LISTEN", &env_listen), ("DPS_LOG__FORMAT", "json")],
    )
    .unwrap();
    assert_eq!(
        server.listening,
        format!("https://{env_listen}"),
        "env beats the file"
    );
    assert!(
        dir.path().join("from-flag/dps.sqlite").exists(),
        "the flag beats the file"
    );
    assert!(!dir.path().join("from-file").exists());
    assert_eq!(server.id_scope, "0ne00000A1B");
    assert!(
        server
            .connection_string
            .starts_with("HostName=plant.example.com;")
    );
    assert!(
        server.wait_for_log(
            |l| l.starts_with('{') && l.contains("\"listening\""),
            Duration::from_secs(10)
        ),
        "no JSON log line: {:?}",
        server.log()
    );

    // The hub from the file is there; the admin CLI reaches it by endpoint.
    let (ok, out, err) = admin(
        &[
            "--endpoint",
            &server.listening,
            "--output",
            "json",
            "hub",
            "list",
        ],
        &[
            ("DPS_CONNECTION_STRING", &server.connection_string),
            ("DPS_CA_CERT", server.ca_certificate.to_str().unwrap()),
        ],
    )
    .unwrap();
    assert!(ok, "{err}");
    let hubs: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(hubs[0]["hostName"], "hub-a.example.com");
    assert_eq!(hubs[0]["allocationWeight"], 7);
}

#[test]
fn instances_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let server = ServerProcess::start(
        dir.path(),
        &["--listen", &listen],
        &[(
            "DPS_INSTANCES",
            r#"[{name = "edge", host_names = ["edge.example.com"], id_scope = "0ne0000E0E0"}]"#,
        )],
    )
    .unwrap();
    assert_eq!(server.id_scope, "0ne0000E0E0");
    assert!(
        server
            .connection_string
            .starts_with("HostName=edge.example.com;")
    );
}

#[test]
fn a_bad_configuration_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dps.toml");
    std::fs::write(&config, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let output = Command::new(softhsm_tests::server_binary().unwrap())
        .args(["serve", "--config", config.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lisen"), "{stderr}");
}

#[test]
fn serve_on_postgresql_by_flag() {
    let url = softhsm_tests::fresh_postgres_database("dps_cli").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let server = ServerProcess::start(
        dir.path(),
        &["--listen", &listen, "--database-url", &url],
        &[],
    )
    .unwrap();
    assert!(
        !dir.path().join("dps-data/dps.sqlite").exists(),
        "no SQLite file on PostgreSQL"
    );
    let tables = Command::new("psql")
        .args([&url, "-tAc", "SELECT count(*) FROM instances"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&tables.stdout).trim(), "1");
    drop(server);
}

fn cli(server: &ServerProcess, args: &[&str]) -> (bool, String, String) {
    let ca = server.ca_certificate.to_str().unwrap().to_owned();
    admin(
        args,
        &[
            ("DPS_CONNECTION_STRING", server.connection_string.as_str()),
            ("DPS_CA_CERT", ca.as_str()),
        ],
    )
    .unwrap()
}

fn cli_json(server: &ServerProcess, args: &[&str]) -> Value {
    server.admin_json(args).unwrap()
}

#[test]
fn admin_cli_manages_enrollments_hubs_policies_and_instances() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let server = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();

    let hub = cli_json(
        &server,
        &[
            "hub",
            "set",
            "hub-a.example.com",
            "--weight",
            "3",
            "--region",
            "eu-west",
            "--latitude",
            "-33.9",
            "--longitude",
            "18.4",
        ],
    );
    assert_eq!(hub["allocationWeight"], 3);
    assert_eq!(hub["latitude"], -33.9);

    let created = cli_json(
        &server,
        &[
            "enrollment",
            "create",
            "dev-1",
            "--hub",
            "hub-a.example.com",
            "--allocation-policy",
            "static",
        ],
    );
    assert!(created["attestation"]["symmetricKey"]["primaryKey"].is_string());
    let (ok, _, err) = cli(&server, &["enrollment", "create", "dev-1"]);
    assert!(
        !ok && err.contains("409001"),
        "a second create is a conflict: {err}"
    );
    let forced = cli_json(
        &server,
        &["enrollment", "create", "dev-1", "--force", "--disabled"],
    );
    assert_eq!(forced["provisioningStatus"], "disabled");

    let (ok, table, _) = cli(&server, &["enrollment", "list"]);
    assert!(ok);
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap().starts_with("REGISTRATIONID"),
        "{table}"
    );
    assert!(lines.next().unwrap().starts_with("dev-1 "), "{table}");

    let (ok, shown, _) = cli(&server, &["enrollment", "show", "dev-1"]);
    assert!(
        ok && shown.contains("registrationId") && shown.contains("dev-1"),
        "{shown}"
    );
    assert!(!shown.contains("primaryKey"), "show hides keys: {shown}");
    let keys = cli_json(&server, &["enrollment", "keys", "dev-1"]);
    assert_eq!(
        keys["symmetricKey"]["primaryKey"],
        created["attestation"]["symmetricKey"]["primaryKey"]
    );

    let certificate = dir.path().join("root.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Line Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&certificate, params.self_signed(&key).unwrap().pem()).unwrap();
    let group = cli_json(
        &server,
        &[
            "group",
            "create",
            "line-7",
            "--certificate",
            certificate.to_str().unwrap(),
        ],
    );
    assert_eq!(
        group["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"],
        "CN=Line Root"
    );
    assert_eq!(
        cli_json(&server, &["group", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        cli_json(&server, &["registration", "list", "--group", "line-7"]),
        Value::Array(vec![])
    );

    let policy = cli_json(
        &server,
        &[
            "policy",
            "set",
            "reader",
            "--rights",
            "EnrollmentRead,RegistrationStatusRead",
        ],
    );
    assert!(
        policy.get("primaryKey").is_none(),
        "policy set does not print keys"
    );
    let reader = cli_json(&server, &["connection-string", "--policy", "reader"]);
    let reader = reader["connectionString"].as_str().unwrap().to_owned();
    assert!(reader.contains("SharedAccessKeyName=reader;SharedAccessKey="));
    let (ok, _, err) = admin(
        &["enrollment", "delete", "dev-1"],
        &[
            ("DPS_CONNECTION_STRING", reader.as_str()),
            ("DPS_CA_CERT", server.ca_certificate.to_str().unwrap()),
        ],
    )
    .unwrap();
    assert!(
        !ok && err.contains("403001"),
        "the reader may not delete: {err}"
    );
    // A token for curl: it authenticates a plain HTTPS request.
    let (ok, token, _) = cli(&server, &["token", "--lifetime", "600"]);
    assert!(
        ok && token.starts_with("SharedAccessSignature sr=localhost"),
        "{token}"
    );
    let curl = Command::new("curl")
        .args([
            "-sf",
            "--cacert",
            server.ca_certificate.to_str().unwrap(),
            "-H",
        ])
        .arg(format!("Authorization: {}", token.trim()))
        .arg(format!(
            "{}/enrollments/dev-1",
            server.listening.replace("127.0.0.1", "localhost")
        ))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let via_curl: Value = serde_json::from_slice(&curl.stdout).unwrap();
    assert_eq!(via_curl["registrationId"], "dev-1");
    let owner = cli_json(&server, &["connection-string"]);
    assert_eq!(owner["connectionString"], server.connection_string.as_str());

    let (ok, out, err) = cli(
        &server,
        &[
            "instance",
            "create",
            "factory",
            "--host-name",
            "factory.example.com",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("id-scope: 0ne"), "{out}");
    assert!(out.contains("service-connection-string: HostName=factory.example.com;SharedAccessKeyName=provisioningserviceowner;"), "{out}");
    let instances = cli_json(&server, &["instance", "list"]);
    assert_eq!(instances.as_array().unwrap().len(), 2);
    let (ok, _, err) = cli(&server, &["--instance", "factory", "hub", "list"]);
    assert!(
        !ok && err.contains("401002"),
        "the factory only takes its own keys: {err}"
    );

    cli_json(&server, &["enrollment", "delete", "dev-1"]);
    let (ok, _, err) = cli(&server, &["enrollment", "show", "dev-1"]);
    assert!(!ok && err.contains("404201"), "{err}");
    // Who did what to the enrollment: the audit log.
    let audit = cli_json(
        &server,
        &[
            "audit",
            "list",
            "--resource-kind",
            "enrollment",
            "--resource-id",
            "dev-1",
        ],
    );
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["create", "update", "readKeys", "delete"],
        "{audit}"
    );
    assert!(audit[0]["policy"] == "provisioningserviceowner", "{audit}");
    let (ok, table, _) = cli(
        &server,
        &["audit", "list", "--policy", "provisioningserviceowner"],
    );
    assert!(
        ok && table.lines().next().unwrap().starts_with("TIME"),
        "{table}"
    );
    cli_json(&server, &["instance", "delete", "factory"]);
    cli_json(&server, &["hub", "delete", "hub-a.example.com"]);

    let (ok, _, err) = admin(
        &["enrollment", "list"],
        &[("DPS_CONNECTION_STRING", "garbage")],
    )
    .unwrap();
    assert!(!ok && err.contains("connection-string"), "{err}");
    assert!(Path::new(&server.ca_certificate).exists());
}

#[test]
fn admin_cli_imports_and_transfers_ownership() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let server = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();
    for hub in ["hub-a.example.com", "hub-b.example.com"] {
        cli_json(&server, &["hub", "set", hub]);
    }
    let owner = cli_json(
        &server,
        &["owner", "set", "acme", "--hub", "hub-a.example.com"],
    );
    assert_eq!(owner["hubs"], serde_json::json!(["hub-a.example.com"]));
    cli_json(
        &server,
        &["owner", "set", "globex", "--hub", "hub-b.example.com"],
    );

    let ledger = dir.path().join("sales.csv");
    std::fs::write(&ledger, "registrationId,owner\ndev-1,acme\ndev-2,acme\n").unwrap();
    let imported = cli_json(&server, &["ownership", "import", ledger.to_str().unwrap()]);
    assert_eq!(imported["records"], 2);
    let serials = dir.path().join("serials.txt");
    std::fs::write(
        &serials,
        "{\"certificateSerial\":\"0a:0b\",\"owner\":\"globex\"}\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&server, &["ownership", "import", serials.to_str().unwrap()]);
    assert!(!ok && err.contains("--format"), "{err}");
    let imported = cli_json(
        &server,
        &[
            "ownership",
            "import",
            serials.to_str().unwrap(),
            "--format",
            "jsonl",
        ],
    );
    assert_eq!(imported["records"], 1);

    let moved = cli_json(
        &server,
        &[
            "ownership",
            "transfer",
            "--from",
            "acme",
            "--to",
            "globex",
            "dev-2",
        ],
    );
    assert_eq!(moved["transferred"], 1);
    let shown = cli_json(&server, &["ownership", "show", "registration-id", "dev-2"]);
    assert_eq!(shown["owner"], "globex");
    let by_serial = cli_json(&server, &["ownership", "show", "certificate-serial", "A0B"]);
    assert_eq!(by_serial["owner"], "globex");
    let (ok, table, _) = cli(&server, &["owner", "list"]);
    assert!(ok, "{table}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(
        rows[0].starts_with("acme ") && rows[0].trim_end().ends_with(" 1"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("globex ") && rows[1].trim_end().ends_with(" 2"),
        "{table}"
    );
    let devices = cli_json(&server, &["owner", "devices", "globex"]);
    assert_eq!(devices.as_array().unwrap().len(), 2);
    let (ok, _, err) = cli(&server, &["owner", "delete", "globex"]);
    assert!(!ok && err.contains("409002"), "{err}");
}

/// `dps-admin` is the same CLI as `dps-server admin`, on its own.
#[test]
fn the_standalone_admin_cli_is_the_same_cli() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let server = ServerProcess::start(dir.path(), &["--listen", &listen], &[]).unwrap();
    let ca = server.ca_certificate.to_string_lossy().into_owned();
    let output = Command::new(softhsm_tests::admin_binary().unwrap())
        .args([
            "--output",
            "json",
            "hub",
            "set",
            "hub-z.example.com",
            "--weight",
            "7",
        ])
        .env("DPS_CONNECTION_STRING", &server.connection_string)
        .env("DPS_CA_CERT", &ca)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let hub: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(hub["allocationWeight"], 7);
    // What one wrote, the other reads.
    let hubs = server.admin_json(&["hub", "list"]).unwrap();
    assert_eq!(hubs[0]["hostName"], "hub-z.example.com");
}
