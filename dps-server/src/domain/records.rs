//! The documents a registration stores: its operation (what the device polls) and the
//! device's registration state. Device authentication writes and reads them too (a TPM
//! challenge names its enrollment; the SAS hint reads the group a device came through), so they
//! live apart from the state machine that moves them.

use dps_protocol::device::{OperationStatus, RegistrationOperationStatus};
use dps_protocol::enrollment::{DeviceRegistrationState, X509RegistrationResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which enrollment a registration came through (stored, so a resumed operation finds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "camelCase")]
pub enum EnrollmentRef {
    /// An individual enrollment (by registration id).
    Individual(String),
    /// An enrollment group (by group id).
    Group(String),
}

/// A registration attempt, polled by the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationRecord {
    /// What the device polls with.
    pub operation_id: String,
    /// The device, as it sent its id.
    pub registration_id: String,
    /// Where the attempt is.
    pub status: OperationStatus,
    /// The enrollment it came through.
    pub enrollment: EnrollmentRef,
    /// The payload the device sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
    /// The certificate chain issued for the device's certificate signing request when the
    /// operation started (base64 DER, the new certificate first), answered once it is assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
    /// The address the device registered from (an input of allocation policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<std::net::IpAddr>,
    /// How the device proved who it is (`symmetricKey`, `x509`, `tpm`), for its events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// How the device reached the service (`https`, or `mqtt` over TLS or a WebSocket), for
    /// its events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Trusted request metadata (location headers of a trusted edge).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// X.509 devices: the certificate they presented and the group certificate it reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// TPM devices: their hub key and the activation blob that carries it to their TPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmOperation>,
    /// The result, once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
}

/// What a TPM device's registration hands on: a fresh key for the hub, and the activation
/// blob that carries it into the device's TPM (`registrationState.tpm.authenticationKey`).
/// Made once when the operation starts, so a retried assignment gives the hub the same key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmOperation {
    /// Base64 activation blob.
    pub authentication_key: String,
    /// Base64 HMAC key inside it: the device's hub key.
    pub hub_key: String,
    /// SHA-256 of the EK's TPM2B_PUBLIC, hex (ownership records may name it).
    pub ek_hash: String,
}

impl OperationRecord {
    /// The answer to a poll of the operation once it finished.
    pub fn answer(&self) -> RegistrationOperationStatus {
        RegistrationOperationStatus {
            operation_id: self.operation_id.clone(),
            status: self.status,
            registration_state: self.registration_state.clone(),
        }
    }
}

/// A device's registration state as stored: the wire state plus what reprovisioning needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// What the admin API and the device see.
    #[serde(flatten)]
    pub state: DeviceRegistrationState,
    /// The hub of the first assignment (for `reprovisionedToInitialAssignment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_hub: Option<String>,
    /// The payload the device sent last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
}

/// The case-folded storage key of an operation id.
pub fn operation_key(operation_id: &str) -> String {
    operation_id.to_ascii_lowercase()
}
