//! JSON in and out: bodies parsed into typed values with a clear 400 or 413, and answers with
//! `Content-Type: application/json; charset=utf-8` (the Node clients ignore other types).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dps_protocol::ErrorCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::error::DomainError;

/// A JSON answer.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => {
                let mut response = body.into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json; charset=utf-8"),
                );
                response
            }
            Err(e) => DomainError::internal("serialising a response", &e).into_response(),
        }
    }
}

/// A request body parsed as JSON into `T`.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = DomainError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// A request body as bytes; an oversized one is a JSON 413, not axum's plain-text answer.
#[derive(Debug, Clone)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = DomainError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        body_bytes(req, state).await.map(RawBody)
    }
}

/// The 408 of a body that did not arrive in time.
pub fn body_timeout() -> DomainError {
    DomainError::new(
        ErrorCode::RequestTimeout,
        "the request body did not arrive in time",
    )
}

/// Reads the body within its deadline, mapping an oversized one to 413 and a slow one to 408.
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, DomainError> {
    let deadline = dps_listener::BodyDeadline::of(&req);
    tokio::time::timeout(deadline, Bytes::from_request(req, state))
        .await
        .map_err(|_| body_timeout())?
        .map_err(|rejection: BytesRejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                DomainError::new(
                    ErrorCode::PayloadTooLarge,
                    "the request body is larger than the server accepts",
                )
            } else {
                DomainError::new(
                    ErrorCode::InvalidFormat,
                    format!("cannot read the body: {rejection}"),
                )
            }
        })
}

/// Parses JSON into `T` with a message that says what is wrong and where.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DomainError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DomainError::new(
            ErrorCode::ArgumentNull,
            "the request body is empty",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "the body does not have the expected shape",
            _ => "the body is not valid JSON",
        };
        DomainError::new(ErrorCode::InvalidFormat, format!("{what}: {e}"))
    })
}
