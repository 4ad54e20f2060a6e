//! The audit log, as admins read it (`GET /auditLog`): the store writes an entry for every
//! write an identified admin makes ([`crate::store::audit`]); key reads are recorded here,
//! before the keys are answered. Entries are read with filters and paging, and swept after
//! `audit.retention_days` or past `audit.max_entries` per instance.

use dps_protocol::admin::AuditEntry;

use super::DomainError;
use super::events::time_key;
use super::validate::field_error;
use crate::state::AppState;
use crate::store::{AuditFilter, Kind, Stored, Write};

/// What an admin filters the audit log by (each given one must match): the query parameters
/// of `GET /auditLog`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Query {
    /// The kind of record (`enrollment`, `access-policy`, ...).
    pub resource_kind: Option<String>,
    /// The record's id (with `resourceKind`).
    pub resource_id: Option<String>,
    /// The shared access policy that made the change.
    pub policy: Option<String>,
    /// From this time on (RFC 3339).
    pub from: Option<String>,
    /// Before this time (RFC 3339).
    pub to: Option<String>,
    /// Sent by Azure's clients with every request; ignored.
    #[serde(default, rename = "api-version")]
    pub api_version: Option<String>,
}

/// The kinds of record admins write (and so the audit log names).
pub const RESOURCE_KINDS: [Kind; 14] = [
    Kind::Instance,
    Kind::AccessPolicy,
    Kind::LinkedHub,
    Kind::IndividualEnrollment,
    Kind::EnrollmentGroup,
    Kind::RegistrationState,
    Kind::Operation,
    Kind::Owner,
    Kind::OwnershipRecord,
    Kind::CaCertificate,
    Kind::IssuedCertificate,
    Kind::RevokedCertificate,
    Kind::CertificateAuthority,
    Kind::CredentialPolicy,
];

/// The longest `resourceId` or `policy` a filter takes (ids and key names are shorter).
const LONGEST_FILTER: usize = 256;

/// A text filter, case-folded as records are stored.
fn text_filter(field: &str, value: Option<&str>) -> Result<Option<String>, DomainError> {
    value
        .map(|v| {
            if v.is_empty() || v.chars().count() > LONGEST_FILTER || v.chars().any(char::is_control)
            {
                Err(field_error(
                    field,
                    format!("1 to {LONGEST_FILTER} characters, no control characters"),
                ))
            } else {
                Ok(v.to_ascii_lowercase())
            }
        })
        .transpose()
}

/// The storage filter of `query`, its values checked.
pub fn filter_of(query: &Query) -> Result<AuditFilter, DomainError> {
    let resource_kind = match query.resource_kind.as_deref() {
        None => None,
        Some(kind) => Some(
            RESOURCE_KINDS
                .iter()
                .map(|k| k.as_str())
                .find(|k| *k == kind)
                .ok_or_else(|| {
                    let names: Vec<&str> = RESOURCE_KINDS.iter().map(|k| k.as_str()).collect();
                    field_error("resourceKind", format!("one of {}", names.join(", ")))
                })?
                .to_owned(),
        ),
    };
    let resource_id = text_filter("resourceId", query.resource_id.as_deref())?;
    if resource_id.is_some() && resource_kind.is_none() {
        return Err(field_error(
            "resourceId",
            "give resourceKind with resourceId",
        ));
    }
    Ok(AuditFilter {
        resource_kind,
        resource_id,
        policy: text_filter("policy", query.policy.as_deref())?,
        from: query
            .from
            .as_deref()
            .map(|t| time_key("from", t))
            .transpose()?,
        to: query.to.as_deref().map(|t| time_key("to", t)).transpose()?,
    })
}

/// A page of the audit log of instance `ns` that matches `query`, after `after`.
pub async fn list(
    state: &AppState,
    ns: &str,
    query: &Query,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Stored>, DomainError> {
    let filter = filter_of(query)?;
    Ok(state.store.list_audit(ns, &filter, after, limit).await?)
}

/// A stored entry.
pub fn render(stored: &Stored) -> Result<AuditEntry, DomainError> {
    stored.doc_json()
}

/// Records that the admin of this request reads the keys of record (`ns`, `kind`, `key`): the
/// keys are answered only once the entry is stored.
pub async fn keys_read(
    state: &AppState,
    ns: &str,
    kind: Kind,
    key: &str,
) -> Result<(), DomainError> {
    state
        .store
        .write(&[Write::KeysRead {
            ns: ns.to_owned(),
            kind,
            key: key.to_owned(),
        }])
        .await?;
    Ok(())
}
