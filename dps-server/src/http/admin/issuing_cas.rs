//! An instance's issuing CAs (`/certificateAuthorities`) and credential policies
//! (`/credentialPolicies`); the rules are in [`crate::domain::issuing_cas`]. All need
//! `ServiceConfig`.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use dps_protocol::admin::{CertificateAuthority, CredentialPolicy};

use super::resource::{delete_one, get_one, list, same_id};
use crate::domain::{DomainError, issuing_cas};
use crate::http::extract::{Admin, Id, delete_precondition, needs, put_precondition};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;

/// Routes of `/certificateAuthorities` and `/credentialPolicies`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/certificateAuthorities", get(list::<CertificateAuthority>))
        .route(
            "/certificateAuthorities/{name}",
            get(get_one::<CertificateAuthority>)
                .put(put_ca)
                .delete(delete_ca),
        )
        .route("/credentialPolicies", get(list::<CredentialPolicy>))
        .route(
            "/credentialPolicies/{name}",
            get(get_one::<CredentialPolicy>)
                .put(put_policy)
                .delete(delete_one::<CredentialPolicy>),
        )
}

async fn put_ca(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
    JsonBody(ca): JsonBody<CertificateAuthority>,
) -> Result<Json<CertificateAuthority>, DomainError> {
    same_id(&ca, &name)?;
    let precondition = put_precondition(&headers)?;
    Ok(Json(
        issuing_cas::put_certificate_authority(&state, admin.ns(), ca, precondition).await?,
    ))
}

async fn delete_ca(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    issuing_cas::delete_certificate_authority(
        &state,
        admin.ns(),
        &name,
        delete_precondition(&headers)?,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_policy(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
    JsonBody(policy): JsonBody<CredentialPolicy>,
) -> Result<Json<CredentialPolicy>, DomainError> {
    same_id(&policy, &name)?;
    let precondition = put_precondition(&headers)?;
    Ok(Json(
        issuing_cas::put_credential_policy(&state, admin.ns(), policy, precondition).await?,
    ))
}
