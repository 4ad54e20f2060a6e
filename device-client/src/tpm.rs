//! TPM 2.0 attestation on the device (reference section 2.4), through tss-esapi over any TCTI:
//! `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd`.
//!
//! - The EK (TCG template L-1) at 0x81010001 and the SRK (RSA-2048 storage key) at 0x81000001,
//!   as the Azure SDKs keep them: used when present, created and persisted when not. Both are
//!   exported as marshalled TPM2B_PUBLIC.
//! - The EK certificate from NV index 0x01c00002, when the manufacturer put one there.
//! - An activation blob is imported: TPM2_ActivateCredential (the SRK under a password
//!   session, the EK under PolicySecret(endorsement)) yields the inner key, then TPM2_Import
//!   and TPM2_Load under the SRK. The key never leaves the TPM; TPM2_HMAC signs with it.
//! - The hub key of the final blob is persisted at 0x81000100, where the Azure SDKs keep it.
//!
//! The endorsement and owner hierarchies are used with empty authorisation values.

use std::str::FromStr;
use std::sync::Mutex;

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ek};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, PublicAlgorithm,
};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, EncryptedSecret, IdObject, MaxBuffer, Nonce, Private, Public, PublicBuffer,
    PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

/// Where the Azure SDKs keep the EK.
pub const EK_HANDLE: u32 = 0x8101_0001;
/// Where the Azure SDKs keep the SRK.
pub const SRK_HANDLE: u32 = 0x8100_0001;
/// Where the C and Node SDKs keep the key the device signs hub tokens with.
pub const HUB_KEY_HANDLE: u32 = 0x8100_0100;

/// Why the TPM could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string does not parse.
    #[error("'{0}' is not a TCTI (device:/dev/tpmrm0, swtpm:host=HOST,port=PORT, tabrmd)")]
    Tcti(String),
    /// A TPM command failed.
    #[error("TPM: {what}: {source}")]
    Tpm {
        /// What the client was doing.
        what: &'static str,
        /// What the TPM stack said.
        source: tss_esapi::Error,
    },
    /// The service's activation blob is not six TPM2B fields.
    #[error("the service's activation blob is malformed")]
    Blob,
}

fn failed(what: &'static str) -> impl Fn(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Tpm { what, source }
}

/// A key loaded into the TPM from an activation blob, unloaded when dropped: a TPM without a
/// resource manager has only a few object slots, and a failed registration must not keep one.
#[derive(Debug)]
pub struct LoadedKey<'a> {
    tpm: &'a Tpm,
    handle: KeyHandle,
}

impl Drop for LoadedKey<'_> {
    fn drop(&mut self) {
        let _ = self.tpm.context().flush_context(self.handle.into());
    }
}

/// A TPM with its EK and SRK in place.
#[derive(Debug)]
pub struct Tpm {
    context: Mutex<Context>,
    ek: KeyHandle,
    srk: KeyHandle,
    ek_public: Vec<u8>,
    srk_public: Vec<u8>,
}

impl Tpm {
    /// Opens the TPM behind `tcti` and makes sure the EK and SRK are persisted.
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|_| TpmError::Tcti(tcti.to_owned()))?;
        let mut context = Context::new(conf).map_err(failed("opening the TPM"))?;
        let ek = persistent_or_create(&mut context, EK_HANDLE, |c| {
            ek::create_ek_object(c, AsymmetricAlgorithm::Rsa, None)
        })?;
        let srk = persistent_or_create(&mut context, SRK_HANDLE, create_srk)?;
        let ek_public = export(&mut context, ek)?;
        let srk_public = export(&mut context, srk)?;
        Ok(Self {
            context: Mutex::new(context),
            ek,
            srk,
            ek_public,
            srk_public,
        })
    }

    /// The EK's TPM2B_PUBLIC.
    pub fn endorsement_key(&self) -> &[u8] {
        &self.ek_public
    }

    /// The SRK's TPM2B_PUBLIC.
    pub fn storage_root_key(&self) -> &[u8] {
        &self.srk_public
    }

    fn context(&self) -> std::sync::MutexGuard<'_, Context> {
        // A panic while holding the lock cannot leave the TPM context half-changed in a way
        // later calls depend on: each call is one or a few complete TPM commands.
        self.context
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The RSA-2048 EK certificate from NV, when the TPM has one.
    pub fn ek_certificate(&self) -> Option<Vec<u8>> {
        ek::retrieve_ek_pubcert(
            &mut self.context(),
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .ok()
    }

    /// Imports the key of an activation blob and loads it.
    pub fn import(&self, blob: &[u8]) -> Result<LoadedKey<'_>, TpmError> {
        let [credential, secret, duplicate, seed, public, _uri] =
            attestation::tpm::blob_fields(blob).map_err(|_| TpmError::Blob)?;
        let mut ctx = self.context();
        // The EK's policy is PolicySecret(TPM_RH_ENDORSEMENT).
        let session = ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(failed("starting a policy session"))?
            .ok_or(TpmError::Tpm {
                what: "starting a policy session",
                source: tss_esapi::Error::WrapperError(
                    tss_esapi::WrapperErrorKind::WrongValueFromTpm,
                ),
            })?;
        let inner = activate(&mut ctx, session, self.srk, self.ek, credential, secret);
        let flushed = ctx.flush_context(ObjectHandle::from(
            tss_esapi::handles::SessionHandle::from(session),
        ));
        let inner = inner?;
        flushed.map_err(failed("flushing the policy session"))?;

        let public = Public::unmarshall(public).map_err(failed("reading the key's public area"))?;
        let srk = self.srk;
        let key = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                let private = c.import(
                    srk.into(),
                    Some(Data::try_from(inner.to_vec())?),
                    public.clone(),
                    Private::try_from(duplicate.to_vec())?,
                    EncryptedSecret::try_from(seed.to_vec())?,
                    SymmetricDefinitionObject::AES_128_CFB,
                )?;
                c.load(srk, private, public)
            })
            .map_err(failed("importing the key"))?;
        Ok(LoadedKey {
            tpm: self,
            handle: key,
        })
    }

    /// HMAC-SHA256 of `data` with a loaded key (TPM2_HMAC).
    pub fn hmac(&self, key: &LoadedKey<'_>, data: &[u8]) -> Result<Vec<u8>, TpmError> {
        let mut ctx = self.context();
        let digest = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.hmac(
                    key.handle.into(),
                    MaxBuffer::try_from(data.to_vec())?,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(failed("signing with TPM2_HMAC"))?;
        Ok(digest.to_vec())
    }

    /// Persists a loaded key at [`HUB_KEY_HANDLE`], replacing what is there (the transient copy
    /// is unloaded when `key` is dropped).
    pub fn persist_hub_key(&self, key: &LoadedKey<'_>) -> Result<(), TpmError> {
        let mut ctx = self.context();
        let handle = persistent_handle(HUB_KEY_HANDLE)?;
        if let Ok(old) =
            ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(handle)))
        {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.evict_control(Provision::Owner, old, Persistent::Persistent(handle))
            })
            .map_err(failed("removing the previous hub key"))?;
        }
        ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.evict_control(
                Provision::Owner,
                key.handle.into(),
                Persistent::Persistent(handle),
            )
        })
        .map_err(failed("persisting the hub key"))?;
        Ok(())
    }
}

fn activate(
    ctx: &mut Context,
    session: AuthSession,
    srk: KeyHandle,
    ek: KeyHandle,
    credential: &[u8],
    secret: &[u8],
) -> Result<Digest, TpmError> {
    let policy = PolicySession::try_from(session).map_err(failed("the policy session"))?;
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.policy_secret(
            policy,
            AuthHandle::Endorsement,
            Nonce::default(),
            Digest::default(),
            Nonce::default(),
            None,
        )
    })
    .map_err(failed("PolicySecret(endorsement)"))?;
    ctx.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
        c.activate_credential(
            srk,
            ek,
            IdObject::try_from(credential.to_vec())?,
            EncryptedSecret::try_from(secret.to_vec())?,
        )
    })
    .map_err(failed(
        "activating the credential (is the blob for this TPM?)",
    ))
}

fn persistent_handle(handle: u32) -> Result<PersistentTpmHandle, TpmError> {
    PersistentTpmHandle::new(handle).map_err(failed("a persistent handle"))
}

/// The key at a persistent handle, created with `create` and persisted there when absent.
fn persistent_or_create(
    ctx: &mut Context,
    handle: u32,
    create: impl FnOnce(&mut Context) -> tss_esapi::Result<KeyHandle>,
) -> Result<KeyHandle, TpmError> {
    let persistent = persistent_handle(handle)?;
    if let Ok(object) =
        ctx.execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
    {
        return Ok(object.into());
    }
    let transient = create(ctx).map_err(failed("creating a primary key"))?;
    let persisted = ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.evict_control(
            Provision::Owner,
            transient.into(),
            Persistent::Persistent(persistent),
        )
    });
    let flushed = ctx.flush_context(transient.into());
    let persisted = persisted.map_err(failed("persisting a primary key"))?;
    flushed.map_err(failed("unloading a primary key"))?;
    Ok(persisted.into())
}

/// The SRK template of TCG's provisioning guidance (the Azure C SDK's `GetSrkTemplate`).
fn create_srk(ctx: &mut Context) -> tss_esapi::Result<KeyHandle> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                RsaKeyBits::Rsa2048,
                RsaExponent::default(),
            )
            .build()?,
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()?;
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.create_primary(Hierarchy::Owner, public, None, None, None, None)
    })
    .map(|created| created.key_handle)
}

/// A key's TPM2B_PUBLIC.
fn export(ctx: &mut Context, key: KeyHandle) -> Result<Vec<u8>, TpmError> {
    let (public, _, _) = ctx
        .execute_without_session(|c| c.read_public(key))
        .map_err(failed("reading a public key"))?;
    PublicBuffer::try_from(public)
        .and_then(|buffer| buffer.marshall())
        .map_err(failed("marshalling a public key"))
}
