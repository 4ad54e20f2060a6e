//! Hub connectors: how a device's identity is created in, and removed from, the hub it is
//! assigned to.
//!
//! - `none`: the assignment is recorded; nothing is created.
//! - `webhook`: the identity is POSTed to an HTTPS endpoint (`{"operation": "upsert" | "delete",
//!   ...}`), which must answer 2xx.
//! - `azure-iot-hub`: the hub's registry REST API with a shared access policy key: the device
//!   is created (or updated when it exists) with SAS or X.509 authentication, then its initial twin is
//!   applied; when the twin fails the device is deleted again, so nothing is left half made.
//!
//! A hub whose connector fails is marked unhealthy for a while ([`HubHealth`]), so that later
//! registrations try the next ranked hub first.

pub mod probe;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attestation::ConnectionString;
use attestation::sas::{encode_uri_component, sign};
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
    /// A client certificate chaining to a CA the hub trusts (X.509 enrollment groups).
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

/// Why a hub could not be updated. Messages carry no keys.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub's connector settings are unusable.
    #[error("hub '{0}': {1}")]
    Config(String, String),
    /// The hub could not be reached.
    #[error("hub '{0}' is unreachable: {1}")]
    Unreachable(String, String),
    /// The hub answered with an error.
    #[error("hub '{0}' answered HTTP {1}: {2}")]
    Refused(String, u16, String),
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

/// The HTTPS client connectors use (system roots, 10-second timeout).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

fn connector(hub: &LinkedHub) -> &HubConnector {
    hub.connector.as_ref().unwrap_or(&HubConnector::None)
}

/// Creates or updates the device's identity in `hub`.
pub async fn upsert(
    client: &reqwest::Client,
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
            expect_success(&hub.host_name, client.post(url).json(&body).send().await).await
        }
        HubConnector::AzureIotHub { .. } => {
            let registry = Registry::of(client, hub)?;
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
    client: &reqwest::Client,
    hub: &LinkedHub,
    device_id: &str,
) -> Result<(), HubError> {
    match connector(hub) {
        HubConnector::None => Ok(()),
        HubConnector::Webhook { url } => {
            let body = json!({ "operation": "delete", "hubHostName": hub.host_name, "deviceId": device_id });
            expect_success(&hub.host_name, client.post(url).json(&body).send().await).await
        }
        HubConnector::AzureIotHub { .. } => {
            Registry::of(client, hub)?.delete_device(device_id).await
        }
    }
}

/// The device's twin in `hub` (tags and desired properties), for migrating it to another hub.
/// `None` when the connector keeps no twins (`none`, `webhook`) or the device has none.
pub async fn read_twin(
    client: &reqwest::Client,
    hub: &LinkedHub,
    device_id: &str,
) -> Result<Option<Value>, HubError> {
    if !matches!(connector(hub), HubConnector::AzureIotHub { .. }) {
        return Ok(None);
    }
    let registry = Registry::of(client, hub)?;
    let response = client
        .get(registry.url("twins", device_id))
        .header("Authorization", registry.token())
        .send()
        .await
        .map_err(|e| HubError::Unreachable(hub.host_name.clone(), e.to_string()))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(HubError::Refused(
            hub.host_name.clone(),
            status.as_u16(),
            text.chars().take(300).collect(),
        ));
    }
    let twin: Value = serde_json::from_str(&text).map_err(|e| {
        HubError::Refused(
            hub.host_name.clone(),
            status.as_u16(),
            format!("the twin is not JSON: {e}"),
        )
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

async fn expect_success(
    hub: &str,
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<(), HubError> {
    let response = sent.map_err(|e| HubError::Unreachable(hub.to_owned(), e.to_string()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    Err(HubError::Refused(hub.to_owned(), status.as_u16(), text))
}

/// The IoT Hub registry API of one hub.
struct Registry<'a> {
    client: &'a reqwest::Client,
    hub: &'a str,
    base: String,
    credentials: ConnectionString,
}

impl<'a> Registry<'a> {
    /// The registry API of a hub whose connector is `azure-iot-hub`.
    fn of(client: &'a reqwest::Client, hub: &'a LinkedHub) -> Result<Self, HubError> {
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
            client,
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
            .client
            .put(&url)
            .header("Authorization", self.token())
            .json(&body)
            .send()
            .await
            .map_err(|e| HubError::Unreachable(self.hub.to_owned(), e.to_string()))?;
        if created.status() != reqwest::StatusCode::CONFLICT {
            return expect_success(self.hub, Ok(created)).await;
        }
        let updated = self
            .client
            .put(&url)
            .header("Authorization", self.token())
            .header("If-Match", "*")
            .json(&body)
            .send()
            .await;
        expect_success(self.hub, updated).await
    }

    async fn patch_twin(&self, device_id: &str, twin: &Value) -> Result<(), HubError> {
        let sent = self
            .client
            .patch(self.url("twins", device_id))
            .header("Authorization", self.token())
            .header("If-Match", "*")
            .json(twin)
            .send()
            .await;
        expect_success(self.hub, sent).await
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        let sent = self
            .client
            .delete(self.url("devices", device_id))
            .header("Authorization", self.token())
            .header("If-Match", "*")
            .send()
            .await
            .map_err(|e| HubError::Unreachable(self.hub.to_owned(), e.to_string()))?;
        if sent.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        expect_success(self.hub, Ok(sent)).await
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
