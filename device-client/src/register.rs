//! One registration over HTTPS: `PUT .../register`, then polls of the operation until it ends.
//! Polls wait as long as the service's `Retry-After` says; transient failures (connection
//! errors, 429, 5xx) are retried with capped exponential backoff and jitter; everything stops
//! at an overall deadline.
//!
//! A TPM device first asks for the service's challenge (a register request without
//! `Authorization`, answered 401 with an activation blob), imports the blob's key into its TPM
//! and signs its tokens with it; the assignment's second blob carries its hub key, which is
//! persisted in the TPM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dps_protocol::ErrorBody;
use dps_protocol::device::{
    DeviceRegistration, OperationStatus, RegistrationOperationStatus, TpmChallenge,
};
use dps_protocol::enrollment::TpmAttestation;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::key::SasSigner;
use crate::tpm::{HUB_KEY_HANDLE, LoadedKey, Tpm};
use crate::x509::ClientCertificate;

/// The device API version the client speaks.
pub(crate) const API_VERSION: &str = "2021-06-01";
/// The version that carries a certificate signing request (`csr`) and returns the issued
/// chain.
pub(crate) const ISSUANCE_API_VERSION: &str = "2025-07-01-preview";
/// Lifetime of the SAS tokens the client signs.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Wait between polls when the service sends no `Retry-After`.
pub(crate) const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// Backoff bounds for transient failures.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How the device proves itself.
#[derive(Debug)]
pub enum Proof {
    /// SAS tokens in the `Authorization` header.
    Sas(SasSigner),
    /// A client certificate in the TLS handshake.
    Certificate(ClientCertificate),
    /// A TPM: the service's challenge, then SAS tokens signed inside the TPM.
    Tpm(Tpm),
}

/// Where a TPM group member sends its EK certificate: this field of the payload.
pub const EK_CERTIFICATE_FIELD: &str = "tpmEndorsementKeyCertificate";

/// What to register.
#[derive(Debug)]
pub struct Registration {
    /// `https://host[:port]` of the provisioning service.
    pub endpoint: String,
    /// The instance's ID scope.
    pub id_scope: String,
    /// The device's registration id.
    pub registration_id: String,
    /// PEM CA certificate(s) to trust instead of the system roots.
    pub ca_cert: Option<PathBuf>,
    /// JSON the device passes to allocation.
    pub payload: Option<Value>,
    /// When to give up.
    pub timeout: Duration,
    /// How to reach the service.
    pub transport: Transport,
    /// Base64 DER PKCS#10 request for an operational certificate, when the device wants one.
    pub csr: Option<String>,
}

impl Registration {
    /// The API version to speak: the preview when the request asks for a certificate.
    pub(crate) fn api_version(&self) -> &'static str {
        match self.csr {
            Some(_) => ISSUANCE_API_VERSION,
            None => API_VERSION,
        }
    }
}

/// How the device reaches the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS at the endpoint.
    Https,
    /// MQTT over TLS at the endpoint's host, on this port (8883 in Azure).
    Mqtt {
        /// The MQTT port.
        port: u16,
    },
    /// MQTT over a WebSocket at the endpoint (`wss://{host}[:port]/$iothub/websocket`), for
    /// networks that pass only 443.
    MqttWebSocket,
}

/// Where the service assigned the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// The registration id.
    pub registration_id: String,
    /// The hub to connect to.
    pub assigned_hub: String,
    /// The device id in that hub.
    pub device_id: String,
    /// `initialAssignment`, `deviceDataMigrated`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    /// When the assignment was received (RFC 3339).
    pub registered_at: String,
    /// TPM devices: the persistent handle of the key to sign hub tokens with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_key_handle: Option<String>,
    /// The operational certificate issued for the request's `csr`: base64 DER, the new
    /// certificate first, then its CA chain. Not kept in the state file.
    #[serde(skip)]
    pub issued_certificate_chain: Option<Vec<String>>,
}

/// Why registration did not produce an assignment.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The client is misconfigured (CA file, endpoint).
    #[error("{0}")]
    Config(String),
    /// The service refused the request (bad credentials, bad request): retrying will not help.
    #[error("the service refused the registration: HTTP {status}, error {code}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Service error code.
        code: u32,
        /// Service message.
        message: String,
    },
    /// The service ended the operation as `failed` or `disabled`.
    #[error("registration {status}: error {code}: {message}")]
    Ended {
        /// `failed` or `disabled`.
        status: &'static str,
        /// Service error code.
        code: i64,
        /// Service message.
        message: String,
    },
    /// The deadline passed (service unreachable, or still assigning).
    #[error("gave up after {0:?}: {1}")]
    Timeout(Duration, String),
}

impl RegisterError {
    /// A process exit code a script can act on.
    pub fn exit_code(&self) -> u8 {
        match self {
            RegisterError::Config(_) => 1,
            RegisterError::Rejected { .. } => 3,
            RegisterError::Ended { .. } => 4,
            RegisterError::Timeout(..) => 5,
        }
    }
}

/// A transient problem: worth retrying after `after` (the service's Retry-After, if any).
struct Transient {
    reason: String,
    after: Option<Duration>,
}

enum Attempt<T> {
    Done(T),
    Retry(Transient),
}

/// TLS trusting the given CA (or the platform's roots), with the client certificate if any.
pub(crate) fn tls_config(
    ca_cert: Option<&PathBuf>,
    certificate: Option<&ClientCertificate>,
) -> Result<rustls::ClientConfig, RegisterError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use rustls_platform_verifier::BuilderVerifierExt;
    let config = |e: String| RegisterError::Config(format!("TLS: {e}"));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config(e.to_string()))?;
    let builder = match ca_cert {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| RegisterError::Config(format!("reading {}: {e}", path.display())))?
            {
                let cert =
                    cert.map_err(|e| RegisterError::Config(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| RegisterError::Config(format!("{}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .with_platform_verifier()
            .map_err(|e| config(e.to_string()))?,
    };
    Ok(match certificate {
        Some(certificate) => builder.with_client_cert_resolver(certificate.resolver()),
        None => builder.with_no_client_auth(),
    })
}

fn http_client(
    ca_cert: Option<&PathBuf>,
    certificate: Option<&ClientCertificate>,
) -> Result<reqwest::Client, RegisterError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("dps-device/", env!("CARGO_PKG_VERSION")));
    if let Some(certificate) = certificate {
        builder = builder.tls_backend_preconfigured(tls_config(ca_cert, Some(certificate))?);
    } else if let Some(path) = ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| RegisterError::Config(format!("reading {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| RegisterError::Config(format!("{}: {e}", path.display())))?;
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| RegisterError::Config(format!("building the HTTPS client: {e}")))
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(1, 300)))
}

/// Sorts an answer: success body (or the body of `also`, a status the caller expects), a
/// transient failure, or a refusal.
async fn classify(
    response: reqwest::Response,
    also: Option<StatusCode>,
) -> Result<Attempt<(StatusCode, String)>, RegisterError> {
    let status = response.status();
    let after = retry_after(&response);
    let text = response.text().await.unwrap_or_default();
    if status.is_success() || Some(status) == also {
        return Ok(Attempt::Done((status, text)));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Ok(Attempt::Retry(Transient {
            reason: format!("HTTP {status}"),
            after,
        }));
    }
    Err(refusal(status, text))
}

/// Sends what `request` builds until the service answers (see [`classify`]), pausing as
/// `wait` says after each transient failure.
async fn send_until_answered(
    request: impl Fn() -> Result<reqwest::RequestBuilder, RegisterError>,
    also: Option<StatusCode>,
    base: &str,
    mut wait: impl FnMut(Transient) -> Result<Duration, RegisterError>,
) -> Result<(StatusCode, String), RegisterError> {
    loop {
        let attempt = match request()?.send().await {
            Ok(response) => classify(response, also).await?,
            Err(e) => Attempt::Retry(Transient {
                reason: format!("cannot reach {base}: {e}"),
                after: None,
            }),
        };
        match attempt {
            Attempt::Done(answer) => return Ok(answer),
            Attempt::Retry(transient) => tokio::time::sleep(wait(transient)?).await,
        }
    }
}

/// Capped exponential backoff with full jitter.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_START
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_CAP);
    let random: [u8; 4] = attestation::keys::random_bytes().unwrap_or([0x80, 0, 0, 0]);
    let fraction = f64::from(u32::from_be_bytes(random)) / f64::from(u32::MAX);
    ceiling.mul_f64(0.5 + fraction / 2.0)
}

/// Registers the device and returns its assignment.
pub async fn register(request: &Registration, proof: &Proof) -> Result<Assignment, RegisterError> {
    if request.transport != Transport::Https {
        return crate::mqtt::register(request, proof).await;
    }
    let started = Instant::now();
    let deadline = started + request.timeout;
    let (signer, certificate, tpm) = match proof {
        Proof::Sas(signer) => (Some(signer), None, None),
        Proof::Certificate(certificate) => (None, Some(certificate), None),
        Proof::Tpm(tpm) => (None, None, Some(tpm)),
    };
    let client = http_client(request.ca_cert.as_ref(), certificate)?;
    let base = request.endpoint.trim_end_matches('/');
    let scope = encode(&request.id_scope);
    let id = encode(&request.registration_id);
    let resource = format!(
        "{}/registrations/{}",
        request.id_scope, request.registration_id
    );
    let body = DeviceRegistration {
        registration_id: Some(request.registration_id.clone()),
        tpm: tpm.map(|tpm| TpmAttestation {
            endorsement_key: STANDARD.encode(tpm.endorsement_key()),
            storage_root_key: Some(STANDARD.encode(tpm.storage_root_key())),
        }),
        payload: match tpm {
            Some(tpm) => with_ek_certificate(request.payload.clone(), tpm),
            None => request.payload.clone(),
        },
        csr: request.csr.clone(),
    };
    let api_version = request.api_version();
    let timeout = |last: &str| RegisterError::Timeout(request.timeout, last.to_owned());
    let mut failures = 0u32;
    let wait_until = |transient: Transient, failures: &mut u32| {
        let pause = transient.after.unwrap_or_else(|| backoff(*failures));
        *failures += 1;
        let at = Instant::now() + pause;
        if at >= deadline {
            Err(timeout(&transient.reason))
        } else {
            Ok(pause)
        }
    };

    let register_url =
        format!("{base}/{scope}/registrations/{id}/register?api-version={api_version}");

    // A TPM device asks for the challenge first and signs with its key from then on.
    let mut challenge: Option<(LoadedKey<'_>, String)> = None;
    if let Some(tpm) = tpm {
        let (status, text) = send_until_answered(
            || Ok(client.put(&register_url).json(&body)),
            Some(StatusCode::UNAUTHORIZED),
            base,
            |transient| wait_until(transient, &mut failures),
        )
        .await?;
        if status != StatusCode::UNAUTHORIZED {
            return Err(RegisterError::Config(format!(
                "the service answered a TPM device's first request with HTTP {status}, not with a challenge"
            )));
        }
        // A 401 that is not a challenge is a refusal (an unknown device, say).
        let answer: TpmChallenge =
            serde_json::from_str(&text).map_err(|_| refusal(status, text.clone()))?;
        let blob = STANDARD
            .decode(answer.authentication_key.as_bytes())
            .map_err(|_| {
                RegisterError::Config("the service's authenticationKey is not base64".into())
            })?;
        let key = tpm
            .import(&blob)
            .map_err(|e| RegisterError::Config(e.to_string()))?;
        challenge = Some((key, answer.key_name));
    }

    // X.509 devices send no Authorization header.
    let encoded_resource = attestation::sas::encode_uri_component(&resource);
    let authorize = |request: reqwest::RequestBuilder| {
        let token = match (signer, tpm.zip(challenge.as_ref())) {
            (Some(signer), _) => signer
                .token(&encoded_resource, TOKEN_LIFETIME)
                .map_err(|e| RegisterError::Config(e.to_string()))?,
            (None, Some((tpm, (key, key_name)))) => {
                let expiry = crate::key::expiry_after(TOKEN_LIFETIME);
                attestation::sas::sign_with(&encoded_resource, expiry, Some(key_name), |m| {
                    tpm.hmac(key, m)
                })
                .map_err(|e| RegisterError::Config(e.to_string()))?
            }
            _ => return Ok(request),
        };
        Ok(request.header("Authorization", token))
    };
    let (_, text) = send_until_answered(
        || Ok(authorize(client.put(&register_url))?.json(&body)),
        None,
        base,
        |transient| wait_until(transient, &mut failures),
    )
    .await?;
    let accepted: RegistrationOperationStatus = serde_json::from_str(&text).map_err(|e| {
        RegisterError::Config(format!(
            "the service's answer is not a registration status: {e}"
        ))
    })?;

    let poll_url = format!(
        "{base}/{scope}/registrations/{id}/operations/{}?api-version={api_version}",
        encode(&accepted.operation_id)
    );
    let mut pause = DEFAULT_POLL;
    loop {
        if Instant::now() + pause >= deadline {
            return Err(timeout("the registration was still assigning"));
        }
        tokio::time::sleep(pause).await;
        let sent = authorize(client.get(&poll_url))?.send().await;
        let attempt = match sent {
            Ok(response) => {
                let after = retry_after(&response);
                match classify(response, None).await? {
                    Attempt::Done((status, text)) => {
                        pause = after.unwrap_or(DEFAULT_POLL);
                        if status == StatusCode::ACCEPTED {
                            continue;
                        }
                        Attempt::Done(text)
                    }
                    Attempt::Retry(t) => Attempt::Retry(t),
                }
            }
            Err(e) => Attempt::Retry(Transient {
                reason: format!("cannot reach {base}: {e}"),
                after: None,
            }),
        };
        match attempt {
            Attempt::Done(text) => {
                let (mut assignment, hub_blob) = finish(&text)?;
                if let Some(tpm) = tpm {
                    // The challenge's key is done with; unload it before the hub key.
                    drop(challenge);
                    assignment.hub_key_handle = Some(persist_hub_key(tpm, hub_blob)?);
                }
                return Ok(assignment);
            }
            Attempt::Retry(transient) => pause = wait_until(transient, &mut failures)?,
        }
    }
}

/// The payload with the TPM's EK certificate added (a TPM enrollment group admits devices by
/// it), when the TPM has one and the payload is an object or absent.
fn with_ek_certificate(payload: Option<Value>, tpm: &Tpm) -> Option<Value> {
    let Some(certificate) = tpm.ek_certificate() else {
        return payload;
    };
    let mut payload = payload.unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    if let Value::Object(map) = &mut payload {
        map.insert(
            EK_CERTIFICATE_FIELD.into(),
            Value::String(STANDARD.encode(certificate)),
        );
    }
    Some(payload)
}

/// Imports the assignment's blob and persists its key for the hub.
fn persist_hub_key(tpm: &Tpm, blob: Option<String>) -> Result<String, RegisterError> {
    let blob = blob.ok_or_else(|| {
        RegisterError::Config(
            "the assignment has no tpm.authenticationKey for the device's hub key".into(),
        )
    })?;
    let blob = STANDARD.decode(blob.as_bytes()).map_err(|_| {
        RegisterError::Config("the assignment's tpm.authenticationKey is not base64".into())
    })?;
    let key = tpm
        .import(&blob)
        .map_err(|e| RegisterError::Config(e.to_string()))?;
    tpm.persist_hub_key(&key)
        .map_err(|e| RegisterError::Config(e.to_string()))?;
    Ok(format!("0x{HUB_KEY_HANDLE:08x}"))
}

/// A refusal with the service's error body, if it sent one.
pub(crate) fn refusal(status: StatusCode, text: String) -> RegisterError {
    let (code, message) = serde_json::from_str::<ErrorBody>(&text)
        .map(|e| (e.error_code, e.message))
        .unwrap_or((0, text));
    RegisterError::Rejected {
        status: status.as_u16(),
        code,
        message,
    }
}

/// The assignment, and the TPM hub-key blob when there is one.
pub(crate) fn finish(text: &str) -> Result<(Assignment, Option<String>), RegisterError> {
    let answer: RegistrationOperationStatus = serde_json::from_str(text).map_err(|e| {
        RegisterError::Config(format!(
            "the service's answer is not a registration status: {e}"
        ))
    })?;
    let state = answer.registration_state.unwrap_or_default();
    let ended = |status: &'static str| RegisterError::Ended {
        status,
        code: state.error_code.unwrap_or_default(),
        message: state.error_message.clone().unwrap_or_default(),
    };
    match answer.status {
        OperationStatus::Assigned => Ok((
            Assignment {
                registration_id: state.registration_id.clone(),
                assigned_hub: state.assigned_hub.clone().unwrap_or_default(),
                device_id: state.device_id.clone().unwrap_or_default(),
                substatus: state.substatus.clone(),
                registered_at: OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_default(),
                hub_key_handle: None,
                issued_certificate_chain: state.issued_certificate_chain.clone(),
            },
            state.tpm.as_ref().map(|t| t.authentication_key.clone()),
        )),
        OperationStatus::Disabled => Err(ended("disabled")),
        _ => Err(ended("failed")),
    }
}

fn encode(segment: &str) -> String {
    attestation::sas::encode_uri_component(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        for attempt in 0..40 {
            let pause = backoff(attempt);
            let ceiling = BACKOFF_START
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(BACKOFF_CAP);
            assert!(
                pause <= ceiling && pause >= ceiling / 2,
                "{attempt}: {pause:?}"
            );
        }
    }
}
