//! A self-hostable device provisioning service, wire-compatible with Azure IoT Hub DPS.
//!
//! The library holds everything; `main.rs` is a thin command line on top.

pub mod admin_api;
pub mod app;
pub mod bootstrap;
pub mod cache;
pub mod cli;
pub mod config;
pub mod device_api;
pub mod error;
pub mod hubs;
pub mod json;
pub mod observability;
pub mod registration;
pub mod server;
pub mod store;
pub mod throttle;
