//! How an ownership record, and a policy, name a device: by its registration id or by an
//! identity its attestation proved (a certificate serial, the hash of a TPM endorsement key).

use std::fmt;

/// How an ownership record names a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKeyKind {
    /// A hardware-backed identity: the X.509 certificate serial number.
    CertificateSerial,
    /// A hardware-backed identity: SHA-256 of the TPM endorsement key.
    EkHash,
    /// The registration id.
    RegistrationId,
}

impl DeviceKeyKind {
    /// Every kind, most specific first (the order lookups try).
    pub const ALL: [DeviceKeyKind; 3] = [
        DeviceKeyKind::CertificateSerial,
        DeviceKeyKind::EkHash,
        DeviceKeyKind::RegistrationId,
    ];

    /// The wire name (a JSON field, a CSV column, a path segment).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKeyKind::CertificateSerial => "certificateSerial",
            DeviceKeyKind::EkHash => "ekHash",
            DeviceKeyKind::RegistrationId => "registrationId",
        }
    }

    /// Parses a wire name, ignoring ASCII case.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(name.trim()))
    }
}

/// A device as an ownership record names it, normalised so that equal devices compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    kind: DeviceKeyKind,
    value: String,
}

/// Why a device key is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct DeviceKeyError {
    /// The field.
    pub kind: &'static str,
    /// What is wrong.
    pub message: String,
}

impl DeviceKey {
    /// Checks and normalises `value`: registration ids are lower-cased (they are matched
    /// ignoring case) and follow Azure's rules; serial numbers are upper-case hex without
    /// separators or leading zeros; EK hashes are 64 lower-case hex digits.
    pub fn new(kind: DeviceKeyKind, value: &str) -> Result<Self, DeviceKeyError> {
        let error = |message: &str| DeviceKeyError {
            kind: kind.as_str(),
            message: message.to_owned(),
        };
        let value = value.trim();
        let value = match kind {
            DeviceKeyKind::RegistrationId => dps_protocol::ids::RegistrationId::parse(value)
                .map_err(|e| error(&e.to_string()))?
                .key(),
            DeviceKeyKind::CertificateSerial => {
                let hex: String = value.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
                // Leading zeros (a DER sign byte, say) are not part of the number.
                let trimmed = hex.trim_start_matches('0');
                if hex.is_empty()
                    || trimmed.len() > 40
                    || !hex.chars().all(|c| c.is_ascii_hexdigit())
                {
                    return Err(error(
                        "a certificate serial is 1 to 20 bytes of hex, optionally separated by ':'",
                    ));
                }
                if trimmed.is_empty() {
                    "0".to_owned()
                } else {
                    trimmed.to_ascii_uppercase()
                }
            }
            DeviceKeyKind::EkHash => {
                if value.len() != 64 || !value.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(error(
                        "an EK hash is the SHA-256 of the endorsement key: 64 hex digits",
                    ));
                }
                value.to_ascii_lowercase()
            }
        };
        Ok(Self { kind, value })
    }

    /// How the device is named.
    pub fn kind(&self) -> DeviceKeyKind {
        self.kind
    }

    /// The normalised value.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// One string for storage: `<kind>:<value>`.
    pub fn storage_key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.kind.as_str(), self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: DeviceKeyKind, value: &str) -> DeviceKey {
        DeviceKey::new(kind, value).unwrap()
    }

    #[test]
    fn device_keys_are_normalised_and_checked() {
        assert_eq!(
            key(DeviceKeyKind::CertificateSerial, "00:0a:1B").storage_key(),
            "certificateSerial:A1B"
        );
        assert_eq!(key(DeviceKeyKind::CertificateSerial, "00").value(), "0");
        assert_eq!(
            key(DeviceKeyKind::RegistrationId, " Dev-1 ").value(),
            "dev-1"
        );
        let ek = "AB".repeat(32);
        assert_eq!(key(DeviceKeyKind::EkHash, &ek).value(), ek.to_lowercase());
        for (kind, bad) in [
            (DeviceKeyKind::RegistrationId, ""),
            (DeviceKeyKind::RegistrationId, "a b"),
            (DeviceKeyKind::CertificateSerial, "xyz"),
            (DeviceKeyKind::CertificateSerial, &"1".repeat(41)),
            (DeviceKeyKind::EkHash, "abc"),
        ] {
            assert!(DeviceKey::new(kind, bad).is_err(), "{kind:?} {bad:?}");
        }
        assert_eq!(DeviceKeyKind::parse("EKHASH"), Some(DeviceKeyKind::EkHash));
    }
}
