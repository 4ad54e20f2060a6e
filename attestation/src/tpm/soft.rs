//! A TPM in software, for tests and load generation: an EK and an SRK whose private halves
//! live in memory, marshalled with the standard templates, and the device's half of the
//! activation (what TPM2_ActivateCredential, TPM2_Import and TPM2_Load do with a blob).
//! It proves nothing about a device; the real TPM path is `dps-device --tpm`.

use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, PrivateKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::wire::{Reader, put_tpm2b};
use super::{
    ALG_AES, ALG_CFB, ALG_KEYEDHASH, ALG_NULL, ALG_RSA, ALG_SHA256, EK_ATTRIBUTES, EK_AUTH_POLICY,
    KEY_BITS, SRK_ATTRIBUTES, TpmError, aes128_cfb_decrypt, blob_fields, hmac_sha256, kdfa,
    name_of,
};
use crate::SymmetricKey;

/// Fixed key pairs for tests, so that test runs do not spend seconds generating RSA keys.
const FIXTURES: [(&str, &str); 3] = [
    (
        include_str!("fixtures/tpm0-ek.pem"),
        include_str!("fixtures/tpm0-srk.pem"),
    ),
    (
        include_str!("fixtures/tpm1-ek.pem"),
        include_str!("fixtures/tpm1-srk.pem"),
    ),
    (
        include_str!("fixtures/tpm2-ek.pem"),
        include_str!("fixtures/tpm2-srk.pem"),
    ),
];

/// A software TPM's endorsement key and storage root key.
#[derive(Clone)]
pub struct SoftTpm {
    ek: PrivateKey,
    srk: PrivateKey,
}

impl std::fmt::Debug for SoftTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftTpm(<keys>)")
    }
}

fn open_failed(_: impl Sized) -> TpmError {
    TpmError::Blob("a field is malformed or was not made for this TPM")
}

impl SoftTpm {
    /// A TPM with fresh RSA-2048 keys (about a second per TPM in a release build).
    pub fn generate() -> Result<Self, TpmError> {
        let new = || {
            PrivateKey::new(&mut getrandom::SysRng, usize::from(KEY_BITS))
                .map_err(|_| TpmError::Crypto("RSA key generation"))
        };
        Ok(Self {
            ek: new()?,
            srk: new()?,
        })
    }

    /// One of three fixed test TPMs (`index` 0 to 2). Their private keys are public: never
    /// enroll them anywhere that matters.
    pub fn fixture(index: usize) -> Result<Self, TpmError> {
        let (ek, srk) = FIXTURES
            .get(index)
            .ok_or(TpmError::Crypto("there are three fixture TPMs"))?;
        let parse = |pem: &str| {
            PrivateKey::from_pkcs8_pem(pem).map_err(|_| TpmError::Crypto("a fixture key"))
        };
        Ok(Self {
            ek: parse(ek)?,
            srk: parse(srk)?,
        })
    }

    /// The EK's TPM2B_PUBLIC, with the standard EK template.
    pub fn endorsement_key(&self) -> Vec<u8> {
        marshal_rsa(&self.ek, EK_ATTRIBUTES, &EK_AUTH_POLICY)
    }

    /// The EK as a DER PKCS#1 RSAPublicKey (the subject key of an EK certificate), for
    /// issuing it one.
    pub fn endorsement_key_pkcs1(&self) -> Result<Vec<u8>, TpmError> {
        use rsa::pkcs1::EncodeRsaPublicKey;
        self.ek
            .to_public_key()
            .to_pkcs1_der()
            .map(|der| der.into_vec())
            .map_err(|_| TpmError::Crypto("encoding the EK"))
    }

    /// The SRK's TPM2B_PUBLIC, with the standard SRK template.
    pub fn storage_root_key(&self) -> Vec<u8> {
        marshal_rsa(&self.srk, SRK_ATTRIBUTES, &[])
    }

    /// Opens an activation blob the way a TPM does: the credential with the EK (checked
    /// against the SRK's name), then the duplicate with the SRK and the credential's inner
    /// key. Returns the HMAC key the blob carries.
    pub fn activate(&self, blob: &[u8]) -> Result<SymmetricKey, TpmError> {
        let [credential, secret, duplicate, in_sym_seed, id_public, _uri] = blob_fields(blob)?;

        // ActivateCredential.
        let srk_name = name_of(&self.storage_root_key()[2..]);
        let seed = self
            .ek
            .decrypt(Oaep::<Sha256>::new_with_label(&b"IDENTITY\0"[..]), secret)
            .map_err(open_failed)?;
        let mut c = Reader::new(credential);
        let integrity = c.tpm2b().map_err(open_failed)?;
        let mut identity = c.rest().to_vec();
        let expected = hmac_sha256(
            &kdfa(&seed, "INTEGRITY", &[], &[], 256),
            &[&identity, &srk_name],
        );
        if !bool::from(expected.ct_eq(integrity)) {
            return Err(TpmError::Blob("the credential's integrity check failed"));
        }
        aes128_cfb_decrypt(&kdfa(&seed, "STORAGE", &srk_name, &[], 128), &mut identity)?;
        let inner_key = Reader::new(&identity)
            .tpm2b()
            .map_err(open_failed)?
            .to_vec();

        // Import: the outer wrapper with the SRK, then the inner one with the credential.
        let id_name = name_of(id_public);
        let seed = self
            .srk
            .decrypt(
                Oaep::<Sha256>::new_with_label(&b"DUPLICATE\0"[..]),
                in_sym_seed,
            )
            .map_err(open_failed)?;
        let mut d = Reader::new(duplicate);
        let outer_hmac = d.tpm2b().map_err(open_failed)?;
        let mut sensitive = d.rest().to_vec();
        let expected = hmac_sha256(
            &kdfa(&seed, "INTEGRITY", &[], &[], 256),
            &[&sensitive, &id_name],
        );
        if !bool::from(expected.ct_eq(outer_hmac)) {
            return Err(TpmError::Blob("the duplicate's integrity check failed"));
        }
        aes128_cfb_decrypt(&kdfa(&seed, "STORAGE", &id_name, &[], 128), &mut sensitive)?;
        aes128_cfb_decrypt(&inner_key, &mut sensitive)?;
        let mut s = Reader::new(&sensitive);
        let inner_integrity = s.tpm2b().map_err(open_failed)?;
        let sens2b = s.rest();
        let expected = Sha256::new()
            .chain_update(sens2b)
            .chain_update(&id_name)
            .finalize();
        if !bool::from(expected.as_slice().ct_eq(inner_integrity)) {
            return Err(TpmError::Blob("the inner integrity check failed"));
        }
        let mut t = Reader::new(Reader::new(sens2b).tpm2b().map_err(open_failed)?);
        if t.u16().map_err(open_failed)? != ALG_KEYEDHASH {
            return Err(TpmError::Blob("the key is not a keyed hash"));
        }
        t.tpm2b().map_err(open_failed)?;
        let seed_value = t.tpm2b().map_err(open_failed)?;
        let key = t.tpm2b().map_err(open_failed)?;
        // Load: the public area must be bound to the sensitive one.
        let unique = Sha256::new()
            .chain_update(seed_value)
            .chain_update(key)
            .finalize();
        if !id_public.ends_with(&unique) {
            return Err(TpmError::Blob("the public area is not bound to the key"));
        }
        SymmetricKey::from_bytes(key).map_err(|_| TpmError::Blob("the key length"))
    }
}

/// TPM2B_PUBLIC of an RSA-2048 restricted decryption key with AES-128-CFB, exponent 0.
fn marshal_rsa(key: &PrivateKey, attributes: u32, policy: &[u8]) -> Vec<u8> {
    let mut public = Vec::with_capacity(320);
    public.extend_from_slice(&ALG_RSA.to_be_bytes());
    public.extend_from_slice(&ALG_SHA256.to_be_bytes());
    public.extend_from_slice(&attributes.to_be_bytes());
    put_tpm2b(&mut public, policy);
    public.extend_from_slice(&ALG_AES.to_be_bytes());
    public.extend_from_slice(&128u16.to_be_bytes());
    public.extend_from_slice(&ALG_CFB.to_be_bytes());
    public.extend_from_slice(&ALG_NULL.to_be_bytes());
    public.extend_from_slice(&KEY_BITS.to_be_bytes());
    public.extend_from_slice(&0u32.to_be_bytes());
    let modulus = key.n().to_be_bytes();
    let width = usize::from(KEY_BITS / 8);
    let modulus = &modulus[modulus.len().saturating_sub(width)..];
    put_tpm2b(&mut public, modulus);
    let mut out = Vec::with_capacity(public.len() + 2);
    put_tpm2b(&mut out, &public);
    out
}
