//! Operational certificates from a device's certificate signing request (PKCS#10): the request
//! is checked (its signature, its key type, its subject, the extensions it asks for), and a
//! client certificate for the key it carries is built and signed by an issuing CA, whose key
//! signs through [`rcgen::SigningKey`], so that a key held in an HSM signs in place.

use std::time::Duration;

use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    SigningKey,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::attr::AttributeValue;
use x509_cert::ext::pkix::name::DirectoryString;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectKeyIdentifier};
use x509_cert::request::CertReq;

use crate::x509::upper_hex;

/// The largest request accepted, in DER bytes (an RSA 3072 request is about 1 KB).
pub const MAX_CSR_BYTES: usize = 8 * 1024;

const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const RSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const RSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const EXTENSION_REQUEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const CHALLENGE_PASSWORD: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.7");
const KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// A key type a credential policy can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
}

impl KeyType {
    /// Every key type, in the order policies list them.
    pub const ALL: [KeyType; 4] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
    ];

    /// The name policies use.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ecP256",
            KeyType::EcP384 => "ecP384",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa3072 => "rsa3072",
        }
    }

    /// The key type a policy names (exactly as [`KeyType::as_str`] spells it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The algorithm rcgen writes into the certificate's public key info for this key.
    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 | KeyType::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

/// A new key pair of `key_type` in memory, for a device's certificate request (ring makes EC
/// keys; RSA keys come from the `rsa` crate, as ring cannot generate them).
pub fn generate_key(key_type: KeyType) -> Result<rcgen::KeyPair, rcgen::Error> {
    let bits = match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            return rcgen::KeyPair::generate_for(key_type.algorithm());
        }
        KeyType::Rsa2048 => 2048,
        KeyType::Rsa3072 => 3072,
    };
    use rsa::pkcs8::EncodePrivateKey;
    let rsa = rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = rsa
        .to_pkcs8_der()
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, key_type.algorithm())
}

/// A DER PKCS#10 request by `key` for device `registration_id`: its subject is
/// `CN=registration id`, as [`check_csr`] wants, and it asks for no extensions (the policy
/// decides them).
pub fn certificate_request(
    key: &impl SigningKey,
    registration_id: &str,
) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, registration_id);
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// Why a signing request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// More than [`MAX_CSR_BYTES`].
    #[error("the certificate signing request is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    /// Not DER PKCS#10.
    #[error("the certificate signing request is not DER PKCS#10: {0}")]
    Malformed(String),
    /// The key is not one this service issues for.
    #[error("the certificate signing request's key is not ECDSA P-256/P-384 or RSA 2048/3072")]
    UnknownKey,
    /// The policy does not allow the request's key type.
    #[error("the credential policy does not allow {0} keys (it allows {1})")]
    KeyTypeNotAllowed(&'static str, String),
    /// The signature is not the request's key's over the request.
    #[error("the certificate signing request's signature does not verify with its key")]
    BadSignature,
    /// The subject's common name is not the registration id.
    #[error("the certificate signing request's subject CN must be the registration id '{0}'")]
    WrongSubject(String),
    /// The request asks for something the policy does not grant.
    #[error(
        "the certificate signing request asks for {0}, which the credential policy does not allow"
    )]
    NotAllowed(String),
}

/// A signing request that passed [`check_csr`]: the key to certify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    key_type: KeyType,
    /// The subjectPublicKey bits (SEC1 point, or PKCS#1 RSAPublicKey).
    public_key: Vec<u8>,
}

impl CheckedCsr {
    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
}

impl PublicKeyData for CheckedCsr {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.key_type.algorithm()
    }
}

/// Checks a DER PKCS#10 request of device `registration_id`: at most [`MAX_CSR_BYTES`], a key
/// of a type in `allowed`, a signature that verifies with that key, a subject whose only common
/// name is the registration id, and no attributes or requested extensions beyond a key usage
/// and an extended key usage of `clientAuth` (the certificate's own come from the policy).
pub fn check_csr(
    der: &[u8],
    registration_id: &str,
    allowed: &[KeyType],
) -> Result<CheckedCsr, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge);
    }
    let request = CertReq::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let info = &request.info;
    let spki = &info.public_key;
    let public_key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| CsrError::Malformed("the public key has unused bits".into()))?
        .to_vec();
    let key_type = key_type_of(spki, &public_key)?;
    if !allowed.contains(&key_type) {
        let names: Vec<&str> = allowed.iter().map(|k| k.as_str()).collect();
        return Err(CsrError::KeyTypeNotAllowed(
            key_type.as_str(),
            names.join(", "),
        ));
    }
    let signed = info
        .to_der()
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let signature = request.signature.as_bytes().ok_or(CsrError::BadSignature)?;
    let verifier = verifier_of(key_type, request.algorithm.oid)?;
    ring::signature::UnparsedPublicKey::new(verifier, &public_key)
        .verify(&signed, signature)
        .map_err(|_| CsrError::BadSignature)?;

    let mut names = Vec::new();
    for attribute in info.subject.iter() {
        if attribute.oid == COMMON_NAME {
            let name = attribute.value.decode_as::<DirectoryString>().ok();
            names.push(name.map(|n| n.value().into_owned()));
        }
    }
    match names.as_slice() {
        [Some(cn)] if cn == registration_id => {}
        _ => return Err(CsrError::WrongSubject(registration_id.to_owned())),
    }
    for attribute in info.attributes.iter() {
        match attribute.oid {
            EXTENSION_REQUEST => {
                for value in attribute.values.iter() {
                    check_requested_extensions(value)?;
                }
            }
            CHALLENGE_PASSWORD => {}
            other => return Err(CsrError::NotAllowed(format!("attribute {other}"))),
        }
    }
    Ok(CheckedCsr {
        key_type,
        public_key,
    })
}

fn key_type_of(
    spki: &x509_cert::spki::SubjectPublicKeyInfoOwned,
    public_key: &[u8],
) -> Result<KeyType, CsrError> {
    match spki.algorithm.oid {
        EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
            match curve {
                Some(P256) => Ok(KeyType::EcP256),
                Some(P384) => Ok(KeyType::EcP384),
                _ => Err(CsrError::UnknownKey),
            }
        }
        RSA_ENCRYPTION => {
            let key = RsaPublicKey::from_der(public_key)
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            let modulus = key.modulus.as_bytes();
            let bits =
                modulus.len() * 8 - modulus.first().map_or(8, |b| b.leading_zeros() as usize);
            match bits {
                2048 => Ok(KeyType::Rsa2048),
                3072 => Ok(KeyType::Rsa3072),
                _ => Err(CsrError::UnknownKey),
            }
        }
        _ => Err(CsrError::UnknownKey),
    }
}

/// PKCS#1 RSAPublicKey.
#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    #[allow(dead_code)]
    public_exponent: der::asn1::UintRef<'a>,
}

fn verifier_of(
    key: KeyType,
    signature: ObjectIdentifier,
) -> Result<&'static dyn ring::signature::VerificationAlgorithm, CsrError> {
    use ring::signature as s;
    Ok(match (key, signature) {
        (KeyType::EcP256, ECDSA_SHA256) => &s::ECDSA_P256_SHA256_ASN1,
        (KeyType::EcP256, ECDSA_SHA384) => &s::ECDSA_P256_SHA384_ASN1,
        (KeyType::EcP384, ECDSA_SHA256) => &s::ECDSA_P384_SHA256_ASN1,
        (KeyType::EcP384, ECDSA_SHA384) => &s::ECDSA_P384_SHA384_ASN1,
        (KeyType::Rsa2048 | KeyType::Rsa3072, RSA_SHA256) => &s::RSA_PKCS1_2048_8192_SHA256,
        (KeyType::Rsa2048 | KeyType::Rsa3072, RSA_SHA384) => &s::RSA_PKCS1_2048_8192_SHA384,
        (KeyType::Rsa2048 | KeyType::Rsa3072, RSA_SHA512) => &s::RSA_PKCS1_2048_8192_SHA512,
        (_, other) => {
            return Err(CsrError::Malformed(format!(
                "signature algorithm {other} does not fit the key"
            )));
        }
    })
}

fn check_requested_extensions(value: &AttributeValue) -> Result<(), CsrError> {
    let extensions: Vec<x509_cert::ext::Extension> = value
        .decode_as()
        .map_err(|e| CsrError::Malformed(format!("extension request: {e}")))?;
    for extension in extensions {
        match extension.extn_id {
            KEY_USAGE => {}
            EXTENDED_KEY_USAGE => {
                let usages = ExtendedKeyUsage::from_der(extension.extn_value.as_bytes())
                    .map_err(|e| CsrError::Malformed(format!("extended key usage: {e}")))?;
                if let Some(other) = usages.0.iter().find(|u| **u != CLIENT_AUTH) {
                    return Err(CsrError::NotAllowed(format!("extended key usage {other}")));
                }
            }
            other => return Err(CsrError::NotAllowed(format!("extension {other}"))),
        }
    }
    Ok(())
}

/// What an issued certificate looks like, beyond its subject and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// How long it is valid, from the moment of issuance.
    pub validity: Duration,
    /// DNS names for its subject alternative name (none: no such extension).
    pub dns_names: Vec<String>,
}

/// Why an issuing CA cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// The chain is empty or a certificate in it does not parse.
    #[error("the CA certificate chain is unusable: {0}")]
    Chain(String),
    /// The CA certificate is not a CA (basic constraints).
    #[error("the CA certificate is not a CA certificate (basicConstraints cA is not set)")]
    NotCa,
    /// The key does not sign for the CA certificate, or signing failed.
    #[error("the CA key does not sign for the CA certificate: {0}")]
    Key(String),
}

/// Why a certificate could not be issued (the request was fine).
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// No randomness for the serial number.
    #[error("no randomness for a serial number")]
    Random,
    /// The certificate could not be built or signed.
    #[error("building or signing the certificate failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A certificate that was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// DER certificates: the new one first, then the CA's chain up to its root.
    pub chain: Vec<Vec<u8>>,
    /// Upper-case hex serial number.
    pub serial: String,
    /// Upper-case hex SHA-256 of the new certificate.
    pub sha256_thumbprint: String,
    /// When it starts being valid.
    pub not_before: OffsetDateTime,
    /// When it stops being valid.
    pub not_after: OffsetDateTime,
}

/// An issuing CA: its certificate chain (its own certificate first, its root last) and a key
/// that signs for it.
pub struct IssuingCa<K: SigningKey> {
    issuer: Issuer<'static, K>,
    chain: Vec<Vec<u8>>,
}

impl<K: SigningKey> std::fmt::Debug for IssuingCa<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl<K: SigningKey> IssuingCa<K> {
    /// The CA of `chain` (DER, its own certificate first) with `key`. The key's algorithm
    /// signs what the CA issues. A certificate is issued and verified against the chain's
    /// first certificate here, so that a key that is not the CA's (or a name rcgen cannot
    /// write back byte for byte) is refused now rather than at a device's registration.
    pub fn new(chain: Vec<Vec<u8>>, key: K) -> Result<Self, CaError> {
        let own = chain
            .first()
            .cloned()
            .ok_or_else(|| CaError::Chain("no certificate".into()))?;
        let cert = Certificate::from_der(&own).map_err(|e| CaError::Chain(e.to_string()))?;
        for other in chain.iter().skip(1) {
            Certificate::from_der(other).map_err(|e| CaError::Chain(e.to_string()))?;
        }
        let tbs = cert.tbs_certificate();
        let is_ca = tbs
            .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
            .map_err(|e| CaError::Chain(e.to_string()))?
            .is_some_and(|(_, bc)| bc.ca);
        if !is_ca {
            return Err(CaError::NotCa);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(tbs.subject())?;
        let key_id = match tbs
            .get_extension::<SubjectKeyIdentifier>()
            .map_err(|e| CaError::Chain(e.to_string()))?
        {
            Some((_, ski)) => ski.0.as_bytes().to_vec(),
            // Without one, the identifier RFC 7093 method 1 gives (what rcgen computes too).
            None => Sha256::digest(key.der_bytes())[..20].to_vec(),
        };
        params.key_identifier_method = KeyIdMethod::PreSpecified(key_id);
        let ca = Self {
            issuer: Issuer::new(params, key),
            chain,
        };
        ca.self_test(&own)?;
        Ok(ca)
    }

    /// Issues a throwaway certificate and checks that the CA certificate verifies it.
    fn self_test(&self, own: &[u8]) -> Result<(), CaError> {
        let probe = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Key(e.to_string()))?;
        let profile = Profile {
            validity: Duration::from_secs(300),
            dns_names: Vec::new(),
        };
        let issued = self
            .build(
                "issuing-ca-self-test",
                &probe,
                &profile,
                OffsetDateTime::now_utc(),
            )
            .map_err(|e| CaError::Key(e.to_string()))?;
        let leaf = issued
            .chain
            .first()
            .ok_or_else(|| CaError::Key("nothing was issued".into()))?;
        let now = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or_default();
        crate::chain::verify_chain(std::slice::from_ref(leaf), own, &[], now)
            .map(|_| ())
            .map_err(|e| CaError::Key(e.to_string()))
    }

    /// The CA's chain (DER, its own certificate first).
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// Issues a client certificate for `csr` (checked by [`check_csr`]) to device
    /// `registration_id`, valid from `now` for the profile's validity.
    pub fn issue(
        &self,
        csr: &CheckedCsr,
        registration_id: &str,
        profile: &Profile,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        self.build(registration_id, csr, profile, now)
    }

    fn build(
        &self,
        registration_id: &str,
        key: &impl PublicKeyData,
        profile: &Profile,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, registration_id);
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = profile
            .dns_names
            .iter()
            .map(|name| Ok(SanType::DnsName(name.as_str().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()?;
        // Positive, 16 random bytes (RFC 5280 allows 20; CA/B asks for 64 random bits).
        let mut serial: [u8; 16] = crate::keys::random_bytes().map_err(|_| IssueError::Random)?;
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // A minute of slack for devices whose clocks run a little behind.
        let not_before = now - time::Duration::minutes(1);
        params.not_before = not_before;
        let not_after = now + profile.validity;
        params.not_after = not_after;
        let cert = params.signed_by(key, &self.issuer)?;
        let der = cert.der().to_vec();
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(der.clone());
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            chain,
            serial: upper_hex(&serial),
            sha256_thumbprint: upper_hex(&Sha256::digest(&der)),
            not_before: not_before.replace_nanosecond(0).unwrap_or(not_before),
            not_after: not_after.replace_nanosecond(0).unwrap_or(not_after),
        })
    }
}

/// The CA's subject as rcgen writes it: one attribute per RDN, each string in its own type.
fn distinguished_name(name: &x509_cert::name::Name) -> Result<DistinguishedName, CaError> {
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in name.iter_rdn() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return Err(CaError::Chain(
                "the CA certificate's subject has a multi-valued RDN".into(),
            ));
        };
        let kind = match attribute.oid.to_string().as_str() {
            "2.5.4.3" => DnType::CommonName,
            "2.5.4.6" => DnType::CountryName,
            "2.5.4.7" => DnType::LocalityName,
            "2.5.4.8" => DnType::StateOrProvinceName,
            "2.5.4.10" => DnType::OrganizationName,
            "2.5.4.11" => DnType::OrganizationalUnitName,
            other => DnType::CustomDnType(
                other
                    .split('.')
                    .map(|arc| arc.parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| CaError::Chain(e.to_string()))?,
            ),
        };
        if seen.contains(&kind) {
            return Err(CaError::Chain(
                "the CA certificate's subject repeats an attribute type".into(),
            ));
        }
        seen.push(kind.clone());
        dn.push(kind, dn_value(&attribute.value)?);
    }
    Ok(dn)
}

fn dn_value(value: &AttributeValue) -> Result<DnValue, CaError> {
    let unusable = |e: rcgen::Error| CaError::Chain(e.to_string());
    let text = String::from_utf8(value.value().to_vec())
        .map_err(|_| CaError::Chain("a subject attribute is not text".into()))?;
    Ok(match der::Tagged::tag(value) {
        der::Tag::Utf8String => DnValue::Utf8String(text),
        der::Tag::PrintableString => DnValue::PrintableString(text.try_into().map_err(unusable)?),
        der::Tag::Ia5String => DnValue::Ia5String(text.try_into().map_err(unusable)?),
        other => {
            return Err(CaError::Chain(format!(
                "a subject attribute has the unsupported string type {other}"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use rcgen::{BasicConstraints, KeyPair};

    use super::*;

    const ID: &str = "device-01";

    fn key(alg: &'static SignatureAlgorithm) -> KeyPair {
        if alg == &rcgen::PKCS_RSA_SHA256 {
            return generate_key(KeyType::Rsa3072).unwrap();
        }
        KeyPair::generate_for(alg).unwrap()
    }

    fn ca(alg: &'static SignatureAlgorithm) -> (Vec<u8>, KeyPair) {
        let key = key(alg);
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Issuing CA");
        params.distinguished_name.push(
            DnType::OrganizationName,
            DnValue::PrintableString("Example".try_into().unwrap()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), key)
    }

    fn csr(cn: &str, key: &KeyPair) -> Vec<u8> {
        certificate_request(key, cn).unwrap()
    }

    /// A key of every type a device can ask for makes a request the service accepts, as that
    /// type, and only for its own registration id.
    #[test]
    fn generated_keys_make_requests_that_pass_the_check() {
        for key_type in KeyType::ALL {
            let key = generate_key(key_type).unwrap();
            let request = certificate_request(&key, ID).unwrap();
            let checked = check_csr(&request, ID, &[key_type]).unwrap();
            assert_eq!(checked.key_type(), key_type);
            assert_eq!(
                check_csr(&request, "someone-else", &[key_type]),
                Err(CsrError::WrongSubject("someone-else".into()))
            );
        }
    }

    fn profile() -> Profile {
        Profile {
            validity: Duration::from_secs(30 * 24 * 3600),
            dns_names: Vec::new(),
        }
    }

    fn now_secs() -> u64 {
        u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap()
    }

    /// A request from each allowed key type, signed by a P-384 and by an RSA 3072 CA: the
    /// issued chain verifies to the CA, for client authentication, with the registration id as
    /// its common name, valid for the profile's time, each with its own serial number.
    #[test]
    fn issued_certificates_verify_to_the_ca() {
        for ca_alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_RSA_SHA256] {
            let (ca_der, ca_key) = ca(ca_alg);
            let ca = IssuingCa::new(vec![ca_der.clone()], ca_key).unwrap();
            let mut serials = std::collections::HashSet::new();
            for device_alg in [
                &rcgen::PKCS_ECDSA_P256_SHA256,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ] {
                let device = key(device_alg);
                let checked = check_csr(&csr(ID, &device), ID, &KeyType::ALL).unwrap();
                let now = OffsetDateTime::now_utc();
                let issued = ca.issue(&checked, ID, &profile(), now).unwrap();
                assert_eq!(issued.chain.len(), 2);
                assert_eq!(issued.chain[1], ca_der);
                crate::chain::verify_chain(&issued.chain[..1], &ca_der, &[], now_secs()).unwrap();
                crate::chain::check_leaf(&issued.chain, ID, now_secs()).unwrap();
                let leaf = Certificate::from_der(&issued.chain[0]).unwrap();
                let tbs = leaf.tbs_certificate();
                assert_eq!(
                    tbs.subject_public_key_info()
                        .subject_public_key
                        .as_bytes()
                        .unwrap(),
                    device.public_key_raw()
                );
                let days = (issued.not_after - now).whole_days();
                assert!((29..=30).contains(&days), "{days} days");
                assert_eq!(
                    issued.sha256_thumbprint,
                    upper_hex(&Sha256::digest(&issued.chain[0]))
                );
                assert_eq!(upper_hex(tbs.serial_number().as_bytes()), issued.serial);
                // AKI names the CA's SKI; the leaf has an SKI of its own, and is no CA.
                let ca_cert = Certificate::from_der(&ca_der).unwrap();
                let (_, ca_ski) = ca_cert
                    .tbs_certificate()
                    .get_extension::<SubjectKeyIdentifier>()
                    .unwrap()
                    .unwrap();
                let (_, aki) = tbs
                    .get_extension::<x509_cert::ext::pkix::AuthorityKeyIdentifier>()
                    .unwrap()
                    .expect("an authority key identifier");
                assert_eq!(aki.key_identifier.unwrap(), ca_ski.0);
                assert!(
                    tbs.get_extension::<SubjectKeyIdentifier>()
                        .unwrap()
                        .is_some()
                );
                let (_, bc) = tbs
                    .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
                    .unwrap()
                    .unwrap();
                assert!(!bc.ca);
                assert!(serials.insert(issued.serial.clone()));
            }
        }
    }

    #[test]
    fn rsa_requests_are_checked_and_issued() {
        let device = key(&rcgen::PKCS_RSA_SHA256);
        let checked = check_csr(&csr(ID, &device), ID, &[KeyType::Rsa3072]).unwrap();
        assert_eq!(checked.key_type(), KeyType::Rsa3072);
        let (ca_der, ca_key) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let ca = IssuingCa::new(vec![ca_der.clone()], ca_key).unwrap();
        let issued = ca
            .issue(&checked, ID, &profile(), OffsetDateTime::now_utc())
            .unwrap();
        crate::chain::verify_chain(&issued.chain[..1], &ca_der, &[], now_secs()).unwrap();
    }

    #[test]
    fn bad_requests_are_refused() {
        let device = key(&rcgen::PKCS_ECDSA_P256_SHA256);
        let good = csr(ID, &device);
        assert_eq!(
            check_csr(&csr("someone-else", &device), ID, &KeyType::ALL),
            Err(CsrError::WrongSubject(ID.into()))
        );
        assert!(matches!(
            check_csr(&good, ID, &[KeyType::EcP384]),
            Err(CsrError::KeyTypeNotAllowed("ecP256", _))
        ));
        let mut tampered = good.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        assert_eq!(
            check_csr(&tampered, ID, &KeyType::ALL),
            Err(CsrError::BadSignature)
        );
        // The signed part changed (the CN's last letter), the signature did not.
        let mut altered = good.clone();
        let at = altered
            .windows(ID.len())
            .position(|w| w == ID.as_bytes())
            .unwrap();
        altered[at + ID.len() - 1] = b'2';
        assert_eq!(
            check_csr(&altered, "device-02", &KeyType::ALL),
            Err(CsrError::BadSignature)
        );
        assert!(matches!(
            check_csr(b"not der", ID, &KeyType::ALL),
            Err(CsrError::Malformed(_))
        ));
        assert_eq!(
            check_csr(&vec![0x30; MAX_CSR_BYTES + 1], ID, &KeyType::ALL),
            Err(CsrError::TooLarge)
        );
        // An Ed25519 key is not one this service issues for.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            check_csr(&csr(ID, &ed), ID, &KeyType::ALL),
            Err(CsrError::UnknownKey)
        );
    }

    /// A request may ask for a key usage and for clientAuth, nothing else: not a CA, not other
    /// names, not other usages.
    #[test]
    fn requested_extensions_beyond_client_auth_are_refused() {
        let device = key(&rcgen::PKCS_ECDSA_P256_SHA256);
        let request = |edit: &dyn Fn(&mut CertificateParams)| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, ID);
            edit(&mut params);
            params.serialize_request(&device).unwrap().der().to_vec()
        };
        let fine = request(&|p| {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        check_csr(&fine, ID, &KeyType::ALL).unwrap();
        let names = request(&|p| {
            p.subject_alt_names = vec![SanType::DnsName("example.com".try_into().unwrap())];
        });
        assert!(matches!(
            check_csr(&names, ID, &KeyType::ALL),
            Err(CsrError::NotAllowed(_))
        ));
        let server = request(&|p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        assert!(matches!(
            check_csr(&server, ID, &KeyType::ALL),
            Err(CsrError::NotAllowed(_))
        ));
        let ca = request(&|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert!(matches!(
            check_csr(&ca, ID, &KeyType::ALL),
            Err(CsrError::NotAllowed(_))
        ));
    }

    #[test]
    fn unusable_issuing_cas_are_refused() {
        let (ca_der, _) = ca(&rcgen::PKCS_ECDSA_P256_SHA256);
        let stranger = key(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            IssuingCa::new(vec![ca_der], stranger),
            Err(CaError::Key(_))
        ));
        let leaf_key = key(&rcgen::PKCS_ECDSA_P256_SHA256);
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "not a CA");
        let leaf = params.self_signed(&leaf_key).unwrap().der().to_vec();
        assert!(matches!(
            IssuingCa::new(vec![leaf], leaf_key),
            Err(CaError::NotCa)
        ));
        let any = key(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            IssuingCa::new(Vec::new(), any),
            Err(CaError::Chain(_))
        ));
    }
}
