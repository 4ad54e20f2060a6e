//! Ownership, for the `ownership` allocation policy: owners and their hubs (`/owners`), and
//! records that say who owns a device (`/ownershipRecords`), imported in bulk from CSV or
//! JSON lines and moved between owners by transfers.
//!
//! A record names a device by its registration id, its certificate serial or its EK hash
//! (normalised by [`DeviceKey`]) and is stored under `<kind>:<value>` with the owner as both
//! parent (to list an owner's devices) and tag (to count them).

use allocation_policies::device_key::{DeviceKey, DeviceKeyKind};
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{Owner, OwnershipRecord, OwnershipTransfer};

use super::resource::{get_one, list, put_one};
use crate::domain::error::DomainError;
use crate::domain::load;
use crate::domain::ownership::{self, Format, render_record};
use crate::domain::resources::Resource;
use crate::http::extract::{Admin, Id, PageRequest, delete_precondition, needs};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;
use crate::store::{Kind, Page, Write};

/// Routes of `/owners` and `/ownershipRecords`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/owners", get(list::<Owner>))
        .route(
            "/owners/{name}",
            get(get_one::<Owner>)
                .put(put_one::<Owner>)
                .delete(delete_owner),
        )
        .route("/owners/{name}/devices", get(list_devices))
        .route("/ownershipRecords:import", post(import))
        .route("/ownershipRecords:transfer", post(transfer))
        .route(
            "/ownershipRecords/{kind}/{value}",
            get(get_record).delete(delete_record),
        )
}

/// `DELETE /owners/{name}`: refused while records still name the owner, so that no device is
/// left owned by nobody known.
async fn delete_owner(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    ownership::delete_owner(&state, admin.ns(), &name, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /owners/{name}/devices`: the owner's records, paged.
async fn list_devices(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let key = Owner::key_of(&name)?;
    load(state.store.as_ref(), admin.ns(), Kind::Owner, &key).await?;
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = state
        .store
        .list(
            admin.ns(),
            Kind::OwnershipRecord,
            Page {
                parent: Some(&key),
                after: page.after.as_deref(),
                limit: page.fetch_limit(),
            },
        )
        .await?;
    page.respond(rows, "OwnershipRecord", render_record)
}

/// The device named by the last two path parameters (`/ownershipRecords/{kind}/{value}`).
#[derive(Debug)]
struct RecordPath(DeviceKey);

impl<S: Send + Sync> FromRequestParts<S> for RecordPath {
    type Rejection = DomainError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, DomainError> {
        let invalid = |message: String| DomainError::new(ErrorCode::InvalidPathParameter, message);
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let values: Vec<&str> = params.iter().map(|(_, v)| v).collect();
        let [.., kind, value] = values.as_slice() else {
            return Err(invalid("the route names no device".into()));
        };
        let kind = DeviceKeyKind::parse(kind).ok_or_else(|| {
            invalid(format!(
                "'{kind}' is not registrationId, certificateSerial or ekHash"
            ))
        })?;
        DeviceKey::new(kind, value)
            .map(RecordPath)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// `GET /ownershipRecords/{kind}/{value}`.
async fn get_record(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    RecordPath(key): RecordPath,
) -> Result<Json<OwnershipRecord>, DomainError> {
    let stored = load(
        state.store.as_ref(),
        admin.ns(),
        Kind::OwnershipRecord,
        &key.storage_key(),
    )
    .await?;
    Ok(Json(render_record(&stored)?))
}

/// `DELETE /ownershipRecords/{kind}/{value}`: the device is owned by nobody from now on.
async fn delete_record(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    RecordPath(key): RecordPath,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    let delete = Write::Delete {
        ns: admin.ns().to_owned(),
        kind: Kind::OwnershipRecord,
        key: key.storage_key(),
        precondition: delete_precondition(&headers)?,
    };
    state.store.write(&[delete]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /ownershipRecords:import`: CSV or JSON lines by Content-Type, see
/// [`ownership::import`].
async fn import(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ownership::ImportResult>, DomainError> {
    let format = import_format(&headers)?;
    let source = BodyChunks {
        body,
        limit: state.limits.max_import_bytes,
    };
    Ok(Json(
        ownership::import(&state, admin.ns(), format, source).await?,
    ))
}

/// The request body as an import's source.
struct BodyChunks {
    body: Body,
    limit: usize,
}

impl ownership::ImportSource for BodyChunks {
    async fn next_chunk(&mut self) -> Option<Result<bytes::Bytes, DomainError>> {
        use http_body_util::BodyExt as _;
        loop {
            let frame = match self.body.frame().await? {
                Ok(frame) => frame,
                Err(e) if e.to_string().contains("length limit") => {
                    return Some(Err(ownership::too_large(self.limit)));
                }
                Err(e) => {
                    return Some(Err(DomainError::new(
                        ErrorCode::InvalidFormat,
                        format!("cannot read the body: {e}"),
                    )));
                }
            };
            if let Ok(chunk) = frame.into_data() {
                return Some(Ok(chunk));
            }
        }
    }
}

/// The import format a Content-Type names.
fn import_format(headers: &HeaderMap) -> Result<Format, DomainError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "text/csv" => Ok(Format::Csv),
        "application/x-ndjson" | "application/jsonl" | "application/json-lines" => {
            Ok(Format::JsonLines)
        }
        _ => Err(DomainError::new(
            ErrorCode::InvalidHeader,
            format!(
                "Content-Type '{content_type}' is not an import format: send text/csv or application/x-ndjson"
            ),
        )),
    }
}

/// `POST /ownershipRecords:transfer`: every listed device must belong to `from`; all move to
/// `to` together, or none does. Each device moves to the new owner's hubs on its next
/// registration (when its reprovisioning policy lets it move).
async fn transfer(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    JsonBody(request): JsonBody<OwnershipTransfer>,
) -> Result<Json<ownership::TransferResult>, DomainError> {
    Ok(Json(
        ownership::transfer(&state, admin.ns(), &request).await?,
    ))
}
