//! Upgrading a database that the older storage wrote, one `documents` table of JSON documents:
//! at start-up every document is copied into its typed table with its etag and timestamps, and
//! the old table is dropped, all in one transaction. An interrupted upgrade leaves the old
//! table in place, to be copied again at the next start.
//!
//! The ID-scope and host-name documents are not copied (an instance's own document names
//! them), nor the credentials versions (every instance gets a new one, so no cache survives).
//! Documents that could not be kept consistently (of an instance that no longer exists, or an
//! ownership record whose owner is gone) are skipped and counted in the log.

use serde_json::Value as Json;
use sqlx::Row;

use super::schema::{self, Value};
use super::sql::{Pool, SqlStore, Tx};
use super::{Columns, Kind, StoreError};

/// Documents read per statement while copying.
const PAGE: i64 = 1000;
/// How long a copied finished operation stays pollable, as new ones do.
const KEEP_FINISHED_SECS: i64 = 300;

/// The older kinds, in the order their rows can be inserted (instances first, owners before
/// the records that name them).
const KINDS: [(&str, Kind); 11] = [
    ("instance", Kind::Instance),
    ("access-policy", Kind::AccessPolicy),
    ("linked-hub", Kind::LinkedHub),
    ("ca-certificate", Kind::CaCertificate),
    ("enrollment", Kind::IndividualEnrollment),
    ("enrollment-group", Kind::EnrollmentGroup),
    ("registration", Kind::RegistrationState),
    ("operation", Kind::Operation),
    ("tpm-challenge", Kind::TpmChallenge),
    ("owner", Kind::Owner),
    ("ownership-record", Kind::OwnershipRecord),
];

/// One row of the older table.
struct Document {
    ns: String,
    key: String,
    parent: Option<String>,
    doc: String,
    etag: String,
    created_at: String,
    updated_at: String,
    tag: Option<String>,
}

/// Copies the `documents` table, if there is one, into the typed tables and drops it.
pub(super) async fn from_documents(store: &SqlStore) -> Result<(), StoreError> {
    let exists_sql = match store.pool {
        Pool::Sqlite(_) => {
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'documents'"
        }
        Pool::Postgres(_) => {
            "SELECT 1 FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = 'documents'"
        }
    };
    let exists =
        on_pool!(&store.pool, p => sqlx::query(exists_sql).fetch_optional(p).await?.is_some());
    if !exists {
        return Ok(());
    }
    let mut tx = store.begin().await?;
    let mut copied = 0usize;
    let mut skipped = 0usize;
    let mut instances: Vec<String> = Vec::new();
    let mut owners: Vec<(String, String)> = Vec::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for (old, kind) in KINDS {
        let mut after: (String, String) = (String::new(), String::new());
        loop {
            let page = read_page(&mut tx, old, &after).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = (last.ns.clone(), last.key.clone());
            for document in &page {
                let ns = document.ns.to_ascii_lowercase();
                let belongs = kind == Kind::Instance || instances.contains(&ns);
                let columns = columns(kind, document, now);
                let owner_known = match &columns {
                    Some(Columns::Owned { owner }) => owners.contains(&(ns.clone(), owner.clone())),
                    _ => true,
                };
                match columns {
                    Some(columns) if belongs && owner_known => {
                        insert(&mut tx, kind, document, &columns).await?;
                        match kind {
                            Kind::Instance => instances.push(document.key.clone()),
                            Kind::Owner => owners.push((ns.clone(), document.key.clone())),
                            _ => {}
                        }
                        copied += 1;
                    }
                    _ => skipped += 1,
                }
            }
            if page.len() < usize::try_from(PAGE).unwrap_or(usize::MAX) {
                break;
            }
        }
    }
    on_tx!(&mut tx, t => sqlx::query("DROP TABLE documents").execute(&mut **t).await?.rows_affected());
    tx.commit().await?;
    tracing::info!(copied, skipped, "storage upgraded to typed tables");
    Ok(())
}

async fn read_page(
    tx: &mut Tx<'_>,
    kind: &str,
    after: &(String, String),
) -> Result<Vec<Document>, StoreError> {
    let rows = on_tx!(tx, t => sqlx::query(
        "SELECT ns, key, parent, doc, etag, created_at, updated_at, tag FROM documents \
         WHERE kind = $1 AND (ns > $2 OR (ns = $2 AND key > $3)) ORDER BY ns, key LIMIT $4",
    )
    .bind(kind)
    .bind(&after.0)
    .bind(&after.1)
    .bind(PAGE)
    .fetch_all(&mut **t)
    .await?
    .iter()
    .map(|row| {
        Ok(Document {
            ns: row.try_get("ns")?,
            key: row.try_get("key")?,
            parent: row.try_get("parent")?,
            doc: row.try_get("doc")?,
            etag: row.try_get("etag")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            tag: row.try_get("tag")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?);
    Ok(rows)
}

/// The typed columns of an older document; `None` when it cannot be kept.
fn columns(kind: Kind, document: &Document, now: i64) -> Option<Columns> {
    let doc: Json = serde_json::from_str(&document.doc).ok()?;
    let text = |value: &Json| value.as_str().map(str::to_ascii_lowercase);
    Some(match kind {
        Kind::Instance => Columns::Instance {
            id_scope: text(&doc["idScope"])?,
            host_names: doc["hostNames"]
                .as_array()
                .map(|hosts| hosts.iter().filter_map(text).collect())
                .unwrap_or_default(),
        },
        Kind::IndividualEnrollment | Kind::EnrollmentGroup => Columns::Attestation {
            attestation_type: doc["attestation"]["type"].as_str()?.to_owned(),
        },
        Kind::RegistrationState => Columns::Registration {
            group: document.parent.clone(),
            hub: document.tag.clone(),
        },
        Kind::Operation => {
            let finished = !matches!(doc["status"].as_str(), Some("assigning" | "unassigned"));
            Columns::Operation {
                registration: document
                    .parent
                    .clone()
                    .or_else(|| text(&doc["registrationId"]))?,
                expires_at: finished.then_some(now + KEEP_FINISHED_SECS),
            }
        }
        Kind::TpmChallenge => {
            // An older version stored one challenge; newer ones a set.
            let latest = doc["challenges"]
                .as_array()
                .map(|all| all.iter().filter_map(|c| c["expires"].as_i64()).max())
                .unwrap_or_else(|| doc["expires"].as_i64());
            Columns::Expires {
                at: latest.unwrap_or(now).saturating_add(3600),
            }
        }
        Kind::OwnershipRecord => Columns::Owned {
            owner: document.parent.clone().or_else(|| text(&doc["owner"]))?,
        },
        Kind::AccessPolicy | Kind::LinkedHub | Kind::CaCertificate | Kind::Owner => Columns::None,
        // Newer than the documents table.
        Kind::CredentialsVersion
        | Kind::IssuedCertificate
        | Kind::RevokedCertificate
        | Kind::Event
        | Kind::AuditEntry
        | Kind::CertificateAuthority
        | Kind::CredentialPolicy => return None,
    })
}

/// Inserts an older document with its etag and timestamps.
async fn insert(
    tx: &mut Tx<'_>,
    kind: Kind,
    document: &Document,
    columns: &Columns,
) -> Result<(), StoreError> {
    let table =
        schema::of(kind).ok_or_else(|| StoreError::Invalid(format!("{kind:?} has no table")))?;
    let typed = schema::values(table, columns)
        .ok_or_else(|| StoreError::Invalid(format!("{columns:?} do not fit {kind:?}")))?;
    let mut names = vec!["key", "doc", "etag", "created_at", "updated_at"];
    let mut values = vec![
        Value::Text(&document.key),
        Value::Text(&document.doc),
        Value::Text(&document.etag),
        Value::Text(&document.created_at),
        Value::Text(&document.updated_at),
    ];
    let instance = document.ns.to_ascii_lowercase();
    if table.scoped {
        names.push("instance");
        values.push(Value::Text(&instance));
    }
    names.extend(table.columns);
    values.extend(typed);
    let version = uuid::Uuid::new_v4().to_string();
    if kind == Kind::Instance {
        names.push("credentials_version");
        values.push(Value::Text(&version));
    }
    let placeholders: Vec<String> = (1..=values.len()).map(|n| format!("${n}")).collect();
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        table.name,
        names.join(", "),
        placeholders.join(", ")
    );
    on_tx!(tx, t => bind_values!(sqlx::query(sqlx::AssertSqlSafe(sql)), &values)
        .execute(&mut **t)
        .await?
        .rows_affected());
    if let Columns::Instance { host_names, .. } = columns {
        for host in host_names {
            on_tx!(tx, t => sqlx::query(
                "INSERT INTO instance_host_names (host, instance) VALUES ($1, $2) \
                 ON CONFLICT (host) DO NOTHING",
            )
            .bind(host)
            .bind(&document.key)
            .execute(&mut **t)
            .await?
            .rows_affected());
        }
    }
    Ok(())
}
