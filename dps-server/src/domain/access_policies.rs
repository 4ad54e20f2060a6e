//! Shared access policies: key names, keys and rights for the admin API. Keys are generated
//! when omitted; the last policy with ServiceConfig cannot be removed, so an instance cannot
//! lock itself out.

use dps_protocol::ErrorCode;
use dps_protocol::admin::{AccessPolicy, Right};
use dps_protocol::ids::check_resource_name;

use super::DomainError;
use super::resources::Resource;
use super::validate::{field_error, key_or_generate};
use crate::store::Kind;

/// The policy created with every instance.
pub const OWNER_POLICY: &str = "provisioningserviceowner";

impl Resource for AccessPolicy {
    const KIND: Kind = Kind::AccessPolicy;
    const ITEM_TYPE: &'static str = "SharedAccessPolicy";

    fn key_of(id: &str) -> Result<String, DomainError> {
        check_resource_name("shared access policy name", id)
            .map(|()| id.to_ascii_lowercase())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.key_name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    fn prepare(&mut self, previous: Option<&Self>) -> Result<(), DomainError> {
        self.etag = None;
        let mut rights = Vec::new();
        for name in &self.rights {
            let right = Right::parse(name).ok_or_else(|| {
                field_error(
                    "rights",
                    format!(
                        "unknown right '{name}'; use {}",
                        Right::ALL.map(Right::as_str).join(", ")
                    ),
                )
            })?;
            rights.push(right);
        }
        if rights.is_empty() {
            return Err(field_error("rights", "a policy needs at least one right"));
        }
        rights.sort();
        rights.dedup();
        self.rights = rights.into_iter().map(|r| r.as_str().to_owned()).collect();
        self.primary_key = Some(key_or_generate(
            "primaryKey",
            self.primary_key.as_deref(),
            previous.and_then(|p| p.primary_key.as_deref()),
        )?);
        self.secondary_key = Some(key_or_generate(
            "secondaryKey",
            self.secondary_key.as_deref(),
            previous.and_then(|p| p.secondary_key.as_deref()),
        )?);
        Ok(())
    }

    fn hide_secrets(&mut self) {
        self.primary_key = None;
        self.secondary_key = None;
    }

    fn hide_unsent_secrets(&mut self, sent: &Self, previous: Option<&Self>) {
        // An omitted key was kept from the stored policy, or generated for a new one.
        if previous.is_some() {
            if sent.primary_key.as_deref().is_none_or(str::is_empty) {
                self.primary_key = None;
            }
            if sent.secondary_key.as_deref().is_none_or(str::is_empty) {
                self.secondary_key = None;
            }
        }
    }

    fn check_change(others: &[Self], new: Option<&Self>) -> Result<(), DomainError> {
        let can_configure = |p: &AccessPolicy| {
            p.rights
                .iter()
                .any(|r| Right::parse(r) == Some(Right::ServiceConfig))
        };
        if others.iter().chain(new).any(can_configure) {
            Ok(())
        } else {
            Err(DomainError::new(
                ErrorCode::ConflictWithState,
                "the instance would be left without a policy holding ServiceConfig",
            ))
        }
    }
}

/// A new owner policy with every right and generated keys.
pub fn owner_policy() -> Result<AccessPolicy, DomainError> {
    let mut policy = AccessPolicy {
        key_name: OWNER_POLICY.to_owned(),
        rights: Right::ALL.map(|r| r.as_str().to_owned()).to_vec(),
        primary_key: None,
        secondary_key: None,
        etag: None,
    };
    policy.prepare(None)?;
    Ok(policy)
}
