//! The device side of provisioning: first-boot registration with the service over HTTPS or MQTT, with a
//! symmetric key from a file, an environment variable or a PKCS#11 token (used in place), an
//! individual key or a group key derived locally; or with an X.509 certificate whose private
//! key is in a file or a PKCS#11 token.

pub mod issue;
pub mod key;
pub mod mqtt;
pub mod register;
pub mod state;
pub mod token_tls;
#[cfg(feature = "tpm")]
pub mod tpm;
#[cfg(not(feature = "tpm"))]
#[path = "no_tpm.rs"]
pub mod tpm;
pub mod x509;

pub use dps_pkcs11 as pkcs11;
pub use key::{Credential, KeySource, SasSigner};
pub use register::{Assignment, Proof, RegisterError, Registration, Transport, register};
pub use x509::{ClientCertificate, PrivateKeySource};
