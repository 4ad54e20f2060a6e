//! Our admin API extensions: what Azure keeps in its control plane (instances, linked hubs,
//! shared access policies). Same JSON conventions as the Azure part: camelCase, etags.

use serde::{Deserialize, Serialize};

/// A provisioning service instance (an Azure "DPS resource").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Unique name.
    pub name: String,
    /// What devices send to select this instance; generated when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_scope: Option<String>,
    /// Host names admins use for this instance (the connection string's `HostName`). Requests
    /// whose Host matches one of them are served by this instance.
    #[serde(default)]
    pub host_names: Vec<String>,
    /// Policy for enrollments that name none; `hashed` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_allocation_policy: Option<String>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Set by the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Set by the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Only in the answer to a create: the generated owner policy, with its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_policy: Option<AccessPolicy>,
}

/// A hub instance devices can be assigned to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHub {
    /// What devices are told to connect to.
    pub host_name: String,
    /// Region name used by latency-based allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Latitude in degrees, -90 to 90.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    /// Longitude in degrees, -180 to 180.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
    /// 1 to 1000; 1 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_weight: Option<u32>,
    /// Whether policies may choose this hub on their own; true when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_allocation_policy: Option<bool>,
    /// How device identities are created in the hub; `none` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<HubConnector>,
    /// Read-only: devices assigned to this hub now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_count: Option<u64>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// How the service creates device identities in a hub. Secrets are hidden on reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HubConnector {
    /// Record the assignment only.
    None,
    /// The IoT Hub registry REST API with a SAS policy key.
    #[serde(rename_all = "camelCase")]
    AzureIotHub {
        /// `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`; hidden on reads.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_string: Option<String>,
        /// Base URL of the registry API when it is not `https://{HostName}` (a proxy, an
        /// emulator).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
    /// POST the device identity to an HTTPS endpoint.
    #[serde(rename_all = "camelCase")]
    Webhook {
        /// The endpoint.
        url: String,
    },
}

/// One right a shared access policy can grant (the Azure names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Right {
    /// Instances, linked hubs, access policies.
    ServiceConfig,
    /// Read enrollments and groups.
    EnrollmentRead,
    /// Change enrollments and groups, and read their keys.
    EnrollmentWrite,
    /// Device connect (kept for compatibility; devices use their own credentials).
    DeviceConnect,
    /// Read registration states.
    RegistrationStatusRead,
    /// Delete registration states.
    RegistrationStatusWrite,
}

impl Right {
    /// Every right, in a stable order.
    pub const ALL: [Right; 6] = [
        Right::ServiceConfig,
        Right::EnrollmentRead,
        Right::EnrollmentWrite,
        Right::DeviceConnect,
        Right::RegistrationStatusRead,
        Right::RegistrationStatusWrite,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::ServiceConfig => "ServiceConfig",
            Right::EnrollmentRead => "EnrollmentRead",
            Right::EnrollmentWrite => "EnrollmentWrite",
            Right::DeviceConnect => "DeviceConnect",
            Right::RegistrationStatusRead => "RegistrationStatusRead",
            Right::RegistrationStatusWrite => "RegistrationStatusWrite",
        }
    }

    /// Parses a right, ignoring case.
    pub fn parse(value: &str) -> Option<Right> {
        Right::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(value))
    }
}

/// A shared access policy: a key name, two keys and the rights a token signed with them has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    /// The `SharedAccessKeyName`.
    pub key_name: String,
    /// Rights by their Azure names (`ServiceConfig`, `EnrollmentRead`, ...).
    #[serde(default)]
    pub rights: Vec<String>,
    /// Base64 key; generated when omitted, hidden on reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Base64 key; generated when omitted, hidden on reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// An owner of devices, for the `ownership` allocation policy: its devices go to its hubs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Owner {
    /// Unique name (a customer, a tenant).
    pub name: String,
    /// Host names of the linked hubs its devices go to.
    pub hubs: Vec<String>,
    /// Read-only: devices with an ownership record naming this owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_count: Option<u64>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// One ownership record: a device, named by exactly one of its identities, and its owner.
/// Imports also accept rows that name a device by several identities at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnershipRecord {
    /// The device.
    #[serde(flatten)]
    pub device: DeviceName,
    /// The owner's name.
    pub owner: String,
    /// Read-only: opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Read-only: when the record was last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
}

/// `POST /ownershipRecords:transfer`: devices owned by `from` now belong to `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnershipTransfer {
    /// The current owner of every listed device.
    pub from: String,
    /// The new owner.
    pub to: String,
    /// The devices, each named like an ownership record (without `owner`).
    pub devices: Vec<DeviceName>,
}

/// A device named by one of its identities.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceName {
    /// The device's registration id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// The serial number of the device's X.509 certificate, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// SHA-256 of the device's TPM endorsement key, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_hash: Option<String>,
}

/// A CA certificate of an instance, for enrollment groups' `caReferences`. It counts only once
/// verified: proof that the uploader holds its private key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaCertificate {
    /// Unique name, used in `caReferences`.
    pub name: String,
    /// PEM or base64 DER; only in requests, never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Read-only: what the certificate says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<crate::enrollment::X509CertificateInfo>,
    /// Read-only: whether proof of possession succeeded.
    #[serde(default)]
    pub is_verified: bool,
    /// Read-only: the code the verification certificate's CN must carry (shown once by
    /// `generateVerificationCode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// An operational certificate the service issued to a device for its certificate signing
/// request (read-only; an admin can revoke it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// Upper-case hex, without leading zeros.
    pub serial_number: String,
    /// The device it was issued to (its subject CN).
    pub registration_id: String,
    /// Upper-case hex SHA-256 of the certificate's DER.
    pub sha256_thumbprint: String,
    /// The credential policy it was issued under.
    pub credential_policy_name: String,
    /// The issuing CA: a configured one's name, or the instance's (`/certificateAuthorities`).
    pub certificate_authority_name: String,
    /// Start of validity, RFC 3339 UTC.
    pub not_before: String,
    /// End of validity, RFC 3339 UTC; the record is deleted after it.
    pub not_after: String,
    /// When it was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_date_time_utc: Option<String>,
    /// When it was revoked; it no longer admits its device from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_date_time_utc: Option<String>,
    /// Why, as the admin said when revoking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<String>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// The body of `POST /issuedCertificates/{serialNumber}/revoke` (optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    /// Why (at most 256 characters, kept with the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An issuing CA of an instance (`/certificateAuthorities/{name}`): a certificate chain and
/// the key that signs for it, used in place in a PKCS#11 token or read from a file on the
/// server. Credential policies name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateAuthority {
    /// Unique name, used in credential policies.
    pub name: String,
    /// PEM: its own certificate first, then up to its root (what devices receive after their
    /// new certificate). Absent while the CA waits for its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_chain: Option<String>,
    /// Where its private key is.
    pub key: CaKey,
    /// Write-only: generate the key inside the token `key.pkcs11Uri` names, of this type
    /// (`ecP256`, `ecP384`, `rsa2048`, `rsa3072`); refused when the token holds it already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_key: Option<String>,
    /// Write-only: with `generateKey` and no chain, certify the new key itself (a root CA,
    /// `CN=<name>`, ten years); without it the CA waits for its chain, and the answer carries
    /// a `certificateSigningRequest` for the operator's CA to sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<bool>,
    /// Read-only: what its certificate says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<crate::enrollment::X509CertificateInfo>,
    /// Read-only: `active`, or `pendingCertificate` until a chain is PUT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Read-only, while pending: base64 DER PKCS#10 request of the key, `CN=<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_signing_request: Option<String>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Where an issuing CA's private key is: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaKey {
    /// RFC 7512 URI of a key in a PKCS#11 token (its PIN by `pin-source`; its module one the
    /// server allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11_uri: Option<String>,
    /// Path of a PKCS#8 PEM file inside the server's `issuance.key_directory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// What an instance's credential policy issues (`/credentialPolicies/{name}`): enrollments
/// name it in `credentialPolicyName`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialPolicy {
    /// Unique name.
    pub name: String,
    /// The issuing CA (`/certificateAuthorities/{name}` of the same instance).
    pub certificate_authority_name: String,
    /// Validity of an issued certificate, 1 to 3650 days (30 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_in_days: Option<u32>,
    /// Key types devices may ask for: `ecP256`, `ecP384`, `rsa2048`, `rsa3072`.
    pub key_types: Vec<String>,
    /// DNS names for every certificate's subjectAltName.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Opaque version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Something that happened to a device (`GET /events`): a registration's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Unique, in time order (the paging key).
    #[serde(default)]
    pub id: String,
    /// `registration.assigned`, `registration.moved`, `registration.failed` or
    /// `registration.disabled`.
    pub kind: String,
    /// When it happened, RFC 3339 UTC.
    #[serde(default)]
    pub time: String,
    /// The device.
    pub registration_id: String,
    /// The operation that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// The individual enrollment it came through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_id: Option<String>,
    /// The enrollment group it came through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// `symmetricKey`, `x509` or `tpm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_type: Option<String>,
    /// `https`, or `mqtt` (over TLS or a WebSocket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The hub it is assigned to (assigned, moved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// The hub it was assigned to before (moved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_hub: Option<String>,
    /// `initialAssignment`, `deviceDataMigrated`, ... (assigned, moved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    /// Why it failed or was disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
    /// Why it failed or was disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// One admin write or key read (`GET /auditLog`), recorded in the transaction of the change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Unique, in time order (the paging key).
    #[serde(default)]
    pub id: String,
    /// When, RFC 3339 UTC.
    #[serde(default)]
    pub time: String,
    /// `create`, `update`, `delete` or `readKeys`.
    pub action: String,
    /// What was changed: `enrollment`, `enrollment-group`, `registration`, `access-policy`,
    /// `linked-hub`, `instance`, ...
    pub resource_kind: String,
    /// Its id (case-folded as it is stored).
    pub resource_id: String,
    /// The shared access policy whose key signed the request.
    pub policy: String,
    /// The instance that policy belongs to (the admin instance for server-wide routes).
    pub policy_instance: String,
    /// The request's id (`x-ms-request-id` of its answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// What changed, field by field (dotted paths); secrets are shown as `***`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<AuditChange>,
}

/// One field an admin write changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditChange {
    /// Dotted path of the field (`attestation.symmetricKey.primaryKey`, `iotHubs`).
    pub field: String,
    /// Its value before; absent when it had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<serde_json::Value>,
    /// Its value after; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<serde_json::Value>,
}
