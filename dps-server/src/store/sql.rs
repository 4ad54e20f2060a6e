//! The [`Store`] over sqlx's `Any` driver: the same portable SQL runs on SQLite and PostgreSQL;
//! each backend has its own migrations.

use std::borrow::Cow;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Row, SqlSafeStr, Transaction};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{BulkDoc, Kind, Page, Precondition, Store, StoreError, Stored, Write};

/// Rows per statement of a bulk upsert: 8 parameters each stays far below SQLite's 32,766 and
/// PostgreSQL's 65,535 parameters per statement.
const BULK_ROWS: usize = 500;

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "documents",
        include_str!("../../migrations/sqlite/0001_documents.sql"),
    ),
    (
        2,
        "document tags",
        include_str!("../../migrations/sqlite/0002_document_tags.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "documents",
        include_str!("../../migrations/postgres/0001_documents.sql"),
    ),
    (
        2,
        "document tags",
        include_str!("../../migrations/postgres/0002_document_tags.sql"),
    ),
];

/// Per-connection SQLite settings: WAL (readers never block the writer), a busy timeout so
/// that concurrent writers wait instead of failing, and the usual WAL durability level.
const SQLITE_PRAGMAS: &str =
    "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; PRAGMA synchronous = NORMAL;";

/// A parent's children, in key order. Without statistics SQLite's planner prefers the primary
/// key (it gives the order) and reads every document of the kind to filter on the parent, which
/// made each registration read all operations; on SQLite the parent index is named.
const LIST_BY_PARENT: &str = "SELECT key, doc, etag, created_at, updated_at FROM documents \
     WHERE ns = $1 AND kind = $2 AND parent = $3 ORDER BY key LIMIT $4";
const LIST_BY_PARENT_SQLITE: &str = "SELECT key, doc, etag, created_at, updated_at \
     FROM documents INDEXED BY documents_by_parent \
     WHERE ns = $1 AND kind = $2 AND parent = $3 ORDER BY key LIMIT $4";
const LIST_BY_PARENT_AFTER: &str = "SELECT key, doc, etag, created_at, updated_at FROM documents \
     WHERE ns = $1 AND kind = $2 AND parent = $3 AND key > $4 ORDER BY key LIMIT $5";
const LIST_BY_PARENT_AFTER_SQLITE: &str = "SELECT key, doc, etag, created_at, updated_at \
     FROM documents INDEXED BY documents_by_parent \
     WHERE ns = $1 AND kind = $2 AND parent = $3 AND key > $4 ORDER BY key LIMIT $5";

/// SQLite or PostgreSQL through one connection pool.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: &'static str,
}

impl SqlStore {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, migrations, max_connections) = if url.starts_with("sqlite:") {
            ("sqlite", SQLITE_MIGRATIONS, 8)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            ("postgres", POSTGRES_MIGRATIONS, 16)
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(StoreError::Database(sqlx::Error::Configuration(
                format!("unsupported database URL scheme '{scheme}': use sqlite:// or postgres://")
                    .into(),
            )));
        };
        let is_sqlite = backend == "sqlite";
        if is_sqlite && let Some(path) = sqlite_file(url) {
            dps_listener::files::private_file(std::path::Path::new(path)).map_err(|e| {
                StoreError::Database(sqlx::Error::Configuration(
                    format!("creating the SQLite database {path}: {e}").into(),
                ))
            })?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if is_sqlite {
                        sqlx::raw_sql(SQLITE_PRAGMAS).execute(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let migrations = migrations
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        // No advisory locks (CockroachDB and YugabyteDB lack them); the migrations are
        // idempotent, so replicas starting together at worst retry.
        migrator.set_locking(false);
        migrator.run(&pool).await?;
        Ok(Self { pool, backend })
    }
}

/// The file of a `sqlite:` URL (none for an in-memory database).
fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then_some(path)
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

fn new_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

fn stored(row: &AnyRow) -> Result<Stored, StoreError> {
    Ok(Stored {
        key: row.try_get("key")?,
        doc: row.try_get("doc")?,
        etag: row.try_get("etag")?,
        created: row.try_get("created_at")?,
        updated: row.try_get("updated_at")?,
    })
}

async fn exists(
    tx: &mut Transaction<'_, Any>,
    ns: &str,
    kind: Kind,
    key: &str,
) -> Result<bool, StoreError> {
    let row = sqlx::query("SELECT 1 FROM documents WHERE ns = $1 AND kind = $2 AND key = $3")
        .bind(ns)
        .bind(kind.as_str())
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.is_some())
}

async fn apply(tx: &mut Transaction<'_, Any>, write: &Write) -> Result<Option<Stored>, StoreError> {
    match write {
        Write::Put {
            ns,
            kind,
            key,
            parent,
            tag,
            doc,
            precondition,
        } => {
            let (etag, at) = (new_etag(), now());
            let created: Option<String> = match precondition {
                Precondition::Always => sqlx::query(
                    "INSERT INTO documents (ns, kind, key, parent, doc, etag, created_at, updated_at, tag) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) \
                     ON CONFLICT (ns, kind, key) DO UPDATE SET parent = excluded.parent, \
                     doc = excluded.doc, etag = excluded.etag, updated_at = excluded.updated_at, \
                     tag = excluded.tag RETURNING created_at",
                )
                .bind(ns)
                .bind(kind.as_str())
                .bind(key)
                .bind(parent.as_deref())
                .bind(doc)
                .bind(&etag)
                .bind(&at)
                .bind(tag.as_deref())
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get("created_at"))
                .transpose()?,
                Precondition::MustNotExist => {
                    let done = sqlx::query(
                        "INSERT INTO documents (ns, kind, key, parent, doc, etag, created_at, updated_at, tag) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) ON CONFLICT (ns, kind, key) DO NOTHING",
                    )
                    .bind(ns)
                    .bind(kind.as_str())
                    .bind(key)
                    .bind(parent.as_deref())
                    .bind(doc)
                    .bind(&etag)
                    .bind(&at)
                    .bind(tag.as_deref())
                    .execute(&mut **tx)
                    .await?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::Exists {
                            kind: *kind,
                            key: key.clone(),
                        });
                    }
                    Some(at.clone())
                }
                Precondition::IfMatch(expected) => {
                    let row = sqlx::query(
                        "UPDATE documents SET parent = $4, doc = $5, etag = $6, updated_at = $7, tag = $9 \
                         WHERE ns = $1 AND kind = $2 AND key = $3 AND etag = $8 RETURNING created_at",
                    )
                    .bind(ns)
                    .bind(kind.as_str())
                    .bind(key)
                    .bind(parent.as_deref())
                    .bind(doc)
                    .bind(&etag)
                    .bind(&at)
                    .bind(expected)
                    .bind(tag.as_deref())
                    .fetch_optional(&mut **tx)
                    .await?;
                    match row {
                        Some(row) => Some(row.try_get("created_at")?),
                        None => return Err(missing_or_mismatch(tx, ns, *kind, key).await?),
                    }
                }
            };
            Ok(Some(Stored {
                key: key.clone(),
                doc: doc.clone(),
                etag,
                created: created.unwrap_or_else(|| at.clone()),
                updated: at,
            }))
        }
        Write::Delete {
            ns,
            kind,
            key,
            precondition,
        } => {
            let done = match precondition {
                Precondition::IfMatch(expected) => sqlx::query(
                    "DELETE FROM documents WHERE ns = $1 AND kind = $2 AND key = $3 AND etag = $4",
                )
                .bind(ns)
                .bind(kind.as_str())
                .bind(key)
                .bind(expected)
                .execute(&mut **tx)
                .await?,
                Precondition::Always | Precondition::MustNotExist => {
                    sqlx::query("DELETE FROM documents WHERE ns = $1 AND kind = $2 AND key = $3")
                        .bind(ns)
                        .bind(kind.as_str())
                        .bind(key)
                        .execute(&mut **tx)
                        .await?
                }
            };
            if done.rows_affected() == 0 {
                return Err(missing_or_mismatch(tx, ns, *kind, key).await?);
            }
            Ok(None)
        }
        Write::Purge { ns, kind, key } => {
            sqlx::query("DELETE FROM documents WHERE ns = $1 AND kind = $2 AND key = $3")
                .bind(ns)
                .bind(kind.as_str())
                .bind(key)
                .execute(&mut **tx)
                .await?;
            Ok(None)
        }
        Write::DeleteNamespace { ns } => {
            sqlx::query("DELETE FROM documents WHERE ns = $1")
                .bind(ns)
                .execute(&mut **tx)
                .await?;
            Ok(None)
        }
    }
}

/// After a conditional write touched nothing: was the document missing, or its etag different?
async fn missing_or_mismatch(
    tx: &mut Transaction<'_, Any>,
    ns: &str,
    kind: Kind,
    key: &str,
) -> Result<StoreError, StoreError> {
    let key = key.to_owned();
    Ok(if exists(tx, ns, kind, &key).await? {
        StoreError::EtagMismatch { kind, key }
    } else {
        StoreError::NotFound { kind, key }
    })
}

#[async_trait::async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn get(&self, ns: &str, kind: Kind, key: &str) -> Result<Option<Stored>, StoreError> {
        let row = sqlx::query(
            "SELECT key, doc, etag, created_at, updated_at FROM documents \
             WHERE ns = $1 AND kind = $2 AND key = $3",
        )
        .bind(ns)
        .bind(kind.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(stored).transpose()
    }

    async fn list(&self, ns: &str, kind: Kind, page: Page<'_>) -> Result<Vec<Stored>, StoreError> {
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        let query = match (page.parent, page.after) {
            (None, None) => sqlx::query(
                "SELECT key, doc, etag, created_at, updated_at FROM documents \
                 WHERE ns = $1 AND kind = $2 ORDER BY key LIMIT $3",
            )
            .bind(ns)
            .bind(kind.as_str())
            .bind(limit),
            (None, Some(after)) => sqlx::query(
                "SELECT key, doc, etag, created_at, updated_at FROM documents \
                 WHERE ns = $1 AND kind = $2 AND key > $3 ORDER BY key LIMIT $4",
            )
            .bind(ns)
            .bind(kind.as_str())
            .bind(after)
            .bind(limit),
            (Some(parent), None) => sqlx::query(if self.backend == "sqlite" {
                LIST_BY_PARENT_SQLITE
            } else {
                LIST_BY_PARENT
            })
            .bind(ns)
            .bind(kind.as_str())
            .bind(parent)
            .bind(limit),
            (Some(parent), Some(after)) => sqlx::query(if self.backend == "sqlite" {
                LIST_BY_PARENT_AFTER_SQLITE
            } else {
                LIST_BY_PARENT_AFTER
            })
            .bind(ns)
            .bind(kind.as_str())
            .bind(parent)
            .bind(after)
            .bind(limit),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(stored).collect()
    }

    async fn write(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            // An early return drops the transaction, which rolls it back.
            results.push(apply(&mut tx, write).await?);
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn put_all(&self, ns: &str, kind: Kind, docs: &[BulkDoc]) -> Result<(), StoreError> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        for chunk in docs.chunks(BULK_ROWS) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p = i * 5;
                    format!(
                        "($1, $2, ${}, ${}, ${}, ${}, $3, $3, ${})",
                        p + 4,
                        p + 5,
                        p + 6,
                        p + 7,
                        p + 8
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO documents (ns, kind, key, parent, doc, etag, created_at, updated_at, tag) \
                 VALUES {} ON CONFLICT (ns, kind, key) DO UPDATE SET parent = excluded.parent, \
                 doc = excluded.doc, etag = excluded.etag, updated_at = excluded.updated_at, \
                 tag = excluded.tag",
                rows.join(", ")
            );
            // The statement holds only placeholders; every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(ns)
                .bind(kind.as_str())
                .bind(&at);
            for doc in chunk {
                query = query
                    .bind(&doc.key)
                    .bind(doc.parent.as_deref())
                    .bind(&doc.doc)
                    .bind(new_etag())
                    .bind(doc.tag.as_deref());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn count_by_tag(&self, ns: &str, kind: Kind) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT tag, COUNT(*) AS n FROM documents \
             WHERE ns = $1 AND kind = $2 AND tag IS NOT NULL GROUP BY tag ORDER BY tag",
        )
        .bind(ns)
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("tag")?, row.try_get("n")?)))
            .collect()
    }

    fn backend(&self) -> &'static str {
        self.backend
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use sqlx::Row;

    use super::*;

    /// The plans of the parent listings use the parent index, with no sort and no scan of the
    /// kind's documents.
    #[tokio::test]
    async fn sqlite_lists_children_through_the_parent_index() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("plan.sqlite").display()
        );
        let store = SqlStore::connect(&url).await.unwrap();
        for sql in [LIST_BY_PARENT_SQLITE, LIST_BY_PARENT_AFTER_SQLITE] {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let rows = sqlx::query(sqlx::AssertSqlSafe(explain))
                .bind("ns")
                .bind("operation")
                .bind("parent")
                .bind("key")
                .bind(10i64)
                .fetch_all(&store.pool)
                .await
                .unwrap();
            let plan: Vec<String> = rows
                .iter()
                .map(|r| r.try_get::<String, _>("detail").unwrap())
                .collect();
            assert_eq!(plan.len(), 1, "{plan:?}");
            assert!(
                plan[0].contains("USING INDEX documents_by_parent (ns=? AND kind=? AND parent=?"),
                "{plan:?}"
            );
        }
    }
}
