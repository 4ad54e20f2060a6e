//! The HTTP edges: the admin API (`admin`) and the device API (`device`), their extractors
//! and the one mapping of domain errors to the Azure error body.

pub mod admin;
pub mod device;
pub mod error;
pub mod extract;
pub mod json;
