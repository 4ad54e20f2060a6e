//! A real software TPM for tests: `swtpm socket` on two free TCP ports with a fresh state
//! directory, optionally manufactured first by `swtpm_setup --create-ek-cert` with a local CA of
//! its own (the test's "TPM manufacturer"). Killed on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::free_port;

/// The persistent handles the Azure SDKs use.
pub const EK_HANDLE: &str = "0x81010001";
/// The SRK's persistent handle.
pub const SRK_HANDLE: &str = "0x81000001";

/// A running swtpm.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Swtpm {
    /// A TPM with fresh state and no EK certificate.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("state"))?;
        Self::run(dir)
    }

    /// A TPM manufactured by `swtpm_setup`: an RSA EK persisted at 0x81010001 and its
    /// certificate in NV index 0x01c00002, issued by a local CA whose certificates
    /// [`Self::manufacturer_certificates`] returns.
    pub fn start_with_ek_certificate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("state"))?;
        std::fs::create_dir_all(d.join("localca"))?;
        let ca = d.join("localca");
        std::fs::write(
            d.join("localca.conf"),
            format!(
                "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
                ca.display()
            ),
        )?;
        std::fs::write(
            d.join("localca.options"),
            "--platform-manufacturer Test\n--platform-version 2.1\n--platform-model Test\n",
        )?;
        std::fs::write(
            d.join("setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                d.join("localca.conf").display(),
                d.join("localca.options").display()
            ),
        )?;
        let output = Command::new("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(d.join("state"))
            .arg("--config")
            .arg(d.join("setup.conf"))
            .args(["--create-ek-cert", "--lock-nvram"])
            .stdin(Stdio::null())
            .output()
            .context("running swtpm_setup (apt install swtpm-tools)")?;
        if !output.status.success() {
            bail!(
                "swtpm_setup failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Self::run(dir)
    }

    fn run(dir: tempfile::TempDir) -> anyhow::Result<Self> {
        // The swtpm TCTI sends control commands to the port after the command port.
        let (port, ctrl) = adjacent_free_ports()?;
        let state = dir.path().join("state");
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting swtpm (apt install swtpm)")?;
        let mut tpm = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = tpm.child.try_wait()? {
                bail!("swtpm exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("swtpm did not open port {port}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(tpm)
    }

    /// The TCTI of this TPM, for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A scratch directory that lives as long as the TPM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PEM of the local CA that issued the EK certificate: its root and its issuing
    /// certificate (for TPMs from [`Self::start_with_ek_certificate`]).
    pub fn manufacturer_certificates(&self) -> anyhow::Result<PathBuf> {
        let ca = self.dir.path().join("localca");
        let mut pem = std::fs::read_to_string(ca.join("swtpm-localca-rootca-cert.pem"))?;
        pem.push_str(&std::fs::read_to_string(ca.join("issuercert.pem"))?);
        let path = self.dir.path().join("manufacturer.pem");
        std::fs::write(&path, pem)?;
        Ok(path)
    }

    /// Runs a tpm2-tools command against this TPM in its scratch directory; fails unless it
    /// succeeds.
    pub fn tool(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let output = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .env("TPM2TOOLS_TCTI", self.tcti())
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} (apt install tpm2-tools)"))?;
        if !output.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }
}

/// Two free consecutive ports on 127.0.0.1.
fn adjacent_free_ports() -> anyhow::Result<(u16, u16)> {
    for _ in 0..100 {
        let port = free_port()?;
        if let Some(next) = port.checked_add(1)
            && std::net::TcpListener::bind(("127.0.0.1", next)).is_ok()
        {
            return Ok((port, next));
        }
    }
    bail!("no two consecutive free ports")
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
