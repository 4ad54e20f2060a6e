//! TPM attestation (reference section 2.4).
//!
//! 1. A register request without `Authorization` whose body carries `tpm` gets a challenge: a
//!    401 with an activation blob that only the TPM holding the presented EK and SRK can open.
//!    The device must be enrolled: an individual TPM enrollment with that very EK, or (our
//!    extension) the instance's TPM enrollment group, when the device's EK certificate
//!    chains to a configured TPM manufacturer certificate and certifies that EK. The blob's
//!    key is kept among the device's pending challenges. Anyone who knows a device's public EK
//!    and SRK can ask for a challenge, so a new one does not cancel the ones before it: up to
//!    [`MAX_CHALLENGES`] stay live per registration id, the oldest making room for the newest.
//! 2. The device's next register request carries a SAS token signed by one of those keys inside
//!    its TPM. Each key signs one registration (its challenge is consumed in the same
//!    transaction that stores the operation) and expires after `tpm.challenge_ttl_secs`; polls
//!    of that operation carry the same token.
//! 3. The assignment hands the device a second blob, whose key becomes its hub key.

use attestation::tpm::{KeyRole, RsaPublic, registration_id, verify_ek_certificate};
use attestation::{SasToken, SymmetricKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dps_protocol::ErrorCode;
use dps_protocol::device::TpmChallenge;
use dps_protocol::enrollment::{
    AttestationType, EnrollmentGroup, IndividualEnrollment, TpmAttestation,
};
use dps_protocol::ids::RegistrationId;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Attested, DeviceReads, Purpose, Source, disabled_reason, group_disabled_reason,
    individual_enrollment,
};
use crate::cache::Credential;
use crate::domain::credentials;
use crate::domain::error::DomainError;
use crate::domain::records::EnrollmentRef;
use crate::domain::{to_doc, unix_now};
use crate::state::AppState;
use crate::store::{Columns, Kind, Precondition, StoreError, Stored, Write};

/// Where a member of a TPM enrollment group puts its EK certificate: this field of the
/// registration payload, base64 DER (what the TPM's NV index 0x01c00002 holds).
pub const EK_CERTIFICATE_FIELD: &str = "tpmEndorsementKeyCertificate";
/// The `keyName` of every challenge: the `skn` of the device's token.
const KEY_NAME: &str = "registration";

/// Most live challenges kept per registration id.
pub const MAX_CHALLENGES: usize = 8;
/// How long a challenge is kept after it expired, so that polls of the operation it started
/// still find the key that signs them, seconds.
const KEEP_AFTER_EXPIRY_SECS: u64 = 300;
/// How often a write of the challenges is retried when another request changed them first.
const ATTEMPTS: usize = 5;

/// A device's challenges, pending and consumed, stored as one document per registration id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChallengeSet {
    /// Oldest first.
    pub challenges: Vec<ChallengeRecord>,
}

/// What older versions stored: one challenge per id.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredChallenges {
    Set(ChallengeSet),
    One(ChallengeRecord),
}

impl ChallengeSet {
    fn from_stored(stored: &Stored) -> Result<Self, DomainError> {
        Ok(match stored.doc_json::<StoredChallenges>()? {
            StoredChallenges::Set(set) => set,
            StoredChallenges::One(one) => Self {
                challenges: vec![one],
            },
        })
    }

    /// Adds `record`, dropping challenges long expired and, past [`MAX_CHALLENGES`], the
    /// oldest of the source address that holds the most: a stranger who floods one device's
    /// challenges from an address displaces only its own.
    fn add(&mut self, record: ChallengeRecord, now: u64) {
        self.challenges
            .retain(|c| c.expires.saturating_add(KEEP_AFTER_EXPIRY_SECS) >= now);
        self.challenges.push(record);
        while self.challenges.len() > MAX_CHALLENGES {
            let mut held: HashMap<Option<&str>, usize> = HashMap::new();
            for c in &self.challenges {
                *held.entry(c.source.as_deref()).or_default() += 1;
            }
            let most = held.values().copied().max().unwrap_or(0);
            // Oldest first, so the first of the busiest address is its oldest.
            let Some(at) = self
                .challenges
                .iter()
                .position(|c| held.get(&c.source.as_deref()) == Some(&most))
            else {
                break;
            };
            self.challenges.remove(at);
        }
    }

    /// Unix seconds after which none of the challenges matters any more: not even as the
    /// record of an operation's consumed key, which polls of that operation check.
    fn sweepable_after(&self) -> i64 {
        let latest = self.challenges.iter().map(|c| c.expires).max().unwrap_or(0);
        i64::try_from(latest.saturating_add(KEEP_AFTER_EXPIRY_SECS)).unwrap_or(i64::MAX)
    }

    /// The challenge whose key signed `token`.
    fn signed(&self, token: &SasToken) -> Result<Option<&ChallengeRecord>, DomainError> {
        for record in &self.challenges {
            let key = SymmetricKey::from_base64(&record.key)
                .map_err(|e| DomainError::internal("a stored TPM challenge is corrupt", &e))?;
            if token.verify(&key).is_ok() {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }
}

/// The device's challenges and the etag they were read at (none when there are none).
async fn read_challenges(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
) -> Result<(ChallengeSet, Option<String>), DomainError> {
    let stored = state
        .store
        .get(instance, Kind::TpmChallenge, &id.key())
        .await?;
    parse_challenges(stored.as_ref())
}

/// Stored challenges (or none) with their etag.
fn parse_challenges(
    stored: Option<&Stored>,
) -> Result<(ChallengeSet, Option<String>), DomainError> {
    match stored {
        Some(stored) => Ok((
            ChallengeSet::from_stored(stored)?,
            Some(stored.etag.clone()),
        )),
        None => Ok((ChallengeSet::default(), None)),
    }
}

/// The write that stores `set` if the challenges are still as read at `etag`.
fn challenges_write(
    instance: &str,
    id: &RegistrationId,
    set: &ChallengeSet,
    etag: Option<String>,
) -> Result<Write, DomainError> {
    Ok(Write::Put {
        ns: instance.to_owned(),
        kind: Kind::TpmChallenge,
        key: id.key(),
        // The sweeper removes them once none can start a registration any more.
        columns: Columns::Expires {
            at: set.sweepable_after(),
        },
        doc: to_doc(set)?,
        precondition: etag.map_or(Precondition::MustNotExist, Precondition::IfMatch),
        etag: None,
    })
}

/// Whether a write failed only because another request changed the challenges first.
pub fn lost_race(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Exists {
            kind: Kind::TpmChallenge,
            ..
        } | StoreError::EtagMismatch {
            kind: Kind::TpmChallenge,
            ..
        } | StoreError::NotFound {
            kind: Kind::TpmChallenge,
            ..
        }
    )
}

/// The write that marks the challenge whose key is `key` as consumed by `operation_id`: from
/// the challenges as the device's request read them, or (`fresh`, after another request
/// changed them) read again. A 401 when it is gone or already consumed.
pub async fn consumption(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    proof: &TpmProof,
    operation_id: &str,
    fresh: bool,
) -> Result<Write, DomainError> {
    let key = &proof.challenge.key;
    let (mut set, etag) = if fresh {
        read_challenges(state, instance, id).await?
    } else {
        (proof.read.clone(), proof.read_etag.clone())
    };
    let record = set
        .challenges
        .iter_mut()
        .find(|c| c.key == *key)
        .ok_or_else(|| DomainError::unauthorized(CHALLENGE_GONE))?;
    if record.operation_id.is_some() {
        return Err(DomainError::unauthorized(ALREADY_USED));
    }
    record.operation_id = Some(operation_id.to_owned());
    challenges_write(instance, id, &set, etag)
}

const ALREADY_USED: &str = "this TPM challenge's key already started a registration; register without Authorization for a new challenge";
const CHALLENGE_GONE: &str =
    "this TPM challenge is no longer pending; register without Authorization for a new challenge";

/// One of a device's challenges.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChallengeRecord {
    /// The enrollment the device proved itself against.
    pub enrollment: EnrollmentRef,
    /// Base64 TPM2B_PUBLIC of the EK, as presented.
    pub endorsement_key: String,
    /// Base64 TPM2B_PUBLIC of the SRK, as presented.
    pub storage_root_key: String,
    /// Base64 of the HMAC key inside the blob.
    pub key: String,
    /// Unix seconds after which the key no longer starts a registration.
    pub expires: u64,
    /// The operation that consumed the challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// The address that asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What a TPM device's register request proved, for the registration it starts.
#[derive(Debug, Clone)]
pub struct TpmProof {
    /// Its EK.
    pub ek: RsaPublic,
    /// Its SRK.
    pub srk: RsaPublic,
    /// The challenge the registration consumes.
    pub challenge: ChallengeRecord,
    /// The device's challenges as its request read them, and their etag.
    read: ChallengeSet,
    read_etag: Option<String>,
}

fn not_enrolled() -> DomainError {
    // The same answer for an unknown registration id and for another EK, so that an
    // unauthenticated caller learns nothing about which ids exist.
    DomainError::unauthorized("no TPM enrollment matches this registration id and endorsement key")
}

fn invalid_key(field: &str) -> impl Fn(attestation::tpm::TpmError) -> DomainError + '_ {
    move |e| DomainError::new(ErrorCode::InvalidTpmKey, e.to_string()).with_info("field", field)
}

/// Step 1: checks the presented keys and the enrollment, and stores a new challenge.
pub async fn challenge(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    tpm: &TpmAttestation,
    payload: Option<&Value>,
    source: Option<std::net::IpAddr>,
    reads: &DeviceReads,
) -> Result<TpmChallenge, DomainError> {
    let ek = RsaPublic::from_base64(&tpm.endorsement_key, KeyRole::Endorsement)
        .map_err(invalid_key("tpm.endorsementKey"))?;
    let srk_text = tpm.storage_root_key.as_deref().ok_or_else(|| {
        DomainError::new(
            ErrorCode::InvalidTpmKey,
            "tpm.storageRootKey is required: the challenge is bound to the device's SRK",
        )
        .with_info("field", "tpm.storageRootKey")
    })?;
    let srk = RsaPublic::from_base64(srk_text, KeyRole::StorageRoot)
        .map_err(invalid_key("tpm.storageRootKey"))?;

    let enrollment = match &reads.enrollment {
        Some(enrolled) => {
            if !enrolls(enrolled, &ek) {
                return Err(not_enrolled());
            }
            EnrollmentRef::Individual(enrolled.registration_id.clone())
        }
        None => {
            let group = tpm_group(state, instance, reads)
                .await?
                .ok_or_else(not_enrolled)?;
            admit_to_group(state, id, &ek, payload)?;
            EnrollmentRef::Group(group.enrollment_group_id)
        }
    };

    let activation = attestation::tpm::activation_blob(&ek, &srk)
        .map_err(|e| DomainError::internal("building a TPM activation blob", &e))?;
    let now = unix_now();
    let record = ChallengeRecord {
        enrollment,
        endorsement_key: tpm.endorsement_key.trim().to_owned(),
        storage_root_key: srk_text.trim().to_owned(),
        key: activation.key.to_base64(),
        expires: now.saturating_add(state.tpm.challenge_ttl_secs),
        operation_id: None,
        source: source.map(|ip| ip.to_string()),
    };
    let mut stored = false;
    for attempt in 0..ATTEMPTS {
        // What the request read first; after a lost race, what is stored now.
        let (mut set, etag) = if attempt == 0 {
            parse_challenges(reads.challenges.as_ref())?
        } else {
            read_challenges(state, instance, id).await?
        };
        set.add(record.clone(), now);
        match state
            .store
            .write(&[challenges_write(instance, id, &set, etag)?])
            .await
        {
            Ok(_) => {
                stored = true;
                break;
            }
            Err(e) if lost_race(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if !stored {
        return Err(DomainError::new(
            ErrorCode::ServiceUnavailable,
            "this device's TPM challenges kept changing; try again",
        ));
    }
    Ok(TpmChallenge {
        authentication_key: activation.blob_base64(),
        key_name: KEY_NAME.to_owned(),
    })
}

/// Whether `enrolled` is a TPM enrollment of this very EK (however its exponent is spelled).
/// The enrolled key is parsed only when its bytes differ from the device's: they are the same
/// key then only if the exponent is spelled differently.
fn enrolls(enrolled: &IndividualEnrollment, ek: &RsaPublic) -> bool {
    let Some(tpm) = enrolled.attestation.tpm.as_ref() else {
        return false;
    };
    enrolled.attestation.kind == AttestationType::Tpm
        && (STANDARD
            .decode(tpm.endorsement_key.trim().as_bytes())
            .is_ok_and(|bytes| bytes == ek.tpm2b())
            || RsaPublic::from_base64(&tpm.endorsement_key, KeyRole::Endorsement)
                .is_ok_and(|enrolled| enrolled.same_key(ek)))
}

/// The instance's TPM enrollment group (there is at most one).
async fn tpm_group(
    state: &AppState,
    instance: &str,
    reads: &DeviceReads,
) -> Result<Option<EnrollmentGroup>, DomainError> {
    let credentials =
        credentials::at_version(state, instance, reads.credentials_version.clone()).await?;
    Ok(credentials.tpm_group.as_deref().cloned())
}

/// A TPM group member registers under the id its EK gives it, and proves its EK with a
/// certificate from a trusted manufacturer.
fn admit_to_group(
    state: &AppState,
    id: &RegistrationId,
    ek: &RsaPublic,
    payload: Option<&Value>,
) -> Result<(), DomainError> {
    let derived = registration_id(ek);
    if !id.as_str().eq_ignore_ascii_case(&derived) {
        return Err(DomainError::unauthorized(format!(
            "a device of a TPM enrollment group registers under the id derived from its endorsement key, '{derived}'"
        )));
    }
    let certificate = payload
        .and_then(|p| p.get(EK_CERTIFICATE_FIELD))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            DomainError::unauthorized(format!(
                "a device of a TPM enrollment group sends its EK certificate (base64 DER) in payload.{EK_CERTIFICATE_FIELD}"
            ))
        })?;
    let der = STANDARD.decode(certificate.trim()).map_err(|_| {
        DomainError::invalid(format!("payload.{EK_CERTIFICATE_FIELD} is not base64"))
            .with_info("field", format!("payload.{EK_CERTIFICATE_FIELD}"))
    })?;
    verify_ek_certificate(&der, ek, &state.tpm.manufacturer_certificates, unix_now())
        .map_err(|e| DomainError::unauthorized(e.to_string()))
}

/// Step 2: a SAS token signed with the device's challenge key. `Ok(None)` when the device
/// has no challenge or the token is not signed with its key (it may be a symmetric-key
/// device).
pub async fn authenticate(
    state: &AppState,
    instance: &str,
    token: &SasToken,
    purpose: Purpose,
    reads: &DeviceReads,
) -> Result<Option<Attested>, DomainError> {
    let (set, read_etag) = parse_challenges(reads.challenges.as_ref())?;
    let Some(record) = set.signed(token)?.cloned() else {
        return Ok(None);
    };
    match purpose {
        Purpose::Register if record.operation_id.is_some() => {
            return Err(DomainError::unauthorized(ALREADY_USED));
        }
        Purpose::Register if unix_now() > record.expires => {
            return Err(DomainError::unauthorized(
                "this TPM challenge has expired; register without Authorization for a new challenge",
            ));
        }
        Purpose::Poll | Purpose::Lookup if record.operation_id.is_none() => {
            return Err(DomainError::unauthorized(
                "this TPM challenge's key has not started a registration yet",
            ));
        }
        _ => {}
    }
    let corrupt = |e: attestation::tpm::TpmError| {
        DomainError::internal("a stored TPM challenge is corrupt", &e)
    };
    let ek =
        RsaPublic::from_base64(&record.endorsement_key, KeyRole::Endorsement).map_err(corrupt)?;
    let source = enrollment_of(state, instance, &record, &ek, reads).await?;
    let disabled = match &source {
        Source::Individual(e) => disabled_reason(e),
        Source::Group(g) => group_disabled_reason(g),
    };
    // The key its later polls sign with too.
    let key = SymmetricKey::from_base64(&record.key)
        .map_err(|e| DomainError::internal("a stored TPM challenge is corrupt", &e))?;
    // Only a register request needs the keys (for the hub key's blob) and the challenge.
    let tpm = if purpose == Purpose::Register {
        Some(TpmProof {
            ek,
            srk: RsaPublic::from_base64(&record.storage_root_key, KeyRole::StorageRoot)
                .map_err(corrupt)?,
            challenge: record,
            read: set,
            read_etag,
        })
    } else {
        None
    };
    Ok(Some(Attested {
        source,
        certificate: None,
        disabled,
        tpm,
        credential: Credential::Keys(vec![key]),
    }))
}

/// The challenge's enrollment as it is now: still TPM, and still the same EK for an
/// individual enrollment (an admin may have changed it since the challenge).
async fn enrollment_of(
    state: &AppState,
    instance: &str,
    record: &ChallengeRecord,
    ek: &RsaPublic,
    reads: &DeviceReads,
) -> Result<Source, DomainError> {
    let changed = || {
        DomainError::unauthorized(
            "the enrollment changed since the TPM challenge; register without Authorization for a new one",
        )
    };
    match &record.enrollment {
        EnrollmentRef::Individual(reg) => {
            let enrolled = match &reads.enrollment {
                Some(read) if read.registration_id.eq_ignore_ascii_case(reg) => read.clone(),
                _ => {
                    let id = RegistrationId::parse(reg).map_err(|_| changed())?;
                    individual_enrollment(state, instance, &id)
                        .await?
                        .ok_or_else(changed)?
                }
            };
            if !enrolls(&enrolled, ek) {
                return Err(changed());
            }
            Ok(Source::Individual(Box::new(enrolled)))
        }
        EnrollmentRef::Group(group_id) => {
            // An individual enrollment made since the challenge takes the id from the group.
            if reads.enrollment.is_some() {
                return Err(changed());
            }
            let group = tpm_group(state, instance, reads)
                .await?
                .ok_or_else(changed)?;
            if !group.enrollment_group_id.eq_ignore_ascii_case(group_id) {
                return Err(changed());
            }
            Ok(Source::Group(Box::new(group)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64, source: &str) -> ChallengeRecord {
        ChallengeRecord {
            enrollment: EnrollmentRef::Individual("dev".into()),
            endorsement_key: String::new(),
            storage_root_key: String::new(),
            key: format!("key-{n}"),
            expires: 1000 + n,
            operation_id: None,
            source: Some(source.into()),
        }
    }

    #[test]
    fn a_flood_from_one_address_displaces_only_its_own_challenges() {
        let mut set = ChallengeSet::default();
        set.add(record(0, "device"), 0);
        for n in 1..100 {
            set.add(record(n, "stranger"), 0);
        }
        assert_eq!(set.challenges.len(), MAX_CHALLENGES);
        assert_eq!(
            set.challenges[0].key, "key-0",
            "the device's challenge stays"
        );
        assert_eq!(
            set.challenges.last().map(|c| c.key.as_str()),
            Some("key-99")
        );
        // Long-expired challenges go first.
        set.add(
            record(200, "device"),
            1000 + 99 + KEEP_AFTER_EXPIRY_SECS + 1,
        );
        assert_eq!(set.challenges.len(), 1);
    }
}
