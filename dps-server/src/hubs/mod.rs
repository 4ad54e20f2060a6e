//! Hub connectors: how a device's identity is created in, and removed from, the hub it is
//! assigned to. This release has the `none` connector (record the assignment only); a hub
//! configured with a connector this release cannot drive fails the registration with a clear
//! error instead of pretending the identity exists.

use dps_protocol::admin::{HubConnector, LinkedHub};
use serde_json::Value;

/// What a hub needs to know about a device.
#[derive(Clone)]
pub struct DeviceIdentity {
    /// The device id in the hub.
    pub device_id: String,
    /// Base64 SAS keys the device will use with the hub.
    pub symmetric_keys: Option<(String, String)>,
    /// An IoT Edge device.
    pub iot_edge: bool,
    /// Tags and desired properties for a new identity.
    pub initial_twin: Option<Value>,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device_id", &self.device_id)
            .field("iot_edge", &self.iot_edge)
            .finish_non_exhaustive()
    }
}

/// Why a hub could not be updated.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub's connector type is not available in this release.
    #[error("hub '{hub}' uses the '{kind}' connector, which this server version does not support")]
    Unsupported {
        /// The hub.
        hub: String,
        /// The connector type.
        kind: &'static str,
    },
}

/// Creates or updates the device's identity in `hub`.
pub async fn upsert(hub: &LinkedHub, identity: &DeviceIdentity) -> Result<(), HubError> {
    match hub.connector.as_ref().unwrap_or(&HubConnector::None) {
        HubConnector::None => {
            tracing::debug!(hub = %hub.host_name, device = %identity.device_id, "assignment recorded (connector none)");
            Ok(())
        }
        other => Err(unsupported(hub, other)),
    }
}

/// Removes the device from `hub` (when it moves elsewhere).
pub async fn remove(hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
    match hub.connector.as_ref().unwrap_or(&HubConnector::None) {
        HubConnector::None => {
            tracing::debug!(hub = %hub.host_name, device = %device_id, "removal recorded (connector none)");
            Ok(())
        }
        other => Err(unsupported(hub, other)),
    }
}

fn unsupported(hub: &LinkedHub, connector: &HubConnector) -> HubError {
    HubError::Unsupported {
        hub: hub.host_name.clone(),
        kind: match connector {
            HubConnector::None => "none",
            HubConnector::AzureIotHub { .. } => "azure-iot-hub",
            HubConnector::Webhook { .. } => "webhook",
        },
    }
}
