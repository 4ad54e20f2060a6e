//! The rate of `POST /ownershipRecords:import`: 100,000 records in one CSV request, against a
//! real server on SQLite (and PostgreSQL when `DPS_BENCH_DATABASE_URL` names an empty database).
//! Each backend is measured twice: a first import (every record new), then the same ledger
//! again (every record replaced).
//!
//! Run: `cargo bench -p dps-server --bench ownership_import` (figures in docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attestation::sas::sign;
use dps_server::config::Config;
use serde_json::{Value, json};

const RECORDS: usize = 100_000;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut backends = vec![(
        "sqlite",
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.sqlite").display()
        ),
    )];
    if let Ok(url) = std::env::var("DPS_BENCH_DATABASE_URL") {
        backends.push(("postgres", url));
    }
    let mut csv = String::from("registrationId,owner\n");
    for i in 0..RECORDS {
        let owner = ["acme", "globex", "initech"][i % 3];
        csv.push_str(&format!("device-{i:07},{owner}\n"));
    }
    println!(
        "ownership import, {RECORDS} records per request ({} bytes of CSV)",
        csv.len()
    );
    for (backend, url) in backends {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join(format!("data-{backend}")),
            database_url: Some(url),
            ..Config::default()
        };
        let server = dps_server::server::start(config).await.unwrap();
        let ca = std::fs::read(&server.ca_certificate).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        let base = format!("https://localhost:{}", server.local_addr.port());
        let credentials = server.admin.connection_string.clone();
        let token = || {
            let expiry = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 3600;
            sign(
                &credentials.host_name,
                &credentials.key,
                expiry,
                Some(&credentials.key_name),
            )
        };
        for name in ["acme", "globex", "initech"] {
            let hub = format!("hub-{name}.example.com");
            let answer = http
                .put(format!("{base}/linkedHubs/{hub}"))
                .header("Authorization", token())
                .json(&json!({ "hostName": hub }))
                .send()
                .await
                .unwrap();
            assert!(answer.status().is_success());
            let answer = http
                .put(format!("{base}/owners/{name}"))
                .header("Authorization", token())
                .json(&json!({ "name": name, "hubs": [hub] }))
                .send()
                .await
                .unwrap();
            assert!(answer.status().is_success());
        }
        for round in ["first import", "re-import"] {
            let started = Instant::now();
            let answer = http
                .post(format!("{base}/ownershipRecords:import"))
                .header("Authorization", token())
                .header("Content-Type", "text/csv")
                .body(csv.clone())
                .send()
                .await
                .unwrap();
            let elapsed = started.elapsed();
            let status = answer.status();
            let body: Value = answer.json().await.unwrap();
            assert!(status.is_success(), "{status} {body}");
            assert_eq!(body["records"], RECORDS);
            println!(
                "{backend:>8} {round:<12} {:>7.2} s  {:>8.0} records/s",
                elapsed.as_secs_f64(),
                RECORDS as f64 / elapsed.as_secs_f64()
            );
        }
        server.shutdown().await;
    }
}
