//! Latency probing for `geoLatency`: every interval, each linked hub of every instance gets
//! one HTTPS request (a HEAD to the endpoint its connector talks to), and the time to its
//! answer, whatever the status, is a latency sample from this server to that hub. A hub that
//! does not answer loses its figure until it answers again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocation_policies::geo::MeasuredLatency;
use attestation::ConnectionString;
use dps_outbound::{Method, Outbound, OutboundSettings};
use dps_protocol::admin::{HubConnector, LinkedHub};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::{Kind, Page, SERVER_NS, Store};

/// Longest a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The URL a probe of `hub` requests: where its connector sends identities, else the hub's own
/// host name.
pub fn target(hub: &LinkedHub) -> String {
    match hub.connector.as_ref() {
        Some(HubConnector::Webhook { url }) => url.clone(),
        Some(HubConnector::AzureIotHub {
            endpoint: Some(endpoint),
            ..
        }) => endpoint.clone(),
        Some(HubConnector::AzureIotHub {
            connection_string: Some(text),
            ..
        }) => match ConnectionString::parse(text) {
            Ok(parsed) => format!("https://{}/", parsed.host_name),
            Err(_) => format!("https://{}/", hub.host_name),
        },
        _ => format!("https://{}/", hub.host_name),
    }
}

/// Probes every `interval` until `stop` turns true, under the outbound rules of `settings`.
pub fn spawn(
    store: Arc<dyn Store>,
    measured: Arc<MeasuredLatency>,
    interval: Duration,
    settings: &OutboundSettings,
    mut stop: watch::Receiver<bool>,
) {
    // A client of its own without connection reuse, so that every sample costs the same:
    // connection set-up, TLS handshake and one request.
    let client = Outbound::new(&OutboundSettings {
        timeout: PROBE_TIMEOUT,
        reuse_connections: false,
        ..settings.clone()
    });
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => round(store.as_ref(), &client, &measured).await,
                _ = stop.changed() => break,
            }
        }
    });
}

/// One probe of every hub, concurrently.
async fn round(store: &dyn Store, client: &Outbound, measured: &Arc<MeasuredLatency>) {
    let hubs = match linked_hubs(store).await {
        Ok(hubs) => hubs,
        Err(e) => {
            tracing::warn!(error = %e, "listing hubs to probe");
            return;
        }
    };
    for gone in measured.snapshot().keys() {
        if !hubs.contains_key(gone) {
            measured.forget(gone);
        }
    }
    let mut probes = JoinSet::new();
    for (host, url) in hubs {
        let (client, measured) = (client.clone(), measured.clone());
        probes.spawn(async move {
            let started = Instant::now();
            let probe = match client.request(Method::HEAD, &url) {
                Ok(request) => client.send(request).await,
                Err(e) => Err(e),
            };
            match probe {
                Ok(_) => {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    tracing::debug!(hub = %host, ms, "hub probe");
                    measured.record(&host, ms);
                }
                Err(e) => {
                    tracing::debug!(hub = %host, error = %e, "hub probe failed");
                    measured.forget(&host);
                }
            }
        });
    }
    while probes.join_next().await.is_some() {}
}

/// Every instance's linked hubs, by lower-case host name, with their probe targets.
async fn linked_hubs(
    store: &dyn Store,
) -> Result<BTreeMap<String, String>, crate::store::StoreError> {
    let all = || Page {
        limit: usize::MAX,
        ..Page::default()
    };
    let mut hubs = BTreeMap::new();
    for instance in store.list(SERVER_NS, Kind::Instance, all()).await? {
        for row in store.list(&instance.key, Kind::LinkedHub, all()).await? {
            match serde_json::from_str::<LinkedHub>(&row.doc) {
                Ok(hub) => {
                    hubs.insert(hub.host_name.to_ascii_lowercase(), target(&hub));
                }
                Err(e) => tracing::warn!(hub = %row.key, error = %e, "a stored hub is corrupt"),
            }
        }
    }
    Ok(hubs)
}
