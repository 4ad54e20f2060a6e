//! Facts read from an X.509 certificate that an admin uploads (enrollment certificates).
//! Chain verification for devices lives with X.509 attestation; this module only parses.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use der::{Decode, Encode};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_cert::Certificate;
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::BasicConstraints;

/// Largest certificate accepted, in bytes of DER.
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    /// Neither PEM nor base64 DER.
    #[error("the certificate is neither PEM nor base64-encoded DER")]
    NotPemOrBase64,
    /// More than one certificate where one was expected.
    #[error("expected one certificate, found {0}")]
    NotExactlyOne(usize),
    /// Larger than [`MAX_CERTIFICATE_BYTES`].
    #[error("the certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")]
    TooLarge,
    /// The DER does not parse as an X.509 certificate.
    #[error("the certificate is not a valid X.509 certificate: {0}")]
    Malformed(String),
}

/// What the service shows about a certificate (`X509CertificateInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Subject DN (RFC 4514).
    pub subject_name: String,
    /// Issuer DN (RFC 4514).
    pub issuer_name: String,
    /// SHA-1 of the DER, upper-case hex.
    pub sha1_thumbprint: String,
    /// SHA-256 of the DER, upper-case hex.
    pub sha256_thumbprint: String,
    /// Start of validity, RFC 3339.
    pub not_before_utc: String,
    /// End of validity, RFC 3339.
    pub not_after_utc: String,
    /// Serial number, upper-case hex.
    pub serial_number: String,
    /// 1, 2 or 3.
    pub version: u32,
    /// Basic constraints say CA:true.
    pub is_ca: bool,
    /// The subject name as DER: what an issuer name must equal, byte for byte, for this
    /// certificate to have issued a certificate (how path building matches names).
    pub subject_der: Vec<u8>,
    /// The issuer name as DER.
    pub issuer_der: Vec<u8>,
}

/// A parsed certificate and its DER bytes.
#[derive(Debug, Clone)]
pub struct ParsedCertificate {
    /// The DER encoding.
    pub der: Vec<u8>,
    /// What it says.
    pub facts: CertificateFacts,
}

/// Parses one certificate given as PEM or as base64 DER (both forms appear in Azure payloads).
pub fn parse_certificate(text: &str) -> Result<ParsedCertificate, CertificateError> {
    let text = text.trim();
    let der = if text.starts_with("-----BEGIN") {
        let certs = Certificate::load_pem_chain(text.as_bytes())
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        match certs.as_slice() {
            [one] => one
                .to_der()
                .map_err(|e| CertificateError::Malformed(e.to_string()))?,
            many => return Err(CertificateError::NotExactlyOne(many.len())),
        }
    } else {
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| CertificateError::NotPemOrBase64)?
    };
    parse_der(&der)
}

/// Certificates already parsed, by their text: stored enrollment and CA certificates are read
/// on every X.509 registration, and parsing (DER, two digests, dates) is most of that cost. A
/// changed certificate is a different text, so entries never go stale; the cache empties
/// itself when it holds more than [`ParsedCache::CAPACITY`] certificates.
#[derive(Debug, Default)]
pub struct ParsedCache {
    parsed: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<ParsedCertificate>>>,
}

impl ParsedCache {
    /// Most certificates kept.
    pub const CAPACITY: usize = 10_000;

    /// [`parse_certificate`], remembered.
    pub fn parse(&self, text: &str) -> Result<std::sync::Arc<ParsedCertificate>, CertificateError> {
        if let Ok(parsed) = self.parsed.lock()
            && let Some(hit) = parsed.get(text)
        {
            return Ok(hit.clone());
        }
        let fresh = std::sync::Arc::new(parse_certificate(text)?);
        if let Ok(mut parsed) = self.parsed.lock() {
            if parsed.len() >= Self::CAPACITY {
                parsed.clear();
            }
            parsed.insert(text.to_owned(), fresh.clone());
        }
        Ok(fresh)
    }
}

/// Parses one DER certificate.
pub fn parse_der(der: &[u8]) -> Result<ParsedCertificate, CertificateError> {
    if der.len() > MAX_CERTIFICATE_BYTES {
        return Err(CertificateError::TooLarge);
    }
    let cert =
        Certificate::from_der(der).map_err(|e| CertificateError::Malformed(e.to_string()))?;
    let facts = facts_of(&cert, der)?;
    Ok(ParsedCertificate {
        der: der.to_vec(),
        facts,
    })
}

pub(crate) fn facts_of(
    cert: &Certificate,
    der: &[u8],
) -> Result<CertificateFacts, CertificateError> {
    let tbs = cert.tbs_certificate();
    let validity = tbs.validity();
    let is_ca = tbs
        .get_extension::<BasicConstraints>()
        .map_err(|e| CertificateError::Malformed(e.to_string()))?
        .is_some_and(|(_, bc)| bc.ca);
    Ok(CertificateFacts {
        subject_name: tbs.subject().to_string(),
        issuer_name: tbs.issuer().to_string(),
        sha1_thumbprint: upper_hex(&Sha1::digest(der)),
        sha256_thumbprint: upper_hex(&Sha256::digest(der)),
        not_before_utc: rfc3339(validity.not_before.to_unix_duration().as_secs())?,
        not_after_utc: rfc3339(validity.not_after.to_unix_duration().as_secs())?,
        serial_number: upper_hex(tbs.serial_number().as_bytes()),
        version: match tbs.version() {
            Version::V1 => 1,
            Version::V2 => 2,
            Version::V3 => 3,
        },
        is_ca,
        subject_der: tbs
            .subject()
            .to_der()
            .map_err(|e| CertificateError::Malformed(e.to_string()))?,
        issuer_der: tbs
            .issuer()
            .to_der()
            .map_err(|e| CertificateError::Malformed(e.to_string()))?,
    })
}

fn rfc3339(unix_seconds: u64) -> Result<String, CertificateError> {
    i64::try_from(unix_seconds)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| CertificateError::Malformed("validity date out of range".into()))
}

/// Upper-case hex without separators (how Azure prints thumbprints).
pub fn upper_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(ca: bool) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["dev-01".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dev-01");
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn pem_and_base64_der_give_the_same_facts() {
        let cert = self_signed(false);
        let from_pem = parse_certificate(&cert.pem()).unwrap();
        let from_b64 = parse_certificate(&STANDARD.encode(cert.der())).unwrap();
        assert_eq!(from_pem.facts, from_b64.facts);
        assert_eq!(from_pem.facts.subject_name, "CN=dev-01");
        assert_eq!(from_pem.facts.version, 3);
        assert_eq!(from_pem.facts.sha256_thumbprint.len(), 64);
        assert!(!from_pem.facts.is_ca);
        assert!(
            parse_certificate(&self_signed(true).pem())
                .unwrap()
                .facts
                .is_ca
        );
    }

    #[test]
    fn the_cache_parses_each_text_once_and_refuses_garbage() {
        let cache = ParsedCache::default();
        let pem = self_signed(false).pem();
        let first = cache.parse(&pem).unwrap();
        let second = cache.parse(&pem).unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &second));
        assert_eq!(*first.facts.subject_name, *"CN=dev-01");
        assert!(cache.parse("hello world!").is_err());
    }

    #[test]
    fn garbage_and_bundles_are_refused() {
        assert_eq!(
            parse_certificate("hello world!").unwrap_err(),
            CertificateError::NotPemOrBase64
        );
        assert!(matches!(
            parse_certificate(&STANDARD.encode(b"not a certificate")),
            Err(CertificateError::Malformed(_))
        ));
        let two = format!("{}{}", self_signed(false).pem(), self_signed(false).pem());
        assert_eq!(
            parse_certificate(&two).unwrap_err(),
            CertificateError::NotExactlyOne(2)
        );
    }
}
