//! Ownership, for the `ownership` allocation policy: owners and their hubs, and records that
//! say who owns a device, imported in bulk from CSV or JSON lines and moved between owners by
//! transfers.
//!
//! A record names a device by its registration id, its certificate serial or its EK hash
//! (normalised by [`DeviceKey`]) and is stored under `<kind>:<value>` with the owner as both
//! parent (to list an owner's devices) and tag (to count them).

use std::collections::HashMap;
use std::sync::Arc;

use allocation_policies::device_key::{DeviceKey, DeviceKeyKind};
use allocation_policies::ownership::OwnershipBook;
use allocation_policies::policy::PolicyError;
use dps_protocol::ErrorCode;
use dps_protocol::admin::{DeviceName, Owner, OwnershipRecord, OwnershipTransfer};
use dps_protocol::ids::{check_host_name, check_resource_name};
use serde::Serialize;

use super::resources::{Counts, Resource};
use super::validate::field_error;
use super::{DomainError, load, to_doc};
use crate::state::AppState;
use crate::store::{BulkDoc, Columns, Kind, Page, Precondition, Store, StoreError, Stored, Write};

/// How many row errors an import answer lists.
const MAX_REPORTED_ERRORS: usize = 20;

impl Resource for Owner {
    const KIND: Kind = Kind::Owner;
    const ITEM_TYPE: &'static str = "Owner";

    fn key_of(id: &str) -> Result<String, DomainError> {
        owner_key(id).map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e))
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    fn prepare(&mut self, _previous: Option<&Self>) -> Result<(), DomainError> {
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

    async fn counts(state: &AppState, ns: &str) -> Result<Counts, DomainError> {
        Ok(state
            .store
            .count_by(ns, Kind::OwnershipRecord)
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

pub fn render_record(stored: &Stored) -> Result<OwnershipRecord, DomainError> {
    let mut record: OwnershipRecord = stored.doc_json()?;
    record.etag = Some(stored.etag.clone());
    record.last_updated_date_time_utc = Some(stored.updated.clone());
    Ok(record)
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
fn record_doc(key: &DeviceKey, owner: &Owner) -> Result<BulkDoc, DomainError> {
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
        columns: Columns::Owned { owner: owner_key },
        doc: to_doc(&record)?,
    })
}

/// Every owner of the instance by key (owner lists are small).
async fn owners(store: &dyn Store, ns: &str) -> Result<HashMap<String, Owner>, DomainError> {
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

/// What an import did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportResult {
    /// Data rows read.
    pub rows: usize,
    /// Records written (a row naming a device by several identities writes several; a device
    /// named again by a later row is written once, with the later owner).
    pub records: usize,
}

/// A parsed row with its line number.
type Row = (u64, Result<OwnershipRecord, String>);

fn csv_rows(input: impl std::io::Read) -> Result<Vec<Row>, DomainError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(input);
    let bad_header =
        |message: String| DomainError::invalid(format!("the CSV header row: {message}"));
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

fn json_rows(mut input: impl std::io::BufRead) -> Result<Vec<Row>, DomainError> {
    let mut rows = Vec::new();
    let mut line = Vec::new();
    for number in 1u64.. {
        line.clear();
        let read = input.read_until(b'\n', &mut line).map_err(|e| {
            DomainError::new(ErrorCode::InvalidFormat, format!("reading the import: {e}"))
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

/// What a transfer did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferResult {
    /// Records moved to the new owner.
    pub transferred: usize,
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

/// The two import formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A header row, then records.
    Csv,
    /// One JSON record per line.
    JsonLines,
}

/// Where an import's bytes come from, chunk by chunk (the request body, at the HTTP edge).
pub trait ImportSource: Send {
    /// The next chunk, `None` at the end.
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Option<Result<bytes::Bytes, DomainError>>> + Send;
}

/// Sends the source's chunks to the parser, refusing an import past `limit` bytes (413) or
/// one that does not arrive within `deadline` (408).
async fn feed(
    mut source: impl ImportSource,
    sender: std::sync::mpsc::SyncSender<bytes::Bytes>,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<(), DomainError> {
    let mut received = 0usize;
    let reading = async {
        while let Some(chunk) = source.next_chunk().await {
            let chunk = chunk?;
            received = received.saturating_add(chunk.len());
            if received > limit {
                return Err(too_large(limit));
            }
            if sender.send(chunk).is_err() {
                break; // the parser stopped early (a bad header row)
            }
        }
        Ok(())
    };
    tokio::time::timeout(deadline, reading).await.map_err(|_| {
        DomainError::new(
            ErrorCode::RequestTimeout,
            "the import did not arrive in time",
        )
    })?
}

/// The refusal of an import larger than `limit` bytes.
pub fn too_large(limit: usize) -> DomainError {
    DomainError::new(
        ErrorCode::PayloadTooLarge,
        format!("the import is larger than limits.max_import_bytes ({limit} bytes); split it"),
    )
}

/// Imports ownership records: CSV (a header row with `owner` and at least one of
/// `registrationId`, `certificateSerial`, `ekHash`; other columns are ignored) or JSON lines
/// (one record per line), parsed as they arrive. Every row is checked first; one bad row
/// rejects the whole import and nothing is stored. Existing records are replaced, and a
/// device named twice ends with the later row's owner, so a sales ledger can be imported in
/// order.
pub async fn import(
    state: &AppState,
    ns: &str,
    format: Format,
    source: impl ImportSource,
) -> Result<ImportResult, DomainError> {
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
        source,
        sender,
        state.limits.max_import_bytes,
        std::time::Duration::from_secs(state.limits.request_body_timeout_secs.max(1)),
    )
    .await;
    let parsed = parser
        .await
        .map_err(|e| DomainError::internal("parsing an import", &e))?;
    fed?;
    let rows = parsed?;
    if rows.is_empty() {
        return Err(DomainError::new(
            ErrorCode::ArgumentNull,
            "the import holds no records",
        ));
    }
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
        return Err(DomainError::invalid(format!(
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
    let records = docs.len();
    state.store.put_all(ns, Kind::OwnershipRecord, docs).await?;
    tracing::info!(rows = rows.len(), records, "ownership records imported");
    Ok(ImportResult {
        rows: rows.len(),
        records,
    })
}

/// Moves devices from one owner to another: every listed device must belong to `from`; all
/// move to `to` together, or none does. Each device moves to the new owner's hubs on its next
/// registration (when its reprovisioning policy lets it move).
pub async fn transfer(
    state: &AppState,
    ns: &str,
    request: &OwnershipTransfer,
) -> Result<TransferResult, DomainError> {
    let store = state.store.as_ref();
    let from_key = owner_key(&request.from).map_err(|e| field_error("from", e))?;
    let to_key = owner_key(&request.to).map_err(|e| field_error("to", e))?;
    load(store, ns, Kind::Owner, &from_key).await?;
    let to: Owner = load(store, ns, Kind::Owner, &to_key).await?.doc_json()?;
    if request.devices.is_empty() {
        return Err(DomainError::new(
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
                return Err(DomainError::new(
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
                columns: doc.columns,
                doc: doc.doc,
                precondition: Precondition::IfMatch(stored.etag),
                etag: None,
            });
        }
    }
    state.store.write(&writes).await?;
    Ok(TransferResult {
        transferred: writes.len(),
    })
}

/// Deletes owner `name`; refused while records still name it, so that no device is left
/// owned by nobody known.
pub async fn delete_owner(
    state: &AppState,
    ns: &str,
    name: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    let key = Owner::key_of(name)?;
    let delete = Write::Delete {
        ns: ns.to_owned(),
        kind: Kind::Owner,
        key: key.clone(),
        precondition,
    };
    // The database refuses while ownership records name the owner.
    match state.store.write(&[delete]).await {
        Err(StoreError::InUse { .. }) => {
            let owned = Owner::counts(state, ns)
                .await?
                .get(&key)
                .copied()
                .unwrap_or(0);
            Err(DomainError::new(
                ErrorCode::ConflictWithState,
                format!(
                    "owner '{name}' still owns {owned} device(s); transfer or delete their ownership records first"
                ),
            ))
        }
        done => done.map(|_| ()).map_err(Into::into),
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
