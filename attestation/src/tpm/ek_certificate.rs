//! EK certificates: the TPM manufacturer's statement that an endorsement key lives in one of
//! its TPMs. TPM enrollment groups admit a device whose EK certificate chains to a configured
//! manufacturer certificate and certifies the very EK the device presents.

use der::Decode;
use rsa::PublicKey;
use rsa::pkcs1::DecodeRsaPublicKey;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert::Certificate;

use super::RsaPublic;

/// The TCG EK certificate extended key usage, 2.23.133.8.1, as DER content octets.
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];
/// Largest EK certificate accepted, in bytes of DER (they are about 1 KB).
pub const MAX_EK_CERTIFICATE_BYTES: usize = 8 * 1024;

/// Why an EK certificate does not admit a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkCertificateError {
    /// Not a DER X.509 certificate.
    #[error("the EK certificate is not a DER X.509 certificate")]
    Malformed,
    /// It does not chain to a trusted manufacturer certificate.
    #[error("the EK certificate does not chain to a trusted TPM manufacturer certificate: {0}")]
    Untrusted(String),
    /// It certifies another key.
    #[error("the EK certificate certifies a different key than the endorsement key presented")]
    KeyMismatch,
}

/// Checks `certificate` (DER) for `ek`: a path to one of `trusted` (DER; every one is an
/// anchor, so a manufacturer's issuing CA may be configured alone) valid at `now` (Unix
/// seconds), with the EK certificate usage when the certificate names usages, and a subject
/// key equal to the EK.
pub fn verify_ek_certificate(
    certificate: &[u8],
    ek: &RsaPublic,
    trusted: &[Vec<u8>],
    now: u64,
) -> Result<(), EkCertificateError> {
    if certificate.len() > MAX_EK_CERTIFICATE_BYTES {
        return Err(EkCertificateError::Malformed);
    }
    let parsed = Certificate::from_der(certificate).map_err(|_| EkCertificateError::Malformed)?;
    let spki = &parsed.tbs_certificate().subject_public_key_info();
    let certified = spki
        .subject_public_key
        .as_bytes()
        .and_then(|bits| PublicKey::from_pkcs1_der(bits).ok())
        .ok_or(EkCertificateError::KeyMismatch)?;
    if certified != ek.key {
        return Err(EkCertificateError::KeyMismatch);
    }

    let untrusted = |e: webpki::Error| EkCertificateError::Untrusted(format!("{e:?}"));
    let anchors: Vec<_> = trusted
        .iter()
        .filter_map(|der| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    let leaf_der = CertificateDer::from(certificate);
    let leaf =
        webpki::EndEntityCert::try_from(&leaf_der).map_err(|_| EkCertificateError::Malformed)?;
    let intermediates: Vec<CertificateDer<'_>> = trusted
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
        webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
        None,
        None,
    )
    .map(|_| ())
    .map_err(untrusted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        PublicKeyData, SignatureAlgorithm,
    };

    use super::*;
    use crate::tpm::KeyRole;
    use crate::tpm::soft::SoftTpm;

    const NOW: u64 = 1_800_000_000;

    struct Manufacturer {
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn manufacturer() -> Manufacturer {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Manufacturer {
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An RSA public key for rcgen: PKCS#1 DER.
    struct Rsa(Vec<u8>);

    impl PublicKeyData for Rsa {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }

        fn algorithm(&self) -> &'static SignatureAlgorithm {
            &rcgen::PKCS_RSA_SHA256
        }
    }

    fn ek_certificate(tpm: &SoftTpm, by: &Manufacturer, usage: &[u64]) -> Vec<u8> {
        let spki = Rsa(tpm.endorsement_key_pkcs1().unwrap());
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(usage.to_vec())];
        params.signed_by(&spki, &by.issuer).unwrap().der().to_vec()
    }

    fn ek(tpm: &SoftTpm) -> RsaPublic {
        RsaPublic::parse(&tpm.endorsement_key(), KeyRole::Endorsement).unwrap()
    }

    #[test]
    fn a_certificate_for_the_ek_from_a_trusted_manufacturer_admits() {
        let (tpm, maker) = (SoftTpm::fixture(0).unwrap(), manufacturer());
        let cert = ek_certificate(&tpm, &maker, &[2, 23, 133, 8, 1]);
        assert_eq!(
            verify_ek_certificate(&cert, &ek(&tpm), std::slice::from_ref(&maker.der), NOW),
            Ok(())
        );
    }

    #[test]
    fn another_key_another_manufacturer_or_usage_does_not() {
        let (tpm, maker) = (SoftTpm::fixture(0).unwrap(), manufacturer());
        let cert = ek_certificate(&tpm, &maker, &[2, 23, 133, 8, 1]);
        let other = SoftTpm::fixture(1).unwrap();
        assert_eq!(
            verify_ek_certificate(&cert, &ek(&other), std::slice::from_ref(&maker.der), NOW),
            Err(EkCertificateError::KeyMismatch)
        );
        assert!(matches!(
            verify_ek_certificate(&cert, &ek(&tpm), &[manufacturer().der], NOW),
            Err(EkCertificateError::Untrusted(_))
        ));
        assert!(matches!(
            verify_ek_certificate(&cert, &ek(&tpm), &[], NOW),
            Err(EkCertificateError::Untrusted(_))
        ));
        let server_auth = ek_certificate(&tpm, &maker, &[1, 3, 6, 1, 5, 5, 7, 3, 1]);
        assert!(matches!(
            verify_ek_certificate(
                &server_auth,
                &ek(&tpm),
                std::slice::from_ref(&maker.der),
                NOW
            ),
            Err(EkCertificateError::Untrusted(_))
        ));
        assert_eq!(
            verify_ek_certificate(b"not a certificate", &ek(&tpm), &[maker.der], NOW),
            Err(EkCertificateError::Malformed)
        );
    }
}
