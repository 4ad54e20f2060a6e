//! CA certificates (`/certificates`), with proof of possession (`generateVerificationCode`,
//! `verify`); the rules are in [`crate::domain::certificates`].

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use dps_protocol::admin::CaCertificate;
use serde::Deserialize;

use super::resource::{get_one, list, put_one};
use crate::domain::{DomainError, certificates};
use crate::http::extract::{Admin, Id, delete_precondition, needs};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;

/// Routes of `/certificates`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/certificates", get(list::<CaCertificate>))
        .route(
            "/certificates/{name}",
            get(get_one::<CaCertificate>)
                .put(put_one::<CaCertificate>)
                .delete(delete_certificate),
        )
        .route(
            "/certificates/{name}/generateVerificationCode",
            post(generate_verification_code),
        )
        .route("/certificates/{name}/verify", post(verify))
}

/// `DELETE /certificates/{name}`: refused while an enrollment group names it.
async fn delete_certificate(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    certificates::delete(&state, admin.ns(), &name, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /certificates/{name}/generateVerificationCode`: the answer is the only place the
/// code is shown.
async fn generate_verification_code(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
) -> Result<Json<CaCertificate>, DomainError> {
    Ok(Json(
        certificates::new_verification_code(&state, admin.ns(), &name).await?,
    ))
}

/// The body of `verify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verification {
    /// PEM or base64 DER of a certificate whose CN is the verification code, signed by the CA.
    certificate: String,
}

/// `POST /certificates/{name}/verify`: proof of possession of the CA's key.
async fn verify(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    JsonBody(body): JsonBody<Verification>,
) -> Result<Json<CaCertificate>, DomainError> {
    Ok(Json(
        certificates::verify(&state, admin.ns(), &name, &body.certificate).await?,
    ))
}
