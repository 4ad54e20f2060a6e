//! Symmetric keys: generation, parsing and the group-to-device key derivation of Azure DPS.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Smallest key the service accepts, in bytes (Azure: 16 to 64).
pub const MIN_KEY_BYTES: usize = 16;
/// Largest key the service accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Length of the keys the service generates (what Azure DPS generates).
pub const GENERATED_KEY_BYTES: usize = 64;

/// Why a key was refused. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64.
    #[error("the key is not valid base64")]
    NotBase64,
    /// Too short or too long.
    #[error("the key must decode to between {MIN_KEY_BYTES} and {MAX_KEY_BYTES} bytes, not {0}")]
    BadLength(usize),
    /// The operating system's random source failed.
    #[error("the system random number generator failed")]
    Random,
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|_| KeyError::Random)?;
    Ok(bytes)
}

/// Key material for HMAC-SHA256. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct SymmetricKey(Vec<u8>);

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SymmetricKey(<{} bytes>)", self.0.len())
    }
}

impl SymmetricKey {
    /// Parses a base64 key of 16 to 64 bytes.
    pub fn from_base64(value: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD
            .decode(value.trim().as_bytes())
            .map_err(|_| KeyError::NotBase64)?;
        Self::from_bytes(&bytes)
    }

    /// A key of 16 to 64 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
            return Err(KeyError::BadLength(bytes.len()));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// A fresh random key of [`GENERATED_KEY_BYTES`].
    pub fn generate() -> Result<Self, KeyError> {
        random_bytes::<GENERATED_KEY_BYTES>().map(|bytes| Self(bytes.to_vec()))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as base64, the form it travels in.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0)
    }

    /// The device key of an enrollment group member: HMAC-SHA256 of the registration id
    /// (exactly as the device sends it) under the group key.
    pub fn derive_device_key(&self, registration_id: &str) -> SymmetricKey {
        SymmetricKey(self.hmac(registration_id.as_bytes()))
    }

    /// HMAC-SHA256 of `data` under this key.
    pub fn hmac(&self, data: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_outside_16_to_64_bytes_are_refused() {
        assert_eq!(
            SymmetricKey::from_base64("not base64!"),
            Err(KeyError::NotBase64)
        );
        assert_eq!(
            SymmetricKey::from_base64(&STANDARD.encode([0u8; 15])),
            Err(KeyError::BadLength(15))
        );
        assert_eq!(
            SymmetricKey::from_base64(&STANDARD.encode([0u8; 65])),
            Err(KeyError::BadLength(65))
        );
        assert!(SymmetricKey::from_base64(&STANDARD.encode([0u8; 16])).is_ok());
    }

    #[test]
    fn generated_keys_are_64_random_bytes() {
        let a = SymmetricKey::generate().unwrap();
        let b = SymmetricKey::generate().unwrap();
        assert_eq!(a.as_bytes().len(), 64);
        assert_ne!(a, b);
        assert_eq!(SymmetricKey::from_base64(&a.to_base64()), Ok(a));
    }

    #[test]
    fn device_key_derivation_matches_an_independent_hmac() {
        // Expected value computed with Python: base64(hmac.new(b64decode(group), id, sha256).digest())
        let group = SymmetricKey::from_base64(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        )
        .unwrap();
        let device = group.derive_device_key("sn-007-888-abc-mac-a1-b2-c3");
        assert_eq!(
            device.to_base64(),
            "nNWmr54G0slUZQGbpI1NNRv6pfzgR5pHTswjvG7vWcI="
        );
    }

    #[test]
    fn debug_never_prints_key_material() {
        let key = SymmetricKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        assert_eq!(format!("{key:?}"), "SymmetricKey(<32 bytes>)");
    }
}
