//! Storage: inserting one registration-state-sized document (one conditional write in a
//! transaction), reading one back by key from 10,000, and a bulk upsert of 500 rows, on SQLite
//! and, when `DPS_BENCH_DATABASE_URL` names an empty PostgreSQL database, on PostgreSQL.
//! Run: `cargo bench -p dps-server --bench store`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use dps_server::store::{BulkDoc, Columns, Kind, Precondition, SERVER_NS, SqlStore, Store, Write};

const DOC: &str = r#"{"registrationId":"sensor-000123","assignedHub":"hub-a.example.com","deviceId":"sensor-000123","status":"assigned","substatus":"initialAssignment","symmetricKey":{}}"#;

fn put(key: String) -> Write {
    Write::Put {
        ns: "bench".into(),
        kind: Kind::RegistrationState,
        key,
        columns: Columns::Registration {
            group: None,
            hub: Some("hub-a.example.com".into()),
        },
        doc: DOC.into(),
        precondition: Precondition::Always,
        etag: None,
    }
}

fn backend(c: &mut Criterion, name: &str, url: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(SqlStore::connect(url)).unwrap();
    // The records belong to an instance.
    let instance = Write::Put {
        ns: SERVER_NS.into(),
        kind: Kind::Instance,
        key: "bench".into(),
        columns: Columns::Instance {
            id_scope: "0ne00be4c40".into(),
            host_names: Vec::new(),
        },
        doc: r#"{"name":"bench","idScope":"0ne00BE4C40","hostNames":[]}"#.into(),
        precondition: Precondition::Always,
        etag: None,
    };
    runtime.block_on(store.write(&[instance])).unwrap();
    let docs: Vec<BulkDoc> = (0..10_000)
        .map(|i| BulkDoc {
            key: format!("seed-{i:06}"),
            columns: Columns::Registration {
                group: None,
                hub: None,
            },
            doc: DOC.into(),
        })
        .collect();
    let batch: Vec<BulkDoc> = docs[..500].to_vec();
    runtime
        .block_on(store.put_all("bench", Kind::RegistrationState, docs))
        .unwrap();
    let next = AtomicU64::new(0);
    c.bench_function(&format!("store/{name}/insert_one"), |b| {
        b.to_async(&runtime).iter(|| {
            let key = format!("insert-{}", next.fetch_add(1, Ordering::Relaxed));
            let store = &store;
            async move { store.write(&[put(key)]).await.unwrap() }
        })
    });
    c.bench_function(&format!("store/{name}/get_one_of_10k"), |b| {
        b.to_async(&runtime).iter(|| async {
            store
                .get("bench", Kind::RegistrationState, black_box("seed-004321"))
                .await
                .unwrap()
                .unwrap()
        })
    });
    c.bench_function(&format!("store/{name}/upsert_500"), |b| {
        // The batch's copy is part of each iteration (the store takes its documents).
        b.to_async(&runtime).iter(|| async {
            store
                .put_all("bench", Kind::RegistrationState, black_box(batch.clone()))
                .await
                .unwrap()
        })
    });
}

fn stores(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bench.sqlite").display()
    );
    backend(c, "sqlite", &sqlite);
    if let Ok(url) = std::env::var("DPS_BENCH_DATABASE_URL") {
        backend(c, "postgres", &url);
    }
}

criterion_group!(benches, stores);
criterion_main!(benches);
