//! Hub connectors: how a device's identity is created in, and removed from, the hub it is
//! assigned to.
//!
//! - `none`: the assignment is recorded; nothing is created.
//! - `webhook`: the identity is POSTed to an HTTPS endpoint (`{"operation": "upsert" | "delete",
//!   ...}`), which must answer 2xx; signed like the allocation webhooks when
//!   `allocation.webhook_signing_key` is set.
//! - `azure-iot-hub`: the hub's registry REST API with a shared access policy key: the device
//!   is created (or updated when it exists) with SAS or X.509 authentication, then its initial twin is
//!   applied; when the twin fails the device is deleted again, so nothing is left half made.
//!
//! A hub whose connector fails is marked unhealthy for a while ([`HubHealth`]), so that later
//! registrations try the next ranked hub first. Every call goes through [`Outbound`] (no
//! redirects, no private targets unless allowed, capped answers), and a failure says what
//! failed (the hub, the status) but never what the hub answered: those messages reach devices.

pub mod probe;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attestation::ConnectionString;
use attestation::sas::{encode_uri_component, sign};
use dps_outbound::{Method, Outbound, OutboundError, RequestBuilder, WebhookSigner};
use dps_protocol::admin::{HubConnector, LinkedHub};
use serde_json::{Value, json};

/// The IoT Hub service API version the connector speaks.
const IOT_HUB_API_VERSION: &str = "2021-04-12";
/// Lifetime of the SAS tokens signed for the hub.
const HUB_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// What a hub needs to know about a device.
#[derive(Clone)]
pub struct DeviceIdentity {
    /// The device id in the hub.
    pub device_id: String,
    /// How the device will authenticate to the hub.
    pub auth: HubAuth,
    /// An IoT Edge device.
    pub iot_edge: bool,
    /// Tags and desired properties for a new identity.
    pub initial_twin: Option<Value>,
}

/// How a device authenticates to its hub (the registry API's `authentication`).
#[derive(Clone, PartialEq, Eq)]
pub enum HubAuth {
    /// SAS tokens signed with these base64 keys (symmetric-key and TPM devices).
    Sas {
        /// Primary key.
        primary_key: String,
        /// Secondary key.
        secondary_key: String,
    },
    /// A client certificate with one of these SHA-1 thumbprints (hex; X.509 individual
    /// enrollments).
    SelfSigned {
        /// Primary thumbprint.
        primary_thumbprint: String,
        /// Secondary thumbprint.
        secondary_thumbprint: Option<String>,
    },
    /// A client certificate chaining to a CA the hub trusts (X.509 enrollment groups, and
    /// devices this server issued a certificate to).
    CertificateAuthority,
    /// No credentials (the hub's owner sets them).
    None,
}

impl std::fmt::Debug for HubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs; thumbprints are public but the variant is what matters.
        f.write_str(match self {
            HubAuth::Sas { .. } => "Sas",
            HubAuth::SelfSigned { .. } => "SelfSigned",
            HubAuth::CertificateAuthority => "CertificateAuthority",
            HubAuth::None => "None",
        })
    }
}

impl HubAuth {
    /// The registry API's `authentication` object (also sent by the webhook connector).
    fn to_json(&self) -> Value {
        match self {
            HubAuth::Sas {
                primary_key,
                secondary_key,
            } => json!({
                "type": "sas",
                "symmetricKey": { "primaryKey": primary_key, "secondaryKey": secondary_key },
            }),
            HubAuth::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => json!({
                "type": "selfSigned",
                "x509Thumbprint": {
                    "primaryThumbprint": primary_thumbprint,
                    "secondaryThumbprint": secondary_thumbprint,
                },
            }),
            HubAuth::CertificateAuthority => json!({ "type": "certificateAuthority" }),
            HubAuth::None => json!({ "type": "none" }),
        }
    }
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device_id", &self.device_id)
            .field("iot_edge", &self.iot_edge)
            .finish_non_exhaustive()
    }
}

/// Why a hub could not be updated. Messages carry no keys, no URL query and nothing the hub
/// answered.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub's connector settings are unusable.
    #[error("hub '{0}': {1}")]
    Config(String, String),
    /// The hub could not be reached (or may not be).
    #[error("hub '{0}': {1}")]
    Unreachable(String, OutboundError),
    /// The hub answered with an error.
    #[error("hub '{0}' answered HTTP {1}")]
    Refused(String, u16),
    /// The hub answered something that is not what was asked for.
    #[error("hub '{0}' answered HTTP {1} with {2}")]
    Unexpected(String, u16, &'static str),
}

/// How connectors reach hubs: the outbound client, and the signer of webhook requests.
#[derive(Debug, Clone)]
pub struct Connectors {
    /// The client of every call.
    pub outbound: Outbound,
    /// Signs the webhook connector's requests, when configured.
    pub signer: Option<WebhookSigner>,
}

/// Hubs that failed recently, and until when they count as unhealthy.
#[derive(Debug)]
pub struct HubHealth {
    down_until: Mutex<HashMap<String, Instant>>,
    cool_down: Duration,
}

impl HubHealth {
    /// Health tracking where a failure counts for `cool_down`.
    pub fn new(cool_down: Duration) -> Self {
        Self {
            down_until: Mutex::new(HashMap::new()),
            cool_down,
        }
    }

    /// Whether the hub is believed to be up.
    pub fn is_healthy(&self, host: &str) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.get(&host.to_ascii_lowercase())
            .is_none_or(|until| Instant::now() >= *until)
    }

    /// Records a failure of the hub.
    pub fn mark_failed(&self, host: &str) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.insert(host.to_ascii_lowercase(), Instant::now() + self.cool_down);
    }

    /// Records a success of the hub.
    pub fn mark_healthy(&self, host: &str) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.remove(&host.to_ascii_lowercase());
    }
}

fn connector(hub: &LinkedHub) -> &HubConnector {
    hub.connector.as_ref().unwrap_or(&HubConnector::None)
}

/// Whether creating, reading and removing identities in `hub` stays inside this process (the
/// `none` connector): nothing to wait for.
pub fn is_local(hub: &LinkedHub) -> bool {
    matches!(connector(hub), HubConnector::None)
}

impl Connectors {
    /// Sends `request` to `hub` and reads the answer.
    async fn send(
        &self,
        hub: &str,
        request: RequestBuilder,
    ) -> Result<dps_outbound::Answer, HubError> {
        self.outbound
            .send(request)
            .await
            .map_err(|e| HubError::Unreachable(hub.to_owned(), e))
    }

    /// A request to `url` for `hub`.
    fn request(&self, hub: &str, method: Method, url: &str) -> Result<RequestBuilder, HubError> {
        self.outbound
            .request(method, url)
            .map_err(|e| HubError::Unreachable(hub.to_owned(), e))
    }

    /// POSTs `body` to the webhook connector at `url`, signed when a key is configured.
    async fn post_webhook(&self, hub: &str, url: &str, body: &Value) -> Result<(), HubError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| HubError::Config(hub.to_owned(), e.to_string()))?;
        let request = self
            .request(hub, Method::POST, url)?
            .header("content-type", "application/json")
            .body(bytes.clone());
        let request = dps_outbound::maybe_sign(self.signer.as_ref(), request, &bytes);
        success(hub, self.send(hub, request).await?)
    }
}

/// Creates or updates the device's identity in `hub`.
pub async fn upsert(
    connectors: &Connectors,
    hub: &LinkedHub,
    identity: &DeviceIdentity,
) -> Result<(), HubError> {
    match connector(hub) {
        HubConnector::None => Ok(()),
        HubConnector::Webhook { url } => {
            let body = json!({
                "operation": "upsert",
                "hubHostName": hub.host_name,
                "deviceId": identity.device_id,
                "authentication": identity.auth.to_json(),
                "capabilities": { "iotEdge": identity.iot_edge },
                "initialTwin": identity.initial_twin,
            });
            connectors.post_webhook(&hub.host_name, url, &body).await
        }
        HubConnector::AzureIotHub { .. } => {
            let registry = Registry::of(connectors, hub)?;
            registry.put_device(identity).await?;
            if let Some(twin) = &identity.initial_twin
                && let Err(e) = registry.patch_twin(&identity.device_id, twin).await
            {
                // Leave no half-made identity behind.
                if let Err(cleanup) = registry.delete_device(&identity.device_id).await {
                    tracing::warn!(hub = %hub.host_name, error = %cleanup, "could not remove a half-created device");
                }
                return Err(e);
            }
            Ok(())
        }
    }
}

/// Removes the device from `hub` (when it moves elsewhere, or after a failed create). A device
/// that is already gone counts as removed.
pub async fn remove(
    connectors: &Connectors,
    hub: &LinkedHub,
    device_id: &str,
) -> Result<(), HubError> {
    match connector(hub) {
        HubConnector::None => Ok(()),
        HubConnector::Webhook { url } => {
            let body = json!({ "operation": "delete", "hubHostName": hub.host_name, "deviceId": device_id });
            connectors.post_webhook(&hub.host_name, url, &body).await
        }
        HubConnector::AzureIotHub { .. } => {
            Registry::of(connectors, hub)?
                .delete_device(device_id)
                .await
        }
    }
}

/// The device's twin in `hub` (tags and desired properties), for migrating it to another hub.
/// `None` when the connector keeps no twins (`none`, `webhook`) or the device has none.
pub async fn read_twin(
    connectors: &Connectors,
    hub: &LinkedHub,
    device_id: &str,
) -> Result<Option<Value>, HubError> {
    if !matches!(connector(hub), HubConnector::AzureIotHub { .. }) {
        return Ok(None);
    }
    let registry = Registry::of(connectors, hub)?;
    let request = registry.request(Method::GET, &registry.url("twins", device_id))?;
    let answer = connectors.send(&hub.host_name, request).await?;
    if answer.status == dps_outbound::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let status = answer.status.as_u16();
    if !answer.status.is_success() {
        return Err(HubError::Refused(hub.host_name.clone(), status));
    }
    let twin: Value = serde_json::from_slice(&answer.body).map_err(|_| {
        HubError::Unexpected(hub.host_name.clone(), status, "a twin that is not JSON")
    })?;
    // Only what a new identity can be given: tags and desired properties, without the hub's
    // own bookkeeping ($metadata, $version).
    let mut desired = twin
        .pointer("/properties/desired")
        .cloned()
        .unwrap_or(Value::Null);
    if let Some(map) = desired.as_object_mut() {
        map.retain(|key, _| !key.starts_with('$'));
    }
    Ok(Some(json!({
        "tags": twin.get("tags").cloned().unwrap_or(Value::Null),
        "properties": { "desired": desired },
    })))
}

/// Whether the hub accepted: a 2xx. Only the status is kept.
fn success(hub: &str, answer: dps_outbound::Answer) -> Result<(), HubError> {
    if answer.status.is_success() {
        Ok(())
    } else {
        Err(HubError::Refused(hub.to_owned(), answer.status.as_u16()))
    }
}

/// The IoT Hub registry API of one hub.
struct Registry<'a> {
    connectors: &'a Connectors,
    hub: &'a str,
    base: String,
    credentials: ConnectionString,
}

impl<'a> Registry<'a> {
    /// The registry API of a hub whose connector is `azure-iot-hub`.
    fn of(connectors: &'a Connectors, hub: &'a LinkedHub) -> Result<Self, HubError> {
        let config = |m: String| HubError::Config(hub.host_name.clone(), m);
        let HubConnector::AzureIotHub {
            connection_string,
            endpoint,
        } = connector(hub)
        else {
            return Err(config("the hub's connector is not azure-iot-hub".into()));
        };
        let (connection_string, endpoint) = (connection_string.as_deref(), endpoint.as_deref());
        let credentials = ConnectionString::parse(connection_string.unwrap_or_default())
            .map_err(|e| config(e.to_string()))?;
        let base = endpoint
            .map(str::to_owned)
            .unwrap_or_else(|| format!("https://{}", credentials.host_name));
        Ok(Self {
            connectors,
            hub: &hub.host_name,
            base: base.trim_end_matches('/').to_owned(),
            credentials,
        })
    }

    fn token(&self) -> String {
        let expiry = SystemTime::now()
            .checked_add(HUB_TOKEN_LIFETIME)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        sign(
            &encode_uri_component(&self.credentials.host_name),
            &self.credentials.key,
            expiry,
            Some(&self.credentials.key_name),
        )
    }

    fn url(&self, collection: &str, device_id: &str) -> String {
        format!(
            "{}/{collection}/{}?api-version={IOT_HUB_API_VERSION}",
            self.base,
            encode_uri_component(device_id)
        )
    }

    /// A signed request to the registry.
    fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, HubError> {
        Ok(self
            .connectors
            .request(self.hub, method, url)?
            .header("Authorization", self.token()))
    }

    fn json(request: RequestBuilder, body: &Value) -> RequestBuilder {
        request
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    /// Creates the device; when it exists, replaces it.
    async fn put_device(&self, identity: &DeviceIdentity) -> Result<(), HubError> {
        let body = json!({
            "deviceId": identity.device_id,
            "status": "enabled",
            "authentication": identity.auth.to_json(),
            "capabilities": { "iotEdge": identity.iot_edge },
        });
        let url = self.url("devices", &identity.device_id);
        let created = self
            .connectors
            .send(
                self.hub,
                Self::json(self.request(Method::PUT, &url)?, &body),
            )
            .await?;
        if created.status != dps_outbound::StatusCode::CONFLICT {
            return success(self.hub, created);
        }
        let update = self.request(Method::PUT, &url)?.header("If-Match", "*");
        let updated = self
            .connectors
            .send(self.hub, Self::json(update, &body))
            .await?;
        success(self.hub, updated)
    }

    async fn patch_twin(&self, device_id: &str, twin: &Value) -> Result<(), HubError> {
        let patch = self
            .request(Method::PATCH, &self.url("twins", device_id))?
            .header("If-Match", "*");
        let answer = self
            .connectors
            .send(self.hub, Self::json(patch, twin))
            .await?;
        success(self.hub, answer)
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        let delete = self
            .request(Method::DELETE, &self.url("devices", device_id))?
            .header("If-Match", "*");
        let answer = self.connectors.send(self.hub, delete).await?;
        if answer.status == dps_outbound::StatusCode::NOT_FOUND {
            return Ok(());
        }
        success(self.hub, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication_has_the_registry_api_shapes() {
        let sas = HubAuth::Sas {
            primary_key: "cA==".into(),
            secondary_key: "cw==".into(),
        };
        assert_eq!(
            sas.to_json(),
            json!({ "type": "sas", "symmetricKey": { "primaryKey": "cA==", "secondaryKey": "cw==" } })
        );
        let thumbprint = HubAuth::SelfSigned {
            primary_thumbprint: "AB12".into(),
            secondary_thumbprint: None,
        };
        assert_eq!(
            thumbprint.to_json(),
            json!({ "type": "selfSigned",
                "x509Thumbprint": { "primaryThumbprint": "AB12", "secondaryThumbprint": null } })
        );
        assert_eq!(
            HubAuth::CertificateAuthority.to_json(),
            json!({ "type": "certificateAuthority" })
        );
        assert_eq!(HubAuth::None.to_json(), json!({ "type": "none" }));
    }
}
