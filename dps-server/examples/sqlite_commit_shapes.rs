//! What a transaction of three inserts costs on one SQLite connection through sqlx, sent in
//! three shapes, as CPU of this process per transaction (64 tasks writing at once):
//! a statement at a time (BEGIN, three inserts, COMMIT: five hand-offs to the connection's
//! thread), all in one multi-statement query (one hand-off), and grouped (the inserts of 8 or
//! 32 transactions in one). Run with
//! `cargo run --release -p dps-server --example sqlite_commit_shapes`.

use std::error::Error;
use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

const TRANSACTIONS: usize = 20_000;
const TASKS: usize = 64;
const TABLES: [&str; 3] = ["a", "b", "c"];

/// utime + stime of this process, in seconds.
fn cpu_secs() -> Result<f64, Box<dyn Error>> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_name = stat.rsplit_once(')').ok_or("no ')' in /proc/self/stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = fields.get(11..13).ok_or("short /proc/self/stat")?;
    Ok((ticks[0].parse::<f64>()? + ticks[1].parse::<f64>()?) / 100.0)
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    StatementAtATime,
    OneQuery,
    Grouped(usize),
}

async fn insert_one(
    tx: &mut sqlx::SqliteConnection,
    table: &str,
    key: &str,
    doc: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (k, doc, created_at) VALUES ($1, $2, $3) RETURNING created_at"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(key)
        .bind(doc)
        .bind("now")
        .fetch_optional(tx)
        .await
        .map(|_| ())
}

/// Writes the transactions numbered `first`, `first + TASKS`, ... in `shape`.
async fn writer(
    pool: SqlitePool,
    shape: Shape,
    run: usize,
    first: usize,
) -> Result<(), sqlx::Error> {
    let doc = "x".repeat(600);
    let mine: Vec<usize> = (first..TRANSACTIONS).step_by(TASKS).collect();
    let per_transaction = match shape {
        Shape::Grouped(n) => n,
        _ => 1,
    };
    for chunk in mine.chunks(per_transaction) {
        match shape {
            Shape::StatementAtATime | Shape::Grouped(_) => {
                let mut tx = pool.begin().await?;
                for i in chunk {
                    for table in TABLES {
                        insert_one(&mut tx, table, &format!("{run}-{i}"), &doc).await?;
                    }
                }
                tx.commit().await?;
            }
            Shape::OneQuery => {
                let key = format!("{run}-{}", chunk[0]);
                let query = sqlx::query(
                    "BEGIN; \
                     INSERT INTO a (k, doc, created_at) VALUES ($1, $2, $3) RETURNING created_at; \
                     INSERT INTO b (k, doc, created_at) VALUES ($1, $2, $3) RETURNING created_at; \
                     INSERT INTO c (k, doc, created_at) VALUES ($1, $2, $3) RETURNING created_at; \
                     COMMIT",
                );
                query
                    .bind(&key)
                    .bind(&doc)
                    .bind("now")
                    .fetch_all(&pool)
                    .await?;
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!("sqlite-commit-shapes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let options: SqliteConnectOptions =
        format!("sqlite://{}/db?mode=rwc", dir.display()).parse()?;
    let options = options
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    for table in TABLES {
        let sql = format!(
            "CREATE TABLE {table} (k TEXT PRIMARY KEY, doc TEXT NOT NULL, created_at TEXT NOT NULL)"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await?;
    }
    let shapes = [
        Shape::StatementAtATime,
        Shape::OneQuery,
        Shape::Grouped(8),
        Shape::Grouped(32),
    ];
    for (run, shape) in shapes.iter().chain(&shapes).enumerate() {
        let (cpu, started) = (cpu_secs()?, Instant::now());
        let tasks: Vec<_> = (0..TASKS)
            .map(|first| tokio::spawn(writer(pool.clone(), *shape, run, first)))
            .collect();
        for task in tasks {
            task.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        let us = (cpu_secs()? - cpu) * 1e6 / TRANSACTIONS as f64;
        println!(
            "{:<18} {:>6.0} transactions/s {us:>5.0} µs CPU each",
            format!("{shape:?}"),
            TRANSACTIONS as f64 / secs
        );
    }
    pool.close().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
