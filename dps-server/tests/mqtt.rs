//! The MQTT device front end, spoken to packet by packet over TLS: registration with a
//! symmetric key as the SDKs do it (their quirks included), the answers' topics, and the
//! refusals: wrong SAS, TPM over MQTT, a foreign topic, a malformed packet, a connection that
//! never sends CONNECT. Every refusal leaves the server serving the next device.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{Backend, TestServer, device_token, enroll, keys_of};
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{self, QoS};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

async fn start(backend: Backend) -> TestServer {
    let t = TestServer::start_with(backend, |c| c.mqtt_listen = Some("127.0.0.1:0".into())).await;
    t.link_hub("hub-a.example.com").await;
    t
}

/// A TLS connection to the server's MQTT listener, trusting its CA.
async fn tls(t: &TestServer) -> TlsStream<tokio::net::TcpStream> {
    tls_to(t, t.running().mqtt_addr.expect("the MQTT listener is on")).await
}

/// A TLS connection to `address` (a listener of the server), trusting its CA.
async fn tls_to(t: &TestServer, address: std::net::SocketAddr) -> TlsStream<tokio::net::TcpStream> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&t.running().ca_certificate).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A raw MQTT client.
struct Client {
    tls: TlsStream<tokio::net::TcpStream>,
    read: BytesMut,
}

impl Client {
    async fn open(t: &TestServer) -> Self {
        Self {
            tls: tls(t).await,
            read: BytesMut::new(),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        self.tls.write_all(&out).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// The next packet, or `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.read, 1 << 20) {
                Ok(packet) => return Some(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("the server sent a malformed packet: {e:?}"),
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.tls.read_buf(&mut self.read))
                    .await
                    .expect("the server answers within 10 s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// CONNECT as the Python client does it (CleanSession false, keep-alive 60), then the
    /// subscription; returns the CONNACK's SessionPresent flag.
    async fn connect(&mut self, scope: &str, id: &str, password: &str) -> bool {
        let mut connect = Connect::new(id);
        connect.clean_session = false;
        connect.keep_alive = 60;
        connect.set_login(
            format!(
                "{scope}/registrations/{id}/api-version=2019-03-31&ClientVersion=python%2F2.12"
            ),
            password,
        );
        self.send(Packet::Connect(connect)).await;
        let Some(Packet::ConnAck(ack)) = self.next().await else {
            panic!("no CONNACK");
        };
        assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
        self.send(Packet::Subscribe(Subscribe::new(
            "$dps/registrations/res/#",
            QoS::ExactlyOnce,
        )))
        .await;
        let Some(Packet::SubAck(granted)) = self.next().await else {
            panic!("no SUBACK");
        };
        // Asked for QoS 2, granted QoS 1.
        assert_eq!(
            granted.return_codes,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        ack.session_present
    }

    /// Publishes `payload` to `topic` with `qos` and returns the answer's topic and JSON body
    /// (after the PUBACK, which comes first for QoS 1).
    async fn request(&mut self, topic: &str, qos: QoS, payload: &[u8]) -> (String, Value) {
        let mut publish = Publish::new(topic, qos, payload.to_vec());
        publish.pkid = 7;
        self.send(Packet::Publish(publish)).await;
        if qos == QoS::AtLeastOnce {
            match self.next().await {
                Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, 7),
                other => panic!("expected PUBACK first, got {other:?}"),
            }
        }
        match self.next().await {
            Some(Packet::Publish(answer)) => {
                let body = serde_json::from_slice(&answer.payload).unwrap();
                (answer.topic, body)
            }
            other => panic!("expected the answer, got {other:?}"),
        }
    }
}

const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?$rid=";

fn poll_topic(rid: &str, operation: &str) -> String {
    format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation}")
}

async fn a_device_registers_over_mqtt(backend: Backend) {
    let t = start(backend).await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "mqtt-1", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let scope = t.running().admin.id_scope.clone();
    let token = device_token(&scope, "mqtt-1", &keys_of(&enrollment).0);
    let mut client = Client::open(&t).await;
    assert!(
        !client.connect(&scope, "mqtt-1", &token).await,
        "SessionPresent is 0 even when CleanSession is false"
    );

    // A register payload without registrationId (the C# client), the rid echoed byte for byte.
    let (topic, accepted) = client
        .request(
            &format!("{REGISTER}5d0f%2Dab"),
            QoS::AtLeastOnce,
            br#"{"payload":null}"#,
        )
        .await;
    assert_eq!(
        topic,
        "$dps/registrations/res/202/?$rid=5d0f%2Dab&retry-after=1"
    );
    assert_eq!(accepted["status"], "assigning", "{accepted}");
    let operation = accepted["operationId"].as_str().unwrap().to_owned();

    // The poll, at QoS 0 as the C SDK sends it, with a payload that is ignored.
    let (topic, done) = client
        .request(&poll_topic("2", &operation), QoS::AtMostOnce, b" ")
        .await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=2");
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["assignedHub"],
        "hub-a.example.com"
    );

    // An empty register payload registers again; PINGREQ and UNSUBSCRIBE are answered.
    let (topic, _) = client
        .request(&format!("{REGISTER}3"), QoS::AtLeastOnce, b"")
        .await;
    assert!(
        topic.starts_with("$dps/registrations/res/202/?$rid=3"),
        "{topic}"
    );
    client.send(Packet::PingReq).await;
    assert_eq!(client.next().await, Some(Packet::PingResp));
    client
        .send(Packet::Unsubscribe(
            rumqttc::mqttbytes::v4::Unsubscribe::new("$dps/registrations/res/#"),
        ))
        .await;
    assert!(matches!(client.next().await, Some(Packet::UnsubAck(_))));
    client.send(Packet::Disconnect).await;
    assert_eq!(client.next().await, None);

    // The registration went through the same path as HTTPS ones, and is counted as MQTT.
    let metrics = t.metrics().await;
    assert!(
        metrics.contains(r#"dps_device_registrations_total{transport="mqtt",status="202"} 2"#),
        "{metrics}"
    );
}

async fn refusals_are_answered_and_leave_the_server_serving(backend: Backend) {
    let t = start(backend).await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "mqtt-2", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let scope = t.running().admin.id_scope.clone();

    // A wrong key: 401 on the response topic with the error body, nothing registered.
    let wrong = device_token(
        &scope,
        "mqtt-2",
        &attestation::SymmetricKey::generate().unwrap(),
    );
    let mut client = Client::open(&t).await;
    client.connect(&scope, "mqtt-2", &wrong).await;
    let (topic, error) = client
        .request(&format!("{REGISTER}1"), QoS::AtLeastOnce, b"{}")
        .await;
    assert_eq!(topic, "$dps/registrations/res/401/?$rid=1");
    assert_eq!(error["errorCode"], 401002, "{error}");

    // TPM over MQTT is refused, as DPS refuses it: no challenge is issued.
    let (topic, error) = client
        .request(
            &format!("{REGISTER}2"),
            QoS::AtLeastOnce,
            br#"{"registrationId":"mqtt-2","tpm":{"endorsementKey":"AA=="}}"#,
        )
        .await;
    assert_eq!(topic, "$dps/registrations/res/401/?$rid=2");
    assert!(
        error["message"].as_str().unwrap().contains("MQTT"),
        "{error}"
    );
    assert_eq!(error["errorCode"], 401002, "{error}");
    assert!(error.get("authenticationKey").is_none(), "{error}");

    // A publish to a topic that is not DPS's closes the connection.
    client
        .send(Packet::Publish(Publish::new(
            "devices/mqtt-2/messages/events/",
            QoS::AtMostOnce,
            "hi",
        )))
        .await;
    assert_eq!(client.next().await, None);

    // A request id too long to echo in an answer's topic (or with a wildcard in it), and a
    // QoS 2 publish (which DPS does not take), close the connection without an answer.
    for (rid, qos) in [
        ("1".repeat(129), QoS::AtLeastOnce),
        ("1#".into(), QoS::AtLeastOnce),
        ("1+".into(), QoS::AtLeastOnce),
        ("9".into(), QoS::ExactlyOnce),
    ] {
        let mut refused = Client::open(&t).await;
        let good = device_token(&scope, "mqtt-2", &keys_of(&enrollment).0);
        refused.connect(&scope, "mqtt-2", &good).await;
        let mut publish = Publish::new(format!("{REGISTER}{rid}"), qos, b"{}".to_vec());
        publish.pkid = 3;
        refused.send(Packet::Publish(publish)).await;
        assert_eq!(refused.next().await, None, "rid {rid:.12}..., {qos:?}");
    }
    assert_eq!(registration_of(&t, "mqtt-2").await, 404);

    // A malformed packet closes its connection and nothing else.
    let mut garbage = Client::open(&t).await;
    garbage
        .tls
        .write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01])
        .await
        .unwrap();
    assert_eq!(garbage.next().await, None);
    // A first packet that is not CONNECT, too.
    let mut early = Client::open(&t).await;
    early.send(Packet::PingReq).await;
    assert_eq!(early.next().await, None);
    // A username that names no device gets CONNACK "bad user name or password".
    let mut nameless = Client::open(&t).await;
    let mut connect = Connect::new("x");
    connect.set_login("not-a-scope", "pw");
    nameless.send(Packet::Connect(connect)).await;
    match nameless.next().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(
            ack.code,
            rumqttc::mqttbytes::v4::ConnectReturnCode::BadUserNamePassword
        ),
        other => panic!("expected a refusing CONNACK, got {other:?}"),
    }
    assert_eq!(registration_of(&t, "mqtt-2").await, 404);

    // The right key still registers.
    let token = device_token(&scope, "mqtt-2", &keys_of(&enrollment).0);
    let mut client = Client::open(&t).await;
    client.connect(&scope, "mqtt-2", &token).await;
    let (topic, _) = client
        .request(&format!("{REGISTER}9"), QoS::AtLeastOnce, b"{}")
        .await;
    assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}");
}

async fn registration_of(t: &TestServer, id: &str) -> u16 {
    t.owner(reqwest::Method::GET, &format!("/registrations/{id}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A connection that completes TLS and never sends CONNECT is closed at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_connect_is_closed() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.mqtt_listen = Some("127.0.0.1:0".into());
        c.limits.request_header_timeout_secs = 1;
    })
    .await;
    let mut silent = Client::open(&t).await;
    let started = std::time::Instant::now();
    assert_eq!(silent.next().await, None);
    // Closed at the deadline (1 s), not at once.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// Sends a WebSocket upgrade for MQTT at `path` on the HTTPS listener; returns the answer's
/// status line and headers, lower-cased.
async fn upgrade(ws: &mut TlsStream<tokio::net::TcpStream>, path: &str, protocol: &str) -> String {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    ws.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// WebSocket sessions are capped like connections: an upgraded connection no longer counts on
/// the HTTPS listener, so past `limits.max_connections` sessions an upgrade is a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_are_capped() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.mqtt_listen = Some("off".into());
        c.limits.max_connections = 1;
    })
    .await;
    let mut first = tls_to(&t, t.running().local_addr).await;
    let head = upgrade(&mut first, "/$iothub/websocket", "mqtt").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let mut second = tls_to(&t, t.running().local_addr).await;
    let head = upgrade(&mut second, "/$iothub/websocket", "mqtt").await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    drop(second);
    drop(first);
    // Once the first session is gone, there is room again.
    let mut third = None;
    for _ in 0..50 {
        let mut attempt = tls_to(&t, t.running().local_addr).await;
        if upgrade(&mut attempt, "/$iothub/websocket", "mqtt")
            .await
            .starts_with("http/1.1 101")
        {
            third = Some(attempt);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(third.is_some(), "a session after the first closed");
}

/// A WebSocket frame that announces more than an MQTT packet may hold is refused when its
/// header arrives: the session is closed at once, not left buffering up to tungstenite's
/// 16 MiB default until a deadline (here 30 s) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_frame_closes_the_session_at_once() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.mqtt_listen = Some("off".into());
        c.limits.request_header_timeout_secs = 30;
    })
    .await;
    let mut ws = tls_to(&t, t.running().local_addr).await;
    let head = upgrade(&mut ws, "/$iothub/websocket", "mqtt").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // FIN + binary, masked, a 64-bit length of 8 MiB, the mask, then the first bytes.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(8u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 1024]);
    ws.write_all(&frame).await.unwrap();
    ws.flush().await.unwrap();
    let started = std::time::Instant::now();
    let mut sink = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.read(&mut sink)).await {
            Ok(Ok(0) | Err(_)) => break,
            // A close frame may come first; the connection ends after it.
            Ok(Ok(_)) => {}
            Err(_) => panic!("the session was still open 5 s after an 8 MiB frame header"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// MQTT over WebSockets at `/` (where the C# client goes), with the subprotocol in capitals (as
/// the C SDK sends it): the upgrade is accepted and CONNECT is answered inside binary frames. A
/// `GET /` that is not such an upgrade is still a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websockets_at_the_root() {
    let t = start(Backend::Sqlite).await;
    let plain = t.anonymous(reqwest::Method::GET, "/").send().await.unwrap();
    assert_eq!(plain.status(), 404);
    let wrong_protocol = t
        .anonymous(reqwest::Method::GET, "/$iothub/websocket")
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Protocol", "chat")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_protocol.status(), 404);

    let mut ws = tls_to(&t, t.running().local_addr).await;
    let head = upgrade(&mut ws, "/", "MQTT").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");

    // CONNECT in one masked binary frame (client frames are masked).
    let mut connect = Connect::new("ws-1");
    let scope = t.running().admin.id_scope.clone();
    connect.set_login(
        format!("{scope}/registrations/ws-1/api-version=2019-03-31"),
        "",
    );
    let mut packet = BytesMut::new();
    Packet::Connect(connect)
        .write(&mut packet, usize::MAX)
        .unwrap();
    assert!(packet.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82, 0x80 | packet.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(packet.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    ws.write_all(&frame).await.unwrap();
    // The CONNACK, in an unmasked binary frame.
    let mut answer = [0u8; 6];
    ws.read_exact(&mut answer).await.unwrap();
    assert_eq!(
        answer,
        [0x82, 4, 0x20, 2, 0, 0],
        "a binary frame with CONNACK 0"
    );
    // The upgrade is logged and counted like any request.
    let metrics = t.metrics().await;
    assert!(
        metrics.contains(r#"dps_http_requests_total{method="GET",route="/",status="101"} 1"#),
        "{metrics}"
    );
}

/// A client silent for longer than 1.5 times the keep-alive it asked for is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_its_keep_alive() {
    let t = start(Backend::Sqlite).await;
    let scope = t.running().admin.id_scope.clone();
    let mut client = Client::open(&t).await;
    let mut connect = Connect::new("quiet");
    connect.keep_alive = 1;
    connect.set_login(
        format!("{scope}/registrations/quiet/api-version=2019-03-31"),
        "",
    );
    client.send(Packet::Connect(connect)).await;
    assert!(matches!(client.next().await, Some(Packet::ConnAck(_))));
    let started = std::time::Instant::now();
    assert_eq!(client.next().await, None, "closed after the keep-alive");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// X.509 over MQTT: no password, the certificate in the handshake; the certificate's common
/// name must be the id the user name gives, or the registration is refused.
async fn x509_devices_are_who_their_certificate_says(backend: Backend) {
    let t = start(backend).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mqtt-x509");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    enroll(
        &t,
        json!({ "registrationId": "mqtt-x509", "attestation": { "type": "x509", "x509": {
            "clientCertificates": { "primary": { "certificate": cert.pem() } } } } }),
    )
    .await;
    // The other id trusts the same certificate, so only the certificate's name can refuse it.
    enroll(
        &t,
        json!({ "registrationId": "someone-else", "attestation": { "type": "x509", "x509": {
            "clientCertificates": { "primary": { "certificate": cert.pem() } } } } }),
    )
    .await;
    let scope = t.running().admin.id_scope.clone();
    let with_certificate = || async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&t.running().ca_certificate).unwrap() {
            roots.add(ca.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(t.running().mqtt_addr.unwrap())
            .await
            .unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        Client {
            tls,
            read: BytesMut::new(),
        }
    };

    // Its own id: registered.
    let mut device = with_certificate().await;
    device.connect(&scope, "mqtt-x509", "").await;
    let (topic, _) = device
        .request(&format!("{REGISTER}1"), QoS::AtLeastOnce, b"")
        .await;
    assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}");

    // Another id in the user name: refused, and the other device's state is untouched.
    let mut impostor = with_certificate().await;
    impostor.connect(&scope, "someone-else", "").await;
    let (topic, error) = impostor
        .request(&format!("{REGISTER}2"), QoS::AtLeastOnce, b"")
        .await;
    assert_eq!(topic, "$dps/registrations/res/401/?$rid=2", "{error}");
    assert_eq!(error["errorCode"], 401002);
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("common name"), "{message}");
    assert_eq!(registration_of(&t, "someone-else").await, 404);
}

/// A CSR in the MQTT register payload (the C# preview client sends it only over MQTT) gets
/// its certificate chain in the final answer, as over HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_over_mqtt_gets_its_certificate() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, ca) = common::issuing_ca_files(dir.path(), &rcgen::PKCS_ECDSA_P384_SHA384);
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.mqtt_listen = Some("127.0.0.1:0".into());
        c.issuance.certificate_authorities.insert("ca".into(), ca);
        c.issuance.credential_policies.insert(
            "devices".into(),
            dps_server::config::CredentialPolicyConfig {
                certificate_authority: "ca".into(),
                ..Default::default()
            },
        );
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "mqtt-csr", "credentialPolicyName": "devices",
            "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let scope = t.running().admin.id_scope.clone();
    let token = device_token(&scope, "mqtt-csr", &keys_of(&enrollment).0);
    let device_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut request = rcgen::CertificateParams::default();
    request
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mqtt-csr");
    let csr = STANDARD.encode(request.serialize_request(&device_key).unwrap().der());
    let mut client = Client::open(&t).await;
    client.connect(&scope, "mqtt-csr", &token).await;
    let body = serde_json::to_vec(&json!({ "registrationId": "mqtt-csr", "csr": csr })).unwrap();
    let (_, accepted) = client
        .request(&format!("{REGISTER}1"), QoS::AtLeastOnce, &body)
        .await;
    let operation = accepted["operationId"].as_str().unwrap().to_owned();
    let (_, done) = client
        .request(&poll_topic("2", &operation), QoS::AtLeastOnce, b"")
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let issued = done["registrationState"]["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no chain in {done}"));
    let leaf = STANDARD.decode(issued[0].as_str().unwrap()).unwrap();
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    attestation::chain::verify_chain(&[leaf], &ca_der, &[], common::now()).unwrap();
}

on_both_backends!(
    x509_devices_are_who_their_certificate_says,
    a_device_registers_over_mqtt,
    refusals_are_answered_and_leave_the_server_serving,
);
