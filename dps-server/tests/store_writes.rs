//! A batch of writes is all or nothing, and a failed precondition is named, on both backends.
//! On PostgreSQL the puts a registration makes (into distinct tables, by no admin) are one
//! statement; these are the batches that take that path, and the answers must be the ones the
//! write-by-write transaction gives.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use dps_server::store::{
    Columns, Kind, Precondition, SERVER_NS, SqlStore, Store, StoreError, Stored, Write,
};

const NS: &str = "fleet";

async fn store(backend: Backend, dir: &tempfile::TempDir) -> SqlStore {
    let store = SqlStore::connect(&fresh_database(backend, dir).await)
        .await
        .unwrap();
    store.write(&[instance()]).await.unwrap();
    store
}

fn registration(doc: &str, precondition: Precondition) -> Write {
    Write::Put {
        ns: NS.into(),
        kind: Kind::RegistrationState,
        key: "device-1".into(),
        columns: Columns::Registration {
            group: None,
            hub: Some("hub-a.example.com".into()),
        },
        doc: doc.into(),
        precondition,
        etag: None,
    }
}

fn operation(key: &str, precondition: Precondition) -> Write {
    Write::Put {
        ns: NS.into(),
        kind: Kind::Operation,
        key: key.into(),
        columns: Columns::Operation {
            registration: "device-1".into(),
            expires_at: Some(4_000_000_000),
        },
        doc: format!(r#"{{"operationId":"{key}"}}"#),
        precondition,
        etag: None,
    }
}

fn event(key: &str) -> Write {
    Write::Put {
        ns: NS.into(),
        kind: Kind::Event,
        key: key.into(),
        columns: Columns::Event {
            kind: "registration.assigned".into(),
            registration: Some("device-1".into()),
            enrollment: Some("enrollment:device-1".into()),
            expires_at: 4_000_000_000,
        },
        doc: "{}".into(),
        precondition: Precondition::MustNotExist,
        etag: None,
    }
}

async fn read(store: &SqlStore, kind: Kind, key: &str) -> Option<Stored> {
    store.get(NS, kind, key).await.unwrap()
}

async fn a_batch_is_all_or_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = store(backend, &dir).await;

    // A registration's writes: its state, its operation and its event, each new.
    let written = store
        .write(&[
            registration(r#"{"n":1}"#, Precondition::MustNotExist),
            operation("op-1", Precondition::MustNotExist),
            event("event-1"),
        ])
        .await
        .unwrap();
    assert_eq!(written.len(), 3);
    for (stored, kind) in
        written
            .iter()
            .zip([Kind::RegistrationState, Kind::Operation, Kind::Event])
    {
        let stored = stored.as_ref().expect("a put answers its record");
        let read = read(&store, kind, &stored.key).await.expect("written");
        assert_eq!(
            (&read.doc, &read.etag, &read.created, &read.updated),
            (&stored.doc, &stored.etag, &stored.created, &stored.updated),
            "{kind:?}"
        );
    }
    let state = written[0].clone().unwrap();

    // A stale etag on the state: the operation written with it is not kept either.
    let stale = store
        .write(&[
            operation("op-2", Precondition::MustNotExist),
            registration(r#"{"n":2}"#, Precondition::IfMatch("\"stale\"".into())),
            event("event-2"),
        ])
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::EtagMismatch {
                kind: Kind::RegistrationState,
                ..
            })
        ),
        "{stale:?}"
    );
    assert!(read(&store, Kind::Operation, "op-2").await.is_none());
    assert!(read(&store, Kind::Event, "event-2").await.is_none());

    // An event key already taken: the new operation and the state change are not kept.
    let taken = store
        .write(&[
            registration(r#"{"n":3}"#, Precondition::IfMatch(state.etag.clone())),
            operation("op-3", Precondition::MustNotExist),
            event("event-1"),
        ])
        .await;
    assert!(
        matches!(
            taken,
            Err(StoreError::Exists {
                kind: Kind::Event,
                ..
            })
        ),
        "{taken:?}"
    );
    assert!(read(&store, Kind::Operation, "op-3").await.is_none());
    assert_eq!(
        read(&store, Kind::RegistrationState, "device-1")
            .await
            .unwrap()
            .etag,
        state.etag
    );

    // A conditional update of a record that is not there is named as missing.
    let missing = store
        .write(&[
            operation("op-4", Precondition::IfMatch("\"any\"".into())),
            event("event-4"),
        ])
        .await;
    assert!(
        matches!(
            missing,
            Err(StoreError::NotFound {
                kind: Kind::Operation,
                ..
            })
        ),
        "{missing:?}"
    );
    assert!(read(&store, Kind::Event, "event-4").await.is_none());

    // With the right etag the state changes, keeping its creation time, and an upsert
    // replaces the operation in the same batch.
    let changed = store
        .write(&[
            registration(r#"{"n":5}"#, Precondition::IfMatch(state.etag.clone())),
            operation("op-1", Precondition::Always),
        ])
        .await
        .unwrap();
    let new_state = changed[0].clone().unwrap();
    assert_ne!(new_state.etag, state.etag);
    assert_eq!(new_state.created, state.created);
    let stored = read(&store, Kind::RegistrationState, "device-1")
        .await
        .unwrap();
    assert_eq!(
        (stored.doc.as_str(), &stored.etag, &stored.created),
        (r#"{"n":5}"#, &new_state.etag, &state.created)
    );
    assert_eq!(
        changed[1].as_ref().unwrap().created,
        written[1].as_ref().unwrap().created
    );

    // Writes into an instance that does not exist are refused, and none is kept.
    let orphan = |mut write: Write| {
        if let Write::Put { ns, .. } = &mut write {
            *ns = "nobody".into();
        }
        write
    };
    let refused = store
        .write(&[
            orphan(operation("op-6", Precondition::MustNotExist)),
            orphan(event("event-6")),
        ])
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        store
            .get("nobody", Kind::Operation, "op-6")
            .await
            .unwrap()
            .is_none()
    );
}

on_both_backends!(a_batch_is_all_or_nothing);

/// A write PostgreSQL aborts to break a deadlock (SQLSTATE 40P01) had no effect, so it is run
/// again rather than failed: here another session holds one of the two records the write
/// changes and then asks for the other, which the write holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_aborted_by_a_deadlock_is_run_again() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(Backend::Postgres, &dir).await;
    let store = SqlStore::connect(&url).await.unwrap();
    store.write(&[instance()]).await.unwrap();
    let policy = |key: &str, doc: &str| Write::Put {
        ns: NS.into(),
        kind: Kind::AccessPolicy,
        key: key.into(),
        columns: Columns::None,
        doc: doc.into(),
        precondition: Precondition::Always,
        etag: None,
    };
    store
        .write(&[policy("a", "{}"), policy("b", "{}")])
        .await
        .unwrap();

    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN; UPDATE access_policies SET doc = '{\"by\":\"other\"}' WHERE key = 'b'")
        .execute(&mut other)
        .await
        .unwrap();
    let write = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(&[
                    policy("a", r#"{"by":"store"}"#),
                    policy("b", r#"{"by":"store"}"#),
                ])
                .await
        })
    };
    // Once the write holds a and waits for b, asking for a closes the cycle, and PostgreSQL
    // aborts the one that has waited past its deadlock timeout first: the write.
    let mut watcher = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut waiting = 0;
    for _ in 0..100 {
        waiting = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(waiting, 1, "the write did not come to wait for b");
    sqlx::raw_sql("UPDATE access_policies SET doc = '{\"by\":\"other\"}' WHERE key = 'a'; COMMIT")
        .execute(&mut other)
        .await
        .unwrap();
    let written = write.await.unwrap();
    assert!(written.is_ok(), "{written:?}");
    for key in ["a", "b"] {
        let stored = store
            .get(NS, Kind::AccessPolicy, key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.doc, r#"{"by":"store"}"#, "{key}");
    }
}

fn instance() -> Write {
    Write::Put {
        ns: SERVER_NS.into(),
        kind: Kind::Instance,
        key: NS.into(),
        columns: Columns::Instance {
            id_scope: "0ne00000f1e".into(),
            host_names: Vec::new(),
        },
        doc: "{}".into(),
        precondition: Precondition::MustNotExist,
        etag: None,
    }
}
