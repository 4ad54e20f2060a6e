//! The HTTP edges: the admin API (`admin`), the web console over it (`console`) and the device
//! API (`device`), their extractors and the one mapping of domain errors to the Azure error
//! body.

pub mod admin;
pub mod console;
pub mod device;
pub mod error;
pub mod extract;
pub mod json;
