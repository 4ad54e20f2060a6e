//! The device registration API (Azure DPS device API): what devices send and receive.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::enrollment::{DeviceRegistrationState, TpmAttestation};

/// `DeviceRegistration`: the body of `PUT .../register` and of the status lookup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// The registration id; the one in the URL is authoritative and must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// TPM keys (TPM attestation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// Any JSON object the device wants to pass to allocation (Python sends `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Base64 DER PKCS#10 request for an operational certificate (api-version
    /// 2025-07-01-preview), its subject CN the registration id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// The 401 answer to a TPM device's unauthenticated register: an activation blob whose key
/// the device signs its SAS token with, under the key name `registration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmChallenge {
    /// Base64 of the six TPM2B fields (reference section 2.4).
    pub authentication_key: String,
    /// The `skn` the device puts in its token (the C SDK requires the field).
    pub key_name: String,
}

/// The status of a registration operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OperationStatus {
    /// Not assigned (TPM challenge only).
    Unassigned,
    /// In progress.
    Assigning,
    /// Done: the device has a hub.
    Assigned,
    /// Done: no hub; see the error.
    Failed,
    /// Done: the enrollment is disabled.
    Disabled,
}

impl OperationStatus {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unassigned => "unassigned",
            Self::Assigning => "assigning",
            Self::Assigned => "assigned",
            Self::Failed => "failed",
            Self::Disabled => "disabled",
        }
    }

    /// Whether the operation has finished.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Unassigned | Self::Assigning)
    }
}

/// `RegistrationOperationStatus`: the answer to register and to operation polls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// What the device polls with.
    pub operation_id: String,
    /// Where the operation is.
    pub status: OperationStatus,
    /// The registration's state (absent only in the register answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
}
