//! Individual enrollments (`/enrollments`), and the handlers shared with enrollment groups:
//! create/update with the etag rules, read without secrets, delete, query with paging, bulk
//! operations and `attestationmechanism` (the one call that reveals keys).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationMechanism, AttestationType, BulkItemError, BulkMode, BulkRequest, BulkResult,
    EnrollmentSettings, IndividualEnrollment, QuerySpecification,
};
use dps_protocol::ids::{RegistrationId, check_device_id};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::validate::{self, Scope, Validator, field_error};
use super::{
    Admin, AppState, Id, PageRequest, delete_precondition, needs, put_precondition, to_doc,
};
use crate::error::ApiError;
use crate::json::{Json, JsonBody};
use crate::store::{Kind, Page, Precondition, StoreError, Stored, Write};

/// What differs between individual enrollments and enrollment groups.
pub trait Enrollment: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Storage kind.
    const KIND: Kind;
    /// Validation scope.
    const SCOPE: Scope;
    /// `x-ms-item-type` of query answers.
    const ITEM_TYPE: &'static str;
    /// The JSON array of a bulk request holding these.
    const BULK_FIELD: &'static str;
    /// The id's field name.
    const ID_FIELD: &'static str;

    /// Parses an id from the path or body into its storage key.
    fn key_of(id: &str) -> Result<String, ApiError>;
    /// The id in the body.
    fn id(&self) -> &str;
    /// The attestation and the shared settings.
    fn parts(&mut self) -> (&mut AttestationMechanism, &mut EnrollmentSettings);
    /// The attestation.
    fn attestation(&self) -> &AttestationMechanism;
    /// Takes this kind's items out of a bulk request.
    fn bulk_items(request: BulkRequest) -> Option<Vec<Value>>;
    /// Checks the fields only this kind has, and clears read-only ones.
    fn check_own_fields(&mut self) -> Result<(), ApiError>;
    /// Writes that go with deleting the enrollment.
    fn cascade_delete(ns: &str, key: &str) -> Vec<Write>;
    /// The write that tells caches of device credentials that this kind changed (groups are
    /// cached; individual enrollments are read by id on every request).
    fn credentials_write(_ns: &str) -> Option<Write> {
        None
    }
    /// Adds what a read shows beside the stored document.
    async fn decorate(&mut self, _state: &AppState, _ns: &str) -> Result<(), ApiError> {
        Ok(())
    }
    /// A failed bulk item.
    fn bulk_error(id: Option<String>, error: &ApiError) -> BulkItemError;
}

impl Enrollment for IndividualEnrollment {
    const KIND: Kind = Kind::IndividualEnrollment;
    const SCOPE: Scope = Scope::Individual;
    const ITEM_TYPE: &'static str = "Enrollment";
    const BULK_FIELD: &'static str = "enrollments";
    const ID_FIELD: &'static str = "registrationId";

    fn key_of(id: &str) -> Result<String, ApiError> {
        RegistrationId::parse(id)
            .map(|r| r.key())
            .map_err(|e| ApiError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.registration_id
    }

    fn parts(&mut self) -> (&mut AttestationMechanism, &mut EnrollmentSettings) {
        (&mut self.attestation, &mut self.settings)
    }

    fn attestation(&self) -> &AttestationMechanism {
        &self.attestation
    }

    fn bulk_items(request: BulkRequest) -> Option<Vec<Value>> {
        request.enrollments
    }

    fn check_own_fields(&mut self) -> Result<(), ApiError> {
        if let Some(device_id) = &self.device_id {
            check_device_id(device_id).map_err(|e| field_error("deviceId", e.to_string()))?;
        }
        if let Some(info) = &self.optional_device_information
            && !(info.is_object() || info.is_null())
        {
            return Err(field_error(
                "optionalDeviceInformation",
                "optionalDeviceInformation must be an object",
            ));
        }
        self.registration_state = None;
        Ok(())
    }

    fn cascade_delete(ns: &str, key: &str) -> Vec<Write> {
        [Kind::RegistrationState, Kind::TpmChallenge]
            .into_iter()
            .map(|kind| Write::Purge {
                ns: ns.to_owned(),
                kind,
                key: key.to_owned(),
            })
            .collect()
    }

    async fn decorate(&mut self, state: &AppState, ns: &str) -> Result<(), ApiError> {
        let key = self.registration_id.to_ascii_lowercase();
        if let Some(stored) = state.store.get(ns, Kind::RegistrationState, &key).await? {
            self.registration_state = Some(super::registrations::render(&stored)?);
        }
        Ok(())
    }

    fn bulk_error(id: Option<String>, error: &ApiError) -> BulkItemError {
        BulkItemError {
            registration_id: id,
            enrollment_group_id: None,
            error_code: error.code().number(),
            error_status: error.message().to_owned(),
        }
    }
}

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

/// The stored document with its etag and timestamps; secrets removed unless `reveal`.
fn render<E: Enrollment>(stored: &Stored, reveal: bool) -> Result<E, ApiError> {
    let mut value: Value = stored.doc_json()?;
    if let Value::Object(map) = &mut value {
        map.insert("etag".into(), stored.etag.clone().into());
        map.insert("createdDateTimeUtc".into(), stored.created.clone().into());
        map.insert(
            "lastUpdatedDateTimeUtc".into(),
            stored.updated.clone().into(),
        );
    }
    let mut enrollment: E = serde_json::from_value(value)
        .map_err(|e| ApiError::internal("a stored enrollment is corrupt", &e))?;
    if !reveal {
        validate::hide_secrets(enrollment.parts().0);
    }
    Ok(enrollment)
}

/// Validates `enrollment` and stores it under `precondition`. `*` (Always) overwrites, keeping
/// stored keys the request omits; a concurrent writer makes it retry a few times. Returns what
/// was stored and whether it replaced a stored version.
async fn write<E: Enrollment>(
    state: &AppState,
    ns: &str,
    mut enrollment: E,
    precondition: Precondition,
) -> Result<(Stored, bool), ApiError> {
    let key = E::key_of(enrollment.id())?;
    enrollment.check_own_fields()?;
    let mut validator = Validator::new(state.store.as_ref(), &state.policies, ns);
    validator.settings(enrollment.parts().1).await?;
    validator.ca_references(enrollment.parts().0).await?;
    if E::SCOPE == Scope::Group && enrollment.attestation().kind == AttestationType::Tpm {
        super::enrollment_groups::check_tpm_group(state, ns, &key).await?;
    }
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let existing = match precondition {
            Precondition::MustNotExist => None,
            _ => state.store.get(ns, E::KIND, &key).await?,
        };
        let previous: Option<E> = existing.as_ref().map(|s| s.doc_json()).transpose()?;
        let mut candidate = enrollment.clone();
        validate::attestation(
            E::SCOPE,
            candidate.parts().0,
            previous.as_ref().map(E::attestation),
        )?;
        let effective = match (&precondition, &existing) {
            (Precondition::Always, Some(found)) => Precondition::IfMatch(found.etag.clone()),
            (Precondition::Always, None) => Precondition::MustNotExist,
            (other, _) => other.clone(),
        };
        let mut writes = vec![Write::Put {
            ns: ns.to_owned(),
            kind: E::KIND,
            key: key.clone(),
            parent: None,
            tag: None,
            doc: to_doc(&candidate)?,
            precondition: effective,
        }];
        writes.extend(E::credentials_write(ns));
        match state.store.write(&writes).await {
            Ok(written) => {
                let stored = written
                    .into_iter()
                    .next()
                    .flatten()
                    .ok_or_else(|| ApiError::internal("storing an enrollment", &"no result"))?;
                return Ok((stored, previous.is_some()));
            }
            Err(
                StoreError::Exists { .. }
                | StoreError::EtagMismatch { .. }
                | StoreError::NotFound { .. },
            ) if precondition == Precondition::Always && attempt < ATTEMPTS => {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        ErrorCode::PreconditionFailed,
        "the enrollment kept changing while it was being replaced; try again",
    ))
}

fn check_path_id<E: Enrollment>(path_id: &str, enrollment: &E) -> Result<(), ApiError> {
    let path_key = E::key_of(path_id)?;
    if E::key_of(enrollment.id())? != path_key {
        return Err(ApiError::new(
            ErrorCode::IdMismatch,
            format!(
                "the id in the body ('{}') differs from the id in the path ('{path_id}')",
                enrollment.id()
            ),
        ));
    }
    Ok(())
}

/// `PUT /{kind}/{id}`: create, or update under the etag rules. The answer shows the keys the
/// request sent or that were generated for it, not stored ones it omitted.
pub async fn put_one<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
    JsonBody(enrollment): JsonBody<E>,
) -> Result<Json<E>, ApiError> {
    tracing::Span::current().record("registration_id", id.as_str());
    check_path_id(&id, &enrollment)?;
    let sent = enrollment.attestation().clone();
    let (stored, replaced) =
        write(&state, admin.ns(), enrollment, put_precondition(&headers)?).await?;
    let mut answer: E = render(&stored, true)?;
    if replaced {
        validate::hide_unsent_keys(answer.parts().0, &sent);
    }
    Ok(Json(answer))
}

/// `GET /{kind}/{id}`: the enrollment without secrets.
pub async fn get_one<E: Enrollment>(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<E>, ApiError> {
    let key = E::key_of(&id)?;
    let stored = super::load(state.store.as_ref(), admin.ns(), E::KIND, &key).await?;
    let mut enrollment: E = render(&stored, false)?;
    enrollment.decorate(&state, admin.ns()).await?;
    Ok(Json(enrollment))
}

/// `DELETE /{kind}/{id}`, with `If-Match` when sent.
pub async fn delete_one<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let key = E::key_of(&id)?;
    delete_key::<E>(&state, admin.ns(), &key, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_key<E: Enrollment>(
    state: &AppState,
    ns: &str,
    key: &str,
    precondition: Precondition,
) -> Result<(), ApiError> {
    let mut writes = vec![Write::Delete {
        ns: ns.to_owned(),
        kind: E::KIND,
        key: key.to_owned(),
        precondition,
    }];
    writes.extend(E::cascade_delete(ns, key));
    writes.extend(E::credentials_write(ns));
    state.store.write(&writes).await?;
    Ok(())
}

/// `POST /{kind}/{id}/attestationmechanism`: the attestation with its keys. Keys are as
/// powerful as the right to change them, so this needs `EnrollmentWrite`.
pub async fn attestation_mechanism<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<AttestationMechanism>, ApiError> {
    let key = E::key_of(&id)?;
    let stored = super::load(state.store.as_ref(), admin.ns(), E::KIND, &key).await?;
    let enrollment: E = render(&stored, true)?;
    Ok(Json(enrollment.attestation().clone()))
}

/// `POST /{kind}/query`: every enrollment (DPS supports only select-all queries), paged.
pub async fn query<E: Enrollment>(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(spec): JsonBody<QuerySpecification>,
) -> Result<Response, ApiError> {
    tracing::debug!(query = %spec.query, "enrollment query (treated as select-all)");
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = state
        .store
        .list(
            admin.ns(),
            E::KIND,
            Page {
                parent: None,
                after: page.after.as_deref(),
                limit: page.fetch_limit(),
            },
        )
        .await?;
    page.respond(rows, E::ITEM_TYPE, |stored| render::<E>(stored, false))
}

/// `POST /{kind}`: a bulk operation. Each item succeeds or fails on its own.
pub async fn bulk<E: Enrollment>(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BulkRequest>,
) -> Result<Response, ApiError> {
    let mode = BulkMode::parse(&request.mode).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidBulkOperation,
            format!(
                "unknown bulk mode '{}'; use create, update, updateIfMatchETag or delete",
                request.mode
            ),
        )
    })?;
    let items = E::bulk_items(request).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ArgumentNull,
            format!("the bulk request needs a '{}' array", E::BULK_FIELD),
        )
    })?;
    if items.is_empty() || items.len() > state.limits.max_bulk_items {
        return Err(ApiError::new(
            ErrorCode::InvalidBulkOperation,
            format!(
                "a bulk request holds 1 to {} items, not {}",
                state.limits.max_bulk_items,
                items.len()
            ),
        ));
    }
    let mut errors = Vec::new();
    for item in items {
        let id = item
            .get(E::ID_FIELD)
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Err(error) = bulk_item::<E>(&state, admin.ns(), mode, item).await {
            errors.push(E::bulk_error(id, &error));
        }
    }
    Ok(Json(BulkResult {
        is_successful: errors.is_empty(),
        errors,
    })
    .into_response())
}

async fn bulk_item<E: Enrollment>(
    state: &AppState,
    ns: &str,
    mode: BulkMode,
    item: Value,
) -> Result<(), ApiError> {
    let etag = item
        .get("etag")
        .and_then(Value::as_str)
        .map(super::normalize_etag);
    let enrollment: E = serde_json::from_value(item)
        .map_err(|e| ApiError::new(ErrorCode::InvalidFormat, format!("invalid item: {e}")))?;
    match mode {
        BulkMode::Create => write(state, ns, enrollment, Precondition::MustNotExist).await?,
        BulkMode::Update => write(state, ns, enrollment, Precondition::Always).await?,
        BulkMode::UpdateIfMatchEtag => {
            let etag = etag.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ArgumentNull,
                    "updateIfMatchETag needs the item's etag",
                )
            })?;
            write(state, ns, enrollment, Precondition::IfMatch(etag)).await?
        }
        BulkMode::Delete => {
            let key = E::key_of(enrollment.id())?;
            let precondition = etag.map_or(Precondition::Always, Precondition::IfMatch);
            delete_key::<E>(state, ns, &key, precondition).await?;
            return Ok(());
        }
    };
    Ok(())
}
