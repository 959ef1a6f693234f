//! A raw MQTT 5 client for conformance tests: every packet is built and checked by the test
//! (rumqttc's v5 codec encodes and decodes both directions), so properties, packet ids and acks
//! are under the test's control — unlike a client library, which acks and aliases by itself.
#![allow(dead_code, unused_imports)]

use bytes::{Bytes, BytesMut};
pub use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, LastWill,
    LastWillProperties, Packet, PubAck, PubAckReason, Publish, PublishProperties, RetainForwardRule, SubAck, Subscribe,
    SubscribeProperties, SubscribeReasonCode,
};
pub use rumqttc::v5::mqttbytes::QoS;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct V5 {
    pub stream: TcpStream,
    rbuf: BytesMut,
    next_pkid: u16,
}

/// What a CONNECT asks for, beyond the client id.
#[derive(Clone)]
pub struct Hello {
    pub clean_start: bool,
    pub keep_alive: u16,
    pub props: ConnectProperties,
    pub will: Option<LastWill>,
}

impl Default for Hello {
    fn default() -> Self {
        Hello {
            clean_start: true,
            keep_alive: 30,
            props: ConnectProperties::new(),
            will: None,
        }
    }
}

impl Hello {
    pub fn session(expiry: u32) -> Self {
        let mut h = Hello::default();
        h.props.session_expiry_interval = Some(expiry);
        h
    }

    /// Clean Start 0: resume the client's session, keeping it `expiry` seconds after this
    /// connection.
    pub fn resume(expiry: u32) -> Self {
        Hello {
            clean_start: false,
            ..Hello::session(expiry)
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(10);

impl V5 {
    /// Connects and returns the client with the broker's CONNACK (whatever its code).
    pub async fn connect(addr: SocketAddr, id: &str, hello: Hello) -> (V5, ConnAck) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut c = V5 {
            stream,
            rbuf: BytesMut::new(),
            next_pkid: 0,
        };
        let connect = Connect {
            keep_alive: hello.keep_alive,
            client_id: id.into(),
            clean_start: hello.clean_start,
            properties: Some(hello.props),
        };
        c.send(Packet::Connect(connect, hello.will, None)).await;
        match c.recv().await {
            Packet::ConnAck(ack) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts success.
    pub async fn connected(addr: SocketAddr, id: &str, hello: Hello) -> (V5, ConnAck) {
        let (c, ack) = V5::connect(addr, id, hello).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "CONNACK {ack:?}");
        (c, ack)
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % 60_000 + 1;
        self.next_pkid
    }

    pub async fn send(&mut self, p: Packet) {
        assert!(self.try_send(p).await, "the broker closed the connection");
    }

    /// Sends `p`; false when the broker already closed the connection.
    pub async fn try_send(&mut self, p: Packet) -> bool {
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        self.stream.write_all(&b).await.is_ok()
    }

    /// The next packet, or a panic after [`WAIT`].
    pub async fn recv(&mut self) -> Packet {
        self.recv_within(WAIT).await.expect("a packet within the wait")
    }

    /// The next packet within `wait`; `None` when the broker closed the connection.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Packet::read(&mut self.rbuf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("undecodable packet from the broker: {e:?}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("no packet within {wait:?}"),
            }
        }
    }

    /// The next PUBLISH, answering nothing; other packets in between are a failure.
    pub async fn publish_in(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    pub async fn subscribe_with(&mut self, filters: Vec<Filter>, props: Option<SubscribeProperties>) -> SubAck {
        let pkid = self.pkid();
        self.send(Packet::Subscribe(Subscribe {
            pkid,
            filters,
            properties: props,
        }))
        .await;
        loop {
            match self.recv().await {
                Packet::SubAck(a) if a.pkid == pkid => return a,
                Packet::Publish(_) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
        self.subscribe_with(vec![Filter::new(filter, qos)], None).await
    }

    /// Publishes and, for QoS 1, waits for the PUBACK (skipping publishes that arrive meanwhile).
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
        props: Option<PublishProperties>,
    ) -> Option<PubAck> {
        let pkid = if qos == QoS::AtMostOnce { 0 } else { self.pkid() };
        let mut p = publish(topic, qos, pkid, payload, props);
        p.retain = retain;
        self.send(Packet::Publish(p)).await;
        if qos != QoS::AtLeastOnce {
            return None;
        }
        loop {
            match self.recv().await {
                Packet::PubAck(a) if a.pkid == pkid => return Some(a),
                Packet::Publish(_) => continue,
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }

    pub async fn puback(&mut self, pkid: u16) {
        self.send(Packet::PubAck(PubAck::new(pkid, None))).await;
    }

    pub async fn disconnect(mut self, reason: DisconnectReasonCode) {
        self.send(Packet::Disconnect(Disconnect {
            reason_code: reason,
            properties: None,
        }))
        .await;
        let _ = self.stream.shutdown().await;
    }
}

/// A PUBLISH as a client sends it (retain 0 unless set on the result).
pub fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8], props: Option<PublishProperties>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid,
        payload: Bytes::copy_from_slice(payload),
        properties: props,
    }
}

/// A QoS 1 filter with options.
pub fn filter(path: &str, nolocal: bool, rap: bool, rh: RetainForwardRule) -> Filter {
    Filter {
        path: path.into(),
        qos: QoS::AtLeastOnce,
        nolocal,
        preserve_retain: rap,
        retain_forward_rule: rh,
    }
}
