//! Registration states (`/registrations`): read, delete (so that a device registers afresh),
//! and list the states of an enrollment group's devices.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::DeviceRegistrationState;
use dps_protocol::ids::{EnrollmentGroupId, RegistrationId};

use super::{Admin, AppState, Id, PageRequest, delete_precondition, needs};
use crate::error::ApiError;
use crate::json::Json;
use crate::store::{Kind, Page, Stored, Write};

/// Routes of `/registrations`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/registrations/{id}", get(get_one).delete(delete_one))
        .route("/registrations/{id}/query", post(query_group))
}

/// A stored registration state with its etag and timestamps.
pub fn render(stored: &Stored) -> Result<DeviceRegistrationState, ApiError> {
    let mut state: DeviceRegistrationState = stored.doc_json()?;
    state.etag = Some(stored.etag.clone());
    state.created_date_time_utc = Some(stored.created.clone());
    state.last_updated_date_time_utc = Some(stored.updated.clone());
    Ok(state)
}

fn registration_key(id: &str) -> Result<String, ApiError> {
    RegistrationId::parse(id)
        .map(|r| r.key())
        .map_err(|e| ApiError::new(ErrorCode::InvalidPathParameter, e.to_string()))
}

async fn get_one(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<DeviceRegistrationState>, ApiError> {
    tracing::Span::current().record("registration_id", id.as_str());
    let key = registration_key(&id)?;
    let stored = super::load(
        state.store.as_ref(),
        admin.ns(),
        Kind::RegistrationState,
        &key,
    )
    .await?;
    Ok(Json(render(&stored)?))
}

async fn delete_one(
    admin: Admin<needs::RegistrationStatusWrite>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    tracing::Span::current().record("registration_id", id.as_str());
    let delete = Write::Delete {
        ns: admin.ns().to_owned(),
        kind: Kind::RegistrationState,
        key: registration_key(&id)?,
        precondition: delete_precondition(&headers)?,
    };
    state.store.write(&[delete]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /registrations/{groupId}/query`. The Node client sends a query specification as the
/// body; the spec has none. Either is accepted and the body is ignored.
async fn query_group(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    Id(group_id): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let group = EnrollmentGroupId::parse(&group_id)
        .map_err(|e| ApiError::new(ErrorCode::InvalidPathParameter, e.to_string()))?
        .key();
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = state
        .store
        .list(
            admin.ns(),
            Kind::RegistrationState,
            Page {
                parent: Some(&group),
                after: page.after.as_deref(),
                limit: page.fetch_limit(),
            },
        )
        .await?;
    page.respond(rows, "DeviceRegistration", render)
}
