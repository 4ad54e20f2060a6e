//! The front door of the service (and of the load generator's ceiling, which must cost the
//! same): TLS configuration (a configured certificate or a generated development one, client
//! certificates requested and their possession proven), and the accept loop that serves any
//! router over TLS or plain HTTP with a deadline on every phase of a connection and a cap on
//! their number. What the connection knows (the peer's address, its certificate chain, the body
//! deadline) reaches handlers as request extensions.

pub mod files;
pub mod mqtt;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

pub use tls::{TlsConfig, TlsMaterial};

const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The address of the peer, added to every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The certificate chain the client presented in the TLS handshake (leaf first), added to
/// every request of its connection; absent when it presented none.
#[derive(Debug, Clone)]
pub struct ClientChain(pub Arc<Vec<Vec<u8>>>);

/// How a request arrived, added to its extensions by the front end that took it (HTTPS when
/// absent): requests that came over MQTT are handed to the same router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport(pub &'static str);

impl Transport {
    /// HTTPS.
    pub const HTTPS: Self = Self("https");
    /// MQTT, over TLS or WebSockets.
    pub const MQTT: Self = Self("mqtt");

    /// How the request with these extensions arrived.
    pub fn of(extensions: &axum::http::Extensions) -> Self {
        extensions.get::<Self>().copied().unwrap_or(Self::HTTPS)
    }
}

/// Marks a response whose body goes on (a live stream): its connection counts as busy, and is
/// not closed as idle, until the body ends.
#[derive(Debug, Clone, Copy)]
pub struct LongLived;

/// How long a request's body may take to arrive, added to every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub Duration);

impl BodyDeadline {
    /// The deadline of `req`, or 30 seconds for a request that did not come through the
    /// listener.
    pub fn of(req: &Request) -> Duration {
        req.extensions()
            .get::<BodyDeadline>()
            .map_or(Duration::from_secs(30), |d| d.0)
    }
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

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            tls_handshake: Duration::from_secs(10),
            request_header: Duration::from_secs(30),
            request_body: Duration::from_secs(30),
            idle: Duration::from_secs(120),
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

/// Serves `service` (an axum router, or one wrapped in request mapping) on `listener`, over
/// TLS with `acceptor` or plain HTTP without one, until `stopped` turns true, then lets
/// in-flight requests finish for up to `grace`.
pub async fn serve<S>(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    service: S,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
    grace: Duration,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
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
    let connection_limits = limits.clone();
    let connection_stopped = stopped.clone();
    accept_loop(listener, limits, stopped, grace, move |tcp, peer| {
        let connection = Connection {
            acceptor: acceptor.clone(),
            builder: builder.clone(),
            service: service.clone(),
            limits: connection_limits.clone(),
            stopped: connection_stopped.clone(),
        };
        connection.run(tcp, peer)
    })
    .await;
}

/// A TLS connection that completed its handshake, as [`serve_tls`] hands it over.
pub type TlsConnection = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Serves TLS connections on `listener` with `handle` (a protocol other than HTTP: MQTT), with
/// the same connection cap, handshake deadline and accept-error backoff as [`serve`].
/// `handle` gets the stream, the peer's address and the client certificate chain it presented,
/// and should close the connection when `stopped` turns true; in-flight connections get up to
/// `grace`.
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
    grace: Duration,
    handle: H,
) where
    H: Fn(TlsConnection, SocketAddr, Option<ClientChain>) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handshake = limits.tls_handshake;
    accept_loop(listener, limits, stopped, grace, move |tcp, peer| {
        let (acceptor, handle) = (acceptor.clone(), handle.clone());
        async move {
            let Some((tls, chain)) = handshake_within(&acceptor, tcp, peer, handshake).await else {
                return;
            };
            handle(tls, peer, chain).await;
        }
    })
    .await;
}

/// The TLS handshake of `tcp` within `deadline`, and the client chain it presented.
async fn handshake_within(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    deadline: Duration,
) -> Option<(TlsConnection, Option<ClientChain>)> {
    let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    let chain = tls.get_ref().1.peer_certificates().map(|certs| {
        ClientChain(Arc::new(
            certs.iter().map(|c| c.as_ref().to_vec()).collect(),
        ))
    });
    Some((tls, chain))
}

/// Accepts connections until `stopped` turns true, at most `limits.max_connections` at once
/// (past the cap, clients wait in the kernel's backlog), backing off when `accept` fails, and
/// runs `connection` for each on its own task; then waits up to `grace` for them to end.
async fn accept_loop<C, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
    connection: C,
) where
    C: Fn(tokio::net::TcpStream, SocketAddr) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
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
        // Answers are small writes (headers, then the body): without this, Nagle's algorithm
        // holds the second until the client's delayed ACK, about 40 ms per request.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY");
        }
        let served = connection(tcp, peer);
        tokio::spawn(async move {
            served.await;
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
struct Connection<S> {
    acceptor: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
}

impl<S> Connection<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    async fn run(self, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let Some(acceptor) = self.acceptor.clone() else {
            self.http(TokioIo::new(tcp), peer, None).await;
            return;
        };
        let handshake = self.limits.tls_handshake;
        if let Some((tls, chain)) = handshake_within(&acceptor, tcp, peer, handshake).await {
            self.http(TokioIo::new(tls), peer, chain).await;
        }
    }

    /// Serves HTTP on `io` until the client leaves, stays idle too long, or the server stops.
    async fn http<I>(self, io: I, peer: SocketAddr, chain: Option<ClientChain>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let service = {
            let (activity, inner) = (activity.clone(), self.service.clone());
            let body_deadline = BodyDeadline(self.limits.request_body);
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let in_flight = InFlight::start(&activity);
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut().insert(body_deadline);
                if let Some(chain) = &chain {
                    req.extensions_mut().insert(chain.clone());
                }
                let answer = inner.clone().oneshot(req.map(axum::body::Body::new));
                async move {
                    let mut response = answer.await?;
                    // A response marked long-lived (a live stream) keeps its connection busy
                    // until its body ends; any other is done once its head is produced.
                    if response.extensions_mut().remove::<LongLived>().is_some() {
                        use http_body_util::BodyExt as _;
                        response = response.map(|body| {
                            axum::body::Body::new(body.map_frame(move |frame| {
                                let _busy = &in_flight;
                                frame
                            }))
                        });
                    } else {
                        drop(in_flight);
                    }
                    Ok::<_, Infallible>(response)
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
