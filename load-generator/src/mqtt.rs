//! One simulated device's MQTT connection: CONNECT and the response subscription, then
//! request publishes answered on the response topic (reference section 3). Errors are the
//! report's error codes.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dps_protocol::mqtt::{self, RESPONSE_FILTER, UserName};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::connection::{Answer, Endpoint, TIMEOUT};

/// An open MQTT connection of one device.
pub struct MqttConnection {
    stream: TlsStream<TcpStream>,
    read: BytesMut,
    next_rid: u16,
}

impl MqttConnection {
    /// Connects, shakes hands, sends CONNECT (the SAS token as the password, none for X.509)
    /// and subscribes to the answers.
    pub async fn open(
        endpoint: &Endpoint,
        tls: Arc<rustls::ClientConfig>,
        scope: &str,
        id: &str,
        password: Option<&str>,
    ) -> Result<Self, String> {
        let connect = async {
            let tcp = TcpStream::connect(endpoint.address).await.ok()?;
            tcp.set_nodelay(true).ok()?;
            tokio_rustls::TlsConnector::from(tls)
                .connect(endpoint.server_name.clone(), tcp)
                .await
                .ok()
        };
        let stream = tokio::time::timeout(TIMEOUT, connect)
            .await
            .map_err(|_| "timeout".to_owned())?
            .ok_or_else(|| "connect".to_owned())?;
        let mut connection = Self {
            stream,
            read: BytesMut::new(),
            next_rid: 0,
        };
        let mut packet = Connect::new(id);
        packet.keep_alive = 60;
        packet.set_login(
            UserName::format(scope, id, "2019-03-31", "dps-load"),
            password.unwrap_or_default(),
        );
        let handshake = async {
            connection.send(Packet::Connect(packet)).await?;
            match connection.next().await? {
                Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
                _ => return Err("mqtt-connack".to_owned()),
            }
            connection
                .send(Packet::Subscribe(Subscribe::new(
                    RESPONSE_FILTER,
                    QoS::AtLeastOnce,
                )))
                .await?;
            match connection.next().await? {
                Packet::SubAck(_) => Ok(()),
                _ => Err("mqtt-suback".to_owned()),
            }
        };
        tokio::time::timeout(TIMEOUT, handshake)
            .await
            .map_err(|_| "timeout".to_owned())??;
        Ok(connection)
    }

    /// A register (or, with an operation id, a poll) and its answer.
    pub async fn request(
        &mut self,
        operation: Option<&str>,
        body: &Value,
    ) -> Result<Answer, String> {
        self.next_rid = self.next_rid.wrapping_add(1).max(1);
        let rid = self.next_rid.to_string();
        let encoded = operation.map(attestation::sas::encode_uri_component);
        let mut publish = Publish::new(
            mqtt::Request::topic(&rid, encoded.as_deref()),
            QoS::AtLeastOnce,
            body.to_string(),
        );
        publish.pkid = self.next_rid;
        let exchange = async {
            self.send(Packet::Publish(publish)).await?;
            loop {
                let Packet::Publish(answer) = self.next().await? else {
                    continue;
                };
                let Some(topic) = mqtt::Answer::of_topic(&answer.topic).filter(|a| a.rid == rid)
                else {
                    continue;
                };
                if answer.qos != QoS::AtMostOnce {
                    self.send(Packet::PubAck(PubAck::new(answer.pkid))).await?;
                }
                let body = serde_json::from_slice(&answer.payload).unwrap_or(Value::Null);
                return Ok((
                    topic.status,
                    body,
                    topic
                        .retry_after
                        .map(|s| Duration::from_secs(s.clamp(1, 300))),
                ));
            }
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| "timeout".to_owned())?
    }

    async fn send(&mut self, packet: Packet) -> Result<(), String> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, usize::MAX)
            .map_err(|_| "mqtt-encode".to_owned())?;
        self.stream
            .write_all(&out)
            .await
            .map_err(|_| "connect".to_owned())?;
        self.stream.flush().await.map_err(|_| "connect".to_owned())
    }

    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            match Packet::read(&mut self.read, 1 << 20) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return Err("mqtt-malformed".to_owned()),
            }
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) | Err(_) => return Err("mqtt-closed".to_owned()),
                Ok(_) => {}
            }
        }
    }
}
