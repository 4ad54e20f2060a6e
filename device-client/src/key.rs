//! Where the device's symmetric key lives and how it signs SAS tokens.
//!
//! A key source is `file:PATH` (base64 key in a file), `env:NAME` (base64 key in an environment
//! variable) or a `pkcs11:` URI (a generic-secret object in a token, used in place). A group key
//! is turned into the device key locally: HMAC-SHA256 of the registration id under the group key.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::SymmetricKey;
use attestation::sas::{sign, sign_with};
use base64::Engine as _;

use crate::pkcs11::{PinSource, Pkcs11Error, Pkcs11Uri, SecretKey};

/// Why a key could not be loaded or used. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The source is not `file:`, `env:` or `pkcs11:` (never echoed: it may be a pasted key).
    #[error("a key source is file:PATH, env:NAME or a pkcs11: URI")]
    BadSource,
    /// The key file could not be read.
    #[error("cannot read the key file {0}: {1}")]
    File(PathBuf, String),
    /// The environment variable is not set.
    #[error("environment variable {0} is not set")]
    Env(String),
    /// The key is not a valid base64 key.
    #[error("the key is invalid: {0}")]
    Invalid(#[from] attestation::KeyError),
    /// The token failed.
    #[error(transparent)]
    Token(#[from] Pkcs11Error),
    /// A private key source is not `file:` or `pkcs11:`.
    #[error("a private key source is file:PATH or a pkcs11: URI")]
    BadPrivateKeySource,
    /// A certificate signing request could not be built.
    #[error("cannot build the certificate signing request: {0}")]
    Request(String),
    /// The private key does not belong to the certificate.
    #[error("the private key in {0} does not match the certificate")]
    KeyMismatch(PathBuf),
}

/// A token's `se`: Unix seconds `lifetime` from now.
pub(crate) fn expiry_after(lifetime: Duration) -> u64 {
    SystemTime::now()
        .checked_add(lifetime)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Where a key lives.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A file holding the base64 key.
    File(PathBuf),
    /// An environment variable holding the base64 key.
    Env(String),
    /// A secret-key object in a PKCS#11 token.
    Pkcs11(Pkcs11Uri),
}

impl FromStr for KeySource {
    type Err = KeyError;

    fn from_str(value: &str) -> Result<Self, KeyError> {
        if let Some(path) = value.strip_prefix("file:") {
            Ok(KeySource::File(PathBuf::from(path)))
        } else if let Some(name) = value.strip_prefix("env:") {
            Ok(KeySource::Env(name.to_owned()))
        } else if value.starts_with("pkcs11:") {
            Ok(KeySource::Pkcs11(Pkcs11Uri::parse(value)?))
        } else {
            Err(KeyError::BadSource)
        }
    }
}

/// The device's credential: its own key, or its enrollment group's key.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The individual enrollment's key (primary or secondary).
    DeviceKey(KeySource),
    /// The enrollment group's key; the device key is derived from it.
    GroupKey(KeySource),
}

enum Loaded {
    Software(SymmetricKey),
    Token(SecretKey),
}

impl Loaded {
    fn load(source: &KeySource, pin: Option<&PinSource>) -> Result<Self, KeyError> {
        match source {
            KeySource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| KeyError::File(path.clone(), e.to_string()))?;
                Ok(Loaded::Software(SymmetricKey::from_base64(text.trim())?))
            }
            KeySource::Env(name) => {
                let text = std::env::var(name).map_err(|_| KeyError::Env(name.clone()))?;
                Ok(Loaded::Software(SymmetricKey::from_base64(text.trim())?))
            }
            KeySource::Pkcs11(uri) => Ok(Loaded::Token(SecretKey::open(uri, pin)?)),
        }
    }

    fn mac(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            Loaded::Software(key) => Ok(key.hmac(data)),
            Loaded::Token(token) => Ok(token.hmac_sha256(data)?),
        }
    }
}

/// Signs the device's SAS tokens.
pub struct SasSigner {
    key: Loaded,
}

impl std::fmt::Debug for SasSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.key {
            Loaded::Software(_) => "software",
            Loaded::Token(_) => "pkcs11",
        };
        f.debug_struct("SasSigner").field("key", &kind).finish()
    }
}

impl SasSigner {
    /// Loads the credential for `registration_id`.
    pub fn load(
        credential: &Credential,
        registration_id: &str,
        pin: Option<&PinSource>,
    ) -> Result<Self, KeyError> {
        let key = match credential {
            Credential::DeviceKey(source) => Loaded::load(source, pin)?,
            Credential::GroupKey(source) => {
                let group = Loaded::load(source, pin)?;
                let derived = group.mac(registration_id.as_bytes())?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(derived);
                Loaded::Software(SymmetricKey::from_base64(&b64)?)
            }
        };
        Ok(Self { key })
    }

    /// A token for `resource` valid for `lifetime`, with `skn=registration` as the Azure
    /// clients send it.
    pub fn token(&self, resource: &str, lifetime: Duration) -> Result<String, KeyError> {
        let expiry = expiry_after(lifetime);
        match &self.key {
            Loaded::Software(key) => Ok(sign(resource, key, expiry, Some("registration"))),
            token => sign_with(resource, expiry, Some("registration"), |m| token.mac(m)),
        }
    }
}
