//! The registration state machine (DESIGN.md section 4).
//!
//! `start` stores an operation (`assigning`) and hands assignment to a task, so the device gets
//! its 202 at once. `assign` provisions the device (`provision`: the allocation policy, the
//! reprovision policy against the previous registration state, the hub connectors; the
//! decisions themselves are the pure functions of `decide`), and commits the new registration
//! state and the operation's result in one transaction, conditional on both etags: a device
//! that retries, or two replicas racing on one registration id, end in one consistent state. An
//! operation still `assigning` after a restart is finished by the next poll
//! (`load_operation`).

pub mod decide;
pub mod provision;

use dps_protocol::ErrorCode;
use dps_protocol::device::OperationStatus;
use dps_protocol::enrollment::X509RegistrationResult;
use dps_protocol::ids::RegistrationId;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cache::{Credential, FinishedOperation};
use crate::domain::attest::{Attested, DeviceReads, Source};
use crate::domain::credentials;
use crate::domain::error::DomainError;
use crate::domain::issuance::NotIssued;
use crate::domain::records::{
    EnrollmentRef, OperationRecord, RegistrationRecord, TpmOperation, operation_key,
};
use crate::domain::to_doc;
use crate::domain::validate::info_of;
use crate::domain::{events, issued_certificates};
use crate::state::AppState;
use crate::store::{Columns, Kind, Precondition, StoreError, Stored, Write};

/// How long a finished operation stays pollable.
const KEEP_FINISHED_SECS: i64 = 300;
/// How often `assign` re-reads and retries when a concurrent registration of the same id wins;
/// between attempts it pauses up to `RETRY_JITTER_MS` so racing attempts spread out.
const ATTEMPTS: usize = 30;
const RETRY_JITTER_MS: u64 = 20;

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

fn new_operation_id() -> String {
    // Azure's shape, `<digit>.<16 hex>.<uuid>`: only [A-Za-z0-9.-], safe in MQTT topics.
    let bytes: [u8; 8] = attestation::keys::random_bytes().unwrap_or_default();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("5.{hex}.{}", uuid::Uuid::new_v4())
}

/// Stores a new operation for an authenticated device and assigns it. A disabled enrollment
/// ends the operation at once (`disabled`), leaving the registration state as it is, and so
/// does a `csr` that cannot be served (`failed`, 400209 or 400210). When the
/// assignment needs nothing outside this process (the policy calls no webhook, the hubs'
/// connectors are `none`), it is decided first and committed with the operation in one
/// transaction; otherwise the operation is stored `assigning` and a task assigns it.
/// `reads` are what the device's request read (its registration state, the credentials
/// version); `csr` the certificate signing request it sent, if any.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    state: &AppState,
    ns: &str,
    id: &RegistrationId,
    attested: &Attested,
    reads: &DeviceReads,
    device_payload: Option<Value>,
    csr: Option<String>,
    source_address: Option<std::net::IpAddr>,
    metadata: std::collections::BTreeMap<String, String>,
    transport: &str,
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
        issued_certificate_chain: None,
        source_address,
        transport: Some(transport.to_owned()),
        attestation: Some(
            match (&attested.tpm, &attested.certificate) {
                (Some(_), _) => "tpm",
                (None, Some(_)) => "x509",
                (None, None) => "symmetricKey",
            }
            .to_owned(),
        ),
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
        record.registration_state = Some(decide::disabled(id, reason));
    }
    // A certificate is issued once per operation, before any hub is touched, and recorded in
    // the operation's transaction. A request that cannot be served ends the operation at
    // once, as a disabled enrollment does: nothing is issued or assigned, and the
    // registration state is left as it is.
    // The instance's credentials, as of the version the request read: for issuance and for
    // the assignment below, read (or found in memory) once.
    let configured = match record.status {
        OperationStatus::Assigning => {
            Some(credentials::at_version(state, ns, reads.credentials_version.clone()).await?)
        }
        _ => None,
    };
    let mut issued = None;
    if let (Some(csr), Some(configured)) = (&csr, &configured) {
        let policy = match &attested.source {
            Source::Individual(e) => e.settings.credential_policy_name.as_deref(),
            Source::Group(g) => g.settings.credential_policy_name.as_deref(),
        };
        let configured = configured.clone();
        // A token signs on a blocking thread (an HSM may take milliseconds, or longer to open).
        let (issuance, ns_owned, device, policy, csr) = (
            state.issuance.clone(),
            ns.to_owned(),
            id.as_str().to_owned(),
            policy.map(str::to_owned),
            csr.clone(),
        );
        let outcome = tokio::task::spawn_blocking(move || {
            issuance.issue(&ns_owned, &configured, policy.as_deref(), &device, &csr)
        })
        .await
        .map_err(|e| DomainError::internal("issuing a certificate", &e))?;
        match outcome {
            Ok(certificate) => {
                record.issued_certificate_chain = Some(certificate.chain.clone());
                issued = Some(issued_certificates::record(ns, &certificate)?);
            }
            Err(NotIssued(ErrorCode::ServiceUnavailable, message)) => {
                return Err(DomainError::new(ErrorCode::ServiceUnavailable, message));
            }
            Err(NotIssued(code, message)) => {
                record.status = OperationStatus::Failed;
                record.registration_state =
                    Some(decide::refused(id, decide::Failure(code, message)));
            }
        }
    }
    let key = operation_key(&record.operation_id);
    // Decided here when nothing outside the process is involved: the operation is then
    // written once, already finished.
    let previous = reads.registration.as_ref();
    let mut finished = None;
    if let (OperationStatus::Assigning, Some(configured)) = (record.status, &configured) {
        let previous_record: Option<RegistrationRecord> =
            previous.map(|s| s.doc_json()).transpose()?;
        let source = Some(attested.source.clone());
        let provisioned = provision::provision_locally(
            state,
            ns,
            configured,
            id,
            &record,
            previous_record.as_ref(),
            source,
        )
        .await;
        let outcome = match provisioned {
            Ok(Some(assigned)) => Some((assigned, OperationStatus::Assigned)),
            Ok(None) => None,
            Err(failure) => Some((
                decide::failed(id, &record, previous_record.as_ref(), failure),
                OperationStatus::Failed,
            )),
        };
        if let Some((assigned, status)) = outcome {
            let mut op = record.clone();
            let writes = finishing(
                state.event_retention,
                ns,
                id,
                &key,
                &mut op,
                assigned,
                status,
                previous.zip(previous_record.as_ref()),
                Precondition::MustNotExist,
            )?;
            finished = Some((op, writes));
        }
    }

    // A TPM challenge's key starts one registration: consumed with the operation's creation.
    // Another request may add a challenge meanwhile; then the challenges are read again.
    let mut fresh_challenges = false;
    let mut attempts = 0;
    loop {
        let mut batch = Vec::new();
        match &finished {
            Some((_, writes)) => batch.extend(writes.iter().cloned()),
            None => batch.push(Write::Put {
                ns: ns.to_owned(),
                kind: Kind::Operation,
                key: key.clone(),
                columns: Columns::Operation {
                    registration: id.key(),
                    expires_at: sweepable_after(record.status),
                },
                doc: to_doc(&record)?,
                precondition: Precondition::MustNotExist,
                etag: None,
            }),
        }
        // Ended at once (disabled, or a csr refused): its event goes with the operation.
        if finished.is_none() {
            batch.extend(events::of_outcome(
                state.event_retention,
                ns,
                &record,
                None,
            )?);
        }
        batch.extend(issued.iter().cloned());
        if let Some(proof) = &attested.tpm {
            batch.push(
                crate::domain::attest::tpm::consumption(
                    state,
                    ns,
                    id,
                    proof,
                    &record.operation_id,
                    fresh_challenges,
                )
                .await?,
            );
        }
        match state.store.write(&batch).await {
            Ok(_) => {
                events::committed(state, &batch);
                break;
            }
            Err(e) if attempts < ATTEMPTS && crate::domain::attest::tpm::lost_race(&e) => {
                fresh_challenges = true;
            }
            // A concurrent registration of the device committed first: the task decides again
            // on top of its result.
            Err(e) if finished.is_some() && registration_changed(&e) => finished = None,
            Err(e) => return Err(e.into()),
        }
        attempts += 1;
    }
    if let Some((op, _)) = finished {
        log_finished(id, &op);
        remember(state, ns, &key, &op, attested.credential.clone());
        return Ok(op);
    }
    if record.status == OperationStatus::Assigning {
        let task = {
            let state = state.clone();
            let (ns, key) = (ns.to_owned(), key.clone());
            // The enrollment authentication read: provisioning need not read it again.
            let source = (attested.source.clone(), attested.credential.clone());
            tokio::spawn(async move {
                if let Err(e) = assign(&state, &ns, &key, Some(source)).await {
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

/// Whether a write failed because the device's registration state changed since it was read.
fn registration_changed(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::EtagMismatch {
            kind: Kind::RegistrationState,
            ..
        } | StoreError::Exists {
            kind: Kind::RegistrationState,
            ..
        } | StoreError::NotFound {
            kind: Kind::RegistrationState,
            ..
        }
    )
}

/// The writes that finish operation `op` (stored under `key`, written under `op_precondition`)
/// with `status` and the device's new registration state `record`, conditional on the state
/// read before (`previous`). Sets the operation's result.
#[allow(clippy::too_many_arguments)]
fn finishing(
    events: Option<i64>,
    ns: &str,
    id: &RegistrationId,
    key: &str,
    op: &mut OperationRecord,
    mut record: RegistrationRecord,
    status: OperationStatus,
    previous: Option<(&Stored, &RegistrationRecord)>,
    op_precondition: Precondition,
) -> Result<Vec<Write>, DomainError> {
    let previous_hub = previous.and_then(|(_, r)| r.state.assigned_hub.clone());
    let previous = previous.map(|(stored, _)| stored);
    // The timestamps live in the store's bookkeeping; the device's answer shows them too.
    let now = crate::timestamp::now();
    record.state.created_date_time_utc =
        Some(previous.map_or_else(|| now.clone(), |s| s.created.clone()));
    record.state.last_updated_date_time_utc = Some(now);
    // Chosen before the write, so that the device's answer shows the state's etag too.
    let etag = crate::store::new_etag();
    record.state.etag = Some(etag.clone());
    op.status = status;
    // An issued chain is answered to the registration that asked for it, once assigned; the
    // stored registration state (and the status lookup reading it) does not carry it.
    let mut answered = record.state.clone();
    answered.issued_certificate_chain = op
        .issued_certificate_chain
        .take()
        .filter(|_| status == OperationStatus::Assigned);
    op.registration_state = Some(answered);
    let group_key = record
        .state
        .enrollment_group_id
        .as_ref()
        .map(|g| g.to_ascii_lowercase());
    // Counted per hub while the device is assigned there.
    let hub = record
        .state
        .assigned_hub
        .as_ref()
        .filter(|_| status == OperationStatus::Assigned)
        .map(|h| h.to_ascii_lowercase());
    let mut writes = vec![
        Write::Put {
            ns: ns.to_owned(),
            kind: Kind::RegistrationState,
            key: id.key(),
            columns: Columns::Registration {
                group: group_key,
                hub,
            },
            doc: to_doc(&record)?,
            precondition: previous.map_or(Precondition::MustNotExist, |s| {
                Precondition::IfMatch(s.etag.clone())
            }),
            etag: Some(etag),
        },
        Write::Put {
            ns: ns.to_owned(),
            kind: Kind::Operation,
            key: key.to_owned(),
            columns: Columns::Operation {
                registration: id.key(),
                expires_at: sweepable_after(status),
            },
            doc: to_doc(&*op)?,
            precondition: op_precondition,
            etag: None,
        },
    ];
    writes.extend(events::of_outcome(events, ns, op, previous_hub.as_deref())?);
    Ok(writes)
}

/// Keeps a finished operation in memory for its device's polls.
fn remember(state: &AppState, ns: &str, key: &str, op: &OperationRecord, credential: Credential) {
    state.finished.insert(
        ns,
        key,
        FinishedOperation {
            registration_id: op.registration_id.to_ascii_lowercase(),
            credential,
            answer: op.answer(),
        },
    );
}

fn log_finished(id: &RegistrationId, op: &OperationRecord) {
    tracing::info!(
        registration_id = %id,
        status = op.status.as_str(),
        hub = op
            .registration_state
            .as_ref()
            .and_then(|s| s.assigned_hub.as_deref())
            .unwrap_or("-"),
        "registration finished"
    );
}

/// The operation of `id` that the device's poll read (`stored`), finished first if it has been
/// `assigning` longer than `limits.resume_assigning_after_secs` (the server that started it may
/// have stopped).
pub async fn load_operation(
    state: &AppState,
    ns: &str,
    id: &RegistrationId,
    operation_id: &str,
    stored: Option<Stored>,
) -> Result<OperationRecord, DomainError> {
    let key = operation_key(operation_id);
    let not_found = || {
        DomainError::new(
            ErrorCode::OperationNotFound,
            format!("operation '{operation_id}' does not exist for this device"),
        )
    };
    let stored = stored.ok_or_else(not_found)?;
    let record: OperationRecord = stored.doc_json()?;
    if !record.registration_id.eq_ignore_ascii_case(id.as_str()) {
        return Err(not_found());
    }
    let resume_after = i64::try_from(state.limits.resume_assigning_after_secs).unwrap_or(i64::MAX);
    if record.status == OperationStatus::Assigning && age_secs(&stored) >= resume_after {
        assign(state, ns, &key, None).await?;
        let stored = state
            .store
            .get(ns, Kind::Operation, &key)
            .await?
            .ok_or_else(not_found)?;
        return stored.doc_json();
    }
    Ok(record)
}

/// When the sweeper may delete an operation in `status`: a finished one stays pollable for
/// `KEEP_FINISHED_SECS`, one still assigning stays until it finishes.
fn sweepable_after(status: OperationStatus) -> Option<i64> {
    let now = i64::try_from(crate::domain::unix_now()).unwrap_or(i64::MAX);
    status
        .is_terminal()
        .then(|| now.saturating_add(KEEP_FINISHED_SECS))
}

/// Seconds since the document was last written (unreadable timestamps count as old).
fn age_secs(stored: &Stored) -> i64 {
    OffsetDateTime::parse(&stored.updated, &Rfc3339).map_or(i64::MAX, |at| {
        (OffsetDateTime::now_utc() - at).whole_seconds()
    })
}

/// Finishes an `assigning` operation (no-op when another task already did). `source` is the
/// enrollment authentication read, for an operation just started; without it (a resumed
/// operation) the enrollment is read again.
pub async fn assign(
    state: &AppState,
    ns: &str,
    operation_key: &str,
    source: Option<(Source, Credential)>,
) -> Result<(), DomainError> {
    let (source, credential) = source.unzip();
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

        let configured = credentials::of(state, ns).await?;
        let provisioned = provision::provision(
            state,
            ns,
            &configured,
            &id,
            &op,
            previous.as_ref(),
            source.clone(),
        )
        .await;
        let (record, status) = match provisioned {
            Ok(record) => (record, OperationStatus::Assigned),
            Err(failure) => (
                decide::failed(&id, &op, previous.as_ref(), failure),
                OperationStatus::Failed,
            ),
        };
        let writes = finishing(
            state.event_retention,
            ns,
            &id,
            operation_key,
            &mut op,
            record,
            status,
            previous_stored.as_ref().zip(previous.as_ref()),
            Precondition::IfMatch(op_stored.etag.clone()),
        )?;
        match state.store.write(&writes).await {
            Ok(_) => {
                events::committed(state, &writes);
                log_finished(&id, &op);
                if let Some(credential) = credential {
                    remember(state, ns, operation_key, &op, credential);
                }
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
            Err(e) if registration_changed(&e) => {
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
