//! The device side of provisioning: first-boot registration with the service.
//!
//! Not written yet. Registration with symmetric keys (file, environment or PKCS#11 token),
//! X.509 and TPM comes with the device registration API; see the issues.
