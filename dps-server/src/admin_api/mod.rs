//! The admin REST API: the Azure DPS service API (enrollments, enrollment groups, registration
//! states) and our extensions (instances, linked hubs, shared access policies).
//!
//! Instance-scoped routes are served twice: at the root, where the request's Host selects the
//! instance (or the only instance, on a server with one), and under `/instances/{instance}`.

mod access_policies;
mod allocations;
pub mod certificates;
mod enrollment_groups;
mod enrollments;
pub mod instances;
mod linked_hubs;
pub mod ownership;
mod registrations;
pub mod resource;
pub mod validate;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use attestation::{SasToken, SymmetricKey};
use axum::Router;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dps_protocol::ErrorCode;
use dps_protocol::admin::{AccessPolicy, Instance, Right};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::Limits;
use crate::error::ApiError;
use crate::json::Json;
use crate::observability::Metrics;
use crate::store::{Kind, Precondition, SERVER_NS, Store, Stored};

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Request limits.
    pub limits: Arc<Limits>,
    /// The instance whose `ServiceConfig` policies may manage all instances.
    pub admin_instance: Arc<str>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Device API throttling.
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Allocation policies by name.
    pub policies: Arc<allocation_policies::policy::Registry>,
    /// How hub connectors reach hubs.
    pub connectors: crate::hubs::Connectors,
    /// Hubs whose connector failed recently.
    pub hub_health: Arc<crate::hubs::HubHealth>,
    /// Request headers an operator trusts to carry the device's region or coordinates.
    pub trusted_location_headers: Arc<crate::config::GeoConfig>,
    /// Enrollment and CA certificates already parsed (X.509 registrations read them all).
    pub certificates: Arc<attestation::x509::ParsedCache>,
    /// TPM manufacturer certificates and the challenge lifetime.
    pub tpm: Arc<crate::device_api::tpm::TpmTrust>,
    /// Instances and ID scopes as device requests read them.
    pub instances: Arc<crate::cache::InstanceCache>,
    /// Enrollment groups and CA certificates as device authentication reads them.
    pub credentials: Arc<crate::device_api::credentials::CredentialCache>,
    /// Names of this server that service tokens of every instance may name in `sr` (the
    /// host name of its listener, `localhost[:port]`).
    pub server_names: Arc<[String]>,
}

/// Routes that act on one instance.
pub fn instance_routes() -> Router<AppState> {
    Router::new()
        .merge(enrollments::routes())
        .merge(enrollment_groups::routes())
        .merge(registrations::routes())
        .merge(linked_hubs::routes())
        .merge(access_policies::routes())
        .merge(allocations::routes())
        .merge(ownership::routes())
        .merge(certificates::routes())
}

/// Every admin route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(instance_routes())
        .merge(instances::routes())
        .nest("/instances/{instance}", instance_routes())
}

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

fn lacks(right: Right) -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "the shared access policy lacks the {} right",
            right.as_str()
        ),
    )
}

impl<N: needs::Needs> FromRequestParts<AppState> for Admin<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
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
            Some(name) => load_instance(state.store.as_ref(), &name).await?,
            None => instance_for_host(state.store.as_ref(), request_host(parts)).await?,
        };
        tracing::Span::current().record("instance", instance.name.as_str());
        let rights = authenticate(parts, state, &instance).await?;
        if !rights.contains(&N::RIGHT) {
            return Err(lacks(N::RIGHT));
        }
        Ok(Admin {
            instance,
            rights,
            needs: std::marker::PhantomData,
        })
    }
}

/// The route's last path parameter (the resource id), percent-decoded. Routes nested under
/// `/instances/{instance}` have the instance first.
#[derive(Debug)]
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = |message: String| ApiError::new(ErrorCode::InvalidPathParameter, message);
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
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let instance = load_instance(state.store.as_ref(), &state.admin_instance).await?;
        let rights = authenticate(parts, state, &instance).await?;
        if !rights.contains(&Right::ServiceConfig) {
            return Err(lacks(Right::ServiceConfig));
        }
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

/// Loads a document, or answers 404.
pub async fn load(store: &dyn Store, ns: &str, kind: Kind, key: &str) -> Result<Stored, ApiError> {
    store
        .get(ns, kind, key)
        .await?
        .ok_or_else(|| crate::error::not_found(kind, key))
}

/// Loads an instance by name, or 404.
pub async fn load_instance(store: &dyn Store, name: &str) -> Result<Instance, ApiError> {
    let stored = load(store, SERVER_NS, Kind::Instance, &name.to_ascii_lowercase()).await?;
    instances::from_stored(&stored)
}

/// The instance whose host names include `host` (with or without its port); on a server with
/// exactly one instance, that instance.
async fn instance_for_host(store: &dyn Store, host: Option<String>) -> Result<Instance, ApiError> {
    if let Some(host) = &host {
        let without_port = host.rsplit_once(':').map(|(name, _)| name.to_owned());
        for candidate in std::iter::once(host.clone()).chain(without_port) {
            if let Some(entry) = store.get(SERVER_NS, Kind::HostName, &candidate).await? {
                return load_instance(store, &entry.doc_string()?).await;
            }
        }
    }
    let page = crate::store::Page {
        limit: 2,
        ..Default::default()
    };
    match store
        .list(SERVER_NS, Kind::Instance, page)
        .await?
        .as_slice()
    {
        [only] => instances::from_stored(only),
        _ => Err(ApiError::new(
            ErrorCode::InstanceNotFound,
            format!(
                "no instance serves host '{}'; use /instances/{{name}}/... or one of the instance's host names",
                host.unwrap_or_default()
            ),
        )),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verifies the `Authorization` SAS token against the instance's shared access policies and
/// returns the rights of the policy that signed it.
async fn authenticate(
    parts: &Parts,
    state: &AppState,
    instance: &Instance,
) -> Result<BTreeSet<Right>, ApiError> {
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("the request has no Authorization header"))?
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not ASCII"))?;
    let token = SasToken::parse(header).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    token
        .check_expiry(
            unix_now(),
            state.limits.clock_skew_secs,
            state.limits.max_token_lifetime_secs,
        )
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let audience_ok = instance
        .host_names
        .iter()
        .chain(state.server_names.iter())
        .any(|host| token.resource_matches(host));
    // Not the request's Host: that is the caller's to choose, so it would bind nothing
    // (security review item 10).
    if !audience_ok {
        return Err(ApiError::unauthorized(
            "the token's resource (sr) is not a host name of this instance",
        ));
    }
    let key_name = token
        .key_name()
        .ok_or_else(|| ApiError::unauthorized("the token names no shared access policy (skn)"))?;
    let failed =
        || ApiError::unauthorized("the token does not verify with the named policy's keys");
    let stored = state
        .store
        .get(
            &instance.name,
            Kind::AccessPolicy,
            &key_name.to_ascii_lowercase(),
        )
        .await?
        .ok_or_else(failed)?;
    let policy: AccessPolicy = stored.doc_json()?;
    let keys = [&policy.primary_key, &policy.secondary_key]
        .into_iter()
        .flatten()
        .filter_map(|k| SymmetricKey::from_base64(k).ok())
        .collect::<Vec<_>>();
    token.verify_any(&keys).map_err(|_| failed())?;
    Ok(policy
        .rights
        .iter()
        .filter_map(|r| Right::parse(r))
        .collect())
}

impl Stored {
    /// The document parsed as `T`; a stored document that does not parse is a server fault.
    pub fn doc_json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_str(&self.doc)
            .map_err(|e| ApiError::internal("a stored document is corrupt", &e))
    }

    fn doc_string(&self) -> Result<String, ApiError> {
        self.doc_json()
    }
}

/// Serialises a document for storage.
pub fn to_doc<T: Serialize>(value: &T) -> Result<String, ApiError> {
    serde_json::to_string(value).map_err(|e| ApiError::internal("serialising a document", &e))
}

fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(header::IF_MATCH)
        .map(|value| {
            value.to_str().map(normalize_etag).map_err(|_| {
                ApiError::new(ErrorCode::InvalidHeader, "the If-Match header is not ASCII")
            })
        })
        .transpose()
}

/// Etags are quoted strings; clients send them quoted, unquoted or weak (`W/"..."`).
pub fn normalize_etag(value: &str) -> String {
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    if value == "*" || (value.len() >= 2 && value.starts_with('"') && value.ends_with('"')) {
        value.to_owned()
    } else {
        format!("\"{value}\"")
    }
}

/// The precondition of a PUT: no `If-Match` creates only (an existing id is a 409), `*`
/// overwrites, an etag must match.
pub fn put_precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    Ok(match if_match(headers)? {
        None => Precondition::MustNotExist,
        Some(tag) if tag == "*" => Precondition::Always,
        Some(tag) => Precondition::IfMatch(tag),
    })
}

/// The precondition of a DELETE: an etag must match when one is sent.
pub fn delete_precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    Ok(match if_match(headers)? {
        None => Precondition::Always,
        Some(tag) if tag == "*" => Precondition::Always,
        Some(tag) => Precondition::IfMatch(tag),
    })
}

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
    pub fn from_headers(headers: &HeaderMap, limits: &Limits) -> Result<Self, ApiError> {
        let bad = |message: String| ApiError::new(ErrorCode::InvalidHeader, message);
        let size = match headers.get("x-ms-max-item-count") {
            None => limits.default_page_size,
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| (1..=limits.max_page_size).contains(n))
                .ok_or_else(|| {
                    bad(format!(
                        "x-ms-max-item-count must be a number from 1 to {}",
                        limits.max_page_size
                    ))
                })?,
        };
        let after = match headers.get("x-ms-continuation") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .filter(|v| !v.is_empty())
                    .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
                    .and_then(|bytes| String::from_utf8(bytes).ok())
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
        render: impl Fn(&Stored) -> Result<T, ApiError>,
    ) -> Result<Response, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalised_to_quoted_strings() {
        assert_eq!(normalize_etag("abc"), "\"abc\"");
        assert_eq!(normalize_etag("\"abc\""), "\"abc\"");
        assert_eq!(normalize_etag("W/\"abc\""), "\"abc\"");
        assert_eq!(normalize_etag(" * "), "*");
    }
}
