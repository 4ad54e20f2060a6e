//! The ceiling: a server built from the service's own TLS configuration (optional client
//! certificates included) and accept loop, answering the device requests with canned answers
//! and doing no other work. What it sustains is the most the service could on this machine.

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use dps_server::config::TlsConfig;
use dps_server::tls::TlsMaterial;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running ceiling server.
#[derive(Debug)]
pub struct CeilingServer {
    /// `https://localhost:{port}`.
    pub endpoint: String,
    /// Any scope works; this one is used.
    pub id_scope: String,
    /// The CA its certificate chains to.
    pub ca_certificate: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl CeilingServer {
    /// Stops it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn register(Path((_, id)): Path<(String, String)>) -> impl IntoResponse {
    (
        StatusCode::ACCEPTED,
        [(header::RETRY_AFTER, "1")],
        dps_server::json::Json(
            json!({ "operationId": format!("4.ceiling.{id}"), "status": "assigning" }),
        ),
    )
}

async fn operation(Path((_, id, op)): Path<(String, String, String)>) -> impl IntoResponse {
    dps_server::json::Json(json!({
        "operationId": op,
        "status": "assigned",
        "registrationState": {
            "registrationId": id, "assignedHub": "ceiling.example.com", "deviceId": id,
            "status": "assigned", "substatus": "initialAssignment"
        }
    }))
}

/// Starts a ceiling server on an ephemeral port of 127.0.0.1.
pub async fn start() -> anyhow::Result<CeilingServer> {
    let dir = tempfile::tempdir()?;
    let tls = TlsMaterial::load(&TlsConfig::default(), dir.path(), &[])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
    let router = Router::new()
        .route("/{scope}/registrations/{id}/register", put(register))
        .route(
            "/{scope}/registrations/{id}/operations/{operation}",
            get(operation),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(dps_server::server::serve(
        listener,
        acceptor,
        router,
        stopped,
        Duration::from_secs(5),
    ));
    Ok(CeilingServer {
        endpoint: format!("https://localhost:{port}"),
        id_scope: "0ne00CE1L1N".into(),
        ca_certificate: tls.ca_certificate,
        stop,
        task,
        _dir: dir,
    })
}
