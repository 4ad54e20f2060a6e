//! TLS for the HTTPS listener: a configured certificate, or a development CA and server
//! certificate generated into the data directory on first start and reused afterwards.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use serde::{Deserialize, Serialize};

/// The server certificate; both `cert` and `key`, or neither for a generated development one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// The CA clients should trust, printed at start (the certificate itself when absent).
    pub ca_cert: Option<PathBuf>,
}

/// The certificate material the listener serves, and the file devices must trust.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Server certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The server's private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA certificate clients should trust (printed at start).
    pub ca_certificate: PathBuf,
}

impl TlsMaterial {
    /// Loads the configured certificate, or creates/reuses the development one in `data_dir`.
    /// `host_names` are the names the development certificate must cover (ports are dropped).
    pub fn load(
        config: &TlsConfig,
        data_dir: &Path,
        host_names: &[String],
    ) -> anyhow::Result<Self> {
        match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => Self::from_files(cert, key, config.ca_cert.as_deref()),
            (None, None) => Self::development(&data_dir.join("tls"), host_names),
            _ => bail!("tls.cert and tls.key must be given together"),
        }
    }

    fn from_files(cert: &Path, key: &Path, ca_cert: Option<&Path>) -> anyhow::Result<Self> {
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading TLS certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading TLS key {}", key.display()))?;
        Ok(Self {
            chain,
            key,
            ca_certificate: ca_cert.unwrap_or(cert).to_path_buf(),
        })
    }

    fn development(dir: &Path, host_names: &[String]) -> anyhow::Result<Self> {
        crate::files::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_pem = dir.join("ca.pem");
        let ca_key_pem = dir.join("ca-key.pem");
        let server_pem = dir.join("server.pem");
        let server_key_pem = dir.join("server-key.pem");
        let names_file = dir.join("server-names.txt");

        let ca_key = if ca_pem.exists() && ca_key_pem.exists() {
            KeyPair::from_pem(&read(&ca_key_pem)?).context("parsing the development CA key")?
        } else {
            let key = KeyPair::generate().context("generating the development CA key")?;
            let cert = development_ca_params()
                .self_signed(&key)
                .context("signing the development CA")?;
            write_private(&ca_key_pem, &key.serialize_pem())?;
            fs::write(&ca_pem, cert.pem())
                .with_context(|| format!("writing {}", ca_pem.display()))?;
            // A new CA invalidates any server certificate issued by an old one.
            let _ = fs::remove_file(&server_pem);
            key
        };

        let wanted = server_names(host_names);
        let current: BTreeSet<String> = fs::read_to_string(&names_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if !(server_pem.exists() && server_key_pem.exists() && current == wanted) {
            let issuer = Issuer::new(development_ca_params(), &ca_key);
            let key = KeyPair::generate().context("generating the server key")?;
            let mut params = CertificateParams::new(wanted.iter().cloned().collect::<Vec<_>>())
                .context("server certificate names")?;
            params
                .distinguished_name
                .push(DnType::CommonName, "dps-server");
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
            let cert = params
                .signed_by(&key, &issuer)
                .context("signing the server certificate")?;
            write_private(&server_key_pem, &key.serialize_pem())?;
            fs::write(&server_pem, cert.pem())
                .with_context(|| format!("writing {}", server_pem.display()))?;
            let names: String = wanted.iter().map(|n| format!("{n}\n")).collect();
            fs::write(&names_file, names)
                .with_context(|| format!("writing {}", names_file.display()))?;
        }

        let mut material = Self::from_files(&server_pem, &server_key_pem, Some(&ca_pem))?;
        let ca = CertificateDer::from_pem_file(&ca_pem).context("parsing the development CA")?;
        material.chain.push(ca);
        Ok(material)
    }

    /// A rustls server configuration (TLS 1.2 and 1.3, ring, HTTP/1.1 and HTTP/2).
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS protocol versions")?
            .with_client_cert_verifier(Arc::new(OptionalClientCert::new()))
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the TLS certificate does not match its key")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Asks every client for a certificate and accepts handshakes without one (SAS and TPM devices
/// send none). A presented chain is not judged here: which anchors it must chain to depends on
/// the enrollment, so the device API verifies it ([`attestation::chain::verify_chain`]). What
/// is checked here is possession: a leaf that rustls-webpki cannot parse (not DER, version 1,
/// an unknown critical extension, ...) ends the handshake, and the handshake signature is
/// always verified with the leaf's key, so no certificate reaches the device API without proof
/// that the client holds its private key.
#[derive(Debug)]
struct OptionalClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl OptionalClientCert {
    fn new() -> Self {
        Self {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        // The signature checks below parse the leaf the same way; refusing here ends the
        // handshake with a clear alert before any signature is looked at.
        webpki::EndEntityCert::try_from(end_entity)
            .map(|_| rustls::server::danger::ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn development_ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "dps-server development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

/// DNS names and addresses for the development certificate: loopback plus the host names
/// admins and devices use, without ports.
fn server_names(host_names: &[String]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    for host in host_names {
        let name = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n);
        names.insert(name.to_ascii_lowercase());
    }
    names
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    crate::files::write_private(path, contents)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_certificates_are_reused_and_reissued_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let first =
            TlsMaterial::load(&TlsConfig::default(), dir.path(), &["a.test:8443".into()]).unwrap();
        let again =
            TlsMaterial::load(&TlsConfig::default(), dir.path(), &["a.test:8443".into()]).unwrap();
        assert_eq!(first.chain, again.chain, "same names: same certificate");
        let renamed =
            TlsMaterial::load(&TlsConfig::default(), dir.path(), &["b.test".into()]).unwrap();
        assert_ne!(
            first.chain[0], renamed.chain[0],
            "new name: new server certificate"
        );
        assert_eq!(first.chain[1], renamed.chain[1], "the CA stays");
        assert!(renamed.server_config().is_ok());
    }
}
