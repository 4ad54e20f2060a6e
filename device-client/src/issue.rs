//! An operational certificate for the device: a key for it (in a PEM file, or inside a PKCS#11
//! token where it is generated and stays), a certificate signing request the service answers
//! with the issued chain, and that chain written as PEM.
//!
//! The key is used where it is when it exists and made when it does not: a file key is
//! written with mode 0600, a token key is generated sensitive and not extractable. A device
//! that registers again sends a new request for the same key and gets a new certificate.

use std::io::Write as _;
use std::path::Path;

use attestation::issuance::{KeyType, certificate_request, generate_key};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dps_pkcs11::{PinSource, Pkcs11Error, PrivateKey, Signer};

use crate::key::KeyError;
use crate::x509::PrivateKeySource;

/// The key of the operational certificate, used where it is or made there.
pub fn open_or_generate(
    source: &PrivateKeySource,
    key_type: KeyType,
    pin: Option<&PinSource>,
) -> Result<Signer, KeyError> {
    match source {
        PrivateKeySource::File(path) if path.exists() => {
            Signer::from_pem_file(path).map_err(|e| KeyError::File(path.clone(), e))
        }
        PrivateKeySource::File(path) => {
            let key = generate_key(key_type)
                .map_err(|e| KeyError::File(path.clone(), format!("generating a key: {e}")))?;
            write_private(path, &key.serialize_pem())
                .map_err(|e| KeyError::File(path.clone(), e.to_string()))?;
            Ok(Signer::Memory(Box::new(key)))
        }
        PrivateKeySource::Pkcs11(uri) => match PrivateKey::open(uri, pin, 1) {
            Ok(key) => Ok(Signer::Token(key)),
            Err(Pkcs11Error::NotFound(_)) => Ok(Signer::Token(PrivateKey::generate(
                uri,
                pin,
                key_type.into(),
                1,
            )?)),
            Err(e) => Err(e.into()),
        },
    }
}

/// Writes a new private key readable by its owner only; refuses to replace a file.
fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()
}

/// The request the register body carries: base64 DER PKCS#10, subject `CN=registration id`.
pub fn request(key: &Signer, registration_id: &str) -> Result<String, KeyError> {
    let der =
        certificate_request(key, registration_id).map_err(|e| KeyError::Request(e.to_string()))?;
    Ok(STANDARD.encode(der))
}

/// Writes the issued chain (base64 DER, leaf first) to `path` as PEM, in that order: the
/// file a TLS client presents as its certificate.
pub fn write_chain(path: &Path, chain: &[String]) -> Result<(), String> {
    let mut pem = String::new();
    for (i, certificate) in chain.iter().enumerate() {
        let der = STANDARD
            .decode(certificate)
            .map_err(|_| format!("certificate {i} of the issued chain is not base64"))?;
        let block = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &der)
            .map_err(|e| format!("certificate {i} of the issued chain: {e}"))?;
        pem.push_str(&block);
    }
    // Written beside and renamed, so a reader never sees half a chain.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, pem).map_err(|e| format!("{}: {e}", partial.display()))?;
    std::fs::rename(&partial, path).map_err(|e| format!("{}: {e}", path.display()))
}
