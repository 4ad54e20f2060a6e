//! `GET /{idScope}/registrations/{id}/operations/{operationId}`: a device polls its
//! registration.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{Caller, DeviceError, DevicePath, accepted, admit};
use crate::http::json::Json;
use crate::state::AppState;
use dps_protocol::device::{OperationStatus, RegistrationOperationStatus};
use dps_protocol::enrollment::DeviceRegistrationState;

use crate::domain::attest::Purpose;
use crate::domain::registration;
/// `GET /{idScope}/registrations/{id}/operations/{operationId}`. The Node client sends a body
/// (`{}`) with it; it is ignored.
pub(super) async fn operation_status(
    State(state): State<AppState>,
    path: DevicePath,
    caller: Caller,
) -> Result<Response, DeviceError> {
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
        let answer = RegistrationOperationStatus {
            operation_id: operation.operation_id,
            status: operation.status,
            registration_state: operation.registration_state,
        };
        return Ok(Json(answer).into_response());
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
