//! Linked hubs (`/linkedHubs`): the hubs an instance assigns devices to, with their weight,
//! location and connector. Connector secrets are hidden on reads.

use axum::Router;
use axum::routing::get;
use dps_protocol::admin::LinkedHub;

use super::resource::{delete_one, get_one, list, put_one};
use crate::state::AppState;

/// Routes of `/linkedHubs`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/linkedHubs", get(list::<LinkedHub>))
        .route(
            "/linkedHubs/{hostName}",
            get(get_one::<LinkedHub>)
                .put(put_one::<LinkedHub>)
                .delete(delete_one::<LinkedHub>),
        )
}
