//! Individual enrollments and enrollment groups: validated and normalised before they are
//! stored under the etag rules, read without secrets, deleted with what goes with them, and
//! bulk operations in which each item succeeds or fails on its own.

use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationMechanism, AttestationType, BulkItemError, BulkMode, BulkRequest, BulkResult,
    DeviceRegistrationState, EnrollmentGroup, EnrollmentSettings, IndividualEnrollment,
};
use dps_protocol::ids::{EnrollmentGroupId, RegistrationId, check_device_id};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::validate::{self, Scope, Validator, field_error};
use super::{DomainError, load, normalize_etag, to_doc};
use crate::state::AppState;
use crate::store::{BulkDoc, Columns, Kind, Page, Precondition, StoreError, Stored, Write};

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
    fn key_of(id: &str) -> Result<String, DomainError>;
    /// The id in the body.
    fn id(&self) -> &str;
    /// The attestation and the shared settings.
    fn parts(&mut self) -> (&mut AttestationMechanism, &mut EnrollmentSettings);
    /// The attestation.
    fn attestation(&self) -> &AttestationMechanism;
    /// Takes this kind's items out of a bulk request.
    fn bulk_items(request: BulkRequest) -> Option<Vec<Value>>;
    /// Checks the fields only this kind has, and clears read-only ones.
    fn check_own_fields(&mut self) -> Result<(), DomainError>;
    /// Writes that go with deleting the enrollment.
    fn cascade_delete(ns: &str, key: &str) -> Vec<Write>;
    /// The write that tells caches of device credentials that this kind changed (groups are
    /// cached; individual enrollments are read by id on every request).
    fn credentials_write(_ns: &str) -> Option<Write> {
        None
    }
    /// Adds what a read shows beside the stored document.
    fn decorate(
        &mut self,
        _state: &AppState,
        _ns: &str,
    ) -> impl std::future::Future<Output = Result<(), DomainError>> + Send {
        async { Ok(()) }
    }
    /// A failed bulk item.
    fn bulk_error(id: Option<String>, error: &DomainError) -> BulkItemError;
}

impl Enrollment for IndividualEnrollment {
    const KIND: Kind = Kind::IndividualEnrollment;
    const SCOPE: Scope = Scope::Individual;
    const ITEM_TYPE: &'static str = "Enrollment";
    const BULK_FIELD: &'static str = "enrollments";
    const ID_FIELD: &'static str = "registrationId";

    fn key_of(id: &str) -> Result<String, DomainError> {
        RegistrationId::parse(id)
            .map(|r| r.key())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
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

    fn check_own_fields(&mut self) -> Result<(), DomainError> {
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

    async fn decorate(&mut self, state: &AppState, ns: &str) -> Result<(), DomainError> {
        let key = self.registration_id.to_ascii_lowercase();
        self.registration_state = Some(
            match state.store.get(ns, Kind::RegistrationState, &key).await? {
                Some(stored) => super::registrations::render(&stored)?,
                // As Azure answers for a device that never registered.
                None => DeviceRegistrationState {
                    registration_id: self.registration_id.clone(),
                    status: Some("unassigned".to_owned()),
                    ..DeviceRegistrationState::default()
                },
            },
        );
        Ok(())
    }

    fn bulk_error(id: Option<String>, error: &DomainError) -> BulkItemError {
        BulkItemError {
            registration_id: id,
            enrollment_group_id: None,
            error_code: error.code().number(),
            error_status: error.message().to_owned(),
        }
    }
}

impl Enrollment for EnrollmentGroup {
    const KIND: Kind = Kind::EnrollmentGroup;
    const SCOPE: Scope = Scope::Group;
    const ITEM_TYPE: &'static str = "EnrollmentGroup";
    const BULK_FIELD: &'static str = "enrollmentGroups";
    const ID_FIELD: &'static str = "enrollmentGroupId";

    fn key_of(id: &str) -> Result<String, DomainError> {
        EnrollmentGroupId::parse(id)
            .map(|g| g.key())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
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

    fn check_own_fields(&mut self) -> Result<(), DomainError> {
        Ok(())
    }

    fn cascade_delete(_ns: &str, _key: &str) -> Vec<Write> {
        Vec::new()
    }

    fn credentials_write(ns: &str) -> Option<Write> {
        Some(crate::domain::credentials::credentials_changed(ns))
    }

    fn bulk_error(id: Option<String>, error: &DomainError) -> BulkItemError {
        BulkItemError {
            registration_id: None,
            enrollment_group_id: id,
            error_code: error.code().number(),
            error_status: error.message().to_owned(),
        }
    }
}

/// A TPM enrollment group needs manufacturer certificates to admit anyone. (There is at most
/// one per instance, since a device names no group: its EK certificate alone admits it; the
/// database refuses a second.)
fn check_tpm_group(state: &AppState) -> Result<(), DomainError> {
    if state.tpm.manufacturer_certificates.is_empty() {
        return Err(field_error(
            "attestation.type",
            "a TPM enrollment group admits devices by their EK certificate: configure the TPM manufacturer certificates (tpm.manufacturer_certificates) first",
        ));
    }
    Ok(())
}

/// Refuses a new symmetric-key group once the instance has `limits.max_symmetric_key_groups`.
/// Checked before the write: concurrent creations may pass it together, so the bound can be
/// overshot by the number of writers racing, not more.
async fn check_room_for_sas_group(state: &AppState, ns: &str) -> Result<(), DomainError> {
    let max = state.limits.max_symmetric_key_groups;
    let counts = state.store.count_by(ns, Kind::EnrollmentGroup).await?;
    let count = counts
        .iter()
        .find(|(kind, _)| kind == AttestationType::SymmetricKey.as_str())
        .map_or(0, |(_, n)| *n);
    if usize::try_from(count).unwrap_or(usize::MAX) >= max {
        return Err(DomainError::new(
            ErrorCode::LimitReached,
            format!(
                "the instance has {count} symmetric-key enrollment groups, the most limits.max_symmetric_key_groups allows ({max}): every unauthenticated device request is tried against each of them"
            ),
        ));
    }
    Ok(())
}

/// The stored document with its etag and timestamps; secrets removed unless `reveal`.
pub fn render<E: Enrollment>(stored: &Stored, reveal: bool) -> Result<E, DomainError> {
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
        .map_err(|e| DomainError::internal("a stored enrollment is corrupt", &e))?;
    if !reveal {
        validate::hide_secrets(enrollment.parts().0);
    }
    Ok(enrollment)
}

/// Checks what an enrollment says beyond its attestation (its own fields, settings, CA
/// references, a TPM group's prerequisites) and returns its storage key.
async fn check<E: Enrollment>(
    state: &AppState,
    validator: &mut Validator<'_>,
    enrollment: &mut E,
) -> Result<String, DomainError> {
    let key = E::key_of(enrollment.id())?;
    enrollment.check_own_fields()?;
    validator.settings(enrollment.parts().1).await?;
    validator.ca_references(enrollment.parts().0).await?;
    if E::SCOPE == Scope::Group && enrollment.attestation().kind == AttestationType::Tpm {
        check_tpm_group(state)?;
    }
    Ok(key)
}

/// The typed columns an enrollment is stored with.
fn columns<E: Enrollment>(enrollment: &E) -> Columns {
    Columns::Attestation {
        attestation_type: enrollment.attestation().kind.as_str().to_owned(),
    }
}

/// Validates `enrollment` and stores it under `precondition`. `*` (Always) overwrites, keeping
/// stored keys the request omits; a concurrent writer makes it retry a few times. Returns what
/// was stored and whether it replaced a stored version.
pub async fn write<E: Enrollment>(
    state: &AppState,
    ns: &str,
    mut enrollment: E,
    precondition: Precondition,
) -> Result<(Stored, bool), DomainError> {
    let mut validator = Validator::new(state.store.as_ref(), &state.policies, ns);
    let key = check(state, &mut validator, &mut enrollment).await?;
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
        let was_sas_group = previous
            .as_ref()
            .is_some_and(|p| p.attestation().kind == AttestationType::SymmetricKey);
        if E::SCOPE == Scope::Group
            && candidate.attestation().kind == AttestationType::SymmetricKey
            && !was_sas_group
        {
            check_room_for_sas_group(state, ns).await?;
        }
        let effective = match (&precondition, &existing) {
            (Precondition::Always, Some(found)) => Precondition::IfMatch(found.etag.clone()),
            (Precondition::Always, None) => Precondition::MustNotExist,
            (other, _) => other.clone(),
        };
        let mut writes = vec![Write::Put {
            ns: ns.to_owned(),
            kind: E::KIND,
            key: key.clone(),
            columns: columns(&candidate),
            doc: to_doc(&candidate)?,
            precondition: effective,
            etag: None,
        }];
        writes.extend(E::credentials_write(ns));
        match state.store.write(&writes).await {
            Ok(written) => {
                let stored =
                    written.into_iter().next().flatten().ok_or_else(|| {
                        DomainError::internal("storing an enrollment", &"no result")
                    })?;
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
    Err(DomainError::new(
        ErrorCode::PreconditionFailed,
        "the enrollment kept changing while it was being replaced; try again",
    ))
}

fn check_path_id<E: Enrollment>(path_id: &str, enrollment: &E) -> Result<(), DomainError> {
    let path_key = E::key_of(path_id)?;
    if E::key_of(enrollment.id())? != path_key {
        return Err(DomainError::new(
            ErrorCode::IdMismatch,
            format!(
                "the id in the body ('{}') differs from the id in the path ('{path_id}')",
                enrollment.id()
            ),
        ));
    }
    Ok(())
}

/// Creates or updates `enrollment` (whose id must be `path_id`) under `precondition`. The
/// answer shows the keys the request sent or that were generated for it, not stored ones it
/// omitted.
pub async fn put<E: Enrollment>(
    state: &AppState,
    ns: &str,
    path_id: &str,
    enrollment: E,
    precondition: Precondition,
) -> Result<E, DomainError> {
    check_path_id(path_id, &enrollment)?;
    let sent = enrollment.attestation().clone();
    let (stored, replaced) = write(state, ns, enrollment, precondition).await?;
    let mut answer: E = render(&stored, true)?;
    if replaced {
        validate::hide_unsent_keys(answer.parts().0, &sent);
    }
    Ok(answer)
}

/// The enrollment `id` without secrets, with what reads show beside it.
pub async fn read<E: Enrollment>(state: &AppState, ns: &str, id: &str) -> Result<E, DomainError> {
    let stored = load(state.store.as_ref(), ns, E::KIND, &E::key_of(id)?).await?;
    let mut enrollment: E = render(&stored, false)?;
    enrollment.decorate(state, ns).await?;
    Ok(enrollment)
}

/// The attestation of `id` with its keys (as powerful as the right to change them).
pub async fn attestation<E: Enrollment>(
    state: &AppState,
    ns: &str,
    id: &str,
) -> Result<AttestationMechanism, DomainError> {
    let key = E::key_of(id)?;
    let stored = load(state.store.as_ref(), ns, E::KIND, &key).await?;
    let enrollment: E = render(&stored, true)?;
    super::audit::keys_read(state, ns, E::KIND, &key).await?;
    Ok(enrollment.attestation().clone())
}

/// Deletes `id`, with what goes with it.
pub async fn delete<E: Enrollment>(
    state: &AppState,
    ns: &str,
    id: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    delete_key::<E>(state, ns, &E::key_of(id)?, precondition).await
}

/// A page of enrollments in id order, after `after`: at most `limit` rows.
pub async fn list<E: Enrollment>(
    state: &AppState,
    ns: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Stored>, DomainError> {
    Ok(state
        .store
        .list(
            ns,
            E::KIND,
            Page {
                parent: None,
                after,
                limit,
            },
        )
        .await?)
}

/// A bulk operation; each item succeeds or fails on its own.
pub async fn bulk<E: Enrollment>(
    state: &AppState,
    ns: &str,
    request: BulkRequest,
) -> Result<BulkResult, DomainError> {
    let mode = BulkMode::parse(&request.mode).ok_or_else(|| {
        DomainError::new(
            ErrorCode::InvalidBulkOperation,
            format!(
                "unknown bulk mode '{}'; use create, update, updateIfMatchETag or delete",
                request.mode
            ),
        )
    })?;
    let items = E::bulk_items(request).ok_or_else(|| {
        DomainError::new(
            ErrorCode::ArgumentNull,
            format!("the bulk request needs a '{}' array", E::BULK_FIELD),
        )
    })?;
    if items.is_empty() || items.len() > state.limits.max_bulk_items {
        return Err(DomainError::new(
            ErrorCode::InvalidBulkOperation,
            format!(
                "a bulk request holds 1 to {} items, not {}",
                state.limits.max_bulk_items,
                items.len()
            ),
        ));
    }
    // An item whose JSON does not have the shape of the mode fails the whole request, as a
    // malformed body does; everything else about an item is its own failure.
    let items = items
        .into_iter()
        .enumerate()
        .map(|(at, item)| {
            BulkItem::<E>::parse(mode, item).map_err(|e| {
                DomainError::new(ErrorCode::InvalidFormat, format!("item {}: {e}", at + 1))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Creating individual enrollments, the bulk import of a fleet, writes many rows per
    // statement; the other modes, and kinds whose writes change the credentials version
    // (groups, which device authentication caches), go item by item.
    if mode == BulkMode::Create && E::credentials_write(ns).is_none() {
        return create_all::<E>(state, ns, items).await;
    }
    let mut errors = Vec::new();
    for item in items {
        let id = item.id().map(str::to_owned);
        if let Err(error) = bulk_item::<E>(state, ns, mode, item).await {
            errors.push(E::bulk_error(id, &error));
        }
    }
    Ok(BulkResult {
        is_successful: errors.is_empty(),
        errors,
    })
}

/// One item of a bulk request, as its mode reads it.
enum BulkItem<E> {
    /// An enrollment to create or update, with the etag it carries.
    Write { enrollment: E, etag: Option<String> },
    /// The id (if any) and etag of an enrollment to delete.
    Delete {
        id: Option<String>,
        etag: Option<String>,
    },
}

impl<E: Enrollment> BulkItem<E> {
    fn parse(mode: BulkMode, item: Value) -> Result<Self, String> {
        let etag = match item.get("etag") {
            None | Some(Value::Null) => None,
            Some(Value::String(tag)) => Some(normalize_etag(tag)),
            Some(_) => return Err("etag must be a string".to_owned()),
        };
        if mode != BulkMode::Delete {
            let enrollment = serde_json::from_value(item).map_err(|e| e.to_string())?;
            return Ok(Self::Write { enrollment, etag });
        }
        // A deletion names its item by id (and etag); nothing else of the item is read.
        if !item.is_object() {
            return Err("an item is a JSON object".to_owned());
        }
        let id = match item.get(E::ID_FIELD) {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(_) => return Err(format!("{} must be a string", E::ID_FIELD)),
        };
        Ok(Self::Delete { id, etag })
    }

    fn id(&self) -> Option<&str> {
        match self {
            Self::Write { enrollment, .. } => Some(enrollment.id()),
            Self::Delete { id, .. } => id.as_deref(),
        }
    }
}

/// Bulk `create` of a kind without a credentials write: every item is checked as a single
/// create would be, then the valid ones are written in one transaction, many rows per
/// statement. An item whose id exists, or that the request names twice, is refused on its own.
async fn create_all<E: Enrollment>(
    state: &AppState,
    ns: &str,
    items: Vec<BulkItem<E>>,
) -> Result<BulkResult, DomainError> {
    let mut validator = Validator::new(state.store.as_ref(), &state.policies, ns);
    // Failures by item position, so that they are answered in the request's order.
    let mut errors: Vec<(usize, BulkItemError)> = Vec::new();
    // The valid items' positions, ids and keys, and their documents in the same order.
    let mut valid: Vec<(usize, Option<String>, String)> = Vec::with_capacity(items.len());
    let mut docs: Vec<BulkDoc> = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for (at, item) in items.into_iter().enumerate() {
        let id = item.id().map(str::to_owned);
        let BulkItem::Write { mut enrollment, .. } = item else {
            continue;
        };
        let prepared = async {
            let key = check(state, &mut validator, &mut enrollment).await?;
            validate::attestation(E::SCOPE, enrollment.parts().0, None)?;
            Ok::<_, DomainError>(BulkDoc {
                columns: columns(&enrollment),
                doc: to_doc(&enrollment)?,
                key,
            })
        };
        match prepared.await {
            Ok(doc) if seen.insert(doc.key.clone()) => {
                valid.push((at, id, doc.key.clone()));
                docs.push(doc);
            }
            Ok(doc) => {
                let twice = DomainError::new(
                    ErrorCode::Conflict,
                    format!("'{}' appears twice in the request", doc.key),
                );
                errors.push((at, E::bulk_error(id, &twice)));
            }
            Err(error) => errors.push((at, E::bulk_error(id, &error))),
        }
    }
    let created: std::collections::HashSet<String> = state
        .store
        .insert_all(ns, E::KIND, docs)
        .await?
        .into_iter()
        .collect();
    for (at, id, key) in valid {
        if !created.contains(&key) {
            let exists = StoreError::Exists { kind: E::KIND, key };
            errors.push((at, E::bulk_error(id, &exists.into())));
        }
    }
    errors.sort_by_key(|(at, _)| *at);
    Ok(BulkResult {
        is_successful: errors.is_empty(),
        errors: errors.into_iter().map(|(_, e)| e).collect(),
    })
}

async fn delete_key<E: Enrollment>(
    state: &AppState,
    ns: &str,
    key: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
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

async fn bulk_item<E: Enrollment>(
    state: &AppState,
    ns: &str,
    mode: BulkMode,
    item: BulkItem<E>,
) -> Result<(), DomainError> {
    let (enrollment, etag) = match item {
        BulkItem::Write { enrollment, etag } => (enrollment, etag),
        BulkItem::Delete { id, etag } => {
            let id = id.ok_or_else(|| {
                DomainError::new(
                    ErrorCode::ArgumentNull,
                    format!("a delete item needs its '{}'", E::ID_FIELD),
                )
            })?;
            let precondition = Precondition::from_etag(etag, Precondition::Always);
            return delete_key::<E>(state, ns, &E::key_of(&id)?, precondition).await;
        }
    };
    let precondition = match mode {
        BulkMode::Create => Precondition::MustNotExist,
        BulkMode::UpdateIfMatchEtag => match etag {
            Some(tag) => Precondition::from_etag(Some(tag), Precondition::Always),
            None => {
                return Err(DomainError::new(
                    ErrorCode::ArgumentNull,
                    "updateIfMatchETag needs the item's etag",
                ));
            }
        },
        // (Delete items were answered above.)
        BulkMode::Update | BulkMode::Delete => Precondition::Always,
    };
    write(state, ns, enrollment, precondition).await?;
    Ok(())
}
