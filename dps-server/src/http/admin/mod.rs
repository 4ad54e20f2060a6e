//! The admin REST API: the Azure DPS service API (enrollments, enrollment groups, registration
//! states) and our extensions (instances, linked hubs, shared access policies, issuing CAs,
//! credential policies, issued certificates, events, the audit log).
//!
//! Instance-scoped routes are served twice: at the root, where the request's Host selects the
//! instance (or the only instance, on a server with one), and under `/instances/{instance}`.

mod access_policies;
mod allocations;
mod audit;
pub mod certificates;
mod enrollment_groups;
mod enrollments;
mod events;
pub mod instances;
mod issued_certificates;
mod issuing_cas;
mod linked_hubs;
pub mod ownership;
mod registrations;
pub mod resource;

use axum::Router;

use crate::state::AppState;

/// Routes that act on one instance.
pub fn instance_routes() -> Router<AppState> {
    Router::new()
        .merge(enrollments::routes())
        .merge(enrollment_groups::routes())
        .merge(registrations::routes())
        .merge(linked_hubs::routes())
        .merge(access_policies::routes())
        .merge(allocations::routes())
        .merge(ownership::routes())
        .merge(certificates::routes())
        .merge(issued_certificates::routes())
        .merge(issuing_cas::routes())
        .merge(events::routes())
        .merge(audit::routes())
}

/// Every admin route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(instance_routes())
        .merge(instances::routes())
        .nest("/instances/{instance}", instance_routes())
}
