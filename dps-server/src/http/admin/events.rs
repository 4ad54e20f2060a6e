//! Registration events (`GET /events`), filtered by query parameters and paged, and streamed
//! live as Server-Sent Events (`GET /events/stream`); the rules are in
//! [`crate::domain::events`].

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dps_protocol::ErrorCode;
use std::collections::VecDeque;
use std::time::Duration;

use crate::domain::{DomainError, events};
use crate::http::extract::{Admin, PageRequest, needs};
use crate::state::AppState;

/// Routes of `/events`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/events", get(list))
        .route("/events/stream", get(stream))
}

/// How often a live stream looks for new events (every replica's are in the database).
const STREAM_POLL: Duration = Duration::from_secs(1);
/// Events a stream reads at once.
const STREAM_PAGE: usize = 100;
/// The longest `Last-Event-ID` taken (event ids are about 30 characters).
const MAX_LAST_EVENT_ID: usize = 64;

/// The 400 of a query that is not the filters'.
fn bad_query(e: &QueryRejection) -> DomainError {
    DomainError::new(
        ErrorCode::InvalidFormat,
        format!(
            "the query takes kind, registrationId, enrollmentId, enrollmentGroupId, from and to: {}",
            e.body_text()
        ),
    )
}

/// `GET /events/stream`: the events that match the filters, as they are written (after the
/// `Last-Event-ID` a reconnecting client sends, or from `from`, else from now). Each SSE event
/// carries the event's id, its kind as the SSE event name, and the event as JSON data.
async fn stream(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    query: Result<Query<events::Query>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let Query(query) = query.map_err(|e| bad_query(&e))?;
    let filter = events::filter_of(&query)?;
    let last_seen = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|id| id.len() <= MAX_LAST_EVENT_ID)
                .ok_or_else(|| {
                    DomainError::new(ErrorCode::InvalidHeader, "Last-Event-ID: not an event id")
                })
        })
        .transpose()?;
    let permit = state
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            DomainError::new(
                ErrorCode::ServiceUnavailable,
                "as many event streams are open as this server allows (limits.max_event_streams)",
            )
        })?;
    let after = events::stream_start(last_seen, &filter);
    let ns = admin.ns().to_owned();
    let pending: VecDeque<sse::Event> = VecDeque::new();
    let stream = futures_util::stream::unfold(
        (state, ns, filter, after, pending, permit, true),
        |(state, ns, filter, mut after, mut pending, permit, mut first)| async move {
            loop {
                if let Some(event) = pending.pop_front() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (state, ns, filter, after, pending, permit, first),
                    ));
                }
                if !first {
                    tokio::time::sleep(STREAM_POLL).await;
                }
                first = false;
                // A failed read is tried again at the next poll; the stream stays open.
                let Ok(rows) = state
                    .store
                    .list_events(&ns, &filter, Some(&after), STREAM_PAGE)
                    .await
                else {
                    continue;
                };
                let full = rows.len() == STREAM_PAGE;
                for row in rows {
                    after = row.key.clone();
                    let Ok(event) = events::render(&row) else {
                        continue;
                    };
                    let Ok(data) = serde_json::to_string(&event) else {
                        continue;
                    };
                    pending.push_back(
                        sse::Event::default()
                            .id(row.key)
                            .event(event.kind)
                            .data(data),
                    );
                }
                // A full page: the next one without waiting.
                first = full;
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn list(
    admin: Admin<needs::RegistrationStatusRead>,
    State(state): State<AppState>,
    query: Result<Query<events::Query>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, DomainError> {
    let Query(query) = query.map_err(|e| bad_query(&e))?;
    let page = PageRequest::from_headers(&headers, &state.limits)?;
    let rows = events::list(
        &state,
        admin.ns(),
        &query,
        page.after.as_deref(),
        page.fetch_limit(),
    )
    .await?;
    page.respond(rows, "Event", events::render)
}
