//! The ceiling: a server built from the service's own TLS configuration (optional client
//! certificates included) and accept loop, answering the device requests with canned answers
//! and doing no other work. What it sustains is the most the service could on this machine.
//! It runs as its own process (`dps-load serve-ceiling`), so that its CPU per request is read
//! from `/proc` exactly like the service's, apart from the load generator's.
//! TPM devices get a challenge too: a real activation blob for their keys, made once per TPM
//! and then served from memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attestation::tpm::{KeyRole, RsaPublic, activation_blob};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use dps_listener::{ConnectionLimits, TlsConfig, TlsMaterial};
use dps_protocol::device::DeviceRegistration;
use dps_protocol::enrollment::TpmAttestation;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running ceiling server.
#[derive(Debug)]
pub struct CeilingServer {
    /// `https://localhost:{port}`.
    pub endpoint: String,
    /// The CA its certificate chains to.
    pub ca_certificate: PathBuf,
    /// Where it serves MQTT, when it does.
    pub mqtt: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    mqtt_task: Option<JoinHandle<()>>,
}

impl CeilingServer {
    /// Stops it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(task) = self.mqtt_task {
            let _ = task.await;
        }
    }
}

/// A JSON answer with the content type the service sends.
struct Json(serde_json::Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// Activation blobs by EK, for TPM devices.
type Challenges = Arc<Mutex<HashMap<String, String>>>;

async fn register(
    State(challenges): State<Challenges>,
    Path((_, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !headers.contains_key(header::AUTHORIZATION)
        && let Ok(request) = serde_json::from_slice::<DeviceRegistration>(&body)
        && let Some(tpm) = request.tpm
    {
        return match challenge(&challenges, &tpm) {
            Some(blob) => (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "authenticationKey": blob, "keyName": "registration" })),
            )
                .into_response(),
            None => StatusCode::BAD_REQUEST.into_response(),
        };
    }
    (
        StatusCode::ACCEPTED,
        [(header::RETRY_AFTER, "1")],
        Json(json!({ "operationId": format!("4.ceiling.{id}"), "status": "assigning" })),
    )
        .into_response()
}

fn challenge(challenges: &Challenges, tpm: &TpmAttestation) -> Option<String> {
    let mut cache = challenges.lock().ok()?;
    if let Some(blob) = cache.get(&tpm.endorsement_key) {
        return Some(blob.clone());
    }
    let ek = RsaPublic::from_base64(&tpm.endorsement_key, KeyRole::Endorsement).ok()?;
    let srk =
        RsaPublic::from_base64(tpm.storage_root_key.as_deref()?, KeyRole::StorageRoot).ok()?;
    let blob = activation_blob(&ek, &srk).ok()?.blob_base64();
    cache.insert(tpm.endorsement_key.clone(), blob.clone());
    Some(blob)
}

async fn operation(Path((_, id, op)): Path<(String, String, String)>) -> impl IntoResponse {
    Json(json!({
        "operationId": op,
        "status": "assigned",
        "registrationState": {
            "registrationId": id, "assignedHub": "ceiling.example.com", "deviceId": id,
            "status": "assigned", "substatus": "initialAssignment"
        }
    }))
}

/// Starts a ceiling server on `listen`, its TLS material (the CA devices trust) in `dir`, and
/// MQTT on `mqtt_listen`: the service's own MQTT sessions (`dps_listener::mqtt`) over the
/// canned answers, so that MQTT registrations can be measured against it too.
pub async fn start(
    listen: std::net::SocketAddr,
    dir: &std::path::Path,
    mqtt_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<CeilingServer> {
    let tls = TlsMaterial::load(&TlsConfig::default(), dir, &[])?;
    let server_config = tls.server_config()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config.clone());
    let router = Router::new()
        .route("/{scope}/registrations/{id}/register", put(register))
        .route(
            "/{scope}/registrations/{id}/operations/{operation}",
            get(operation),
        )
        .with_state(Challenges::default());
    let listener = TcpListener::bind(listen).await?;
    let port = listener.local_addr()?.port();
    let (stop, stopped) = watch::channel(false);
    let (mqtt, mqtt_task) = match mqtt_listen {
        Some(address) => {
            let mqtt_listener = TcpListener::bind(address).await?;
            let bound = mqtt_listener.local_addr()?;
            let settings = dps_listener::mqtt::MqttSettings {
                max_packet: 100 * 1024,
                connect_deadline: Duration::from_secs(30),
                body_deadline: Duration::from_secs(30),
                max_websockets: 1,
            };
            let front = dps_listener::mqtt::Front::new(router.clone(), &settings, stopped.clone());
            let task = tokio::spawn(dps_listener::mqtt::serve(
                mqtt_listener,
                &server_config,
                front,
                ConnectionLimits::default(),
                Duration::from_secs(5),
            ));
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let task = tokio::spawn(dps_listener::serve(
        listener,
        Some(acceptor),
        router,
        ConnectionLimits::default(),
        stopped,
        Duration::from_secs(5),
    ));
    Ok(CeilingServer {
        endpoint: format!("https://localhost:{port}"),
        ca_certificate: tls.ca_certificate,
        mqtt,
        stop,
        task,
        mqtt_task,
    })
}
