//! Registration states (`/registrations`): read, delete (so that a device registers afresh),
//! and list the states of an enrollment group's devices.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use dps_protocol::enrollment::DeviceRegistrationState;

use crate::domain::{DomainError, registrations};
use crate::http::extract::{Admin, Id, PageRequest, delete_precondition, needs};
use crate::http::json::Json;
use crate::state::AppState;

/// Routes of `/registrations`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/registrations/{id}", get(get_one).delete(delete_one))
        .route("/registrations/{id}/query", post(query_group))
}

async fn get_one(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<DeviceRegistrationState>, DomainError> {
    tracing::Span::current().record("registration_id", id.as_str());
    Ok(Json(registrations::read(&state, admin.ns(), &id).await?))
}

async fn delete_one(
    admin: Admin<needs::RegistrationStatusWrite>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    tracing::Span::current().record("registration_id", id.as_str());
    registrations::delete(&state, admin.ns(), &id, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /registrations/{groupId}/query`. The Node client sends a query specification as the
/// body; the spec has none. Either is accepted and the body is ignored.
async fn query_group(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    Id(group_id): Id,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = registrations::of_group(
        &state,
        admin.ns(),
        &group_id,
        page.after.as_deref(),
        page.fetch_limit(),
    )
    .await?;
    page.respond(rows, "DeviceRegistration", registrations::render)
}
