//! Device authentication: who a device is.
//!
//! - SAS tokens: against an individual enrollment's keys, then against the per-device keys
//!   derived from each symmetric-key group's keys. An unknown registration id and a wrong key
//!   get the same answer, so an unauthenticated caller learns nothing about which ids exist.
//! - X.509 (no `Authorization` header, a client certificate in the TLS handshake): the leaf
//!   must name the registration id and be usable for client authentication; then an
//!   individual enrollment whose client certificate has the leaf's thumbprint, else the group
//!   whose signing certificate the presented chain reaches first, walking from the leaf
//!   towards the root. The handshake already proved that the device holds the leaf's key.
//! - TPM: a SAS token signed with the key of the device's TPM challenge (see [`tpm`]).

pub mod credentials;
pub mod tpm;

use std::sync::Arc;

use attestation::SasToken;
use attestation::chain::{ChainError, check_leaf, verify_chain};
use attestation::x509::{CertificateFacts, ParsedCache, ParsedCertificate, parse_der};
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationMechanism, AttestationType, EnrollmentGroup, EnrollmentSettings,
    IndividualEnrollment, ProvisioningStatus,
};
use dps_protocol::ids::{IdScope, RegistrationId};

use crate::domain::error::DomainError;
use crate::state::AppState;
use crate::store::{Kind, Page};
use credentials::{Anchor, symmetric_keys};

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
    pub tpm: Option<tpm::TpmProof>,
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

fn denied() -> DomainError {
    DomainError::unauthorized("the device could not be authenticated")
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
) -> Result<Attested, DomainError> {
    let header = match (header, chain) {
        (Some(header), _) => header,
        (None, Some(chain)) => return authenticate_x509(state, instance, id, chain).await,
        (None, None) => {
            return Err(DomainError::unauthorized(
                "the request has no Authorization header and the device presented no client certificate",
            ));
        }
    };
    let token = SasToken::parse(header).map_err(|e| DomainError::unauthorized(e.to_string()))?;
    // Polls too: aziot reuses one 30-second token for all its polls, which the clock-skew
    // allowance covers (security review item 14).
    token
        .check_expiry(
            crate::domain::unix_now(),
            state.limits.clock_skew_secs,
            state.limits.max_token_lifetime_secs,
        )
        .map_err(|e| DomainError::unauthorized(e.to_string()))?;
    let resource = format!("{}/registrations/{}", scope.as_str(), id.as_str());
    if !token.resource_matches(&resource) {
        return Err(DomainError::unauthorized(
            "the token's resource (sr) is not {idScope}/registrations/{registrationId} of this request",
        ));
    }

    // One credential per registration id: an individual enrollment admits only with its own
    // credential, and no group may claim its id (security review item 2).
    if let Some(enrollment) = individual_enrollment(state, instance, id).await? {
        return match enrollment.attestation.kind {
            AttestationType::SymmetricKey => {
                let keys = symmetric_keys(&enrollment.attestation).ok_or_else(denied)?;
                token.verify_any(&keys).map_err(|_| denied())?;
                Ok(Attested {
                    disabled: disabled_reason(&enrollment),
                    source: Source::Individual(Box::new(enrollment)),
                    certificate: None,
                    tpm: None,
                })
            }
            AttestationType::Tpm => tpm::authenticate(state, instance, id, &token, purpose)
                .await?
                .ok_or_else(denied),
            AttestationType::X509 | AttestationType::None => Err(denied()),
        };
    }
    if let Some(attested) = tpm::authenticate(state, instance, id, &token, purpose).await? {
        return Ok(attested);
    }

    // Groups: the device key is HMAC-SHA256(group key, registration id as sent). The keys
    // come decoded from the instance's cached credentials: no read or parse per group. Each
    // group costs four HMACs; with many groups, a device that registered before is tried
    // against its own group first (one read), so only first registrations and strangers
    // try them all.
    let credentials = state.credentials.get(state, instance).await?;
    let admits = |member: &&credentials::SasGroup| {
        let derived = member
            .keys
            .each_ref()
            .map(|k| k.derive_device_key(id.as_str()));
        token.verify_any(&derived).is_ok()
    };
    let hinted = if credentials.sas_groups.len() > HINT_ABOVE_GROUPS {
        registered_through(state, instance, id)
            .await?
            .and_then(|group| credentials.sas_group(&group))
            .filter(admits)
    } else {
        None
    };
    let member = hinted.or_else(|| credentials.sas_groups.iter().find(admits));
    if let Some(member) = member {
        let group = EnrollmentGroup::clone(&member.group);
        return Ok(Attested {
            disabled: group_disabled_reason(&group),
            source: Source::Group(Box::new(group)),
            certificate: None,
            tpm: None,
        });
    }
    Err(denied())
}

/// With more symmetric-key groups than this, a device's own group is looked up first.
const HINT_ABOVE_GROUPS: usize = 16;

/// The group a device's registration state says it registered through.
async fn registered_through(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
) -> Result<Option<String>, DomainError> {
    let Some(stored) = state
        .store
        .get(instance, Kind::RegistrationState, &id.key())
        .await?
    else {
        return Ok(None);
    };
    let record: crate::domain::registration::RegistrationRecord = stored.doc_json()?;
    Ok(record.state.enrollment_group_id)
}

pub(crate) async fn individual_enrollment(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
) -> Result<Option<IndividualEnrollment>, DomainError> {
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
) -> Result<Option<T>, DomainError> {
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

/// The client certificates of an individual X.509 enrollment, parsed.
fn client_certificates(
    attestation: &AttestationMechanism,
    cache: &ParsedCache,
) -> Vec<Arc<ParsedCertificate>> {
    if attestation.kind != AttestationType::X509 {
        return Vec::new();
    }
    attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .into_iter()
        .flat_map(|c| [c.primary.as_ref(), c.secondary.as_ref()])
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|text| cache.parse(text).ok())
        .collect()
}

/// Whether the group's revocation list names any certificate of `path` (by either
/// thumbprint, or serial).
fn revokes(group: &EnrollmentGroup, path: &[CertificateFacts]) -> bool {
    let Some(revoked) = group
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.revoked_certificates.as_ref())
    else {
        return false;
    };
    path.iter().any(|cert| {
        let serial = crate::domain::validate::normal_serial(&cert.serial_number);
        revoked
            .thumbprints
            .iter()
            .any(|t| *t == cert.sha1_thumbprint || *t == cert.sha256_thumbprint)
            || revoked
                .serial_numbers
                .iter()
                .any(|s| Some(s) == serial.as_ref())
    })
}

/// An anchor that verified the device's chain, and the verified path to it.
struct Verified<'a> {
    anchor: &'a Anchor,
    /// Leaf, intermediates, anchor.
    path: Vec<CertificateFacts>,
}

/// X.509: see the module documentation for the order.
async fn authenticate_x509(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    chain: &[Vec<u8>],
) -> Result<Attested, DomainError> {
    let now = crate::domain::unix_now();
    let rejected = |e: ChainError| DomainError::unauthorized(e.to_string());
    let leaf = check_leaf(chain, id.as_str(), now).map_err(rejected)?;

    // An individually enrolled id is admitted by its own certificate only, never by a group's
    // (security review item 2).
    if let Some(enrollment) = individual_enrollment(state, instance, id).await? {
        let enrolled = client_certificates(&enrollment.attestation, &state.certificates);
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

    let credentials = state.credentials.get(state, instance).await?;
    let (anchors, extra) = credentials.anchors_on_the_way(&leaf, chain);
    let mut verified: Vec<Verified<'_>> = Vec::new();
    let mut first_error = None;
    for anchor in anchors {
        match verify_chain(chain, &anchor.certificate.der, &extra, now) {
            Ok(intermediates) => {
                let mut path = vec![leaf.facts.clone()];
                path.extend(
                    intermediates
                        .iter()
                        .filter_map(|der| parse_der(der).ok().map(|p| p.facts)),
                );
                path.push(anchor.certificate.facts.clone());
                verified.push(Verified { anchor, path });
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // Every group on a verified path has its say, whatever order the device sent its chain
    // in: one that revokes a certificate of the path refuses, one that is disabled blocks
    // (security review item 15). Otherwise the group closest to the leaf admits.
    for candidate in &verified {
        if let Some(group) = candidate
            .anchor
            .groups
            .iter()
            .find(|g| revokes(g, &candidate.path))
        {
            return Err(DomainError::unauthorized(format!(
                "the device certificate's chain is revoked by enrollment group '{}'",
                group.enrollment_group_id
            )));
        }
    }
    let chosen = verified
        .iter()
        .flat_map(|v| v.anchor.groups.iter().map(move |g| (v, g)))
        .min_by(|(a, g), (b, h)| {
            let blocked = |g: &EnrollmentGroup| group_disabled_reason(g).is_none();
            (blocked(g), a.path.len(), &g.enrollment_group_id).cmp(&(
                blocked(h),
                b.path.len(),
                &h.enrollment_group_id,
            ))
        });
    match chosen {
        Some((verified, group)) => Ok(Attested {
            disabled: group_disabled_reason(group),
            source: Source::Group(Box::new(EnrollmentGroup::clone(group))),
            certificate: Some((leaf.facts, Some(verified.anchor.certificate.facts.clone()))),
            tpm: None,
        }),
        None => Err(match first_error {
            Some(e) => rejected(e),
            None => not_enrolled_certificate(),
        }),
    }
}

fn not_enrolled_certificate() -> DomainError {
    DomainError::unauthorized(
        "the device certificate is not enrolled and its chain reaches no enrollment group's signing certificate",
    )
}

/// The answer for a request whose ID scope names no instance: the same as a failed proof.
pub fn unknown_scope() -> DomainError {
    denied()
}

/// A 400 for a malformed id in the device path.
pub fn bad_path(message: String) -> DomainError {
    DomainError::new(ErrorCode::InvalidPathParameter, message)
}
