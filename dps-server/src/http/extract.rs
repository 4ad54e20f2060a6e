//! What handlers take from a request: the authenticated admin and the right its route needs,
//! path ids, `If-Match` preconditions and paging headers.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{Instance, Right};
use serde::Serialize;
use std::collections::BTreeSet;

use crate::config::Limits;
use crate::domain::DomainError;
use crate::domain::access::{self, lacks};
use crate::domain::instances;
use crate::http::json::Json;
use crate::state::AppState;
use crate::store::{Precondition, Stored};

/// The right a route needs, as a type: the [`Admin`] extractor checks it before anything else
/// of the request is looked at (its body, stored data), so a caller without it learns nothing.
pub mod needs {
    use dps_protocol::admin::Right;

    /// A right a route needs.
    pub trait Needs: Send + Sync + 'static {
        /// The right.
        const RIGHT: Right;
    }

    macro_rules! rights {
        ($($name:ident),*) => {
            $(
                #[doc = concat!("Needs `", stringify!($name), "`.")]
                #[derive(Debug)]
                pub struct $name;
                impl Needs for $name {
                    const RIGHT: Right = Right::$name;
                }
            )*
        };
    }
    rights!(
        ServiceConfig,
        EnrollmentRead,
        EnrollmentWrite,
        RegistrationStatusRead,
        RegistrationStatusWrite
    );
}

/// An authenticated caller of an instance's API whose policy grants the right `N`.
#[derive(Debug)]
pub struct Admin<N> {
    /// The instance the request acts on.
    pub instance: Instance,
    rights: BTreeSet<Right>,
    needs: std::marker::PhantomData<N>,
}

impl<N> Admin<N> {
    /// The instance's name (its storage namespace).
    pub fn ns(&self) -> &str {
        &self.instance.name
    }

    /// Whether the caller's policy also grants `right`.
    pub fn has(&self, right: Right) -> bool {
        self.rights.contains(&right)
    }
}

impl<N: needs::Needs> FromRequestParts<AppState> for Admin<N> {
    type Rejection = DomainError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, DomainError> {
        let explicit = RawPathParams::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|params| {
                params
                    .iter()
                    .find(|(name, _)| *name == "instance")
                    .map(|(_, value)| value.to_owned())
            });
        let instance = match explicit {
            Some(name) => instances::load_instance(state.store.as_ref(), &name).await?,
            None => instances::instance_for_host(state.store.as_ref(), request_host(parts)).await?,
        };
        tracing::Span::current().record("instance", instance.name.as_str());
        let caller = access::caller(state, &instance, authorization(parts)).await?;
        if !caller.rights.contains(&N::RIGHT) {
            return Err(lacks(N::RIGHT));
        }
        access::identify(&instance, &caller);
        Ok(Admin {
            instance,
            rights: caller.rights,
            needs: std::marker::PhantomData,
        })
    }
}

/// The route's last path parameter (the resource id), percent-decoded. Routes nested under
/// `/instances/{instance}` have the instance first.
#[derive(Debug)]
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = DomainError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, DomainError> {
        let invalid = |message: String| DomainError::new(ErrorCode::InvalidPathParameter, message);
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| invalid(e.to_string()))?;
        params
            .iter()
            .last()
            .map(|(_, value)| Id(value.to_owned()))
            .ok_or_else(|| invalid("the route has no id".into()))
    }
}

/// A caller allowed to manage every instance: `ServiceConfig` on the admin instance.
#[derive(Debug)]
pub struct ServerAdmin;

impl FromRequestParts<AppState> for ServerAdmin {
    type Rejection = DomainError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, DomainError> {
        let instance =
            instances::load_instance(state.store.as_ref(), &state.admin_instance).await?;
        let caller = access::caller(state, &instance, authorization(parts)).await?;
        if !caller.rights.contains(&Right::ServiceConfig) {
            return Err(lacks(Right::ServiceConfig));
        }
        access::identify(&instance, &caller);
        Ok(ServerAdmin)
    }
}

fn request_host(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .map(|h| h.to_ascii_lowercase())
}

fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
}

fn if_match(headers: &HeaderMap) -> Result<Option<String>, DomainError> {
    headers
        .get(header::IF_MATCH)
        .map(|value| {
            value
                .to_str()
                .map(crate::domain::normalize_etag)
                .map_err(|_| {
                    DomainError::new(ErrorCode::InvalidHeader, "the If-Match header is not ASCII")
                })
        })
        .transpose()
}

/// The precondition of a PUT: no `If-Match` creates only (an existing id is a 409), `*`
/// overwrites, an etag must match.
pub fn put_precondition(headers: &HeaderMap) -> Result<Precondition, DomainError> {
    Ok(Precondition::from_etag(
        if_match(headers)?,
        Precondition::MustNotExist,
    ))
}

/// The precondition of a DELETE: an etag must match when one is sent.
pub fn delete_precondition(headers: &HeaderMap) -> Result<Precondition, DomainError> {
    Ok(Precondition::from_etag(
        if_match(headers)?,
        Precondition::Always,
    ))
}

/// How `x-ms-continuation` tokens are read: base64url without padding, as they are written,
/// forgiving the unused bits of the last character, so that every string of the alphabet (what
/// the OpenAPI document allows) is a token.
const CONTINUATION: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone),
);

/// A page request: `x-ms-max-item-count` and `x-ms-continuation`.
#[derive(Debug)]
pub struct PageRequest {
    /// Page size.
    pub size: usize,
    /// The last key of the previous page.
    pub after: Option<String>,
}

impl PageRequest {
    /// Reads the paging headers.
    pub fn from_headers(headers: &HeaderMap, limits: &Limits) -> Result<Self, DomainError> {
        let bad = |message: String| DomainError::new(ErrorCode::InvalidHeader, message);
        // A larger page than the limit is clamped to it, as Azure does (`az ... --top 2000`);
        // the answer's `x-ms-max-item-count` says what was served.
        let size = match headers.get("x-ms-max-item-count") {
            None => limits.default_page_size,
            Some(value) => value
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .filter(|v| v.bytes().any(|b| b != b'0'))
                .map(|v| {
                    v.parse::<usize>()
                        .map_or(limits.max_page_size, |n| n.min(limits.max_page_size))
                })
                .ok_or_else(|| {
                    bad("x-ms-max-item-count must be a whole number of at least 1".to_owned())
                })?,
        };
        let after = match headers.get("x-ms-continuation") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .filter(|v| !v.is_empty())
                    .filter(|v| {
                        v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    })
                    .and_then(|v| {
                        // A last character alone carries no whole byte.
                        let whole = v.len() - usize::from(v.len() % 4 == 1);
                        CONTINUATION.decode(&v[..whole]).ok()
                    })
                    // A token is only a lower bound on the next page's keys: any text will do.
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .ok_or_else(|| {
                        bad("x-ms-continuation is not a token this server issued".into())
                    })?,
            ),
        };
        Ok(Self { size, after })
    }

    /// How many rows to fetch: one more than the page, to learn whether another page exists.
    pub fn fetch_limit(&self) -> usize {
        self.size.saturating_add(1)
    }

    /// Turns fetched rows into a page answer: at most `size` items, and `x-ms-continuation`
    /// only when more exist (the Node client treats its presence as "more pages").
    pub fn respond<T: Serialize>(
        &self,
        mut rows: Vec<Stored>,
        item_type: &'static str,
        render: impl Fn(&Stored) -> Result<T, DomainError>,
    ) -> Result<Response, DomainError> {
        let more = rows.len() > self.size;
        rows.truncate(self.size);
        let items = rows.iter().map(render).collect::<Result<Vec<T>, _>>()?;
        let mut response = Json(items).into_response();
        let headers = response.headers_mut();
        headers.insert("x-ms-item-type", HeaderValue::from_static(item_type));
        headers.insert("x-ms-max-item-count", HeaderValue::from(self.size));
        if more && let Some(last) = rows.last() {
            let token = URL_SAFE_NO_PAD.encode(last.key.as_bytes());
            if let Ok(value) = HeaderValue::from_str(&token) {
                headers.insert("x-ms-continuation", value);
            }
        }
        Ok(response)
    }
}
