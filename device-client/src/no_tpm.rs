//! The TPM module of a `dps-device` built without the `tpm` feature (which links the system's
//! tpm2-tss through tss-esapi). No TPM can be opened: [`Tpm::open`] says how to get TPM
//! support, and since no [`Tpm`] value can exist, its methods are never reached.

use std::convert::Infallible;
use std::marker::PhantomData;

/// Where the Azure SDKs keep the hub key (the same constant as with the feature).
pub const HUB_KEY_HANDLE: u32 = 0x8100_0100;

/// Why the TPM could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// This build has no TPM support.
    #[error(
        "this dps-device was built without TPM support: build it with `--features tpm` (needs the libtss2-dev and pkg-config packages)"
    )]
    NotBuilt,
}

/// A TPM; without the feature there is none.
#[derive(Debug)]
pub enum Tpm {}

/// A key loaded in the TPM; without the feature there is none.
#[derive(Debug)]
pub struct LoadedKey<'a>(Infallible, PhantomData<&'a ()>);

impl Tpm {
    /// Always refuses: this build has no TPM support.
    pub fn open(_tcti: &str) -> Result<Self, TpmError> {
        Err(TpmError::NotBuilt)
    }

    /// Never called: no `Tpm` exists.
    pub fn endorsement_key(&self) -> &[u8] {
        match *self {}
    }

    /// Never called: no `Tpm` exists.
    pub fn storage_root_key(&self) -> &[u8] {
        match *self {}
    }

    /// Never called: no `Tpm` exists.
    pub fn ek_certificate(&self) -> Option<Vec<u8>> {
        match *self {}
    }

    /// Never called: no `Tpm` exists.
    pub fn import(&self, _blob: &[u8]) -> Result<LoadedKey<'_>, TpmError> {
        match *self {}
    }

    /// Never called: no `Tpm` exists.
    pub fn hmac(&self, _key: &LoadedKey<'_>, _data: &[u8]) -> Result<Vec<u8>, TpmError> {
        match *self {}
    }

    /// Never called: no `Tpm` exists.
    pub fn persist_hub_key(&self, _key: &LoadedKey<'_>) -> Result<(), TpmError> {
        match *self {}
    }
}
