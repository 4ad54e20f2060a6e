//! The device registration API, wire-compatible with Azure DPS (reference section 1):
//! `PUT /{idScope}/registrations/{id}/register` answers 202 `assigning` with an operation id,
//! `GET .../operations/{operationId}` answers 202 while assigning and 200 when done, and
//! `POST /{idScope}/registrations/{id}` looks up the registration state.

use axum::Router;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use dps_protocol::device::RegistrationOperationStatus;
use dps_protocol::ids::{IdScope, RegistrationId};

use crate::domain::attest::{self, DeviceReads, Purpose};
use crate::domain::error::DomainError;
use crate::http::json::Json;
use crate::state::AppState;
use crate::throttle::{Action, Throttled};
use dps_listener::{ClientChain, PeerAddr, Transport};

mod operations;
mod register;
mod status;

/// Routes of the device API.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/{scope}/registrations/{id}/register",
            put(register::register),
        )
        .route(
            "/{scope}/registrations/{id}/operations/{operation}",
            get(operations::operation_status),
        )
        .route("/{scope}/registrations/{id}", post(status::status_lookup))
}

/// An error answer of the device API.
#[derive(Debug)]
pub enum DeviceError {
    /// A 4xx/5xx with an error body.
    Api(DomainError),
    /// A 429 with `Retry-After`.
    Throttled(Throttled),
}

impl From<DomainError> for DeviceError {
    fn from(e: DomainError) -> Self {
        DeviceError::Api(e)
    }
}

impl From<Throttled> for DeviceError {
    fn from(t: Throttled) -> Self {
        DeviceError::Throttled(t)
    }
}

impl From<crate::store::StoreError> for DeviceError {
    fn from(e: crate::store::StoreError) -> Self {
        DeviceError::Api(e.into())
    }
}

impl IntoResponse for DeviceError {
    fn into_response(self) -> Response {
        match self {
            DeviceError::Api(e) => e.into_response(),
            DeviceError::Throttled(t) => t.into_response(),
        }
    }
}

/// The ID scope, registration id and (for polls) operation id of a device request.
#[derive(Debug)]
pub struct DevicePath {
    scope: IdScope,
    id: RegistrationId,
    operation: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for DevicePath {
    type Rejection = DomainError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, DomainError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| attest::bad_path(e.to_string()))?;
        let find = |name: &str| {
            params
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_owned())
        };
        let scope = IdScope::parse(&find("scope").unwrap_or_default())
            .map_err(|e| attest::bad_path(e.to_string()))?;
        let id = RegistrationId::parse(&find("id").unwrap_or_default())
            .map_err(|e| attest::bad_path(e.to_string()))?;
        tracing::Span::current().record("registration_id", id.as_str());
        Ok(DevicePath {
            scope,
            id,
            operation: find("operation"),
        })
    }
}

impl DevicePath {
    pub(super) fn throttle_key(&self) -> String {
        format!("{}/{}", self.scope.key(), self.id.key())
    }
}

pub(super) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The location headers the operator trusts (set by its edge), as allocation metadata.
pub(super) fn trusted_metadata(
    state: &AppState,
    headers: &HeaderMap,
) -> std::collections::BTreeMap<String, String> {
    use allocation_policies::geo::{COORDINATES_METADATA, REGION_METADATA};
    let geo = &state.trusted_location_headers;
    [
        (REGION_METADATA, geo.region_header.as_deref()),
        (COORDINATES_METADATA, geo.coordinates_header.as_deref()),
    ]
    .into_iter()
    .filter_map(|(key, header)| {
        let value = headers.get(header?)?.to_str().ok()?.trim();
        (!value.is_empty() && value.len() <= 128).then(|| (key.to_owned(), value.to_owned()))
    })
    .collect()
}

/// A 202 with the configured `Retry-After`: every answer of an operation still assigning.
pub(super) fn accepted(state: &AppState, answer: RegistrationOperationStatus) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(answer)).into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(state.limits.retry_after_secs.clamp(1, 300)),
    );
    response
}

/// Who is calling: the connection's address and client certificate chain, and the request
/// headers (the SAS token, trusted location headers).
#[derive(Debug)]
pub(super) struct Caller {
    peer: Option<PeerAddr>,
    pub(super) chain: Option<ClientChain>,
    pub(super) headers: HeaderMap,
    /// How the request arrived.
    pub(super) transport: Transport,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self {
            peer: parts.extensions.get::<PeerAddr>().copied(),
            chain: parts.extensions.get::<ClientChain>().cloned(),
            headers: parts.headers.clone(),
            transport: Transport::of(&parts.extensions),
        })
    }
}

impl Caller {
    pub(super) fn address(&self) -> Option<std::net::IpAddr> {
        self.peer.map(|p| p.0.ip())
    }
}

/// Runs `unauthenticated` (work done before the caller proved anything) and, when it fails,
/// charges the failure to the caller's address and the registration id: once their budget is
/// spent the answer is 429, and later requests are refused before any proof is checked.
async fn unauthenticated<T>(
    state: &AppState,
    path: &DevicePath,
    caller: &Caller,
    work: impl std::future::Future<Output = Result<T, DomainError>>,
) -> Result<T, DeviceError> {
    match work.await {
        Ok(done) => Ok(done),
        Err(e) if e.code().status() < 500 => {
            state
                .throttle
                .unauthenticated(&path.throttle_key(), caller.address())?;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// A device request that proved who it is.
pub(super) struct Admitted {
    /// The instance its ID scope names.
    pub instance: String,
    /// What it proved.
    pub attested: attest::Attested,
    /// What its request read (registration state, operation).
    pub reads: DeviceReads,
}

/// What every device request goes through: the address's limits, then the device's proof
/// (its failures charged to the address and id), then the device's own quota for `purpose`.
pub(super) async fn admit(
    state: &AppState,
    path: &DevicePath,
    caller: &Caller,
    purpose: Purpose,
) -> Result<Admitted, DeviceError> {
    let key = path.throttle_key();
    state.throttle.enter(&key, caller.address())?;
    let admitted = unauthenticated(state, path, caller, async {
        let instance = crate::domain::instances::of_scope(state, &path.scope).await?;
        let reads =
            DeviceReads::read(state, &instance, &path.id, path.operation.as_deref()).await?;
        let attested = attest::authenticate(
            state,
            &instance,
            &path.scope,
            &path.id,
            authorization(&caller.headers),
            caller.chain.as_ref().map(|c| c.0.as_slice()),
            purpose,
            &reads,
        )
        .await?;
        Ok(Admitted {
            instance,
            attested,
            reads,
        })
    })
    .await?;
    let action = match purpose {
        Purpose::Register => Action::Register,
        Purpose::Poll | Purpose::Lookup => Action::Poll,
    };
    state.throttle.authenticated(action, &key)?;
    Ok(admitted)
}
