//! CA certificates (`/certificates`): root or intermediate certificates an instance's
//! enrollment groups name in `caReferences`. A certificate counts only after proof of
//! possession: `generateVerificationCode` issues a code, and `verify` takes a certificate
//! whose common name is that code, signed by the CA's key. Every uploaded certificate, verified
//! or not, may also complete a device's chain as an intermediate (it confers no trust).

use attestation::chain::{common_name, verify_chain};

use attestation::x509::parse_certificate;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use dps_protocol::ErrorCode;
use dps_protocol::admin::CaCertificate;
use dps_protocol::enrollment::EnrollmentGroup;
use dps_protocol::ids::check_resource_name;
use serde::Deserialize;

use super::resource::{Resource, delete_one, get_one, list, load, put_one, render};
use super::validate::{field_error, info_of};
use super::{Admin, AppState, Id, needs, to_doc, unix_now};
use crate::error::ApiError;
use crate::json::{Json, JsonBody};
use crate::store::{Kind, Page, Precondition, Write};

impl Resource for CaCertificate {
    const KIND: Kind = Kind::CaCertificate;
    const ITEM_TYPE: &'static str = "CaCertificate";

    fn key_of(id: &str) -> Result<String, ApiError> {
        check_resource_name("certificate", id)
            .map(|()| id.to_ascii_lowercase())
            .map_err(|e| ApiError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    /// A new certificate starts unverified; re-sending the same certificate keeps its state.
    fn prepare(&mut self, previous: Option<&Self>) -> Result<(), ApiError> {
        self.etag = None;
        let text = match (&self.certificate, previous) {
            (Some(text), _) => text.clone(),
            (None, Some(previous)) => previous.certificate.clone().unwrap_or_default(),
            (None, None) => {
                return Err(ApiError::new(
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

/// Routes of `/certificates`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/certificates", get(list::<CaCertificate>))
        .route(
            "/certificates/{name}",
            get(get_one::<CaCertificate>)
                .put(put_one::<CaCertificate>)
                .delete(delete_certificate),
        )
        .route(
            "/certificates/{name}/generateVerificationCode",
            post(generate_verification_code),
        )
        .route("/certificates/{name}/verify", post(verify))
}

/// `DELETE /certificates/{name}`: refused while an enrollment group names it in
/// `caReferences`, so that no group silently stops admitting its devices.
async fn delete_certificate(
    admin: Admin<needs::ServiceConfig>,
    state: State<AppState>,
    id: Id,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let key = CaCertificate::key_of(&id.0)?;
    let groups = state
        .store
        .list(
            admin.ns(),
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
            return Err(ApiError::new(
                ErrorCode::ConflictWithState,
                format!(
                    "enrollment group '{}' names CA certificate '{}' in caReferences; change the group first",
                    group.enrollment_group_id, id.0
                ),
            ));
        }
    }
    delete_one::<CaCertificate>(admin, state, id, headers).await
}

/// Reads, changes and stores a certificate under its etag (a concurrent change is a 412).
async fn update(
    state: &AppState,
    ns: &str,
    name: &str,
    change: impl FnOnce(&mut CaCertificate) -> Result<(), ApiError>,
) -> Result<CaCertificate, ApiError> {
    let stored = load::<CaCertificate>(state, ns, name).await?;
    let mut certificate: CaCertificate = stored.doc_json()?;
    change(&mut certificate)?;
    let put = Write::Put {
        ns: ns.to_owned(),
        kind: Kind::CaCertificate,
        key: CaCertificate::key_of(name)?,
        parent: None,
        tag: None,
        doc: to_doc(&certificate)?,
        precondition: Precondition::IfMatch(stored.etag),
    };
    let written = state
        .store
        .write(&super::resource::with_credentials::<CaCertificate>(ns, put))
        .await?
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| ApiError::internal("storing a certificate", &"no result"))?;
    render(&written, false)
}

/// `POST /certificates/{name}/generateVerificationCode`: a fresh code (the previous one stops
/// working). The answer is the only place the code is shown.
async fn generate_verification_code(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
) -> Result<Json<CaCertificate>, ApiError> {
    let code = attestation::keys::random_bytes::<16>()
        .map(|bytes| attestation::x509::upper_hex(&bytes))
        .map_err(|e| ApiError::internal("generating a verification code", &e))?;
    let shown = code.clone();
    let mut answer = update(&state, admin.ns(), &name, move |c| {
        c.verification_code = Some(code);
        Ok(())
    })
    .await?;
    answer.verification_code = Some(shown);
    Ok(Json(answer))
}

/// The body of `verify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verification {
    /// PEM or base64 DER of a certificate whose CN is the verification code, signed by the CA.
    certificate: String,
}

/// `POST /certificates/{name}/verify`: proof of possession of the CA's key.
async fn verify(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(name): Id,
    JsonBody(body): JsonBody<Verification>,
) -> Result<Json<CaCertificate>, ApiError> {
    let proof = parse_certificate(&body.certificate)
        .map_err(|e| field_error("certificate", e.to_string()))?;
    let answer = update(&state, admin.ns(), &name, |ca| {
        let code = ca.verification_code.clone().ok_or_else(|| {
            ApiError::new(
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
            .map_err(|e| ApiError::internal("a stored CA certificate is corrupt", &e))?
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
    Ok(Json(answer))
}
