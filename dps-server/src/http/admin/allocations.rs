//! `POST /allocations:simulate`: which hub each policy would choose for a described device,
//! and why, without registering anything (see [`crate::domain::simulation`]).

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use dps_protocol::admin::Right;

use crate::domain::DomainError;
use crate::domain::simulation::{self, SimulationRequest, SimulationResult};
use crate::http::extract::{Admin, needs};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;

/// Routes of `/allocations:simulate`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/allocations:simulate", post(simulate))
}

async fn simulate(
    admin: Admin<needs::EnrollmentRead>,
    State(state): State<AppState>,
    JsonBody(request): JsonBody<SimulationRequest>,
) -> Result<Json<SimulationResult>, DomainError> {
    let may_call_webhooks = admin.has(Right::EnrollmentWrite);
    Ok(Json(
        simulation::simulate(&state, &admin.instance, may_call_webhooks, request).await?,
    ))
}
