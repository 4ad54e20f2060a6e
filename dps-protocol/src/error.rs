//! The error body every 4xx/5xx answer carries, and the error codes we use.

use serde::{Deserialize, Serialize};

/// `ProvisioningServiceErrorDetails`: the Azure DPS error body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Six-digit code: the HTTP status followed by three digits.
    pub error_code: u32,
    /// Correlates the answer with the server's log.
    #[serde(default)]
    pub tracking_id: String,
    /// What went wrong, for a person.
    pub message: String,
    /// When the error happened (RFC 3339, UTC).
    #[serde(default)]
    pub timestamp_utc: String,
    /// Extra facts (field names and the like).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub info: std::collections::BTreeMap<String, String>,
}

/// Every error code the service answers with. The first three digits are the HTTP status.
/// `docs/errors.md` lists them for users; keep the two in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A field failed validation.
    ArgumentInvalid,
    /// A required field is missing.
    ArgumentNull,
    /// The body is not well-formed JSON or has the wrong types.
    InvalidFormat,
    /// A route parameter (id in the path) is malformed.
    InvalidPathParameter,
    /// The body's id differs from the id in the path.
    IdMismatch,
    /// A header (paging, etag) is malformed.
    InvalidHeader,
    /// A bulk request holds too many items or an unknown mode.
    InvalidBulkOperation,
    /// A TPM endorsement or storage root key is malformed or not the standard template.
    InvalidTpmKey,
    /// No linked hub can take the device (the C SDK maps 400208 to "hub not specified").
    NoHubAvailable,
    /// A device's certificate signing request is malformed, too large, signed wrongly, for
    /// another subject, or asks for a key type or extension its credential policy does not
    /// allow (the registration fails).
    InvalidCertificateRequest,
    /// A device asked for a certificate that cannot be issued: its enrollment names no
    /// credential policy, or one this server does not have (the registration fails).
    CertificateNotIssued,
    /// No credentials, or credentials that do not verify.
    Unauthorized,
    /// The device's enrollment or group is disabled.
    EnrollmentDisabled,
    /// The credentials verify but lack the right this route needs.
    Forbidden,
    /// No route at this path.
    RouteNotFound,
    /// No instance for this host name, ID scope or name.
    InstanceNotFound,
    /// No such individual enrollment.
    EnrollmentNotFound,
    /// No such enrollment group.
    EnrollmentGroupNotFound,
    /// No such registration state.
    RegistrationNotFound,
    /// No such registration operation.
    OperationNotFound,
    /// No such linked hub.
    LinkedHubNotFound,
    /// No such shared access policy.
    AccessPolicyNotFound,
    /// No such owner.
    OwnerNotFound,
    /// No ownership record for this device.
    OwnershipRecordNotFound,
    /// No such CA certificate.
    CertificateNotFound,
    /// No such issued certificate.
    IssuedCertificateNotFound,
    /// No such issuing CA.
    CertificateAuthorityNotFound,
    /// No such credential policy.
    CredentialPolicyNotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The resource exists and the request did not say to overwrite it.
    Conflict,
    /// The change would leave the instance unusable (for example its last owner policy).
    ConflictWithState,
    /// The instance holds as many of these resources as a setting allows.
    LimitReached,
    /// The `If-Match` etag does not match.
    PreconditionFailed,
    /// The request (its body) did not arrive in time.
    RequestTimeout,
    /// The body is larger than the configured limit.
    PayloadTooLarge,
    /// Too many requests.
    Throttled,
    /// Something failed inside the server; the log has the details.
    InternalServerError,
    /// The server cannot reach its database.
    ServiceUnavailable,
}

impl ErrorCode {
    /// The six-digit number sent as `errorCode` and `x-ms-error-code`.
    pub fn number(self) -> u32 {
        match self {
            Self::ArgumentInvalid => 400004,
            Self::ArgumentNull => 400005,
            Self::InvalidFormat => 400006,
            Self::InvalidPathParameter => 400007,
            Self::IdMismatch => 400008,
            Self::InvalidHeader => 400009,
            Self::InvalidBulkOperation => 400010,
            Self::InvalidTpmKey => 400011,
            Self::NoHubAvailable => 400208,
            Self::InvalidCertificateRequest => 400209,
            Self::CertificateNotIssued => 400210,
            Self::Unauthorized => 401002,
            Self::EnrollmentDisabled => 403002,
            Self::Forbidden => 403001,
            Self::RouteNotFound => 404001,
            Self::InstanceNotFound => 404002,
            Self::EnrollmentNotFound => 404201,
            Self::EnrollmentGroupNotFound => 404202,
            Self::RegistrationNotFound => 404203,
            Self::OperationNotFound => 404206,
            Self::LinkedHubNotFound => 404204,
            Self::AccessPolicyNotFound => 404205,
            Self::OwnerNotFound => 404207,
            Self::OwnershipRecordNotFound => 404208,
            Self::CertificateNotFound => 404209,
            Self::IssuedCertificateNotFound => 404210,
            Self::CertificateAuthorityNotFound => 404211,
            Self::CredentialPolicyNotFound => 404212,
            Self::MethodNotAllowed => 405001,
            Self::Conflict => 409001,
            Self::ConflictWithState => 409002,
            Self::LimitReached => 409003,
            Self::PreconditionFailed => 412001,
            Self::RequestTimeout => 408001,
            Self::PayloadTooLarge => 413001,
            Self::Throttled => 429001,
            Self::InternalServerError => 500001,
            Self::ServiceUnavailable => 503001,
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        // The code's leading three digits are its status by construction.
        (self.number() / 1000) as u16
    }
}
