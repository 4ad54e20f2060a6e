//! The allocation dry-run: which hub each policy would choose for a described device, and
//! why, without registering anything. The device's enrollment (its individual enrollment, else
//! the named group) supplies the candidate hubs and its own policy; without one, every linked
//! hub that takes part in allocation is a candidate.

use std::collections::BTreeMap;
use std::net::IpAddr;

use allocation_policies::PolicyName;
use allocation_policies::device_key::{DeviceKey, DeviceKeyKind};
use allocation_policies::policy::Device;
use dps_protocol::admin::{Instance, Right};
use dps_protocol::enrollment::{EnrollmentGroup, EnrollmentSettings, IndividualEnrollment};
use dps_protocol::ids::{EnrollmentGroupId, RegistrationId, check_host_name};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::allocation::{candidate_hubs, policy_name, run_policy};
use super::validate::{field_error, hide_secrets};
use super::{DomainError, load};
use crate::state::AppState;
use crate::store::Kind;

/// Most names a simulation's `policies` may hold.
const MOST_POLICY_NAMES: usize = 16;

/// The device to simulate.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulationRequest {
    registration_id: String,
    #[serde(default)]
    enrollment_group_id: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    source_address: Option<IpAddr>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    previous_hub: Option<String>,
    /// The serial of the device's certificate (ownership records may name it).
    #[serde(default)]
    certificate_serial: Option<String>,
    /// SHA-256 of the device's TPM endorsement key (ownership records may name it).
    #[serde(default)]
    ek_hash: Option<String>,
    /// Policies to try; every registered one when absent.
    #[serde(default)]
    policies: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulationResult {
    registration_id: String,
    /// The policy the device's enrollment (or the instance) would use.
    effective_policy: String,
    /// The hubs the policies chose among.
    candidates: Vec<String>,
    results: Vec<PolicyResult>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyResult {
    policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hub: Option<String>,
    ranked: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Simulates `request` in `instance`. `may_call_webhooks`: whether the caller may make the
/// server call a custom allocation webhook (an outbound request on its behalf, so it needs
/// `EnrollmentWrite`).
pub async fn simulate(
    state: &AppState,
    instance: &Instance,
    may_call_webhooks: bool,
    request: SimulationRequest,
) -> Result<SimulationResult, DomainError> {
    let ns = instance.name.as_str();
    let id = RegistrationId::parse(&request.registration_id)
        .map_err(|e| field_error("registrationId", e.to_string()))?;
    if let Some(hub) = &request.previous_hub {
        check_host_name(hub).map_err(|e| field_error("previousHub", e.to_string()))?;
    }
    let individual = state
        .store
        .get(ns, Kind::IndividualEnrollment, &id.key())
        .await?
        .map(|s| s.doc_json::<IndividualEnrollment>())
        .transpose()?;
    let (settings, mut enrollment, group_id): (EnrollmentSettings, Value, Option<String>) =
        match (individual, &request.enrollment_group_id) {
            (Some(mut e), _) => {
                hide_secrets(&mut e.attestation);
                (e.settings.clone(), to_value(&e)?, None)
            }
            (None, Some(group)) => {
                let key = EnrollmentGroupId::parse(group)
                    .map_err(|e| field_error("enrollmentGroupId", e.to_string()))?
                    .key();
                let mut g: EnrollmentGroup =
                    load(state.store.as_ref(), ns, Kind::EnrollmentGroup, &key)
                        .await?
                        .doc_json()?;
                hide_secrets(&mut g.attestation);
                (
                    g.settings.clone(),
                    to_value(&g)?,
                    Some(g.enrollment_group_id),
                )
            }
            (None, None) => (EnrollmentSettings::default(), Value::Null, None),
        };
    if enrollment.is_null() {
        enrollment = Value::Object(Default::default());
    }
    let configured = crate::domain::credentials::of(state, ns).await?;
    let hubs = candidate_hubs(&configured, &settings);
    let mut hardware_ids = Vec::new();
    for (field, kind, value) in [
        (
            "certificateSerial",
            DeviceKeyKind::CertificateSerial,
            &request.certificate_serial,
        ),
        ("ekHash", DeviceKeyKind::EkHash, &request.ek_hash),
    ] {
        if let Some(value) = value {
            hardware_ids
                .push(DeviceKey::new(kind, value).map_err(|e| field_error(field, e.message))?);
        }
    }
    let device = Device {
        instance: ns,
        registration_id: id.as_str(),
        attestation: "symmetricKey",
        enrollment: &enrollment,
        enrollment_group_id: group_id.as_deref(),
        payload: request.payload.as_ref(),
        source_address: request.source_address,
        metadata: &request.metadata,
        previous_hub: request.previous_hub.as_deref(),
        hardware_ids: &hardware_ids,
    };
    let registered = state.policies.names();
    let asked = request.policies.is_some();
    let names: Vec<String> = match request.policies {
        Some(names) if names.is_empty() => {
            return Err(field_error("policies", "policies is empty"));
        }
        Some(names) if names.len() > MOST_POLICY_NAMES => {
            return Err(field_error(
                "policies",
                format!("policies holds at most {MOST_POLICY_NAMES} names"),
            ));
        }
        Some(names) => {
            // Each policy once (by its canonical name): the list cannot multiply the work of
            // one request, which runs each registered policy at most once (an unknown name
            // costs nothing but its error).
            let mut distinct: Vec<String> = Vec::new();
            for name in names {
                let canonical = state
                    .policies
                    .get(&name)
                    .map_or(name, |(canonical, _)| canonical.to_owned());
                if !distinct.iter().any(|d| d.eq_ignore_ascii_case(&canonical)) {
                    distinct.push(canonical);
                }
            }
            distinct
        }
        None => registered.into_iter().map(str::to_owned).collect(),
    };
    // A custom policy calls the enrollment's webhook: an outbound request on the caller's
    // behalf, which needs the right to change what the webhook is (security review item 5).
    if asked && !may_call_webhooks && names.iter().any(|n| n == PolicyName::Custom.as_str()) {
        return Err(super::access::lacks(Right::EnrollmentWrite));
    }
    let mut results = Vec::with_capacity(names.len());
    for name in names {
        if name == PolicyName::Custom.as_str() && !may_call_webhooks {
            results.push(PolicyResult {
                policy: name,
                hub: None,
                ranked: Vec::new(),
                reason: None,
                error: Some(
                    "not run: simulating the custom policy calls its webhook, which needs EnrollmentWrite"
                        .into(),
                ),
            });
            continue;
        }
        let result = match run_policy(state, &name, &device, &hubs).await {
            Ok(allocation) => PolicyResult {
                policy: name,
                hub: allocation.ranked.first().cloned(),
                ranked: allocation.ranked,
                reason: Some(allocation.reason),
                error: None,
            },
            Err(message) => PolicyResult {
                policy: name,
                hub: None,
                ranked: Vec::new(),
                reason: None,
                error: Some(message),
            },
        };
        results.push(result);
    }
    Ok(SimulationResult {
        registration_id: id.as_str().to_owned(),
        effective_policy: policy_name(instance, &settings).to_owned(),
        candidates: hubs.into_iter().map(|h| h.host_name).collect(),
        results,
    })
}

fn to_value<T: Serialize>(value: &T) -> Result<Value, DomainError> {
    serde_json::to_value(value).map_err(|e| DomainError::internal("serialising an enrollment", &e))
}
