//! Registration events (`GET /events`), filtered by query parameters and paged; the rules are
//! in [`crate::domain::events`].

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use dps_protocol::ErrorCode;

use crate::domain::{DomainError, events};
use crate::http::extract::{Admin, PageRequest, needs};
use crate::state::AppState;

/// Routes of `/events`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/events", get(list))
}

async fn list(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    query: Result<Query<events::Query>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let Query(query) = query.map_err(|e| {
        DomainError::new(
            ErrorCode::InvalidFormat,
            format!(
                "the query takes kind, registrationId, enrollmentId, enrollmentGroupId, from and to: {}",
                e.body_text()
            ),
        )
    })?;
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = events::list(
        &state,
        admin.ns(),
        &query,
        page.after.as_deref(),
        page.fetch_limit(),
    )
    .await?;
    page.respond(rows, "Event", events::render)
}
