//! Calls that leave the service: custom allocation webhooks, the webhook hub connector, hub
//! registry calls and latency probes. An admin chooses their URLs, so each one is a way into
//! the operator's network (server-side request forgery) unless the client refuses it:
//!
//! - redirects are never followed and no proxy from the environment is used;
//! - a target is refused when any address it resolves to (or the literal address in its URL)
//!   is loopback, private, link-local, unique-local, multicast, broadcast or unspecified,
//!   unless the operator allows its network. The check runs on the addresses the connection
//!   is made to, after resolution, so a name that resolves to a public address once and to a
//!   private one later (DNS rebinding) is refused the second time;
//! - an answer is read up to a size limit;
//! - errors name the target without its query string (Azure Functions keys live there) and
//!   never carry the answer's body.
//!
//! Webhook requests can be signed ([`WebhookSigner`]): `x-dps-timestamp` and an HMAC-SHA256
//! over `timestamp.body`, so that a receiver can refuse replays.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
pub use reqwest::{Method, RequestBuilder, StatusCode};
use sha2::Sha256;

/// Header carrying the Unix time (seconds) a signed webhook request was made at.
pub const TIMESTAMP_HEADER: &str = "x-dps-timestamp";
/// Header carrying `sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>`.
pub const SIGNATURE_HEADER: &str = "x-dps-signature";

/// What the client allows.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// Networks that may be reached although they are not public (for example
    /// `127.0.0.0/8` for a webhook on the same machine, or the hubs' private network).
    pub allowed_networks: Vec<IpNet>,
    /// Time allowed for one request, answer included, unless the request sets its own.
    pub timeout: Duration,
    /// Largest answer body read, bytes.
    pub max_answer_bytes: usize,
    /// Reuse connections (off for latency probes, so every sample costs the same).
    pub reuse_connections: bool,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        Self {
            allowed_networks: Vec::new(),
            timeout: Duration::from_secs(10),
            max_answer_bytes: 1024 * 1024,
            reuse_connections: true,
        }
    }
}

/// Why an outbound call failed. The `Display` form names the target as
/// `scheme://host[:port]/path`, never its query string, and never the answer's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// The URL is not an absolute `http://` or `https://` URL.
    #[error("the URL is not an absolute http:// or https:// URL")]
    InvalidUrl,
    /// The target's address is not public and its network is not allowed.
    #[error(
        "{0} is refused: it is (or resolves to) a loopback, private, link-local, unique-local or multicast address, which outbound.allowed_networks does not allow"
    )]
    Forbidden(String),
    /// No answer in time.
    #[error("{0} did not answer in time")]
    Timeout(String),
    /// The target could not be reached.
    #[error("{0} could not be reached: {1}")]
    Unreachable(String, String),
    /// The answer is larger than allowed.
    #[error("the answer of {0} is larger than {1} bytes")]
    TooLarge(String, usize),
}

/// An answer: its status and (capped) body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// The body, at most the client's `max_answer_bytes`.
    pub body: Bytes,
}

/// Which addresses may be reached.
#[derive(Debug)]
struct TargetPolicy {
    allowed: Vec<IpNet>,
}

impl TargetPolicy {
    fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        is_public(ip) || self.allowed.iter().any(|net| net.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are the IPv4 address they map.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an ordinary public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || a == 0
                // carrier-grade NAT 100.64.0.0/10, benchmarking 198.18.0.0/15, reserved 240/4
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link local fe80::/10
                || (first & 0xffc0) == 0xfec0 // site local fec0::/10 (deprecated)
                || first == 0x2001 && v6.segments()[1] == 0x0db8 // documentation
                || first == 0x0064 && v6.segments()[1] == 0xff9b) // NAT64 of IPv4 (could map a private one)
        }
    }
}

/// Resolves names and keeps only the addresses the policy allows; a name left with none is
/// an error, so no connection is attempted.
#[derive(Debug, Clone)]
struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| policy.allows(addr.ip()))
                .collect();
            // A name with one forbidden address among public ones is refused whole: a
            // resolver answer is the attacker's to choose, and the client may try any of them.
            if allowed.is_empty() || allowed.len() != resolved.len() {
                return Err(Box::new(Refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The resolver's refusal, recognised in the error chain.
#[derive(Debug)]
struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the name resolves to an address outside the allowed networks")
    }
}

impl std::error::Error for Refused {}

/// The HTTP client for outbound calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
    max_answer_bytes: usize,
}

impl Outbound {
    /// A client with `settings` (rustls with ring and the system's roots).
    pub fn new(settings: &OutboundSettings) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(TargetPolicy {
            allowed: settings.allowed_networks.clone(),
        });
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            });
        if !settings.reuse_connections {
            builder = builder.pool_max_idle_per_host(0);
        }
        // Building only fails when the TLS backend cannot start; a default client has the
        // same backend, so the fall-back is only reached in the same broken state.
        let client = builder.build().unwrap_or_default();
        Self {
            client,
            policy,
            max_answer_bytes: settings.max_answer_bytes,
        }
    }

    /// A request to `url`, refused at once when the URL is not http(s) or names a forbidden
    /// address literally (names are checked when they are resolved).
    pub fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, OutboundError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| OutboundError::InvalidUrl)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OutboundError::InvalidUrl);
        }
        // The URL parser normalises every spelling of an address (`2130706433`, `0x7f.1`,
        // `[::ffff:127.0.0.1]`) to its canonical text, which parses as an address here.
        let host = parsed.host_str().ok_or(OutboundError::InvalidUrl)?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if let Some(ip) = literal
            && !self.policy.allows(ip)
        {
            return Err(OutboundError::Forbidden(target_of(&parsed)));
        }
        Ok(self.client.request(method, parsed))
    }

    /// Sends `request` and reads its answer, up to the size limit.
    pub async fn send(&self, request: RequestBuilder) -> Result<Answer, OutboundError> {
        let (client, request) = request.build_split();
        let request = request.map_err(|_| OutboundError::InvalidUrl)?;
        let target = target_of(request.url());
        let mut response = client
            .execute(request)
            .await
            .map_err(|e| failure(&target, &e))?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|n| n > self.max_answer_bytes as u64)
        {
            return Err(OutboundError::TooLarge(target, self.max_answer_bytes));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| failure(&target, &e))? {
            if body.len() + chunk.len() > self.max_answer_bytes {
                return Err(OutboundError::TooLarge(target, self.max_answer_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            body: body.freeze(),
        })
    }
}

/// `scheme://host[:port]/path` of a URL: what errors and logs may show.
pub fn target_of(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// [`target_of`] for a URL given as text (for errors about a URL that may not parse).
pub fn redact(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(|_| "the URL".to_owned(), |u| target_of(&u))
}

fn failure(target: &str, error: &reqwest::Error) -> OutboundError {
    if error.is_timeout() {
        return OutboundError::Timeout(target.to_owned());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut causes = Vec::new();
    while let Some(e) = source {
        if e.is::<Refused>() {
            return OutboundError::Forbidden(target.to_owned());
        }
        // reqwest's own message would name the URL; the rest of the chain does not.
        if !e.is::<reqwest::Error>() {
            causes.push(e.to_string());
        }
        source = e.source();
    }
    let cause = if causes.is_empty() {
        "the connection failed".to_owned()
    } else {
        causes.join(": ")
    };
    OutboundError::Unreachable(target.to_owned(), cause)
}

/// Signs webhook requests: `x-dps-timestamp: <unix seconds>` and
/// `x-dps-signature: sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>`. A receiver
/// recomputes the HMAC over the timestamp header, a dot and the raw body, compares it in
/// constant time, and refuses timestamps more than a few minutes from its clock.
#[derive(Clone)]
pub struct WebhookSigner {
    key: Vec<u8>,
}

impl fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSigner")
    }
}

impl WebhookSigner {
    /// A signer with `key` (raw bytes).
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    /// The signature header value for `body` sent at `timestamp`.
    pub fn signature(&self, timestamp: u64, body: &[u8]) -> String {
        // HMAC takes keys of any length, so keying cannot fail.
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256={hex}")
    }

    /// Adds the timestamp and signature headers for `body` to `request`.
    pub fn sign(&self, request: RequestBuilder, body: &[u8]) -> RequestBuilder {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        request
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, self.signature(timestamp, body))
    }
}

/// Signs with `signer` when there is one.
pub fn maybe_sign(
    signer: Option<&WebhookSigner>,
    request: RequestBuilder,
    body: &[u8],
) -> RequestBuilder {
    match signer {
        Some(signer) => signer.sign(request, body),
        None => request,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
            assert!(is_public(ip(public)), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "100.64.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip(private)), "{private}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_themselves() {
        let policy = TargetPolicy {
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert!(policy.allows(ip("127.0.0.1")));
        assert!(policy.allows(ip("::ffff:127.0.0.2")));
        assert!(!policy.allows(ip("10.0.0.1")));
        assert!(!policy.allows(ip("::1")));
    }

    #[tokio::test]
    async fn literal_and_resolved_private_targets_are_refused_before_connecting() {
        let outbound = Outbound::new(&OutboundSettings::default());
        for url in [
            "http://127.0.0.1:9/x?code=secret",
            "http://[::1]:9/",
            "http://2130706433/",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let err = outbound.request(Method::GET, url).unwrap_err();
            assert!(matches!(err, OutboundError::Forbidden(_)), "{url}: {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let request = outbound
            .request(Method::GET, "http://localhost:9/hook?code=secret")
            .unwrap();
        let err = outbound.send(request).await.unwrap_err();
        assert!(matches!(err, OutboundError::Forbidden(_)), "{err}");
        assert_eq!(
            err.to_string().split(' ').next(),
            Some("http://localhost:9/hook")
        );
        assert!(outbound.request(Method::GET, "file:///etc/passwd").is_err());
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_answers_are_capped() {
        use wiremock::matchers::path;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(path("/moved"))
            .respond_with(
                ResponseTemplate::new(302).insert_header("location", "http://127.0.0.1:1/"),
            )
            .mount(&server)
            .await;
        Mock::given(path("/big"))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b'x'; 2048]))
            .mount(&server)
            .await;
        let outbound = Outbound::new(&OutboundSettings {
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
            max_answer_bytes: 1024,
            ..OutboundSettings::default()
        });
        let moved = outbound
            .send(
                outbound
                    .request(Method::GET, &format!("{}/moved", server.uri()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(moved.status, StatusCode::FOUND);
        let big = outbound
            .send(
                outbound
                    .request(Method::GET, &format!("{}/big?k=secret", server.uri()))
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(matches!(big, OutboundError::TooLarge(_, 1024)), "{big}");
        assert!(!big.to_string().contains("secret"));
    }

    #[test]
    fn signatures_cover_the_timestamp_and_the_body() {
        let signer = WebhookSigner::new(b"key".to_vec());
        let one = signer.signature(1000, b"{}");
        assert!(one.starts_with("sha256=") && one.len() == 7 + 64);
        assert_ne!(one, signer.signature(1001, b"{}"), "another time");
        assert_ne!(one, signer.signature(1000, b"{ }"), "another body");
        assert_eq!(one, signer.signature(1000, b"{}"));
    }
}
