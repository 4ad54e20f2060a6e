//! Operational certificates for devices that send a certificate signing request (`csr`): the
//! credential policy their enrollment names (`credentialPolicyName`) picks an issuing CA, a
//! validity and the key types it accepts.
//!
//! Policies and CAs come from two places: the configuration (`[issuance]`, loaded and checked
//! at start, shared by every instance) and an instance's own (`/credentialPolicies`,
//! `/certificateAuthorities`, see [`super::issuing_cas`]), found through the instance's
//! credentials index so that every replica sees a change after one read. A configured policy
//! wins over an instance's of the same name (an instance cannot create one). A CA's key is a
//! PEM file or a key inside a PKCS#11 token, which then signs every certificate in place; an
//! instance's CA is opened on first use and kept while its document stays the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use attestation::issuance::{IssuingCa, KeyType, MAX_CSR_BYTES, Profile, check_csr};
use base64::Engine;
use dps_pkcs11::{Pkcs11Uri, PrivateKey, Signer};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{CertificateAuthority, CredentialPolicy, IssuedCertificate};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::format_description::well_known::Rfc3339;

use crate::config::IssuanceConfig;
use crate::domain::validate::normal_serial;
use crate::trust::Credentials;

/// Validity of a certificate when a policy does not say.
pub const DEFAULT_VALIDITY_DAYS: u32 = 30;
/// The longest validity a policy may give.
pub const MAX_VALIDITY_DAYS: u32 = 3650;

/// Why a CA key cannot be opened: said to the admin who named it, or logged at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyRefError {
    /// The reference itself is not usable, or not allowed on this server: the admin's to fix.
    #[error("{0}")]
    Refused(String),
    /// The token or file failed (it may work again).
    #[error("{0}")]
    Failed(String),
}

/// What an instance's CA keys may name, so that an instance's admin reaches only what the
/// operator set aside for that instance: PKCS#11 modules from a list, tokens labelled
/// `<instance>` or `<instance>:<anything>` (a PKCS#11 login holds for the whole process, so a
/// key in a token another CA logged in to would be reachable without its PIN: the token, not
/// the key's label, is the boundary), and key and PIN files inside
/// `<key directory>/<instance>/`.
#[derive(Debug, Clone, Default)]
pub struct KeyRules {
    /// Modules a `pkcs11:` URI may name (`module-path`; none named means the first). Empty:
    /// no token keys through the admin API.
    pub modules: Vec<PathBuf>,
    /// The directory of the instances' directories of key and PIN files; `None`: no files
    /// through the admin API.
    pub key_directory: Option<PathBuf>,
}

impl KeyRules {
    /// Checks instance `ns`'s `pkcs11:` URI: parsed, its module allowed (filled in when it
    /// names none), its token the instance's, its PIN only by a file of the instance's (a PIN
    /// in the URI would be stored in the database).
    pub fn token_uri(&self, ns: &str, text: &str) -> Result<Pkcs11Uri, KeyRefError> {
        let refused = |m: String| KeyRefError::Refused(m);
        let mut uri = Pkcs11Uri::parse(text).map_err(|e| refused(e.to_string()))?;
        if uri.has_pin_value() {
            return Err(refused(
                "the URI carries its PIN (pin-value); give it by pin-source, a file the server reads"
                    .into(),
            ));
        }
        let prefix = format!("{ns}:");
        if !uri
            .token
            .as_deref()
            .is_some_and(|t| t == ns || t.starts_with(&prefix))
        {
            return Err(refused(format!(
                "the URI must name a token of this instance: labelled '{ns}' or '{prefix}...'"
            )));
        }
        match &uri.module_path {
            Some(module) if !self.modules.iter().any(|m| m == module) => {
                return Err(refused(format!(
                    "module-path {} is not one of the modules the server allows (issuance.pkcs11_modules)",
                    module.display()
                )));
            }
            Some(_) => {}
            None => {
                uri.module_path = Some(self.modules.first().cloned().ok_or_else(|| {
                    refused(
                        "the server allows no PKCS#11 module to the admin API (issuance.pkcs11_modules)"
                            .into(),
                    )
                })?);
            }
        }
        if let Some(pin) = &uri.pin_source {
            uri.pin_source = Some(self.instance_file(ns, pin, "the PIN file")?);
        }
        Ok(uri)
    }

    /// Checks instance `ns`'s key file: inside `<key directory>/<ns>/` (a relative path is
    /// taken from there), after resolving links.
    pub fn key_file(&self, ns: &str, path: &str) -> Result<PathBuf, KeyRefError> {
        self.instance_file(ns, Path::new(path), "the key file")
    }

    /// A regular file inside `<key directory>/<ns>/`, links resolved.
    fn instance_file(&self, ns: &str, path: &Path, what: &str) -> Result<PathBuf, KeyRefError> {
        let directory = self.key_directory.as_ref().ok_or_else(|| {
            KeyRefError::Refused(format!(
                "this server takes no files through the admin API (issuance.key_directory is not set), so {what} cannot be used"
            ))
        })?;
        let directory = directory.join(ns);
        let outside = || {
            KeyRefError::Refused(format!(
                "{what} must be a file inside {}",
                directory.display()
            ))
        };
        let canonical = directory.canonicalize().map_err(|_| outside())?;
        let joined = directory.join(path);
        let lexically_inside = joined.starts_with(&directory)
            && !joined
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        let file = joined.canonicalize().map_err(|_| {
            // Gone from where it is allowed to be (it may come back): said as such; about
            // other places nothing is said.
            if lexically_inside {
                KeyRefError::Failed(format!("{what} {} does not exist", joined.display()))
            } else {
                outside()
            }
        })?;
        if !file.starts_with(&canonical) || !file.is_file() {
            return Err(outside());
        }
        Ok(file)
    }
}

/// Opens a token key with `sessions` sessions; warns when the token does not keep it to
/// itself.
fn open_token_key(name: &str, uri: &Pkcs11Uri, sessions: usize) -> Result<Signer, KeyRefError> {
    let key = PrivateKey::open(uri, None, sessions).map_err(|e| match e {
        dps_pkcs11::Pkcs11Error::Uri(m) => KeyRefError::Refused(m),
        other => KeyRefError::Failed(format!("opening the token key: {other}")),
    })?;
    if !key.is_protected().unwrap_or(false) {
        tracing::warn!(
            ca = name,
            "the issuing CA's key is not marked sensitive and never-extractable in its token: it may have been, or may be, copied out"
        );
    }
    Ok(Signer::Token(key))
}

/// Sessions of a CA key that signs certificates: one per core (they are signed on blocking
/// threads, as many at once as there are cores).
fn signing_sessions() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Opens the key a configured CA's `key` names: a `pkcs11:` URI, else a PEM file's path.
fn open_configured_key(name: &str, key: &str) -> anyhow::Result<Signer> {
    if key.starts_with("pkcs11:") {
        let uri = Pkcs11Uri::parse(key).with_context(|| format!("issuance CA '{name}'"))?;
        return open_token_key(name, &uri, signing_sessions())
            .with_context(|| format!("issuance CA '{name}'"));
    }
    let path = key.strip_prefix("file:").unwrap_or(key);
    Signer::from_pem_file(Path::new(path)).map_err(|e| anyhow::anyhow!("issuance CA '{name}': {e}"))
}

/// Opens instance `ns`'s CA key under `rules`, with `sessions` sessions for a token key.
pub fn open_instance_key(
    ns: &str,
    name: &str,
    key: &dps_protocol::admin::CaKey,
    rules: &KeyRules,
    sessions: usize,
) -> Result<Signer, KeyRefError> {
    match (&key.pkcs11_uri, &key.file) {
        (Some(uri), None) => open_token_key(name, &rules.token_uri(ns, uri)?, sessions),
        (None, Some(file)) => {
            Signer::from_pem_file(&rules.key_file(ns, file)?).map_err(KeyRefError::Failed)
        }
        _ => Err(KeyRefError::Refused(
            "key: give exactly one of pkcs11Uri and file".into(),
        )),
    }
}

/// The DER certificates of a PEM chain.
pub fn chain_of(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate in the chain".into());
    }
    Ok(chain.into_iter().map(|c| c.to_vec()).collect())
}

/// The key types of a policy, by name.
pub fn key_types(names: &[String]) -> Result<Vec<KeyType>, String> {
    let types = names
        .iter()
        .map(|k| {
            KeyType::parse(k).ok_or_else(|| {
                format!("key type '{k}' is not one of ecP256, ecP384, rsa2048, rsa3072")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if types.is_empty() {
        return Err("no key types".into());
    }
    Ok(types)
}

/// A credential policy, ready to issue.
#[derive(Debug)]
struct Policy {
    ca_name: String,
    ca: Arc<IssuingCa<Signer>>,
    profile: Profile,
    key_types: Vec<KeyType>,
}

/// An instance's CA as last opened: kept while its document is the same.
type OpenedCa = (CertificateAuthority, Arc<IssuingCa<Signer>>);

/// The configured credential policies by lower-case name, and the instances' CAs opened so far.
#[derive(Debug, Default)]
pub struct Issuance {
    policies: HashMap<String, Policy>,
    /// What an instance's CA keys may name.
    pub rules: KeyRules,
    opened: Mutex<HashMap<(String, String), OpenedCa>>,
}

/// A certificate just issued: the chain for the device, and the record kept of it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Base64 DER, the new certificate first, then the CA's chain.
    pub chain: Vec<String>,
    /// What the admin API shows of it.
    pub record: IssuedCertificate,
    /// Unix seconds of its notAfter.
    pub expires_at: i64,
}

/// Why no certificate was issued: the registration fails with this code and message, or,
/// with [`ErrorCode::ServiceUnavailable`] (a CA that cannot sign now: the server's fault, not
/// the device's), the request is answered 503 for the device to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotIssued(pub ErrorCode, pub String);

fn not_issued(message: String) -> NotIssued {
    NotIssued(ErrorCode::CertificateNotIssued, message)
}

fn cannot_sign_now(message: String) -> NotIssued {
    NotIssued(ErrorCode::ServiceUnavailable, message)
}

impl Issuance {
    /// Reads every CA's chain and key and checks that the key signs for the chain's first
    /// certificate; checks every policy's CA, validity and key types.
    pub fn load(config: &IssuanceConfig) -> anyhow::Result<Self> {
        let mut cas = HashMap::new();
        for (name, ca) in &config.certificate_authorities {
            let path = ca.certificate_chain.display();
            let chain = std::fs::read_to_string(&ca.certificate_chain)
                .map_err(|e| e.to_string())
                .and_then(|pem| chain_of(&pem))
                .map_err(|e| anyhow::anyhow!("issuance CA '{name}': {path}: {e}"))?;
            let key = open_configured_key(name, &ca.key)?;
            let issuing =
                IssuingCa::new(chain, key).with_context(|| format!("issuance CA '{name}'"))?;
            cas.insert(name.clone(), Arc::new(issuing));
        }
        let mut policies = HashMap::new();
        for (name, policy) in &config.credential_policies {
            // The name enrollments give as credentialPolicyName, so it must be one they can.
            dps_protocol::ids::check_name("credential policy name", name, 128)
                .with_context(|| format!("credential policy '{name}'"))?;
            let ca = cas.get(&policy.certificate_authority).with_context(|| {
                format!(
                    "credential policy '{name}': no issuance CA named '{}'",
                    policy.certificate_authority
                )
            })?;
            anyhow::ensure!(
                (1..=MAX_VALIDITY_DAYS).contains(&policy.validity_days),
                "credential policy '{name}': validity_days must be 1 to {MAX_VALIDITY_DAYS}"
            );
            let key_types = key_types(&policy.key_types)
                .map_err(|e| anyhow::anyhow!("credential policy '{name}': {e}"))?;
            for dns in &policy.dns_names {
                dps_protocol::ids::check_host_name(dns)
                    .map_err(|e| anyhow::anyhow!("credential policy '{name}': dns_names: {e}"))?;
            }
            anyhow::ensure!(
                !policies.contains_key(&name.to_ascii_lowercase()),
                "credential policy '{name}': another policy has this name in another case (names are compared ignoring case)"
            );
            policies.insert(
                name.to_ascii_lowercase(),
                Policy {
                    ca_name: policy.certificate_authority.clone(),
                    ca: ca.clone(),
                    profile: Profile {
                        validity: days(policy.validity_days),
                        dns_names: policy.dns_names.clone(),
                    },
                    key_types,
                },
            );
        }
        Ok(Self {
            policies,
            rules: KeyRules {
                modules: config.pkcs11_modules.clone(),
                key_directory: config.key_directory.clone(),
            },
            opened: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a policy of this name is configured (an instance cannot have its own of it).
    pub fn is_configured(&self, policy: &str) -> bool {
        self.policies.contains_key(&policy.to_ascii_lowercase())
    }

    /// The instance's policy `name` (from `credentials`) and its CA's document, unopened.
    fn instance_policy<'c>(
        credentials: &'c Credentials,
        name: &str,
    ) -> Result<(&'c CredentialPolicy, &'c CertificateAuthority, Vec<KeyType>), NotIssued> {
        let policy = credentials.credential_policy(name).ok_or_else(|| {
            not_issued(format!(
                "the enrollment's credential policy '{name}' does not exist"
            ))
        })?;
        let ca_name = &policy.certificate_authority_name;
        let ca = credentials.certificate_authority(ca_name).ok_or_else(|| {
            not_issued(format!(
                "credential policy '{name}' names issuing CA '{ca_name}', which does not exist"
            ))
        })?;
        let key_types = key_types(&policy.key_types)
            .map_err(|e| not_issued(format!("credential policy '{name}': {e}")))?;
        Ok((policy, ca, key_types))
    }

    /// The instance's CA `ca`, opened (its key, its chain checked), or as opened before.
    /// Opening fails for good (a key reference the rules refuse, a chain that does not
    /// parse, a key that does not sign for it: 400210, the admin's to fix) or for now (the
    /// token or file failed: 503). CAs the instance no longer has are let go when another is
    /// opened.
    fn open_instance_ca(
        &self,
        ns: &str,
        credentials: &Credentials,
        ca: &CertificateAuthority,
    ) -> Result<Arc<IssuingCa<Signer>>, NotIssued> {
        let slot = (ns.to_owned(), ca.name.to_ascii_lowercase());
        if let Ok(opened) = self.opened.lock()
            && let Some((doc, issuing)) = opened.get(&slot)
            && doc == ca
        {
            return Ok(issuing.clone());
        }
        let unusable = |why: String| {
            tracing::error!(ca = %ca.name, error = %why, "an issuing CA cannot be used");
            not_issued(format!(
                "issuing CA '{}' cannot be used; the server log says why",
                ca.name
            ))
        };
        let Some(chain) = &ca.certificate_chain else {
            return Err(not_issued(format!(
                "issuing CA '{}' has no certificate yet",
                ca.name
            )));
        };
        let chain = chain_of(chain).map_err(unusable)?;
        let key = open_instance_key(ns, &ca.name, &ca.key, &self.rules, signing_sessions())
            .map_err(|e| match e {
                KeyRefError::Refused(why) => unusable(why),
                KeyRefError::Failed(why) => {
                    tracing::error!(ca = %ca.name, error = %why, "an issuing CA cannot sign now");
                    cannot_sign_now(format!(
                        "issuing CA '{}' cannot sign now; the server log says why",
                        ca.name
                    ))
                }
            })?;
        let issuing = Arc::new(IssuingCa::new(chain, key).map_err(|e| unusable(e.to_string()))?);
        if let Ok(mut opened) = self.opened.lock() {
            opened.retain(|(instance, name), _| {
                instance != ns || credentials.certificate_authority(name).is_some()
            });
            opened.insert(slot, (ca.clone(), issuing.clone()));
        }
        Ok(issuing)
    }

    /// Issues a certificate for `csr` (base64 DER PKCS#10) to device `registration_id` of
    /// instance `ns` under the credential policy `policy` its enrollment names: the chain as
    /// the device receives it, and the record to keep.
    pub fn issue(
        &self,
        ns: &str,
        credentials: &Credentials,
        policy: Option<&str>,
        registration_id: &str,
        csr: &str,
    ) -> Result<Issued, NotIssued> {
        let name = policy.ok_or_else(|| {
            not_issued(
                "the device sent a csr, but its enrollment names no credentialPolicyName".into(),
            )
        })?;
        // What the policy allows is known without opening its CA: the request is checked first,
        // so that no token is touched for one that is refused.
        let configured = self.policies.get(&name.to_ascii_lowercase());
        let instance = match configured {
            Some(_) => None,
            None => Some(Self::instance_policy(credentials, name)?),
        };
        let allowed = match (configured, &instance) {
            (Some(policy), _) => policy.key_types.as_slice(),
            (None, Some((_, _, key_types))) => key_types.as_slice(),
            (None, None) => &[],
        };
        let invalid = |message: String| NotIssued(ErrorCode::InvalidCertificateRequest, message);
        // Base64 of the largest request accepted, with padding.
        if csr.len() > MAX_CSR_BYTES.div_ceil(3) * 4 {
            return Err(invalid(format!(
                "the csr is larger than {MAX_CSR_BYTES} bytes"
            )));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(csr.trim())
            .map_err(|_| {
                invalid("the csr is not base64 (DER PKCS#10, without PEM armour)".into())
            })?;
        let checked =
            check_csr(&der, registration_id, allowed).map_err(|e| invalid(e.to_string()))?;
        let (ca_name, ca, profile) = match (configured, instance) {
            (Some(policy), _) => (
                policy.ca_name.clone(),
                policy.ca.clone(),
                policy.profile.clone(),
            ),
            (None, Some((policy, ca, _))) => (
                ca.name.clone(),
                self.open_instance_ca(ns, credentials, ca)?,
                Profile {
                    validity: days(policy.validity_in_days.unwrap_or(DEFAULT_VALIDITY_DAYS)),
                    dns_names: policy.dns_names.clone(),
                },
            ),
            (None, None) => return Err(not_issued(format!("no credential policy '{name}'"))),
        };
        let issued = ca
            .issue(
                &checked,
                registration_id,
                &profile,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(|e| {
                tracing::error!(error = %e, "the issuing CA could not sign a certificate");
                cannot_sign_now("the issuing CA could not sign the certificate".into())
            })?;
        tracing::info!(
            registration_id,
            serial = %issued.serial,
            thumbprint = %issued.sha256_thumbprint,
            "certificate issued"
        );
        let rfc3339 = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        Ok(Issued {
            chain: issued
                .chain
                .iter()
                .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
                .collect(),
            record: IssuedCertificate {
                serial_number: normal_serial(&issued.serial).unwrap_or(issued.serial),
                registration_id: registration_id.to_owned(),
                sha256_thumbprint: issued.sha256_thumbprint,
                credential_policy_name: name.to_owned(),
                certificate_authority_name: ca_name,
                not_before: rfc3339(issued.not_before),
                not_after: rfc3339(issued.not_after),
                issued_date_time_utc: None,
                revoked_date_time_utc: None,
                revocation_reason: None,
                etag: None,
            },
            expires_at: issued.not_after.unix_timestamp(),
        })
    }
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}
