//! Enrollment groups (`/enrollmentGroups`): the shared enrollment handlers of
//! [`super::enrollments`] for groups. Registration states stay when a group is deleted, as in
//! Azure; delete them through `/registrations`.

use axum::Router;
use axum::routing::{post, put};
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationMechanism, AttestationType, BulkItemError, BulkRequest, EnrollmentGroup,
    EnrollmentSettings,
};
use dps_protocol::ids::EnrollmentGroupId;
use serde_json::Value;

use super::AppState;
use super::enrollments::{
    Enrollment, attestation_mechanism, bulk, delete_one, get_one, put_one, query,
};
use super::validate::{Scope, field_error};
use crate::error::ApiError;
use crate::store::{Kind, Write};

impl Enrollment for EnrollmentGroup {
    const KIND: Kind = Kind::EnrollmentGroup;
    const SCOPE: Scope = Scope::Group;
    const ITEM_TYPE: &'static str = "EnrollmentGroup";
    const BULK_FIELD: &'static str = "enrollmentGroups";
    const ID_FIELD: &'static str = "enrollmentGroupId";

    fn key_of(id: &str) -> Result<String, ApiError> {
        EnrollmentGroupId::parse(id)
            .map(|g| g.key())
            .map_err(|e| ApiError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.enrollment_group_id
    }

    fn parts(&mut self) -> (&mut AttestationMechanism, &mut EnrollmentSettings) {
        (&mut self.attestation, &mut self.settings)
    }

    fn attestation(&self) -> &AttestationMechanism {
        &self.attestation
    }

    fn bulk_items(request: BulkRequest) -> Option<Vec<Value>> {
        request.enrollment_groups
    }

    fn check_own_fields(&mut self) -> Result<(), ApiError> {
        Ok(())
    }

    fn cascade_delete(_ns: &str, _key: &str) -> Vec<Write> {
        Vec::new()
    }

    fn credentials_write(ns: &str) -> Option<Write> {
        Some(crate::device_api::credentials::credentials_changed(ns))
    }

    fn bulk_error(id: Option<String>, error: &ApiError) -> BulkItemError {
        BulkItemError {
            registration_id: None,
            enrollment_group_id: id,
            error_code: error.code().number(),
            error_status: error.message().to_owned(),
        }
    }
}

/// A TPM enrollment group needs manufacturer certificates to admit anyone, and there is at
/// most one per instance (a device names no group: its EK certificate alone admits it).
pub async fn check_tpm_group(state: &AppState, ns: &str, key: &str) -> Result<(), ApiError> {
    if state.tpm.manufacturer_certificates.is_empty() {
        return Err(field_error(
            "attestation.type",
            "a TPM enrollment group admits devices by their EK certificate: configure the TPM manufacturer certificates (tpm.manufacturer_certificates) first",
        ));
    }
    let other = crate::device_api::auth::find_group(state, ns, |group| {
        (group.attestation.kind == AttestationType::Tpm
            && !group.enrollment_group_id.eq_ignore_ascii_case(key))
        .then_some(group.enrollment_group_id)
    })
    .await?;
    match other {
        Some(other) => Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "enrollment group '{other}' is this instance's TPM enrollment group; there can be one"
            ),
        )),
        None => Ok(()),
    }
}

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
