//! The device's X.509 identity: a PEM certificate chain (leaf first, then the intermediates
//! the service may need) and its private key, from a PEM file or inside a PKCS#11 token, used
//! as the TLS client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::key::KeyError;
use crate::pkcs11::{PinSource, Pkcs11Uri};
use crate::token_tls::TokenSigningKey;

/// Where the private key lives.
#[derive(Debug, Clone)]
pub enum PrivateKeySource {
    /// A PEM file (PKCS#8, SEC1 or PKCS#1).
    File(PathBuf),
    /// A private-key object in a PKCS#11 token, used in place.
    Pkcs11(Pkcs11Uri),
}

impl std::str::FromStr for PrivateKeySource {
    type Err = KeyError;

    fn from_str(value: &str) -> Result<Self, KeyError> {
        if let Some(path) = value.strip_prefix("file:") {
            Ok(Self::File(PathBuf::from(path)))
        } else if value.starts_with("pkcs11:") {
            Ok(Self::Pkcs11(Pkcs11Uri::parse(value)?))
        } else {
            Err(KeyError::BadPrivateKeySource)
        }
    }
}

/// A certificate chain with the key that signs for its leaf.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    certified: Arc<CertifiedKey>,
}

impl ClientCertificate {
    /// Reads the chain from `certificate` and opens the key.
    pub fn load(
        certificate: &Path,
        key: &PrivateKeySource,
        pin: Option<&PinSource>,
    ) -> Result<Self, KeyError> {
        let unreadable = |e: String| KeyError::File(certificate.to_owned(), e);
        let chain = CertificateDer::pem_file_iter(certificate)
            .map_err(|e| unreadable(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(e.to_string()))?;
        if chain.is_empty() {
            return Err(unreadable("no PEM certificate in the file".into()));
        }
        let certified = match key {
            PrivateKeySource::File(path) => {
                let der = PrivateKeyDer::from_pem_file(path)
                    .map_err(|e| KeyError::File(path.clone(), e.to_string()))?;
                let signing = rustls::crypto::ring::sign::any_supported_type(&der)
                    .map_err(|e| KeyError::File(path.clone(), e.to_string()))?;
                let certified = CertifiedKey::new(chain, signing);
                certified
                    .keys_match()
                    .map_err(|_| KeyError::KeyMismatch(path.clone()))?;
                certified
            }
            PrivateKeySource::Pkcs11(uri) => {
                CertifiedKey::new(chain, Arc::new(TokenSigningKey::open(uri, pin)?))
            }
        };
        Ok(Self {
            certified: Arc::new(certified),
        })
    }

    /// The leaf's common name: the registration id, by the service's rules.
    pub fn common_name(&self) -> Option<String> {
        self.certified
            .cert
            .first()
            .and_then(|leaf| attestation::chain::common_name(leaf))
    }

    /// What rustls asks for the client certificate.
    pub fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        Arc::new(Always(self.certified.clone()))
    }
}

/// Presents the one certificate whatever the server asks.
#[derive(Debug)]
struct Always(Arc<CertifiedKey>);

impl ResolvesClientCert for Always {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
