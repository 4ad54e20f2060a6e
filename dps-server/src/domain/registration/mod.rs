//! The registration state machine (DESIGN.md section 4).
//!
//! `start` stores an operation (`assigning`) and hands assignment to a task, so the device gets
//! its 202 at once. `assign` chooses a hub, applies the reprovision policy against the previous
//! registration state, tells the hub, and commits the new registration state and the
//! operation's result in one transaction, conditional on both etags: a device that retries, or
//! two replicas racing on one registration id, end in one consistent state. An operation still
//! `assigning` after a restart is finished by the next poll (`resume_if_stale`).

use allocation_policies::ownership::{DeviceKey, DeviceKeyKind};
use allocation_policies::policy::{Allocation, Candidate, Device, healthy_first};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{Instance, LinkedHub};
use dps_protocol::device::OperationStatus;
use dps_protocol::enrollment::{
    AttestationType, DeviceRegistrationState, EnrollmentGroup, EnrollmentSettings,
    IndividualEnrollment, SymmetricKeyRegistrationResult, TpmRegistrationResult,
    X509CertificateWithInfo, X509RegistrationResult,
};
use dps_protocol::ids::RegistrationId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::access::load_instance;
use crate::domain::attest::{Attested, Source};
use crate::domain::error::DomainError;
use crate::domain::to_doc;
use crate::domain::validate::info_of;
use crate::hubs::{self, DeviceIdentity, HubAuth};
use crate::state::AppState;
use crate::store::{Kind, Page, Precondition, StoreError, Stored, Write};

/// How long a finished operation stays pollable.
const KEEP_FINISHED_SECS: i64 = 300;
/// How often `assign` re-reads and retries when a concurrent registration of the same id wins;
/// between attempts it pauses up to `RETRY_JITTER_MS` so racing attempts spread out.
const ATTEMPTS: usize = 30;
const RETRY_JITTER_MS: u64 = 20;

/// Which enrollment a registration came through (stored, so a resumed operation finds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "camelCase")]
pub enum EnrollmentRef {
    /// An individual enrollment (by registration id).
    Individual(String),
    /// An enrollment group (by group id).
    Group(String),
}

/// A registration attempt, polled by the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationRecord {
    /// What the device polls with.
    pub operation_id: String,
    /// The device, as it sent its id.
    pub registration_id: String,
    /// Where the attempt is.
    pub status: OperationStatus,
    /// The enrollment it came through.
    pub enrollment: EnrollmentRef,
    /// The payload the device sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
    /// The address the device registered from (an input of allocation policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<std::net::IpAddr>,
    /// Trusted request metadata (location headers of a trusted edge).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// X.509 devices: the certificate they presented and the group certificate it reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// TPM devices: their hub key and the activation blob that carries it to their TPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmOperation>,
    /// The result, once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
}

/// What a TPM device's registration hands on: a fresh key for the hub, and the activation
/// blob that carries it into the device's TPM (`registrationState.tpm.authenticationKey`).
/// Made once when the operation starts, so a retried assignment gives the hub the same key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmOperation {
    /// Base64 activation blob.
    pub authentication_key: String,
    /// Base64 HMAC key inside it: the device's hub key.
    pub hub_key: String,
    /// SHA-256 of the EK's TPM2B_PUBLIC, hex (ownership records may name it).
    pub ek_hash: String,
}

impl TpmOperation {
    fn new(proof: &crate::domain::attest::tpm::TpmProof) -> Result<Self, DomainError> {
        let activation = attestation::tpm::activation_blob(&proof.ek, &proof.srk)
            .map_err(|e| DomainError::internal("building a TPM activation blob", &e))?;
        Ok(Self {
            authentication_key: activation.blob_base64(),
            hub_key: activation.key.to_base64(),
            ek_hash: proof.ek.sha256_hex(),
        })
    }
}

/// A device's registration state as stored: the wire state plus what reprovisioning needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// What the admin API and the device see.
    #[serde(flatten)]
    pub state: DeviceRegistrationState,
    /// The hub of the first assignment (for `reprovisionedToInitialAssignment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_hub: Option<String>,
    /// The payload the device sent last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
}

fn new_operation_id() -> String {
    // Azure's shape, `<digit>.<16 hex>.<uuid>`: only [A-Za-z0-9.-], safe in MQTT topics.
    let bytes: [u8; 8] = attestation::keys::random_bytes().unwrap_or_default();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("5.{hex}.{}", uuid::Uuid::new_v4())
}

/// The case-folded storage key of an operation id.
pub fn operation_key(operation_id: &str) -> String {
    operation_id.to_ascii_lowercase()
}

/// Stores a new operation for an authenticated device and starts assigning it. A disabled
/// enrollment ends the operation at once (`disabled`), leaving the registration state as it is.
pub async fn start(
    state: &AppState,
    ns: &str,
    id: &RegistrationId,
    attested: &Attested,
    device_payload: Option<Value>,
    source_address: Option<std::net::IpAddr>,
    metadata: std::collections::BTreeMap<String, String>,
) -> Result<OperationRecord, DomainError> {
    let enrollment = match &attested.source {
        Source::Individual(e) => EnrollmentRef::Individual(e.registration_id.clone()),
        Source::Group(g) => EnrollmentRef::Group(g.enrollment_group_id.clone()),
    };
    let mut record = OperationRecord {
        operation_id: new_operation_id(),
        registration_id: id.as_str().to_owned(),
        status: OperationStatus::Assigning,
        enrollment,
        device_payload,
        source_address,
        metadata,
        x509: attested
            .certificate
            .as_ref()
            .map(|(leaf, anchor)| X509RegistrationResult {
                certificate_info: Some(info_of(leaf.clone())),
                enrollment_group_id: None,
                signing_certificate_info: anchor.clone().map(info_of),
            }),
        tpm: match (&attested.tpm, &attested.disabled) {
            (Some(proof), None) => Some(TpmOperation::new(proof)?),
            _ => None,
        },
        registration_state: None,
    };
    if let Some(reason) = &attested.disabled {
        record.status = OperationStatus::Disabled;
        record.registration_state = Some(DeviceRegistrationState {
            registration_id: id.as_str().to_owned(),
            status: Some(OperationStatus::Disabled.as_str().to_owned()),
            error_code: Some(i64::from(ErrorCode::EnrollmentDisabled.number())),
            error_message: Some(reason.clone()),
            ..DeviceRegistrationState::default()
        });
    }
    // Finished operations of this device older than KEEP_FINISHED_SECS go with each new attempt,
    // so storage stays bounded while a device that retries can still poll its earlier attempt.
    let older = state
        .store
        .list(
            ns,
            Kind::Operation,
            Page {
                parent: Some(&id.key()),
                after: None,
                limit: 100,
            },
        )
        .await?;
    let mut writes: Vec<Write> = older
        .into_iter()
        .filter(|old| {
            let finished = old
                .doc_json::<OperationRecord>()
                .is_ok_and(|op| op.status.is_terminal());
            finished && age_secs(old) >= KEEP_FINISHED_SECS
        })
        .map(|old| Write::Purge {
            ns: ns.to_owned(),
            kind: Kind::Operation,
            key: old.key,
        })
        .collect();
    writes.push(Write::Put {
        ns: ns.to_owned(),
        kind: Kind::Operation,
        key: operation_key(&record.operation_id),
        parent: Some(id.key()),
        tag: None,
        doc: to_doc(&record)?,
        precondition: Precondition::MustNotExist,
    });
    // A TPM challenge's key starts one registration: consumed with the operation's creation.
    // Another request may add a challenge meanwhile; then the consumption is read again.
    let mut attempts = 0;
    loop {
        let mut batch = writes.clone();
        if let Some(proof) = &attested.tpm {
            batch.push(
                crate::domain::attest::tpm::consumption(
                    state,
                    ns,
                    id,
                    &proof.challenge.key,
                    &record.operation_id,
                )
                .await?,
            );
        }
        match state.store.write(&batch).await {
            Ok(_) => break,
            Err(e) if crate::domain::attest::tpm::lost_race(&e) && attempts < ATTEMPTS => {
                attempts += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if record.status == OperationStatus::Assigning {
        let task = {
            let state = state.clone();
            let (ns, key) = (ns.to_owned(), operation_key(&record.operation_id));
            tokio::spawn(async move {
                if let Err(e) = assign(&state, &ns, &key).await {
                    tracing::warn!(operation = %key, error = %e.message(), "assignment did not finish; the next poll retries it");
                }
            })
        };
        // The answer is 202 `assigning` either way, but waiting a little for the assignment
        // lets the device's first poll find it finished: fewer polls, each a request with
        // reads. Past the budget the task goes on alone (a dropped handle does not cancel it).
        let budget = std::time::Duration::from_millis(state.limits.assign_wait_ms);
        let _ = tokio::time::timeout(budget, task).await;
    }
    Ok(record)
}

/// Loads an operation of `id`, finishing it first if it has been `assigning` longer than
/// `limits.resume_assigning_after_secs` (the server that started it may have stopped).
pub async fn load_operation(
    state: &AppState,
    ns: &str,
    id: &RegistrationId,
    operation_id: &str,
) -> Result<OperationRecord, DomainError> {
    let key = operation_key(operation_id);
    let not_found = || {
        DomainError::new(
            ErrorCode::OperationNotFound,
            format!("operation '{operation_id}' does not exist for this device"),
        )
    };
    let stored = state
        .store
        .get(ns, Kind::Operation, &key)
        .await?
        .ok_or_else(not_found)?;
    let record: OperationRecord = stored.doc_json()?;
    if !record.registration_id.eq_ignore_ascii_case(id.as_str()) {
        return Err(not_found());
    }
    let resume_after = i64::try_from(state.limits.resume_assigning_after_secs).unwrap_or(i64::MAX);
    if record.status == OperationStatus::Assigning && age_secs(&stored) >= resume_after {
        assign(state, ns, &key).await?;
        let stored = state
            .store
            .get(ns, Kind::Operation, &key)
            .await?
            .ok_or_else(not_found)?;
        return stored.doc_json();
    }
    Ok(record)
}

/// Seconds since the document was last written (unreadable timestamps count as old).
fn age_secs(stored: &Stored) -> i64 {
    OffsetDateTime::parse(&stored.updated, &Rfc3339).map_or(i64::MAX, |at| {
        (OffsetDateTime::now_utc() - at).whole_seconds()
    })
}

/// Finishes an `assigning` operation (no-op when another task already did).
pub async fn assign(state: &AppState, ns: &str, operation_key: &str) -> Result<(), DomainError> {
    for _ in 0..ATTEMPTS {
        let Some(op_stored) = state.store.get(ns, Kind::Operation, operation_key).await? else {
            return Ok(());
        };
        let mut op: OperationRecord = op_stored.doc_json()?;
        if op.status.is_terminal() {
            return Ok(());
        }
        let id = RegistrationId::parse(&op.registration_id)
            .map_err(|e| DomainError::internal("a stored operation is corrupt", &e))?;
        let previous_stored = state
            .store
            .get(ns, Kind::RegistrationState, &id.key())
            .await?;
        let previous: Option<RegistrationRecord> =
            previous_stored.as_ref().map(|s| s.doc_json()).transpose()?;

        let (mut record, status) = match outcome(state, ns, &id, &op, previous.as_ref()).await {
            Ok(record) => (record, OperationStatus::Assigned),
            Err(failure) => (
                failed(&id, &op, previous.as_ref(), failure),
                OperationStatus::Failed,
            ),
        };
        // The timestamps live in the store's bookkeeping; the device's answer shows them too.
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        record.state.created_date_time_utc = Some(
            previous_stored
                .as_ref()
                .map_or_else(|| now.clone(), |s| s.created.clone()),
        );
        record.state.last_updated_date_time_utc = Some(now);
        op.status = status;
        op.registration_state = Some(record.state.clone());
        let group_key = record
            .state
            .enrollment_group_id
            .as_ref()
            .map(|g| g.to_ascii_lowercase());
        let writes = [
            Write::Put {
                ns: ns.to_owned(),
                kind: Kind::RegistrationState,
                key: id.key(),
                parent: group_key,
                // Counted per hub while the device is assigned there.
                tag: (status == OperationStatus::Assigned)
                    .then(|| {
                        record
                            .state
                            .assigned_hub
                            .as_ref()
                            .map(|h| h.to_ascii_lowercase())
                    })
                    .flatten(),
                doc: to_doc(&record)?,
                precondition: previous_stored
                    .as_ref()
                    .map_or(Precondition::MustNotExist, |s| {
                        Precondition::IfMatch(s.etag.clone())
                    }),
            },
            Write::Put {
                ns: ns.to_owned(),
                kind: Kind::Operation,
                key: operation_key.to_owned(),
                parent: Some(id.key()),
                tag: None,
                doc: to_doc(&op)?,
                precondition: Precondition::IfMatch(op_stored.etag.clone()),
            },
        ];
        match state.store.write(&writes).await {
            Ok(_) => {
                tracing::info!(
                    registration_id = %id,
                    status = status.as_str(),
                    hub = record.state.assigned_hub.as_deref().unwrap_or("-"),
                    "registration finished"
                );
                return Ok(());
            }
            // Another task finished this operation: its answer stands.
            Err(
                StoreError::EtagMismatch {
                    kind: Kind::Operation,
                    ..
                }
                | StoreError::NotFound {
                    kind: Kind::Operation,
                    ..
                },
            ) => {
                return Ok(());
            }
            // A concurrent registration of the same device committed first: decide again on
            // top of its result.
            Err(
                StoreError::EtagMismatch {
                    kind: Kind::RegistrationState,
                    ..
                }
                | StoreError::Exists {
                    kind: Kind::RegistrationState,
                    ..
                }
                | StoreError::NotFound {
                    kind: Kind::RegistrationState,
                    ..
                },
            ) => {
                let [byte] = attestation::keys::random_bytes::<1>().unwrap_or([7]);
                let pause = u64::from(byte) * RETRY_JITTER_MS / 255;
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(DomainError::new(
        ErrorCode::Conflict,
        "the registration kept changing under concurrent attempts",
    ))
}

/// Why an assignment failed: a code and a message for the device.
struct Failure(ErrorCode, String);

impl From<DomainError> for Failure {
    fn from(e: DomainError) -> Self {
        Failure(e.code(), e.message().to_owned())
    }
}

fn failed(
    id: &RegistrationId,
    op: &OperationRecord,
    previous: Option<&RegistrationRecord>,
    Failure(code, message): Failure,
) -> RegistrationRecord {
    let mut record = previous.cloned().unwrap_or_default();
    record.state.registration_id = id.as_str().to_owned();
    record.state.status = Some(OperationStatus::Failed.as_str().to_owned());
    record.state.error_code = Some(i64::from(code.number()));
    record.state.error_message = Some(message);
    if let EnrollmentRef::Group(group) = &op.enrollment {
        record.state.enrollment_group_id = Some(group.clone());
    }
    record.device_payload = op.device_payload.clone();
    record
}

async fn outcome(
    state: &AppState,
    ns: &str,
    id: &RegistrationId,
    op: &OperationRecord,
    previous: Option<&RegistrationRecord>,
) -> Result<RegistrationRecord, Failure> {
    let instance = match state.instances.instances.get(ns) {
        Some(instance) => instance,
        None => {
            let instance = load_instance(state.store.as_ref(), ns).await?;
            state
                .instances
                .instances
                .insert(ns.to_owned(), instance.clone());
            instance
        }
    };
    let (settings, device_id, keys, group_id, public) = match &op.enrollment {
        EnrollmentRef::Individual(reg) => {
            let stored = crate::domain::load(
                state.store.as_ref(),
                ns,
                Kind::IndividualEnrollment,
                &reg.to_ascii_lowercase(),
            )
            .await?;
            let e: IndividualEnrollment = stored.doc_json()?;
            let keys = e
                .attestation
                .symmetric_key
                .as_ref()
                .and_then(|k| Some((k.primary_key.clone()?, k.secondary_key.clone()?)));
            let thumbprints = e
                .attestation
                .x509
                .as_ref()
                .and_then(|x| x.client_certificates.as_ref())
                .map(|certs| {
                    let sha1 = |c: &Option<X509CertificateWithInfo>| {
                        c.as_ref()
                            .and_then(|c| c.info.as_ref())
                            .map(|i| i.sha1_thumbprint.clone())
                    };
                    (sha1(&certs.primary), sha1(&certs.secondary))
                });
            let keys = match (keys, thumbprints) {
                (Some((primary_key, secondary_key)), _) => HubAuth::Sas {
                    primary_key,
                    secondary_key,
                },
                (None, Some((Some(primary_thumbprint), secondary_thumbprint))) => {
                    HubAuth::SelfSigned {
                        primary_thumbprint,
                        secondary_thumbprint,
                    }
                }
                _ => HubAuth::None,
            };
            let device_id = e
                .device_id
                .clone()
                .unwrap_or_else(|| id.as_str().to_owned());
            let mut shown = e.clone();
            crate::domain::validate::hide_secrets(&mut shown.attestation);
            (e.settings, device_id, keys, None, to_value(&shown)?)
        }
        EnrollmentRef::Group(group) => {
            let stored = crate::domain::load(
                state.store.as_ref(),
                ns,
                Kind::EnrollmentGroup,
                &group.to_ascii_lowercase(),
            )
            .await?;
            let g: EnrollmentGroup = stored.doc_json()?;
            let keys = g.attestation.symmetric_key.as_ref().and_then(|k| {
                let derive = |key: &Option<String>| {
                    attestation::SymmetricKey::from_base64(key.as_deref()?)
                        .ok()
                        .map(|k| k.derive_device_key(id.as_str()).to_base64())
                };
                Some((derive(&k.primary_key)?, derive(&k.secondary_key)?))
            });
            let keys = match keys {
                Some((primary_key, secondary_key)) => HubAuth::Sas {
                    primary_key,
                    secondary_key,
                },
                None if g.attestation.kind == AttestationType::X509 => {
                    HubAuth::CertificateAuthority
                }
                None => HubAuth::None,
            };
            let mut shown = g.clone();
            crate::domain::validate::hide_secrets(&mut shown.attestation);
            let public = to_value(&shown)?;
            (
                g.settings,
                id.as_str().to_owned(),
                keys,
                Some(g.enrollment_group_id),
                public,
            )
        }
    };
    // A TPM device's hub key is the one its second activation blob carries.
    let keys = match &op.tpm {
        Some(tpm) => HubAuth::Sas {
            primary_key: tpm.hub_key.clone(),
            secondary_key: tpm.hub_key.clone(),
        },
        None => keys,
    };
    let metadata = op.metadata.clone();
    let certificate = op.x509.as_ref().and_then(|x| x.certificate_info.as_ref());
    let hardware_ids: Vec<DeviceKey> = certificate
        .and_then(|c| DeviceKey::new(DeviceKeyKind::CertificateSerial, &c.serial_number).ok())
        .into_iter()
        .chain(
            op.tpm
                .as_ref()
                .and_then(|t| DeviceKey::new(DeviceKeyKind::EkHash, &t.ek_hash).ok()),
        )
        .collect();
    let device = Device {
        instance: ns,
        registration_id: id.as_str(),
        attestation: if op.tpm.is_some() {
            "tpm"
        } else if certificate.is_some() {
            "x509"
        } else {
            "symmetricKey"
        },
        enrollment: &public,
        enrollment_group_id: group_id.as_deref(),
        payload: op.device_payload.as_ref(),
        source_address: op.source_address,
        metadata: &metadata,
        previous_hub: previous.and_then(|p| p.state.assigned_hub.as_deref()),
        hardware_ids: &hardware_ids,
    };
    let plan = plan(state, ns, &instance, &device, &settings, previous).await?;
    let identity = DeviceIdentity {
        device_id: device_id.clone(),
        auth: keys,
        iot_edge: settings.capabilities.as_ref().is_some_and(|c| c.iot_edge),
        initial_twin: plan
            .initial_twin
            .clone()
            .or_else(|| settings.initial_twin.clone()),
    };
    // The twin a hub is given: none when the device stays (its live twin is kept); on a move,
    // the old hub's twin when the reprovision policy migrates data, else the initial twin.
    let migrate = settings
        .reprovision_policy
        .as_ref()
        .is_none_or(|p| p.migrate_device_data);
    let old_device = previous
        .and_then(|p| p.state.device_id.clone())
        .unwrap_or_else(|| device_id.clone());
    let mut migrated_twin: Option<Option<Value>> = None;
    // First choice first; a hub whose connector fails is skipped (and counts as unhealthy for
    // a while) without asking the policy again.
    let mut failures = Vec::new();
    let mut chosen = None;
    for hub in &plan.order {
        let staying = plan
            .previous_hub
            .as_deref()
            .is_some_and(|old| old.eq_ignore_ascii_case(&hub.host_name));
        let mut identity = identity.clone();
        if staying {
            identity.initial_twin = None;
        } else if migrate && let Some(old) = &plan.previous_hub {
            if migrated_twin.is_none() {
                migrated_twin = Some(match load_hub(state, ns, old).await {
                    Some(old_hub) => hubs::read_twin(&state.connectors, &old_hub, &old_device)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(hub = %old, error = %e, "cannot read the twin to migrate; using the initial twin");
                            None
                        }),
                    None => None,
                });
            }
            if let Some(Some(twin)) = &migrated_twin {
                identity.initial_twin = Some(twin.clone());
            }
        }
        match hubs::upsert(&state.connectors, hub, &identity).await {
            Ok(()) => {
                state.hub_health.mark_healthy(&hub.host_name);
                chosen = Some(hub.clone());
                break;
            }
            Err(e) => {
                tracing::warn!(hub = %hub.host_name, error = %e, "hub connector failed; trying the next hub");
                state.hub_health.mark_failed(&hub.host_name);
                failures.push(e.to_string());
            }
        }
    }
    let hub = chosen.ok_or_else(|| {
        Failure(
            ErrorCode::ServiceUnavailable,
            format!("no hub could take the device: {}", failures.join("; ")),
        )
    })?;
    let decision = settle(&hub.host_name, &plan, &settings, previous);
    if let Some(old) = &decision.moved_from
        && let Some(old_hub) = load_hub(state, ns, old).await
        && let Err(e) = hubs::remove(&state.connectors, &old_hub, &old_device).await
    {
        tracing::warn!(hub = %old, error = %e, "could not remove the device from its previous hub");
    }
    Ok(RegistrationRecord {
        state: DeviceRegistrationState {
            registration_id: id.as_str().to_owned(),
            assigned_hub: Some(hub.host_name.clone()),
            device_id: Some(device_id),
            status: Some(OperationStatus::Assigned.as_str().to_owned()),
            substatus: decision.substatus,
            payload: plan.payload.clone(),
            enrollment_group_id: group_id.clone(),
            symmetric_key: (op.x509.is_none() && op.tpm.is_none()).then(|| {
                SymmetricKeyRegistrationResult {
                    enrollment_group_id: group_id.clone(),
                }
            }),
            tpm: op.tpm.as_ref().map(|t| TpmRegistrationResult {
                authentication_key: t.authentication_key.clone(),
            }),
            x509: op.x509.clone().map(|x| X509RegistrationResult {
                enrollment_group_id: group_id,
                ..x
            }),
            ..DeviceRegistrationState::default()
        },
        initial_hub: Some(decision.initial_hub),
        device_payload: op.device_payload.clone(),
    })
}

/// The hubs to try, in order, under the reprovision policy.
struct Plan {
    order: Vec<LinkedHub>,
    previous_hub: Option<String>,
    /// What a custom allocation webhook returned for the device.
    payload: Option<Value>,
    /// The twin a custom allocation webhook chose (it overrides the enrollment's).
    initial_twin: Option<Value>,
}

/// Where the device ends up and how that is described.
struct Decision {
    substatus: Option<String>,
    initial_hub: String,
    moved_from: Option<String>,
}

async fn plan(
    state: &AppState,
    ns: &str,
    instance: &Instance,
    device: &Device<'_>,
    settings: &EnrollmentSettings,
    previous: Option<&RegistrationRecord>,
) -> Result<Plan, Failure> {
    let previous_hub = previous.and_then(|p| p.state.assigned_hub.clone());
    let reprovision = settings.reprovision_policy.clone().unwrap_or_default();
    if let Some(old) = &previous_hub
        && !reprovision.update_hub_assignment
    {
        // Sticky: the device stays on its hub.
        let hub = load_hub(state, ns, old).await.ok_or_else(|| {
            Failure(
                ErrorCode::NoHubAvailable,
                format!("the device's hub '{old}' is no longer linked and its enrollment does not allow moving it"),
            )
        })?;
        // Azure still calls a custom webhook, for a new payload; the hub stays.
        let (payload, initial_twin) = if policy_name(instance, settings) == "custom" {
            let candidates = candidate_hubs(state, ns, settings).await?;
            let allocation = allocate(state, instance, device, settings, &candidates).await?;
            (allocation.payload, allocation.initial_twin)
        } else {
            (None, None)
        };
        return Ok(Plan {
            order: vec![hub],
            previous_hub,
            payload,
            initial_twin,
        });
    }
    let candidates = candidate_hubs(state, ns, settings).await?;
    let allocation = allocate(state, instance, device, settings, &candidates).await?;
    let mut ranked = allocation.ranked;
    ranked.dedup();
    let order: Vec<LinkedHub> = ranked
        .iter()
        .filter_map(|host| {
            candidates
                .iter()
                .find(|c| c.host_name.eq_ignore_ascii_case(host))
        })
        .cloned()
        .collect();
    if order.is_empty() {
        return Err(Failure(
            ErrorCode::NoHubAvailable,
            "no linked hub is available for this device: link a hub, or name one on the enrollment"
                .into(),
        ));
    }
    Ok(Plan {
        order,
        previous_hub,
        payload: allocation.payload,
        initial_twin: allocation.initial_twin,
    })
}

/// The substatus of landing on `chosen`, given where the device was (Azure's values).
fn settle(
    chosen: &str,
    plan: &Plan,
    settings: &EnrollmentSettings,
    previous: Option<&RegistrationRecord>,
) -> Decision {
    let Some(old) = &plan.previous_hub else {
        return Decision {
            substatus: Some("initialAssignment".into()),
            initial_hub: chosen.to_owned(),
            moved_from: None,
        };
    };
    let initial_hub = previous
        .and_then(|p| p.initial_hub.clone())
        .unwrap_or_else(|| old.clone());
    if chosen.eq_ignore_ascii_case(old) {
        return Decision {
            substatus: previous.and_then(|p| p.state.substatus.clone()),
            initial_hub,
            moved_from: None,
        };
    }
    let migrate = settings
        .reprovision_policy
        .as_ref()
        .is_none_or(|p| p.migrate_device_data);
    let substatus = if chosen.eq_ignore_ascii_case(&initial_hub) {
        "reprovisionedToInitialAssignment"
    } else if migrate {
        "deviceDataMigrated"
    } else {
        "deviceDataReset"
    };
    Decision {
        substatus: Some(substatus.into()),
        initial_hub,
        moved_from: Some(old.clone()),
    }
}

/// The policy for these settings: the enrollment's, else the instance default, else `hashed`.
pub fn policy_name<'a>(instance: &'a Instance, settings: &'a EnrollmentSettings) -> &'a str {
    settings
        .allocation_policy
        .as_deref()
        .or(instance.default_allocation_policy.as_deref())
        .unwrap_or("hashed")
}

async fn allocate(
    state: &AppState,
    instance: &Instance,
    device: &Device<'_>,
    settings: &EnrollmentSettings,
    hubs: &[LinkedHub],
) -> Result<Allocation, Failure> {
    run_policy(state, policy_name(instance, settings), device, hubs)
        .await
        .map_err(|message| Failure(ErrorCode::NoHubAvailable, message))
}

/// Runs the policy registered as `name` over `hubs`: host names ranked, healthy hubs first.
pub async fn run_policy(
    state: &AppState,
    name: &str,
    device: &Device<'_>,
    hubs: &[LinkedHub],
) -> Result<Allocation, String> {
    let (_, policy) = state
        .policies
        .get(name)
        .ok_or_else(|| format!("unknown allocation policy '{name}'"))?;
    if hubs.is_empty() {
        return Err(
            "no linked hub is available for this device: link a hub, or name one on the enrollment"
                .into(),
        );
    }
    let candidates: Vec<Candidate> = hubs.iter().map(|h| candidate_of(state, h)).collect();
    let mut allocation = policy
        .allocate(device, &candidates)
        .await
        .map_err(|e| e.to_string())?;
    allocation.ranked.retain(|host| {
        candidates
            .iter()
            .any(|c| c.host_name.eq_ignore_ascii_case(host))
    });
    allocation.ranked = healthy_first(allocation.ranked, &candidates);
    Ok(allocation)
}

fn candidate_of(state: &AppState, hub: &LinkedHub) -> Candidate {
    Candidate {
        host_name: hub.host_name.clone(),
        weight: hub.allocation_weight.unwrap_or(1),
        region: hub.region.clone(),
        location: hub.latitude.zip(hub.longitude),
        healthy: state.hub_health.is_healthy(&hub.host_name),
    }
}

fn to_value<T: Serialize>(value: &T) -> Result<Value, DomainError> {
    serde_json::to_value(value).map_err(|e| DomainError::internal("serialising an enrollment", &e))
}

async fn load_hub(state: &AppState, ns: &str, host: &str) -> Option<LinkedHub> {
    let stored = state
        .store
        .get(ns, Kind::LinkedHub, &host.to_ascii_lowercase())
        .await
        .ok()??;
    stored.doc_json().ok()
}

/// The enrollment's hubs if it names any, else every linked hub that takes part in allocation.
pub async fn candidate_hubs(
    state: &AppState,
    ns: &str,
    settings: &EnrollmentSettings,
) -> Result<Vec<LinkedHub>, DomainError> {
    let mut named: Vec<String> = settings.iot_hubs.clone().unwrap_or_default();
    if let Some(single) = &settings.iot_hub_host_name {
        named.push(single.clone());
    }
    if !named.is_empty() {
        let mut hubs = Vec::new();
        for host in named {
            if let Some(hub) = load_hub(state, ns, &host).await
                && !hubs
                    .iter()
                    .any(|h: &LinkedHub| h.host_name == hub.host_name)
            {
                hubs.push(hub);
            }
        }
        return Ok(hubs);
    }
    let rows = state
        .store
        .list(
            ns,
            Kind::LinkedHub,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.doc_json::<LinkedHub>().ok())
        .filter(|hub| hub.apply_allocation_policy.unwrap_or(true))
        .collect())
}
