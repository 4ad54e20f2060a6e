//! The rules of the service, without HTTP: who a device is (`attest`), what happens when it
//! registers (`registration`), and the resources admins manage. Handlers in `http` extract a
//! request, call these, and render the result; every error is a [`DomainError`], which the
//! HTTP edge maps to the Azure error body in one place.

pub mod access;
pub mod access_policies;
pub mod allocation;
pub mod attest;
pub mod audit;
pub mod certificates;
pub mod credentials;
pub mod enrollments;
pub mod error;
pub mod events;
pub mod instances;
pub mod issuance;
pub mod issued_certificates;
pub mod issuing_cas;
pub mod linked_hubs;
pub mod ownership;
pub mod records;
pub mod registration;
pub mod registrations;
pub mod resources;
pub mod simulation;
pub mod validate;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use error::DomainError;

use crate::store::{Kind, Store, Stored};

/// Loads a document, or answers 404.
pub async fn load(
    store: &dyn Store,
    ns: &str,
    kind: Kind,
    key: &str,
) -> Result<Stored, DomainError> {
    store
        .get(ns, kind, key)
        .await?
        .ok_or_else(|| crate::domain::error::not_found(kind, key))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Stored {
    /// The document parsed as `T`; a stored document that does not parse is a server fault.
    pub fn doc_json<T: DeserializeOwned>(&self) -> Result<T, DomainError> {
        serde_json::from_str(&self.doc)
            .map_err(|e| DomainError::internal("a stored document is corrupt", &e))
    }
}

/// Serialises a document for storage.
pub fn to_doc<T: Serialize>(value: &T) -> Result<String, DomainError> {
    serde_json::to_string(value).map_err(|e| DomainError::internal("serialising a document", &e))
}

/// Etags are quoted strings; clients send them quoted, unquoted or weak (`W/"..."`).
pub fn normalize_etag(value: &str) -> String {
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    // The C# service client quotes every If-Match, the wildcard too.
    if value == "\"*\"" {
        return "*".to_owned();
    }
    if value == "*" || (value.len() >= 2 && value.starts_with('"') && value.ends_with('"')) {
        value.to_owned()
    } else {
        format!("\"{value}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalised_to_quoted_strings() {
        assert_eq!(normalize_etag("abc"), "\"abc\"");
        assert_eq!(normalize_etag("\"abc\""), "\"abc\"");
        assert_eq!(normalize_etag("W/\"abc\""), "\"abc\"");
        assert_eq!(normalize_etag(" * "), "*");
        assert_eq!(normalize_etag("\"*\""), "*");
    }
}
