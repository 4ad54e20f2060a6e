//! Group commit on SQLite: the writes that wait for the one writing connection while a
//! transaction runs go into the next transaction together, so that a commit's work (the
//! pages it appends to the write-ahead log, their checksums, the lock) is paid once per
//! group rather than once per request. Each request still gets its own answer, after the
//! commit that holds its writes.
//!
//! A group that fails as a whole (a write's precondition, a constraint, the database) is
//! rolled back and each of its requests' writes run again in a transaction of their own, as
//! if they had come alone: a request never fails because of another's writes, and its error
//! is the one its own transaction gives.

use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::sql::{Tx, apply};
use super::{StoreError, Stored, Write};

/// Requests' writes in one transaction at most. A group's requests wait for its commit, so
/// this bounds the latency a large group adds (about 130 µs of database work a request).
const MAX_GROUP: usize = 32;
/// Requests waiting for the writer, beyond which a request waits to be queued.
const QUEUE: usize = 1_024;

type Written = Result<Vec<Option<Stored>>, StoreError>;

/// One request's writes and where its answer goes.
#[derive(Debug)]
pub(super) struct Job {
    writes: Vec<Write>,
    reply: oneshot::Sender<Written>,
}

/// The queue of the task that makes every unaudited write on an SQLite database.
#[derive(Debug, Clone)]
pub(super) struct GroupWriter {
    jobs: mpsc::Sender<Job>,
}

impl GroupWriter {
    /// Starts the writer task on `pool` (the pool of the one writing connection).
    pub(super) fn start(pool: SqlitePool) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, queue));
        Self { jobs }
    }

    /// Writes `writes` in one transaction (perhaps with other requests' writes) and returns
    /// what each wrote; `None` when the writer task is gone (its runtime ended) and did not
    /// take them, so that the caller writes them itself. The writes happen even when the
    /// caller stops waiting.
    pub(super) async fn write(&self, writes: &[Write]) -> Option<Written> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            writes: writes.to_vec(),
            reply,
        };
        self.jobs.send(job).await.ok()?;
        // Taken but not answered: the task ended in the middle, and its transaction with it.
        Some(
            answer
                .await
                .unwrap_or(Err(StoreError::Database(sqlx::Error::PoolClosed))),
        )
    }
}

async fn run(pool: SqlitePool, mut queue: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        commit_group(&pool, std::mem::take(&mut group)).await;
    }
}

/// Writes `group` in one transaction, or (when that fails) each job's writes in one of its
/// own, and answers every job.
async fn commit_group(pool: &SqlitePool, group: Vec<Job>) {
    if group.len() > 1 {
        let writes: Vec<&[Write]> = group.iter().map(|job| job.writes.as_slice()).collect();
        if let Ok(results) = in_one_transaction(pool, &writes).await {
            for (job, written) in group.into_iter().zip(results) {
                // A caller that stopped waiting has nobody to tell.
                let _ = job.reply.send(Ok(written));
            }
            return;
        }
    }
    for job in group {
        let written = in_one_transaction(pool, &[&job.writes])
            .await
            .map(|mut results| results.pop().unwrap_or_default());
        let _ = job.reply.send(written);
    }
}

/// Every job's writes in one transaction, in order: what each job's writes wrote.
async fn in_one_transaction(
    pool: &SqlitePool,
    jobs: &[&[Write]],
) -> Result<Vec<Vec<Option<Stored>>>, StoreError> {
    let mut tx = Tx::Sqlite(pool.begin().await?);
    let mut results = Vec::with_capacity(jobs.len());
    for writes in jobs {
        let mut written = Vec::with_capacity(writes.len());
        for write in *writes {
            // An early return drops the transaction, which rolls it back.
            written.push(apply(&mut tx, write).await?);
        }
        results.push(written);
    }
    tx.commit().await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::{Pool, SqlStore};
    use crate::store::{Columns, Kind, Precondition, SERVER_NS, Store};

    fn put(ns: &str, kind: Kind, key: &str, columns: Columns, precondition: Precondition) -> Write {
        Write::Put {
            ns: ns.into(),
            kind,
            key: key.into(),
            columns,
            doc: "{}".into(),
            precondition,
            etag: None,
        }
    }

    fn new_policy(key: &str) -> Write {
        put(
            "one",
            Kind::AccessPolicy,
            key,
            Columns::None,
            Precondition::MustNotExist,
        )
    }

    async fn store(dir: &tempfile::TempDir) -> (SqlStore, SqlitePool) {
        let path = dir.path().join("dps.sqlite").display().to_string();
        let store = SqlStore::connect(&format!("sqlite://{path}?mode=rwc"))
            .await
            .unwrap();
        store
            .write(&[put(
                SERVER_NS,
                Kind::Instance,
                "one",
                Columns::Instance {
                    id_scope: "0ne00000001".into(),
                    host_names: Vec::new(),
                },
                Precondition::Always,
            )])
            .await
            .unwrap();
        let Pool::Sqlite(pool) = store.pool.clone() else {
            unreachable!("an SQLite URL")
        };
        (store, pool)
    }

    /// Runs `writes` of each job as one group and returns each job's answer.
    async fn group(pool: &SqlitePool, jobs: Vec<Vec<Write>>) -> Vec<Written> {
        let mut answers = Vec::new();
        let mut group = Vec::new();
        for writes in jobs {
            let (reply, answer) = oneshot::channel();
            group.push(Job { writes, reply });
            answers.push(answer);
        }
        commit_group(pool, group).await;
        let mut out = Vec::new();
        for answer in answers {
            out.push(answer.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_group_commits_every_job_and_answers_each_with_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let (store, pool) = store(&dir).await;
        let answers = group(
            &pool,
            vec![
                vec![new_policy("a")],
                vec![new_policy("b"), new_policy("c")],
            ],
        )
        .await;
        let keys: Vec<Vec<String>> = answers
            .into_iter()
            .map(|a| a.unwrap().into_iter().map(|s| s.unwrap().key).collect())
            .collect();
        assert_eq!(keys, [vec!["a"], vec!["b", "c"]]);
        for key in ["a", "b", "c"] {
            assert!(
                store
                    .get("one", Kind::AccessPolicy, key)
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    }

    #[tokio::test]
    async fn a_job_that_fails_in_a_group_fails_alone_and_the_others_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, pool) = store(&dir).await;
        store.write(&[new_policy("taken")]).await.unwrap();
        let before = store.get("one", Kind::AccessPolicy, "taken").await.unwrap();
        let answers = group(
            &pool,
            vec![
                vec![new_policy("first")],
                // Its first write would succeed; its second finds the key taken.
                vec![new_policy("half"), new_policy("taken")],
                vec![new_policy("last")],
            ],
        )
        .await;
        assert!(answers[0].is_ok() && answers[2].is_ok(), "{answers:?}");
        assert!(
            matches!(&answers[1], Err(StoreError::Exists { key, .. }) if key == "taken"),
            "{answers:?}"
        );
        for (key, written) in [("first", true), ("half", false), ("last", true)] {
            let found = store.get("one", Kind::AccessPolicy, key).await.unwrap();
            assert_eq!(found.is_some(), written, "{key}");
        }
        let after = store.get("one", Kind::AccessPolicy, "taken").await.unwrap();
        assert_eq!(before.map(|s| s.etag), after.map(|s| s.etag));
    }

    #[tokio::test]
    async fn concurrent_writers_of_one_key_get_one_success_and_the_others_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store(&dir).await;
        let mut tasks = Vec::new();
        for n in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("key-{}", n % 8);
                store.write(&[new_policy(&key)]).await
            }));
        }
        let mut written = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => written += 1,
                Err(StoreError::Exists { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(written, 8);
    }

    #[test]
    fn a_store_whose_writer_task_ended_with_its_runtime_still_writes() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (store, _) = runtime().block_on(store(&dir));
        // The first runtime is gone, and the writer task with it.
        let later = runtime();
        later.block_on(async {
            store.write(&[new_policy("after")]).await.unwrap();
            assert!(
                store
                    .get("one", Kind::AccessPolicy, "after")
                    .await
                    .unwrap()
                    .is_some()
            );
        });
    }
}
