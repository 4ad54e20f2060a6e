//! One simulated device's connection: TCP, a full TLS handshake (no resumption, as on first
//! boot), then HTTP/1.1 requests on that one connection. Built on hyper's connection API rather
//! than a pooled client, so that the generator does no more work per device than a device does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;

/// Time allowed for connecting, and for each request.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(60);

/// Where devices connect: the address, and the name their TLS handshake asks for.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub(crate) address: SocketAddr,
    pub(crate) server_name: ServerName<'static>,
    authority: String,
}

impl Endpoint {
    /// Resolves `https://host:port` once.
    pub async fn resolve(url: &str) -> anyhow::Result<Self> {
        let authority = url
            .strip_prefix("https://")
            .context("the endpoint must be an https:// URL")?
            .trim_end_matches('/')
            .to_owned();
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().context("the endpoint's port")?),
            None => (authority.as_str(), 443),
        };
        let address = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let server_name = ServerName::try_from(host.to_owned()).context("the endpoint's host")?;
        Ok(Self {
            address,
            server_name,
            authority,
        })
    }

    /// The same host on another port (the MQTT listener's).
    pub fn on_port(&self, port: u16) -> Self {
        let mut other = self.clone();
        other.address.set_port(port);
        other
    }
}

/// An answer: status, JSON body (`null` when it is not JSON) and `Retry-After`.
pub type Answer = (u16, Value, Option<Duration>);

/// An open connection of one device.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

impl Connection {
    /// Connects and shakes hands; errors are the report's error codes.
    pub async fn open(endpoint: &Endpoint, tls: Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let connect = async {
            let tcp = TcpStream::connect(endpoint.address).await.ok()?;
            tcp.set_nodelay(true).ok()?;
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(endpoint.server_name.clone(), tcp)
                .await
                .ok()?;
            hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .ok()
        };
        let (sender, connection) = tokio::time::timeout(TIMEOUT, connect)
            .await
            .map_err(|_| "timeout".to_owned())?
            .ok_or_else(|| "connect".to_owned())?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            authority: endpoint.authority.clone(),
        })
    }

    /// Sends one request and reads its answer.
    pub async fn send(
        &mut self,
        method: hyper::Method,
        path_and_query: &str,
        authorization: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Answer, String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .map_err(|_| "request".to_owned())?;
        let exchange = async {
            self.sender.ready().await.ok()?;
            let response = self.sender.send_request(request).await.ok()?;
            let status = response.status().as_u16();
            let after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = response.into_body().collect().await.ok()?.to_bytes();
            Some((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                after,
            ))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| "timeout".to_owned())?
            .ok_or_else(|| "connect".to_owned())
    }
}
