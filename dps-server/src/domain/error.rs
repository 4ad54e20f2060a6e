//! The error of every domain rule: an Azure error code (which carries its HTTP status), a
//! message for the client, and facts such as the field at fault. Internal details go to the
//! log, never into the message. The HTTP edge turns it into the Azure error body in one place
//! (`crate::http::error`).

use std::collections::BTreeMap;

use dps_protocol::ErrorCode;

use crate::store::{Kind, StoreError, Unique};

/// An error answer.
#[derive(Debug)]
pub struct DomainError {
    code: ErrorCode,
    message: String,
    info: BTreeMap<String, String>,
}

impl DomainError {
    /// An error with a code and a message for the client.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            info: BTreeMap::new(),
        }
    }

    /// 400 ArgumentInvalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    /// 401 Unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 401 for a device whose proof failed, whose id is unknown, or whose ID scope names no
    /// instance: one answer for all, so a caller learns nothing about which ids or scopes exist.
    pub fn device_denied() -> Self {
        Self::unauthorized("the device could not be authenticated")
    }

    /// Adds a fact to `info` (for example the field that failed).
    pub fn with_info(mut self, key: &str, value: impl Into<String>) -> Self {
        self.info.insert(key.to_owned(), value.into());
        self
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// Facts beside the message (for example the field that failed).
    pub fn info(&self) -> &BTreeMap<String, String> {
        &self.info
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A 500 whose cause is logged but not shown.
    pub fn internal(context: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "{context}");
        Self::new(
            ErrorCode::InternalServerError,
            "internal error; the server log has the details under this trackingId",
        )
    }
}

impl From<StoreError> for DomainError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Exists { kind, key } => Self::new(
                ErrorCode::Conflict,
                format!(
                    "{} '{key}' already exists; send If-Match with its etag, or '*', to replace it",
                    noun(kind)
                ),
            ),
            StoreError::EtagMismatch { kind, key } => Self::new(
                ErrorCode::PreconditionFailed,
                format!("{} '{key}' has a different etag than If-Match", noun(kind)),
            ),
            StoreError::NotFound { kind, key } | StoreError::Missing { kind, key } => {
                not_found(kind, &key)
            }
            StoreError::Taken { what, value } => Self::new(
                ErrorCode::Conflict,
                match what {
                    Unique::IdScope => format!("ID scope '{value}' belongs to another instance"),
                    Unique::HostName => format!("host name '{value}' belongs to another instance"),
                    Unique::TpmGroup => format!(
                        "enrollment group '{value}' cannot be a TPM group: the instance has one already, and there can be one"
                    ),
                },
            ),
            StoreError::InUse { kind, key } => Self::new(
                ErrorCode::ConflictWithState,
                format!("{} '{key}' is still referred to", noun(kind)),
            ),
            StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => {
                tracing::error!(error = %error, "database unavailable");
                Self::new(ErrorCode::ServiceUnavailable, "the database is unavailable")
            }
            other => Self::internal("storage failed", &other),
        }
    }
}

/// The 404 for a missing document of `kind`.
pub fn not_found(kind: Kind, key: &str) -> DomainError {
    let code = match kind {
        Kind::Instance => ErrorCode::InstanceNotFound,
        Kind::AccessPolicy => ErrorCode::AccessPolicyNotFound,
        Kind::LinkedHub => ErrorCode::LinkedHubNotFound,
        Kind::IndividualEnrollment => ErrorCode::EnrollmentNotFound,
        Kind::EnrollmentGroup => ErrorCode::EnrollmentGroupNotFound,
        Kind::RegistrationState => ErrorCode::RegistrationNotFound,
        Kind::Operation => ErrorCode::OperationNotFound,
        Kind::Owner => ErrorCode::OwnerNotFound,
        Kind::OwnershipRecord => ErrorCode::OwnershipRecordNotFound,
        Kind::CaCertificate => ErrorCode::CertificateNotFound,
        Kind::IssuedCertificate | Kind::RevokedCertificate => ErrorCode::IssuedCertificateNotFound,
        Kind::CertificateAuthority => ErrorCode::CertificateAuthorityNotFound,
        Kind::Event | Kind::AuditEntry => ErrorCode::RouteNotFound,
        Kind::CredentialPolicy => ErrorCode::CredentialPolicyNotFound,
        // A missing challenge means the device has not proven anything yet.
        Kind::TpmChallenge => ErrorCode::Unauthorized,
        Kind::CredentialsVersion => ErrorCode::InternalServerError,
    };
    DomainError::new(code, format!("{} '{key}' does not exist", noun(kind)))
}

fn noun(kind: Kind) -> &'static str {
    match kind {
        Kind::Instance => "instance",
        Kind::AccessPolicy => "shared access policy",
        Kind::LinkedHub => "linked hub",
        Kind::IndividualEnrollment => "enrollment",
        Kind::EnrollmentGroup => "enrollment group",
        Kind::RegistrationState => "registration",
        Kind::Operation => "operation",
        Kind::Owner => "owner",
        Kind::OwnershipRecord => "ownership record",
        Kind::CaCertificate => "CA certificate",
        Kind::IssuedCertificate => "issued certificate",
        Kind::RevokedCertificate => "revoked certificate",
        Kind::CertificateAuthority => "issuing CA",
        Kind::Event => "event",
        Kind::AuditEntry => "audit entry",
        Kind::CredentialPolicy => "credential policy",
        Kind::TpmChallenge => "TPM challenge",
        Kind::CredentialsVersion => "credentials version",
    }
}
