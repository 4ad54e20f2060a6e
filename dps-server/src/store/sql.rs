//! The [`Store`] over sqlx's native SQLite and PostgreSQL pools: the same portable SQL runs on
//! both (written once; [`on_pool!`] and [`on_tx!`] instantiate it per backend), each connection
//! keeps its prepared statements, and each backend has its own migrations.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Postgres, Row, SqlSafeStr, Sqlite, Transaction};

use super::audit::{self, Action, Actor};
use super::group_commit::GroupWriter;
use super::kept::{Kept, Place};
use super::schema::{self, Table, Value};
use super::{
    AuditFilter, BulkDoc, Columns, EventFilter, Kind, Page, Precondition, Store, StoreError,
    Stored, Unique, Write,
};

/// Parameters per statement of a bulk write on SQLite, about (its limit is 32,766). Each
/// statement is a round trip to sqlx's SQLite thread while the one write transaction is held:
/// 4,096 imported about a fifth faster than 512 (16,384: the same as 4,096).
const SQLITE_BULK_PARAMETERS: usize = 4_096;
/// The same on PostgreSQL (its limit is 65,535): few statements, because each one waits a
/// round trip and sqlx leaves Nagle's algorithm on, so a large statement's last packet can wait
/// for the database's delayed acknowledgement (tens of milliseconds): statements of 512
/// parameters imported about 4,100 enrollments/s, of 4,096 about 21,000/s (16,384: the same).
const POSTGRES_BULK_PARAMETERS: usize = 4_096;
/// Connections that read an SQLite database (one more writes).
const SQLITE_READERS: u32 = 4;
/// Pages in SQLite's write-ahead log past which the writer copies them back itself, when the
/// periodic `checkpoint` has not kept up (4 KiB pages: 40 MB).
const WAL_BACKSTOP_PAGES: u32 = 10_000;
/// Pages in SQLite's write-ahead log past which `checkpoint` starts it again (16 MB).
const WAL_RESTART_FRAMES: i64 = 4_000;
/// Bytes the write-ahead log file is cut back to after a checkpoint emptied it.
const WAL_SIZE_LIMIT: u64 = 64 << 20;
/// How often a transaction aborted as not serialisable or deadlocked (SQLSTATE 40001, 40P01)
/// is run again.
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
    (
        3,
        "typed tables",
        include_str!("../../migrations/sqlite/0003_typed_tables.sql"),
    ),
    (
        4,
        "issuance",
        include_str!("../../migrations/sqlite/0004_issuance.sql"),
    ),
    (
        5,
        "events",
        include_str!("../../migrations/sqlite/0005_events.sql"),
    ),
    (
        6,
        "audit log",
        include_str!("../../migrations/sqlite/0006_audit_log.sql"),
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
    (
        3,
        "typed tables",
        include_str!("../../migrations/postgres/0003_typed_tables.sql"),
    ),
    (
        4,
        "issuance",
        include_str!("../../migrations/postgres/0004_issuance.sql"),
    ),
    (
        5,
        "events",
        include_str!("../../migrations/postgres/0005_events.sql"),
    ),
    (
        6,
        "audit log",
        include_str!("../../migrations/postgres/0006_audit_log.sql"),
    ),
];

/// SQLite or PostgreSQL through connection pools.
#[derive(Debug, Clone)]
pub struct SqlStore {
    /// Writes, and reads inside a write's transaction.
    pub(super) pool: Pool,
    /// Reads outside a transaction (on PostgreSQL, the same pool).
    pub(super) reads: Pool,
    /// On SQLite, the task that makes the unaudited writes, in groups.
    writer: Option<GroupWriter>,
}

/// A backend's pool and the connections kept from it between statements.
#[derive(Debug, Clone)]
pub(super) enum Pool {
    Sqlite(Arc<Kept<Sqlite>>),
    Postgres(Arc<Kept<Postgres>>),
}

/// A transaction of either backend, with its place among the pool's connections when it has
/// one of its own (not a lease's).
pub(super) enum Tx<'c> {
    Sqlite(
        Transaction<'c, Sqlite>,
        #[expect(dead_code, reason = "held until the transaction ends")] Option<Place>,
    ),
    Postgres(
        Transaction<'c, Postgres>,
        #[expect(dead_code, reason = "held until the transaction ends")] Option<Place>,
    ),
}

/// Runs `$body` with `$c` bound to a connection of the backend's pool: the code is written
/// once and compiled for each backend's types. The connection is kept for the next statement
/// when `$body` gets to its end; a `?` in it drops the connection back to the pool.
macro_rules! on_pool {
    ($pool:expr, $c:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite(kept) => on_pool!(@leased kept, $c => $body),
            Pool::Postgres(kept) => on_pool!(@leased kept, $c => $body),
        }
    };
    (@leased $kept:ident, $c:ident => $body:expr) => {{
        let mut lease = $kept.lease().await?;
        let value = {
            let $c = lease.connection();
            $body
        };
        lease.keep();
        value
    }};
}

/// [`on_pool!`] for a transaction: `$t` is the backend's open transaction.
macro_rules! on_tx {
    ($tx:expr, $t:ident => $body:expr) => {
        match $tx {
            Tx::Sqlite($t, _) => $body,
            Tx::Postgres($t, _) => $body,
        }
    };
}

impl SqlStore {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (pool, reads, migrations) = if url.starts_with("sqlite:") {
            if let Some(path) = sqlite_file(url) {
                dps_listener::files::private_file(std::path::Path::new(path)).map_err(|e| {
                    StoreError::Database(sqlx::Error::Configuration(
                        format!("creating the SQLite database {path}: {e}").into(),
                    ))
                })?;
            }
            // WAL (readers never block the writer), a busy timeout so that a writer waits for
            // another process instead of failing, and the usual WAL durability level.
            let options: SqliteConnectOptions = url.parse()?;
            let options = options
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(std::time::Duration::from_secs(10))
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
            // One connection writes. SQLite lets one writer in at a time anyway; with several
            // writing connections they wait for its lock in sleeps, and every write empties the
            // page caches of all the others. Reads have connections of their own, so that they
            // go on during a long write. The write-ahead log is copied back into the database
            // by `checkpoint` (called every second, off the writer), not by the commit that
            // happens to fill it; the writer does it only as a backstop.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .connect_with(
                    options
                        .clone()
                        .pragma("wal_autocheckpoint", WAL_BACKSTOP_PAGES.to_string()),
                )
                .await?;
            let pool = Arc::new(Kept::new(pool));
            // An in-memory database exists only on its connection.
            let reads = match sqlite_file(url) {
                Some(_) => Arc::new(Kept::new(
                    SqlitePoolOptions::new()
                        .max_connections(SQLITE_READERS)
                        .test_before_acquire(false)
                        .connect_with(options)
                        .await?,
                )),
                None => pool.clone(),
            };
            (Pool::Sqlite(pool), Pool::Sqlite(reads), SQLITE_MIGRATIONS)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            // No ping before each use: it is a round trip per statement. A connection that
            // broke fails its statement instead (that request gets a 503) and is replaced.
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .test_before_acquire(false)
                .connect(url)
                .await?;
            let pool = Arc::new(Kept::new(pool));
            (
                Pool::Postgres(pool.clone()),
                Pool::Postgres(pool),
                POSTGRES_MIGRATIONS,
            )
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
        on_pool!(&pool, c => migrator.run(c).await?);
        let writer = match &pool {
            Pool::Sqlite(p) => Some(GroupWriter::start(p.clone())),
            Pool::Postgres(_) => None,
        };
        let store = Self {
            pool,
            reads,
            writer,
        };
        super::upgrade::from_documents(&store).await?;
        Ok(store)
    }

    pub(super) async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => {
                let (tx, place) = p.begin().await?;
                Tx::Sqlite(tx, Some(place))
            }
            Pool::Postgres(p) => {
                let (tx, place) = p.begin().await?;
                Tx::Postgres(tx, Some(place))
            }
        })
    }
}

impl Tx<'_> {
    pub(super) async fn commit(self) -> Result<(), StoreError> {
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

/// A fresh etag: a quoted UUID.
pub fn new_etag() -> String {
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

/// Binds `values` in order.
macro_rules! bind_values {
    ($query:expr, $values:expr) => {{
        let mut query = $query;
        for value in $values {
            query = match value {
                Value::Text(v) => query.bind(*v),
                Value::OptText(v) => query.bind(*v),
                Value::OptInt(v) => query.bind(*v),
            };
        }
        query
    }};
}

/// An instance's records are stored under its case-folded name, the key of its row (names are
/// matched without regard to case; callers pass the spelling they know).
fn instance_key(ns: &str) -> String {
    ns.to_ascii_lowercase()
}

fn table(kind: Kind) -> Result<&'static Table, StoreError> {
    schema::of(kind).ok_or_else(|| StoreError::Invalid(format!("{kind:?} has no table")))
}

/// The instance column's value (`ns` case-folded, see [`instance_key`]).
fn scope<'a>(table: &Table, ns: &'a str) -> Vec<Value<'a>> {
    if table.scoped {
        vec![Value::Text(ns)]
    } else {
        Vec::new()
    }
}

/// What a failed statement means for a write of `kind`: a taken unique value, a missing or
/// still-referenced related record, or a database failure.
fn constraint(kind: Kind, key: &str, columns: &Columns, e: sqlx::Error) -> StoreError {
    let Some(db) = e.as_database_error() else {
        return e.into();
    };
    match (db.kind(), kind, columns) {
        (
            sqlx::error::ErrorKind::UniqueViolation,
            Kind::Instance,
            Columns::Instance { id_scope, .. },
        ) => StoreError::Taken {
            what: Unique::IdScope,
            value: id_scope.clone(),
        },
        (sqlx::error::ErrorKind::UniqueViolation, Kind::EnrollmentGroup, _) => StoreError::Taken {
            what: Unique::TpmGroup,
            value: key.to_owned(),
        },
        (
            sqlx::error::ErrorKind::ForeignKeyViolation,
            Kind::OwnershipRecord,
            Columns::Owned { owner },
        ) => StoreError::Missing {
            kind: Kind::Owner,
            key: owner.clone(),
        },
        (sqlx::error::ErrorKind::ForeignKeyViolation, _, Columns::None) => StoreError::InUse {
            kind,
            key: key.to_owned(),
        },
        _ => e.into(),
    }
}

/// The document of a record, read inside the transaction (`ns` case-folded).
async fn read_doc(
    tx: &mut Tx<'_>,
    ns: &str,
    kind: Kind,
    key: &str,
) -> Result<Option<String>, StoreError> {
    let table = table(kind)?;
    let mut values = scope(table, ns);
    values.push(Value::Text(key));
    // On PostgreSQL the row is locked until the commit, so that what an audit entry says was
    // there is what the write replaced (SQLite has one writer).
    let sql = match tx {
        Tx::Sqlite(..) => Cow::Borrowed(table.sql.get.as_str()),
        Tx::Postgres(..) => Cow::Owned(format!("{} FOR UPDATE", table.sql.get)),
    };
    let doc = on_tx!(tx, t => bind_values!(sqlx::query(sqlx::AssertSqlSafe(sql.as_ref())), &values)
        .fetch_optional(&mut **t)
        .await?
        .map(|row| row.try_get::<String, _>("doc"))
        .transpose()?);
    Ok(doc)
}

async fn exists(tx: &mut Tx<'_>, ns: &str, kind: Kind, key: &str) -> Result<bool, StoreError> {
    Ok(read_doc(tx, ns, kind, key).await?.is_some())
}

/// Applies `write` made by `actor` and adds its audit entry to the transaction.
async fn apply_audited(
    tx: &mut Tx<'_>,
    actor: &Actor,
    write: &Write,
) -> Result<Option<Stored>, StoreError> {
    let (ns, kind, key, new) = match write {
        Write::Put {
            ns, kind, key, doc, ..
        } => (ns, *kind, key, Some(doc.as_str())),
        Write::Delete { ns, kind, key, .. } | Write::Purge { ns, kind, key } => {
            (ns, *kind, key, None)
        }
        Write::KeysRead { ns, kind, key } => {
            let row = audit::entry(actor, ns, *kind, key, Action::ReadKeys, None, None);
            insert_entry(tx, row).await?;
            return Ok(None);
        }
        Write::CredentialsChanged { .. } => return apply(tx, write).await,
    };
    let old = read_doc(tx, &instance_key(ns), kind, key).await?;
    let result = apply(tx, write).await?;
    if let Some(action) = Action::of(old.as_deref(), new) {
        let row = audit::entry(actor, ns, kind, key, action, old.as_deref(), new);
        insert_entry(tx, row).await?;
    }
    Ok(result)
}

async fn insert_entry(tx: &mut Tx<'_>, row: audit::Row) -> Result<(), StoreError> {
    apply(
        tx,
        &Write::Put {
            ns: row.ns,
            kind: Kind::AuditEntry,
            key: row.key,
            columns: row.columns,
            doc: row.doc,
            precondition: Precondition::MustNotExist,
            etag: None,
        },
    )
    .await
    .map(|_| ())
}

/// The kind a write is of (`None` for the credentials version).
fn kind_of(write: &Write) -> Option<Kind> {
    match write {
        Write::Put { kind, .. }
        | Write::Delete { kind, .. }
        | Write::Purge { kind, .. }
        | Write::KeysRead { kind, .. } => Some(*kind),
        Write::CredentialsChanged { .. } => None,
    }
}

/// After a conditional write touched nothing: was the record missing, or its etag different?
async fn missing_or_mismatch(
    tx: &mut Tx<'_>,
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

/// Replaces the host names of instance `key`; a host another instance holds is refused.
async fn set_host_names(tx: &mut Tx<'_>, key: &str, hosts: &[String]) -> Result<(), StoreError> {
    on_tx!(tx, t => sqlx::query("DELETE FROM instance_host_names WHERE instance = $1")
        .bind(key)
        .execute(&mut **t)
        .await?
        .rows_affected());
    for host in hosts {
        let inserted = on_tx!(tx, t => sqlx::query(
            "INSERT INTO instance_host_names (host, instance) VALUES ($1, $2) \
             ON CONFLICT (host) DO NOTHING",
        )
        .bind(host)
        .bind(key)
        .execute(&mut **t)
        .await?
        .rows_affected());
        if inserted == 0 {
            return Err(StoreError::Taken {
                what: Unique::HostName,
                value: host.clone(),
            });
        }
    }
    Ok(())
}

/// The statement of put `write` (into instance `ns`, case-folded) and the values it binds, for
/// the record to get `etag` at time `at`.
fn put_statement<'a>(
    write: &'a Write,
    ns: &'a str,
    etag: &'a str,
    at: &'a str,
) -> Result<(&'static str, Vec<Value<'a>>), StoreError> {
    let Write::Put {
        kind,
        key,
        columns,
        doc,
        precondition,
        ..
    } = write
    else {
        return Err(StoreError::Invalid("only a put has a put statement".into()));
    };
    let table = table(*kind)?;
    let typed = schema::values(table, columns).ok_or_else(|| {
        StoreError::Invalid(format!("{columns:?} are not the columns of {kind:?}"))
    })?;
    let mut values = scope(table, ns);
    values.extend([
        Value::Text(key),
        Value::Text(doc),
        Value::Text(etag),
        Value::Text(at),
    ]);
    values.extend(typed);
    let sql = match precondition {
        Precondition::Always => table.sql.upsert.as_str(),
        Precondition::MustNotExist => table.sql.insert.as_str(),
        Precondition::IfMatch(expected) => {
            values.push(Value::Text(expected));
            table.sql.update_if_match.as_str()
        }
    };
    Ok((sql, values))
}

/// On PostgreSQL, puts into distinct tables that no admin makes (a registration's operation,
/// state and event) are one statement, a writable CTE: a single round trip and an implicit
/// transaction in place of BEGIN, a statement per write and COMMIT. A conditional update that
/// finds another etag (or no record) makes the statement divide by zero, and a new record's
/// taken key breaks the primary key; either aborts the statement with nothing written, and
/// then (as for any constraint it broke) `None` asks the caller to run the writes one by one in
/// a transaction, which says which write failed and why. `None` too for writes this does not
/// fit (deletes, instances with their host names, two writes of a table).
async fn write_in_one_statement(
    kept: &Kept<Postgres>,
    writes: &[Write],
) -> Result<Option<Vec<Option<Stored>>>, StoreError> {
    if writes.is_empty() {
        return Ok(None);
    }
    let mut planned = Vec::with_capacity(writes.len());
    let mut tables = Vec::with_capacity(writes.len());
    for write in writes {
        let Write::Put {
            ns,
            kind,
            columns,
            etag,
            ..
        } = write
        else {
            return Ok(None);
        };
        let name = table(*kind)?.name;
        if matches!(columns, Columns::Instance { .. }) || tables.contains(&name) {
            return Ok(None);
        }
        tables.push(name);
        planned.push((instance_key(ns), etag.clone().unwrap_or_else(new_etag)));
    }
    let at = crate::timestamp::now();
    let mut values = Vec::new();
    let mut parts = Vec::with_capacity(writes.len());
    for (write, (ns, etag)) in writes.iter().zip(&planned) {
        let (statement, bound) = put_statement(write, ns, etag, &at)?;
        // A taken key fails the statement (with nothing written) rather than being skipped;
        // the same values are bound.
        let statement = match write {
            Write::Put {
                kind,
                precondition: Precondition::MustNotExist,
                ..
            } => table(*kind)?.sql.insert_or_fail.as_str(),
            _ => statement,
        };
        parts.push(format!(
            "w{} AS ({})",
            parts.len(),
            shifted(statement, values.len())
        ));
        values.extend(bound);
    }
    let all_written = (0..parts.len())
        .map(|i| format!("EXISTS (SELECT 1 FROM w{i})"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let created = (0..parts.len())
        .map(|i| format!("(SELECT created_at FROM w{i}) AS c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "WITH {} SELECT 1 / (CASE WHEN {all_written} THEN 1 ELSE 0 END) AS complete, {created}",
        parts.join(", ")
    );
    // Only the tables' statements and fixed fragments are spliced in; every value is bound.
    let mut lease = kept.lease().await?;
    let row = match bind_values!(sqlx::query(sqlx::AssertSqlSafe(sql)), &values)
        .fetch_one(lease.connection())
        .await
    {
        Ok(row) => row,
        Err(e) if aborted_for_a_reason_of_its_own(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    lease.keep();
    let mut written = Vec::with_capacity(writes.len());
    for (i, (write, (_, etag))) in writes.iter().zip(planned).enumerate() {
        let Write::Put { key, doc, .. } = write else {
            return Ok(None);
        };
        written.push(Some(Stored {
            key: key.clone(),
            doc: doc.clone(),
            etag,
            created: row.try_get(format!("c{i}").as_str())?,
            updated: at.clone(),
        }));
    }
    Ok(Some(written))
}

/// Whether the one-statement write failed on one of its writes' preconditions (the division
/// by zero) or on a constraint (SQLSTATE class 23): a failure the writes run one by one name.
fn aborted_for_a_reason_of_its_own(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "22012" || code.starts_with("23"))
}

/// `sql` with each parameter `$n` renumbered `$(n + by)`.
fn shifted(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if let Ok(n) = rest[..digits].parse::<usize>() {
            out.push_str(&(n + by).to_string());
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// Each of `writes` in `tx`, in order; the first that fails ends it with its error.
pub(super) async fn apply_all(
    tx: &mut Tx<'_>,
    writes: &[Write],
) -> Result<Vec<Option<Stored>>, StoreError> {
    let mut written = Vec::with_capacity(writes.len());
    for write in writes {
        written.push(apply(tx, write).await?);
    }
    Ok(written)
}

async fn apply(tx: &mut Tx<'_>, write: &Write) -> Result<Option<Stored>, StoreError> {
    match write {
        Write::Put {
            ns,
            kind,
            key,
            columns,
            doc,
            precondition,
            etag,
        } => {
            let ns = &instance_key(ns);
            let (etag, at) = (
                etag.clone().unwrap_or_else(new_etag),
                crate::timestamp::now(),
            );
            let (sql, values) = put_statement(write, ns, &etag, &at)?;
            let inserting = matches!(precondition, Precondition::MustNotExist);
            // The upsert and the conditional update return the row's creation time; the
            // insert returns nothing and counts what it inserted.
            let written: Result<(Option<String>, bool), sqlx::Error> = on_tx!(tx, t => {
                let query = bind_values!(sqlx::query(sql), &values);
                if inserting {
                    query
                        .execute(&mut **t)
                        .await
                        .map(|done| (None, done.rows_affected() > 0))
                } else {
                    match query.fetch_optional(&mut **t).await {
                        Ok(row) => row
                            .map(|row| row.try_get::<String, _>("created_at"))
                            .transpose()
                            .map(|created| {
                                let touched = created.is_some();
                                (created, touched)
                            }),
                        Err(e) => Err(e),
                    }
                }
            });
            let (created, touched) = written.map_err(|e| constraint(*kind, key, columns, e))?;
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
            if let Columns::Instance { host_names, .. } = columns {
                set_host_names(tx, key, host_names).await?;
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
            let table = table(*kind)?;
            let ns = &instance_key(ns);
            let mut values = scope(table, ns);
            values.push(Value::Text(key));
            let sql = match precondition {
                Precondition::IfMatch(expected) => {
                    values.push(Value::Text(expected));
                    table.sql.delete_if_match.as_str()
                }
                Precondition::Always | Precondition::MustNotExist => table.sql.delete.as_str(),
            };
            let deleted: Result<u64, sqlx::Error> = on_tx!(tx, t => bind_values!(sqlx::query(sql), &values)
                .execute(&mut **t)
                .await
                .map(|done| done.rows_affected()));
            if deleted.map_err(|e| constraint(*kind, key, &Columns::None, e))? == 0 {
                return Err(missing_or_mismatch(tx, ns, *kind, key).await?);
            }
            Ok(None)
        }
        Write::Purge { ns, kind, key } => {
            let table = table(*kind)?;
            let ns = &instance_key(ns);
            let mut values = scope(table, ns);
            values.push(Value::Text(key));
            let purged: Result<u64, sqlx::Error> = on_tx!(tx, t => bind_values!(sqlx::query(table.sql.delete.as_str()), &values)
                .execute(&mut **t)
                .await
                .map(|done| done.rows_affected()));
            purged.map_err(|e| constraint(*kind, key, &Columns::None, e))?;
            Ok(None)
        }
        Write::KeysRead { .. } => Err(StoreError::Invalid(
            "a key read is recorded only for an identified admin".into(),
        )),
        Write::CredentialsChanged { ns } => {
            on_tx!(tx, t => sqlx::query("UPDATE instances SET credentials_version = $2 WHERE key = $1")
                .bind(instance_key(ns))
                .bind(new_etag())
                .execute(&mut **t)
                .await?
                .rows_affected());
            Ok(None)
        }
    }
}

/// The read of one record in [`Store::get_many`]: its statement part (parameters from
/// `$first`) and the values it binds.
fn point_read<'a>(
    kind: Kind,
    key: &'a str,
    first: usize,
) -> Result<(String, Vec<Value<'a>>), StoreError> {
    let label = kind.as_str();
    if kind == Kind::CredentialsVersion {
        // A column of the instance: the namespace ($1) is the instance's key.
        return Ok((
            format!(
                "SELECT '{label}' AS kind, 'credentials' AS key, '{{}}' AS doc, \
                 credentials_version AS etag, created_at, updated_at FROM instances WHERE key = $1"
            ),
            Vec::new(),
        ));
    }
    let table = table(kind)?;
    let scope = if table.scoped {
        "instance = $1 AND "
    } else {
        ""
    };
    Ok((
        format!(
            "SELECT '{label}' AS kind, key, doc, etag, created_at, updated_at FROM {} \
             WHERE {scope}key = ${first}",
            table.name
        ),
        vec![Value::Text(key)],
    ))
}

#[async_trait::async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> Result<(), StoreError> {
        // A failed ping drops its connection (the `?`), which the pool then closes.
        on_pool!(&self.pool, p => {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    async fn get(&self, ns: &str, kind: Kind, key: &str) -> Result<Option<Stored>, StoreError> {
        Ok(self.get_many(ns, &[(kind, key)]).await?.pop().flatten())
    }

    async fn get_many(
        &self,
        ns: &str,
        keys: &[(Kind, &str)],
    ) -> Result<Vec<Option<Stored>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Point reads joined with UNION ALL, so that each uses its table's primary key; the
        // statement text depends only on the kinds asked for.
        let ns = instance_key(ns);
        let mut parts = Vec::with_capacity(keys.len());
        let mut values = vec![Value::Text(&ns)];
        for (kind, key) in keys {
            let (part, bound) = point_read(*kind, key, values.len() + 1)?;
            parts.push(part);
            values.extend(bound);
        }
        let sql = parts.join(" UNION ALL ");
        let rows: Vec<(String, Stored)> = on_pool!(&self.reads, p => {
            bind_values!(sqlx::query(sqlx::AssertSqlSafe(sql)), &values)
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
                    .find(|(k, stored)| {
                        k == kind.as_str()
                            && (*kind == Kind::CredentialsVersion || stored.key == *key)
                    })
                    .map(|(_, stored)| stored.clone())
            })
            .collect())
    }

    async fn list(&self, ns: &str, kind: Kind, page: Page<'_>) -> Result<Vec<Stored>, StoreError> {
        let table = table(kind)?;
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        let sqlite = matches!(self.pool, Pool::Sqlite(_));
        let sql = match (page.parent, page.after, sqlite) {
            (None, None, _) => &table.sql.list,
            (None, Some(_), _) => &table.sql.list_after,
            (Some(_), None, false) => &table.sql.list_parent,
            (Some(_), Some(_), false) => &table.sql.list_parent_after,
            (Some(_), None, true) => &table.sql.list_parent_sqlite,
            (Some(_), Some(_), true) => &table.sql.list_parent_after_sqlite,
        };
        if sql.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{kind:?} records have no parent"
            )));
        }
        let ns = instance_key(ns);
        let mut values = scope(table, &ns);
        values.extend(page.parent.map(Value::Text));
        values.extend(page.after.map(Value::Text));
        on_pool!(&self.reads, p => bind_values!(sqlx::query(sql.as_str()), &values)
            .bind(limit)
            .fetch_all(p)
            .await?
            .iter()
            .map(stored)
            .collect())
    }

    async fn list_events(
        &self,
        ns: &str,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        // Without statistics SQLite's planner walks the primary key (it gives the order) and
        // filters every event of the instance: it is told the index of the most selective
        // filter.
        let index = match (&filter.registration, &filter.enrollment, &filter.kind) {
            (Some(_), ..) => Some("events_by_registration"),
            (None, Some(_), _) => Some("events_by_enrollment"),
            (None, None, Some(_)) => Some("events_by_kind"),
            (None, None, None) => None,
        };
        let conditions = [
            ("kind =", filter.kind.as_deref()),
            ("registration_id =", filter.registration.as_deref()),
            ("enrollment =", filter.enrollment.as_deref()),
            ("key >=", filter.from.as_deref()),
            ("key <", filter.to.as_deref()),
            ("key >", after),
        ];
        self.list_log("events", index, ns, &conditions, limit).await
    }

    async fn list_audit(
        &self,
        ns: &str,
        filter: &AuditFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let index = match (&filter.resource_kind, &filter.policy) {
            (Some(_), _) => Some("audit_log_by_resource"),
            (None, Some(_)) => Some("audit_log_by_policy"),
            (None, None) => None,
        };
        let conditions = [
            ("resource_kind =", filter.resource_kind.as_deref()),
            ("resource_id =", filter.resource_id.as_deref()),
            ("policy =", filter.policy.as_deref()),
            ("key >=", filter.from.as_deref()),
            ("key <", filter.to.as_deref()),
            ("key >", after),
        ];
        self.list_log("audit_log", index, ns, &conditions, limit)
            .await
    }

    async fn write(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError> {
        let mut attempt = 0;
        loop {
            match self.write_once(writes).await {
                // Distributed PostgreSQL-compatible engines abort a transaction that would not
                // serialise, and PostgreSQL one of two that wait for each other's rows; it
                // holds no effect, so it is run again.
                Err(e) if e.is_worth_retrying() && attempt < SERIALIZATION_RETRIES => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn put_all(&self, ns: &str, kind: Kind, docs: Vec<BulkDoc>) -> Result<(), StoreError> {
        self.bulk(ns, kind, docs, OnConflict::Replace)
            .await
            .map(|_| ())
    }

    async fn insert_all(
        &self,
        ns: &str,
        kind: Kind,
        docs: Vec<BulkDoc>,
    ) -> Result<Vec<String>, StoreError> {
        self.bulk(ns, kind, docs, OnConflict::Keep).await
    }

    async fn count_by(&self, ns: &str, kind: Kind) -> Result<Vec<(String, i64)>, StoreError> {
        let table = table(kind)?;
        if table.sql.count_by.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{kind:?} records are not counted"
            )));
        }
        let ns = instance_key(ns);
        let values = scope(table, &ns);
        on_pool!(&self.reads, p => bind_values!(sqlx::query(table.sql.count_by.as_str()), &values)
            .fetch_all(p)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("value")?, row.try_get("n")?)))
            .collect())
    }

    async fn instance_by_scope(&self, id_scope: &str) -> Result<Option<String>, StoreError> {
        let found = on_pool!(&self.reads, p => sqlx::query("SELECT key FROM instances WHERE id_scope = $1")
            .bind(id_scope)
            .fetch_optional(p)
            .await?
            .map(|row| row.try_get("key"))
            .transpose()?);
        Ok(found)
    }

    async fn instance_by_host(&self, host: &str) -> Result<Option<String>, StoreError> {
        let found = on_pool!(&self.reads, p => sqlx::query("SELECT instance FROM instance_host_names WHERE host = $1")
            .bind(host)
            .fetch_optional(p)
            .await?
            .map(|row| row.try_get("instance"))
            .transpose()?);
        Ok(found)
    }

    async fn sweep(&self, now: i64) -> Result<u64, StoreError> {
        let mut swept = 0;
        for sql in [
            "DELETE FROM operations WHERE expires_at < $1",
            "DELETE FROM tpm_challenges WHERE expires_at < $1",
            "DELETE FROM issued_certificates WHERE expires_at < $1",
            "DELETE FROM revoked_certificates WHERE expires_at < $1",
            "DELETE FROM events WHERE expires_at < $1",
        ] {
            swept += on_pool!(&self.pool, p => sqlx::query(sql)
                .bind(now)
                .execute(p)
                .await?
                .rows_affected());
        }
        Ok(swept)
    }

    async fn sweep_audit(&self, before: &str, max: u64) -> Result<u64, StoreError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let instances: Vec<String> = on_pool!(&self.reads, p => sqlx::query_scalar("SELECT key FROM instances")
            .fetch_all(p)
            .await?);
        let mut trimmed = 0;
        for instance in instances {
            // Through the primary key (instance, key): keys are times.
            trimmed += on_pool!(&self.pool, p => sqlx::query(
                "DELETE FROM audit_log WHERE instance = $1 AND key < $2",
            )
            .bind(&instance)
            .bind(before)
            .execute(p)
            .await?
            .rows_affected());
            if max == 0 {
                continue;
            }
            // The newest entry past the ones kept, found by a reader, so that the writer is
            // held only for the delete.
            let cutoff: Option<String> = on_pool!(&self.reads, p => sqlx::query_scalar(
                "SELECT key FROM audit_log WHERE instance = $1 ORDER BY key DESC LIMIT 1 OFFSET $2",
            )
            .bind(&instance)
            .bind(max)
            .fetch_optional(p)
            .await?);
            if let Some(cutoff) = cutoff {
                trimmed += on_pool!(&self.pool, p => sqlx::query(
                    "DELETE FROM audit_log WHERE instance = $1 AND key <= $2",
                )
                .bind(&instance)
                .bind(&cutoff)
                .execute(p)
                .await?
                .rows_affected());
            }
        }
        Ok(trimmed)
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        let Pool::Sqlite(kept) = &self.reads else {
            return Ok(());
        };
        // PASSIVE copies what no reader still needs and waits for nobody. The writer starts
        // the log again from its beginning only while no reader is in it, which under steady
        // load is seldom: past `WAL_RESTART_FRAMES` the log is restarted here, which waits
        // for the readers of the moment (single statements) and holds the writer meanwhile.
        let mut lease = kept.lease().await?;
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(lease.connection())
            .await?;
        let frames: i64 = row.try_get(1)?;
        if frames >= WAL_RESTART_FRAMES {
            sqlx::query("PRAGMA wal_checkpoint(RESTART)")
                .execute(lease.connection())
                .await?;
        }
        lease.keep();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }
}

/// What a bulk write does with a key that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnConflict {
    Replace,
    Keep,
}

impl SqlStore {
    /// The rows of log `table` (events, the audit log) of `ns` that pass every condition
    /// with a value (`column op`, value), in key order, at most `limit`; on SQLite through
    /// `index` when one is named.
    async fn list_log(
        &self,
        table: &str,
        index: Option<&str>,
        ns: &str,
        conditions: &[(&str, Option<&str>)],
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let ns = instance_key(ns);
        let mut values = vec![Value::Text(&ns)];
        let index = match (&self.reads, index) {
            (Pool::Sqlite(_), Some(index)) => format!(" INDEXED BY {index}"),
            _ => String::new(),
        };
        let mut sql = format!(
            "SELECT key, doc, etag, created_at, updated_at FROM {table}{index} WHERE instance = $1"
        );
        for (test, value) in conditions {
            if let Some(value) = value {
                values.push(Value::Text(value));
                sql.push_str(&format!(" AND {test} ${}", values.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY key LIMIT ${}", values.len() + 1));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Only fixed fragments are spliced in; every value is bound.
        on_pool!(&self.reads, p => bind_values!(sqlx::query(sqlx::AssertSqlSafe(sql)), &values)
            .bind(limit)
            .fetch_all(p)
            .await?
            .iter()
            .map(stored)
            .collect())
    }

    /// Writes `docs` many rows per statement in one transaction, with their audit entries
    /// when an admin writes them; returns the keys written. The records' statements and their
    /// values are made before the transaction begins: on SQLite it holds the one writer.
    async fn bulk(
        &self,
        ns: &str,
        kind: Kind,
        docs: Vec<BulkDoc>,
        on_conflict: OnConflict,
    ) -> Result<Vec<String>, StoreError> {
        let target = table(kind)?;
        if !target.scoped || kind == Kind::AuditEntry {
            return Err(StoreError::Invalid(format!(
                "{kind:?} cannot be written in bulk"
            )));
        }
        let ns = instance_key(ns);
        let anonymous = matches!(self.pool, Pool::Sqlite(_));
        let answer = match on_conflict {
            OnConflict::Keep => Answer::Written,
            OnConflict::Replace => Answer::Replaced,
        };
        // An entry per record, created (only free keys are written) or imported (created or
        // replaced: what a key held before is not read), without its fields: a record's diff
        // costs more than writing it, and bulk writes are the fast path of imports.
        let action = match on_conflict {
            OnConflict::Keep => Action::Create,
            OnConflict::Replace => Action::Import,
        };
        let records = bulk_statements(target, kind, &ns, docs, answer, anonymous)?;
        let mut tx = self.begin().await?;
        let written = run_bulk(&mut tx, kind, &ns, records).await?;
        if let Some(actor) = audit::actor() {
            // Made inside the transaction, so that on SQLite (one writer) the entries' keys,
            // which carry their time, follow the order of the commits: a reader paging the log
            // after its last key misses none.
            let entries: Vec<BulkDoc> = written
                .iter()
                .map(|key| {
                    let row = audit::entry(&actor, &ns, kind, key, action, None, None);
                    BulkDoc {
                        key: row.key,
                        columns: row.columns,
                        doc: row.doc,
                    }
                })
                .collect();
            // Every entry or none: a key taken twice fails the write instead of dropping one.
            let audit = table(Kind::AuditEntry)?;
            let statements = bulk_statements(
                audit,
                Kind::AuditEntry,
                &ns,
                entries,
                Answer::All,
                anonymous,
            )?;
            run_bulk(&mut tx, Kind::AuditEntry, &ns, statements).await?;
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn write_once(&self, writes: &[Write]) -> Result<Vec<Option<Stored>>, StoreError> {
        if writes.iter().any(|w| kind_of(w) == Some(Kind::AuditEntry)) {
            return Err(StoreError::Invalid(
                "the audit log is written only by the store".into(),
            ));
        }
        let actor = audit::actor();
        if actor.is_none() {
            if let Some(writer) = &self.writer
                && let Some(written) = writer.write(writes).await
            {
                return written;
            }
            if let Pool::Postgres(pool) = &self.pool
                && let Some(written) = write_in_one_statement(pool, writes).await?
            {
                return Ok(written);
            }
        }
        let mut tx = self.begin().await?;
        // An early return drops the transaction, which rolls it back.
        let results = match &actor {
            Some(actor) => {
                let mut results = Vec::with_capacity(writes.len());
                for write in writes {
                    results.push(apply_audited(&mut tx, actor, write).await?);
                }
                results
            }
            None => apply_all(&mut tx, writes).await?,
        };
        tx.commit().await?;
        Ok(results)
    }
}

/// A statement of a bulk write and the values it binds, owned so that binding moves them
/// instead of copying them.
struct BulkStatement {
    sql: String,
    values: Vec<Owned>,
    answer: Answer,
    /// The table it writes.
    table: &'static str,
    /// The keys of its rows.
    keys: Vec<String>,
    /// For [`Answer::Written`], the etags its rows are written with, in the order of `keys`.
    etags: Vec<String>,
    /// The typed columns of its first row, which name what a failed statement refers to.
    first: Columns,
}

/// What a bulk statement does with keys that exist, and what it tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Replaces them: every row is written.
    Replaced,
    /// Keeps them, and answers with the keys it wrote. The statement returns nothing (on
    /// SQLite each returned row is a hand-off between threads); when it writes fewer rows than
    /// it holds, the keys whose rows carry the etags it wrote are read back.
    Written,
    /// Keeps them, and fails unless it wrote every row.
    All,
}

/// A [`Value`] that owns its text.
enum Owned {
    Text(String),
    OptText(Option<String>),
    OptInt(Option<i64>),
}

impl From<Value<'_>> for Owned {
    fn from(value: Value<'_>) -> Self {
        match value {
            Value::Text(v) => Owned::Text(v.to_owned()),
            Value::OptText(v) => Owned::OptText(v.map(str::to_owned)),
            Value::OptInt(v) => Owned::OptInt(v),
        }
    }
}

/// The statements that write `docs` (of `kind`, in `table`) many rows per statement.
fn bulk_statements(
    table: &Table,
    kind: Kind,
    ns: &str,
    docs: Vec<BulkDoc>,
    answer: Answer,
    anonymous: bool,
) -> Result<Vec<BulkStatement>, StoreError> {
    let at = crate::timestamp::now();
    // On SQLite (`anonymous`) every parameter is an anonymous `?`, bound in order, so the
    // instance and the time are bound on every row: sqlx's SQLite driver asks each parameter's
    // name, which SQLite finds by walking the statement's named ones (a cost per row that grows
    // with the rows per statement), while an anonymous parameter has no name to find. On
    // PostgreSQL they are bound once ($1 instance, $2 time).
    let width = if anonymous { 6 } else { 3 } + table.columns.len();
    let per_statement = if anonymous {
        SQLITE_BULK_PARAMETERS
    } else {
        POSTGRES_BULK_PARAMETERS
    };
    let mut names = vec!["instance", "key", "doc", "etag", "created_at", "updated_at"];
    names.extend(table.columns);
    let conflict = match answer {
        Answer::Replaced => {
            let assignments: Vec<String> = ["doc", "etag", "updated_at"]
                .iter()
                .chain(table.columns)
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            format!("DO UPDATE SET {}", assignments.join(", "))
        }
        Answer::Written | Answer::All => "DO NOTHING".to_owned(),
    };
    let text = |rows: usize| {
        let rows: Vec<String> = (0..rows)
            .map(|i| {
                let row: Vec<String> = if anonymous {
                    vec!["?".to_owned(); width]
                } else {
                    // Per row: key, doc, etag, columns.
                    let p = |n: usize| format!("${}", 3 + i * width + n);
                    let mut row = vec!["$1".to_owned(), p(0), p(1), p(2), "$2".into(), "$2".into()];
                    row.extend((0..table.columns.len()).map(|c| p(3 + c)));
                    row
                };
                format!("({})", row.join(", "))
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) VALUES {} ON CONFLICT (instance, key) {conflict}",
            table.name,
            names.join(", "),
            rows.join(", "),
        )
    };
    let per_chunk = (per_statement / width).max(1);
    // Every chunk but the last has the same statement.
    let full = (docs.len() >= per_chunk).then(|| text(per_chunk));
    let mut statements = Vec::new();
    let mut docs = docs.into_iter().peekable();
    while docs.peek().is_some() {
        let chunk: Vec<BulkDoc> = docs.by_ref().take(per_chunk).collect();
        let sql = match &full {
            Some(full) if chunk.len() == per_chunk => full.clone(),
            _ => text(chunk.len()),
        };
        let keys = chunk.iter().map(|d| d.key.clone()).collect();
        let mut etags = Vec::new();
        let first = chunk.first().map(|d| d.columns.clone()).unwrap_or_default();
        let mut values = Vec::with_capacity(chunk.len() * width + 2);
        if !anonymous {
            values.extend([Owned::Text(ns.to_owned()), Owned::Text(at.clone())]);
        }
        for doc in chunk {
            if anonymous {
                values.push(Owned::Text(ns.to_owned()));
            }
            let etag = new_etag();
            if answer == Answer::Written {
                etags.push(etag.clone());
            }
            values.extend([
                Owned::Text(doc.key),
                Owned::Text(doc.doc),
                Owned::Text(etag),
            ]);
            if anonymous {
                values.extend([Owned::Text(at.clone()), Owned::Text(at.clone())]);
            }
            let columns = schema::values(table, &doc.columns).ok_or_else(|| {
                StoreError::Invalid(format!("{:?} are not the columns of {kind:?}", doc.columns))
            })?;
            values.extend(columns.into_iter().map(Owned::from));
        }
        statements.push(BulkStatement {
            sql,
            values,
            answer,
            table: table.name,
            keys,
            etags,
            first,
        });
    }
    Ok(statements)
}

/// Runs `statements` (writing records of `kind` for instance `ns`) in `tx`; returns the keys
/// written.
async fn run_bulk(
    tx: &mut Tx<'_>,
    kind: Kind,
    ns: &str,
    statements: Vec<BulkStatement>,
) -> Result<Vec<String>, StoreError> {
    let mut written = Vec::new();
    for statement in statements {
        let BulkStatement {
            sql,
            values,
            answer,
            table,
            keys,
            etags,
            first,
        } = statement;
        let done = on_tx!(tx, t => {
            // The statement holds only placeholders; every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for value in values {
                query = match value {
                    Owned::Text(v) => query.bind(v),
                    Owned::OptText(v) => query.bind(v),
                    Owned::OptInt(v) => query.bind(v),
                };
            }
            query.execute(&mut **t).await.map(|done| done.rows_affected())
        });
        let rows = done.map_err(|e| constraint(kind, "", &first, e))?;
        if rows == keys.len() as u64 {
            written.extend(keys);
            continue;
        }
        match answer {
            Answer::All => {
                return Err(StoreError::Invalid(format!(
                    "{kind:?} keys collided: {rows} of {} rows could be written; nothing was",
                    keys.len()
                )));
            }
            Answer::Written => written.extend(ours(tx, table, ns, keys, etags).await?),
            Answer::Replaced => written.extend(keys),
        }
    }
    Ok(written)
}

/// Which of `keys` (of instance `ns`, in `table`) hold the etag this transaction wrote them
/// with, the one at the same position of `etags`: the rows a bulk insert wrote rather than
/// found.
async fn ours(
    tx: &mut Tx<'_>,
    table: &str,
    ns: &str,
    keys: Vec<String>,
    etags: Vec<String>,
) -> Result<Vec<String>, StoreError> {
    let placeholders: Vec<String> = (0..keys.len()).map(|i| format!("${}", i + 2)).collect();
    let sql = format!(
        "SELECT key, etag FROM {table} WHERE instance = $1 AND key IN ({})",
        placeholders.join(", ")
    );
    let stored: HashMap<String, String> = on_tx!(tx, t => {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ns);
        for key in &keys {
            query = query.bind(key);
        }
        query
            .fetch_all(&mut **t)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("key")?, row.try_get("etag")?)))
            .collect::<Result<_, sqlx::Error>>()?
    });
    Ok(keys
        .into_iter()
        .zip(etags)
        .filter(|(key, etag)| stored.get(key) == Some(etag))
        .map(|(key, _)| key)
        .collect())
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use sqlx::Row;

    use super::*;

    /// A store on a fresh PostgreSQL database (the suite sets `DPS_TEST_DATABASE_URL`; the
    /// black-box tests' harness drops the databases of ended test processes, by the pid in the
    /// name).
    async fn postgres_store() -> SqlStore {
        use sqlx::Connection;
        let admin = std::env::var("DPS_TEST_DATABASE_URL")
            .expect("DPS_TEST_DATABASE_URL is not set: run the suite with scripts/test.sh");
        let name = format!(
            "dps_test_{}_{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        SqlStore::connect(&format!("{base}/{name}")).await.unwrap()
    }

    /// A connection whose statement failed is not kept: after PostgreSQL ends the store's
    /// sessions (as a restart would), a ping fails once on each kept connection, then succeeds
    /// on a new one.
    #[tokio::test]
    async fn postgres_a_connection_that_failed_is_not_kept() -> Result<(), StoreError> {
        let store = postgres_store().await;
        store.ping().await?;
        let database: String = on_pool!(&store.pool, c => {
            sqlx::query_scalar("SELECT current_database()").fetch_one(c).await?
        });
        let admin = std::env::var("DPS_TEST_DATABASE_URL").unwrap();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
        )
        .bind(&database)
        .fetch_all(&mut conn)
        .await?;
        assert!(!ended.is_empty() && ended.iter().all(|e| *e), "{ended:?}");
        assert!(store.ping().await.is_err(), "the ended session answered");
        // Each ended session fails once at most; one kept after failing would fail again and
        // again.
        let mut failures = 1;
        while store.ping().await.is_err() {
            failures += 1;
            assert!(failures <= ended.len(), "a failed connection was kept");
        }
        Ok(())
    }

    pub(in crate::store) fn with(write: Write, precondition: Precondition) -> Write {
        match write {
            Write::Put {
                ns,
                kind,
                key,
                columns,
                doc,
                etag,
                ..
            } => Write::Put {
                ns,
                kind,
                key,
                columns,
                doc,
                precondition,
                etag,
            },
            other => other,
        }
    }

    fn operation(key: &str) -> Write {
        Write::Put {
            ns: "one".into(),
            kind: Kind::Operation,
            key: key.into(),
            columns: Columns::Operation {
                registration: "device".into(),
                expires_at: None,
            },
            doc: "{}".into(),
            precondition: Precondition::MustNotExist,
            etag: None,
        }
    }

    /// Which batches PostgreSQL writes in one statement, and that one whose precondition fails
    /// is left to the transaction (`None`) with nothing of it written.
    #[tokio::test]
    async fn postgres_writes_puts_into_distinct_tables_in_one_statement() {
        let store = postgres_store().await;
        store.write(&[instance()]).await.unwrap();
        let Pool::Postgres(pool) = &store.pool else {
            panic!("not PostgreSQL")
        };
        let one = |writes: Vec<Write>| {
            let pool = pool.clone();
            async move { write_in_one_statement(&pool, &writes).await.unwrap() }
        };

        let written = one(vec![policy("a"), operation("op-1")]).await;
        let written = written.expect("new records in two tables are one statement");
        let stored = store
            .get("one", Kind::AccessPolicy, "a")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.etag, written[0].as_ref().unwrap().etag);

        // A taken key, a stale etag, a missing record: aborted, nothing of the batch kept.
        let taken = one(vec![policy("b"), operation("op-1")]).await;
        assert!(taken.is_none());
        let stale = one(vec![
            operation("op-2"),
            with(policy("a"), Precondition::IfMatch("\"stale\"".into())),
        ])
        .await;
        assert!(stale.is_none());
        let missing = one(vec![
            operation("op-3"),
            with(policy("nobody"), Precondition::IfMatch("\"any\"".into())),
        ])
        .await;
        assert!(missing.is_none());
        for (kind, key) in [
            (Kind::AccessPolicy, "b"),
            (Kind::Operation, "op-2"),
            (Kind::Operation, "op-3"),
        ] {
            assert!(
                store.get("one", kind, key).await.unwrap().is_none(),
                "{key}"
            );
        }
        assert_eq!(
            store
                .get("one", Kind::AccessPolicy, "a")
                .await
                .unwrap()
                .unwrap()
                .etag,
            stored.etag
        );

        // Not for one statement: two writes of a table, an instance, a delete, nothing.
        assert!(one(vec![policy("c"), policy("d")]).await.is_none());
        assert!(one(vec![instance()]).await.is_none());
        let delete = Write::Delete {
            ns: "one".into(),
            kind: Kind::AccessPolicy,
            key: "a".into(),
            precondition: Precondition::Always,
        };
        assert!(one(vec![delete]).await.is_none());
        assert!(one(Vec::new()).await.is_none());
        assert!(
            store
                .get("one", Kind::AccessPolicy, "c")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .get("one", Kind::AccessPolicy, "a")
                .await
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn shifted_renumbers_every_parameter() {
        assert_eq!(
            shifted(
                "UPDATE t SET doc = $2 WHERE instance = $1 AND etag = $10",
                7
            ),
            "UPDATE t SET doc = $9 WHERE instance = $8 AND etag = $17"
        );
        assert_eq!(shifted("SELECT $", 3), "SELECT $");
    }

    /// The listings of a parent's records (a device's operations, a group's registrations, an
    /// owner's records) use the parent index, with no sort and no scan of the table.
    #[tokio::test]
    async fn sqlite_lists_children_through_the_parent_index() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("plan.sqlite").display()
        );
        let store = SqlStore::connect(&url).await.unwrap();
        let Pool::Sqlite(pool) = &store.pool else {
            panic!("a SQLite URL");
        };
        let mut lease = pool.lease().await.unwrap();
        for kind in [
            Kind::Operation,
            Kind::RegistrationState,
            Kind::OwnershipRecord,
        ] {
            let table = schema::of(kind).unwrap();
            for (sql, after) in [
                (&table.sql.list_parent_sqlite, false),
                (&table.sql.list_parent_after_sqlite, true),
            ] {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(explain))
                    .bind("ns")
                    .bind("parent");
                if after {
                    query = query.bind("key");
                }
                let rows = query
                    .bind(10i64)
                    .fetch_all(lease.connection())
                    .await
                    .unwrap();
                let plan: Vec<String> = rows
                    .iter()
                    .map(|r| r.try_get::<String, _>("detail").unwrap())
                    .collect();
                assert_eq!(plan.len(), 1, "{kind:?}: {plan:?}");
                assert!(
                    plan[0].contains("USING INDEX") && plan[0].contains("_by_"),
                    "{kind:?}: {plan:?}"
                );
            }
        }
    }

    pub(in crate::store) async fn sqlite_file_store(dir: &tempfile::TempDir) -> (SqlStore, String) {
        let path = dir.path().join("dps.sqlite").display().to_string();
        let store = SqlStore::connect(&format!("sqlite://{path}?mode=rwc"))
            .await
            .unwrap();
        (store, path)
    }

    pub(in crate::store) fn policy(key: &str) -> Write {
        Write::Put {
            ns: "one".into(),
            kind: Kind::AccessPolicy,
            key: key.into(),
            columns: Columns::None,
            doc: "{}".into(),
            precondition: Precondition::Always,
            etag: None,
        }
    }

    pub(in crate::store) fn instance() -> Write {
        Write::Put {
            ns: crate::store::SERVER_NS.into(),
            kind: Kind::Instance,
            key: "one".into(),
            columns: Columns::Instance {
                id_scope: "0ne00000001".into(),
                host_names: Vec::new(),
            },
            doc: "{}".into(),
            precondition: Precondition::Always,
            etag: None,
        }
    }

    fn actor() -> audit::Actor {
        audit::Actor {
            instance: "one".into(),
            policy: "Owner".into(),
            request_id: Some("r-1".into()),
        }
    }

    async fn audit_log(store: &SqlStore) -> Vec<Stored> {
        store
            .list_audit("one", &AuditFilter::default(), None, 100)
            .await
            .unwrap()
    }

    /// An entry is part of its change's transaction: a transaction that fails after an audited
    /// write leaves neither the write nor its entry; writes outside an identified request are
    /// not audited; nothing writes the log but the store.
    #[tokio::test]
    async fn audit_entries_commit_and_roll_back_with_their_change() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = sqlite_file_store(&dir).await;
        store.write(&[instance()]).await.unwrap();
        let mut taken = policy("taken");
        if let Write::Put { precondition, .. } = &mut taken {
            *precondition = Precondition::MustNotExist;
        }
        store.write(&[taken.clone()]).await.unwrap();
        assert!(audit_log(&store).await.is_empty(), "no actor, no entry");

        audit::serving(async {
            audit::identify(actor());
            // The first write succeeds and adds its entry; the second finds its key taken.
            let failed = store.write(&[policy("fresh"), taken.clone()]).await;
            assert!(
                matches!(failed, Err(StoreError::Exists { .. })),
                "{failed:?}"
            );
            assert!(audit_log(&store).await.is_empty());
            assert!(
                store
                    .get("one", Kind::AccessPolicy, "fresh")
                    .await
                    .unwrap()
                    .is_none()
            );

            store.write(&[policy("fresh")]).await.unwrap();
            let forged = Write::Put {
                ns: "one".into(),
                kind: Kind::AuditEntry,
                key: "0000000000000-000000000000".into(),
                columns: Columns::None,
                doc: "{}".into(),
                precondition: Precondition::Always,
                etag: None,
            };
            assert!(matches!(
                store.write(&[forged]).await,
                Err(StoreError::Invalid(_))
            ));
            let purge = Write::Purge {
                ns: "one".into(),
                kind: Kind::AuditEntry,
                key: "x".into(),
            };
            assert!(matches!(
                store.write(&[purge]).await,
                Err(StoreError::Invalid(_))
            ));
            assert!(matches!(
                store.put_all("one", Kind::AuditEntry, Vec::new()).await,
                Err(StoreError::Invalid(_))
            ));
        })
        .await;
        let log = audit_log(&store).await;
        assert_eq!(log.len(), 1);
        let entry: dps_protocol::admin::AuditEntry = serde_json::from_str(&log[0].doc).unwrap();
        assert_eq!(
            (
                entry.action.as_str(),
                entry.resource_id.as_str(),
                entry.policy.as_str()
            ),
            ("create", "fresh", "Owner")
        );
        assert_eq!(entry.request_id.as_deref(), Some("r-1"));
        // A key read outside an identified request is refused, not recorded anonymously.
        let read = Write::KeysRead {
            ns: "one".into(),
            kind: Kind::AccessPolicy,
            key: "fresh".into(),
        };
        assert!(matches!(
            store.write(&[read]).await,
            Err(StoreError::Invalid(_))
        ));
    }

    /// A bulk statement that must write every row (audit entries) fails when a key is taken,
    /// and its transaction writes nothing; one that keeps taken keys answers with the others.
    #[tokio::test]
    async fn bulk_statements_that_must_write_all_fail_on_a_taken_key() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, _) = sqlite_file_store(&dir).await;
        let mut stores = vec![sqlite];
        if std::env::var("DPS_TEST_DATABASE_URL").is_ok() {
            stores.push(postgres_store().await);
        }
        for store in stores {
            store.write(&[instance()]).await.unwrap();
            store.write(&[policy("taken")]).await.unwrap();
            let table = table(Kind::AccessPolicy).unwrap();
            let anonymous = matches!(store.pool, Pool::Sqlite(_));
            let docs = || {
                ["free", "taken"].map(|key| BulkDoc {
                    key: key.into(),
                    columns: Columns::None,
                    doc: r#"{"new":true}"#.into(),
                })
            };
            let run = |answer| {
                let statements = bulk_statements(
                    table,
                    Kind::AccessPolicy,
                    "one",
                    docs().to_vec(),
                    answer,
                    anonymous,
                )
                .unwrap();
                let store = store.clone();
                async move {
                    let mut tx = store.begin().await.unwrap();
                    let written = run_bulk(&mut tx, Kind::AccessPolicy, "one", statements).await?;
                    tx.commit().await?;
                    Ok::<_, StoreError>(written)
                }
            };
            let failed = run(Answer::All).await;
            assert!(matches!(failed, Err(StoreError::Invalid(_))), "{failed:?}");
            assert!(
                store
                    .get("one", Kind::AccessPolicy, "free")
                    .await
                    .unwrap()
                    .is_none()
            );
            let taken = store.get("one", Kind::AccessPolicy, "taken").await.unwrap();
            assert_eq!(taken.unwrap().doc, "{}");

            assert_eq!(run(Answer::Written).await.unwrap(), ["free"]);
            let replaced = run(Answer::Replaced).await.unwrap();
            assert_eq!(replaced, ["free", "taken"]);
            let taken = store.get("one", Kind::AccessPolicy, "taken").await.unwrap();
            assert_eq!(taken.unwrap().doc, r#"{"new":true}"#);
        }
    }

    /// Past the count kept, the oldest entries of an instance go; past the retention, all.
    #[tokio::test]
    async fn sweeping_keeps_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = sqlite_file_store(&dir).await;
        store.write(&[instance()]).await.unwrap();
        audit::serving(async {
            audit::identify(actor());
            for key in ["a", "b", "c", "d"] {
                store.write(&[policy(key)]).await.unwrap();
                // Keys are per millisecond: keep them in write order.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
        .await;
        assert_eq!(
            store.sweep_audit("0", 0).await.unwrap(),
            0,
            "0: no count limit"
        );
        assert_eq!(store.sweep_audit("0", 10).await.unwrap(), 0);
        assert_eq!(store.sweep_audit("0", 2).await.unwrap(), 2);
        let kept: Vec<String> = audit_log(&store)
            .await
            .iter()
            .map(|s| {
                serde_json::from_str::<serde_json::Value>(&s.doc).unwrap()["resourceId"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(kept, ["c", "d"]);
        let later = crate::store::event_key_at(i64::MAX / 4);
        assert_eq!(store.sweep_audit(&later, 10).await.unwrap(), 2);
        assert!(audit_log(&store).await.is_empty());
    }

    /// Reads have connections of their own: a write transaction that is still open (a long
    /// bulk write, say) holds up other writes but no read, and the reads see what was committed.
    #[tokio::test]
    async fn sqlite_reads_go_on_while_a_write_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = sqlite_file_store(&dir).await;
        store.write(&[instance()]).await.unwrap();
        let mut open = store.begin().await.unwrap();
        apply(&mut open, &policy("pending")).await.unwrap();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.get("one", Kind::AccessPolicy, "pending"),
        )
        .await
        .expect("a read waited for an open write");
        assert_eq!(read.unwrap(), None, "an uncommitted write was read");
        open.commit().await.unwrap();
        let read = store
            .get("one", Kind::AccessPolicy, "pending")
            .await
            .unwrap();
        assert!(read.is_some(), "a committed write was not read");
    }

    /// `checkpoint` copies committed writes from the write-ahead log into the database file
    /// (read here by a connection that ignores the log).
    #[tokio::test]
    async fn sqlite_checkpoint_copies_the_log_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = sqlite_file_store(&dir).await;
        let Pool::Sqlite(writer) = &store.pool else {
            panic!("a SQLite URL");
        };
        // The schema into the file, by hand.
        let mut lease = writer.lease().await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(lease.connection())
            .await
            .unwrap();
        lease.keep();
        store.write(&[instance(), policy("logged")]).await.unwrap();
        let in_file = || async {
            let options: SqliteConnectOptions =
                format!("sqlite://{path}?immutable=1").parse().unwrap();
            let mut file_only = sqlx::ConnectOptions::connect(&options).await.unwrap();
            let found = sqlx::query("SELECT key FROM access_policies WHERE key = 'logged'")
                .fetch_optional(&mut file_only)
                .await
                .unwrap()
                .is_some();
            sqlx::Connection::close(file_only).await.unwrap();
            found
        };
        assert!(!in_file().await, "the write skipped the log");
        store.checkpoint().await.unwrap();
        assert!(in_file().await, "the checkpoint left the write in the log");
    }
}
