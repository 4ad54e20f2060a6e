//! A private key inside a PKCS#11 token as rustls's client signing key: the TLS handshake is
//! signed inside the token (ECDSA P-256 or P-384, or RSA with PSS for TLS 1.3 and PKCS#1 v1.5
//! for TLS 1.2).

use std::fmt;
use std::sync::Arc;

use dps_pkcs11::{KeyKind, PinSource, Pkcs11Error, Pkcs11Uri, PrivateKey};
use rustls::SignatureScheme;

/// A token's private key, shared by the signers rustls asks for.
#[derive(Clone)]
pub struct TokenSigningKey {
    key: Arc<PrivateKey>,
}

impl fmt::Debug for TokenSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigningKey")
            .field("kind", &self.key.kind())
            .finish_non_exhaustive()
    }
}

impl TokenSigningKey {
    /// Opens the token the URI names, logs in and finds the private key.
    pub fn open(uri: &Pkcs11Uri, pin: Option<&PinSource>) -> Result<Self, Pkcs11Error> {
        Ok(Self {
            key: Arc::new(PrivateKey::open(uri, pin, 1)?),
        })
    }
}

impl rustls::sign::SigningKey for TokenSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        use SignatureScheme as S;
        let preference: &[S] = match self.key.kind() {
            KeyKind::EcP256 => &[S::ECDSA_NISTP256_SHA256],
            KeyKind::EcP384 => &[S::ECDSA_NISTP384_SHA384],
            // TLS 1.3 offers only PSS for RSA; TLS 1.2 servers may offer either.
            KeyKind::Rsa(_) => &[S::RSA_PSS_SHA256, S::RSA_PKCS1_SHA256],
        };
        let scheme = preference.iter().find(|s| offered.contains(s))?;
        Some(Box::new(TokenSigner {
            key: self.key.clone(),
            scheme: *scheme,
        }))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.key.kind() {
            KeyKind::EcP256 | KeyKind::EcP384 => rustls::SignatureAlgorithm::ECDSA,
            KeyKind::Rsa(_) => rustls::SignatureAlgorithm::RSA,
        }
    }
}

/// One signature scheme of a token key.
struct TokenSigner {
    key: Arc<PrivateKey>,
    scheme: SignatureScheme,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl rustls::sign::Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let signature = match self.scheme {
            SignatureScheme::ECDSA_NISTP256_SHA256 | SignatureScheme::ECDSA_NISTP384_SHA384 => {
                self.key.sign_ecdsa(message)
            }
            SignatureScheme::RSA_PSS_SHA256 => self.key.sign_rsa_pss_sha256(message),
            SignatureScheme::RSA_PKCS1_SHA256 => self.key.sign_rsa_pkcs1_sha256(message),
            other => {
                return Err(rustls::Error::General(format!(
                    "PKCS#11 signing: scheme {other:?} was not offered"
                )));
            }
        };
        signature.map_err(|e| rustls::Error::General(format!("PKCS#11 signing: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}
