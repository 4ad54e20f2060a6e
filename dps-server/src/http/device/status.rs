//! `POST /{idScope}/registrations/{id}`: a device reads its registration state.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{Caller, DeviceError, DevicePath, admit};
use crate::domain::attest::Purpose;
use crate::domain::registrations;
use crate::http::json::Json;
use crate::state::AppState;
use crate::store::Kind;
/// `POST /{idScope}/registrations/{id}`: the device's registration state.
pub(super) async fn status_lookup(
    State(state): State<AppState>,
    path: DevicePath,
    caller: Caller,
) -> Result<Response, DeviceError> {
    let admitted = admit(&state, &path, &caller, Purpose::Lookup).await?;
    let stored = admitted
        .reads
        .registration
        .ok_or_else(|| crate::domain::error::not_found(Kind::RegistrationState, &path.id.key()))?;
    let answer = registrations::render(&stored)?;
    Ok(Json(answer).into_response())
}
