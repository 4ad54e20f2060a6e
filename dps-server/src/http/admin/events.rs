//! Registration events (`GET /events`), filtered by query parameters and paged, and streamed
//! live as Server-Sent Events (`GET /events/stream`); the rules are in
//! [`crate::domain::events`].

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dps_protocol::ErrorCode;
use dps_protocol::admin::Right;
use std::collections::VecDeque;
use std::time::Duration;

use crate::domain::{DomainError, access, events};
use crate::http::extract::{Admin, PageRequest, needs};
use crate::state::AppState;
use crate::store::EventFilter;

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
/// How old an event must be before a stream sends it. An event's id is its server's clock
/// when it was written, not when it committed: a transaction that commits late (a lock, a
/// retry), or a replica whose clock is a little behind, writes an id older than ones already
/// sent. Waiting this long lets those land first, so that none is skipped.
const SETTLE: Duration = Duration::from_secs(3);
/// A stream ends after this long (the client reconnects with `Last-Event-ID`, and so shows
/// its credentials again).
const MAX_STREAM: Duration = Duration::from_secs(3600);
/// How often a stream checks that its credentials still grant the right.
const CREDENTIALS_CHECK: Duration = Duration::from_secs(10);

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
    // An empty one (a client that saw nothing yet) is none.
    let last_seen = headers
        .get("last-event-id")
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|id| events::is_event_id(id))
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
    let live = Live {
        after: events::stream_start(last_seen, &filter),
        filter,
        ns: admin.ns().to_owned(),
        instance: admin.instance.clone(),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        state,
        pending: VecDeque::new(),
        _permit: permit,
        ends: tokio::time::Instant::now() + MAX_STREAM,
        checked: tokio::time::Instant::now(),
        first: true,
        last: false,
    };
    let stream = futures_util::stream::unfold(live, |mut live| async move {
        let event = live.next().await?;
        Some((Ok::<_, std::convert::Infallible>(event), live))
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Not an idle connection while the stream goes on.
    response.extensions_mut().insert(dps_listener::LongLived);
    Ok(response)
}

/// A live stream's place: what it reads, from where, and what it owes the client.
struct Live {
    state: AppState,
    ns: String,
    instance: dps_protocol::admin::Instance,
    /// The request's credentials, checked again every [`CREDENTIALS_CHECK`].
    authorization: String,
    filter: EventFilter,
    /// The last event sent (or the key the stream starts after).
    after: String,
    pending: VecDeque<sse::Event>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    ends: tokio::time::Instant,
    checked: tokio::time::Instant,
    /// Read at once (the first read, or the page before was full).
    first: bool,
    /// The filter's end is behind: the stream ends once `pending` is sent.
    last: bool,
}

impl Live {
    /// The next SSE message, waiting for it; `None` ends the stream: past its hour, past its
    /// `to`, or once its credentials no longer grant the right (an expired token, a policy
    /// removed or changed).
    async fn next(&mut self) -> Option<sse::Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.last || tokio::time::Instant::now() >= self.ends {
                return None;
            }
            if !self.first {
                tokio::time::sleep(STREAM_POLL).await;
            }
            self.first = false;
            if self.checked.elapsed() >= CREDENTIALS_CHECK {
                self.checked = tokio::time::Instant::now();
                let caller =
                    access::caller(&self.state, &self.instance, Some(&self.authorization)).await;
                if !caller.is_ok_and(|c| c.rights.contains(&Right::RegistrationStatusRead)) {
                    return None;
                }
            }
            // Only settled events (see SETTLE), and none past the filter's end.
            let settled = events::key_before_now(SETTLE);
            let done = self.filter.to.as_ref().is_some_and(|to| *to <= settled);
            let mut window = self.filter.clone();
            window.to = Some(match &self.filter.to {
                Some(to) if *to < settled => to.clone(),
                _ => settled,
            });
            // A failed read is tried again at the next poll; the stream stays open.
            let Ok(rows) = self
                .state
                .store
                .list_events(&self.ns, &window, Some(&self.after), STREAM_PAGE)
                .await
            else {
                continue;
            };
            let full = rows.len() == STREAM_PAGE;
            for row in rows {
                self.after = row.key.clone();
                let Ok(event) = events::render(&row) else {
                    continue;
                };
                let Ok(data) = serde_json::to_string(&event) else {
                    continue;
                };
                self.pending.push_back(
                    sse::Event::default()
                        .id(row.key)
                        .event(event.kind)
                        .data(data),
                );
            }
            // A full page: the next one without waiting. Past the filter's end, the last.
            self.first = full;
            self.last = done && !full;
        }
    }
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
