//! Instances (`/instances`): one server serves many. Managing them needs `ServiceConfig` on
//! the admin instance. An instance's ID scope and host names are unique across the server;
//! creating an instance creates its owner policy, whose keys the answer shows once.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use dps_protocol::ErrorCode;
use dps_protocol::admin::Instance;

use crate::domain::error::DomainError;
use crate::domain::instances;
use crate::http::extract::{Id, PageRequest, ServerAdmin, delete_precondition, put_precondition};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;
use crate::store::{Kind, Page, SERVER_NS};

/// Routes of `/instances`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/instances", get(list)).route(
        "/instances/{instance}",
        get(get_one).put(put_one).delete(delete_one),
    )
}

async fn list(
    _admin: ServerAdmin,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = state
        .store
        .list(
            SERVER_NS,
            Kind::Instance,
            Page {
                parent: None,
                after: page.after.as_deref(),
                limit: page.fetch_limit(),
            },
        )
        .await?;
    page.respond(rows, "Instance", instances::from_stored)
}

async fn get_one(
    _admin: ServerAdmin,
    State(state): State<AppState>,
    Id(name): Id,
) -> Result<Json<Instance>, DomainError> {
    Ok(Json(
        crate::domain::instances::load_instance(state.store.as_ref(), &name).await?,
    ))
}

async fn put_one(
    _admin: ServerAdmin,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
    JsonBody(instance): JsonBody<Instance>,
) -> Result<Json<Instance>, DomainError> {
    if instances::instance_key(&instance.name)? != instances::instance_key(&name)? {
        return Err(DomainError::new(
            ErrorCode::IdMismatch,
            format!(
                "the body names '{}' but the path names '{name}'",
                instance.name
            ),
        ));
    }
    let saved = instances::save(state.store.as_ref(), instance, put_precondition(&headers)?).await;
    state.instances.clear();
    Ok(Json(saved?))
}

async fn delete_one(
    _admin: ServerAdmin,
    State(state): State<AppState>,
    Id(name): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    instances::delete(&state, &name, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
