//! CA certificates: root or intermediate certificates an instance's enrollment groups name in
//! `caReferences`. A certificate counts only after proof of possession: a verification code,
//! then a certificate whose common name is that code, signed by the CA's key. Every uploaded
//! certificate, verified or not, may also complete a device's chain as an intermediate (it
//! confers no trust).

use attestation::chain::{common_name, verify_chain};
use attestation::x509::parse_certificate;
use dps_protocol::ErrorCode;
use dps_protocol::admin::CaCertificate;
use dps_protocol::enrollment::EnrollmentGroup;
use dps_protocol::ids::check_resource_name;

use super::resources::{self, Resource, load, render, with_credentials};
use super::validate::{field_error, info_of};
use super::{DomainError, to_doc, unix_now};
use crate::state::AppState;
use crate::store::{Columns, Kind, Page, Precondition, Write};

impl Resource for CaCertificate {
    const KIND: Kind = Kind::CaCertificate;
    const ITEM_TYPE: &'static str = "CaCertificate";

    fn key_of(id: &str) -> Result<String, DomainError> {
        check_resource_name("certificate", id)
            .map(|()| id.to_ascii_lowercase())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    /// A new certificate starts unverified; re-sending the same certificate keeps its state.
    fn prepare(&mut self, previous: Option<&Self>) -> Result<(), DomainError> {
        self.etag = None;
        let text = match (&self.certificate, previous) {
            (Some(text), _) => text.clone(),
            (None, Some(previous)) => previous.certificate.clone().unwrap_or_default(),
            (None, None) => {
                return Err(DomainError::new(
                    ErrorCode::ArgumentNull,
                    "certificate: give the CA certificate (PEM or base64 DER)",
                )
                .with_info("field", "certificate"));
            }
        };
        let parsed =
            parse_certificate(&text).map_err(|e| field_error("certificate", e.to_string()))?;
        if !parsed.facts.is_ca {
            return Err(field_error(
                "certificate",
                "a CA certificate needs basic constraints CA:true",
            ));
        }
        attestation::chain::check_anchor(&parsed.der)
            .map_err(|e| field_error("certificate", e.to_string()))?;
        let info = info_of(parsed.facts);
        let same = previous
            .and_then(|p| p.info.as_ref())
            .is_some_and(|p| p.sha256_thumbprint == info.sha256_thumbprint);
        self.is_verified = same && previous.is_some_and(|p| p.is_verified);
        self.verification_code = if same {
            previous.and_then(|p| p.verification_code.clone())
        } else {
            None
        };
        self.certificate = Some(text);
        self.info = Some(info);
        Ok(())
    }

    fn hide_secrets(&mut self) {
        self.certificate = None;
        self.verification_code = None;
    }

    fn hide_unsent_secrets(&mut self, sent: &Self, _previous: Option<&Self>) {
        // The verification code is shown only by generateVerificationCode.
        self.verification_code = None;
        if sent.certificate.is_none() {
            self.certificate = None;
        }
    }
}

/// Deletes CA certificate `name`; refused while an enrollment group names it in
/// `caReferences`, so that no group silently stops admitting its devices.
pub async fn delete(
    state: &AppState,
    ns: &str,
    name: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    let key = CaCertificate::key_of(name)?;
    let groups = state
        .store
        .list(
            ns,
            Kind::EnrollmentGroup,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    for row in &groups {
        let group: EnrollmentGroup = row.doc_json()?;
        let named = group
            .attestation
            .x509
            .as_ref()
            .and_then(|x| x.ca_references.as_ref())
            .is_some_and(|refs| {
                [&refs.primary, &refs.secondary]
                    .into_iter()
                    .flatten()
                    .any(|name| name.eq_ignore_ascii_case(&key))
            });
        if named {
            return Err(DomainError::new(
                ErrorCode::ConflictWithState,
                format!(
                    "enrollment group '{}' names CA certificate '{name}' in caReferences; change the group first",
                    group.enrollment_group_id
                ),
            ));
        }
    }
    resources::delete::<CaCertificate>(state, ns, name, precondition).await
}

/// Reads, changes and stores a certificate under its etag (a concurrent change is a 412).
async fn update(
    state: &AppState,
    ns: &str,
    name: &str,
    change: impl FnOnce(&mut CaCertificate) -> Result<(), DomainError>,
) -> Result<CaCertificate, DomainError> {
    let stored = load::<CaCertificate>(state, ns, name).await?;
    let mut certificate: CaCertificate = stored.doc_json()?;
    change(&mut certificate)?;
    let put = Write::Put {
        ns: ns.to_owned(),
        kind: Kind::CaCertificate,
        key: CaCertificate::key_of(name)?,
        columns: Columns::None,
        doc: to_doc(&certificate)?,
        precondition: Precondition::IfMatch(stored.etag),
        etag: None,
    };
    let written = state
        .store
        .write(&with_credentials::<CaCertificate>(ns, put))
        .await?
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| DomainError::internal("storing a certificate", &"no result"))?;
    render(&written, false)
}

/// A fresh verification code for `name` (the previous one stops working), shown in the answer
/// only.
pub async fn new_verification_code(
    state: &AppState,
    ns: &str,
    name: &str,
) -> Result<CaCertificate, DomainError> {
    let code = attestation::keys::random_bytes::<16>()
        .map(|bytes| attestation::x509::upper_hex(&bytes))
        .map_err(|e| DomainError::internal("generating a verification code", &e))?;
    let shown = code.clone();
    let mut answer = update(state, ns, name, move |c| {
        c.verification_code = Some(code);
        Ok(())
    })
    .await?;
    answer.verification_code = Some(shown);
    Ok(answer)
}

/// Proof of possession of the CA's key: `proof` (PEM or base64 DER) has the pending
/// verification code as its common name and is signed by the CA.
pub async fn verify(
    state: &AppState,
    ns: &str,
    name: &str,
    proof: &str,
) -> Result<CaCertificate, DomainError> {
    let proof = parse_certificate(proof).map_err(|e| field_error("certificate", e.to_string()))?;
    let answer = update(state, ns, name, |ca| {
        let code = ca.verification_code.clone().ok_or_else(|| {
            DomainError::new(
                ErrorCode::ConflictWithState,
                "no verification code is pending: call generateVerificationCode first",
            )
        })?;
        if common_name(&proof.der).as_deref() != Some(code.as_str()) {
            return Err(field_error(
                "certificate",
                "the certificate's common name is not the verification code",
            ));
        }
        let ca_der = parse_certificate(ca.certificate.as_deref().unwrap_or_default())
            .map_err(|e| DomainError::internal("a stored CA certificate is corrupt", &e))?
            .der;
        verify_chain(std::slice::from_ref(&proof.der), &ca_der, &[], unix_now()).map_err(|e| {
            field_error(
                "certificate",
                format!("the certificate is not signed by this CA's key: {e}"),
            )
        })?;
        ca.is_verified = true;
        ca.verification_code = None;
        Ok(())
    })
    .await?;
    tracing::info!(certificate = %name, "CA certificate verified");
    Ok(answer)
}
