//! Operational certificates for devices that send a certificate signing request (`csr`): the
//! credential policy their enrollment names (`credentialPolicyName`) picks an issuing CA, a
//! validity and the key types it accepts. CAs and policies come from the configuration
//! (`[issuance]`), loaded and checked at start. A CA's key is a PEM file or a key inside a
//! PKCS#11 token, which then signs every certificate in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use attestation::issuance::{IssuingCa, KeyType, MAX_CSR_BYTES, Profile, check_csr};
use attestation::x509::parse_der;
use base64::Engine;
use dps_pkcs11::{Pkcs11Uri, PrivateKey, Signer};
use dps_protocol::ErrorCode;
use dps_protocol::admin::IssuedCertificate;
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::format_description::well_known::Rfc3339;

use crate::config::IssuanceConfig;
use crate::domain::validate::normal_serial;

/// Opens the key an issuing CA's `key` names: a `pkcs11:` URI, else a PEM file's path.
fn open_ca_key(name: &str, key: &str) -> anyhow::Result<Signer> {
    if key.starts_with("pkcs11:") {
        let uri = Pkcs11Uri::parse(key).with_context(|| format!("issuance CA '{name}'"))?;
        // One session per core: certificates are signed on the request threads.
        let sessions = std::thread::available_parallelism().map_or(2, |n| n.get());
        let key = PrivateKey::open(&uri, None, sessions)
            .with_context(|| format!("issuance CA '{name}': opening the token key"))?;
        if !key.is_protected().unwrap_or(false) {
            tracing::warn!(
                ca = name,
                "the issuing CA's key is not marked sensitive and never-extractable in its token: it may have been, or may be, copied out"
            );
        }
        return Ok(Signer::Token(key));
    }
    let path = key.strip_prefix("file:").unwrap_or(key);
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("issuance CA '{name}': reading {path}"))?;
    // The key's text is never part of an error message.
    let key = KeyPair::from_pem(&pem).map_err(|_| {
        anyhow::anyhow!(
            "issuance CA '{name}': {path} is not a PKCS#8 PEM private key of ECDSA P-256/P-384 or RSA"
        )
    })?;
    Ok(Signer::Memory(Box::new(key)))
}

/// A credential policy, ready to issue.
#[derive(Debug)]
struct Policy {
    ca_name: String,
    ca: Arc<IssuingCa<Signer>>,
    profile: Profile,
    key_types: Vec<KeyType>,
}

/// The configured credential policies by name.
#[derive(Debug, Default)]
pub struct Issuance {
    policies: HashMap<String, Policy>,
    /// The issuing CAs' subject names: a certificate whose issuer is one of them may be one
    /// this server issued (and revoked).
    ca_subjects: Vec<String>,
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

/// Why no certificate was issued: the registration fails with this code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotIssued(pub ErrorCode, pub String);

impl Issuance {
    /// Reads every CA's chain and key and checks that the key signs for the chain's first
    /// certificate; checks every policy's CA, validity and key types.
    pub fn load(config: &IssuanceConfig) -> anyhow::Result<Self> {
        let mut cas = HashMap::new();
        let mut ca_subjects = Vec::new();
        for (name, ca) in &config.certificate_authorities {
            let chain = CertificateDer::pem_file_iter(&ca.certificate_chain)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| {
                    format!(
                        "issuance CA '{name}': reading {}",
                        ca.certificate_chain.display()
                    )
                })?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            let key = open_ca_key(name, &ca.key)?;
            let issuing =
                IssuingCa::new(chain, key).with_context(|| format!("issuance CA '{name}'"))?;
            if let Some(own) = issuing.chain().first().and_then(|der| parse_der(der).ok()) {
                ca_subjects.push(own.facts.subject_name.clone());
            }
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
                (1..=3650).contains(&policy.validity_days),
                "credential policy '{name}': validity_days must be 1 to 3650"
            );
            let key_types = policy
                .key_types
                .iter()
                .map(|k| {
                    KeyType::parse(k).with_context(|| {
                        format!(
                            "credential policy '{name}': key type '{k}' is not one of ecP256, ecP384, rsa2048, rsa3072"
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(
                !key_types.is_empty(),
                "credential policy '{name}': key_types is empty"
            );
            policies.insert(
                name.clone(),
                Policy {
                    ca_name: policy.certificate_authority.clone(),
                    ca: ca.clone(),
                    profile: Profile {
                        validity: Duration::from_secs(u64::from(policy.validity_days) * 86_400),
                        dns_names: policy.dns_names.clone(),
                    },
                    key_types,
                },
            );
        }
        Ok(Self {
            policies,
            ca_subjects,
        })
    }

    /// Whether a certificate naming `issuer` may have been issued by this server.
    pub fn may_have_issued(&self, issuer: &str) -> bool {
        self.ca_subjects.iter().any(|s| s == issuer)
    }

    /// Issues a certificate for `csr` (base64 DER PKCS#10) to device `registration_id` under
    /// the credential policy `policy` its enrollment names: the chain as the device receives
    /// it, and the record to keep.
    pub fn issue(
        &self,
        policy: Option<&str>,
        registration_id: &str,
        csr: &str,
    ) -> Result<Issued, NotIssued> {
        let name = policy.ok_or_else(|| {
            NotIssued(
                ErrorCode::CertificateNotIssued,
                "the device sent a csr, but its enrollment names no credentialPolicyName".into(),
            )
        })?;
        let policy = self.policies.get(name).ok_or_else(|| {
            NotIssued(
                ErrorCode::CertificateNotIssued,
                format!(
                    "the enrollment's credential policy '{name}' is not configured on this server"
                ),
            )
        })?;
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
        let checked = check_csr(&der, registration_id, &policy.key_types)
            .map_err(|e| invalid(e.to_string()))?;
        let issued = policy
            .ca
            .issue(
                &checked,
                registration_id,
                &policy.profile,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(|e| {
                tracing::error!(error = %e, "the issuing CA could not sign a certificate");
                NotIssued(
                    ErrorCode::CertificateNotIssued,
                    "the issuing CA could not sign the certificate".into(),
                )
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
                certificate_authority_name: policy.ca_name.clone(),
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
