//! Group commit on SQLite: the writes that wait for the one writing connection while a
//! transaction runs go into the next transaction together, so that a commit's work (the
//! pages it appends to the write-ahead log, their checksums, the lock) is paid once per
//! group rather than once per request. Each request still gets its own answer, after the
//! commit that holds its writes.
//!
//! When one request's writes fail in a group (a precondition, a constraint), the group is
//! rolled back and written again with each request's writes in a savepoint of their own: the
//! failing request gets its error with nothing of it written, and the others are written.
//! Requests are applied in the order they came, so a request sees what those before it in
//! its group wrote, as it would had they committed just before it. When the transaction
//! itself fails (it cannot start, or the commit fails), nothing is written and every request
//! of the group gets that error.

use std::sync::Arc;

use sqlx::{Connection, Sqlite};
use tokio::sync::{mpsc, oneshot};

use super::kept::Kept;
use super::sql::{Tx, apply_all};
use super::{StoreError, Stored, Write};

/// Requests' writes in one transaction at most. A group's requests wait for its commit, so
/// this bounds the latency a large group adds (80 to 150 µs of database work a request).
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
    pub(super) fn start(pool: Arc<Kept<Sqlite>>) -> Self {
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
        // Taken but not answered: the task ended (its runtime stopped) while writing; whether
        // the writes were committed is not known.
        Some(
            answer
                .await
                .unwrap_or(Err(StoreError::Database(sqlx::Error::PoolClosed))),
        )
    }
}

async fn run(pool: Arc<Kept<Sqlite>>, mut queue: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        commit_group(&pool, std::mem::take(&mut group)).await;
    }
}

/// How a group was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// In one transaction, as it came (or its one request failed).
    Together,
    /// A request failed in it: again, a savepoint per request.
    InSavepoints,
    /// The transaction failed: nothing was written.
    Failed,
}

/// What one transaction of the group's writes, without savepoints, came to.
enum Attempt {
    Committed(Vec<Vec<Option<Stored>>>),
    /// A request's writes failed (with this error); the transaction was rolled back.
    RequestFailed(StoreError),
    /// The transaction could not start or commit.
    Failed(StoreError),
}

/// Writes `group` and answers every job.
async fn commit_group(pool: &Kept<Sqlite>, group: Vec<Job>) -> Outcome {
    let writes: Vec<&[Write]> = group.iter().map(|job| job.writes.as_slice()).collect();
    let (outcome, answers): (Outcome, Vec<Written>) = match together(pool, &writes).await {
        Attempt::Committed(results) => (Outcome::Together, results.into_iter().map(Ok).collect()),
        Attempt::RequestFailed(e) if group.len() == 1 => (Outcome::Together, vec![Err(e)]),
        Attempt::RequestFailed(_) => match in_savepoints(pool, &writes).await {
            Ok(answers) => (Outcome::InSavepoints, answers),
            Err(e) => (Outcome::Failed, copies(&e, group.len())),
        },
        Attempt::Failed(e) => (Outcome::Failed, copies(&e, group.len())),
    };
    for (job, answer) in group.into_iter().zip(answers) {
        // A caller that stopped waiting has nobody to tell.
        let _ = job.reply.send(answer);
    }
    outcome
}

/// Every request's writes in one transaction, in order. The connection is kept for the next
/// group when the transaction commits.
async fn together(pool: &Kept<Sqlite>, jobs: &[&[Write]]) -> Attempt {
    let mut lease = match pool.lease().await {
        Ok(lease) => lease,
        Err(e) => return Attempt::Failed(e.into()),
    };
    let mut tx = match lease.connection().begin().await {
        Ok(tx) => Tx::Sqlite(tx, None),
        Err(e) => return Attempt::Failed(e.into()),
    };
    let mut results = Vec::with_capacity(jobs.len());
    for writes in jobs {
        match apply_all(&mut tx, writes).await {
            Ok(written) => results.push(written),
            // Dropping the transaction rolls it back.
            Err(e) => return Attempt::RequestFailed(e),
        }
    }
    match tx.commit().await {
        Ok(()) => {
            lease.keep();
            Attempt::Committed(results)
        }
        Err(e) => Attempt::Failed(e),
    }
}

/// Every request's writes in one transaction, each request's in a savepoint that its failure
/// rolls back: each request's answer, or the transaction's error (nothing written).
async fn in_savepoints(pool: &Kept<Sqlite>, jobs: &[&[Write]]) -> Result<Vec<Written>, StoreError> {
    let (tx, place) = pool.begin().await?;
    let mut tx = Tx::Sqlite(tx, Some(place));
    let mut answers = Vec::with_capacity(jobs.len());
    for writes in jobs {
        execute(&mut tx, "SAVEPOINT request").await?;
        let written = apply_all(&mut tx, writes).await;
        if written.is_err() {
            execute(&mut tx, "ROLLBACK TO request").await?;
        }
        execute(&mut tx, "RELEASE request").await?;
        answers.push(written);
    }
    tx.commit().await?;
    Ok(answers)
}

async fn execute(tx: &mut Tx<'_>, sql: &'static str) -> Result<(), StoreError> {
    let Tx::Sqlite(t, _) = tx else {
        return Err(StoreError::Invalid("group commit is for SQLite".into()));
    };
    sqlx::query(sql).execute(&mut **t).await?;
    Ok(())
}

/// `n` answers of the transaction's failure `e` (a database error cannot be cloned; the
/// copies keep what callers tell apart: an unavailable database from a failed one).
fn copies(e: &StoreError, n: usize) -> Vec<Written> {
    (0..n)
        .map(|_| {
            Err(StoreError::Database(match e {
                StoreError::Database(sqlx::Error::PoolTimedOut) => sqlx::Error::PoolTimedOut,
                StoreError::Database(sqlx::Error::PoolClosed) => sqlx::Error::PoolClosed,
                StoreError::Database(sqlx::Error::Io(io)) => {
                    sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string()))
                }
                other => sqlx::Error::Protocol(other.to_string()),
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::tests::{instance, policy, sqlite_file_store, with};
    use crate::store::sql::{Pool, SqlStore};
    use crate::store::{Kind, Precondition, Store};

    fn new_policy(key: &str) -> Write {
        with(policy(key), Precondition::MustNotExist)
    }

    async fn store(dir: &tempfile::TempDir) -> (SqlStore, Arc<Kept<Sqlite>>) {
        let (store, _) = sqlite_file_store(dir).await;
        store.write(&[instance()]).await.unwrap();
        let Pool::Sqlite(pool) = store.pool.clone() else {
            unreachable!("an SQLite URL")
        };
        (store, pool)
    }

    /// Runs `writes` of each job as one group: how, and each job's answer.
    async fn group(pool: &Kept<Sqlite>, jobs: Vec<Vec<Write>>) -> (Outcome, Vec<Written>) {
        let mut answers = Vec::new();
        let mut group = Vec::new();
        for writes in jobs {
            let (reply, answer) = oneshot::channel();
            group.push(Job { writes, reply });
            answers.push(answer);
        }
        let outcome = commit_group(pool, group).await;
        let mut out = Vec::new();
        for answer in answers {
            out.push(answer.await.unwrap());
        }
        (outcome, out)
    }

    #[tokio::test]
    async fn a_group_commits_every_job_and_answers_each_with_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let (store, pool) = store(&dir).await;
        let (outcome, answers) = group(
            &pool,
            vec![
                vec![new_policy("a")],
                vec![new_policy("b"), new_policy("c")],
            ],
        )
        .await;
        assert_eq!(outcome, Outcome::Together);
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
        let (outcome, answers) = group(
            &pool,
            vec![
                vec![new_policy("first")],
                // Its first write would succeed; its second finds the key taken.
                vec![new_policy("half"), new_policy("taken")],
                vec![new_policy("last")],
            ],
        )
        .await;
        assert_eq!(outcome, Outcome::InSavepoints);
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
    async fn a_request_sees_the_writes_of_those_before_it_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let (store, pool) = store(&dir).await;
        let written = store.write(&[new_policy("shared")]).await.unwrap();
        let etag = written[0].as_ref().unwrap().etag.clone();
        let update = || with(policy("shared"), Precondition::IfMatch(etag.clone()));
        // Both updates expect the etag read before; the first changes it.
        let (outcome, answers) = group(&pool, vec![vec![update()], vec![update()]]).await;
        assert_eq!(outcome, Outcome::InSavepoints);
        let first = answers[0].as_ref().unwrap()[0]
            .as_ref()
            .unwrap()
            .etag
            .clone();
        assert!(
            matches!(&answers[1], Err(StoreError::EtagMismatch { key, .. }) if key == "shared"),
            "{answers:?}"
        );
        let stored = store
            .get("one", Kind::AccessPolicy, "shared")
            .await
            .unwrap();
        assert_eq!(stored.map(|s| s.etag), Some(first));
    }

    #[tokio::test]
    async fn a_group_that_cannot_begin_answers_every_request_with_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (store, pool) = store(&dir).await;
        pool.close().await;
        let (outcome, answers) =
            group(&pool, vec![vec![new_policy("a")], vec![new_policy("b")]]).await;
        assert_eq!(outcome, Outcome::Failed);
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(StoreError::Database(sqlx::Error::PoolClosed)))),
            "{answers:?}"
        );
        drop(store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_are_answered_each_as_if_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store(&dir).await;
        let mut tasks = Vec::new();
        for n in 0..256 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.write(&[new_policy(&format!("distinct-{n}"))]).await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let listed = store
            .list(
                "one",
                Kind::AccessPolicy,
                crate::store::Page {
                    limit: 1_000,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(listed.len(), 256);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
