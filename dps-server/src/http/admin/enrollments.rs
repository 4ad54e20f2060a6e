//! Individual enrollments (`/enrollments`), and the handlers shared with enrollment groups:
//! create/update with the etag rules, read without secrets, delete, query with paging, bulk
//! operations and `attestationmechanism` (the one call that reveals keys, so it needs
//! `EnrollmentWrite`). The rules are in [`crate::domain::enrollments`].

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use dps_protocol::enrollment::{
    AttestationMechanism, BulkRequest, IndividualEnrollment, QuerySpecification,
};

use crate::domain::DomainError;
use crate::domain::enrollments::{self, Enrollment, render};
use crate::http::extract::{Admin, Id, PageRequest, delete_precondition, needs, put_precondition};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;

/// Routes of `/enrollments`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/enrollments", post(bulk::<IndividualEnrollment>))
        .route("/enrollments/query", post(query::<IndividualEnrollment>))
        .route(
            "/enrollments/{id}",
            put(put_one::<IndividualEnrollment>)
                .get(get_one::<IndividualEnrollment>)
                .delete(delete_one::<IndividualEnrollment>),
        )
        .route(
            "/enrollments/{id}/attestationmechanism",
            post(attestation_mechanism::<IndividualEnrollment>),
        )
}

/// `PUT /{kind}/{id}`: create, or update under the etag rules.
pub async fn put_one<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
    JsonBody(enrollment): JsonBody<E>,
) -> Result<Json<E>, DomainError> {
    tracing::Span::current().record("registration_id", id.as_str());
    let precondition = put_precondition(&headers)?;
    Ok(Json(
        enrollments::put(&state, admin.ns(), &id, enrollment, precondition).await?,
    ))
}

/// `GET /{kind}/{id}`: the enrollment without secrets.
pub async fn get_one<E: Enrollment>(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<E>, DomainError> {
    Ok(Json(enrollments::read(&state, admin.ns(), &id).await?))
}

/// `DELETE /{kind}/{id}`, with `If-Match` when sent.
pub async fn delete_one<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    enrollments::delete::<E>(&state, admin.ns(), &id, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /{kind}/{id}/attestationmechanism`: the attestation with its keys.
pub async fn attestation_mechanism<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<AttestationMechanism>, DomainError> {
    Ok(Json(
        enrollments::attestation::<E>(&state, admin.ns(), &id).await?,
    ))
}

/// `POST /{kind}/query`: every enrollment (DPS supports only select-all queries), paged.
pub async fn query<E: Enrollment>(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(spec): JsonBody<QuerySpecification>,
) -> Result<Response, DomainError> {
    tracing::debug!(query = %spec.query, "enrollment query (treated as select-all)");
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = enrollments::list::<E>(
        &state,
        admin.ns(),
        page.after.as_deref(),
        page.fetch_limit(),
    )
    .await?;
    page.respond(rows, E::ITEM_TYPE, |stored| render::<E>(stored, false))
}

/// `POST /{kind}`: a bulk operation. Each item succeeds or fails on its own.
pub async fn bulk<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BulkRequest>,
) -> Result<Response, DomainError> {
    Ok(Json(enrollments::bulk::<E>(&state, admin.ns(), request).await?).into_response())
}
