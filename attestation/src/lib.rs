//! Device and service credentials, without I/O: SAS tokens, symmetric keys and the
//! group-to-device key derivation, facts read from X.509 certificates, and the service's side
//! of TPM attestation.

pub mod chain;
pub mod connection_string;
pub mod issuance;
pub mod keys;
pub mod sas;
pub mod tpm;
pub mod x509;

pub use connection_string::{ConnectionString, ConnectionStringError};
pub use keys::{KeyError, SymmetricKey};
pub use sas::{SasError, SasToken};
