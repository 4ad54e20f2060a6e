//! Issued operational certificates (`/issuedCertificates`): listed (all, or a device's under
//! `/registrations/{id}/issuedCertificates`), read and revoked; the rules are in
//! [`crate::domain::issued_certificates`].

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use dps_protocol::admin::{IssuedCertificate, Revocation};

use crate::domain::{DomainError, issued_certificates};
use crate::http::extract::{Admin, Id, PageRequest, needs};
use crate::http::json::{Json, RawBody, parse};
use crate::state::AppState;

/// Routes of `/issuedCertificates`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/issuedCertificates", get(list_all))
        .route("/issuedCertificates/{serialNumber}", get(get_one))
        .route("/issuedCertificates/{serialNumber}/revoke", post(revoke))
        .route("/registrations/{id}/issuedCertificates", get(list_device))
}

async fn list_all(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    list(&state, admin.ns(), None, &headers).await
}

async fn list_device(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    tracing::Span::current().record("registration_id", id.as_str());
    list(&state, admin.ns(), Some(&id), &headers).await
}

/// A page of records, in serial-number order.
async fn list(
    state: &AppState,
    ns: &str,
    registration_id: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, DomainError> {
    let page = PageRequest::from_headers(headers, &state.limits)?;
    let rows = issued_certificates::list(
        state,
        ns,
        registration_id,
        page.after.as_deref(),
        page.fetch_limit(),
    )
    .await?;
    page.respond(rows, "IssuedCertificate", issued_certificates::render)
}

async fn get_one(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    Id(serial): Id,
) -> Result<Json<IssuedCertificate>, DomainError> {
    Ok(Json(
        issued_certificates::read(&state, admin.ns(), &serial).await?,
    ))
}

/// `POST /issuedCertificates/{serialNumber}/revoke`, with an optional body `{"reason": ...}`:
/// changing who is admitted takes the right to change enrollments.
async fn revoke(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(serial): Id,
    RawBody(body): RawBody,
) -> Result<Json<IssuedCertificate>, DomainError> {
    let revocation: Revocation = if body.iter().all(u8::is_ascii_whitespace) {
        Revocation::default()
    } else {
        parse(&body)?
    };
    Ok(Json(
        issued_certificates::revoke(&state, admin.ns(), &serial, revocation.reason).await?,
    ))
}
