//! The admin web console at `/console`: server-rendered pages (askama templates, escaped
//! everywhere) over the admin API. A page calls the API in process, with the session's SAS
//! token, exactly as a remote client would: the API's rights, validation and audit log apply
//! unchanged, and the console holds no rule of its own.
//!
//! Signing in turns a shared access policy (its name and key, or a connection string) into a
//! SAS token of 30 minutes, kept in an HttpOnly, Secure, SameSite=Strict cookie; every form
//! carries a token derived from that cookie; every answer has a strict Content-Security-Policy
//! (the one script and style sheet are embedded in the binary and served from `/console/assets`).

mod pages;
mod session;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tower::ServiceExt as _;

use crate::state::AppState;
use session::Session;

/// The console's state: the server's, and the admin API it calls.
#[derive(Clone, Debug)]
pub struct Console {
    state: AppState,
    api: Router,
}

/// The console's routes (to nest at `/console`), over `api`, the admin API's router.
pub fn routes(state: AppState, api: Router) -> Router {
    Router::new()
        .route("/", get(session::sign_in_page))
        .route("/sign-in", post(session::sign_in))
        .route("/sign-out", post(session::sign_out))
        .route("/assets/console.css", get(stylesheet))
        .route("/assets/console.js", get(script))
        .route("/overview", get(pages::overview))
        .route(
            "/{kind}",
            get(pages::enrollment_list).post(pages::enrollment_create),
        )
        .route("/{kind}/{id}", get(pages::enrollment_page))
        .route("/{kind}/{id}/status", post(pages::enrollment_status))
        .route("/{kind}/{id}/keys", post(pages::enrollment_keys))
        .route("/{kind}/{id}/edit", post(pages::enrollment_edit))
        .route("/{kind}/{id}/delete", post(pages::enrollment_delete))
        .route("/registrations", get(pages::registrations))
        .route("/hubs", get(pages::hubs))
        .route(
            "/certificates",
            get(pages::certificates).post(pages::certificate_upload),
        )
        .route("/certificates/{id}/code", post(pages::certificate_code))
        .route("/certificates/{id}/verify", post(pages::certificate_verify))
        .route("/simulate", get(pages::simulate_form).post(pages::simulate))
        .route("/events", get(pages::events))
        .route("/events/stream", get(pages::event_stream))
        .route("/audit", get(pages::audit))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(Console { state, api })
}

/// What every console answer carries: no script, style, frame or form target but the
/// console's own; no caching (pages show keys); no referrer.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

const STYLESHEET: &str = include_str!("../../../assets/console/console.css");
const SCRIPT: &str = include_str!("../../../assets/console/console.js");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// Characters of a path segment or query value left as they are: letters and digits only, so
/// that no id a user types can reach another route (`/`, `?`, `..`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// `text` as one path segment or query value.
pub fn encode(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// An answer of the admin API.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its JSON body (`null` when empty or not JSON).
    pub json: Value,
}

impl Answer {
    /// Whether it succeeded.
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// What a page says of a refusal: the API's error code and message.
    pub fn error(&self) -> String {
        let code = self.json["errorCode"].as_i64().unwrap_or_default();
        let message = self.json["message"]
            .as_str()
            .unwrap_or("the request failed");
        format!("{} {code}: {message}", self.status.as_u16())
    }
}

/// The largest API answer a page reads.
const MAX_ANSWER: usize = 16 << 20;

impl Console {
    /// Calls the admin API as the session's policy: `path` is under its instance, `headers`
    /// are added (paging, `If-Match`).
    async fn call(
        &self,
        session: &Session,
        method: Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Option<&Value>,
    ) -> Answer {
        match self.send(session, method, path, headers, body).await {
            Ok(response) => {
                let status = response.status();
                let headers = response.headers().clone();
                let json = match axum::body::to_bytes(response.into_body(), MAX_ANSWER).await {
                    Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                Answer {
                    status,
                    headers,
                    json,
                }
            }
            Err(status) => Answer {
                status,
                headers: HeaderMap::new(),
                json: Value::Null,
            },
        }
    }

    /// Sends the request and returns the API's answer as it is (a stream stays a stream).
    async fn send(
        &self,
        session: &Session,
        method: Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Option<&Value>,
    ) -> Result<Response, StatusCode> {
        let joiner = if path.contains('?') { '&' } else { '?' };
        let uri = format!(
            "/instances/{}{path}{joiner}api-version=2021-10-01",
            encode(&session.instance)
        );
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, session.token.as_str());
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        let request = request.body(body).map_err(|_| StatusCode::BAD_REQUEST)?;
        self.api
            .clone()
            .oneshot(request)
            .await
            .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
    }
}
