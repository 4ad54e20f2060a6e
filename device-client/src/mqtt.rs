//! One registration over MQTT (reference section 3), as the Azure SDKs that provision over MQTT
//! do it: CONNECT with `{idScope}/registrations/{id}/api-version=...` as the user name and the
//! SAS token as the password (none with a client certificate), a subscription to
//! `$dps/registrations/res/#`, a register publish, then poll publishes as the answers'
//! `retry-after` says, until the operation ends. Answers arrive on
//! `$dps/registrations/res/{status}/?$rid={rid}`; the JSON bodies are those of HTTPS, so they
//! are read by the same functions. TPM attestation is HTTPS only (DPS has no TPM over MQTT).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dps_protocol::device::{DeviceRegistration, RegistrationOperationStatus};
use dps_protocol::mqtt::{self, RESPONSE_FILTER, UserName};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::register::{
    Assignment, DEFAULT_POLL, Proof, RegisterError, Registration, TOKEN_LIFETIME, Transport,
    finish, refusal, tls_config,
};

/// Largest packet read from the service.
const MAX_PACKET: usize = 256 * 1024;
/// The keep-alive asked for; the session is short.
const KEEP_ALIVE_SECS: u16 = 60;

/// Registers over MQTT: over TLS at the endpoint's host on the MQTT port, or over a WebSocket
/// at the endpoint.
pub async fn register(request: &Registration, proof: &Proof) -> Result<Assignment, RegisterError> {
    let (password, certificate) = match proof {
        Proof::Sas(signer) => {
            let resource = attestation::sas::encode_uri_component(&format!(
                "{}/registrations/{}",
                request.id_scope, request.registration_id
            ));
            let token = signer
                .token(&resource, TOKEN_LIFETIME)
                .map_err(|e| RegisterError::Config(e.to_string()))?;
            (token, None)
        }
        Proof::Certificate(certificate) => (String::new(), Some(certificate)),
        Proof::Tpm(_) => {
            return Err(RegisterError::Config(
                "TPM attestation is not available over MQTT (as in Azure DPS): use --transport https"
                    .into(),
            ));
        }
    };
    let (host, https_port) = host_of(&request.endpoint)?;
    let tls = Arc::new(tls_config(request.ca_cert.as_ref(), certificate)?);
    match tokio::time::timeout(
        request.timeout,
        session(request, &host, https_port, tls, &password),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(RegisterError::Timeout(
            request.timeout,
            "the registration did not end".into(),
        )),
    }
}

/// The host name and port (443 when it names none) of `https://host[:port][/...]` (or of a
/// bare `host[:port]`).
fn host_of(endpoint: &str) -> Result<(String, u16), RegisterError> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            let port = port.parse().map_err(|_| {
                RegisterError::Config(format!("--endpoint {endpoint}: the port is not a port"))
            })?;
            (host, port)
        }
        _ => (authority, 443),
    };
    if host.is_empty() {
        return Err(RegisterError::Config(format!(
            "--endpoint {endpoint} names no host"
        )));
    }
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

async fn session(
    request: &Registration,
    host: &str,
    https_port: u16,
    tls: Arc<rustls::ClientConfig>,
    password: &str,
) -> Result<Assignment, RegisterError> {
    let port = match request.transport {
        Transport::Mqtt { port } => port,
        Transport::MqttWebSocket | Transport::Https => https_port,
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        RegisterError::Timeout(request.timeout, format!("cannot reach {host}:{port}: {e}"))
    };
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| unreachable(&e))?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| RegisterError::Config(format!("{host}: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| unreachable(&e))?;
    if request.transport != Transport::MqttWebSocket {
        return exchange(request, Client::new(tls), password).await;
    }
    // MQTT over a WebSocket: its binary messages carry the MQTT bytes, bridged to a pipe.
    let url = format!("wss://{host}:{port}/$iothub/websocket");
    let mut upgrade = url
        .as_str()
        .into_client_request()
        .map_err(|e| RegisterError::Config(format!("{url}: {e}")))?;
    upgrade
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (socket, _) = tokio_tungstenite::client_async(upgrade, tls)
        .await
        .map_err(|e| unreachable(&e))?;
    let (ours, theirs) = tokio::io::duplex(MAX_PACKET);
    let bridge = tokio::spawn(bridge(socket, theirs));
    let result = exchange(request, Client::new(ours), password).await;
    bridge.abort();
    result
}

/// Carries MQTT bytes between a WebSocket's binary messages and `pipe`.
async fn bridge<S>(socket: tokio_tungstenite::WebSocketStream<S>, mut pipe: tokio::io::DuplexStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let (mut sink, mut stream) = socket.split();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if pipe.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                _ => break,
            },
            read = pipe.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let bytes = bytes::Bytes::copy_from_slice(&buffer[..n]);
                    if sink.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = sink.close().await;
}

/// The protocol of one registration over an MQTT connection.
async fn exchange<S>(
    request: &Registration,
    mut client: Client<S>,
    password: &str,
) -> Result<Assignment, RegisterError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut connect = Connect::new(request.registration_id.clone());
    connect.keep_alive = KEEP_ALIVE_SECS;
    connect.set_login(
        UserName::format(
            &request.id_scope,
            &request.registration_id,
            request.api_version(),
            concat!("dps-device%2F", env!("CARGO_PKG_VERSION")),
        ),
        password,
    );
    client.send(Packet::Connect(connect)).await?;
    match client.next().await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
        Packet::ConnAck(ack) => {
            return Err(RegisterError::Rejected {
                status: 401,
                code: 0,
                message: format!("the service refused the MQTT connection: {:?}", ack.code),
            });
        }
        other => return Err(protocol(&other)),
    }
    client
        .send(Packet::Subscribe(Subscribe::new(
            RESPONSE_FILTER,
            QoS::AtLeastOnce,
        )))
        .await?;
    match client.next().await? {
        Packet::SubAck(_) => {}
        other => return Err(protocol(&other)),
    }

    let body = serde_json::to_vec(&DeviceRegistration {
        registration_id: Some(request.registration_id.clone()),
        tpm: None,
        payload: request.payload.clone(),
        csr: request.csr.clone(),
    })
    .map_err(|e| RegisterError::Config(e.to_string()))?;
    let deadline = Instant::now() + request.timeout;
    // Busy answers (429, 5xx) are retried after their retry-after, or with the backoff the
    // HTTPS transport uses.
    let mut failures = 0u32;
    let accepted = loop {
        let (status, after, text) = client.request(None, &body).await?;
        match transient(status) {
            true => {
                let pause = after.unwrap_or_else(|| crate::register::backoff(failures));
                failures += 1;
                wait(pause, deadline, request.timeout).await?;
            }
            false if status == StatusCode::ACCEPTED => break text,
            false => return Err(refusal(status, text)),
        }
    };
    let accepted: RegistrationOperationStatus = serde_json::from_str(&accepted).map_err(|e| {
        RegisterError::Config(format!(
            "the service's answer is not a registration status: {e}"
        ))
    })?;
    let operation = attestation::sas::encode_uri_component(&accepted.operation_id);
    let mut pause = DEFAULT_POLL;
    loop {
        wait(pause, deadline, request.timeout).await?;
        let (status, after, text) = client.request(Some(&operation), b" ").await?;
        pause = match (after, transient(status)) {
            (Some(after), _) => after,
            (None, true) => {
                failures += 1;
                crate::register::backoff(failures)
            }
            (None, false) => DEFAULT_POLL,
        };
        if status == StatusCode::OK {
            let (assignment, _) = finish(&text)?;
            let _ = client.send(Packet::Disconnect).await;
            return Ok(assignment);
        }
        if status != StatusCode::ACCEPTED && !transient(status) {
            return Err(refusal(status, text));
        }
    }
}

/// 429 and 5xx answers are worth another try.
fn transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// Sleeps `pause`, unless that passes the deadline.
async fn wait(pause: Duration, deadline: Instant, timeout: Duration) -> Result<(), RegisterError> {
    if Instant::now() + pause >= deadline {
        return Err(RegisterError::Timeout(
            timeout,
            "the registration was still assigning".into(),
        ));
    }
    tokio::time::sleep(pause).await;
    Ok(())
}

fn protocol(packet: &Packet) -> RegisterError {
    RegisterError::Config(format!(
        "the service broke the MQTT protocol: unexpected {packet:?}"
    ))
}

struct Client<S> {
    stream: S,
    read: BytesMut,
    next_rid: u16,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            read: BytesMut::new(),
            next_rid: 0,
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), RegisterError> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, usize::MAX)
            .map_err(|e| RegisterError::Config(format!("MQTT: {e:?}")))?;
        self.stream.write_all(&out).await.map_err(lost)?;
        self.stream.flush().await.map_err(lost)
    }

    async fn next(&mut self) -> Result<Packet, RegisterError> {
        loop {
            match Packet::read(&mut self.read, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => {
                    return Err(RegisterError::Config(format!(
                        "the service sent a malformed MQTT packet: {e:?}"
                    )));
                }
            }
            if self.stream.read_buf(&mut self.read).await.map_err(lost)? == 0 {
                return Err(lost("the service closed the connection"));
            }
        }
    }

    /// Publishes a register (or, with an operation id, percent-encoded, a poll) with the next
    /// request id, and returns the answer's status, retry-after and body.
    async fn request(
        &mut self,
        operation: Option<&str>,
        body: &[u8],
    ) -> Result<(StatusCode, Option<Duration>, String), RegisterError> {
        self.next_rid = self.next_rid.wrapping_add(1).max(1);
        let rid = self.next_rid.to_string();
        let mut publish = Publish::new(
            mqtt::Request::topic(&rid, operation),
            QoS::AtLeastOnce,
            body.to_vec(),
        );
        publish.pkid = self.next_rid;
        self.send(Packet::Publish(publish)).await?;
        loop {
            let Packet::Publish(answer) = self.next().await? else {
                // The PUBACK of our publish, and anything else that is not an answer.
                continue;
            };
            let Some(topic) = mqtt::Answer::of_topic(&answer.topic).filter(|a| a.rid == rid) else {
                continue;
            };
            let Ok(status) = StatusCode::from_u16(topic.status) else {
                continue;
            };
            if answer.qos != QoS::AtMostOnce {
                self.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(
                    answer.pkid,
                )))
                .await?;
            }
            let after = topic
                .retry_after
                .map(|s| Duration::from_secs(s.clamp(1, 300)));
            let text = String::from_utf8_lossy(&answer.payload).into_owned();
            return Ok((status, after, text));
        }
    }
}

fn lost(e: impl std::fmt::Display) -> RegisterError {
    RegisterError::Rejected {
        status: 0,
        code: 0,
        message: format!("the MQTT connection ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_the_endpoint() {
        assert_eq!(
            host_of("https://dps.example.com:8443/x").unwrap(),
            ("dps.example.com".to_owned(), 8443)
        );
        assert_eq!(
            host_of("https://localhost").unwrap(),
            ("localhost".to_owned(), 443)
        );
        assert_eq!(
            host_of("mqtts://[::1]:8883").unwrap(),
            ("::1".to_owned(), 8883)
        );
        assert!(host_of("https://").is_err());
    }
}
