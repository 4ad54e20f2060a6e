//! Device authentication.
//!
//! - SAS tokens: against an individual enrollment's keys, then against the per-device keys
//!   derived from each symmetric-key group's keys. An unknown registration id and a wrong key
//!   get the same answer, so an unauthenticated caller learns nothing about which ids exist.
//! - X.509 (no `Authorization` header, a client certificate in the TLS handshake): the leaf
//!   must name the registration id and be usable for client authentication; then an
//!   individual enrollment whose client certificate has the leaf's thumbprint, else the group
//!   whose signing certificate the presented chain reaches first, walking from the leaf
//!   towards the root. The handshake already proved that the device holds the leaf's key.
//! - TPM: a SAS token signed with the key of the device's TPM challenge (see [`super::tpm`]).

use attestation::chain::{ChainError, check_leaf, verify_chain};
use std::sync::Arc;

use attestation::x509::{CertificateFacts, ParsedCache, ParsedCertificate, parse_der};
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
    /// An enrollment group.
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
    /// X.509 devices: the certificate they presented, and the group certificate it chains to.
    pub certificate: Option<(CertificateFacts, Option<CertificateFacts>)>,
    /// Set when an enrollment in its way is disabled: the reason.
    pub disabled: Option<String>,
    /// TPM devices' register requests: the keys they proved, and the challenge the
    /// registration consumes.
    pub tpm: Option<super::tpm::TpmProof>,
}

/// Which device request is being authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `PUT .../register`: starts a registration.
    Register,
    /// `GET .../operations/{id}`: polls an operation.
    Poll,
    /// `POST .../registrations/{id}`: the registration state.
    Lookup,
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

/// Authenticates the `Authorization` header (or the client certificate) of a device request
/// for `id` in `instance`.
pub async fn authenticate(
    state: &AppState,
    instance: &str,
    scope: &IdScope,
    id: &RegistrationId,
    header: Option<&str>,
    chain: Option<&[Vec<u8>]>,
    purpose: Purpose,
) -> Result<Attested, ApiError> {
    let header = match (header, chain) {
        (Some(header), _) => header,
        (None, Some(chain)) => return authenticate_x509(state, instance, id, chain).await,
        (None, None) => {
            return Err(ApiError::unauthorized(
                "the request has no Authorization header and the device presented no client certificate",
            ));
        }
    };
    let token = SasToken::parse(header).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    // Polls too: aziot reuses one 30-second token for all its polls, which the clock-skew
    // allowance covers (security review item 14).
    token
        .check_expiry(
            crate::admin_api::unix_now(),
            state.limits.clock_skew_secs,
            state.limits.max_token_lifetime_secs,
        )
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let resource = format!("{}/registrations/{}", scope.as_str(), id.as_str());
    if !token.resource_matches(&resource) {
        return Err(ApiError::unauthorized(
            "the token's resource (sr) is not {idScope}/registrations/{registrationId} of this request",
        ));
    }

    // One credential per registration id: an individual enrollment admits only with its own
    // credential, and no group may claim its id (security review item 2).
    if let Some(enrollment) = individual_enrollment(state, instance, id).await? {
        return match enrollment.attestation.kind {
            AttestationType::SymmetricKey => {
                let (primary, secondary) =
                    symmetric_keys(&enrollment.attestation).ok_or_else(denied)?;
                token
                    .verify_any([&primary, &secondary])
                    .map_err(|_| denied())?;
                Ok(Attested {
                    disabled: disabled_reason(&enrollment),
                    source: Source::Individual(Box::new(enrollment)),
                    certificate: None,
                    tpm: None,
                })
            }
            AttestationType::Tpm => super::tpm::authenticate(state, instance, id, &token, purpose)
                .await?
                .ok_or_else(denied),
            AttestationType::X509 | AttestationType::None => Err(denied()),
        };
    }
    if let Some(attested) = super::tpm::authenticate(state, instance, id, &token, purpose).await? {
        return Ok(attested);
    }

    // Groups: the device key is HMAC-SHA256(group key, registration id as sent).
    let member = find_group(state, instance, |group| {
        let (primary, secondary) = symmetric_keys(&group.attestation)?;
        let derived = (
            primary.derive_device_key(id.as_str()),
            secondary.derive_device_key(id.as_str()),
        );
        token.verify_any([&derived.0, &derived.1]).ok()?;
        Some(group)
    })
    .await?;
    if let Some(group) = member {
        return Ok(Attested {
            disabled: group_disabled_reason(&group),
            source: Source::Group(Box::new(group)),
            certificate: None,
            tpm: None,
        });
    }
    Err(denied())
}

pub(crate) async fn individual_enrollment(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
) -> Result<Option<IndividualEnrollment>, ApiError> {
    state
        .store
        .get(instance, Kind::IndividualEnrollment, &id.key())
        .await?
        .map(|s| s.doc_json())
        .transpose()
}

/// Pages through the instance's enrollment groups until `found` returns something.
pub(crate) async fn find_group<T>(
    state: &AppState,
    instance: &str,
    mut found: impl FnMut(EnrollmentGroup) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    const PAGE: usize = 500;
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
                    limit: PAGE,
                },
            )
            .await?;
        for stored in &page {
            if let Some(hit) = found(stored.doc_json()?) {
                return Ok(Some(hit));
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.key.clone()),
            _ => return Ok(None),
        }
    }
}

pub(crate) fn disabled_reason(individual: &IndividualEnrollment) -> Option<String> {
    (individual.settings.provisioning_status == Some(ProvisioningStatus::Disabled)).then(|| {
        format!(
            "the enrollment of '{}' is disabled",
            individual.registration_id
        )
    })
}

pub(crate) fn group_disabled_reason(group: &EnrollmentGroup) -> Option<String> {
    (group.settings.provisioning_status == Some(ProvisioningStatus::Disabled)).then(|| {
        format!(
            "the enrollment group '{}' is disabled",
            group.enrollment_group_id
        )
    })
}

/// A group's anchors: its signing certificates, or the verified CA certificates its
/// `caReferences` name (an unverified one is no anchor).
fn group_anchors(
    attestation: &AttestationMechanism,
    cas: &[(String, bool, Arc<ParsedCertificate>)],
    cache: &ParsedCache,
) -> Vec<Arc<ParsedCertificate>> {
    let mut anchors = x509_certificates(attestation, false, cache);
    if let Some(refs) = attestation
        .x509
        .as_ref()
        .and_then(|x| x.ca_references.as_ref())
    {
        for name in [&refs.primary, &refs.secondary].into_iter().flatten() {
            let key = name.to_ascii_lowercase();
            anchors.extend(
                cas.iter()
                    .filter(|(ca, verified, _)| *ca == key && *verified)
                    .map(|(_, _, parsed)| parsed.clone()),
            );
        }
    }
    anchors
}

/// The primary and secondary certificates of an X.509 attestation (client certificates for
/// individual enrollments, signing certificates for groups), parsed.
fn x509_certificates(
    attestation: &AttestationMechanism,
    individual: bool,
    cache: &ParsedCache,
) -> Vec<Arc<ParsedCertificate>> {
    if attestation.kind != AttestationType::X509 {
        return Vec::new();
    }
    let Some(x509) = attestation.x509.as_ref() else {
        return Vec::new();
    };
    let certs = if individual {
        x509.client_certificates.as_ref()
    } else {
        x509.signing_certificates.as_ref()
    };
    certs
        .into_iter()
        .flat_map(|c| [c.primary.as_ref(), c.secondary.as_ref()])
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|text| cache.parse(text).ok())
        .collect()
}

/// Whether the group's revocation list names the leaf (by either thumbprint, or serial).
fn is_revoked(group: &EnrollmentGroup, leaf: &CertificateFacts) -> bool {
    let Some(revoked) = group
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.revoked_certificates.as_ref())
    else {
        return false;
    };
    let serial = crate::admin_api::validate::normal_serial(&leaf.serial_number);
    revoked
        .thumbprints
        .iter()
        .any(|t| *t == leaf.sha1_thumbprint || *t == leaf.sha256_thumbprint)
        || revoked
            .serial_numbers
            .iter()
            .any(|s| Some(s) == serial.as_ref())
}

/// X.509: see the module documentation for the order.
async fn authenticate_x509(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    chain: &[Vec<u8>],
) -> Result<Attested, ApiError> {
    let now = crate::admin_api::unix_now();
    let rejected = |e: ChainError| ApiError::unauthorized(e.to_string());
    let leaf = check_leaf(chain, id.as_str(), now).map_err(rejected)?;

    // An individually enrolled id is admitted by its own certificate only, never by a group's
    // (security review item 2).
    if let Some(enrollment) = individual_enrollment(state, instance, id).await? {
        let enrolled = x509_certificates(&enrollment.attestation, true, &state.certificates);
        if enrolled
            .iter()
            .any(|c| c.facts.sha256_thumbprint == leaf.facts.sha256_thumbprint)
        {
            return Ok(Attested {
                disabled: disabled_reason(&enrollment),
                source: Source::Individual(Box::new(enrollment)),
                certificate: Some((leaf.facts, None)),
                tpm: None,
            });
        }
        return Err(not_enrolled_certificate());
    }

    // The presented chain's subjects and thumbprints, to place each group's anchors on it.
    let presented: Vec<CertificateFacts> = std::iter::once(leaf.facts.clone())
        .chain(
            chain
                .iter()
                .skip(1)
                .filter_map(|der| parse_der(der).ok().map(|p| p.facts)),
        )
        .collect();
    // How far from the leaf an anchor sits: the position of the certificate itself in the
    // chain, or just above the certificate it issued.
    let depth = |anchor: &CertificateFacts| {
        presented
            .iter()
            .position(|c| c.sha256_thumbprint == anchor.sha256_thumbprint)
            .or_else(|| {
                presented
                    .iter()
                    .position(|c| c.issuer_name == anchor.subject_name)
                    .map(|i| i + 1)
            })
    };
    // The instance's CA certificates: anchors when verified and named by a group, and
    // intermediates for any path.
    let cas = crate::admin_api::certificates::all(state, instance).await?;
    let extra: Vec<Vec<u8>> = cas.iter().map(|(_, _, c)| c.der.clone()).collect();
    let mut candidates: Vec<(usize, EnrollmentGroup, Arc<ParsedCertificate>)> = Vec::new();
    find_group(state, instance, |group| {
        for anchor in group_anchors(&group.attestation, &cas, &state.certificates) {
            // An anchor off the presented path may still be reached through an uploaded
            // intermediate; it is tried after the ones on the path.
            let at = depth(&anchor.facts).unwrap_or(usize::MAX);
            candidates.push((at, group.clone(), anchor));
        }
        None::<()>
    })
    .await?;
    candidates.sort_by_key(|(at, _, _)| *at);
    let mut first_error = None;
    for (at, group, anchor) in candidates {
        match verify_chain(chain, &anchor.der, &extra, now) {
            Ok(()) if is_revoked(&group, &leaf.facts) => {
                return Err(ApiError::unauthorized(format!(
                    "the device certificate is revoked by enrollment group '{}'",
                    group.enrollment_group_id
                )));
            }
            Ok(()) => {
                return Ok(Attested {
                    disabled: group_disabled_reason(&group),
                    source: Source::Group(Box::new(group)),
                    certificate: Some((leaf.facts, Some(anchor.facts.clone()))),
                    tpm: None,
                });
            }
            // Only a failure on the presented path says something about this device's chain
            // (an expired intermediate, say); the rest is "no group".
            Err(e) if at != usize::MAX => {
                first_error.get_or_insert(e);
            }
            Err(_) => {}
        }
    }
    Err(match first_error {
        Some(e) => rejected(e),
        None => not_enrolled_certificate(),
    })
}

fn not_enrolled_certificate() -> ApiError {
    ApiError::unauthorized(
        "the device certificate is not enrolled and its chain reaches no enrollment group's signing certificate",
    )
}

/// The answer for a request whose ID scope names no instance: the same as a failed proof.
pub fn unknown_scope() -> ApiError {
    denied()
}

/// A 400 for a malformed id in the device path.
pub fn bad_path(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidPathParameter, message)
}
