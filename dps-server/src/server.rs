//! The server process: storage, bootstrap, TLS and the one HTTPS listener, with graceful
//! shutdown that lets in-flight requests finish.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dps_listener::{ConnectionLimits, serve};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::app;
use crate::bootstrap::{AdminAccess, bootstrap};
use crate::config::Config;
use crate::domain::instances::load_instance;
use crate::observability::Metrics;
use crate::state::AppState;
use crate::store::{SqlStore, Store};
use crate::throttle::Throttle;
use dps_listener::TlsMaterial;

/// How often idle throttle buckets are forgotten and expired records swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Connections the metrics listener serves at once (scrapers, health checks).
const METRICS_CONNECTIONS: usize = 64;

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// Access to the admin instance.
    pub admin: AdminAccess,
    /// The CA certificate clients should trust.
    pub ca_certificate: PathBuf,
    /// The bound address of the metrics listener.
    pub metrics_addr: SocketAddr,
    /// The bound address of the MQTT listener, when it is on.
    pub mqtt_addr: Option<SocketAddr>,
    store: Arc<dyn Store>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// The storage the server uses (tests arrange data through it).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops accepting, waits for in-flight requests (up to the grace period) and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Connects storage, applies the configuration, prepares TLS and starts listening.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    anyhow::ensure!(
        config.audit.retention_days >= 1,
        "audit.retention_days must be at least 1 (every admin write is recorded)"
    );
    dps_listener::files::private_dir(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::connect(&config.database_url())
            .await
            .context("opening the database")?,
    );
    let outbound_settings = dps_outbound::OutboundSettings {
        allowed_networks: config.outbound.allowed_networks.clone(),
        max_answer_bytes: config.outbound.max_answer_bytes,
        ..dps_outbound::OutboundSettings::default()
    };
    let connectors = crate::hubs::Connectors {
        outbound: dps_outbound::Outbound::new(&outbound_settings),
        signer: crate::domain::allocation::webhook_signer(&config)?,
    };
    let measured = Arc::new(allocation_policies::geo::MeasuredLatency::default());
    let metrics = Arc::new(Metrics::new(store.backend()));
    let event_webhook = match &config.events.webhook_url {
        Some(url) => Some(crate::event_webhook::EventWebhook::start(
            crate::domain::events::webhook_url(url)?,
            config.events.webhook_queue,
            connectors.outbound.clone(),
            connectors.signer.clone(),
            metrics.clone(),
        )),
        None => None,
    };
    let state = AppState {
        store: store.clone(),
        limits: Arc::new(config.limits.clone()),
        admin_instance: config.admin_instance().into(),
        metrics: metrics.clone(),
        throttle: Arc::new(Throttle::new(&config.throttle)),
        policies: Arc::new(crate::domain::allocation::registry(
            &config,
            &connectors,
            store.clone(),
            measured.clone(),
        )?),
        connectors,
        hub_health: Arc::new(crate::hubs::HubHealth::new(Duration::from_secs(
            config.limits.hub_unhealthy_secs,
        ))),
        trusted_location_headers: Arc::new(config.allocation.geo.clone()),
        certificates: Arc::default(),
        event_webhook,
        event_streams: Arc::new(tokio::sync::Semaphore::new(config.limits.max_event_streams)),
        event_retention: (config.events.retention_days > 0)
            .then(|| i64::from(config.events.retention_days) * 86_400),
        issuance: Arc::new(crate::domain::issuance::Issuance::load(&config.issuance)?),
        tpm: Arc::new(crate::trust::TpmTrust::load(&config.tpm)?),
        instances: Arc::default(),
        finished: Arc::default(),
        credentials: Arc::default(),
        server_names: vec![config.default_host_name()].into(),
    };

    let admin = bootstrap(&state, &config).await?;

    let host_names = all_host_names(&state).await?;
    let tls = TlsMaterial::load(&config.tls, &config.data_dir, &host_names)?;
    let tls_config = tls.server_config()?;
    let acceptor = TlsAcceptor::from(tls_config.clone());

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let mqtt_listener = match config.mqtt_address()? {
        Some(address) => Some(TcpListener::bind(address).await.with_context(|| {
            format!("binding mqtt_listen {address} (set mqtt_listen to another address, or off)")
        })?),
        None => None,
    };
    let mqtt_addr = mqtt_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let (stop, stopped) = watch::channel(false);
    let (throttle, sweeping, mut stopping) =
        (state.throttle.clone(), store.clone(), stopped.clone());
    let (audit_retention, max_audit_entries) = (
        i64::from(config.audit.retention_days) * 86_400,
        config.audit.max_entries,
    );
    // Once a minute: forget idle throttle buckets, delete finished operations, TPM challenges,
    // events and audit entries whose time ran out, and audit entries past the count kept (on
    // every replica; the deletes are idempotent). Every second: SQLite's checkpoint.
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_INTERVAL);
        let mut checkpoints = tokio::time::interval(CHECKPOINT_INTERVAL);
        checkpoints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    throttle.forget_idle();
                    let now = time::OffsetDateTime::now_utc().unix_timestamp();
                    match sweeping.sweep(now).await {
                        Ok(0) => {}
                        Ok(swept) => tracing::debug!(swept, "expired operations and challenges deleted"),
                        Err(e) => tracing::warn!(error = %e, "sweeping expired operations failed"),
                    }
                    let before = crate::store::event_key_at((now - audit_retention).saturating_mul(1000));
                    match sweeping.sweep_audit(&before, max_audit_entries).await {
                        Ok(0) => {}
                        Ok(trimmed) => tracing::debug!(trimmed, "audit entries past the retention or the count deleted"),
                        Err(e) => tracing::warn!(error = %e, "trimming the audit log failed"),
                    }
                }
                _ = checkpoints.tick() => {
                    if let Err(e) = sweeping.checkpoint().await {
                        tracing::warn!(error = %e, "checkpointing the database failed");
                    }
                }
                _ = stopping.changed() => break,
            }
        }
    });
    if let Some(region) = &config.allocation.geo.probe_region {
        let interval = Duration::from_secs(config.allocation.geo.probe_interval_secs.max(1));
        tracing::info!(%region, ?interval, "probing hub latency");
        crate::hubs::probe::spawn(
            store.clone(),
            measured,
            interval,
            &outbound_settings,
            stopped.clone(),
        );
    }
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "binding metrics_listen {} (set metrics_listen to another address)",
                config.metrics_listen
            )
        })?;
    let metrics_addr = metrics_listener.local_addr()?;
    let grace = Duration::from_secs(config.limits.shutdown_grace_secs);
    let limits = connection_limits(&config.limits);
    let metrics_limits = ConnectionLimits {
        max_connections: METRICS_CONNECTIONS,
        ..limits.clone()
    };
    // MQTT, over TLS on its own port and over WebSockets on the HTTPS listener, answered by
    // the same router as HTTPS device requests. Its TLS is the HTTPS listener's without ALPN
    // (MQTT clients offer none, or `mqtt`).
    let front = dps_listener::mqtt::Front::new(
        app::router(state.clone()),
        &crate::mqtt::settings(&config.limits),
        stopped.clone(),
    );
    let mqtt = mqtt_listener.map(|mqtt_listener| {
        dps_listener::mqtt::serve(
            mqtt_listener,
            &tls_config,
            front.clone(),
            limits.clone(),
            grace,
        )
    });
    let main = serve(
        listener,
        Some(acceptor),
        app::router(state.clone())
            .merge(crate::mqtt::websocket_routes(front).layer(
                axum::middleware::from_fn_with_state(
                    state.metrics.clone(),
                    crate::observability::track,
                ),
            ))
            .map_request(app::canonicalize_path),
        limits,
        stopped.clone(),
        grace,
    );
    let webhook = state.event_webhook.clone();
    let metrics = serve(
        metrics_listener,
        None,
        app::metrics_router(state),
        metrics_limits,
        stopped,
        grace,
    );
    let task = tokio::spawn(async move {
        let mqtt = async move {
            if let Some(mqtt) = mqtt {
                mqtt.await;
            }
        };
        tokio::join!(main, metrics, mqtt);
        // What was committed but not yet delivered to the event webhook (a restart would lose
        // it; it stays readable through GET /events).
        if let Some(webhook) = webhook {
            let left = webhook.drain(grace).await;
            if left > 0 {
                tracing::warn!(
                    left,
                    "events not delivered to the webhook before the shutdown"
                );
            }
        }
    });
    tracing::info!(%local_addr, %metrics_addr, ?mqtt_addr, storage = store.backend(), "listening");
    Ok(RunningServer {
        local_addr,
        admin,
        ca_certificate: std::fs::canonicalize(&tls.ca_certificate).unwrap_or(tls.ca_certificate),
        metrics_addr,
        mqtt_addr,
        store,
        stop,
        task,
    })
}

async fn all_host_names(state: &AppState) -> anyhow::Result<Vec<String>> {
    let rows = state
        .store
        .list(
            crate::store::SERVER_NS,
            crate::store::Kind::Instance,
            crate::store::Page {
                limit: usize::MAX,
                ..Default::default()
            },
        )
        .await?;
    let mut names = Vec::new();
    for row in rows {
        let instance = load_instance(state.store.as_ref(), &row.key)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        if let Some(scope) = instance
            .id_scope
            .as_deref()
            .filter(|s| crate::domain::instances::is_reserved_scope(s))
        {
            tracing::warn!(
                instance = %instance.name,
                %scope,
                "the instance's ID scope is the first segment of a server route: its devices cannot register; give it another"
            );
        }
        names.extend(instance.host_names);
    }
    Ok(names)
}

/// The accept loop's deadlines and cap, as configured.
pub fn connection_limits(limits: &crate::config::Limits) -> ConnectionLimits {
    let secs = |s: u64| Duration::from_secs(s.max(1));
    ConnectionLimits {
        max_connections: limits.max_connections.max(1),
        tls_handshake: secs(limits.tls_handshake_timeout_secs),
        request_header: secs(limits.request_header_timeout_secs),
        request_body: secs(limits.request_body_timeout_secs),
        idle: secs(limits.idle_timeout_secs),
    }
}

/// Runs the server until SIGINT or SIGTERM, printing what an operator needs first. The signal
/// handlers are installed before anything is printed, so a supervisor that stops the server
/// right after it started still gets a graceful shutdown.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let server = start(config).await?;
    println!("id-scope: {}", server.admin.id_scope);
    println!(
        "service-connection-string: {}",
        server.admin.connection_string.reveal()
    );
    println!("ca-certificate: {}", server.ca_certificate.display());
    if let Some(mqtt) = server.mqtt_addr {
        println!("mqtt: mqtts://{mqtt}");
    }
    println!("listening: https://{}", server.local_addr);
    println!("metrics: http://{}/metrics", server.metrics_addr);
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
