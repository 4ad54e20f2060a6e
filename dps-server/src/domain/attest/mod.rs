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

pub mod tpm;
mod x509;

use attestation::SasToken;
use attestation::x509::CertificateFacts;
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationType, EnrollmentGroup, EnrollmentSettings, IndividualEnrollment, ProvisioningStatus,
};
use dps_protocol::ids::{IdScope, RegistrationId};

use crate::cache::Credential;
use crate::domain::credentials;
use crate::domain::error::DomainError;
use crate::domain::records::operation_key;
use crate::state::AppState;
use crate::store::{Kind, Stored};
use crate::trust::{SasGroup, symmetric_keys};

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
    /// What it proved itself with, for checking its polls again from memory.
    pub credential: Credential,
}

/// What a device request reads of the store, in one statement: the id's individual
/// enrollment, pending TPM challenges and registration state, the instance's credentials
/// version, and for a poll the operation. Authentication and the registration that follows
/// work from these, so a known device costs one read.
#[derive(Debug, Default, Clone)]
pub struct DeviceReads {
    /// The individual enrollment of the id.
    pub enrollment: Option<IndividualEnrollment>,
    /// The id's pending TPM challenges, as stored.
    pub challenges: Option<Stored>,
    /// The id's registration state, as stored.
    pub registration: Option<Stored>,
    /// The etag of the instance's credentials version (see `domain::credentials`).
    pub credentials_version: Option<String>,
    /// The operation a poll names, as stored.
    pub operation: Option<Stored>,
}

impl DeviceReads {
    /// Reads what a request of `id` needs; `operation` is the id a poll names.
    pub async fn read(
        state: &AppState,
        instance: &str,
        id: &RegistrationId,
        operation: Option<&str>,
    ) -> Result<Self, DomainError> {
        let key = id.key();
        let operation = operation.map(operation_key);
        let mut keys = vec![
            (Kind::IndividualEnrollment, key.as_str()),
            (Kind::TpmChallenge, key.as_str()),
            (Kind::RegistrationState, key.as_str()),
            (Kind::CredentialsVersion, credentials::VERSION_KEY),
        ];
        if let Some(operation) = &operation {
            keys.push((Kind::Operation, operation.as_str()));
        }
        let mut found = state.store.get_many(instance, &keys).await?.into_iter();
        let mut next = || found.next().flatten();
        Ok(Self {
            enrollment: next().map(|s| s.doc_json()).transpose()?,
            challenges: next(),
            registration: next(),
            credentials_version: next().map(|s| s.etag),
            operation: next(),
        })
    }
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

/// Authenticates the `Authorization` header (or the client certificate) of a device request
/// for `id` in `instance`, from what the request read.
#[allow(clippy::too_many_arguments)]
pub async fn authenticate(
    state: &AppState,
    instance: &str,
    scope: &IdScope,
    id: &RegistrationId,
    header: Option<&str>,
    chain: Option<&[Vec<u8>]>,
    purpose: Purpose,
    reads: &DeviceReads,
) -> Result<Attested, DomainError> {
    let header = match (header, chain) {
        (Some(header), _) => header,
        (None, Some(chain)) => return x509::authenticate(state, instance, id, chain, reads).await,
        (None, None) => {
            return Err(DomainError::unauthorized(
                "the request has no Authorization header and the device presented no client certificate",
            ));
        }
    };
    let token = device_token(state, scope, id, header)?;

    // One credential per registration id: an individual enrollment admits only with its own
    // credential, and no group may claim its id (security review item 2).
    if let Some(enrollment) = reads.enrollment.clone() {
        return match enrollment.attestation.kind {
            AttestationType::SymmetricKey => {
                let keys = symmetric_keys(&enrollment.attestation)
                    .ok_or_else(DomainError::device_denied)?;
                token
                    .verify_any(&keys)
                    .map_err(|_| DomainError::device_denied())?;
                Ok(Attested {
                    disabled: disabled_reason(&enrollment),
                    source: Source::Individual(Box::new(enrollment)),
                    certificate: None,
                    tpm: None,
                    credential: Credential::Keys(keys.to_vec()),
                })
            }
            AttestationType::Tpm => tpm::authenticate(state, instance, &token, purpose, reads)
                .await?
                .ok_or_else(DomainError::device_denied),
            AttestationType::X509 | AttestationType::None => Err(DomainError::device_denied()),
        };
    }
    if let Some(attested) = tpm::authenticate(state, instance, &token, purpose, reads).await? {
        return Ok(attested);
    }

    // Groups: the device key is HMAC-SHA256(group key, registration id as sent). The keys
    // come decoded from the instance's cached credentials: no read or parse per group. Each
    // group costs four HMACs; with many groups, a device that registered before is tried
    // against its own group first (its registration state was read anyway), so only first
    // registrations and strangers try them all.
    let credentials =
        credentials::at_version(state, instance, reads.credentials_version.clone()).await?;
    let derived = |member: &SasGroup| {
        member
            .keys
            .each_ref()
            .map(|k| k.derive_device_key(id.as_str()))
    };
    let admits = |member: &&SasGroup| token.verify_any(&derived(member)).is_ok();
    let hinted = if credentials.sas_groups.len() > HINT_ABOVE_GROUPS {
        registered_through(reads)?
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
            credential: Credential::Keys(derived(member).to_vec()),
        });
    }
    Err(DomainError::device_denied())
}

/// The device's SAS token, if it is in force and names this device's resource
/// (`{idScope}/registrations/{registrationId}`). Polls too: aziot reuses one 30-second token for
/// all its polls, which the clock-skew allowance covers (security review item 14).
fn device_token(
    state: &AppState,
    scope: &IdScope,
    id: &RegistrationId,
    header: &str,
) -> Result<SasToken, DomainError> {
    let token = SasToken::parse(header).map_err(|e| DomainError::unauthorized(e.to_string()))?;
    token
        .check_expiry(
            crate::domain::unix_now(),
            state.limits.clock_skew_secs,
            match state.limits.max_device_token_lifetime_secs {
                0 => u64::MAX,
                bound => bound,
            },
        )
        .map_err(|e| DomainError::unauthorized(e.to_string()))?;
    let resource = format!("{}/registrations/{}", scope.as_str(), id.as_str());
    if !token.resource_matches(&resource) {
        return Err(DomainError::unauthorized(
            "the token's resource (sr) is not {idScope}/registrations/{registrationId} of this request",
        ));
    }
    Ok(token)
}

/// Whether a request of `id` proves `credential` again: a SAS token in force that one of its
/// keys signed, or the same client certificate. (A poll of an operation this process
/// finished lately is checked so, without reading the enrollment.)
pub fn proves(
    state: &AppState,
    credential: &Credential,
    scope: &IdScope,
    id: &RegistrationId,
    header: Option<&str>,
    chain: Option<&[Vec<u8>]>,
) -> bool {
    match (credential, header, chain) {
        (Credential::Keys(keys), Some(header), _) => {
            device_token(state, scope, id, header).is_ok_and(|token| token.verify_any(keys).is_ok())
        }
        (Credential::Certificate(thumbprint), None, Some([leaf, ..])) => {
            attestation::x509::parse_der(leaf)
                .is_ok_and(|parsed| parsed.facts.sha256_thumbprint == *thumbprint)
        }
        _ => false,
    }
}

/// With more symmetric-key groups than this, a device's own group is looked up first.
const HINT_ABOVE_GROUPS: usize = 16;

/// The group a device's registration state says it registered through.
fn registered_through(reads: &DeviceReads) -> Result<Option<String>, DomainError> {
    let Some(stored) = &reads.registration else {
        return Ok(None);
    };
    let record: crate::domain::records::RegistrationRecord = stored.doc_json()?;
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

/// A 400 for a malformed id in the device path.
pub fn bad_path(message: String) -> DomainError {
    DomainError::new(ErrorCode::InvalidPathParameter, message)
}
