//! Azure `custom` allocation: a webhook chooses the hub. The request and answer have Azure's
//! shapes (reference section 5), so existing Azure Functions work unchanged:
//!
//! - request `{"individualEnrollment" | "enrollmentGroup": {...}, "deviceRuntimeContext":
//!   {"registrationId", "currentIotHubHostName"?, "symmetricKey": {}, "payload"?},
//!   "linkedHubs": [...]}`, the enrollment without secrets (its attestation reduced to its type);
//! - answer `{"iotHubHostName", "initialTwin"?, "payload"?}`, where the hub must be one of
//!   `linkedHubs`.
//!
//! Each call has a timeout; connection failures, timeouts and 5xx answers are retried a bounded
//! number of times; when the webhook stays down an optional fall-back policy answers instead.
//! A 4xx or an invalid answer fails the allocation. Calls go through [`Outbound`]: no
//! redirects, no private targets unless allowed, a capped answer, and failure messages (which
//! reach the device) that name neither the URL's query (where Azure Functions keep their key)
//! nor the answer's body. With a signing key, each request carries `x-dps-timestamp` and
//! `x-dps-signature: sha256=<hex HMAC-SHA256 of "timestamp.body">`.

use std::sync::Arc;
use std::time::Duration;

use dps_outbound::{Method, Outbound, OutboundError, WebhookSigner};
use serde_json::{Value, json};

use crate::policy::{Allocation, AllocationPolicy, Candidate, Device, PolicyError};

/// Settings of the custom allocation policy.
#[derive(Debug, Clone)]
pub struct CustomSettings {
    /// Time allowed for one call.
    pub timeout: Duration,
    /// Further attempts after a failed call.
    pub retries: u32,
    /// Signs requests, when set.
    pub signer: Option<WebhookSigner>,
}

/// The custom (webhook) allocation policy.
#[derive(Debug, Clone)]
pub struct CustomWebhook {
    outbound: Outbound,
    settings: CustomSettings,
    fallback: Option<(String, Arc<dyn AllocationPolicy>)>,
}

impl CustomWebhook {
    /// A webhook policy calling out through `outbound`, with an optional fall-back policy (and
    /// its name) for when the webhook is down.
    pub fn new(
        outbound: Outbound,
        settings: CustomSettings,
        fallback: Option<(String, Arc<dyn AllocationPolicy>)>,
    ) -> Self {
        Self {
            outbound,
            settings,
            fallback,
        }
    }

    fn request_body(device: &Device<'_>, candidates: &[Candidate]) -> Value {
        let mut enrollment = device.enrollment.clone();
        if let Some(map) = enrollment.as_object_mut() {
            let kind = map
                .get("attestation")
                .and_then(|a| a.get("type"))
                .cloned()
                .unwrap_or(Value::Null);
            map.insert("attestation".into(), json!({ "type": kind }));
            map.remove("registrationState");
        }
        let kind = if device.enrollment_group_id.is_some() {
            "enrollmentGroup"
        } else {
            "individualEnrollment"
        };
        let mut context = json!({ "registrationId": device.registration_id });
        if let Some(hub) = device.previous_hub {
            context["currentIotHubHostName"] = json!(hub);
        }
        context[device.attestation] = json!({});
        if let Some(payload) = device.payload {
            context["payload"] = payload.clone();
        }
        json!({
            kind: enrollment,
            "deviceRuntimeContext": context,
            "linkedHubs": candidates.iter().map(|c| c.host_name.as_str()).collect::<Vec<_>>(),
        })
    }

    /// One webhook exchange with retries: the answer, a refusal, or "down".
    async fn call(&self, url: &str, body: &[u8]) -> Result<Value, Outcome> {
        let mut last = String::new();
        for attempt in 0..=self.settings.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt.min(5)))).await;
            }
            // A URL the client refuses is the enrollment's fault: not retried, no fall-back.
            let request = self
                .outbound
                .request(Method::POST, url)
                .map_err(|e| Outcome::Refused(e.to_string()))?
                .timeout(self.settings.timeout)
                .header("content-type", "application/json")
                .body(body.to_vec());
            let request = dps_outbound::maybe_sign(self.settings.signer.as_ref(), request, body);
            let answer = match self.outbound.send(request).await {
                Ok(answer) => answer,
                Err(e @ (OutboundError::Forbidden(_) | OutboundError::InvalidUrl)) => {
                    return Err(Outcome::Refused(e.to_string()));
                }
                Err(OutboundError::TooLarge(_, limit)) => {
                    return Err(Outcome::Refused(format!(
                        "its answer is larger than {limit} bytes"
                    )));
                }
                Err(OutboundError::Timeout(_)) => {
                    last = format!("no answer within {:?}", self.settings.timeout);
                    continue;
                }
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let status = answer.status;
            if status.is_success() {
                return serde_json::from_slice(&answer.body)
                    .map_err(|e| Outcome::Refused(format!("its answer is not JSON: {e}")));
            }
            // The status only: the body is the webhook's, and may carry anything.
            if status.is_server_error() || status.as_u16() == 429 {
                last = format!("HTTP {status}");
                continue;
            }
            return Err(Outcome::Refused(format!("HTTP {status}")));
        }
        Err(Outcome::Down(last))
    }
}

enum Outcome {
    Refused(String),
    Down(String),
}

#[async_trait::async_trait]
impl AllocationPolicy for CustomWebhook {
    fn calls_out(&self) -> bool {
        true
    }

    async fn allocate(
        &self,
        device: &Device<'_>,
        candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError> {
        let definition = device
            .enrollment
            .get("customAllocationDefinition")
            .ok_or_else(|| {
                PolicyError::Refused("the enrollment has no customAllocationDefinition".into())
            })?;
        let url = definition
            .get("webhookUrl")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                PolicyError::Refused("customAllocationDefinition has no webhookUrl".into())
            })?;
        let body = serde_json::to_vec(&Self::request_body(device, candidates))
            .map_err(|e| PolicyError::Refused(e.to_string()))?;
        let answer = match self.call(url, &body).await {
            Ok(answer) => answer,
            Err(Outcome::Refused(why)) => {
                return Err(PolicyError::Refused(format!(
                    "the allocation webhook refused: {why}"
                )));
            }
            Err(Outcome::Down(why)) => {
                let Some((name, fallback)) = &self.fallback else {
                    return Err(PolicyError::Unavailable(format!(
                        "the allocation webhook is down ({why})"
                    )));
                };
                let mut allocation = fallback.allocate(device, candidates).await?;
                allocation.reason = format!(
                    "the allocation webhook is down ({why}); the {name} fall-back chose: {}",
                    allocation.reason
                );
                return Ok(allocation);
            }
        };
        let hub = answer
            .get("iotHubHostName")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                PolicyError::Refused("the webhook's answer has no iotHubHostName".into())
            })?;
        let chosen = candidates
            .iter()
            .find(|c| c.host_name.eq_ignore_ascii_case(hub))
            .ok_or_else(|| {
                PolicyError::Refused(format!(
                    "the webhook chose '{hub}', which is not one of the linked hubs it was offered"
                ))
            })?;
        Ok(Allocation {
            ranked: vec![chosen.host_name.clone()],
            reason: "the allocation webhook chose it".into(),
            payload: answer.get("payload").filter(|p| !p.is_null()).cloned(),
            initial_twin: answer.get("initialTwin").filter(|t| !t.is_null()).cloned(),
        })
    }
}
