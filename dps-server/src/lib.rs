//! A self-hostable device provisioning service, wire-compatible with Azure IoT Hub DPS.
//!
//! The library holds everything; `main.rs` is a thin command line on top. Layers, from the
//! bottom up (each uses only those below it; ARCHITECTURE.md has the picture): configuration,
//! storage, hub connectors and the other services (`hubs`, `throttle`, `cache`,
//! `observability`), the shared state, the domain rules (`domain`), the HTTP edges (`http`),
//! and the process (`app`, `server`, `cli`).

pub mod app;
pub mod bootstrap;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod event_webhook;
pub mod http;
pub mod hubs;
pub mod mqtt;
pub mod observability;
pub mod server;
pub mod state;
pub mod store;
pub mod throttle;
pub mod timestamp;
pub mod trust;
