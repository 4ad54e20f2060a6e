//! Allocation: the policies by name (built from the configuration at start), the candidate
//! hubs of an enrollment, and running a policy over them with unhealthy hubs ranked last.

use std::sync::Arc;
use std::time::Duration;

use allocation_policies::policy::{Allocation, Candidate, Device, healthy_first};
use anyhow::Context as _;
use dps_protocol::admin::{Instance, LinkedHub};
use dps_protocol::enrollment::EnrollmentSettings;

use crate::config::Config;
use crate::state::AppState;
use crate::store::Store;
use crate::trust::Credentials;

/// The policies by name: the built-ins, `geoLatency` with the configured locations,
/// `custom` driving webhooks and `ownership` reading the stored records, each with its
/// configured fall-back.
pub fn registry(
    config: &Config,
    connectors: &crate::hubs::Connectors,
    store: Arc<dyn Store>,
    measured: Arc<allocation_policies::geo::MeasuredLatency>,
) -> anyhow::Result<allocation_policies::registry::Registry> {
    use allocation_policies::custom::{CustomSettings, CustomWebhook};
    use allocation_policies::ownership::Ownership;
    let mut registry = allocation_policies::registry::Registry::with_builtins();
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
    let book = Arc::new(crate::domain::ownership::StoredOwnership::new(store));
    registry.register(
        "ownership",
        Arc::new(Ownership::new(book, ownership_fallback)),
    );
    Ok(registry)
}

/// The signer of webhook requests (allocation webhooks and the webhook connector), when
/// `allocation.webhook_signing_key` is set.
pub fn webhook_signer(config: &Config) -> anyhow::Result<Option<dps_outbound::WebhookSigner>> {
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

/// The policy for these settings: the enrollment's, else the instance default, else `hashed`.
pub fn policy_name<'a>(instance: &'a Instance, settings: &'a EnrollmentSettings) -> &'a str {
    settings
        .allocation_policy
        .as_deref()
        .or(instance.default_allocation_policy.as_deref())
        .unwrap_or("hashed")
}

/// Runs the policy registered as `name` over `hubs`: host names ranked, healthy hubs first.
pub async fn run_policy(
    state: &AppState,
    name: &str,
    device: &Device<'_>,
    hubs: &[LinkedHub],
) -> Result<Allocation, String> {
    let (_, policy) = state
        .policies
        .get(name)
        .ok_or_else(|| format!("unknown allocation policy '{name}'"))?;
    if hubs.is_empty() {
        return Err(
            "no linked hub is available for this device: link a hub, or name one on the enrollment"
                .into(),
        );
    }
    let candidates: Vec<Candidate> = hubs.iter().map(|h| candidate_of(state, h)).collect();
    let mut allocation = policy
        .allocate(device, &candidates)
        .await
        .map_err(|e| e.to_string())?;
    allocation.ranked.retain(|host| {
        candidates
            .iter()
            .any(|c| c.host_name.eq_ignore_ascii_case(host))
    });
    allocation.ranked = healthy_first(allocation.ranked, &candidates);
    Ok(allocation)
}

fn candidate_of(state: &AppState, hub: &LinkedHub) -> Candidate {
    Candidate {
        host_name: hub.host_name.clone(),
        weight: hub.allocation_weight.unwrap_or(1),
        region: hub.region.clone(),
        location: hub.latitude.zip(hub.longitude),
        healthy: state.hub_health.is_healthy(&hub.host_name),
    }
}

/// The enrollment's hubs if it names any, else every linked hub that takes part in allocation.
pub fn candidate_hubs(configured: &Credentials, settings: &EnrollmentSettings) -> Vec<LinkedHub> {
    let mut named: Vec<String> = settings.iot_hubs.clone().unwrap_or_default();
    if let Some(single) = &settings.iot_hub_host_name {
        named.push(single.clone());
    }
    if !named.is_empty() {
        let mut hubs: Vec<LinkedHub> = Vec::new();
        for host in named {
            if let Some(hub) = configured.linked_hub(&host)
                && !hubs.iter().any(|h| h.host_name == hub.host_name)
            {
                hubs.push(hub.clone());
            }
        }
        return hubs;
    }
    configured
        .linked_hubs
        .iter()
        .filter(|hub| hub.apply_allocation_policy.unwrap_or(true))
        .cloned()
        .collect()
}
