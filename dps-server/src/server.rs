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
use hyper_util::server::graceful::GracefulShutdown;
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

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEADER_BYTES: usize = 64 * 1024;

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
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::connect(&config.database_url())
            .await
            .context("opening the database")?,
    );
    let hub_http = crate::hubs::http_client();
    let measured = Arc::new(allocation_policies::geo::MeasuredLatency::default());
    let state = AppState {
        store: store.clone(),
        limits: Arc::new(config.limits.clone()),
        admin_instance: config.admin_instance().into(),
        metrics: Arc::new(Metrics::new(store.backend())),
        throttle: Arc::new(Throttle::new(&config.throttle)),
        policies: Arc::new(policy_registry(
            &config,
            &hub_http,
            store.clone(),
            measured.clone(),
        )?),
        hub_http,
        hub_health: Arc::new(crate::hubs::HubHealth::new(Duration::from_secs(
            config.limits.hub_unhealthy_secs,
        ))),
        trusted_location_headers: Arc::new(config.allocation.geo.clone()),
        certificates: Arc::default(),
        tpm: Arc::new(crate::device_api::tpm::TpmTrust::load(&config.tpm)?),
        instances: Arc::default(),
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
        crate::hubs::probe::spawn(store.clone(), measured, interval, stopped.clone());
    }
    let grace = Duration::from_secs(config.limits.shutdown_grace_secs);
    let router = app::router(state);
    let task = tokio::spawn(serve(listener, acceptor, router, stopped, grace));
    tracing::info!(%local_addr, storage = store.backend(), "listening");
    Ok(RunningServer {
        local_addr,
        admin,
        ca_certificate: std::fs::canonicalize(&tls.ca_certificate).unwrap_or(tls.ca_certificate),
        store,
        stop,
        task,
    })
}

/// The built-in policies, with `custom` driving webhooks and `ownership` reading the stored
/// records, each with its configured fall-back.
fn policy_registry(
    config: &Config,
    client: &reqwest::Client,
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
    let signing_key = config
        .allocation
        .webhook_signing_key
        .as_deref()
        .map(attestation::SymmetricKey::from_base64)
        .transpose()
        .context("allocation.webhook_signing_key")?
        .map(|k| k.as_bytes().to_vec());
    let settings = CustomSettings {
        timeout: Duration::from_secs(config.allocation.custom_timeout_secs.max(1)),
        retries: config.allocation.custom_retries,
        signing_key,
    };
    registry.register(
        "custom",
        Arc::new(CustomWebhook::new(
            client.clone(),
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

/// Serves `router` over TLS on `listener` until `stopped` turns true, then lets in-flight
/// requests finish for up to `grace`. Public so that the load generator's ceiling server runs
/// the very same accept loop.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
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
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                if let Some(chain) = &chain {
                    req.extensions_mut().insert(chain.clone());
                }
                let req = app::canonicalize_path(req.map(axum::body::Body::new));
                router.clone().oneshot(req)
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
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
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
