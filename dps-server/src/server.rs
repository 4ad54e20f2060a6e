//! The server process: storage, bootstrap, TLS and the one HTTPS listener, with graceful
//! shutdown that lets in-flight requests finish.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::admin_api::{AppState, load_instance};
use crate::app;
use crate::bootstrap::{AdminAccess, bootstrap};
use crate::config::Config;
use crate::observability::Metrics;
use crate::store::{SqlStore, Store};
use crate::throttle::Throttle;
use crate::tls::TlsMaterial;

const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Connections the metrics listener serves at once (scrapers, health checks).
const METRICS_CONNECTIONS: usize = 64;

/// The address of the peer, added to every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The certificate chain the client presented in the TLS handshake (leaf first), added to
/// every request of its connection; absent when it presented none.
#[derive(Debug, Clone)]
pub struct ClientChain(pub Arc<Vec<Vec<u8>>>);

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
    crate::files::private_dir(&config.data_dir)
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
        signer: webhook_signer(&config)?,
    };
    let measured = Arc::new(allocation_policies::geo::MeasuredLatency::default());
    let state = AppState {
        store: store.clone(),
        limits: Arc::new(config.limits.clone()),
        admin_instance: config.admin_instance().into(),
        metrics: Arc::new(Metrics::new(store.backend())),
        throttle: Arc::new(Throttle::new(&config.throttle)),
        policies: Arc::new(policy_registry(
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
        tpm: Arc::new(crate::device_api::tpm::TpmTrust::load(&config.tpm)?),
        instances: Arc::default(),
        credentials: Arc::default(),
        server_names: vec![config.default_host_name()].into(),
    };

    let admin = bootstrap(&state, &config).await?;

    let host_names = all_host_names(&state).await?;
    let tls = TlsMaterial::load(&config.tls, &config.data_dir, &host_names)?;
    let acceptor = TlsAcceptor::from(tls.server_config()?);

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let (throttle, mut stopping) = (state.throttle.clone(), stopped.clone());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = every.tick() => throttle.forget_idle(),
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
    let limits = ConnectionLimits::of(&config.limits);
    let metrics_limits = ConnectionLimits {
        max_connections: METRICS_CONNECTIONS,
        ..limits.clone()
    };
    let main = serve(
        listener,
        Some(acceptor),
        app::router(state.clone()),
        limits,
        stopped.clone(),
        grace,
    );
    let metrics = serve(
        metrics_listener,
        None,
        app::metrics_router(state),
        metrics_limits,
        stopped,
        grace,
    );
    let task = tokio::spawn(async move {
        tokio::join!(main, metrics);
    });
    tracing::info!(%local_addr, %metrics_addr, storage = store.backend(), "listening");
    Ok(RunningServer {
        local_addr,
        admin,
        ca_certificate: std::fs::canonicalize(&tls.ca_certificate).unwrap_or(tls.ca_certificate),
        metrics_addr,
        store,
        stop,
        task,
    })
}

/// The built-in policies, with `custom` driving webhooks and `ownership` reading the stored
/// records, each with its configured fall-back.
fn policy_registry(
    config: &Config,
    connectors: &crate::hubs::Connectors,
    store: Arc<dyn Store>,
    measured: Arc<allocation_policies::geo::MeasuredLatency>,
) -> anyhow::Result<allocation_policies::policy::Registry> {
    use allocation_policies::custom::{CustomSettings, CustomWebhook};
    use allocation_policies::ownership::Ownership;
    let mut registry = allocation_policies::policy::Registry::with_builtins();
    registry.register(
        "geoLatency",
        Arc::new(geo_policy(&config.allocation.geo, measured)?),
    );
    // A fall-back is a policy that answers on its own: neither of the two being configured.
    let fallback = |setting: &str, name: &Option<String>| match name {
        Some(name) => {
            let (canonical, policy) = registry
                .get(name)
                .with_context(|| format!("allocation.{setting}: unknown policy '{name}'"))?;
            if canonical == "custom" || canonical == "ownership" {
                anyhow::bail!("allocation.{setting} cannot be {canonical}");
            }
            Ok(Some((canonical.to_owned(), policy)))
        }
        None => Ok(None),
    };
    let custom_fallback = fallback("custom_fallback", &config.allocation.custom_fallback)?;
    let ownership_fallback = fallback("ownership_fallback", &config.allocation.ownership_fallback)?;
    let settings = CustomSettings {
        timeout: Duration::from_secs(config.allocation.custom_timeout_secs.max(1)),
        retries: config.allocation.custom_retries,
        signer: connectors.signer.clone(),
    };
    registry.register(
        "custom",
        Arc::new(CustomWebhook::new(
            connectors.outbound.clone(),
            settings,
            custom_fallback,
        )),
    );
    let book = Arc::new(crate::admin_api::ownership::StoredOwnership::new(store));
    registry.register(
        "ownership",
        Arc::new(Ownership::new(book, ownership_fallback)),
    );
    Ok(registry)
}

/// The signer of webhook requests (allocation webhooks and the webhook connector), when
/// `allocation.webhook_signing_key` is set.
fn webhook_signer(config: &Config) -> anyhow::Result<Option<dps_outbound::WebhookSigner>> {
    Ok(config
        .allocation
        .webhook_signing_key
        .as_deref()
        .map(attestation::SymmetricKey::from_base64)
        .transpose()
        .context("allocation.webhook_signing_key")?
        .map(|k| dps_outbound::WebhookSigner::new(k.as_bytes().to_vec())))
}

fn geo_policy(
    geo: &crate::config::GeoConfig,
    measured: Arc<allocation_policies::geo::MeasuredLatency>,
) -> anyhow::Result<allocation_policies::geo::GeoLatency> {
    use allocation_policies::geo::{GeoIp, GeoLatency, GeoSettings};
    let lower = |s: &str| s.trim().to_ascii_lowercase();
    let geoip = match &geo.geoip_database {
        Some(path) => Some(Arc::new(GeoIp::open(path).with_context(|| {
            format!("allocation.geo.geoip_database {}", path.display())
        })?)),
        None => None,
    };
    Ok(GeoLatency::new(GeoSettings {
        networks: geo
            .networks
            .iter()
            .map(|n| (n.cidr, lower(&n.region)))
            .collect(),
        regions: geo
            .regions
            .iter()
            .map(|r| (lower(&r.name), (r.latitude, r.longitude)))
            .collect(),
        latency_ms: geo
            .latency_ms
            .iter()
            .map(|(region, hubs)| {
                let hubs = hubs.iter().map(|(hub, ms)| (lower(hub), *ms)).collect();
                (lower(region), hubs)
            })
            .collect(),
        geoip,
        local_region: geo.probe_region.as_deref().map(lower),
        measured,
    }))
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
        names.extend(instance.host_names);
    }
    Ok(names)
}

/// The deadlines and the connection cap of the accept loop. No phase of a connection is
/// free: a client that stays silent, or sends slowly, is closed once its phase's deadline
/// passes, and past `max_connections` new clients wait in the listen backlog.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time to complete the TLS handshake.
    pub tls_handshake: Duration,
    /// Time to send a request's headers (HTTP/1.1).
    pub request_header: Duration,
    /// Time to send a request's body (read by the handlers).
    pub request_body: Duration,
    /// Time a connection may stay open with no request in flight (HTTP/1.1 keep-alive, HTTP/2,
    /// and before the first request).
    pub idle: Duration,
}

impl ConnectionLimits {
    /// The limits configured in `limits`.
    pub fn of(limits: &crate::config::Limits) -> Self {
        let secs = |s: u64| Duration::from_secs(s.max(1));
        Self {
            max_connections: limits.max_connections.max(1),
            tls_handshake: secs(limits.tls_handshake_timeout_secs),
            request_header: secs(limits.request_header_timeout_secs),
            request_body: secs(limits.request_body_timeout_secs),
            idle: secs(limits.idle_timeout_secs),
        }
    }
}

/// How long a connection told to shut down (idle, or the server stopping) may take to finish
/// its last exchange before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long an idle connection told to close may take to say goodbye (HTTP/2's GOAWAY).
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Longest pause after a failed `accept` (out of descriptors, say); it doubles from 10 ms.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Requests in flight on a connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<std::time::Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// Counts a request as in flight until dropped (when its response has been produced).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        activity.touch();
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` (over TLS with `acceptor`, or plain HTTP without one) until
/// `stopped` turns true, then lets in-flight requests finish for up to `grace`. Public so that
/// the load generator's ceiling server runs the very same accept loop.
pub async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    router: axum::Router,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_header)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_HTTP2_STREAMS)
        // A peer that stops answering pings is gone; idleness is the watchdog's.
        .keep_alive_interval(Some(limits.idle.min(Duration::from_secs(30))))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut backoff = Duration::from_millis(10);
    loop {
        // A free slot first: past the cap, clients wait in the kernel's backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopped.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let connection = Connection {
            acceptor: acceptor.clone(),
            builder: builder.clone(),
            router: router.clone(),
            limits: limits.clone(),
            stopped: stopped.clone(),
        };
        tokio::spawn(async move {
            connection.run(tcp, peer).await;
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight requests");
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
    }
}

/// Most concurrent streams on one HTTP/2 connection.
const MAX_HTTP2_STREAMS: u32 = 64;

/// What one connection's task needs.
struct Connection {
    acceptor: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: axum::Router,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
}

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let Some(acceptor) = self.acceptor.clone() else {
            self.http(TokioIo::new(tcp), peer, None).await;
            return;
        };
        let tls = match tokio::time::timeout(self.limits.tls_handshake, acceptor.accept(tcp)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let chain = tls.get_ref().1.peer_certificates().map(|certs| {
            ClientChain(Arc::new(
                certs.iter().map(|c| c.as_ref().to_vec()).collect(),
            ))
        });
        self.http(TokioIo::new(tls), peer, chain).await;
    }

    /// Serves HTTP on `io` until the client leaves, stays idle too long, or the server stops.
    async fn http<I>(self, io: I, peer: SocketAddr, chain: Option<ClientChain>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let service = {
            let (activity, router) = (activity.clone(), self.router.clone());
            let body_deadline = crate::json::BodyDeadline(self.limits.request_body);
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let in_flight = InFlight::start(&activity);
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut().insert(body_deadline);
                if let Some(chain) = &chain {
                    req.extensions_mut().insert(chain.clone());
                }
                let req = app::canonicalize_path(req.map(axum::body::Body::new));
                let answer = router.clone().oneshot(req);
                async move {
                    let response = answer.await;
                    drop(in_flight);
                    response
                }
            })
        };
        let connection = self.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        let mut stopped = self.stopped;
        let mut closing: Option<tokio::time::Instant> = None;
        let mut watchdog = tokio::time::interval(self.limits.idle.min(Duration::from_secs(1)));
        loop {
            tokio::select! {
                done = connection.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                changed = stopped.changed(), if closing.is_none() => {
                    // A dropped sender means the server is gone: close too.
                    let _ = changed;
                    connection.as_mut().graceful_shutdown();
                    closing = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                }
                _ = watchdog.tick() => match closing {
                    Some(deadline) if tokio::time::Instant::now() >= deadline => {
                        tracing::debug!(%peer, "connection did not close in time; dropped");
                        return;
                    }
                    Some(_) => {}
                    None if activity.idle_for() >= self.limits.idle => {
                        // Nothing in flight: long enough to send HTTP/2's GOAWAY, no longer
                        // (a client that ignores it would otherwise keep the slot).
                        tracing::debug!(%peer, "idle connection closed");
                        connection.as_mut().graceful_shutdown();
                        closing = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                    }
                    None => {}
                },
            }
        }
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
