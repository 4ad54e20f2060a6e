//! Enrollment groups (`/enrollmentGroups`): the shared enrollment handlers of
//! [`super::enrollments`] for groups. Registration states stay when a group is deleted, as in
//! Azure; delete them through `/registrations`.

use axum::Router;
use axum::routing::{post, put};
use dps_protocol::enrollment::EnrollmentGroup;

use super::enrollments::{attestation_mechanism, bulk, delete_one, get_one, put_one, query};
use crate::state::AppState;

/// Routes of `/enrollmentGroups`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/enrollmentGroups", post(bulk::<EnrollmentGroup>))
        .route("/enrollmentGroups/query", post(query::<EnrollmentGroup>))
        .route(
            "/enrollmentGroups/{id}",
            put(put_one::<EnrollmentGroup>)
                .get(get_one::<EnrollmentGroup>)
                .delete(delete_one::<EnrollmentGroup>),
        )
        .route(
            "/enrollmentGroups/{id}/attestationmechanism",
            post(attestation_mechanism::<EnrollmentGroup>),
        )
}
