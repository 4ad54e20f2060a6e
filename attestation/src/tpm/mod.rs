//! TPM 2.0 attestation, the service's side (reference section 2.4), without a TPM.
//!
//! - [`RsaPublic::parse`] reads a marshalled TPM2B_PUBLIC strictly and accepts only the
//!   standard RSA-2048 endorsement key and storage root key templates.
//! - [`activation_blob`] builds the `authenticationKey` of a TPM challenge: a fresh HMAC key
//!   duplicated to the device's SRK under a 16-byte inner key, and that inner key made into a
//!   credential for the EK, bound to the SRK's name. Only the TPM that holds both keys can
//!   import the HMAC key, and the SAS tokens it then signs prove it.
//! - [`registration_id`] is the id the Azure SDKs derive from the EK.
//!
//! [`soft`] is a TPM in software for tests and load generation.

mod ek_certificate;
pub mod soft;
mod wire;

pub use ek_certificate::{EkCertificateError, MAX_EK_CERTIFICATE_BYTES, verify_ek_certificate};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use rsa::{BoxedUint, Oaep, PublicKey};
use sha2::{Digest, Sha256};

use crate::SymmetricKey;
use wire::{Reader, put_tpm2b, tpm2b};

const ALG_RSA: u16 = 0x0001;
const ALG_AES: u16 = 0x0006;
const ALG_HMAC: u16 = 0x0005;
const ALG_KEYEDHASH: u16 = 0x0008;
const ALG_SHA256: u16 = 0x000B;
const ALG_NULL: u16 = 0x0010;
const ALG_CFB: u16 = 0x0043;

/// Object attributes of the TCG EK template (fixedTPM, fixedParent, sensitiveDataOrigin,
/// adminWithPolicy, restricted, decrypt).
pub const EK_ATTRIBUTES: u32 = 0x0003_00B2;
/// Object attributes of the SRK template (fixedTPM, fixedParent, sensitiveDataOrigin,
/// userWithAuth, noDA, restricted, decrypt).
pub const SRK_ATTRIBUTES: u32 = 0x0003_0472;
/// The EK template's policy: PolicySecret(TPM_RH_ENDORSEMENT).
pub const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];
/// The HMAC key's policy, PolicyCommandCode(TPM_CC_Duplicate), as Microsoft's DRS server sets it.
const ID_KEY_AUTH_POLICY: [u8; 32] = [
    0xbe, 0xf5, 0x6b, 0x8c, 0x1c, 0xc8, 0x4e, 0x11, 0xed, 0xd7, 0x17, 0x52, 0x8d, 0x2c, 0xd9, 0x93,
    0x56, 0xbd, 0x2b, 0xbf, 0x8f, 0x01, 0x52, 0x09, 0xc3, 0xf8, 0x4a, 0xee, 0xab, 0xa8, 0xe8, 0xa2,
];
/// sign | userWithAuth | noDA: no fixedTPM/fixedParent, so the key can be duplicated.
const ID_KEY_ATTRIBUTES: u32 = 0x0004_0440;
/// RSA-2048: the only key size of the standard templates.
const KEY_BITS: u16 = 2048;
/// The inner wrapper and credential key: AES-128, which the C SDK and aziot hard-code.
const INNER_KEY_BYTES: usize = 16;
/// The HMAC key handed to the device.
const HMAC_KEY_BYTES: usize = 32;
/// The data of the sixth blob field (Node parses it; C and aziot ignore it).
const ENC_URI: &[u8] = b"dps";
/// Largest TPM2B_PUBLIC accepted (an RSA-2048 EK with its policy is 316 bytes).
pub const MAX_PUBLIC_BYTES: usize = 1024;

/// Which standard key a TPM2B_PUBLIC must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// The endorsement key (TCG EK Credential Profile template L-1).
    Endorsement,
    /// The storage root key (TCG provisioning guidance template).
    StorageRoot,
}

impl KeyRole {
    fn what(self) -> &'static str {
        match self {
            KeyRole::Endorsement => "the endorsement key",
            KeyRole::StorageRoot => "the storage root key",
        }
    }

    fn attributes(self) -> u32 {
        match self {
            KeyRole::Endorsement => EK_ATTRIBUTES,
            KeyRole::StorageRoot => SRK_ATTRIBUTES,
        }
    }

    fn policy(self) -> &'static [u8] {
        match self {
            KeyRole::Endorsement => &EK_AUTH_POLICY,
            KeyRole::StorageRoot => &[],
        }
    }
}

/// Why TPM key material or a blob was refused. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    /// Not base64, or not a well-formed TPM2B_PUBLIC.
    #[error("{what} is not a marshalled TPM2B_PUBLIC: {reason}")]
    Malformed {
        /// Which key.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A well-formed key that is not the standard template.
    #[error("{what} is not the standard RSA-2048 template: {reason}")]
    NotStandard {
        /// Which key.
        what: &'static str,
        /// Which field differs.
        reason: String,
    },
    /// An activation blob that does not open (software TPM only).
    #[error("the activation blob does not open: {0}")]
    Blob(&'static str),
    /// The random source or the RSA primitive failed.
    #[error("a cryptographic primitive failed: {0}")]
    Crypto(&'static str),
}

/// A standard RSA-2048 EK or SRK, read from its TPM2B_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublic {
    tpm2b: Vec<u8>,
    /// The same structure with the exponent as the TCG templates write it (0, "the default
    /// 65537"): the bytes the key's identity (registration id, EK hash) is computed from, so
    /// that one key has one identity whichever way its exponent is spelled.
    canonical: Vec<u8>,
    modulus: Vec<u8>,
    key: PublicKey,
}

impl RsaPublic {
    /// Parses base64 of a TPM2B_PUBLIC (the wire form of `endorsementKey` and
    /// `storageRootKey`).
    pub fn from_base64(value: &str, role: KeyRole) -> Result<Self, TpmError> {
        let bytes = STANDARD
            .decode(value.trim().as_bytes())
            .map_err(|_| TpmError::Malformed {
                what: role.what(),
                reason: "not base64".into(),
            })?;
        Self::parse(&bytes, role)
    }

    /// Parses a TPM2B_PUBLIC and checks that it is the standard template of `role`: RSA-2048,
    /// nameAlg SHA-256, the template's attributes and policy, AES-128-CFB, no scheme, and
    /// nothing after the structure.
    pub fn parse(tpm2b_public: &[u8], role: KeyRole) -> Result<Self, TpmError> {
        let what = role.what();
        let malformed = |reason: &str| TpmError::Malformed {
            what,
            reason: reason.into(),
        };
        let differs = |reason: String| TpmError::NotStandard { what, reason };
        if tpm2b_public.len() > MAX_PUBLIC_BYTES {
            return Err(malformed("longer than any RSA-2048 key"));
        }
        let truncated = |_| malformed("it ends inside a field");
        let mut outer = Reader::new(tpm2b_public);
        let public = outer.tpm2b().map_err(truncated)?;
        if !outer.is_empty() {
            return Err(malformed("bytes follow the size-prefixed structure"));
        }
        let mut r = Reader::new(public);
        let kind = r.u16().map_err(truncated)?;
        if kind != ALG_RSA {
            return Err(differs(format!("type 0x{kind:04x} is not RSA (0x0001)")));
        }
        let name_alg = r.u16().map_err(truncated)?;
        if name_alg != ALG_SHA256 {
            return Err(differs(format!(
                "nameAlg 0x{name_alg:04x} is not SHA-256 (0x000b)"
            )));
        }
        let attributes = r.u32().map_err(truncated)?;
        if attributes != role.attributes() {
            return Err(differs(format!(
                "objectAttributes 0x{attributes:08x} are not 0x{:08x}",
                role.attributes()
            )));
        }
        let policy = r.tpm2b().map_err(truncated)?;
        if policy != role.policy() {
            return Err(differs("authPolicy is not the template's".into()));
        }
        let symmetric = (
            r.u16().map_err(truncated)?,
            r.u16().map_err(truncated)?,
            r.u16().map_err(truncated)?,
        );
        if symmetric != (ALG_AES, 128, ALG_CFB) {
            return Err(differs("the symmetric algorithm is not AES-128-CFB".into()));
        }
        let scheme = r.u16().map_err(truncated)?;
        if scheme != ALG_NULL {
            return Err(differs(format!(
                "scheme 0x{scheme:04x} is not TPM_ALG_NULL"
            )));
        }
        let bits = r.u16().map_err(truncated)?;
        if bits != KEY_BITS {
            return Err(differs(format!("keyBits {bits} is not 2048")));
        }
        let exponent = r.u32().map_err(truncated)?;
        if exponent != 0 && exponent != 65_537 {
            return Err(differs(format!("exponent {exponent} is not 65537")));
        }
        let modulus = r.tpm2b().map_err(truncated)?;
        if !r.is_empty() {
            return Err(malformed("bytes follow the public area inside it"));
        }
        if modulus.len() != usize::from(KEY_BITS / 8) || modulus.first().is_none_or(|b| *b < 0x80) {
            return Err(malformed("the modulus is not 2048 bits"));
        }
        let n = BoxedUint::from_be_slice(modulus, u32::from(KEY_BITS))
            .map_err(|_| malformed("the modulus does not decode"))?;
        let key = PublicKey::new(n, BoxedUint::from(65_537u32))
            .map_err(|_| malformed("the modulus is not a usable RSA modulus"))?;
        // The modulus ends the structure, and the exponent sits right before its size.
        let mut canonical = tpm2b_public.to_vec();
        let exponent_at = canonical.len() - modulus.len() - 2 - 4;
        canonical[exponent_at..exponent_at + 4].fill(0);
        Ok(Self {
            tpm2b: tpm2b_public.to_vec(),
            canonical,
            modulus: modulus.to_vec(),
            key,
        })
    }

    /// The TPM2B_PUBLIC bytes as received (the TPM Name is computed from these).
    pub fn tpm2b(&self) -> &[u8] {
        &self.tpm2b
    }

    /// The TPM2B_PUBLIC with the exponent written as 0: what identifies the key.
    pub fn canonical_tpm2b(&self) -> &[u8] {
        &self.canonical
    }

    /// Whether `other` is the same key (ignoring how the exponent is spelled).
    pub fn same_key(&self, other: &RsaPublic) -> bool {
        self.canonical == other.canonical
    }

    /// The RSA modulus, big-endian (the public exponent is 65537).
    pub fn modulus(&self) -> &[u8] {
        &self.modulus
    }

    /// The TPM Name: `0x000B || SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        name_of(&self.tpm2b[2..])
    }

    /// SHA-256 of the (canonical) TPM2B_PUBLIC, in lower-case hex: how ownership records name
    /// an EK.
    pub fn sha256_hex(&self) -> String {
        Sha256::digest(&self.canonical)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn encrypt_seed(&self, seed: &[u8], label: &'static [u8]) -> Result<Vec<u8>, TpmError> {
        self.key
            .encrypt(
                &mut getrandom::SysRng,
                Oaep::<Sha256>::new_with_label(label),
                seed,
            )
            .map_err(|_| TpmError::Crypto("RSA-OAEP encryption"))
    }
}

/// The registration id the Azure SDKs give a TPM device: lower-case RFC 4648 base32 of the
/// SHA-256 of the EK's TPM2B_PUBLIC, without padding. Computed from the canonical form, which
/// is what a TPM built from the TCG template reports, so an EK sent with its exponent spelled
/// out does not make a second id for the same TPM.
pub fn registration_id(ek: &RsaPublic) -> String {
    data_encoding::BASE32_NOPAD
        .encode(&Sha256::digest(ek.canonical_tpm2b()))
        .to_ascii_lowercase()
}

fn name_of(tpmt_public: &[u8]) -> Vec<u8> {
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(tpmt_public));
    name
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// KDFa of TPM 2.0 Part 1 section 11.4.10.2: SP 800-108 counter mode with HMAC-SHA-256.
/// Block i is `HMAC(key, u32(i) || label || 0x00 || context_u || context_v || u32(bits))`.
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = usize::try_from(bits.div_ceil(8)).unwrap_or(0);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend_from_slice(&hmac_sha256(
            key,
            &[
                &counter.to_be_bytes(),
                label.as_bytes(),
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        ));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

fn aes128_cfb(key: &[u8], buf: &mut [u8]) -> Result<(), TpmError> {
    use aes::cipher::KeyIvInit;
    cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &[0u8; 16])
        .map_err(|_| TpmError::Crypto("AES-128-CFB key length"))?
        .encrypt(buf);
    Ok(())
}

fn aes128_cfb_decrypt(key: &[u8], buf: &mut [u8]) -> Result<(), TpmError> {
    use aes::cipher::KeyIvInit;
    cfb_mode::Decryptor::<aes::Aes128>::new_from_slices(key, &[0u8; 16])
        .map_err(|_| TpmError::Crypto("AES-128-CFB key length"))?
        .decrypt(buf);
    Ok(())
}

fn random<const N: usize>() -> Result<[u8; N], TpmError> {
    crate::keys::random_bytes::<N>().map_err(|_| TpmError::Crypto("the random source"))
}

/// The TPMT_PUBLIC of the HMAC key, for its key bits and seed.
fn id_key_public(seed: &[u8], key: &[u8]) -> Vec<u8> {
    let mut public = Vec::with_capacity(80);
    public.extend_from_slice(&ALG_KEYEDHASH.to_be_bytes());
    public.extend_from_slice(&ALG_SHA256.to_be_bytes());
    public.extend_from_slice(&ID_KEY_ATTRIBUTES.to_be_bytes());
    put_tpm2b(&mut public, &ID_KEY_AUTH_POLICY);
    public.extend_from_slice(&ALG_HMAC.to_be_bytes());
    public.extend_from_slice(&ALG_SHA256.to_be_bytes());
    // TPM2_Import recomputes `unique` from the sensitive part (TPM_RC_BINDING otherwise).
    let unique = Sha256::new()
        .chain_update(seed)
        .chain_update(key)
        .finalize();
    put_tpm2b(&mut public, &unique);
    public
}

/// The contents of an activation blob's six TPM2B fields, in order: the credential
/// (TPM2B_ID_OBJECT), the EK's encrypted secret, the duplicate (TPM2B_PRIVATE), the SRK's
/// encrypted seed, the key's TPMT_PUBLIC, and the encrypted URI.
pub fn blob_fields(blob: &[u8]) -> Result<[&[u8]; 6], TpmError> {
    let mut r = Reader::new(blob);
    let mut fields = [&blob[..0]; 6];
    for field in &mut fields {
        *field = r
            .tpm2b()
            .map_err(|_| TpmError::Blob("a field is truncated"))?;
    }
    if !r.is_empty() {
        return Err(TpmError::Blob("bytes follow the six fields"));
    }
    Ok(fields)
}

/// An activation blob and the HMAC key inside it.
#[derive(Debug)]
pub struct Activation {
    /// The six TPM2B fields, in the order the Azure SDKs read them.
    pub blob: Vec<u8>,
    /// The key the device's TPM will hold.
    pub key: SymmetricKey,
}

impl Activation {
    /// The blob as the `authenticationKey` field carries it.
    pub fn blob_base64(&self) -> String {
        STANDARD.encode(&self.blob)
    }
}

/// Builds an activation blob for the TPM that holds `ek` and `srk` (reference section 2.4,
/// steps 3 to 7): a fresh 32-byte HMAC key duplicated to the SRK under a 16-byte inner key,
/// and the inner key as a credential for the EK bound to the SRK's name.
pub fn activation_blob(ek: &RsaPublic, srk: &RsaPublic) -> Result<Activation, TpmError> {
    let key: [u8; HMAC_KEY_BYTES] = random()?;
    let seed_value: [u8; 32] = random()?;
    let inner_key: [u8; INNER_KEY_BYTES] = random()?;

    // The HMAC key's public and sensitive areas.
    let id_public = id_key_public(&seed_value, &key);
    let id_name = name_of(&id_public);
    let mut sensitive = ALG_KEYEDHASH.to_be_bytes().to_vec();
    put_tpm2b(&mut sensitive, &[]);
    put_tpm2b(&mut sensitive, &seed_value);
    put_tpm2b(&mut sensitive, &key);
    let sensitive = tpm2b(&sensitive);

    // Inner wrapper: integrity, then AES-128-CFB under the inner key.
    let mut inner = tpm2b(
        &Sha256::new()
            .chain_update(&sensitive)
            .chain_update(&id_name)
            .finalize(),
    );
    inner.extend_from_slice(&sensitive);
    aes128_cfb(&inner_key, &mut inner)?;

    // Outer wrapper: a seed for the SRK protects the duplicate.
    let seed: [u8; 32] = random()?;
    let in_sym_seed = srk.encrypt_seed(&seed, b"DUPLICATE\0")?;
    let mut dup_sensitive = inner;
    aes128_cfb(
        &kdfa(&seed, "STORAGE", &id_name, &[], 128),
        &mut dup_sensitive,
    )?;
    let outer_hmac = hmac_sha256(
        &kdfa(&seed, "INTEGRITY", &[], &[], 256),
        &[&dup_sensitive, &id_name],
    );
    let mut duplicate = tpm2b(&outer_hmac);
    duplicate.extend_from_slice(&dup_sensitive);

    // The inner key as a credential for the EK, bound to the SRK's name.
    let srk_name = srk.name();
    let seed2: [u8; 32] = random()?;
    let secret = ek.encrypt_seed(&seed2, b"IDENTITY\0")?;
    let mut enc_identity = tpm2b(&inner_key);
    aes128_cfb(
        &kdfa(&seed2, "STORAGE", &srk_name, &[], 128),
        &mut enc_identity,
    )?;
    let integrity = hmac_sha256(
        &kdfa(&seed2, "INTEGRITY", &[], &[], 256),
        &[&enc_identity, &srk_name],
    );
    let mut credential = tpm2b(&integrity);
    credential.extend_from_slice(&enc_identity);

    let mut enc_uri = ENC_URI.to_vec();
    aes128_cfb(&inner_key, &mut enc_uri)?;

    let mut blob = Vec::with_capacity(900);
    for field in [
        &credential[..],
        &secret,
        &duplicate,
        &in_sym_seed,
        &id_public,
        &enc_uri,
    ] {
        put_tpm2b(&mut blob, field);
    }
    let key = SymmetricKey::from_bytes(&key).map_err(|_| TpmError::Crypto("HMAC key length"))?;
    Ok(Activation { blob, key })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn kdfa_counts_blocks_and_truncates() {
        // Two blocks for 512 bits, truncation for 128, and a change with every input.
        let long = kdfa(b"key", "STORAGE", b"u", b"v", 512);
        assert_eq!(long.len(), 64);
        let short = kdfa(b"key", "STORAGE", b"u", b"v", 128);
        assert_eq!(short.len(), 16);
        // The bit count is part of every block, so a shorter output is not a prefix.
        assert_ne!(&long[..16], &short[..]);
        assert_ne!(kdfa(b"key", "INTEGRITY", b"u", b"v", 128), short);
        assert_ne!(kdfa(b"key", "STORAGE", b"w", b"v", 128), short);
        // The contexts are concatenated, as the TPM does.
        assert_eq!(kdfa(b"key", "STORAGE", b"", b"uv", 128), short);
        // Block 1 by hand.
        let block = hmac_sha256(
            b"key",
            &[
                &1u32.to_be_bytes(),
                b"STORAGE",
                &[0],
                b"u",
                b"v",
                &128u32.to_be_bytes(),
            ],
        );
        assert_eq!(short, block[..16]);
    }

    #[test]
    fn registration_id_is_lower_base32_of_the_ek_hash() {
        let tpm = soft::SoftTpm::fixture(0).unwrap();
        let ek = RsaPublic::parse(&tpm.endorsement_key(), KeyRole::Endorsement).unwrap();
        let id = registration_id(&ek);
        assert_eq!(id.len(), 52);
        assert!(id.chars().all(|c| matches!(c, 'a'..='z' | '2'..='7')));
        let expected = data_encoding::BASE32_NOPAD
            .encode(&Sha256::digest(tpm.endorsement_key()))
            .to_lowercase();
        assert_eq!(id, expected);
    }

    #[test]
    fn standard_templates_parse_and_names_hash_the_public_area() {
        let tpm = soft::SoftTpm::fixture(0).unwrap();
        let ek = RsaPublic::parse(&tpm.endorsement_key(), KeyRole::Endorsement).unwrap();
        let srk = RsaPublic::parse(&tpm.storage_root_key(), KeyRole::StorageRoot).unwrap();
        assert_eq!(ek.tpm2b().len(), 316);
        assert_eq!(srk.tpm2b().len(), 284);
        assert_eq!(ek.name().len(), 34);
        assert_eq!(&ek.name()[..2], &[0, 0x0b]);
        assert_eq!(&ek.name()[2..], &Sha256::digest(&ek.tpm2b()[2..])[..]);
        // Each key is only its own role.
        assert!(matches!(
            RsaPublic::parse(&tpm.endorsement_key(), KeyRole::StorageRoot),
            Err(TpmError::NotStandard { .. })
        ));
        assert!(matches!(
            RsaPublic::parse(&tpm.storage_root_key(), KeyRole::Endorsement),
            Err(TpmError::NotStandard { .. })
        ));
    }

    /// Byte offsets inside the EK's TPM2B_PUBLIC.
    const NAME_ALG: usize = 4;
    const ATTRIBUTES: usize = 6;
    const POLICY: usize = 12;
    const SYMMETRIC_BITS: usize = 46;
    const SCHEME: usize = 50;
    const KEY_BITS_AT: usize = 52;
    const EXPONENT: usize = 54;

    #[test]
    fn every_field_of_the_template_is_checked() {
        let ek = soft::SoftTpm::fixture(0).unwrap().endorsement_key();
        let edits: [(usize, &[u8], &str); 8] = [
            (2, &[0x00, 0x23], "type"),
            (NAME_ALG, &[0x00, 0x0c], "nameAlg"),
            (ATTRIBUTES, &[0x00, 0x06, 0x00, 0x72], "objectAttributes"),
            (POLICY, &[0x00], "authPolicy"),
            (SYMMETRIC_BITS, &[0x01, 0x00], "symmetric"),
            (SCHEME, &[0x00, 0x14], "scheme"),
            (KEY_BITS_AT, &[0x04, 0x00], "keyBits"),
            (EXPONENT, &[0, 0, 0, 3], "exponent"),
        ];
        for (at, bytes, field) in edits {
            let mut changed = ek.clone();
            changed[at..at + bytes.len()].copy_from_slice(bytes);
            let err = RsaPublic::parse(&changed, KeyRole::Endorsement).unwrap_err();
            assert!(
                matches!(err, TpmError::NotStandard { .. }),
                "{field}: {err}"
            );
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn malformed_keys_are_refused_without_panicking() {
        let ek = soft::SoftTpm::fixture(0).unwrap().endorsement_key();
        let mut trailing = ek.clone();
        trailing.push(0);
        let mut short_size = ek.clone();
        short_size[1] -= 1;
        let mut long_size = ek.clone();
        long_size[1] += 1;
        for bad in [
            vec![],
            vec![0],
            vec![0, 0],
            ek[..100].to_vec(),
            ek[..ek.len() - 1].to_vec(),
            trailing,
            short_size,
            long_size,
            vec![0u8; MAX_PUBLIC_BYTES + 1],
        ] {
            assert!(RsaPublic::parse(&bad, KeyRole::Endorsement).is_err());
        }
        assert!(RsaPublic::from_base64("***", KeyRole::Endorsement).is_err());
    }

    #[test]
    fn blobs_split_into_six_fields_or_are_refused() {
        let mut blob = Vec::new();
        for n in 0..6u8 {
            blob.extend_from_slice(&[0, n]);
            blob.extend(std::iter::repeat_n(n, usize::from(n)));
        }
        let fields = blob_fields(&blob).unwrap();
        assert_eq!(fields.map(<[u8]>::len), [0, 1, 2, 3, 4, 5]);
        assert!(blob_fields(&blob[..blob.len() - 1]).is_err());
        let mut longer = blob.clone();
        longer.push(0);
        assert!(blob_fields(&longer).is_err());
        assert!(blob_fields(&[]).is_err());
    }

    #[test]
    fn the_blob_has_six_fields_and_opens_only_in_the_right_tpm() {
        let tpm = soft::SoftTpm::fixture(0).unwrap();
        let ek = RsaPublic::parse(&tpm.endorsement_key(), KeyRole::Endorsement).unwrap();
        let srk = RsaPublic::parse(&tpm.storage_root_key(), KeyRole::StorageRoot).unwrap();
        let activation = activation_blob(&ek, &srk).unwrap();
        let sizes = blob_fields(&activation.blob).unwrap().map(<[u8]>::len);
        // credential, EK secret, duplicate, SRK seed, HMAC key public, encUri
        assert_eq!(sizes, [52, 256, 142, 256, 80, ENC_URI.len()]);
        assert_eq!(tpm.activate(&activation.blob).unwrap(), activation.key);

        // A credential made for another TPM's keys does not open.
        let other = soft::SoftTpm::fixture(1).unwrap();
        assert!(other.activate(&activation.blob).is_err());
        // Nor does a blob with a flipped bit in any field.
        for at in [10, 60, 400, 700] {
            let mut tampered = activation.blob.clone();
            tampered[at] ^= 1;
            assert!(tpm.activate(&tampered).is_err(), "byte {at}");
        }
    }
}
