//! Provisioning a device on a hub: the I/O around the decision (`decide`). The enrollment's
//! settings and credentials, the allocation policy's ranking (or, for a device that stays, its
//! hub), then the hubs in that order until one connector takes the identity, the twin migrated
//! from the old hub when the device moves, and the old hub's identity removed.

use allocation_policies::device_key::{DeviceKey, DeviceKeyKind};
use allocation_policies::policy::Device;
use dps_protocol::ErrorCode;
use dps_protocol::admin::{Instance, LinkedHub};
use dps_protocol::enrollment::{EnrollmentGroup, EnrollmentSettings, IndividualEnrollment};
use dps_protocol::ids::RegistrationId;
use serde::Serialize;
use serde_json::Value;

use super::decide::{self, Assignment, Failure, Route};
use crate::domain::allocation::{candidate_hubs, policy_name, run_policy};
use crate::domain::attest::Source;
use crate::domain::instances::load_instance;
use crate::domain::records::{EnrollmentRef, OperationRecord, RegistrationRecord};
use crate::domain::{DomainError, load};
use crate::hubs::{self, DeviceIdentity, HubAuth};
use crate::state::AppState;
use crate::store::Kind;
use crate::trust::Credentials;

/// The enrollment a registration came through, as provisioning needs it.
struct Enrolled {
    settings: EnrollmentSettings,
    device_id: String,
    auth: HubAuth,
    group_id: Option<String>,
    /// The enrollment without secrets, as allocation policies see it.
    public: Value,
}

impl Enrolled {
    fn individual(e: IndividualEnrollment, id: &RegistrationId) -> Result<Self, DomainError> {
        let auth = decide::individual_hub_auth(&e);
        let device_id = e
            .device_id
            .clone()
            .unwrap_or_else(|| id.as_str().to_owned());
        let mut shown = e.clone();
        crate::domain::validate::hide_secrets(&mut shown.attestation);
        Ok(Self {
            settings: e.settings,
            device_id,
            auth,
            group_id: None,
            public: to_value(&shown)?,
        })
    }

    fn group(g: EnrollmentGroup, id: &RegistrationId) -> Result<Self, DomainError> {
        let auth = decide::group_hub_auth(&g, id);
        let mut shown = g.clone();
        crate::domain::validate::hide_secrets(&mut shown.attestation);
        Ok(Self {
            settings: g.settings,
            device_id: id.as_str().to_owned(),
            auth,
            group_id: Some(g.enrollment_group_id),
            public: to_value(&shown)?,
        })
    }

    /// The enrollment `source` (what authentication read), else the one the operation names,
    /// read from the store (a resumed operation).
    async fn of(
        state: &AppState,
        ns: &str,
        id: &RegistrationId,
        op: &OperationRecord,
        source: Option<Source>,
    ) -> Result<Self, DomainError> {
        match (source, &op.enrollment) {
            (Some(Source::Individual(e)), _) => Self::individual(*e, id),
            (Some(Source::Group(g)), _) => Self::group(*g, id),
            (None, EnrollmentRef::Individual(reg)) => {
                let key = reg.to_ascii_lowercase();
                let stored = load(state.store.as_ref(), ns, Kind::IndividualEnrollment, &key);
                Self::individual(stored.await?.doc_json()?, id)
            }
            (None, EnrollmentRef::Group(group)) => {
                let key = group.to_ascii_lowercase();
                let stored = load(state.store.as_ref(), ns, Kind::EnrollmentGroup, &key);
                Self::group(stored.await?.doc_json()?, id)
            }
        }
    }
}

fn to_value<T: Serialize>(value: &T) -> Result<Value, DomainError> {
    serde_json::to_value(value).map_err(|e| DomainError::internal("serialising an enrollment", &e))
}

/// The instance, from this process's short-lived cache.
async fn instance(state: &AppState, ns: &str) -> Result<Instance, DomainError> {
    if let Some(instance) = state.instances.instances.get(ns) {
        return Ok(instance);
    }
    let instance = load_instance(state.store.as_ref(), ns).await?;
    state
        .instances
        .instances
        .insert(ns.to_owned(), instance.clone());
    Ok(instance)
}

/// The hubs to try, in order, and what a custom webhook returned.
struct Plan {
    route: Route,
    order: Vec<LinkedHub>,
    payload: Option<Value>,
    initial_twin: Option<Value>,
}

async fn plan(
    state: &AppState,
    configured: &Credentials,
    instance: &Instance,
    device: &Device<'_>,
    settings: &EnrollmentSettings,
    previous: Option<&RegistrationRecord>,
) -> Result<Plan, Failure> {
    let reprovision = settings.reprovision_policy.clone().unwrap_or_default();
    let route = decide::route(
        previous.and_then(|p| p.state.assigned_hub.as_deref()),
        &reprovision,
    );
    let policy = policy_name(instance, settings);
    let allocation = if decide::asks_policy(&route, policy) {
        let candidates = candidate_hubs(configured, settings);
        let allocation = run_policy(state, policy, device, &candidates)
            .await
            .map_err(|message| Failure(ErrorCode::NoHubAvailable, message))?;
        Some((allocation, candidates))
    } else {
        None
    };
    let order = match (&route, &allocation) {
        (Route::Stay(old), _) => vec![
            configured
                .linked_hub(old)
                .cloned()
                .ok_or_else(|| decide::hub_gone(old))?,
        ],
        (_, Some((allocation, candidates))) => decide::order(&allocation.ranked, candidates)?,
        (_, None) => return Err(Failure(ErrorCode::NoHubAvailable, decide::NO_HUB.into())),
    };
    let (payload, initial_twin) = allocation
        .map(|(a, _)| (a.payload, a.initial_twin))
        .unwrap_or_default();
    Ok(Plan {
        route,
        order,
        payload,
        initial_twin,
    })
}

/// What provisioning may wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Only this process: no webhook policy, no hub connector that calls out. When the
    /// registration would need one, nothing is done and `provision` answers `None`.
    Local,
    /// Any service the enrollment's policy and hubs need.
    Anywhere,
}

/// Provisions the device of `op` on a hub and returns its new registration state. `source`
/// is the enrollment authentication read, when the operation was just started; `configured`
/// holds the instance's linked hubs.
pub async fn provision(
    state: &AppState,
    ns: &str,
    configured: &Credentials,
    id: &RegistrationId,
    op: &OperationRecord,
    previous: Option<&RegistrationRecord>,
    source: Option<Source>,
) -> Result<RegistrationRecord, Failure> {
    provision_within(
        state,
        ns,
        configured,
        id,
        op,
        previous,
        source,
        Reach::Anywhere,
    )
    .await?
    .ok_or_else(|| Failure(ErrorCode::ServiceUnavailable, decide::NO_HUB.into()))
}

/// [`provision`] when that needs nothing outside this process (no webhook policy, only hubs
/// with the `none` connector); `None`, with nothing done, when it would.
pub async fn provision_locally(
    state: &AppState,
    ns: &str,
    configured: &Credentials,
    id: &RegistrationId,
    op: &OperationRecord,
    previous: Option<&RegistrationRecord>,
    source: Option<Source>,
) -> Result<Option<RegistrationRecord>, Failure> {
    provision_within(
        state,
        ns,
        configured,
        id,
        op,
        previous,
        source,
        Reach::Local,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn provision_within(
    state: &AppState,
    ns: &str,
    configured: &Credentials,
    id: &RegistrationId,
    op: &OperationRecord,
    previous: Option<&RegistrationRecord>,
    source: Option<Source>,
    reach: Reach,
) -> Result<Option<RegistrationRecord>, Failure> {
    let instance = instance(state, ns).await?;
    let enrolled = Enrolled::of(state, ns, id, op, source).await?;
    let certificate = op.x509.as_ref().and_then(|x| x.certificate_info.as_ref());
    let hardware_ids: Vec<DeviceKey> = certificate
        .and_then(|c| DeviceKey::new(DeviceKeyKind::CertificateSerial, &c.serial_number).ok())
        .into_iter()
        .chain(
            op.tpm
                .as_ref()
                .and_then(|t| DeviceKey::new(DeviceKeyKind::EkHash, &t.ek_hash).ok()),
        )
        .collect();
    let device = Device {
        instance: ns,
        registration_id: id.as_str(),
        attestation: if op.tpm.is_some() {
            "tpm"
        } else if certificate.is_some() {
            "x509"
        } else {
            "symmetricKey"
        },
        enrollment: &enrolled.public,
        enrollment_group_id: enrolled.group_id.as_deref(),
        payload: op.device_payload.as_ref(),
        source_address: op.source_address,
        metadata: &op.metadata,
        previous_hub: previous.and_then(|p| p.state.assigned_hub.as_deref()),
        hardware_ids: &hardware_ids,
    };
    let settings = &enrolled.settings;
    let local = reach == Reach::Local;
    if local
        && state
            .policies
            .get(policy_name(&instance, settings))
            .is_some_and(|(_, policy)| policy.calls_out())
    {
        return Ok(None);
    }
    let plan = plan(state, configured, &instance, &device, settings, previous).await?;
    let initial = decide::initial_twin(plan.initial_twin.as_ref(), settings.initial_twin.as_ref());
    let migrate = settings
        .reprovision_policy
        .as_ref()
        .is_none_or(|p| p.migrate_device_data);
    let previous_hub = plan.route.previous_hub();
    if local && !stays_local(configured, &plan, previous_hub) {
        return Ok(None);
    }
    let old_device = previous
        .and_then(|p| p.state.device_id.clone())
        .unwrap_or_else(|| enrolled.device_id.clone());
    let identity = DeviceIdentity {
        device_id: enrolled.device_id.clone(),
        auth: decide::operation_hub_auth(enrolled.auth.clone(), op),
        iot_edge: settings.capabilities.as_ref().is_some_and(|c| c.iot_edge),
        initial_twin: None,
    };
    // The old hub's twin, read once, when the first hub that is not the old one is tried.
    let mut migrated: Option<Option<Value>> = None;
    // First choice first; a hub whose connector fails is skipped (and counts as unhealthy for
    // a while) without asking the policy again.
    let mut failures = Vec::new();
    let mut chosen = None;
    for hub in &plan.order {
        let staying = previous_hub.is_some_and(|old| old.eq_ignore_ascii_case(&hub.host_name));
        if !staying
            && migrate
            && migrated.is_none()
            && let Some(old) = previous_hub
        {
            migrated = Some(read_twin(state, configured, old, &old_device).await);
        }
        let identity = DeviceIdentity {
            initial_twin: decide::twin_for(
                staying,
                migrate,
                migrated.as_ref().and_then(Option::as_ref),
                initial.as_ref(),
            ),
            ..identity.clone()
        };
        match hubs::upsert(&state.connectors, hub, &identity).await {
            Ok(()) => {
                state.hub_health.mark_healthy(&hub.host_name);
                chosen = Some(hub.clone());
                break;
            }
            Err(e) => {
                tracing::warn!(hub = %hub.host_name, error = %e, "hub connector failed; trying the next hub");
                state.hub_health.mark_failed(&hub.host_name);
                failures.push(e.to_string());
            }
        }
    }
    let hub = chosen.ok_or_else(|| {
        Failure(
            ErrorCode::ServiceUnavailable,
            format!("no hub could take the device: {}", failures.join("; ")),
        )
    })?;
    let decision = decide::settle(&hub.host_name, previous_hub, previous, migrate);
    if let Some(old) = &decision.moved_from
        && let Some(old_hub) = configured.linked_hub(old)
        && let Err(e) = hubs::remove(&state.connectors, old_hub, &old_device).await
    {
        tracing::warn!(hub = %old, error = %e, "could not remove the device from its previous hub");
    }
    Ok(Some(decide::assigned(Assignment {
        id,
        op,
        hub: &hub.host_name,
        device_id: enrolled.device_id,
        group_id: enrolled.group_id,
        payload: plan.payload,
        decision,
    })))
}

/// Whether the first hub of `plan` (which then takes the device: its connector cannot fail)
/// and the hub the device would leave are both local.
fn stays_local(configured: &Credentials, plan: &Plan, previous_hub: Option<&str>) -> bool {
    let Some(first) = plan.order.first() else {
        return true;
    };
    if !hubs::is_local(first) {
        return false;
    }
    match previous_hub.filter(|old| !old.eq_ignore_ascii_case(&first.host_name)) {
        Some(old) => configured.linked_hub(old).is_none_or(hubs::is_local),
        None => true,
    }
}

/// The device's twin in its old hub, to migrate; none when it cannot be read (the initial twin
/// is used then).
async fn read_twin(
    state: &AppState,
    configured: &Credentials,
    old: &str,
    device_id: &str,
) -> Option<Value> {
    let old_hub = configured.linked_hub(old)?;
    hubs::read_twin(&state.connectors, old_hub, device_id)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(hub = %old, error = %e, "cannot read the twin to migrate; using the initial twin");
            None
        })
}
