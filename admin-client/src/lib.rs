//! A client of the dps-server admin API, for the admin CLI, the load generator and any Rust
//! program: it signs SAS tokens from a service connection string (never printing the key),
//! follows `x-ms-continuation` through pages, sends `If-Match`, and turns error answers into
//! [`ClientError::Api`] with the server's error code and message.
//!
//! Answers are typed with the wire types of `dps-protocol`, or `serde_json::Value` where a
//! caller wants the JSON as it came.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::ConnectionString;
use attestation::sas::{encode_uri_component, sign};
use dps_protocol::ErrorBody;
use dps_protocol::admin::{AccessPolicy, LinkedHub};
use dps_protocol::enrollment::{BulkMode, BulkResult, EnrollmentGroup, IndividualEnrollment};
pub use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// The API version the client speaks.
pub const API_VERSION: &str = "2021-10-01";
/// Lifetime of the tokens the client signs for its own requests.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest page the client asks for.
const PAGE_SIZE: &str = "1000";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client's own settings (connection string, CA file) are unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached, or the answer could not be read.
    #[error("calling {base}: {cause}")]
    Transport {
        /// The server.
        base: String,
        /// What failed.
        cause: String,
    },
    /// The server refused: its status, error code and message.
    #[error("{status} ({code}): {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The six-digit error code (0 when the answer had no error body).
        code: u32,
        /// The server's message.
        message: String,
    },
    /// The answer is not what was expected.
    #[error("the answer is not {0}")]
    Decode(String),
}

impl ClientError {
    /// The server's error code, for refusals.
    pub fn code(&self) -> Option<u32> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// An answer: its status, continuation token and body text.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    continuation: Option<String>,
    text: String,
}

/// A path segment, percent-encoded like JavaScript's `encodeURIComponent`.
pub fn segment(id: &str) -> String {
    encode_uri_component(id)
}

/// The collection a bulk operation works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `/enrollments`.
    Enrollments,
    /// `/enrollmentGroups`.
    EnrollmentGroups,
}

impl Collection {
    fn path(self) -> &'static str {
        match self {
            Collection::Enrollments => "/enrollments",
            Collection::EnrollmentGroups => "/enrollmentGroups",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Collection::Enrollments => "enrollments",
            Collection::EnrollmentGroups => "enrollmentGroups",
        }
    }
}

/// An authenticated client of the admin API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    prefix: String,
    credentials: ConnectionString,
}

impl Client {
    /// A client signing with `connection_string`'s policy, at `endpoint` (else
    /// `https://{HostName}`), trusting `ca_cert` (else the system roots), acting on `instance`
    /// (else the one the host name selects).
    pub fn connect(
        connection_string: &str,
        endpoint: Option<&str>,
        ca_cert: Option<&Path>,
        instance: Option<&str>,
    ) -> Result<Self, ClientError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let credentials = ConnectionString::parse(connection_string)
            .map_err(|e| ClientError::Config(format!("invalid connection string: {e}")))?;
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if let Some(ca) = ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Config(format!("reading {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|_| {
                ClientError::Config(format!("{} is not a PEM certificate", ca.display()))
            })?;
            builder = builder.tls_certs_only([cert]);
        }
        let base = endpoint
            .map(str::to_owned)
            .unwrap_or_else(|| format!("https://{}", credentials.host_name));
        let prefix = instance
            .map(|i| format!("/instances/{}", segment(i)))
            .unwrap_or_default();
        let http = builder
            .build()
            .map_err(|e| ClientError::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            prefix,
            credentials,
        })
    }

    /// The host name of the connection string.
    pub fn host_name(&self) -> &str {
        &self.credentials.host_name
    }

    /// A SAS token for the connection string's policy, valid for `lifetime`.
    pub fn token(&self, lifetime: Duration) -> String {
        let expiry = SystemTime::now()
            .checked_add(lifetime)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        sign(
            &self.credentials.host_name,
            &self.credentials.key,
            expiry,
            Some(&self.credentials.key_name),
        )
    }

    fn url(&self, path: &str, scoped: bool) -> String {
        let prefix = if scoped { self.prefix.as_str() } else { "" };
        // `path` may carry a query of its own (the filters of `/events`).
        let joiner = if path.contains('?') { '&' } else { '?' };
        format!(
            "{}{prefix}{path}{joiner}api-version={API_VERSION}",
            self.base
        )
    }

    /// A request to `path`: instance-scoped (under `/instances/{name}` when the client was
    /// given an instance) unless `scoped` is false.
    pub fn request(&self, method: Method, path: &str, scoped: bool) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path, scoped))
    }

    /// Sends a request signed with a fresh token; a non-2xx answer is [`ClientError::Api`].
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, ClientError> {
        let transport = |cause: String| ClientError::Transport {
            base: self.base.clone(),
            cause,
        };
        let response = request
            .header("Authorization", self.token(TOKEN_LIFETIME))
            .send()
            .await
            .map_err(|e| transport(e.without_url().to_string()))?;
        let status = response.status();
        let continuation = response
            .headers()
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response
            .text()
            .await
            .map_err(|e| transport(format!("reading the answer: {}", e.without_url())))?;
        if !status.is_success() {
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => ClientError::Api {
                    status,
                    code: body.error_code,
                    message: body.message,
                },
                Err(_) => ClientError::Api {
                    status,
                    code: 0,
                    message: text.chars().take(300).collect(),
                },
            });
        }
        Ok(Answer {
            status,
            continuation,
            text,
        })
    }

    /// Sends `request` (from [`Client::request`]) and parses its JSON answer; `None` for an
    /// empty one (204).
    pub async fn send_json<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<T>, ClientError> {
        let answer = self.send(request).await?;
        if answer.status == StatusCode::NO_CONTENT || answer.text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&answer.text)
            .map(Some)
            .map_err(|e| ClientError::Decode(format!("the expected JSON: {e}")))
    }

    /// Calls `path` with an optional JSON body and `If-Match`, and parses the answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        scoped: bool,
        body: Option<&(impl Serialize + ?Sized)>,
        if_match: Option<&str>,
    ) -> Result<Option<T>, ClientError> {
        let mut request = self.request(method, path, scoped);
        if let Some(tag) = if_match {
            request = request.header("If-Match", tag);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send_json(request).await
    }

    /// Like [`Client::call`], for answers that must have a body.
    pub async fn call_one<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        scoped: bool,
        body: Option<&(impl Serialize + ?Sized)>,
        if_match: Option<&str>,
    ) -> Result<T, ClientError> {
        self.call(method, path, scoped, body, if_match)
            .await?
            .ok_or_else(|| ClientError::Decode("empty".into()))
    }

    /// Every item of a query (POST) or listing (GET), following `x-ms-continuation`.
    pub async fn pages<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        scoped: bool,
    ) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut request = self
                .request(method.clone(), path, scoped)
                .header("x-ms-max-item-count", PAGE_SIZE);
            if method == Method::POST {
                request = request.json(&json!({ "query": "*" }));
            }
            if let Some(token) = &continuation {
                request = request.header("x-ms-continuation", token);
            }
            let answer = self.send(request).await?;
            let page: Vec<T> = serde_json::from_str(&answer.text)
                .map_err(|e| ClientError::Decode(format!("a page of items: {e}")))?;
            items.extend(page);
            continuation = answer.continuation;
            if continuation.is_none() {
                return Ok(items);
            }
        }
    }

    /// `PUT /enrollments/{id}` (`If-Match: *` overwrites; none creates only).
    pub async fn put_enrollment(
        &self,
        enrollment: &IndividualEnrollment,
        if_match: Option<&str>,
    ) -> Result<IndividualEnrollment, ClientError> {
        let path = format!("/enrollments/{}", segment(&enrollment.registration_id));
        self.call_one(Method::PUT, &path, true, Some(enrollment), if_match)
            .await
    }

    /// `GET /enrollments/{id}` (without keys).
    pub async fn enrollment(&self, id: &str) -> Result<IndividualEnrollment, ClientError> {
        let path = format!("/enrollments/{}", segment(id));
        self.call_one(Method::GET, &path, true, None::<&()>, None)
            .await
    }

    /// `PUT /enrollmentGroups/{id}`.
    pub async fn put_group(
        &self,
        group: &EnrollmentGroup,
        if_match: Option<&str>,
    ) -> Result<EnrollmentGroup, ClientError> {
        let path = format!("/enrollmentGroups/{}", segment(&group.enrollment_group_id));
        self.call_one(Method::PUT, &path, true, Some(group), if_match)
            .await
    }

    /// `GET /enrollmentGroups/{id}` (without keys).
    pub async fn group(&self, id: &str) -> Result<EnrollmentGroup, ClientError> {
        let path = format!("/enrollmentGroups/{}", segment(id));
        self.call_one(Method::GET, &path, true, None::<&()>, None)
            .await
    }

    /// A bulk operation on `collection`; per-item failures are in the answer.
    pub async fn bulk<T: Serialize>(
        &self,
        collection: Collection,
        mode: BulkMode,
        items: &[T],
    ) -> Result<BulkResult, ClientError> {
        let body = json!({ "mode": mode.as_str(), collection.field(): items });
        self.call_one(Method::POST, collection.path(), true, Some(&body), None)
            .await
    }

    /// `PUT /linkedHubs/{hostName}`, overwriting.
    pub async fn put_linked_hub(&self, hub: &LinkedHub) -> Result<LinkedHub, ClientError> {
        let path = format!("/linkedHubs/{}", segment(&hub.host_name));
        self.call_one(Method::PUT, &path, true, Some(hub), Some("*"))
            .await
    }

    /// `POST /accessPolicies/{name}/listKeys`: the policy with its keys.
    pub async fn policy_keys(&self, name: &str) -> Result<AccessPolicy, ClientError> {
        let path = format!("/accessPolicies/{}/listKeys", segment(name));
        self.call_one(Method::POST, &path, true, None::<&()>, None)
            .await
    }

    /// The connection string of policy `name` (it contains the key).
    pub async fn connection_string(&self, name: &str) -> Result<String, ClientError> {
        let policy = self.policy_keys(name).await?;
        let key = policy
            .primary_key
            .ok_or_else(|| ClientError::Decode("a policy with keys".into()))?;
        Ok(format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={key}",
            self.credentials.host_name, policy.key_name
        ))
    }

    /// `POST /ownershipRecords:import` of `body` in `content_type` (CSV or JSON lines).
    pub async fn import_ownership(
        &self,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Value, ClientError> {
        let request = self
            .request(Method::POST, "/ownershipRecords:import", true)
            .header("Content-Type", content_type)
            .body(body);
        self.send_json(request)
            .await?
            .ok_or_else(|| ClientError::Decode("empty".into()))
    }
}
