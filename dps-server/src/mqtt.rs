//! The service's MQTT front end: `dps_listener::mqtt` sessions over this server's router, on
//! the MQTT port (`server.rs`) and, upgraded from HTTPS, over WebSockets (here).

use axum::Router;
use axum::extract::{FromRequestParts as _, Request, State};
use axum::http::header;
use axum::response::{IntoResponse as _, Response};
use dps_listener::mqtt::{Front, MqttSettings};
use dps_listener::{ClientChain, PeerAddr};
use dps_protocol::ErrorCode;
use std::time::Duration;

use crate::domain::DomainError;

/// Room for a packet's topic and header around the largest device body.
const PACKET_OVERHEAD: usize = 4 * 1024;

/// The MQTT limits that follow from the configured ones.
pub fn settings(limits: &crate::config::Limits) -> MqttSettings {
    MqttSettings {
        max_packet: limits.max_device_body_bytes + PACKET_OVERHEAD,
        connect_deadline: Duration::from_secs(limits.request_header_timeout_secs.max(1)),
        body_deadline: Duration::from_secs(limits.request_body_timeout_secs.max(1)),
        max_websockets: limits.max_connections,
    }
}

/// MQTT over WebSockets on the HTTPS listener: `GET /$iothub/websocket` (Node, Python, C) and
/// `GET /` (C#) upgraded with the subprotocol `mqtt`, compared without case (the C SDK sends
/// `MQTT`). A `GET /` that is not such an upgrade is the 404 it was.
pub fn websocket_routes(front: Front) -> Router {
    Router::new()
        .route("/$iothub/websocket", axum::routing::get(websocket))
        .route("/", axum::routing::get(websocket))
        .with_state(front)
}

async fn websocket(State(front): State<Front>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let offered = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.eq_ignore_ascii_case("mqtt"))
        .map(str::to_owned);
    let peer = parts.extensions.get::<PeerAddr>().copied();
    let chain = parts.extensions.get::<ClientChain>().cloned();
    let upgrade = axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await;
    let (Ok(upgrade), Some(protocol), Some(PeerAddr(peer))) = (upgrade, offered, peer) else {
        return DomainError::new(
            ErrorCode::RouteNotFound,
            format!("no route for GET {}", parts.uri.path()),
        )
        .into_response();
    };
    // An upgraded connection leaves the HTTPS listener's count: sessions are capped here.
    let Some(slot) = front.websocket_slot() else {
        return DomainError::new(
            ErrorCode::ServiceUnavailable,
            "too many MQTT connections; try again later",
        )
        .into_response();
    };
    // Both limits: tungstenite reads a whole frame (16 MiB by default) before it checks the
    // message size, so a frame's header must be refused on its own.
    let max_message = front.max_packet();
    upgrade
        .protocols([protocol])
        .max_frame_size(max_message)
        .max_message_size(max_message)
        .on_upgrade(move |socket| async move {
            front.serve_websocket(socket, peer, chain).await;
            drop(slot);
        })
}
