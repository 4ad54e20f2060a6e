//! Black-box test harness: starts the real `dps-server` binary, waits until it prints what an
//! operator needs (`id-scope`, `service-connection-string`, `ca-certificate`, `listening`),
//! and stops it on drop.
//!
//! The binary is `DPS_SERVER_BIN` when set, else `dps-server` in the same target directory as
//! the test executable (`cargo test --workspace` builds it).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod swtpm;

/// How long a server may take to print its start-up lines.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `dps-server` binary under test.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("dps-server", "DPS_SERVER_BIN")
}

/// The `dps-device` binary under test.
pub fn device_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("dps-device", "DPS_DEVICE_BIN")
}

/// The standalone admin CLI, `dps-admin`.
pub fn admin_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("dps-admin", "DPS_ADMIN_BIN")
}

/// The `dps-load` load generator.
pub fn load_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("dps-load", "DPS_LOAD_BIN")
}

/// A binary of the workspace: `$override_var` when set, else the one in the same target
/// directory as the test executable (`cargo build --workspace --bins` puts it there).
fn workspace_binary(name: &str, override_var: &str) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(override_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target directory")?;
    let candidate = dir.join(name);
    if !candidate.exists() {
        bail!(
            "{} does not exist: build it (cargo build --workspace --bins) or set {override_var}",
            candidate.display()
        );
    }
    Ok(candidate)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running `dps-server serve` and what it printed.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// The admin instance's ID scope.
    pub id_scope: String,
    /// The printed service connection string.
    pub connection_string: String,
    /// The printed CA certificate path.
    pub ca_certificate: PathBuf,
    /// The printed listening URL (`https://127.0.0.1:PORT`).
    pub listening: String,
    /// The printed MQTT address (`127.0.0.1:PORT`), when the MQTT listener is on.
    pub mqtt: Option<String>,
    stderr: mpsc::Receiver<String>,
    seen: std::sync::Mutex<Vec<String>>,
}

impl ServerProcess {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port of the printed MQTT address.
    pub fn mqtt_port(&self) -> anyhow::Result<String> {
        self.mqtt
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .map(|(_, port)| port.to_owned())
            .context("the server printed no MQTT address")
    }

    /// Runs `dps-server serve ARGS` in `cwd` with `env`, and waits for its start-up lines.
    pub fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut command = Command::new(server_binary()?);
        command
            .arg("serve")
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            // Tests start servers side by side: each metrics and MQTT listener on a port of
            // its own.
            .env("DPS_METRICS_LISTEN", "127.0.0.1:0")
            .env("DPS_MQTT_LISTEN", "127.0.0.1:0");
        // The tests' own knobs (`DPS_FUZZ_SEED`, ...) are not the server's configuration, which
        // refuses unknown `DPS_` variables.
        for (name, _) in std::env::vars() {
            if name.starts_with("DPS_FUZZ_") {
                command.env_remove(name);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().context("starting dps-server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (lines_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if err_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let (mut id_scope, mut connection_string, mut ca_certificate) = (None, None, None);
        let mut mqtt = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let log: Vec<String> = err_rx.try_iter().collect();
                    bail!("dps-server did not start; its log:\n{}", log.join("\n"));
                }
            };
            if let Some(v) = line.strip_prefix("id-scope: ") {
                id_scope = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("service-connection-string: ") {
                connection_string = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("ca-certificate: ") {
                ca_certificate = Some(PathBuf::from(v));
            } else if let Some(v) = line.strip_prefix("mqtt: mqtts://") {
                mqtt = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("listening: ") {
                return Ok(Self {
                    child,
                    id_scope: id_scope.context("no id-scope line")?,
                    connection_string: connection_string.context("no connection string line")?,
                    ca_certificate: ca_certificate.context("no ca-certificate line")?,
                    listening: v.to_owned(),
                    mqtt,
                    stderr: err_rx,
                    seen: std::sync::Mutex::new(Vec::new()),
                });
            }
        }
    }

    /// Runs `dps-server admin --output json ARGS` with this server's connection string and CA,
    /// and returns the JSON it prints (panics with the error output when the command fails).
    pub fn admin_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let ca = self.ca_certificate.to_string_lossy().into_owned();
        let (ok, out, err) = admin(
            &all,
            &[
                ("DPS_CONNECTION_STRING", self.connection_string.as_str()),
                ("DPS_CA_CERT", ca.as_str()),
            ],
        )?;
        if !ok {
            bail!("dps-server admin {args:?} failed: {err}");
        }
        serde_json::from_str(&out).with_context(|| format!("{args:?} printed no JSON: {out}"))
    }

    /// The server's log lines so far.
    pub fn log(&self) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.extend(self.stderr.try_iter());
        seen.clone()
    }

    /// Waits up to `timeout` for a log line matching `wanted` (the log reader runs on its own
    /// thread, so a line may arrive after the start-up output).
    pub fn wait_for_log(&self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().iter().any(|line| wanted(line)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status (killing it after `timeout`).
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("dps-server did not stop within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `dps-server admin ARGS` and returns (exit success, stdout, stderr).
pub fn admin(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String, String)> {
    let mut command = Command::new(server_binary()?);
    command.arg("admin").args(args).stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().context("running dps-server admin")?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A SoftHSM2 token directory of its own: processes that get `env()` see only its tokens.
#[derive(Debug)]
pub struct SoftHsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl SoftHsm {
    /// A fresh token directory with its configuration file.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("tokens"))?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )?;
        Ok(Self { dir, conf })
    }

    /// The environment a process needs to see these tokens.
    pub fn env(&self) -> (&'static str, &Path) {
        ("SOFTHSM2_CONF", &self.conf)
    }

    /// Initialises a token with a user PIN.
    pub fn init_token(&self, label: &str, pin: &str) -> anyhow::Result<()> {
        let status = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                "12345678",
                "--pin",
                pin,
            ])
            .env("SOFTHSM2_CONF", &self.conf)
            .stdout(Stdio::null())
            .status()
            .context("running softhsm2-util (apt-get install softhsm2)")?;
        if !status.success() {
            bail!("softhsm2-util --init-token failed: {status}");
        }
        Ok(())
    }

    /// Imports a base64 secret as a non-extractable HMAC key labelled `label`.
    pub fn import_secret(
        &self,
        token: &str,
        pin: &str,
        label: &str,
        base64: &str,
    ) -> anyhow::Result<()> {
        let status = Command::new(workspace_binary(
            "softhsm-import-secret",
            "SOFTHSM_IMPORT_BIN",
        )?)
        .args([token, pin, label, base64])
        .env("SOFTHSM2_CONF", &self.conf)
        .status()?;
        if !status.success() {
            bail!("importing the secret failed: {status}");
        }
        Ok(())
    }

    /// Generates a non-extractable signing key pair (`ec` for P-256, `ec384` for P-384, `rsa`
    /// for RSA 2048, `rsa3072` for RSA 3072)
    /// labelled `label`; returns the public key as a certificate's SubjectPublicKeyInfo carries
    /// it (the EC point, or the PKCS#1 RSAPublicKey DER).
    pub fn generate_key(
        &self,
        token: &str,
        pin: &str,
        label: &str,
        kind: &str,
    ) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let output = Command::new(workspace_binary(
            "softhsm-generate-key",
            "SOFTHSM_GENERATE_BIN",
        )?)
        .args([token, pin, label, kind])
        .env("SOFTHSM2_CONF", &self.conf)
        .output()?;
        if !output.status.success() {
            bail!(
                "generating the key failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(base64::engine::general_purpose::STANDARD
            .decode(String::from_utf8_lossy(&output.stdout).trim())?)
    }

    /// What the token says of the private key labelled `label`: lines `sensitive=`,
    /// `extractable=`, `never-extractable=` and `value=refused|read`.
    pub fn key_attributes(&self, token: &str, pin: &str, label: &str) -> anyhow::Result<String> {
        let output = Command::new(workspace_binary(
            "softhsm-key-attributes",
            "SOFTHSM_KEY_ATTRIBUTES_BIN",
        )?)
        .args([token, pin, label])
        .env("SOFTHSM2_CONF", &self.conf)
        .output()?;
        if !output.status.success() {
            bail!(
                "asking the token failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A file holding `pin`, for `--pin-file` or `pin-source=`.
    pub fn pin_file(&self, pin: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("pin");
        std::fs::write(&path, format!("{pin}\n"))?;
        Ok(path)
    }
}

/// A public key that lives in a token, as rcgen needs it to certify the key: the bit string
/// [`SoftHsm::generate_key`] returns, and the algorithm of its certificates.
#[derive(Debug)]
pub struct TokenPublicKey {
    /// The SubjectPublicKeyInfo's bit string.
    pub der: Vec<u8>,
    /// The key's algorithm.
    pub algorithm: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for TokenPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.der
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// Opens a read-write session on the SoftHSM2 token labelled `token` (of the tokens
/// `SOFTHSM2_CONF` names) and logs in with `pin`: what the helper binaries that provision
/// keys start with.
pub fn open_token(
    token: &str,
    pin: &str,
) -> anyhow::Result<(cryptoki::context::Pkcs11, cryptoki::session::Session)> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let context = Pkcs11::new("/usr/lib/softhsm/libsofthsm2.so").context("loading SoftHSM2")?;
    context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = context
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            context
                .get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .with_context(|| format!("no token labelled {token}"))?;
    let session = context.open_rw_session(slot)?;
    session.login(
        cryptoki::session::UserType::User,
        Some(&cryptoki::types::AuthPin::new(
            pin.to_owned().into_boxed_str(),
        )),
    )?;
    Ok((context, session))
}

/// Runs `node SCRIPT` from `interop/node` against `server` (its CA trusted, `localhost`
/// resolving to 127.0.0.1 first), with `env`, killed after two minutes. Fails with a clear
/// message when the npm packages are missing.
pub fn run_node(
    script: &str,
    server: &ServerProcess,
    env: &[(&str, &str)],
) -> anyhow::Result<std::process::Output> {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/node");
    if !interop.join("node_modules").exists() {
        bail!("npm packages missing: run scripts/test-deps.sh (or npm ci in interop/node)");
    }
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=5", "120", "node", script])
        .current_dir(&interop)
        .env("NODE_EXTRA_CA_CERTS", &server.ca_certificate)
        // The server listens on 127.0.0.1 only; make `localhost` resolve there first.
        .env("NODE_OPTIONS", "--dns-result-order=ipv4first");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().context("running node")
}

/// A PostgreSQL database of its own for a black-box test, named `prefix_<pid>` (dropped
/// first if an earlier run left it) on the server of `DPS_TEST_DATABASE_URL`; its URL.
pub fn fresh_postgres_database(prefix: &str) -> anyhow::Result<String> {
    let admin_url = std::env::var("DPS_TEST_DATABASE_URL")
        .context("DPS_TEST_DATABASE_URL is not set: run scripts/test.sh")?;
    let name = format!("{prefix}_{}", std::process::id());
    let created = Command::new("psql")
        .args([
            admin_url.as_str(),
            "-qc",
            &format!("DROP DATABASE IF EXISTS {name}"),
            "-qc",
            &format!("CREATE DATABASE {name}"),
        ])
        .status()
        .context("running psql")?;
    anyhow::ensure!(created.success(), "psql could not create {name}");
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base)
        .context("DPS_TEST_DATABASE_URL has no database part")?;
    Ok(format!("{base}/{name}"))
}

/// Drops a database [`fresh_postgres_database`] made (its URL), if it can.
pub fn drop_postgres_database(url: &str) {
    if let (Ok(admin_url), Some((_, name))) =
        (std::env::var("DPS_TEST_DATABASE_URL"), url.rsplit_once('/'))
    {
        let _ = Command::new("psql")
            .args([
                admin_url.as_str(),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {name}"),
            ])
            .status();
    }
}
