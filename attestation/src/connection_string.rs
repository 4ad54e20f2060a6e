//! Connection strings: `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`, as printed
//! for the provisioning service and for IoT hubs.

use std::fmt;

use crate::keys::{KeyError, SymmetricKey};

/// Why a connection string was refused. Never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A required part is missing.
    #[error("the connection string has no {0}")]
    Missing(&'static str),
    /// A part is not `Name=value`.
    #[error("the connection string is not a list of Name=value parts separated by ';'")]
    Malformed,
    /// The key is not a valid key.
    #[error("the connection string's SharedAccessKey is invalid: {0}")]
    BadKey(KeyError),
}

/// A parsed service connection string. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The service's host name (and port, if any).
    pub host_name: String,
    /// The shared access policy's name.
    pub key_name: String,
    /// The policy's key.
    pub key: SymmetricKey,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    /// Parses a connection string; part names are compared ignoring case, unknown parts are
    /// ignored.
    pub fn parse(value: &str) -> Result<Self, ConnectionStringError> {
        let (mut host, mut name, mut key) = (None, None, None);
        for part in value.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or(ConnectionStringError::Malformed)?;
            let slot = match k.trim().to_ascii_lowercase().as_str() {
                "hostname" => &mut host,
                "sharedaccesskeyname" => &mut name,
                "sharedaccesskey" => &mut key,
                _ => continue,
            };
            *slot = Some(v.trim().to_owned());
        }
        let host_name = host
            .filter(|h| !h.is_empty())
            .ok_or(ConnectionStringError::Missing("HostName"))?;
        let key_name = name
            .filter(|n| !n.is_empty())
            .ok_or(ConnectionStringError::Missing("SharedAccessKeyName"))?;
        let key = key.ok_or(ConnectionStringError::Missing("SharedAccessKey"))?;
        let key = SymmetricKey::from_base64(&key).map_err(ConnectionStringError::BadKey)?;
        Ok(Self {
            host_name,
            key_name,
            key,
        })
    }

    /// The connection string's text form (it contains the key: print it only on request).
    pub fn reveal(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name,
            self.key_name,
            self.key.to_base64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_incomplete_strings() {
        let text = "HostName=dps.example.com;SharedAccessKeyName=owner;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==";
        let parsed = ConnectionString::parse(text).unwrap();
        assert_eq!(parsed.host_name, "dps.example.com");
        assert_eq!(parsed.reveal(), text);
        assert!(!format!("{parsed:?}").contains("AAEC"));
        assert_eq!(
            ConnectionString::parse("HostName=a;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw=="),
            Err(ConnectionStringError::Missing("SharedAccessKeyName"))
        );
        assert_eq!(
            ConnectionString::parse("garbage"),
            Err(ConnectionStringError::Malformed)
        );
    }
}
