//! Device authentication with SAS tokens: against an individual enrollment's keys, then
//! against the per-device keys derived from each symmetric-key group's keys. An unknown
//! registration id and a wrong key get the same answer, so an unauthenticated caller learns
//! nothing about which ids exist.

use attestation::{SasToken, SymmetricKey};
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationMechanism, AttestationType, EnrollmentGroup, EnrollmentSettings,
    IndividualEnrollment, ProvisioningStatus,
};
use dps_protocol::ids::{IdScope, RegistrationId};

use crate::admin_api::AppState;
use crate::error::ApiError;
use crate::store::{Kind, Page};

/// The enrollment a device proved itself against.
#[derive(Debug, Clone)]
pub enum Source {
    /// Its own individual enrollment.
    Individual(Box<IndividualEnrollment>),
    /// A symmetric-key enrollment group.
    Group(Box<EnrollmentGroup>),
}

impl Source {
    /// The shared settings (hubs, policies, twin).
    pub fn settings(&self) -> &EnrollmentSettings {
        match self {
            Source::Individual(e) => &e.settings,
            Source::Group(g) => &g.settings,
        }
    }

    /// The group's id, for group members.
    pub fn group_id(&self) -> Option<&str> {
        match self {
            Source::Individual(_) => None,
            Source::Group(g) => Some(&g.enrollment_group_id),
        }
    }
}

/// A device that proved who it is.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The enrollment it proved itself against.
    pub source: Source,
    /// Its keys (individual, or derived from the group's): what the hub will accept.
    pub keys: (SymmetricKey, SymmetricKey),
    /// Set when an enrollment in its way is disabled: the reason.
    pub disabled: Option<String>,
}

fn denied() -> ApiError {
    ApiError::unauthorized("the device could not be authenticated")
}

fn symmetric_keys(attestation: &AttestationMechanism) -> Option<(SymmetricKey, SymmetricKey)> {
    if attestation.kind != AttestationType::SymmetricKey {
        return None;
    }
    let keys = attestation.symmetric_key.as_ref()?;
    let parse = |k: &Option<String>| k.as_deref().and_then(|k| SymmetricKey::from_base64(k).ok());
    Some((parse(&keys.primary_key)?, parse(&keys.secondary_key)?))
}

/// Authenticates the `Authorization` header of a device request for `id` in `instance`.
/// `check_expiry` is false for polls of an operation the device already started (aziot reuses
/// a 30-second token for all of them).
pub async fn authenticate(
    state: &AppState,
    instance: &str,
    scope: &IdScope,
    id: &RegistrationId,
    header: Option<&str>,
    check_expiry: bool,
) -> Result<Attested, ApiError> {
    let header =
        header.ok_or_else(|| ApiError::unauthorized("the request has no Authorization header"))?;
    let token = SasToken::parse(header).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    if check_expiry {
        token
            .check_expiry(
                crate::admin_api::unix_now(),
                state.limits.clock_skew_secs,
                state.limits.max_token_lifetime_secs,
            )
            .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    }
    let resource = format!("{}/registrations/{}", scope.as_str(), id.as_str());
    if !token.resource_matches(&resource) {
        return Err(ApiError::unauthorized(
            "the token's resource (sr) is not {idScope}/registrations/{registrationId} of this request",
        ));
    }

    let individual: Option<IndividualEnrollment> = state
        .store
        .get(instance, Kind::IndividualEnrollment, &id.key())
        .await?
        .map(|s| s.doc_json())
        .transpose()?;
    let individual_disabled = individual.as_ref().and_then(|e| {
        (e.settings.provisioning_status == Some(ProvisioningStatus::Disabled))
            .then(|| format!("the enrollment of '{}' is disabled", e.registration_id))
    });
    if let Some(enrollment) = &individual
        && let Some((primary, secondary)) = symmetric_keys(&enrollment.attestation)
        && token.verify_any([&primary, &secondary]).is_ok()
    {
        return Ok(Attested {
            source: Source::Individual(Box::new(enrollment.clone())),
            keys: (primary, secondary),
            disabled: individual_disabled,
        });
    }

    // Groups: the device key is HMAC-SHA256(group key, registration id as sent).
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list(
                instance,
                Kind::EnrollmentGroup,
                Page {
                    parent: None,
                    after: after.as_deref(),
                    limit: 500,
                },
            )
            .await?;
        for stored in &page {
            let group: EnrollmentGroup = stored.doc_json()?;
            let Some((primary, secondary)) = symmetric_keys(&group.attestation) else {
                continue;
            };
            let derived = (
                primary.derive_device_key(id.as_str()),
                secondary.derive_device_key(id.as_str()),
            );
            if token.verify_any([&derived.0, &derived.1]).is_ok() {
                let group_disabled = (group.settings.provisioning_status
                    == Some(ProvisioningStatus::Disabled))
                .then(|| {
                    format!(
                        "the enrollment group '{}' is disabled",
                        group.enrollment_group_id
                    )
                });
                return Ok(Attested {
                    disabled: individual_disabled.or(group_disabled),
                    source: Source::Group(Box::new(group)),
                    keys: derived,
                });
            }
        }
        match page.last() {
            Some(last) if page.len() == 500 => after = Some(last.key.clone()),
            _ => break,
        }
    }
    Err(denied())
}

/// The answer for a request whose ID scope names no instance: the same as a failed proof.
pub fn unknown_scope() -> ApiError {
    denied()
}

/// A 400 for a malformed id in the device path.
pub fn bad_path(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidPathParameter, message)
}
