//! The one mapping of domain errors to answers: every 4xx/5xx carries the Azure error body
//! `{errorCode, trackingId, message, timestampUtc}` and the `x-ms-error-code` header, and a
//! throttled request gets 429 with `Retry-After`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dps_protocol::{ErrorBody, ErrorCode};

use crate::domain::DomainError;
use crate::http::json::Json;
use crate::observability::current_request_id;
use crate::throttle::Throttled;

impl IntoResponse for DomainError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error_code: self.code().number(),
            tracking_id: current_request_id().unwrap_or_default(),
            message: self.message().to_owned(),
            timestamp_utc: crate::timestamp::now(),
            info: self.info().clone(),
        };
        let mut response = (status, Json(body)).into_response();
        response
            .headers_mut()
            .insert("x-ms-error-code", HeaderValue::from(self.code().number()));
        response
    }
}

impl IntoResponse for Throttled {
    fn into_response(self) -> Response {
        let seconds = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        let seconds = seconds.clamp(1, 300);
        let mut response = DomainError::new(
            ErrorCode::Throttled,
            format!("too many requests; retry after {seconds} s"),
        )
        .into_response();
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
        response
    }
}
