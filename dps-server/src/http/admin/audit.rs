//! The audit log (`GET /auditLog`), filtered by query parameters and paged; the rules are in
//! [`crate::domain::audit`]. There is no route that changes it.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use dps_protocol::ErrorCode;

use crate::domain::{DomainError, audit};
use crate::http::extract::{Admin, PageRequest, needs};
use crate::state::AppState;

/// Routes of `/auditLog`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/auditLog", get(list))
}

/// `GET /auditLog`: the entries that match the filters, oldest first, paged. It needs
/// `ServiceConfig`: entries name every policy and what it changed.
async fn list(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    query: Result<Query<audit::Query>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let Query(query) = query.map_err(|e| {
        DomainError::new(
            ErrorCode::InvalidFormat,
            format!(
                "the query takes resourceKind, resourceId, policy, from and to: {}",
                e.body_text()
            ),
        )
    })?;
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = audit::list(
        &state,
        admin.ns(),
        &query,
        page.after.as_deref(),
        page.fetch_limit(),
    )
    .await?;
    page.respond(rows, "AuditEntry", audit::render)
}
