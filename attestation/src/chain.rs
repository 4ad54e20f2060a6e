//! Device certificates presented in the TLS handshake: the checks every leaf must pass, and
//! chain verification (rustls-webpki) from the leaf to a certificate an enrollment trusts.
//!
//! The TLS layer has already checked that the client holds the leaf's private key. What is left
//! is whether the leaf may stand for the registration id it asks for, and, for enrollment
//! groups, whether it chains to one of the group's signing certificates (a root or an
//! intermediate; the device sends the certificates between its leaf and that anchor).

use der::Decode;
use der::oid::ObjectIdentifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert::Certificate;
use x509_cert::ext::pkix::ExtendedKeyUsage;

use crate::x509::{ParsedCertificate, facts_of};

/// Most certificates a device may present, leaf included.
pub const MAX_CHAIN_CERTIFICATES: usize = 6;
/// Longest common name (the X.520 upper bound; Azure's limit on X.509 registration ids).
pub const MAX_COMMON_NAME: usize = 64;

const CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");
const ANY_EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37.0");

/// Why a presented certificate does not admit the device. Messages name no secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No certificate was presented.
    #[error("the device presented no client certificate")]
    Missing,
    /// More certificates than [`MAX_CHAIN_CERTIFICATES`].
    #[error("the device presented {0} certificates; at most {MAX_CHAIN_CERTIFICATES} are accepted")]
    TooLong(usize),
    /// The leaf does not parse.
    #[error("the device certificate is not a valid X.509 certificate")]
    Malformed,
    /// The certificate parses, but not as the verifier needs (version 1, an unknown critical
    /// extension, unique identifiers, ...).
    #[error(
        "the certificate is not one rustls-webpki accepts (a version 3 certificate without unknown critical extensions): {0}"
    )]
    Unsupported(String),
    /// The leaf has no common name, or one longer than [`MAX_COMMON_NAME`].
    #[error("the device certificate needs a common name of 1 to {MAX_COMMON_NAME} characters")]
    CommonName,
    /// The leaf's common name is not the registration id.
    #[error("the device certificate's common name '{common_name}' is not the registration id")]
    CommonNameMismatch {
        /// What the certificate says.
        common_name: String,
    },
    /// The leaf is a CA certificate.
    #[error("the device certificate is a CA certificate (basic constraints CA:true)")]
    LeafIsCa,
    /// Not yet valid.
    #[error("the device certificate is not valid before {0}")]
    NotYetValid(String),
    /// Expired.
    #[error("the device certificate expired at {0}")]
    Expired(String),
    /// Its extended key usage does not allow client authentication.
    #[error("the device certificate's extended key usage does not include clientAuth")]
    NoClientAuth,
    /// The chain does not lead to a trusted certificate, or a certificate in it is unusable.
    #[error("the certificate chain does not verify to a trusted certificate: {0}")]
    Untrusted(String),
}

/// Checks the leaf of `chain` (leaf first) for `registration_id` at `now` (Unix seconds):
/// size of the chain, a common name equal to the registration id (ignoring ASCII case, as
/// registration ids do), not a CA, inside its validity period, and an extended key usage that
/// allows client authentication when it has one.
pub fn check_leaf(
    chain: &[Vec<u8>],
    registration_id: &str,
    now: u64,
) -> Result<ParsedCertificate, ChainError> {
    let leaf = chain.first().ok_or(ChainError::Missing)?;
    if chain.len() > MAX_CHAIN_CERTIFICATES {
        return Err(ChainError::TooLong(chain.len()));
    }
    check_end_entity(leaf)?;
    let cert = Certificate::from_der(leaf).map_err(|_| ChainError::Malformed)?;
    let facts = facts_of(&cert, leaf).map_err(|_| ChainError::Malformed)?;
    let tbs = cert.tbs_certificate();
    let common_name = common_name_of(&cert)
        .filter(|cn| !cn.is_empty() && cn.chars().count() <= MAX_COMMON_NAME)
        .ok_or(ChainError::CommonName)?;
    if !common_name.eq_ignore_ascii_case(registration_id) {
        return Err(ChainError::CommonNameMismatch { common_name });
    }
    if facts.is_ca {
        return Err(ChainError::LeafIsCa);
    }
    let validity = tbs.validity();
    if now < validity.not_before.to_unix_duration().as_secs() {
        return Err(ChainError::NotYetValid(facts.not_before_utc));
    }
    if now > validity.not_after.to_unix_duration().as_secs() {
        return Err(ChainError::Expired(facts.not_after_utc));
    }
    let usages = tbs
        .get_extension::<ExtendedKeyUsage>()
        .map_err(|_| ChainError::Malformed)?;
    if let Some((_, ExtendedKeyUsage(oids))) = usages
        && !oids
            .iter()
            .any(|oid| *oid == CLIENT_AUTH || *oid == ANY_EXTENDED_KEY_USAGE)
    {
        return Err(ChainError::NoClientAuth);
    }
    Ok(ParsedCertificate {
        der: leaf.clone(),
        facts,
    })
}

/// Checks that rustls-webpki, which verifies handshake signatures and chains, can parse `der`
/// as a device certificate. A certificate only a lenient parser reads (version 1, an unknown
/// critical extension, unique identifiers) would have no proof of possession behind it, so it
/// stands for no device.
pub fn check_end_entity(der: &[u8]) -> Result<(), ChainError> {
    let der = CertificateDer::from(der);
    webpki::EndEntityCert::try_from(&der)
        .map(|_| ())
        .map_err(|e| ChainError::Unsupported(format!("{e:?}")))
}

/// Checks that rustls-webpki can use `der` as a trust anchor (a group's signing certificate or
/// an uploaded CA certificate).
pub fn check_anchor(der: &[u8]) -> Result<(), ChainError> {
    let der = CertificateDer::from(der);
    webpki::anchor_from_trusted_cert(&der)
        .map(|_| ())
        .map_err(|e| ChainError::Unsupported(format!("{e:?}")))
}

fn common_name_of(cert: &Certificate) -> Option<String> {
    cert.tbs_certificate()
        .subject()
        .common_name()
        .ok()
        .flatten()
        .map(|cn| cn.value().into_owned())
}

/// The subject common name of a DER certificate, if it parses and has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    common_name_of(&Certificate::from_der(der).ok()?)
}

/// Verifies that `chain` (leaf first, then the intermediates the device sent) leads to
/// `anchor` (DER), a root or an intermediate the enrollment trusts, for client authentication
/// at `now`: signatures, validity periods, basic constraints, key usage and the clientAuth EKU
/// along the path. RSA of 2048 bits and more, ECDSA P-256 and P-384. `extra` are more
/// intermediates the path may use (ones an admin uploaded, for devices that send only their
/// leaf); they confer no trust of their own. Returns the intermediates of the verified path,
/// from the leaf's issuer up (neither the leaf nor the anchor).
pub fn verify_chain(
    chain: &[Vec<u8>],
    anchor: &[u8],
    extra: &[Vec<u8>],
    now: u64,
) -> Result<Vec<Vec<u8>>, ChainError> {
    let leaf = chain.first().ok_or(ChainError::Missing)?;
    if chain.len() > MAX_CHAIN_CERTIFICATES {
        return Err(ChainError::TooLong(chain.len()));
    }
    let untrusted = |e: webpki::Error| ChainError::Untrusted(format!("{e:?}"));
    let anchor_der = CertificateDer::from(anchor);
    let anchor = webpki::anchor_from_trusted_cert(&anchor_der).map_err(untrusted)?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).map_err(|_| ChainError::Malformed)?;
    let intermediates: Vec<CertificateDer<'_>> = chain
        .iter()
        .skip(1)
        .chain(extra)
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &intermediates,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|path| {
        path.intermediate_certificates()
            .map(|c| c.der().to_vec())
            .collect()
    })
    .map_err(untrusted)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    use super::*;

    const NOW: u64 = 1_795_000_000; // 2026-11-17

    struct Ca {
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = match parent {
            Some(parent) => params.signed_by(&key, &parent.issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        Ca {
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(cn: &str, issuer: &Ca, adjust: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        adjust(&mut params);
        params
            .signed_by(&key, &issuer.issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    fn at(unix: u64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(unix as i64).unwrap()
    }

    #[test]
    fn a_leaf_chains_to_its_root_or_intermediate() {
        let root = ca("Root", None);
        let intermediate = ca("Intermediate", Some(&root));
        let device = leaf("dev-1", &intermediate, |_| {});
        let chain = vec![device.clone(), intermediate.der.clone()];
        assert_eq!(
            check_leaf(&chain, "DEV-1", NOW).unwrap().facts.subject_name,
            "CN=dev-1"
        );
        assert_eq!(
            verify_chain(&chain, &root.der, &[], NOW).unwrap(),
            std::slice::from_ref(&intermediate.der),
            "the path's intermediates"
        );
        assert!(
            verify_chain(std::slice::from_ref(&device), &intermediate.der, &[], NOW)
                .unwrap()
                .is_empty()
        );
        // Only the leaf, anchored at the root: the intermediate is missing.
        assert!(matches!(
            verify_chain(std::slice::from_ref(&device), &root.der, &[], NOW),
            Err(ChainError::Untrusted(_))
        ));
        // An uploaded intermediate completes the path; it is not trusted on its own.
        verify_chain(
            std::slice::from_ref(&device),
            &root.der,
            std::slice::from_ref(&intermediate.der),
            NOW,
        )
        .unwrap();
        assert_eq!(common_name(&device).as_deref(), Some("dev-1"));
        let stranger = ca("Other Root", None);
        assert!(matches!(
            verify_chain(&chain, &stranger.der, &[], NOW),
            Err(ChainError::Untrusted(_))
        ));
    }

    #[test]
    fn leaves_are_checked_before_any_chain() {
        let root = ca("Root", None);
        let check = |der: Vec<u8>| check_leaf(&[der], "dev-1", NOW);
        assert_eq!(
            check(leaf("dev-2", &root, |_| {})).unwrap_err(),
            ChainError::CommonNameMismatch {
                common_name: "dev-2".into()
            }
        );
        assert_eq!(
            check(leaf("dev-1", &root, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }))
            .unwrap_err(),
            ChainError::LeafIsCa
        );
        assert!(matches!(
            check(leaf("dev-1", &root, |p| p.not_after = at(NOW - 10))),
            Err(ChainError::Expired(_))
        ));
        assert!(matches!(
            check(leaf("dev-1", &root, |p| p.not_before = at(NOW + 3600))),
            Err(ChainError::NotYetValid(_))
        ));
        assert_eq!(
            check(leaf("dev-1", &root, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
            }))
            .unwrap_err(),
            ChainError::NoClientAuth
        );
        let long = "d".repeat(65);
        assert_eq!(
            check_leaf(&[leaf(&long, &root, |_| {})], &long, NOW).unwrap_err(),
            ChainError::CommonName
        );
        assert!(matches!(
            check(b"garbage".to_vec()).unwrap_err(),
            ChainError::Unsupported(_)
        ));
        assert_eq!(
            check_leaf(&[], "dev-1", NOW).unwrap_err(),
            ChainError::Missing
        );
        let ok = leaf("dev-1", &root, |_| {});
        assert_eq!(
            check_leaf(&vec![ok; 7], "dev-1", NOW).unwrap_err(),
            ChainError::TooLong(7)
        );
    }
}
