//! The MQTT front door (reference sections 3 and 10.1): MQTT 3.1.1 sessions, over TLS or over a
//! WebSocket, for the device SDKs that provision only over MQTT (Python, embedded C, the C
//! SDK's default), served by any router that answers the HTTPS device API (the service's, or
//! the benchmark's ceiling).
//!
//! A connection names its device in CONNECT (`{idScope}/registrations/{id}/api-version=...` as
//! the username, the SAS token as the password, none with a client certificate), subscribes to
//! `$dps/registrations/res/#` and publishes register and poll requests. Each request is handed
//! to the HTTPS device API's router as the request an HTTPS client would send (the same
//! authentication, throttling, allocation and error codes: one code path), and its answer (the
//! status, `Retry-After` and the JSON body) is published on
//! `$dps/registrations/res/{status}/?$rid={rid}&retry-after={s}`, `$rid` first and echoed byte
//! for byte. Packets are read with rumqttc's MQTT 3.1.1 codec (`mqttbytes::v4`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::{BodyDeadline, ClientChain, PeerAddr, Transport};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, header};
use bytes::{Bytes, BytesMut};
use dps_protocol::mqtt::{self, RESPONSE_FILTER, UserName};
use http_body_util::BodyExt as _;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tower::ServiceExt as _;

/// What MQTT is spoken over: a TLS connection, or the bytes of a WebSocket.
pub trait Wire: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Wire for S {}

/// Keep-alive when the client asks for none (the C SDK sends 0).
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(240);
/// The longest silence allowed, whatever keep-alive the client asks for (up to 18 hours fit in
/// the field): a silent client must not hold its connection for a day.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(30 * 60);

/// The limits of MQTT sessions.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Largest packet accepted (room for the device API's largest body and a topic).
    pub max_packet: usize,
    /// Time for the client to send CONNECT after the handshake.
    pub connect_deadline: Duration,
    /// How long a request's body may take (what the router's handlers read).
    pub body_deadline: Duration,
    /// WebSocket sessions open at once.
    pub max_websockets: usize,
}

/// Serves MQTT over TLS on `listener` for `front`, with the server's TLS configuration
/// `tls` (without its HTTP ALPN protocols) and the accept loop of [`crate::serve_tls`]; ends
/// when `front`'s `stopped` turns true, giving sessions up to `grace`.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: &rustls::ServerConfig,
    front: Front,
    limits: crate::ConnectionLimits,
    grace: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut tls = tls.clone();
    tls.alpn_protocols.clear();
    let stopped = front.stopped.clone();
    crate::serve_tls(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        limits,
        stopped,
        grace,
        move |tls, peer, chain| front.clone().serve(tls, peer, chain),
    )
}

/// What every connection of the MQTT listener shares.
#[derive(Debug, Clone)]
pub struct Front {
    /// The application router: requests go through it as HTTPS requests do.
    router: Router,
    /// The sessions' limits.
    settings: MqttSettings,
    /// Turns true when the server stops.
    stopped: watch::Receiver<bool>,
    /// WebSocket sessions open at once: an upgraded connection leaves the HTTPS listener's
    /// count, so these are capped here, at `settings.max_websockets`.
    websockets: Arc<tokio::sync::Semaphore>,
}

impl Front {
    /// A front end over `router` (one that answers the HTTPS device API), whose connections
    /// end when `stopped` turns true.
    pub fn new(router: Router, settings: &MqttSettings, stopped: watch::Receiver<bool>) -> Self {
        Self {
            router,
            stopped,
            websockets: Arc::new(tokio::sync::Semaphore::new(settings.max_websockets.max(1))),
            settings: settings.clone(),
        }
    }

    /// Room for one more WebSocket session, if there is any (hold it while the session lasts).
    pub fn websocket_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.websockets.clone().try_acquire_owned().ok()
    }

    /// Serves a session over an upgraded WebSocket (binary messages carry the MQTT bytes).
    pub async fn serve_websocket(
        self,
        socket: axum::extract::ws::WebSocket,
        peer: SocketAddr,
        chain: Option<ClientChain>,
    ) {
        let (ours, theirs) = tokio::io::duplex(self.settings.max_packet);
        let deadline = self.settings.body_deadline;
        tokio::join!(
            bridge(socket, theirs, deadline),
            self.serve(ours, peer, chain)
        );
    }

    /// The largest packet (and WebSocket message) accepted.
    pub fn max_packet(&self) -> usize {
        self.settings.max_packet
    }

    /// Serves one connection (TLS on the MQTT port, or a WebSocket's bytes) until the client
    /// leaves, breaks the protocol, stays silent past its keep-alive, or the server stops.
    pub async fn serve<S: Wire>(self, mut tls: S, peer: SocketAddr, chain: Option<ClientChain>) {
        let mut stopped = self.stopped.clone();
        let mut session = match tokio::time::timeout(
            self.settings.connect_deadline,
            Session::connect(
                &mut tls,
                self.settings.max_packet,
                self.settings.body_deadline,
            ),
        )
        .await
        {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "MQTT connection refused");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no MQTT CONNECT in time");
                return;
            }
        };
        let device = session.device.clone();
        loop {
            let packet = tokio::select! {
                packet = tokio::time::timeout(session.keep_alive, session.read(&mut tls)) => packet,
                _ = stopped.changed() => return,
            };
            let packet = match packet {
                Ok(Ok(packet)) => packet,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "MQTT connection closed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "MQTT keep-alive expired");
                    return;
                }
            };
            let answers = match packet {
                Packet::PingReq => vec![Packet::PingResp],
                Packet::Subscribe(subscribe) => {
                    let granted = subscribe
                        .filters
                        .iter()
                        .map(|f| {
                            // At most QoS 1, as DPS grants.
                            match (f.path == RESPONSE_FILTER, f.qos) {
                                (false, _) => SubscribeReasonCode::Failure,
                                (true, QoS::AtMostOnce) => {
                                    SubscribeReasonCode::Success(QoS::AtMostOnce)
                                }
                                (true, _) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                            }
                        })
                        .collect();
                    vec![Packet::SubAck(SubAck::new(subscribe.pkid, granted))]
                }
                Packet::Unsubscribe(unsubscribe) => {
                    vec![Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))]
                }
                // Our answers' acknowledgements.
                Packet::PubAck(_) => Vec::new(),
                Packet::Disconnect => return,
                // DPS takes QoS 0 and 1 (the SDKs send 1); a QoS 2 exchange is not served.
                Packet::Publish(publish) if publish.qos == QoS::ExactlyOnce => {
                    tracing::debug!(%peer, "QoS 2 publish: closed");
                    return;
                }
                Packet::Publish(publish) => {
                    let Some(request) = mqtt::Request::of_topic(&publish.topic) else {
                        tracing::debug!(%peer, topic = %publish.topic, "publish to a topic that is not DPS's: closed");
                        return;
                    };
                    // The acknowledgement comes first: the C# client expects it before the
                    // answer.
                    if publish.qos != QoS::AtMostOnce
                        && let Err(e) = session
                            .write(&mut tls, &[Packet::PubAck(PubAck::new(publish.pkid))])
                            .await
                    {
                        tracing::debug!(%peer, error = %e, "MQTT write failed");
                        return;
                    }
                    let answer = self
                        .answer(&device, &request, publish.payload, peer, chain.clone())
                        .await;
                    vec![Packet::Publish(session.publish(answer))]
                }
                other => {
                    tracing::debug!(%peer, packet = ?other, "unexpected MQTT packet: closed");
                    return;
                }
            };
            if let Err(e) = session.write(&mut tls, &answers).await {
                tracing::debug!(%peer, error = %e, "MQTT write failed");
                return;
            }
        }
    }

    /// The answer to `request` of `device`: the device API's, as it answers over HTTPS.
    async fn answer(
        &self,
        device: &Device,
        request: &mqtt::Request,
        payload: Bytes,
        peer: SocketAddr,
        chain: Option<ClientChain>,
    ) -> Answer {
        let base = format!("/{}/registrations/{}", device.name.scope, device.name.id);
        let (method, path, body) = match &request.operation {
            None => (Method::PUT, format!("{base}/register"), payload),
            // A poll's payload is ignored (clients send " ", nothing, or the register body).
            Some(operation) => (
                Method::GET,
                format!("{base}/operations/{}", encode(operation)),
                Bytes::new(),
            ),
        };
        let mut http = Request::new(Body::from(body));
        *http.method_mut() = method;
        // Every part of the path is an id that was checked, or percent-encoded, so this
        // parses; if it did not, the device is told, rather than routed elsewhere.
        match format!("{path}?api-version={}", device.name.api_version).parse() {
            Ok(uri) => *http.uri_mut() = uri,
            Err(_) => {
                return Answer {
                    topic: mqtt::Answer {
                        status: 400,
                        rid: request.rid.clone(),
                        retry_after: None,
                    }
                    .topic(),
                    body: Bytes::from_static(
                        br#"{"errorCode":400007,"message":"the request's ids do not form a path"}"#,
                    ),
                };
            }
        }
        let headers = http.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(password) = &device.password {
            headers.insert(header::AUTHORIZATION, password.clone());
        }
        http.extensions_mut().insert(PeerAddr(peer));
        http.extensions_mut().insert(Transport::MQTT);
        http.extensions_mut()
            .insert(BodyDeadline(self.settings.body_deadline));
        if let Some(chain) = chain {
            http.extensions_mut().insert(chain);
        }
        let response = match self.router.clone().oneshot(http).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Answer {
            topic: mqtt::Answer {
                status,
                rid: request.rid.clone(),
                retry_after,
            }
            .topic(),
            body,
        }
    }
}

/// Carries the bytes of binary WebSocket messages to `pipe` and back, until either side ends.
/// The two directions run side by side, so that a client that floods requests without reading
/// its answers cannot leave both waiting on each other; a send that the client does not take
/// within `deadline` ends the session.
async fn bridge(
    socket: axum::extract::ws::WebSocket,
    pipe: tokio::io::DuplexStream,
    deadline: Duration,
) {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt as _, StreamExt as _};
    let (mut sink, mut stream) = socket.split();
    let (mut from_session, mut to_session) = tokio::io::split(pipe);
    let inbound = async {
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Binary(bytes) => {
                    if to_session.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                // Pings are answered by the WebSocket layer; text is not MQTT.
                Message::Ping(_) | Message::Pong(_) => {}
                _ => break,
            }
        }
    };
    let outbound = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let n = match from_session.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let message = Message::Binary(Bytes::copy_from_slice(&buffer[..n]));
            match tokio::time::timeout(deadline, sink.send(message)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = tokio::time::timeout(deadline, sink.send(Message::Close(None))).await;
    };
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
}

/// What a path segment keeps as it is (RFC 3986's unreserved characters).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes what goes into a path segment.
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// An answer to publish.
struct Answer {
    topic: String,
    body: Bytes,
}

/// The device a connection is for, from its CONNECT.
#[derive(Debug, Clone)]
struct Device {
    name: UserName,
    /// The SAS token, as the `Authorization` of its requests.
    password: Option<HeaderValue>,
}

impl Device {
    fn of(username: &str, password: &str) -> Option<Self> {
        let password = match password.trim() {
            "" => None,
            token => Some(HeaderValue::from_str(token).ok()?),
        };
        Some(Self {
            name: UserName::parse(username)?,
            password,
        })
    }
}

/// One connection's protocol state.
struct Session {
    device: Device,
    keep_alive: Duration,
    max_packet: usize,
    /// How long a write may wait for the client to take it.
    write_deadline: Duration,
    read: BytesMut,
    write: BytesMut,
    next_pkid: u16,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0:?}")]
    Packet(mqttbytes::Error),
    #[error("the first packet is not CONNECT")]
    NotConnect,
    #[error("the client left")]
    Closed,
}

impl Session {
    /// Reads CONNECT and answers CONNACK: accepted (SessionPresent 0, whatever CleanSession
    /// says) when the username names a device, refused otherwise.
    async fn connect<S: Wire>(
        tls: &mut S,
        max_packet: usize,
        write_deadline: Duration,
    ) -> Result<Self, SessionError> {
        let mut read = BytesMut::with_capacity(1024);
        let mut write = BytesMut::with_capacity(1024);
        let connect = match next_packet(tls, &mut read, max_packet).await? {
            Packet::Connect(connect) => connect,
            _ => return Err(SessionError::NotConnect),
        };
        let (username, password) = connect
            .login
            .as_ref()
            .map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
        let Some(device) = Device::of(username, password) else {
            let refused = ConnAck::new(ConnectReturnCode::BadUserNamePassword, false);
            write_packets(tls, &mut write, &[Packet::ConnAck(refused)]).await?;
            return Err(SessionError::NotConnect);
        };
        let accepted = ConnAck::new(ConnectReturnCode::Success, false);
        write_packets(tls, &mut write, &[Packet::ConnAck(accepted)]).await?;
        Ok(Self {
            device,
            keep_alive: match connect.keep_alive {
                0 => DEFAULT_KEEP_ALIVE,
                // The client pings within its keep-alive; half as long again is its grace.
                seconds => (Duration::from_secs(u64::from(seconds)) * 3 / 2).min(MAX_KEEP_ALIVE),
            },
            max_packet,
            write_deadline,
            read,
            write,
            next_pkid: 0,
        })
    }

    async fn read<S: Wire>(&mut self, tls: &mut S) -> Result<Packet, SessionError> {
        next_packet(tls, &mut self.read, self.max_packet).await
    }

    async fn write<S: Wire>(
        &mut self,
        tls: &mut S,
        packets: &[Packet],
    ) -> Result<(), SessionError> {
        // A client that stops reading must not hold its connection.
        tokio::time::timeout(
            self.write_deadline,
            write_packets(tls, &mut self.write, packets),
        )
        .await
        .map_err(|_| {
            SessionError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no answer in time",
            ))
        })?
    }

    /// A QoS 1 publish of `answer` with the next packet id.
    fn publish(&mut self, answer: Answer) -> Publish {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        let mut publish = Publish::from_bytes(answer.topic, QoS::AtLeastOnce, answer.body);
        publish.pkid = self.next_pkid;
        publish
    }
}

/// Writes `packets` to `tls` through `buffer`.
async fn write_packets<S: Wire>(
    tls: &mut S,
    buffer: &mut BytesMut,
    packets: &[Packet],
) -> Result<(), SessionError> {
    if packets.is_empty() {
        return Ok(());
    }
    buffer.clear();
    for packet in packets {
        // Ours are small, but for answers, whose size the device API bounds.
        packet
            .write(buffer, usize::MAX)
            .map_err(SessionError::Packet)?;
    }
    tls.write_all(buffer).await?;
    tls.flush().await?;
    Ok(())
}

/// The next whole packet of `tls`, reading into `buffer` as needed.
async fn next_packet<S: Wire>(
    tls: &mut S,
    buffer: &mut BytesMut,
    max_packet: usize,
) -> Result<Packet, SessionError> {
    loop {
        match Packet::read(buffer, max_packet) {
            Ok(packet) => return Ok(packet),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(SessionError::Packet(e)),
        }
        if tls.read_buf(buffer).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_the_authorization_of_requests() {
        let device = Device::of(
            "0ne00000001/registrations/dev-1/api-version=2019-03-31",
            "SharedAccessSignature sr=x&sig=y&se=1",
        )
        .unwrap();
        assert!(device.password.is_some());
        let x509 = Device::of("0ne00000001/registrations/dev-1", "").unwrap();
        assert!(x509.password.is_none());
        assert!(Device::of("0ne1/registrations/dev-1", "bad\ntoken").is_none());
    }

    #[test]
    fn the_decoder_never_panics_on_arbitrary_bytes() {
        // A cheap fuzz: every prefix and many mutations of real packets, and random bytes.
        let mut connect = BytesMut::new();
        let mut packet = rumqttc::mqttbytes::v4::Connect::new("dev-1");
        packet.set_login("0ne1/registrations/dev-1/api-version=1", "pw");
        Packet::Connect(packet)
            .write(&mut connect, usize::MAX)
            .unwrap();
        let mut publish = BytesMut::new();
        let mut packet = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            "{}",
        );
        packet.pkid = 1;
        Packet::Publish(packet)
            .write(&mut publish, usize::MAX)
            .unwrap();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for sample in [connect.to_vec(), publish.to_vec()] {
            for end in 0..=sample.len() {
                let _ = Packet::read(&mut BytesMut::from(&sample[..end]), 1024);
            }
            for _ in 0..20_000 {
                let mut mutated = sample.clone();
                let at = (next() as usize) % mutated.len();
                mutated[at] = next() as u8;
                let _ = Packet::read(&mut BytesMut::from(&mutated[..]), 1024);
            }
        }
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = Packet::read(&mut BytesMut::from(&bytes[..]), 1024);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let mut buffer = BytesMut::from(&bytes[..]);
            // Read packets until the bytes run out or stop making sense, as a session does.
            while let Ok(_packet) = Packet::read(&mut buffer, 1024) {}
        }

        #[test]
        fn arbitrary_connect_credentials_never_panic(username in ".{0,300}", password in ".{0,300}") {
            let _ = Device::of(&username, &password);
        }
    }
}
