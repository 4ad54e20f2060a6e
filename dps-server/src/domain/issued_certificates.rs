//! The records of issued operational certificates: written with the operation that issued
//! them, listed (all, or a device's), read and revoked by admins; a revoked certificate no
//! longer admits its device through X.509 attestation.

use attestation::x509::CertificateFacts;
use dps_protocol::ErrorCode;
use dps_protocol::admin::IssuedCertificate;
use dps_protocol::ids::RegistrationId;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{DomainError, load, to_doc};
use crate::domain::credentials;
use crate::domain::issuance::Issued;
use crate::domain::validate::normal_serial;
use crate::state::AppState;
use crate::store::{Columns, Kind, Page, Precondition, StoreError, Stored, Write};
use crate::trust::Credentials;

/// The longest revocation reason kept.
const MAX_REASON_CHARS: usize = 256;

/// A stored record with its etag and issue time.
pub fn render(stored: &Stored) -> Result<IssuedCertificate, DomainError> {
    let mut record: IssuedCertificate = stored.doc_json()?;
    record.etag = Some(stored.etag.clone());
    record.issued_date_time_utc = Some(stored.created.clone());
    Ok(record)
}

/// The key of a serial number as an admin or a certificate writes it (hex, any case, with or
/// without colons and leading zeros).
pub fn serial_key(serial: &str) -> Result<String, DomainError> {
    normal_serial(serial)
        .map(|s| s.to_ascii_lowercase())
        .ok_or_else(|| {
            DomainError::new(
                ErrorCode::InvalidPathParameter,
                "a serial number is hex digits, any case, with optional ':' or ' ' separators",
            )
        })
}

/// The write that records `issued` in instance `ns`, in the transaction of the operation that
/// issued it (a certificate is never handed out unrecorded).
pub fn record(ns: &str, issued: &Issued) -> Result<Write, DomainError> {
    Ok(Write::Put {
        ns: ns.to_owned(),
        kind: Kind::IssuedCertificate,
        key: serial_key(&issued.record.serial_number)?,
        columns: Columns::Issued {
            registration: issued.record.registration_id.to_ascii_lowercase(),
            expires_at: issued.expires_at,
        },
        doc: to_doc(&issued.record)?,
        precondition: Precondition::MustNotExist,
        etag: None,
    })
}

/// A page of the records, all of them or those of device `registration_id`, after `after`.
pub async fn list(
    state: &AppState,
    ns: &str,
    registration_id: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Stored>, DomainError> {
    let device = registration_id
        .map(|id| {
            RegistrationId::parse(id)
                .map(|r| r.key())
                .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
        })
        .transpose()?;
    Ok(state
        .store
        .list(
            ns,
            Kind::IssuedCertificate,
            Page {
                parent: device.as_deref(),
                after,
                limit,
            },
        )
        .await?)
}

/// The record of serial number `serial`.
pub async fn read(
    state: &AppState,
    ns: &str,
    serial: &str,
) -> Result<IssuedCertificate, DomainError> {
    let key = serial_key(serial)?;
    render(&load(state.store.as_ref(), ns, Kind::IssuedCertificate, &key).await?)
}

/// Revokes the certificate of serial number `serial`: from the commit on, it admits its
/// device no more, on every replica (the revocation is written with a change of the
/// instance's credentials version, and the credentials index holds the revoked
/// certificates). Revoking a revoked certificate changes nothing (the first time and reason
/// stay), also when two revocations race.
pub async fn revoke(
    state: &AppState,
    ns: &str,
    serial: &str,
    reason: Option<String>,
) -> Result<IssuedCertificate, DomainError> {
    if let Some(reason) = &reason
        && (reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control))
    {
        return Err(DomainError::new(
            ErrorCode::ArgumentInvalid,
            format!("reason: at most {MAX_REASON_CHARS} characters, no control characters"),
        ));
    }
    let key = serial_key(serial)?;
    let stored = load(state.store.as_ref(), ns, Kind::IssuedCertificate, &key).await?;
    let mut record: IssuedCertificate = stored.doc_json()?;
    if record.revoked_date_time_utc.is_some() {
        return render(&stored);
    }
    record.revoked_date_time_utc = Some(
        OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|e| DomainError::internal("formatting the time", &e))?,
    );
    record.revocation_reason = reason;
    let expires_at = time::OffsetDateTime::parse(&record.not_after, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| DomainError::internal("reading a stored notAfter", &e))?;
    let doc = to_doc(&record)?;
    let writes = [
        Write::Put {
            ns: ns.to_owned(),
            kind: Kind::IssuedCertificate,
            key: key.clone(),
            columns: Columns::Issued {
                registration: record.registration_id.to_ascii_lowercase(),
                expires_at,
            },
            doc: doc.clone(),
            precondition: Precondition::IfMatch(stored.etag.clone()),
            etag: None,
        },
        Write::Put {
            ns: ns.to_owned(),
            kind: Kind::RevokedCertificate,
            key: key.clone(),
            columns: Columns::Expires { at: expires_at },
            doc,
            precondition: Precondition::Always,
            etag: None,
        },
        credentials::credentials_changed(ns),
    ];
    let written = match state.store.write(&writes).await {
        Ok(written) => written,
        // Another revocation committed first: its answer is this one's.
        Err(StoreError::EtagMismatch { .. }) => {
            let now = load(state.store.as_ref(), ns, Kind::IssuedCertificate, &key).await?;
            let current: IssuedCertificate = now.doc_json()?;
            if current.revoked_date_time_utc.is_some() {
                return render(&now);
            }
            return Err(DomainError::new(
                ErrorCode::PreconditionFailed,
                "the record changed meanwhile; revoke again",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        serial = %record.serial_number,
        registration_id = %record.registration_id,
        "issued certificate revoked"
    );
    match written.into_iter().next().flatten() {
        Some(stored) => render(&stored),
        None => Err(DomainError::internal(
            "revoking a certificate",
            &"the write returned no record",
        )),
    }
}

/// Refuses a device certificate this server issued and an admin revoked (whatever has become
/// of its CA since), by its serial number: a re-encoded signature changes the certificate's
/// thumbprint, not its serial. (A certificate of another CA with the same 128-bit random serial
/// would be refused too: a chance not worth a lookup.)
pub fn refuse_revoked(
    credentials: &Credentials,
    leaf: &CertificateFacts,
) -> Result<(), DomainError> {
    let serial = serial_key(&leaf.serial_number).unwrap_or_default();
    if credentials.is_revoked(&serial) {
        return Err(DomainError::unauthorized(
            "the device certificate was revoked",
        ));
    }
    Ok(())
}
