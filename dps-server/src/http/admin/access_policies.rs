//! Shared access policies (`/accessPolicies`): key names, keys and rights for the admin API.
//! Keys are generated when omitted, shown in the PUT answer and by `listKeys`, never by GET.
//! The last policy with `ServiceConfig` cannot be removed, so an instance cannot lock itself out.

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use dps_protocol::admin::AccessPolicy;

use super::resource::{delete_one, get_one, list, put_one};
use crate::domain::audit;
use crate::domain::error::DomainError;
use crate::domain::resources::{load, render};
use crate::http::extract::{Admin, Id, needs};
use crate::http::json::Json;
use crate::state::AppState;
use crate::store::Kind;

/// `POST /accessPolicies/{keyName}/listKeys`: the policy with its keys.
async fn list_keys(
    admin: Admin<needs::ServiceConfig>,
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<Json<AccessPolicy>, DomainError> {
    let stored = load::<AccessPolicy>(&state, admin.ns(), &id).await?;
    let policy = render(&stored, true)?;
    audit::keys_read(&state, admin.ns(), Kind::AccessPolicy, &stored.key).await?;
    Ok(Json(policy))
}

/// Routes of `/accessPolicies`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/accessPolicies", get(list::<AccessPolicy>))
        .route(
            "/accessPolicies/{keyName}",
            get(get_one::<AccessPolicy>)
                .put(put_one::<AccessPolicy>)
                .delete(delete_one::<AccessPolicy>),
        )
        .route("/accessPolicies/{keyName}/listKeys", post(list_keys))
}
