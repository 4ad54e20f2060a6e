//! The simulated devices: their credentials, the enrollments they need, and registration with
//! a fresh TLS connection per device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use attestation::SymmetricKey;
use attestation::sas::{encode_uri_component, sign};
use attestation::tpm::soft::SoftTpm;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::ValueEnum;
use dps_admin_client::Collection;
use dps_protocol::enrollment::{BulkMode, EnrollmentGroup};
use hyper::Method;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::connection::{Connection, Endpoint};
use crate::mqtt::MqttConnection;
use crate::report::{Percentiles, Report};

/// Most enrollments per bulk request (the server's default `limits.max_bulk_items`).
const BULK: usize = 1000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How simulated devices check the server's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Against this CA (PEM file), as a device does.
    Ca(PathBuf),
    /// Not at all: the light client of benchmarks, which skips verifying the certificate chain
    /// and the handshake signature so that the load generator costs less than what it measures.
    Unverified,
}

/// TLS for devices: the server checked as `trust` says, optionally a certificate presented.
fn tls_config(
    trust: &Trust,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let builder = match trust {
        Trust::Ca(ca_cert) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_cert)
                .with_context(|| format!("reading {}", ca_cert.display()))?
            {
                roots.add(cert?)?;
            }
            rustls::ClientConfig::builder().with_root_certificates(roots)
        }
        Trust::Unverified => {
            let provider = rustls::crypto::ring::default_provider();
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(
                    provider.signature_verification_algorithms,
                )))
        }
    };
    Ok(match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    })
}

/// A verifier that accepts any server (benchmarks against 127.0.0.1 only).
#[derive(Debug)]
struct Unverified(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The admin API, signed with a connection string's policy.
pub use dps_admin_client::Client as Admin;

/// Connects to the admin API at `endpoint`, trusting `ca_cert`.
pub fn admin(endpoint: &str, connection_string: &str, ca_cert: &Path) -> anyhow::Result<Admin> {
    Ok(Admin::connect(
        connection_string,
        Some(endpoint),
        Some(ca_cert),
        None,
    )?)
}

/// Creates individual enrollments through the bulk API; fails when any item fails.
async fn create_enrollments(admin: &Admin, enrollments: &[Value]) -> anyhow::Result<()> {
    let result = admin
        .bulk(Collection::Enrollments, BulkMode::Create, enrollments)
        .await?;
    if let Some(first) = result.errors.first() {
        bail!(
            "{} of {} enrollments were refused, the first: {} ({})",
            result.errors.len(),
            enrollments.len(),
            first.error_status,
            first.error_code
        );
    }
    Ok(())
}

/// Creates (or replaces) an enrollment group.
async fn put_group(admin: &Admin, group: Value) -> anyhow::Result<()> {
    let group: EnrollmentGroup = serde_json::from_value(group)?;
    admin.put_group(&group, Some("*")).await?;
    Ok(())
}

/// Creates `n` individual symmetric-key enrollments through the bulk API, `concurrency`
/// requests at a time, printing progress.
pub async fn import(admin: Arc<Admin>, n: usize, concurrency: usize) -> anyhow::Result<()> {
    let run = unix_now();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for start in (0..n).step_by(BULK) {
        let permit = permits.clone().acquire_owned().await?;
        let (admin, done) = (admin.clone(), done.clone());
        tasks.spawn(async move {
            let enrollments: Vec<Value> = (start..(start + BULK).min(n))
                .map(|i| {
                    let key = SymmetricKey::generate()?;
                    Ok(json!({ "registrationId": format!("scale-{run}-{i:08}"),
                        "attestation": { "type": "symmetricKey", "symmetricKey":
                            { "primaryKey": key.to_base64(), "secondaryKey": key.to_base64() } } }))
                })
                .collect::<anyhow::Result<_>>()?;
            let count = enrollments.len();
            create_enrollments(&admin, &enrollments).await?;
            drop(permit);
            let total = done.fetch_add(count, Ordering::Relaxed) + count;
            if total % 50_000 < count {
                eprintln!("imported {total}/{n}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// How one device proves itself.
#[derive(Debug, Clone)]
enum Proof {
    Sas(SymmetricKey),
    Certificate(Arc<rustls::ClientConfig>),
    /// A software TPM: the challenge, then SAS tokens signed with its key.
    Tpm(Arc<SoftTpm>),
}

/// How many software TPMs the devices of a TPM run share (each costs an RSA key generation).
const TPM_POOL: usize = 4;

/// The software TPMs of a TPM run.
fn tpm_pool() -> anyhow::Result<Vec<Arc<SoftTpm>>> {
    eprintln!("generating {TPM_POOL} software TPMs...");
    (0..TPM_POOL)
        .map(|_| Ok(Arc::new(SoftTpm::generate()?)))
        .collect()
}

/// The `tpm` object of a TPM device's register body.
fn tpm_keys(tpm: &SoftTpm) -> Value {
    json!({ "endorsementKey": STANDARD.encode(tpm.endorsement_key()),
        "storageRootKey": STANDARD.encode(tpm.storage_root_key()) })
}

/// A simulated device.
#[derive(Debug, Clone)]
struct SimDevice {
    id: String,
    proof: Proof,
}

/// The devices of a run.
#[derive(Debug)]
pub struct Fleet {
    mode: Mode,
    devices: Vec<SimDevice>,
    /// TLS of the devices that present no certificate.
    plain: Arc<rustls::ClientConfig>,
}

/// Device certificates issued by a software CA.
struct SoftwareCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl SoftwareCa {
    fn new() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dps-load CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    fn device(&self, id: &str, trust: &Trust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Arc::new(tls_config(
            trust,
            Some((cert.der().clone(), key)),
        )?))
    }
}

fn ids(mode: Mode, n: usize) -> Vec<String> {
    let run = unix_now();
    let mode = format!("{mode:?}").to_ascii_lowercase();
    (0..n)
        .map(|i| format!("load-{mode}-{run}-{i:07}"))
        .collect()
}

/// Creates an individual enrollment per id through the bulk API, with the attestation and the
/// device's proof that `make` gives for each.
async fn enroll_individually(
    admin: &Admin,
    ids: &[String],
    mut make: impl FnMut(&str) -> anyhow::Result<(Value, Proof)>,
) -> anyhow::Result<Vec<SimDevice>> {
    let mut devices = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(BULK) {
        let mut enrollments = Vec::with_capacity(chunk.len());
        for id in chunk {
            let (attestation, proof) = make(id)?;
            enrollments.push(json!({ "registrationId": id, "attestation": attestation }));
            devices.push(SimDevice {
                id: id.clone(),
                proof,
            });
        }
        create_enrollments(admin, &enrollments).await?;
    }
    Ok(devices)
}

impl Fleet {
    /// Devices for the ceiling server, which checks nothing: credentials are made locally.
    pub fn for_ceiling(mode: Mode, n: usize, trust: &Trust) -> anyhow::Result<Self> {
        let plain = Arc::new(tls_config(trust, None)?);
        let ca = (mode == Mode::X509).then(SoftwareCa::new).transpose()?;
        let tpms = if mode == Mode::Tpm {
            tpm_pool()?
        } else {
            Vec::new()
        };
        let devices = ids(mode, n)
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let proof = match (&ca, tpms.get(i % TPM_POOL)) {
                    (Some(ca), _) => Proof::Certificate(ca.device(&id, trust)?),
                    (None, Some(tpm)) => Proof::Tpm(tpm.clone()),
                    (None, None) => Proof::Sas(SymmetricKey::generate()?),
                };
                Ok(SimDevice { id, proof })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            mode,
            devices,
            plain,
        })
    }

    /// Creates the enrollments `n` devices of `mode` need, and the devices.
    pub async fn enroll(
        admin: &Admin,
        mode: Mode,
        n: usize,
        trust: &Trust,
    ) -> anyhow::Result<Self> {
        let plain = Arc::new(tls_config(trust, None)?);
        let ids = ids(mode, n);
        let group_id = format!("{}-group", ids.first().map_or("load", |s| s.as_str()));
        let devices = match mode {
            Mode::Individual => {
                enroll_individually(admin, &ids, |_| {
                    let key = SymmetricKey::generate()?;
                    let attestation = json!({ "type": "symmetricKey", "symmetricKey": {
                        "primaryKey": key.to_base64(),
                        "secondaryKey": SymmetricKey::generate()?.to_base64() } });
                    Ok((attestation, Proof::Sas(key)))
                })
                .await?
            }
            Mode::Group => {
                let key = SymmetricKey::generate()?;
                put_group(
                    admin,
                    json!({ "enrollmentGroupId": group_id,
                            "attestation": { "type": "symmetricKey", "symmetricKey":
                                { "primaryKey": key.to_base64(), "secondaryKey": SymmetricKey::generate()?.to_base64() } } }),
                    )
                    .await?;
                ids.into_iter()
                    .map(|id| SimDevice {
                        proof: Proof::Sas(key.derive_device_key(&id)),
                        id,
                    })
                    .collect()
            }
            Mode::Tpm => {
                let tpms = tpm_pool()?;
                let mut next = tpms.iter().cycle();
                enroll_individually(admin, &ids, |_| {
                    let tpm = next.next().context("the TPM pool is empty")?.clone();
                    let attestation = json!({ "type": "tpm", "tpm": {
                        "endorsementKey": STANDARD.encode(tpm.endorsement_key()) } });
                    Ok((attestation, Proof::Tpm(tpm)))
                })
                .await?
            }
            Mode::X509 => {
                let ca = SoftwareCa::new()?;
                put_group(
                    admin,
                    json!({ "enrollmentGroupId": group_id,
                            "attestation": { "type": "x509", "x509":
                                { "signingCertificates": { "primary": { "certificate": ca.pem } } } } }),
                    )
                    .await?;
                ids.into_iter()
                    .map(|id| {
                        Ok(SimDevice {
                            proof: Proof::Certificate(ca.device(&id, trust)?),
                            id,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            }
        };
        Ok(Self {
            mode,
            devices,
            plain,
        })
    }

    /// Registers every device, `concurrency` at a time, each over its own connection.
    pub async fn register_all(
        self,
        target: &str,
        endpoint: &str,
        id_scope: &str,
        concurrency: usize,
        poll: Option<Duration>,
        mqtt_port: Option<u16>,
    ) -> anyhow::Result<Report> {
        let total = self.devices.len();
        let concurrency = concurrency.max(1);
        let done = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let progress = {
            let (done, failed, finished) = (done.clone(), failed.clone(), finished.clone());
            let target = target.to_owned();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.tick().await;
                while !finished.load(Ordering::Relaxed) {
                    every.tick().await;
                    let n = done.load(Ordering::Relaxed);
                    eprint!(
                        "\r{target}: {n}/{total} done, {} failed, {:.0}/s   ",
                        failed.load(Ordering::Relaxed),
                        n as f64 / started.elapsed().as_secs_f64()
                    );
                }
                eprintln!();
            })
        };
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        let endpoint = Endpoint::resolve(endpoint).await?;
        let endpoint = Arc::new(match mqtt_port {
            Some(port) => endpoint.on_port(port),
            None => endpoint,
        });
        let scope: Arc<str> = id_scope.into();
        for device in self.devices {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let config = match &device.proof {
                Proof::Certificate(config) => config.clone(),
                Proof::Sas(_) | Proof::Tpm(_) => self.plain.clone(),
            };
            let (endpoint, scope, done, failed) = (
                endpoint.clone(),
                scope.clone(),
                done.clone(),
                failed.clone(),
            );
            tasks.spawn(async move {
                let outcome = match mqtt_port {
                    Some(_) => register_over_mqtt(&endpoint, &scope, &device, config, poll).await,
                    None => register_one(&endpoint, &scope, &device, config, poll).await,
                };
                drop(permit);
                done.fetch_add(1, Ordering::Relaxed);
                if outcome.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                outcome
            });
        }
        let mut registration = Vec::with_capacity(total);
        let mut first_request = Vec::with_capacity(total);
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok((whole, first))) => {
                    registration.push(whole);
                    first_request.push(first);
                }
                Ok(Err(code)) => *errors.entry(code).or_default() += 1,
                Err(_) => *errors.entry("task-panicked".into()).or_default() += 1,
            }
        }
        let elapsed = started.elapsed();
        finished.store(true, Ordering::Relaxed);
        let _ = progress.await;
        Ok(Report {
            target: target.to_owned(),
            mode: match mqtt_port {
                Some(_) => format!("{:?}-mqtt", self.mode).to_ascii_lowercase(),
                None => format!("{:?}", self.mode).to_ascii_lowercase(),
            },
            devices: total,
            concurrency,
            assigned: registration.len(),
            errors,
            elapsed_secs: elapsed.as_secs_f64(),
            throughput_per_sec: registration.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            registration_ms: Percentiles::of(&mut registration),
            first_request_ms: Percentiles::of(&mut first_request),
            cpu: Vec::new(),
        })
    }
}

/// One device's registration; its durations (whole, first request) or an error code.
async fn register_one(
    endpoint: &Endpoint,
    scope: &str,
    device: &SimDevice,
    config: Arc<rustls::ClientConfig>,
    poll: Option<Duration>,
) -> Result<(Duration, Duration), String> {
    let started = Instant::now();
    // A connection of its own: a new TLS handshake, as on first boot.
    let mut connection = Connection::open(endpoint, config).await?;
    let resource = encode_uri_component(&format!("{scope}/registrations/{}", device.id));
    let base = format!("/{scope}/registrations/{}", device.id);
    let register_path = format!("{base}/register?api-version=2021-06-01");
    let mut body = json!({ "registrationId": device.id });
    // A TPM device answers the challenge first; its key then signs the tokens.
    let key = match &device.proof {
        Proof::Sas(key) => Some(key.clone()),
        Proof::Certificate(_) => None,
        Proof::Tpm(tpm) => {
            body["tpm"] = tpm_keys(tpm);
            let (status, challenge, _) = connection
                .send(Method::PUT, &register_path, None, Some(&body))
                .await?;
            let blob = challenge["authenticationKey"]
                .as_str()
                .and_then(|b| STANDARD.decode(b).ok())
                .ok_or_else(|| error_code("challenge", status, &challenge))?;
            let tpm = tpm.clone();
            let key = tokio::task::spawn_blocking(move || tpm.activate(&blob))
                .await
                .map_err(|_| "task-panicked".to_owned())?
                .map_err(|_| "activation".to_owned())?;
            Some(key)
        }
    };
    let token = key
        .as_ref()
        .map(|key| sign(&resource, key, unix_now() + 3600, Some("registration")));
    let (status, body, after) = connection
        .send(Method::PUT, &register_path, token.as_deref(), Some(&body))
        .await?;
    let first = started.elapsed();
    if status != 202 {
        return Err(error_code("http", status, &body));
    }
    let operation = body["operationId"].as_str().unwrap_or_default().to_owned();
    let poll_path = format!("{base}/operations/{operation}?api-version=2021-06-01");
    let mut wait = poll.or(after).unwrap_or(Duration::from_secs(1));
    loop {
        tokio::time::sleep(wait).await;
        let (status, body, after) = connection
            .send(Method::GET, &poll_path, token.as_deref(), None)
            .await?;
        match (status, body["status"].as_str()) {
            (202, _) => wait = poll.or(after).unwrap_or(Duration::from_secs(1)),
            (200, Some("assigned")) => return Ok((started.elapsed(), first)),
            (200, Some(other)) => {
                return Err(format!(
                    "status-{other}/{}",
                    body["registrationState"]["errorCode"]
                ));
            }
            _ => return Err(error_code("http", status, &body)),
        }
    }
}

/// One device's registration over MQTT (symmetric keys and X.509; DPS has no TPM over MQTT).
async fn register_over_mqtt(
    endpoint: &Endpoint,
    scope: &str,
    device: &SimDevice,
    config: Arc<rustls::ClientConfig>,
    poll: Option<Duration>,
) -> Result<(Duration, Duration), String> {
    let started = Instant::now();
    let token = match &device.proof {
        Proof::Sas(key) => {
            let resource = encode_uri_component(&format!("{scope}/registrations/{}", device.id));
            Some(sign(
                &resource,
                key,
                unix_now() + 3600,
                Some("registration"),
            ))
        }
        Proof::Certificate(_) => None,
        Proof::Tpm(_) => return Err("tpm-over-mqtt".to_owned()),
    };
    let mut connection =
        MqttConnection::open(endpoint, config, scope, &device.id, token.as_deref()).await?;
    let (status, body, after) = connection
        .request(None, &json!({ "registrationId": device.id }))
        .await?;
    let first = started.elapsed();
    if status != 202 {
        return Err(error_code("mqtt", status, &body));
    }
    let operation = body["operationId"].as_str().unwrap_or_default().to_owned();
    let mut wait = poll.or(after).unwrap_or(Duration::from_secs(1));
    loop {
        tokio::time::sleep(wait).await;
        let (status, body, after) = connection.request(Some(&operation), &json!(" ")).await?;
        match (status, body["status"].as_str()) {
            (202, _) => wait = poll.or(after).unwrap_or(Duration::from_secs(1)),
            (200, Some("assigned")) => return Ok((started.elapsed(), first)),
            _ => return Err(error_code("mqtt", status, &body)),
        }
    }
}

fn error_code(kind: &str, status: u16, body: &Value) -> String {
    match body.get("errorCode") {
        Some(code) => format!("{kind}-{status}/{code}"),
        None => format!("{kind}-{status}"),
    }
}

/// How the simulated devices prove themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Each device has its own symmetric-key individual enrollment.
    Individual,
    /// Devices derive their keys from one symmetric-key enrollment group.
    Group,
    /// Devices present certificates (software keys) issued by an X.509 group's CA.
    X509,
    /// Each device has its own TPM individual enrollment and answers the service's challenge
    /// with a software TPM (a few simulated TPMs are shared by all devices).
    Tpm,
}
