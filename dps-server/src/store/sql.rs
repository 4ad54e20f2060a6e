//! The [`Store`] over sqlx's native SQLite and PostgreSQL pools: the same portable SQL runs on
//! both (written once; [`on_pool!`] and [`on_tx!`] instantiate it per backend), each connection
//! keeps its prepared statements, and each backend has its own migrations.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Postgres, Row, SqlSafeStr, Sqlite, Transaction};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{BulkDoc, Kind, Page, Precondition, Store, StoreError, Stored, Write};

/// Rows per statement of a bulk upsert: 8 parameters each stays far below SQLite's 32,766 and
/// PostgreSQL's 65,535 parameters per statement.
const BULK_ROWS: usize = 500;
/// How often a transaction aborted as not serialisable (SQLSTATE 40001) is run again.
const SERIALIZATION_RETRIES: usize = 5;

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
    pool: Pool,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A transaction of either backend.
enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// Runs `$body` with `$p` bound to the backend's pool: the code is written once and compiled
/// for each backend's types.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// [`on_pool!`] for a transaction: `$t` is the backend's open transaction.
macro_rules! on_tx {
    ($tx:expr, $t:ident => $body:expr) => {
        match $tx {
            Tx::Sqlite($t) => $body,
            Tx::Postgres($t) => $body,
        }
    };
}

impl SqlStore {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (pool, migrations) = if url.starts_with("sqlite:") {
            if let Some(path) = sqlite_file(url) {
                dps_listener::files::private_file(std::path::Path::new(path)).map_err(|e| {
                    StoreError::Database(sqlx::Error::Configuration(
                        format!("creating the SQLite database {path}: {e}").into(),
                    ))
                })?;
            }
            // WAL (readers never block the writer), a busy timeout so that concurrent writers
            // wait instead of failing, and the usual WAL durability level.
            let options: SqliteConnectOptions = url.parse()?;
            let options = options
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(std::time::Duration::from_secs(10))
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(options)
                .await?;
            (Pool::Sqlite(pool), SQLITE_MIGRATIONS)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .connect(url)
                .await?;
            (Pool::Postgres(pool), POSTGRES_MIGRATIONS)
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(StoreError::Database(sqlx::Error::Configuration(
                format!("unsupported database URL scheme '{scheme}': use sqlite:// or postgres://")
                    .into(),
            )));
        };
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
        on_pool!(&pool, p => migrator.run(p).await)?;
        Ok(Self { pool })
    }

    async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Pool::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }
}

impl Tx {
    async fn commit(self) -> Result<(), StoreError> {
        on_tx!(self, t => t.commit().await)?;
        Ok(())
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

fn stored<R: Row>(row: &R) -> Result<Stored, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    Ok(Stored {
        key: row.try_get("key")?,
        doc: row.try_get("doc")?,
        etag: row.try_get("etag")?,
        created: row.try_get("created_at")?,
        updated: row.try_get("updated_at")?,
    })
}

async fn exists(tx: &mut Tx, ns: &str, kind: Kind, key: &str) -> Result<bool, StoreError> {
    let found = on_tx!(tx, t => sqlx::query("SELECT 1 FROM documents WHERE ns = $1 AND kind = $2 AND key = $3")
        .bind(ns)
        .bind(kind.as_str())
        .bind(key)
        .fetch_optional(&mut **t)
        .await?
        .is_some());
    Ok(found)
}

const UPSERT: &str = "INSERT INTO documents (ns, kind, key, parent, doc, etag, created_at, updated_at, tag) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) \
     ON CONFLICT (ns, kind, key) DO UPDATE SET parent = excluded.parent, \
     doc = excluded.doc, etag = excluded.etag, updated_at = excluded.updated_at, \
     tag = excluded.tag RETURNING created_at";
const INSERT: &str = "INSERT INTO documents (ns, kind, key, parent, doc, etag, created_at, updated_at, tag) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) ON CONFLICT (ns, kind, key) DO NOTHING";
const UPDATE_IF_MATCH: &str = "UPDATE documents SET parent = $4, doc = $5, etag = $6, updated_at = $7, tag = $9 \
     WHERE ns = $1 AND kind = $2 AND key = $3 AND etag = $8 RETURNING created_at";
const DELETE_IF_MATCH: &str =
    "DELETE FROM documents WHERE ns = $1 AND kind = $2 AND key = $3 AND etag = $4";
const DELETE: &str = "DELETE FROM documents WHERE ns = $1 AND kind = $2 AND key = $3";

async fn apply(tx: &mut Tx, write: &Write) -> Result<Option<Stored>, StoreError> {
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
            let (sql, expected) = match precondition {
                Precondition::Always => (UPSERT, None),
                Precondition::MustNotExist => (INSERT, None),
                Precondition::IfMatch(expected) => (UPDATE_IF_MATCH, Some(expected)),
            };
            // The upsert and the conditional update return the row's creation time; the
            // insert returns nothing and counts what it inserted.
            let (created, touched): (Option<String>, bool) = on_tx!(tx, t => {
                let mut query = sqlx::query(sql)
                    .bind(ns)
                    .bind(kind.as_str())
                    .bind(key)
                    .bind(parent.as_deref())
                    .bind(doc)
                    .bind(&etag)
                    .bind(&at);
                query = match expected {
                    Some(expected) => query.bind(expected).bind(tag.as_deref()),
                    None => query.bind(tag.as_deref()),
                };
                if sql == INSERT {
                    let inserted = query.execute(&mut **t).await?.rows_affected() > 0;
                    (None, inserted)
                } else {
                    let row = query.fetch_optional(&mut **t).await?;
                    let created = row.map(|row| row.try_get("created_at")).transpose()?;
                    let touched = created.is_some();
                    (created, touched)
                }
            });
            match (touched, precondition) {
                (true, _) => {}
                (false, Precondition::MustNotExist) => {
                    return Err(StoreError::Exists {
                        kind: *kind,
                        key: key.clone(),
                    });
                }
                (false, _) => return Err(missing_or_mismatch(tx, ns, *kind, key).await?),
            }
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
            let deleted = on_tx!(tx, t => {
                let query = match precondition {
                    Precondition::IfMatch(expected) => sqlx::query(DELETE_IF_MATCH)
                        .bind(ns)
                        .bind(kind.as_str())
                        .bind(key)
                        .bind(expected),
                    Precondition::Always | Precondition::MustNotExist => sqlx::query(DELETE)
                        .bind(ns)
                        .bind(kind.as_str())
                        .bind(key),
                };
                query.execute(&mut **t).await?.rows_affected()
            });
            if deleted == 0 {
                return Err(missing_or_mismatch(tx, ns, *kind, key).await?);
            }
            Ok(None)
        }
        Write::Purge { ns, kind, key } => {
            on_tx!(tx, t => sqlx::query(DELETE)
                .bind(ns)
                .bind(kind.as_str())
                .bind(key)
                .execute(&mut **t)
                .await?
                .rows_affected());
            Ok(None)
        }
        Write::DeleteNamespace { ns } => {
            on_tx!(tx, t => sqlx::query("DELETE FROM documents WHERE ns = $1")
                .bind(ns)
                .execute(&mut **t)
                .await?
                .rows_affected());
            Ok(None)
        }
    }
}

/// After a conditional write touched nothing: was the document missing, or its etag different?
async fn missing_or_mismatch(
    tx: &mut Tx,
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
        on_pool!(&self.pool, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    async fn get(&self, ns: &str, kind: Kind, key: &str) -> Result<Option<Stored>, StoreError> {
        on_pool!(&self.pool, p => sqlx::query(
            "SELECT key, doc, etag, created_at, updated_at FROM documents \
             WHERE ns = $1 AND kind = $2 AND key = $3",
        )
        .bind(ns)
        .bind(kind.as_str())
        .bind(key)
        .fetch_optional(p)
        .await?
        .as_ref()
        .map(stored)
        .transpose())
    }

    async fn get_many(
        &self,
        ns: &str,
        keys: &[(Kind, &str)],
    ) -> Result<Vec<Option<Stored>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Point reads joined with UNION ALL, so that each uses the primary key on both
        // backends; the statement text depends only on the number of keys.
        let sql = (0..keys.len())
            .map(|i| {
                format!(
                    "SELECT kind, key, doc, etag, created_at, updated_at FROM documents \
                     WHERE ns = $1 AND kind = ${} AND key = ${}",
                    2 * i + 2,
                    2 * i + 3
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows: Vec<(String, Stored)> = on_pool!(&self.pool, p => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ns);
            for (kind, key) in keys {
                query = query.bind(kind.as_str()).bind(*key);
            }
            query
                .fetch_all(p)
                .await?
                .iter()
                .map(|row| Ok((row.try_get("kind")?, stored(row)?)))
                .collect::<Result<_, StoreError>>()?
        });
        Ok(keys
            .iter()
            .map(|(kind, key)| {
                rows.iter()
                    .find(|(k, stored)| k == kind.as_str() && stored.key == *key)
                    .map(|(_, stored)| stored.clone())
            })
            .collect())
    }

    async fn list(&self, ns: &str, kind: Kind, page: Page<'_>) -> Result<Vec<Stored>, StoreError> {
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        let sqlite = matches!(self.pool, Pool::Sqlite(_));
        let sql = match (page.parent, page.after, sqlite) {
            (None, None, _) => {
                "SELECT key, doc, etag, created_at, updated_at FROM documents \
                 WHERE ns = $1 AND kind = $2 ORDER BY key LIMIT $3"
            }
            (None, Some(_), _) => {
                "SELECT key, doc, etag, created_at, updated_at FROM documents \
                 WHERE ns = $1 AND kind = $2 AND key > $3 ORDER BY key LIMIT $4"
            }
            (Some(_), None, true) => LIST_BY_PARENT_SQLITE,
            (Some(_), None, false) => LIST_BY_PARENT,
            (Some(_), Some(_), true) => LIST_BY_PARENT_AFTER_SQLITE,
            (Some(_), Some(_), false) => LIST_BY_PARENT_AFTER,
        };
        on_pool!(&self.pool, p => {
            let mut query = sqlx::query(sql).bind(ns).bind(kind.as_str());
            if let Some(parent) = page.parent {
                query = query.bind(parent);
            }
            if let Some(after) = page.after {
                query = query.bind(after);
            }
            query.bind(limit).fetch_all(p).await?.iter().map(stored).collect()
        })
    }

    async fn write(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError> {
        let mut attempt = 0;
        loop {
            match self.write_once(writes).await {
                // Distributed PostgreSQL-compatible engines abort a transaction that would not
                // serialise; it holds no effect, so it is run again.
                Err(e) if e.is_serialization_failure() && attempt < SERIALIZATION_RETRIES => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn put_all(&self, ns: &str, kind: Kind, docs: &[BulkDoc]) -> Result<(), StoreError> {
        let at = now();
        let mut tx = self.begin().await?;
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
            on_tx!(&mut tx, t => {
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
                query.execute(&mut **t).await?.rows_affected()
            });
        }
        tx.commit().await
    }

    async fn count_by_tag(&self, ns: &str, kind: Kind) -> Result<Vec<(String, i64)>, StoreError> {
        on_pool!(&self.pool, p => sqlx::query(
            "SELECT tag, COUNT(*) AS n FROM documents \
             WHERE ns = $1 AND kind = $2 AND tag IS NOT NULL GROUP BY tag ORDER BY tag",
        )
        .bind(ns)
        .bind(kind.as_str())
        .fetch_all(p)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("tag")?, row.try_get("n")?)))
        .collect())
    }

    fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }
}

impl SqlStore {
    async fn write_once(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError> {
        let mut tx = self.begin().await?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            // An early return drops the transaction, which rolls it back.
            results.push(apply(&mut tx, write).await?);
        }
        tx.commit().await?;
        Ok(results)
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
                .fetch_all(match &store.pool {
                    Pool::Sqlite(p) => p,
                    Pool::Postgres(_) => unreachable!("a SQLite URL"),
                })
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
