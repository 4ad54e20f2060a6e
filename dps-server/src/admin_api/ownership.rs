//! Ownership, for the `ownership` allocation policy: owners and their hubs (`/owners`), and
//! records that say who owns a device (`/ownershipRecords`), imported in bulk from CSV or
//! JSON lines and moved between owners by transfers.
//!
//! A record names a device by its registration id, its certificate serial or its EK hash
//! (normalised by [`DeviceKey`]) and is stored under `<kind>:<value>` with the owner as both
//! parent (to list an owner's devices) and tag (to count them).

use std::collections::HashMap;
use std::sync::Arc;

use allocation_policies::ownership::{DeviceKey, DeviceKeyKind, OwnershipBook};
use allocation_policies::policy::PolicyError;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{DeviceName, Owner, OwnershipRecord, OwnershipTransfer};
use dps_protocol::ids::{check_host_name, check_resource_name};
use serde::Serialize;

use super::resource::{Counts, Resource, get_one, list, put_one};
use super::validate::field_error;
use super::{Admin, AppState, Id, PageRequest, delete_precondition, load, needs, to_doc};
use crate::error::ApiError;
use crate::json::{Json, JsonBody};
use crate::store::{BulkDoc, Kind, Page, Precondition, Store, Stored, Write};

/// How many row errors an import answer lists.
const MAX_REPORTED_ERRORS: usize = 20;

impl Resource for Owner {
    const KIND: Kind = Kind::Owner;
    const ITEM_TYPE: &'static str = "Owner";

    fn key_of(id: &str) -> Result<String, ApiError> {
        owner_key(id).map_err(|e| ApiError::new(ErrorCode::InvalidPathParameter, e))
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    fn prepare(&mut self, _previous: Option<&Self>) -> Result<(), ApiError> {
        self.etag = None;
        self.device_count = None;
        let mut hubs: Vec<String> = Vec::new();
        for hub in &self.hubs {
            check_host_name(hub).map_err(|e| field_error("hubs", e.to_string()))?;
            let hub = hub.to_ascii_lowercase();
            if !hubs.contains(&hub) {
                hubs.push(hub);
            }
        }
        if hubs.is_empty() {
            return Err(field_error("hubs", "an owner needs at least one hub"));
        }
        self.hubs = hubs;
        Ok(())
    }

    fn hide_secrets(&mut self) {}

    fn hide_unsent_secrets(&mut self, _sent: &Self, _previous: Option<&Self>) {}

    async fn counts(state: &AppState, ns: &str) -> Result<Counts, ApiError> {
        Ok(state
            .store
            .count_by_tag(ns, Kind::OwnershipRecord)
            .await?
            .into_iter()
            .collect())
    }

    fn annotate(&mut self, counts: &Counts) {
        let key = self.name.to_ascii_lowercase();
        let owned = counts.get(&key).copied().unwrap_or(0);
        self.device_count = Some(u64::try_from(owned).unwrap_or(0));
    }
}

fn owner_key(name: &str) -> Result<String, String> {
    check_resource_name("owner", name)
        .map(|()| name.to_ascii_lowercase())
        .map_err(|e| e.to_string())
}

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
) -> Result<StatusCode, ApiError> {
    let key = Owner::key_of(&name)?;
    let owned = Owner::counts(&state, admin.ns())
        .await?
        .get(&key)
        .copied()
        .unwrap_or(0);
    if owned > 0 {
        return Err(ApiError::new(
            ErrorCode::ConflictWithState,
            format!(
                "owner '{name}' still owns {owned} device(s); transfer or delete their ownership records first"
            ),
        ));
    }
    let delete = Write::Delete {
        ns: admin.ns().to_owned(),
        kind: Kind::Owner,
        key,
        precondition: delete_precondition(&headers)?,
    };
    state.store.write(&[delete]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /owners/{name}/devices`: the owner's records, paged.
async fn list_devices(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
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

fn render_record(stored: &Stored) -> Result<OwnershipRecord, ApiError> {
    let mut record: OwnershipRecord = stored.doc_json()?;
    record.etag = Some(stored.etag.clone());
    record.last_updated_date_time_utc = Some(stored.updated.clone());
    Ok(record)
}

/// The device named by the last two path parameters (`/ownershipRecords/{kind}/{value}`).
#[derive(Debug)]
struct RecordPath(DeviceKey);

impl<S: Send + Sync> FromRequestParts<S> for RecordPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = |message: String| ApiError::new(ErrorCode::InvalidPathParameter, message);
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
) -> Result<Json<OwnershipRecord>, ApiError> {
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
) -> Result<StatusCode, ApiError> {
    let delete = Write::Delete {
        ns: admin.ns().to_owned(),
        kind: Kind::OwnershipRecord,
        key: key.storage_key(),
        precondition: delete_precondition(&headers)?,
    };
    state.store.write(&[delete]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The keys a device name holds (one per identity given), or why it holds none that are valid.
fn keys_of(device: &DeviceName) -> Result<Vec<DeviceKey>, String> {
    let given = [
        (DeviceKeyKind::RegistrationId, &device.registration_id),
        (DeviceKeyKind::CertificateSerial, &device.certificate_serial),
        (DeviceKeyKind::EkHash, &device.ek_hash),
    ];
    let keys = given
        .into_iter()
        .filter_map(|(kind, value)| {
            value
                .as_deref()
                .filter(|v| !v.trim().is_empty())
                .map(|v| DeviceKey::new(kind, v).map_err(|e| e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("names no device: give registrationId, certificateSerial or ekHash".into());
    }
    Ok(keys)
}

/// The stored form of a record: the one identity it is keyed by, and the owner's name.
fn record_doc(key: &DeviceKey, owner: &Owner) -> Result<BulkDoc, ApiError> {
    let mut device = DeviceName::default();
    let value = Some(key.value().to_owned());
    match key.kind() {
        DeviceKeyKind::RegistrationId => device.registration_id = value,
        DeviceKeyKind::CertificateSerial => device.certificate_serial = value,
        DeviceKeyKind::EkHash => device.ek_hash = value,
    }
    let record = OwnershipRecord {
        device,
        owner: owner.name.clone(),
        etag: None,
        last_updated_date_time_utc: None,
    };
    let owner_key = owner.name.to_ascii_lowercase();
    Ok(BulkDoc {
        key: key.storage_key(),
        parent: Some(owner_key.clone()),
        tag: Some(owner_key),
        doc: to_doc(&record)?,
    })
}

/// Every owner of the instance by key (owner lists are small).
async fn owners(store: &dyn Store, ns: &str) -> Result<HashMap<String, Owner>, ApiError> {
    let rows = store
        .list(
            ns,
            Kind::Owner,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    rows.iter()
        .map(|row| Ok((row.key.clone(), row.doc_json()?)))
        .collect()
}

/// The answer of an import.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImportResult {
    /// Data rows read.
    rows: usize,
    /// Records written (a row naming a device by several identities writes several; a device
    /// named again by a later row is written once, with the later owner).
    records: usize,
}

/// The two import formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    JsonLines,
}

impl Format {
    fn of(headers: &HeaderMap) -> Result<Self, ApiError> {
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
            "text/csv" => Ok(Self::Csv),
            "application/x-ndjson" | "application/jsonl" | "application/json-lines" => {
                Ok(Self::JsonLines)
            }
            _ => Err(ApiError::new(
                ErrorCode::InvalidHeader,
                format!(
                    "Content-Type '{content_type}' is not an import format: send text/csv or application/x-ndjson"
                ),
            )),
        }
    }
}

/// A parsed row with its line number.
type Row = (u64, Result<OwnershipRecord, String>);

fn csv_rows(input: impl std::io::Read) -> Result<Vec<Row>, ApiError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(input);
    let bad_header = |message: String| ApiError::invalid(format!("the CSV header row: {message}"));
    let headers = reader
        .headers()
        .map_err(|e| bad_header(e.to_string()))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let owner = column("owner").ok_or_else(|| bad_header("there is no 'owner' column".into()))?;
    let ids: Vec<(DeviceKeyKind, usize)> = DeviceKeyKind::ALL
        .into_iter()
        .filter_map(|kind| column(kind.as_str()).map(|i| (kind, i)))
        .collect();
    if ids.is_empty() {
        return Err(bad_header(
            "there is no registrationId, certificateSerial or ekHash column".into(),
        ));
    }
    let mut rows = Vec::new();
    for result in reader.records() {
        let record = match result {
            Ok(record) => record,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                rows.push((line, Err(format!("not valid CSV: {e}"))));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        let field = |i: usize| record.get(i).filter(|v| !v.is_empty()).map(str::to_owned);
        let mut device = DeviceName::default();
        for (kind, i) in &ids {
            let value = field(*i);
            match kind {
                DeviceKeyKind::RegistrationId => device.registration_id = value,
                DeviceKeyKind::CertificateSerial => device.certificate_serial = value,
                DeviceKeyKind::EkHash => device.ek_hash = value,
            }
        }
        rows.push((
            line,
            Ok(OwnershipRecord {
                device,
                owner: field(owner).unwrap_or_default(),
                etag: None,
                last_updated_date_time_utc: None,
            }),
        ));
    }
    Ok(rows)
}

fn json_rows(mut input: impl std::io::BufRead) -> Result<Vec<Row>, ApiError> {
    let mut rows = Vec::new();
    let mut line = Vec::new();
    for number in 1u64.. {
        line.clear();
        let read = input.read_until(b'\n', &mut line).map_err(|e| {
            ApiError::new(ErrorCode::InvalidFormat, format!("reading the import: {e}"))
        })?;
        if read == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = serde_json::from_slice::<OwnershipRecord>(&line)
            .map_err(|e| format!("not an ownership record: {e}"));
        rows.push((number, parsed));
    }
    Ok(rows)
}

/// The body of a request as a blocking reader, fed chunk by chunk by [`feed`]: the import is
/// parsed as it arrives instead of being held whole in memory first.
struct Chunks {
    receiver: std::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.recv() {
                Ok(chunk) => self.current = chunk,
                // The sender is gone: the body ended (or was cut off, which `feed` reports).
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Sends the body's chunks to the parser, refusing a body past `limit` bytes (413) or one
/// that does not arrive within `deadline`.
async fn feed(
    body: Body,
    sender: std::sync::mpsc::SyncSender<bytes::Bytes>,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<(), ApiError> {
    use http_body_util::BodyExt as _;
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the import is larger than limits.max_import_bytes ({limit} bytes); split it"),
        )
    };
    let mut body = body;
    let mut received = 0usize;
    let reading = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if e.to_string().contains("length limit") {
                    too_large()
                } else {
                    ApiError::new(
                        ErrorCode::InvalidFormat,
                        format!("cannot read the body: {e}"),
                    )
                }
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            received = received.saturating_add(chunk.len());
            if received > limit {
                return Err(too_large());
            }
            if sender.send(chunk).is_err() {
                break; // the parser stopped early (a bad header row)
            }
        }
        Ok(())
    };
    tokio::time::timeout(deadline, reading)
        .await
        .map_err(|_| crate::json::body_timeout())?
}

/// `POST /ownershipRecords:import`: CSV (a header row with `owner` and at least one of
/// `registrationId`, `certificateSerial`, `ekHash`; other columns are ignored) or JSON lines
/// (one record per line). Every row is checked first; one bad row rejects the whole import
/// and nothing is stored. Existing records are replaced, and a device named twice ends with
/// the later row's owner, so a sales ledger can be imported in order.
async fn import(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImportResult>, ApiError> {
    let format = Format::of(&headers)?;
    // A few chunks in flight: the parser keeps pace with the network, not the other way.
    let (sender, receiver) = std::sync::mpsc::sync_channel(8);
    let parser = tokio::task::spawn_blocking(move || {
        let input = std::io::BufReader::new(Chunks {
            receiver,
            current: bytes::Bytes::new(),
        });
        match format {
            Format::Csv => csv_rows(input),
            Format::JsonLines => json_rows(input),
        }
    });
    let fed = feed(
        body,
        sender,
        state.limits.max_import_bytes,
        std::time::Duration::from_secs(state.limits.request_body_timeout_secs.max(1)),
    )
    .await;
    let parsed = parser
        .await
        .map_err(|e| ApiError::internal("parsing an import", &e))?;
    fed?;
    let rows = parsed?;
    if rows.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ArgumentNull,
            "the import holds no records",
        ));
    }
    let ns = admin.ns();
    let owners = owners(state.store.as_ref(), ns).await?;
    let mut errors: Vec<String> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut docs: Vec<BulkDoc> = Vec::new();
    for (line, row) in &rows {
        let checked = row.as_ref().map_err(Clone::clone).and_then(|record| {
            let owner = owner_key(&record.owner)
                .ok()
                .and_then(|key| owners.get(&key))
                .ok_or_else(|| format!("owner '{}' does not exist", record.owner))?;
            Ok((keys_of(&record.device)?, owner))
        });
        match checked {
            Ok((keys, owner)) => {
                for key in keys {
                    let doc = record_doc(&key, owner)?;
                    match position.get(&doc.key) {
                        Some(&at) => docs[at] = doc,
                        None => {
                            position.insert(doc.key.clone(), docs.len());
                            docs.push(doc);
                        }
                    }
                }
            }
            Err(message) => errors.push(format!("line {line}: {message}")),
        }
    }
    if !errors.is_empty() {
        let shown = errors
            .iter()
            .take(MAX_REPORTED_ERRORS)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ApiError::invalid(format!(
            "{} of {} rows are invalid and nothing was imported: {shown}{}",
            errors.len(),
            rows.len(),
            if errors.len() > MAX_REPORTED_ERRORS {
                "; ..."
            } else {
                ""
            }
        )));
    }
    state
        .store
        .put_all(ns, Kind::OwnershipRecord, &docs)
        .await?;
    tracing::info!(
        rows = rows.len(),
        records = docs.len(),
        "ownership records imported"
    );
    Ok(Json(ImportResult {
        rows: rows.len(),
        records: docs.len(),
    }))
}

/// The answer of a transfer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TransferResult {
    transferred: usize,
}

/// `POST /ownershipRecords:transfer`: every listed device must belong to `from`; all move to
/// `to` together, or none does. Each device moves to the new owner's hubs on its next
/// registration (when its reprovisioning policy lets it move).
async fn transfer(
    admin: Admin<needs::EnrollmentWrite>,
    State(state): State<AppState>,
    JsonBody(request): JsonBody<OwnershipTransfer>,
) -> Result<Json<TransferResult>, ApiError> {
    let ns = admin.ns();
    let store = state.store.as_ref();
    let from_key = owner_key(&request.from).map_err(|e| field_error("from", e))?;
    let to_key = owner_key(&request.to).map_err(|e| field_error("to", e))?;
    load(store, ns, Kind::Owner, &from_key).await?;
    let to: Owner = load(store, ns, Kind::Owner, &to_key).await?.doc_json()?;
    if request.devices.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ArgumentNull,
            "devices: list the devices to transfer",
        ));
    }
    let mut writes = Vec::new();
    for (i, device) in request.devices.iter().enumerate() {
        let keys = keys_of(device).map_err(|e| field_error(&format!("devices[{i}]"), e))?;
        for key in keys {
            let stored = load(store, ns, Kind::OwnershipRecord, &key.storage_key()).await?;
            let record: OwnershipRecord = stored.doc_json()?;
            if !record.owner.eq_ignore_ascii_case(&request.from) {
                return Err(ApiError::new(
                    ErrorCode::ConflictWithState,
                    format!(
                        "{key} belongs to '{}', not '{}'; nothing was transferred",
                        record.owner, request.from
                    ),
                ));
            }
            let doc = record_doc(&key, &to)?;
            writes.push(Write::Put {
                ns: ns.to_owned(),
                kind: Kind::OwnershipRecord,
                key: doc.key,
                parent: doc.parent,
                tag: doc.tag,
                doc: doc.doc,
                precondition: Precondition::IfMatch(stored.etag),
            });
        }
    }
    state.store.write(&writes).await?;
    Ok(Json(TransferResult {
        transferred: writes.len(),
    }))
}

/// The ownership records in storage, for the `ownership` policy.
#[derive(Debug)]
pub struct StoredOwnership {
    store: Arc<dyn Store>,
}

impl StoredOwnership {
    /// The records in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl OwnershipBook for StoredOwnership {
    async fn owner_of(
        &self,
        instance: &str,
        keys: &[DeviceKey],
    ) -> Result<Option<(DeviceKey, allocation_policies::ownership::Owner)>, PolicyError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "reading ownership records");
            PolicyError::Unavailable("the ownership records cannot be read".into())
        };
        for key in keys {
            let Some(stored) = self
                .store
                .get(instance, Kind::OwnershipRecord, &key.storage_key())
                .await
                .map_err(|e| unavailable(&e))?
            else {
                continue;
            };
            let record: OwnershipRecord =
                serde_json::from_str(&stored.doc).map_err(|e| unavailable(&e))?;
            let owner_key = record.owner.to_ascii_lowercase();
            let hubs = match self
                .store
                .get(instance, Kind::Owner, &owner_key)
                .await
                .map_err(|e| unavailable(&e))?
            {
                Some(owner) => {
                    serde_json::from_str::<Owner>(&owner.doc)
                        .map_err(|e| unavailable(&e))?
                        .hubs
                }
                None => Vec::new(),
            };
            let owner = allocation_policies::ownership::Owner {
                name: record.owner,
                hubs,
            };
            return Ok(Some((key.clone(), owner)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_keep_line_numbers_and_ignore_other_columns() {
        let csv =
            b"date,registrationId,Owner,price\n2026-01-01,dev-1,acme,10\n2026-01-02,,globex,12\n";
        let rows = csv_rows(&csv[..]).unwrap();
        assert_eq!(rows.len(), 2);
        let (line, first) = &rows[0];
        assert_eq!(*line, 2);
        let first = first.as_ref().unwrap();
        assert_eq!(first.device.registration_id.as_deref(), Some("dev-1"));
        assert_eq!(first.owner, "acme");
        let second = rows[1].1.as_ref().unwrap();
        assert!(
            keys_of(&second.device).is_err(),
            "an empty id names nothing"
        );
        assert!(
            csv_rows(&b"registrationId\ndev-1\n"[..]).is_err(),
            "no owner column"
        );
        assert!(
            csv_rows(&b"owner,serial\nacme,1\n"[..]).is_err(),
            "no id column"
        );
    }

    #[test]
    fn json_lines_skip_blank_lines_and_report_bad_ones() {
        let rows =
            json_rows(&b"{\"registrationId\":\"a\",\"owner\":\"x\"}\n\n{oops}\n"[..]).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].1.is_ok());
        assert_eq!(rows[1].0, 3);
        assert!(rows[1].1.is_err());
    }
}
