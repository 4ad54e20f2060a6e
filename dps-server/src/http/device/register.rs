//! `PUT /{idScope}/registrations/{id}/register`: a device starts a registration, or (a TPM
//! device's first request) gets its challenge.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{Caller, DeviceError, DevicePath, accepted, admit};
use crate::http::json::Json;
use crate::state::AppState;
use axum::http::StatusCode;
use dps_protocol::ErrorCode;
use dps_protocol::device::{DeviceRegistration, OperationStatus, RegistrationOperationStatus};

use super::trusted_metadata;
use crate::domain::DomainError;
use crate::domain::attest::{DeviceReads, Purpose};
use crate::domain::instances;
use crate::domain::registration;
use crate::http::json::RawBody;
/// `PUT /{idScope}/registrations/{id}/register`.
pub(super) async fn register(
    State(state): State<AppState>,
    path: DevicePath,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<Response, DeviceError> {
    let request: DeviceRegistration = if body.iter().all(u8::is_ascii_whitespace) {
        DeviceRegistration::default()
    } else {
        crate::http::json::parse(&body)?
    };
    if let Some(sent) = &request.registration_id
        && !sent.eq_ignore_ascii_case(path.id.as_str())
    {
        return Err(DomainError::new(
            ErrorCode::IdMismatch,
            format!(
                "the body's registrationId '{sent}' differs from the URL's '{}'",
                path.id
            ),
        )
        .into());
    }
    // DPS takes no TPM over MQTT (its SDKs have no TPM transport for it).
    if caller.transport == dps_listener::Transport::MQTT && request.tpm.is_some() {
        return Err(DomainError::unauthorized(
            "TPM attestation is not supported over MQTT; register over HTTPS",
        )
        .into());
    }
    // A TPM device's first request: no proof yet, so it gets a challenge. Issuing one is
    // unauthenticated work, charged like a failed proof.
    let tpm_keys = request.tpm.as_ref().filter(|_| caller.chain.is_none());
    if super::authorization(&caller.headers).is_none()
        && let Some(keys) = tpm_keys
    {
        let key = path.throttle_key();
        state.throttle.enter(&key, caller.address())?;
        state.throttle.unauthenticated(&key, caller.address())?;
        return fresh_challenge(&state, &path, &caller, keys, &request).await;
    }
    let admitted = match (
        admit(&state, &path, &caller, Purpose::Register).await,
        tpm_keys,
    ) {
        (Ok(admitted), _) => admitted,
        // A TPM device whose challenge expired, was used or was displaced gets a new one, as
        // on its first request: the C SDK reads any 401 without `status` as a challenge, so
        // an error body would break its parser. The failed proof was charged already.
        (Err(DeviceError::Api(e)), Some(keys)) if e.code() == ErrorCode::Unauthorized => {
            return fresh_challenge(&state, &path, &caller, keys, &request).await;
        }
        (Err(e), _) => return Err(e),
    };
    let source = caller.address();
    let metadata = trusted_metadata(&state, &caller.headers);
    let operation = registration::start(
        &state,
        &admitted.instance,
        &path.id,
        &admitted.attested,
        &admitted.reads,
        request.payload,
        request.csr,
        source,
        metadata,
        caller.transport.0,
    )
    .await?;
    // Always 202 `assigning`: aziot requires exactly 202, and the terminal state (even
    // `disabled`) is read by polling.
    Ok(accepted(
        &state,
        RegistrationOperationStatus {
            operation_id: operation.operation_id,
            status: OperationStatus::Assigning,
            registration_state: None,
        },
    ))
}

/// A new TPM challenge for the EK and SRK the request carries (step 1 of TPM attestation).
async fn fresh_challenge(
    state: &AppState,
    path: &DevicePath,
    caller: &Caller,
    keys: &dps_protocol::enrollment::TpmAttestation,
    request: &DeviceRegistration,
) -> Result<Response, DeviceError> {
    let instance = instances::of_scope(state, &path.scope).await?;
    let reads = DeviceReads::read(state, &instance, &path.id, None).await?;
    let challenge = crate::domain::attest::tpm::challenge(
        state,
        &instance,
        &path.id,
        keys,
        request.payload.as_ref(),
        caller.address(),
        &reads,
    )
    .await?;
    Ok(challenge_response(challenge))
}

/// The answer to a challenge: 401 with `{authenticationKey, keyName}` (the C SDK reads any
/// 401 body without `status` as a challenge; Node and aziot need the 401).
pub fn challenge_response(challenge: dps_protocol::device::TpmChallenge) -> Response {
    (StatusCode::UNAUTHORIZED, Json(challenge)).into_response()
}
