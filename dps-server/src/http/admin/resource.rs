//! Handlers for an instance's configuration documents (linked hubs, shared access policies):
//! PUT under the etag rules, GET without secrets, DELETE, list. All need `ServiceConfig`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use dps_protocol::ErrorCode;

use crate::domain::error::DomainError;
use crate::domain::resources::{self, Resource, load, render, store_resource};
use crate::http::extract::{Admin, Id, PageRequest, delete_precondition, needs, put_precondition};
use crate::http::json::{Json, JsonBody};
use crate::state::AppState;
use crate::store::Page;

/// `PUT /{kind}/{id}`. The answer shows the secrets the request sent and generated ones, once;
/// never a stored secret the request did not send.
pub async fn put_one<R: Resource>(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
    JsonBody(resource): JsonBody<R>,
) -> Result<Json<R>, DomainError> {
    same_id(&resource, &id)?;
    let sent = resource.clone();
    let (stored, previous) =
        store_resource(&state, admin.ns(), resource, put_precondition(&headers)?).await?;
    let mut answer: R = render(&stored, true)?;
    answer.hide_unsent_secrets(&sent, previous.as_ref());
    Ok(Json(answer))
}

/// The 400 of a body that names another resource than the path.
pub fn same_id<R: Resource>(body: &R, path: &str) -> Result<(), DomainError> {
    if R::key_of(body.id())? != R::key_of(path)? {
        return Err(DomainError::new(
            ErrorCode::IdMismatch,
            format!("the body names '{}' but the path names '{path}'", body.id()),
        ));
    }
    Ok(())
}

/// `GET /{kind}/{id}`.
pub async fn get_one<R: Resource>(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<R>, DomainError> {
    let stored = load::<R>(&state, admin.ns(), &id).await?;
    let mut resource: R = render(&stored, false)?;
    resource.annotate(&R::counts(&state, admin.ns()).await?);
    Ok(Json(resource))
}

/// `DELETE /{kind}/{id}`.
pub async fn delete_one<R: Resource>(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<StatusCode, DomainError> {
    resources::delete::<R>(&state, admin.ns(), &id, delete_precondition(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /{kind}`: paged with `x-ms-max-item-count` / `x-ms-continuation`.
pub async fn list<R: Resource>(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = state
        .store
        .list(
            admin.ns(),
            R::KIND,
            Page {
                parent: None,
                after: page.after.as_deref(),
                limit: page.fetch_limit(),
            },
        )
        .await?;
    let counts = R::counts(&state, admin.ns()).await?;
    page.respond(rows, R::ITEM_TYPE, |stored| {
        let mut resource: R = render(stored, false)?;
        resource.annotate(&counts);
        Ok(resource)
    })
}
