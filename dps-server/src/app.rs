//! The HTTP applications: on the public listener the device and admin routes, health and the
//! OpenAPI document, behind request tracking, a body limit and path canonicalisation; on the
//! metrics listener `/metrics` and the health checks.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dps_protocol::ErrorCode;
use serde_json::json;

use crate::domain::error::DomainError;
use crate::http::json::Json;
use crate::http::{admin, device};
use crate::observability;
use crate::state::AppState;

/// The admin API's OpenAPI document, checked in beside the code.
pub const OPENAPI_YAML: &str = include_str!("../openapi/admin.yaml");

/// Path segments matched without regard to case, in their canonical spelling. The Node
/// service client sends `/enrollmentgroups/...` in lower case.
const KEYWORDS: &[&str] = &[
    "enrollments",
    "enrollmentGroups",
    "registrations",
    "query",
    "attestationmechanism",
    "instances",
    "linkedHubs",
    "accessPolicies",
    "listKeys",
    "healthz",
    "readyz",
    "metrics",
    "openapi.yaml",
    "register",
    "operations",
    "allocations:simulate",
    "owners",
    "devices",
    "ownershipRecords",
    "ownershipRecords:import",
    "ownershipRecords:transfer",
    "certificates",
    "generateVerificationCode",
    "verify",
];

/// Rewrites keyword segments of the path to their canonical case, so routing ignores case,
/// and drops a trailing slash (the Node service client posts bulk operations to
/// `/enrollments/`).
pub fn canonicalize_path(mut req: Request) -> Request {
    let uri = req.uri();
    let path = uri.path();
    let trimmed = match path.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => path,
    };
    let canonical: Vec<&str> = trimmed
        .split('/')
        .map(|segment| {
            KEYWORDS
                .iter()
                .find(|k| k.eq_ignore_ascii_case(segment))
                .copied()
                .unwrap_or(segment)
        })
        .collect();
    let canonical = canonical.join("/");
    if canonical != path {
        let rebuilt = match uri.query() {
            Some(query) => format!("{canonical}?{query}"),
            None => canonical,
        };
        if let Ok(path_and_query) = rebuilt.parse() {
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = Some(path_and_query);
            if let Ok(new_uri) = Uri::from_parts(parts) {
                *req.uri_mut() = new_uri;
            }
        }
    }
    req
}

/// The application router.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let metrics = state.metrics.clone();
    let device_body_limit = state.limits.max_device_body_bytes;
    // The console calls the admin API in process, through the same routes and layers.
    let api = admin::routes()
        .layer(axum::middleware::from_fn(audited))
        .with_state(state.clone());
    Router::new()
        .merge(admin::routes().layer(axum::middleware::from_fn(audited)))
        .nest_service("/console", crate::http::console::routes(state.clone(), api))
        .merge(device::routes().layer(DefaultBodyLimit::max(device_body_limit)))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.yaml", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            observability::track,
        ))
        .with_state(state)
}

/// Serves an admin request able to name its caller, so that the writes it makes are audited
/// ([`crate::store::audit`]).
async fn audited(req: Request, next: axum::middleware::Next) -> Response {
    crate::store::audit::serving(next.run(req)).await
}

/// The router of the metrics listener: `/metrics`, and the health checks beside it. It is not
/// on the public listener: the metrics name every tenant, hub and device count.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, DomainError> {
    state.store.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        DomainError::new(ErrorCode::ServiceUnavailable, "the database is unavailable")
    })?;
    Ok(Json(
        json!({ "status": "ready", "storage": state.store.backend() }),
    ))
}

/// How long the device counts per hub that `/metrics` shows are reused before they are read
/// from the store again: scrapes do not each run a count per instance.
const HUB_COUNTS_TTL: std::time::Duration = std::time::Duration::from_secs(30);

async fn metrics_text(State(state): State<AppState>) -> Response {
    {
        // One count at a time; scrapes that wait for it use its result.
        let mut counted_at = state.metrics.hub_counts_at.lock().await;
        if counted_at.is_none_or(|at| at.elapsed() >= HUB_COUNTS_TTL) {
            match hub_device_counts(&state).await {
                Ok(counts) => state.metrics.set_hub_devices(&counts),
                Err(e) => tracing::warn!(error = %e, "cannot count devices per hub for /metrics"),
            }
            *counted_at = Some(std::time::Instant::now());
        }
    }
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            text,
        )
            .into_response(),
        Err(e) => DomainError::internal("encoding metrics", &e).into_response(),
    }
}

/// (instance, hub, devices) for every instance.
async fn hub_device_counts(
    state: &AppState,
) -> Result<Vec<(String, String, i64)>, crate::store::StoreError> {
    use crate::store::{Kind, Page, SERVER_NS};
    let instances = state
        .store
        .list(
            SERVER_NS,
            Kind::Instance,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    let mut counts = Vec::new();
    for instance in instances {
        for (hub, devices) in state
            .store
            .count_by(&instance.key, Kind::RegistrationState)
            .await?
        {
            counts.push((instance.key.clone(), hub, devices));
        }
    }
    Ok(counts)
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI_YAML,
    )
        .into_response()
}

async fn not_found() -> DomainError {
    DomainError::new(ErrorCode::RouteNotFound, "no such route")
}

async fn method_not_allowed() -> Response {
    let mut response = DomainError::new(
        ErrorCode::MethodNotAllowed,
        "the route does not accept this method",
    )
    .into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(path: &str) -> String {
        let req = Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        canonicalize_path(req).uri().to_string()
    }

    #[test]
    fn keyword_segments_ignore_case_and_ids_keep_theirs() {
        assert_eq!(
            canonical("/EnrollmentGroups/MyGroup?api-version=2021-10-01"),
            "/enrollmentGroups/MyGroup?api-version=2021-10-01"
        );
        assert_eq!(
            canonical("/enrollmentgroups/g/AttestationMechanism"),
            "/enrollmentGroups/g/attestationmechanism"
        );
        assert_eq!(canonical("/enrollments/Dev-01"), "/enrollments/Dev-01");
        assert_eq!(
            canonical("/enrollments/?api-version=1"),
            "/enrollments?api-version=1"
        );
        assert_eq!(canonical("/"), "/");
    }
}
