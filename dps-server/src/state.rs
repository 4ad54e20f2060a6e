//! What the service's code shares: storage, limits, caches and the services built at start.
//! No HTTP types: the domain layer takes it, and so do the edges.

use std::sync::Arc;

use crate::config::Limits;
use crate::observability::Metrics;
use crate::store::Store;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Request limits.
    pub limits: Arc<Limits>,
    /// The instance whose `ServiceConfig` policies may manage all instances.
    pub admin_instance: Arc<str>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Device API throttling.
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Allocation policies by name.
    pub policies: Arc<allocation_policies::registry::Registry>,
    /// How hub connectors reach hubs.
    pub connectors: crate::hubs::Connectors,
    /// Hubs whose connector failed recently.
    pub hub_health: Arc<crate::hubs::HubHealth>,
    /// Request headers an operator trusts to carry the device's region or coordinates.
    pub trusted_location_headers: Arc<crate::config::GeoConfig>,
    /// Enrollment and CA certificates already parsed (X.509 registrations read them all).
    pub certificates: Arc<attestation::x509::ParsedCache>,
    /// How long registration events are kept (seconds); `None`: none are written.
    pub event_retention: Option<i64>,
    /// Where committed events are delivered, when `events.webhook_url` is set.
    pub event_webhook: Option<Arc<crate::event_webhook::EventWebhook>>,
    /// Places for live event streams (`limits.max_event_streams`).
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Credential policies and their issuing CAs.
    pub issuance: Arc<crate::domain::issuance::Issuance>,
    /// TPM manufacturer certificates and the challenge lifetime.
    pub tpm: Arc<crate::trust::TpmTrust>,
    /// Instances and ID scopes as device requests read them.
    pub instances: Arc<crate::cache::InstanceCache>,
    /// Operations this process finished lately, answered to polls without a read.
    pub finished: Arc<crate::cache::FinishedOperations>,
    /// Enrollment groups and CA certificates as device authentication reads them.
    pub credentials: Arc<crate::trust::CredentialCache>,
    /// Names of this server that service tokens of every instance may name in `sr` (the
    /// host name of its listener, `localhost[:port]`).
    pub server_names: Arc<[String]>,
}
