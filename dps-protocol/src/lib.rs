//! Wire types shared by the provisioning server, its admin CLI and the device client.
//!
//! The device and service shapes follow the Azure IoT Hub DPS REST API (`2021-10-01`); the
//! admin extensions (instances, linked hubs, access policies) follow the same conventions.

pub mod admin;
pub mod device;
pub mod enrollment;
pub mod error;
pub mod ids;
pub mod mqtt;

pub use error::{ErrorBody, ErrorCode};
