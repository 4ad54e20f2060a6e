//! Registration states as admins see them: read, deleted (so that a device registers afresh),
//! and listed by the enrollment group the devices registered through.

use dps_protocol::ErrorCode;
use dps_protocol::enrollment::DeviceRegistrationState;
use dps_protocol::ids::{EnrollmentGroupId, RegistrationId};

use super::{DomainError, load};
use crate::state::AppState;
use crate::store::{Kind, Page, Precondition, Stored, Write};

/// A stored registration state with its etag and timestamps.
pub fn render(stored: &Stored) -> Result<DeviceRegistrationState, DomainError> {
    let mut state: DeviceRegistrationState = stored.doc_json()?;
    state.etag = Some(stored.etag.clone());
    state.created_date_time_utc = Some(stored.created.clone());
    state.last_updated_date_time_utc = Some(stored.updated.clone());
    Ok(state)
}

fn registration_key(id: &str) -> Result<String, DomainError> {
    RegistrationId::parse(id)
        .map(|r| r.key())
        .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
}

/// The registration state of `id`.
pub async fn read(
    state: &AppState,
    ns: &str,
    id: &str,
) -> Result<DeviceRegistrationState, DomainError> {
    let key = registration_key(id)?;
    render(&load(state.store.as_ref(), ns, Kind::RegistrationState, &key).await?)
}

/// Deletes the registration state of `id`.
pub async fn delete(
    state: &AppState,
    ns: &str,
    id: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    let delete = Write::Delete {
        ns: ns.to_owned(),
        kind: Kind::RegistrationState,
        key: registration_key(id)?,
        precondition,
    };
    state.store.write(&[delete]).await?;
    Ok(())
}

/// A page of the registration states of group `group_id`'s devices, after `after`.
pub async fn of_group(
    state: &AppState,
    ns: &str,
    group_id: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Stored>, DomainError> {
    let group = EnrollmentGroupId::parse(group_id)
        .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))?
        .key();
    Ok(state
        .store
        .list(
            ns,
            Kind::RegistrationState,
            Page {
                parent: Some(&group),
                after,
                limit,
            },
        )
        .await?)
}
