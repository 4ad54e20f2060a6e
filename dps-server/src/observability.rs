//! Logs, request ids and Prometheus metrics.
//!
//! Every request runs in a span carrying its request id, method and route; handlers record the
//! instance and registration id on it once known. Headers are never logged (they carry SAS
//! tokens), and neither are bodies (they carry keys).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::Instrument as _;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use dps_listener::Transport;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served by this task, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Starts logging to stderr. `RUST_LOG` overrides the configured filter.
pub fn init_logging(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (tests start several servers) is harmless; ignore it.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistrationLabels {
    transport: String,
    status: u16,
}

/// The route of a device's register request.
const REGISTER_ROUTE: &str = "/{scope}/registrations/{id}/register";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HubLabels {
    instance: String,
    hub: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    backend: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    registrations: Family<RegistrationLabels, Counter>,
    hub_devices: Family<HubLabels, Gauge>,
    event_webhook: Family<OutcomeLabels, Counter>,
    /// When the device counts per hub were last read from the store.
    pub hub_counts_at: tokio::sync::Mutex<Option<Instant>>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new(backend: &str) -> Self {
        let mut registry = Registry::with_prefix("dps");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            requests.clone(),
        );
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            durations.clone(),
        );
        let registrations = Family::<RegistrationLabels, Counter>::default();
        registry.register(
            "device_registrations",
            "Register requests of devices, by transport (https, mqtt) and answer status",
            registrations.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                backend: backend.into(),
            })
            .set(1);
        registry.register("build_info", "Version and storage backend", build);
        let hub_devices = Family::<HubLabels, Gauge>::default();
        registry.register(
            "hub_devices",
            "Devices assigned to each linked hub, by instance (read from the store at most every 30 seconds)",
            hub_devices.clone(),
        );
        let event_webhook = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "event_webhook",
            "Events handed to events.webhook_url, by outcome (delivered, failed after retries, dropped from a full queue)",
            event_webhook.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            registrations,
            hub_devices,
            event_webhook,
            hub_counts_at: tokio::sync::Mutex::new(None),
        }
    }

    /// An event the webhook took.
    pub fn event_webhook_delivered(&self) {
        self.event_webhook_outcome("delivered");
    }

    /// An event the webhook did not take after every attempt.
    pub fn event_webhook_failed(&self) {
        self.event_webhook_outcome("failed");
    }

    /// An event dropped from the full queue.
    pub fn event_webhook_dropped(&self) {
        self.event_webhook_outcome("dropped");
    }

    fn event_webhook_outcome(&self, outcome: &str) {
        self.event_webhook
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Replaces the per-hub device counts (hubs without devices disappear).
    pub fn set_hub_devices(&self, counts: &[(String, String, i64)]) {
        self.hub_devices.clear();
        for (instance, hub, devices) in counts {
            self.hub_devices
                .get_or_create(&HubLabels {
                    instance: instance.clone(),
                    hub: hub.clone(),
                })
                .set(*devices);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn request_id_from(req: &Request) -> String {
    let sent = ["x-ms-request-id", "request-id", "x-request-id"]
        .iter()
        .find_map(|name| req.headers().get(*name))
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    sent.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Middleware: request id, span, access log line and metrics for every request.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request_id_from(&req);
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let transport = Transport::of(req.extensions());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %method,
        route = %route,
        transport = transport.0,
        instance = tracing::field::Empty,
        registration_id = tracing::field::Empty,
    );
    let mut response = REQUEST_ID
        .scope(request_id.clone(), next.run(req).instrument(span.clone()))
        .await
        .into_response();
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "answered"
        );
    });
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    if route == REGISTER_ROUTE {
        metrics
            .registrations
            .get_or_create(&RegistrationLabels {
                transport: transport.0.to_owned(),
                status,
            })
            .inc();
    }
    metrics
        .durations
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-ms-request-id", value);
    }
    response
}
