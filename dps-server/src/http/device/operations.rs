//! `GET /{idScope}/registrations/{id}/operations/{operationId}`: a device polls its
//! registration.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use dps_protocol::device::{OperationStatus, RegistrationOperationStatus};
use dps_protocol::enrollment::DeviceRegistrationState;

use super::{Caller, DeviceError, DevicePath, accepted, admit, authorization};
use crate::domain::attest::{self, Purpose};
use crate::domain::records::operation_key;
use crate::domain::{instances, registration};
use crate::http::json::Json;
use crate::state::AppState;
use crate::throttle::Action;

/// `GET /{idScope}/registrations/{id}/operations/{operationId}`. The Node client sends a body
/// (`{}`) with it; it is ignored.
pub(super) async fn operation_status(
    State(state): State<AppState>,
    path: DevicePath,
    caller: Caller,
) -> Result<Response, DeviceError> {
    if let Some(answer) = finished_lately(&state, &path, &caller).await? {
        return Ok(Json(answer).into_response());
    }
    let admitted = admit(&state, &path, &caller, Purpose::Poll).await?;
    let operation_id = path.operation.clone().unwrap_or_default();
    let operation = registration::load_operation(
        &state,
        &admitted.instance,
        &path.id,
        &operation_id,
        admitted.reads.operation,
    )
    .await?;
    if operation.status.is_terminal() {
        return Ok(Json(operation.answer()).into_response());
    }
    // aziot's parser needs registrationState.registrationId even while assigning.
    Ok(accepted(
        &state,
        RegistrationOperationStatus {
            operation_id: operation.operation_id,
            status: OperationStatus::Assigning,
            registration_state: Some(DeviceRegistrationState {
                registration_id: path.id.as_str().to_owned(),
                status: Some(OperationStatus::Assigning.as_str().to_owned()),
                ..DeviceRegistrationState::default()
            }),
        },
    ))
}

/// The answer to a poll of an operation this process finished lately, from memory, when the
/// request proves again what registered the device (the same key's token, the same
/// certificate). Anything else goes the whole way: the store, and the failure charged.
async fn finished_lately(
    state: &AppState,
    path: &DevicePath,
    caller: &Caller,
) -> Result<Option<RegistrationOperationStatus>, DeviceError> {
    let Some(operation) = &path.operation else {
        return Ok(None);
    };
    let Ok(instance) = instances::of_scope(state, &path.scope).await else {
        return Ok(None);
    };
    let Some(done) = state.finished.get(&instance, &operation_key(operation)) else {
        return Ok(None);
    };
    let chain = caller.chain.as_ref().map(|c| c.0.as_slice());
    let proven = done.registration_id == path.id.key()
        && attest::proves(
            state,
            &done.credential,
            &path.scope,
            &path.id,
            authorization(&caller.headers),
            chain,
        );
    if !proven {
        return Ok(None);
    }
    let key = path.throttle_key();
    state.throttle.enter(&key, caller.address())?;
    state.throttle.authenticated(Action::Poll, &key)?;
    Ok(Some(done.answer.clone()))
}
