//! Test harness: a real server (in process) on an ephemeral port, with a temporary data
//! directory, on SQLite or on a fresh PostgreSQL database, and an HTTPS client that trusts
//! its generated CA and signs SAS tokens like the Azure service clients do.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::sas::sign;
use attestation::{ConnectionString, SymmetricKey};
use dps_server::config::Config;
use dps_server::server::{self, RunningServer};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection};
use tempfile::TempDir;

/// The two storage backends every storage-touching test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async scenario `fn(Backend)` once per backend, as two tests.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$scenario($crate::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The PostgreSQL server URL tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("DPS_TEST_DATABASE_URL").expect(
        "DPS_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh, which starts \
         PostgreSQL, or point it at a PostgreSQL server where you may create databases",
    )
}

/// A database URL for a fresh, empty database on `backend`.
pub async fn fresh_database(backend: Backend, dir: &TempDir) -> String {
    match backend {
        Backend::Sqlite => format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("test.sqlite").display()
        ),
        Backend::Postgres => {
            let admin = postgres_admin_url();
            let pid = std::process::id();
            let name = format!("dps_test_{pid}_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
            REAPED
                .get_or_init(|| drop_abandoned_databases(&mut conn))
                .await;
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .unwrap();
            let base = admin.rsplit_once('/').unwrap().0;
            format!("{base}/{name}")
        }
    }
}

/// Set once this process has dropped the databases of test processes that ended.
static REAPED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Drops the test databases whose process (the pid in their name) is no longer running: a
/// test cannot drop its own database when it ends (no async drop), so each test process
/// drops those of the ones before it, and a long-lived machine does not fill its disk.
async fn drop_abandoned_databases(conn: &mut sqlx::PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'dps\\_test\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    for name in names {
        let pid = name
            .strip_prefix("dps_test_")
            .and_then(|rest| rest.split_once('_'))
            .map(|(pid, _)| pid);
        let running = pid.is_some_and(|pid| std::path::Path::new("/proc").join(pid).exists());
        let safe = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !running && safe {
            // Another process may be dropping it too, or a server still connected: skip.
            let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                .execute(&mut *conn)
                .await;
        }
    }
}

/// A running server and a client for it.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: TempDir,
    pub config: Config,
    pub http: reqwest::Client,
    pub base: String,
    pub owner: ConnectionString,
}

impl TestServer {
    /// A server with the embedded defaults on `backend`.
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// A server whose configuration `adjust` may change first.
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            database_url: Some(fresh_database(backend, &dir).await),
            ..Config::default()
        };
        config.limits.shutdown_grace_secs = 5;
        // Simulated hubs and webhooks (wiremock) listen on loopback.
        config.outbound.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
        config.metrics_listen = "127.0.0.1:0".parse().unwrap();
        // Tests run side by side: no MQTT listener unless a test asks for one (on port 0).
        config.mqtt_listen = Some("off".into());
        adjust(&mut config);
        Self::launch(dir, config).await
    }

    async fn launch(dir: TempDir, config: Config) -> Self {
        let server = server::start(config.clone()).await.unwrap();
        let http = client_of(&server, None);
        let base = format!("https://localhost:{}", server.local_addr.port());
        let owner = server.admin.connection_string.clone();
        Self {
            server: Some(server),
            dir,
            config,
            http,
            base,
            owner,
        }
    }

    /// A second server on the same database (a replica behind the same load balancer), with
    /// a data directory of its own.
    pub async fn replica(&self) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = self.config.clone();
        config.data_dir = dir.path().join("data");
        // The same development CA, so that one client trusts both.
        let tls = self.config.data_dir.join("tls");
        config.tls.cert = Some(tls.join("server.pem"));
        config.tls.key = Some(tls.join("server-key.pem"));
        config.tls.ca_cert = Some(tls.join("ca.pem"));
        Self::launch(dir, config).await
    }

    /// Stops the server and starts it again on the same data (and database).
    pub async fn restart(mut self) -> Self {
        self.server.take().unwrap().shutdown().await;
        let config = self.config.clone();
        Self::launch(self.dir, config).await
    }

    pub fn running(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    /// The text of `/metrics`, from the metrics listener.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.running().metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// An HTTPS client whose connections come from `local` (any 127.0.0.0/8 address on
    /// Linux), so that a test can play several source addresses.
    pub fn client_from(&self, local: std::net::IpAddr) -> reqwest::Client {
        client_of(self.running(), Some(local))
    }

    /// A request without credentials (`path` may carry a query of its own).
    pub fn anonymous(&self, method: Method, path: &str) -> RequestBuilder {
        let joiner = if path.contains('?') { '&' } else { '?' };
        self.http.request(
            method,
            format!("{}{path}{joiner}api-version=2021-10-01", self.base),
        )
    }

    /// A request signed with the owner policy.
    pub fn owner(&self, method: Method, path: &str) -> RequestBuilder {
        self.signed(
            method,
            path,
            &self.owner.key_name,
            &self.owner.key.to_base64(),
        )
    }

    /// A request signed with the named policy's base64 key.
    pub fn signed(&self, method: Method, path: &str, policy: &str, key: &str) -> RequestBuilder {
        self.anonymous(method, path).header(
            "Authorization",
            token(&self.owner.host_name, policy, key, 3600),
        )
    }

    /// Creates a linked hub through the API.
    pub async fn link_hub(&self, host: &str) {
        let response = self
            .owner(Method::PUT, &format!("/linkedHubs/{host}"))
            .json(&serde_json::json!({ "hostName": host }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
}

fn client_of(server: &RunningServer, local: Option<std::net::IpAddr>) -> reqwest::Client {
    let ca = std::fs::read(&server.ca_certificate).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .local_address(local)
        .build()
        .unwrap()
}

/// A SAS token for `resource`, valid `lifetime` seconds from now (negative: expired).
pub fn token(resource: &str, policy: &str, key_b64: &str, lifetime: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let key = attestation::SymmetricKey::from_base64(key_b64).unwrap();
    sign(resource, &key, (now + lifetime) as u64, Some(policy))
}

/// The JSON body of a response, after checking its status.
pub async fn expect_json(response: Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "unexpected status; body: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "content type {content_type:?}"
    );
    serde_json::from_str(&text).unwrap()
}

/// Checks an error answer: status, error code in body and header, a message and tracking id.
pub async fn expect_error(response: Response, status: u16, code: u32) -> Value {
    let header = response
        .headers()
        .get("x-ms-error-code")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = expect_json(response, status).await;
    assert_eq!(body["errorCode"], code, "{body}");
    assert_eq!(header.as_deref(), Some(code.to_string().as_str()));
    assert!(!body["message"].as_str().unwrap().is_empty());
    assert!(!body["trackingId"].as_str().unwrap().is_empty());
    body
}

/// Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A device token as the Node symmetric-key client builds it: raw `sr`, `skn=registration`.
pub fn device_token(scope: &str, id: &str, key: &SymmetricKey) -> String {
    sign(
        &format!("{scope}/registrations/{id}"),
        key,
        now() + 3600,
        Some("registration"),
    )
}

/// A device registering with the test server.
pub struct Device<'a> {
    pub t: &'a TestServer,
    pub scope: String,
    pub id: String,
}

impl<'a> Device<'a> {
    pub fn new(t: &'a TestServer, id: &str) -> Self {
        Self {
            t,
            scope: t.running().admin.id_scope.clone(),
            id: id.to_owned(),
        }
    }

    pub fn put(&self, token: &str) -> reqwest::RequestBuilder {
        self.t
            .anonymous(
                Method::PUT,
                &format!("/{}/registrations/{}/register", self.scope, self.id),
            )
            .header("Authorization", token)
            .json(&json!({ "registrationId": self.id }))
    }

    /// Registers and polls until the operation ends; returns the final operation status body.
    pub async fn register(&self, token: &str) -> Value {
        self.register_with(token, json!({ "registrationId": self.id }), &[])
            .await
    }

    /// Like [`Device::register`], with a request body and extra headers of the caller's.
    pub async fn register_with(&self, token: &str, body: Value, headers: &[(&str, &str)]) -> Value {
        let mut put = self.put(token).json(&body);
        for (name, value) in headers {
            put = put.header(*name, *value);
        }
        let response = put.send().await.unwrap();
        assert_eq!(response.headers()["retry-after"], "1");
        let accepted = expect_json(response, 202).await;
        assert_eq!(accepted["status"], "assigning");
        let operation = accepted["operationId"].as_str().unwrap().to_owned();
        assert!(
            operation
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        );
        for _ in 0..100 {
            let response = self
                .t
                .anonymous(
                    Method::GET,
                    &format!(
                        "/{}/registrations/{}/operations/{operation}",
                        self.scope, self.id
                    ),
                )
                .header("Authorization", token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                202 => {
                    let body = expect_json(response, 202).await;
                    assert_eq!(
                        body["registrationState"]["registrationId"],
                        self.id.as_str()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => return expect_json(response, 200).await,
            }
        }
        panic!("the operation did not finish");
    }
}

/// Creates or replaces an enrollment or group (`If-Match: *`).
pub async fn enroll(t: &TestServer, body: Value) -> Value {
    let (path, id) = match body.get("registrationId") {
        Some(id) => ("enrollments", id.as_str().unwrap().to_owned()),
        None => (
            "enrollmentGroups",
            body["enrollmentGroupId"].as_str().unwrap().to_owned(),
        ),
    };
    expect_json(
        t.owner(Method::PUT, &format!("/{path}/{id}"))
            .header("If-Match", "*")
            .json(&body)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await
}

/// The primary and secondary keys of an enrollment answer.
pub fn keys_of(enrollment: &Value) -> (SymmetricKey, SymmetricKey) {
    let keys = &enrollment["attestation"]["symmetricKey"];
    (
        SymmetricKey::from_base64(keys["primaryKey"].as_str().unwrap()).unwrap(),
        SymmetricKey::from_base64(keys["secondaryKey"].as_str().unwrap()).unwrap(),
    )
}

/// An HTTPS client presenting `chain` (leaf first) with `key`.
pub fn mtls_client(t: &TestServer, chain: &[&str], key: &str, tls12: bool) -> reqwest::Client {
    let ca = std::fs::read(&t.running().ca_certificate).unwrap();
    let identity = format!("{}{key}", chain.concat());
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
    if tls12 {
        builder = builder.tls_version_max(reqwest::tls::Version::TLS_1_2);
    }
    builder.build().unwrap()
}

pub fn x509_device_url(t: &TestServer, id: &str, rest: &str) -> String {
    format!(
        "https://localhost:{}/{}/registrations/{id}{rest}?api-version=2021-06-01",
        t.running().local_addr.port(),
        t.running().admin.id_scope
    )
}

/// Registers `id` over `client` (a device presenting its certificate) and polls to the end; the final status body, or the error
/// answer of the PUT.
pub async fn register_over(t: &TestServer, client: &reqwest::Client, id: &str) -> (u16, Value) {
    let response = client
        .put(x509_device_url(t, id, "/register"))
        .json(&json!({ "registrationId": id }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status != 202 {
        return (status, body);
    }
    let operation = body["operationId"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        let polled = client
            .get(x509_device_url(t, id, &format!("/operations/{operation}")))
            .send()
            .await
            .unwrap();
        let status = polled.status().as_u16();
        let body: Value = polled.json().await.unwrap();
        if status != 202 {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the operation did not finish");
}

/// A DER certificate as PEM.
pub fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A self-signed issuing CA with a key of `alg`, written to PEM files in `dir` as the server's
/// `[issuance]` configuration names them; returns its certificate (PEM) and that entry.
pub fn issuing_ca_files(
    dir: &std::path::Path,
    alg: &'static rcgen::SignatureAlgorithm,
) -> (String, dps_server::config::IssuingCaConfig) {
    issuing_ca_files_named(dir, alg, "Operational CA")
}

/// [`issuing_ca_files`] with the common name `cn`.
pub fn issuing_ca_files_named(
    dir: &std::path::Path,
    alg: &'static rcgen::SignatureAlgorithm,
    cn: &str,
) -> (String, dps_server::config::IssuingCaConfig) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    let chain = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    std::fs::write(&chain, &pem).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        pem,
        dps_server::config::IssuingCaConfig {
            certificate_chain: chain,
            key: key_path.display().to_string(),
        },
    )
}

/// The registration state the admin API shows for `id`; none when there is none (404).
pub async fn registration_state(t: &TestServer, id: &str) -> Option<Value> {
    let response = t
        .owner(Method::GET, &format!("/registrations/{id}"))
        .send()
        .await
        .unwrap();
    match response.status().as_u16() {
        404 => None,
        _ => Some(expect_json(response, 200).await),
    }
}

/// Creates a shared access policy `name` with only `rights`; returns its primary key (for
/// [`TestServer::signed`]).
pub async fn policy_with(t: &TestServer, name: &str, rights: &[&str]) -> String {
    let created = expect_json(
        t.owner(Method::PUT, &format!("/accessPolicies/{name}"))
            .json(&json!({ "keyName": name, "rights": rights }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    created["primaryKey"].as_str().unwrap().to_owned()
}
