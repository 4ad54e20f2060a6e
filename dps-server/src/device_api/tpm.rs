//! TPM attestation (reference section 2.4).
//!
//! 1. A register request without `Authorization` whose body carries `tpm` gets a challenge: a
//!    401 with an activation blob that only the TPM holding the presented EK and SRK can open.
//!    The device must be enrolled: an individual TPM enrollment with that very EK, or (our
//!    extension) the instance's TPM enrollment group, when the device's EK certificate
//!    chains to a configured TPM manufacturer certificate and certifies that EK. The blob's
//!    key is stored as the device's pending challenge, replacing any earlier one.
//! 2. The device's next register request carries a SAS token signed by that key inside its
//!    TPM. The key signs one registration (the challenge is consumed in the same transaction
//!    that stores the operation) and expires after `tpm.challenge_ttl_secs`; polls of that
//!    operation carry the same token.
//! 3. The assignment hands the device a second blob, whose key becomes its hub key.

use attestation::tpm::{KeyRole, RsaPublic, registration_id, verify_ek_certificate};
use attestation::{SasToken, SymmetricKey};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dps_protocol::ErrorCode;
use dps_protocol::device::TpmChallenge;
use dps_protocol::enrollment::{
    AttestationType, EnrollmentGroup, IndividualEnrollment, TpmAttestation,
};
use dps_protocol::ids::RegistrationId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::{
    Attested, Purpose, Source, disabled_reason, find_group, group_disabled_reason,
    individual_enrollment,
};
use crate::admin_api::{AppState, to_doc, unix_now};
use crate::config::TpmConfig;
use crate::error::ApiError;
use crate::registration::EnrollmentRef;
use crate::store::{Kind, Precondition, Write};

/// Where a member of a TPM enrollment group puts its EK certificate: this field of the
/// registration payload, base64 DER (what the TPM's NV index 0x01c00002 holds).
pub const EK_CERTIFICATE_FIELD: &str = "tpmEndorsementKeyCertificate";
/// The `keyName` of every challenge: the `skn` of the device's token.
const KEY_NAME: &str = "registration";

/// What TPM attestation trusts: the manufacturers' certificates and the challenge lifetime.
#[derive(Debug, Clone, Default)]
pub struct TpmTrust {
    /// DER certificates an EK certificate may chain to.
    pub manufacturer_certificates: Vec<Vec<u8>>,
    /// How long a challenge's key may be used, seconds.
    pub challenge_ttl_secs: u64,
}

impl TpmTrust {
    /// Reads the configured manufacturer certificates (PEM files).
    pub fn load(config: &TpmConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut manufacturer_certificates = Vec::new();
        for path in &config.manufacturer_certificates {
            let before = manufacturer_certificates.len();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
                manufacturer_certificates.push(cert.to_vec());
            }
            if manufacturer_certificates.len() == before {
                anyhow::bail!("{} holds no PEM certificate", path.display());
            }
        }
        Ok(Self {
            manufacturer_certificates,
            challenge_ttl_secs: config.challenge_ttl_secs,
        })
    }
}

/// A device's pending (or consumed) challenge.
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
    /// The etag the challenge was read at (consuming it is conditional on it).
    pub etag: String,
}

fn not_enrolled() -> ApiError {
    // The same answer for an unknown registration id and for another EK, so that an
    // unauthenticated caller learns nothing about which ids exist.
    ApiError::unauthorized("no TPM enrollment matches this registration id and endorsement key")
}

fn invalid_key(field: &str) -> impl Fn(attestation::tpm::TpmError) -> ApiError + '_ {
    move |e| ApiError::new(ErrorCode::InvalidTpmKey, e.to_string()).with_info("field", field)
}

/// The answer to a challenge: 401 with `{authenticationKey, keyName}` (the C SDK reads any
/// 401 body without `status` as a challenge; Node and aziot need the 401).
pub fn challenge_response(challenge: TpmChallenge) -> Response {
    (StatusCode::UNAUTHORIZED, crate::json::Json(challenge)).into_response()
}

/// Step 1: checks the presented keys and the enrollment, and stores a new challenge.
pub async fn challenge(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    tpm: &TpmAttestation,
    payload: Option<&Value>,
) -> Result<TpmChallenge, ApiError> {
    let ek = RsaPublic::from_base64(&tpm.endorsement_key, KeyRole::Endorsement)
        .map_err(invalid_key("tpm.endorsementKey"))?;
    let srk_text = tpm.storage_root_key.as_deref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidTpmKey,
            "tpm.storageRootKey is required: the challenge is bound to the device's SRK",
        )
        .with_info("field", "tpm.storageRootKey")
    })?;
    let srk = RsaPublic::from_base64(srk_text, KeyRole::StorageRoot)
        .map_err(invalid_key("tpm.storageRootKey"))?;

    let enrollment = match individual_enrollment(state, instance, id).await? {
        Some(enrolled) => {
            if !enrolls(&enrolled, &ek) {
                return Err(not_enrolled());
            }
            EnrollmentRef::Individual(enrolled.registration_id)
        }
        None => {
            let group = tpm_group(state, instance).await?.ok_or_else(not_enrolled)?;
            admit_to_group(state, id, &ek, payload)?;
            EnrollmentRef::Group(group.enrollment_group_id)
        }
    };

    let activation = attestation::tpm::activation_blob(&ek, &srk)
        .map_err(|e| ApiError::internal("building a TPM activation blob", &e))?;
    let record = ChallengeRecord {
        enrollment,
        endorsement_key: tpm.endorsement_key.trim().to_owned(),
        storage_root_key: srk_text.trim().to_owned(),
        key: activation.key.to_base64(),
        expires: unix_now().saturating_add(state.tpm.challenge_ttl_secs),
        operation_id: None,
    };
    state
        .store
        .write(&[Write::Put {
            ns: instance.to_owned(),
            kind: Kind::TpmChallenge,
            key: id.key(),
            parent: None,
            tag: None,
            doc: to_doc(&record)?,
            precondition: Precondition::Always,
        }])
        .await?;
    Ok(TpmChallenge {
        authentication_key: activation.blob_base64(),
        key_name: KEY_NAME.to_owned(),
    })
}

/// Whether `enrolled` is a TPM enrollment of this very EK.
fn enrolls(enrolled: &IndividualEnrollment, ek: &RsaPublic) -> bool {
    enrolled.attestation.kind == AttestationType::Tpm
        && enrolled
            .attestation
            .tpm
            .as_ref()
            .and_then(|t| STANDARD.decode(t.endorsement_key.trim()).ok())
            .is_some_and(|enrolled| enrolled == ek.tpm2b())
}

/// The instance's TPM enrollment group (there is at most one).
async fn tpm_group(state: &AppState, instance: &str) -> Result<Option<EnrollmentGroup>, ApiError> {
    find_group(state, instance, |group| {
        (group.attestation.kind == AttestationType::Tpm).then_some(group)
    })
    .await
}

/// A TPM group member registers under the id its EK gives it, and proves its EK with a
/// certificate from a trusted manufacturer.
fn admit_to_group(
    state: &AppState,
    id: &RegistrationId,
    ek: &RsaPublic,
    payload: Option<&Value>,
) -> Result<(), ApiError> {
    let derived = registration_id(ek);
    if !id.as_str().eq_ignore_ascii_case(&derived) {
        return Err(ApiError::unauthorized(format!(
            "a device of a TPM enrollment group registers under the id derived from its endorsement key, '{derived}'"
        )));
    }
    let certificate = payload
        .and_then(|p| p.get(EK_CERTIFICATE_FIELD))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::unauthorized(format!(
                "a device of a TPM enrollment group sends its EK certificate (base64 DER) in payload.{EK_CERTIFICATE_FIELD}"
            ))
        })?;
    let der = STANDARD.decode(certificate.trim()).map_err(|_| {
        ApiError::invalid(format!("payload.{EK_CERTIFICATE_FIELD} is not base64"))
            .with_info("field", format!("payload.{EK_CERTIFICATE_FIELD}"))
    })?;
    verify_ek_certificate(&der, ek, &state.tpm.manufacturer_certificates, unix_now())
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

/// Step 2: a SAS token signed with the device's challenge key. `Ok(None)` when the device
/// has no challenge or the token is not signed with its key (it may be a symmetric-key
/// device).
pub async fn authenticate(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    token: &SasToken,
    purpose: Purpose,
) -> Result<Option<Attested>, ApiError> {
    let Some(stored) = state
        .store
        .get(instance, Kind::TpmChallenge, &id.key())
        .await?
    else {
        return Ok(None);
    };
    let record: ChallengeRecord = stored.doc_json()?;
    let key = SymmetricKey::from_base64(&record.key)
        .map_err(|e| ApiError::internal("a stored TPM challenge is corrupt", &e))?;
    if token.verify(&key).is_err() {
        return Ok(None);
    }
    match purpose {
        Purpose::Register if record.operation_id.is_some() => {
            return Err(ApiError::unauthorized(
                "this TPM challenge's key already started a registration; register without Authorization for a new challenge",
            ));
        }
        Purpose::Register if unix_now() > record.expires => {
            return Err(ApiError::unauthorized(
                "this TPM challenge has expired; register without Authorization for a new challenge",
            ));
        }
        Purpose::Poll | Purpose::Lookup if record.operation_id.is_none() => {
            return Err(ApiError::unauthorized(
                "this TPM challenge's key has not started a registration yet",
            ));
        }
        _ => {}
    }
    let corrupt =
        |e: attestation::tpm::TpmError| ApiError::internal("a stored TPM challenge is corrupt", &e);
    let ek =
        RsaPublic::from_base64(&record.endorsement_key, KeyRole::Endorsement).map_err(corrupt)?;
    let source = enrollment_of(state, instance, &record, &ek).await?;
    let disabled = match &source {
        Source::Individual(e) => disabled_reason(e),
        Source::Group(g) => group_disabled_reason(g),
    };
    // Only a register request needs the keys (for the hub key's blob) and the challenge.
    let tpm = if purpose == Purpose::Register {
        Some(TpmProof {
            ek,
            srk: RsaPublic::from_base64(&record.storage_root_key, KeyRole::StorageRoot)
                .map_err(corrupt)?,
            challenge: record,
            etag: stored.etag,
        })
    } else {
        None
    };
    Ok(Some(Attested {
        source,
        certificate: None,
        disabled,
        tpm,
    }))
}

/// The challenge's enrollment as it is now: still TPM, and still the same EK for an
/// individual enrollment (an admin may have changed it since the challenge).
async fn enrollment_of(
    state: &AppState,
    instance: &str,
    record: &ChallengeRecord,
    ek: &RsaPublic,
) -> Result<Source, ApiError> {
    let changed = || {
        ApiError::unauthorized(
            "the enrollment changed since the TPM challenge; register without Authorization for a new one",
        )
    };
    match &record.enrollment {
        EnrollmentRef::Individual(reg) => {
            let id = RegistrationId::parse(reg).map_err(|_| changed())?;
            let enrolled = individual_enrollment(state, instance, &id)
                .await?
                .ok_or_else(changed)?;
            if !enrolls(&enrolled, ek) {
                return Err(changed());
            }
            Ok(Source::Individual(Box::new(enrolled)))
        }
        EnrollmentRef::Group(group_id) => {
            let group = tpm_group(state, instance).await?.ok_or_else(changed)?;
            if !group.enrollment_group_id.eq_ignore_ascii_case(group_id) {
                return Err(changed());
            }
            Ok(Source::Group(Box::new(group)))
        }
    }
}
