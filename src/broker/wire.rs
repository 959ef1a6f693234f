//! The only file that knows rumqttd internals beyond its public API (ARCHITECTURE §2, trap 1):
//! `Publish.{qos, pkid, dup}` are crate-private, so we read them from raw frames and build
//! QoS>0 publishes through the public `Publish::deserialize`.

use crate::model::Message;
use bytes::{BufMut, BytesMut};
use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol, Publish, PublishProperties};
use std::sync::Arc;

/// MQTT 3.1.1 or 5, chosen per connection from the CONNECT protocol level.
#[derive(Clone)]
pub enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    pub fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    pub fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, rumqttd::protocol::Error> {
        // rumqttd's decoders hit `unreachable!()` on some packet types only a server sends
        // (CONNACK, UNSUBACK in v5, AUTH): a client sending one is a protocol error, not a panic.
        if let Some(&first) = buf.first() {
            if !matches!(first >> 4, 1 | 3..=8 | 10 | 12 | 14) {
                return Err(rumqttd::protocol::Error::InvalidPacketType(first >> 4));
            }
        }
        match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        }
    }

    pub fn write(&self, packet: Packet, buf: &mut BytesMut) -> Result<usize, rumqttd::protocol::Error> {
        match self {
            Codec::V4(c) => c.write(packet, buf),
            Codec::V5(c) => c.write(packet, buf),
        }
    }
}

/// Reads the fixed header: (packet type, header length, remaining length), if complete.
fn fixed_header(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let first = *buf.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((first, 2 + i, len));
        }
    }
    None
}

/// The protocol level of a CONNECT at the start of `buf`: `Ok(None)` = need more bytes,
/// `Err(())` = the first packet is not a CONNECT.
#[allow(clippy::result_unit_err)]
pub fn connect_level(buf: &[u8]) -> Result<Option<u8>, ()> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] >> 4 != 1 {
        return Err(());
    }
    let Some((_, hl, _)) = fixed_header(buf) else {
        return if buf.len() > 5 { Err(()) } else { Ok(None) };
    };
    let Some(name_len) = buf.get(hl..hl + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else {
        return Ok(None);
    };
    Ok(buf.get(hl + 2 + name_len).copied())
}

/// QoS, packet id and dup of the PUBLISH at the start of `buf`, if that is what it holds.
pub fn peek_publish(buf: &[u8]) -> Option<(u8, u16)> {
    let (first, hl, _) = fixed_header(buf)?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 3;
    if qos == 0 {
        return Some((0, 0));
    }
    let tl = u16::from_be_bytes([*buf.get(hl)?, *buf.get(hl + 1)?]) as usize;
    let p = hl + 2 + tl;
    Some((qos, u16::from_be_bytes([*buf.get(p)?, *buf.get(p + 1)?])))
}

/// QoS and packet id of a publish (crate-private in rumqttd, trap 1): read off a trial
/// encoding at the end of `buf`, taken back at once.
pub fn qos_pkid(p: &Publish, buf: &mut BytesMut) -> (u8, u16) {
    let start = buf.len();
    let _ = V4.write(Packet::Publish(p.clone(), None), buf);
    let out = peek_publish(&buf[start..]).unwrap_or((0, 0));
    buf.truncate(start);
    out
}

/// A publish with QoS and packet id set, built through the public serializer format.
pub fn build_publish(topic: &[u8], payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Publish {
    let mut b = BytesMut::with_capacity(5 + topic.len() + payload.len());
    b.put_u8(0b0011_0000 | u8::from(retain) | (qos.min(2) << 1));
    b.put_u16(if qos == 0 { 0 } else { pkid });
    b.put_u16(topic.len() as u16);
    b.extend_from_slice(topic);
    b.extend_from_slice(payload);
    Publish::deserialize(b.freeze())
}

/// Marks a publish with its QoS and retain flag as published, for the subscriber side: the
/// router forwards at the subscription's QoS and clears retain. They ride in the high bits of
/// the Payload Format Indicator (a client may only send 0 or 1 there, checked on PUBLISH),
/// which the router passes through untouched: no allocation per message, unlike a user
/// property. `take_published` restores the client's own value.
pub fn mark_published(props: &mut Option<rumqttd::protocol::PublishProperties>, qos: u8, retain: bool) {
    let p = props.get_or_insert_with(Default::default);
    let own = match p.payload_format_indicator {
        None => 0,
        Some(0) => 1,
        Some(_) => 2,
    };
    p.payload_format_indicator = Some(0x80 | (own << 3) | ((qos & 3) << 1) | u8::from(retain));
}

/// The published QoS and retain flag [`mark_published`] set, with the client's own Payload
/// Format Indicator back in place (and no properties left if that was all there was).
pub fn take_published(props: &mut Option<rumqttd::protocol::PublishProperties>) -> Option<(u8, bool)> {
    let p = props.as_mut()?;
    let v = p.payload_format_indicator.filter(|v| v & 0x80 != 0)?;
    p.payload_format_indicator = match (v >> 3) & 3 {
        0 => None,
        1 => Some(0),
        _ => Some(1),
    };
    if *p == rumqttd::protocol::PublishProperties::default() {
        *props = None;
    }
    Some(((v >> 1) & 3, v & 1 == 1))
}

/// An MQTT 5 DISCONNECT with `code` and an empty property list. rumqttd's v5 writer gets the
/// remaining length wrong for any reason but 0x00 without properties (it writes `E0 01 82 00`),
/// and the shorter valid form without the property length (`E0 01 82`) is more than some
/// clients decode (rumqttc 0.24 waits for the missing byte).
pub fn disconnect_v5(code: rumqttd::protocol::DisconnectReasonCode, buf: &mut BytesMut) {
    use rumqttd::protocol::DisconnectReasonCode as C;
    let byte = match code {
        C::NormalDisconnection => 0x00,
        C::DisconnectWithWillMessage => 0x04,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::ServerShuttingDown => 0x8B,
        C::KeepAliveTimeout => 0x8D,
        C::SessionTakenOver => 0x8E,
        C::TopicFilterInvalid => 0x8F,
        C::TopicNameInvalid => 0x90,
        C::ReceiveMaximumExceeded => 0x93,
        C::TopicAliasInvalid => 0x94,
        C::PacketTooLarge => 0x95,
        C::MessageRateTooHigh => 0x96,
        C::QuotaExceeded => 0x97,
        C::AdministrativeAction => 0x98,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::SharedSubscriptionNotSupported => 0x9E,
        C::ConnectionRateExceeded => 0x9F,
        C::MaximumConnectTime => 0xA0,
        C::SubscriptionIdentifiersNotSupported => 0xA1,
        C::WildcardSubscriptionsNotSupported => 0xA2,
    };
    buf.extend_from_slice(&[0xE0, 2, byte, 0]);
}

/// rumqttd refuses client ids containing `+ $ # /`; MQTT allows them. Escape them (and `%`)
/// reversibly so the router still sees one distinct name per client id.
pub fn router_client_id(clientid: &str) -> String {
    let mut out = String::with_capacity(clientid.len());
    for c in clientid.chars() {
        match c {
            '%' | '+' | '$' | '#' | '/' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// User property carrying `msgid:timestamp:sender` from publisher to subscriber links (the
/// published QoS and retain flag travel apart, `wire::mark_published`).
pub const META_KEY: &str = "mqtt-persist-meta";
/// Per-message data carried across the router.
#[derive(Debug, Clone)]
pub struct Meta {
    pub msgid: u64,
    pub sender: Arc<str>,
    pub timestamp: i64,
}

pub fn encode_meta(m: &Message) -> (String, String) {
    (META_KEY.to_string(), format!("{}:{}:{}", m.msgid, m.timestamp, m.sender))
}

/// Removes every user property named like the broker's carrier. Applied to each PUBLISH and
/// will a client sends, before the broker adds its own: a property of that name inside the
/// router was always set by the broker, so a client can neither forge metadata nor read it.
pub fn strip_meta(props: &mut Option<PublishProperties>) {
    if let Some(p) = props.as_mut() {
        if p.user_properties.iter().any(|(k, _)| k == META_KEY) {
            p.user_properties.retain(|(k, _)| k != META_KEY);
            if *p == PublishProperties::default() {
                *props = None;
            }
        }
    }
}

/// The broker's metadata of a routed message, removed from its properties (every copy of the
/// carrier goes, whatever the parse, so none reaches a subscriber).
pub fn take_meta(props: &mut Option<PublishProperties>) -> Option<Meta> {
    let p = props.as_mut()?;
    let i = p.user_properties.iter().rposition(|(k, _)| k == META_KEY)?;
    let (_, v) = p.user_properties.remove(i);
    strip_meta(props);
    if props.as_ref().is_some_and(|p| *p == PublishProperties::default()) {
        *props = None;
    }
    let mut it = v.splitn(3, ':');
    let msgid = it.next()?.parse().ok()?;
    let timestamp = it.next()?.parse().ok()?;
    Some(Meta {
        msgid,
        timestamp,
        sender: it.next().unwrap_or("").into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_publishes_carry_qos_and_pkid_through_the_codec() {
        let p = build_publish(b"a/b", b"x", 1, true, 4242);
        let mut buf = BytesMut::new();
        V4.write(Packet::Publish(p, None), &mut buf).unwrap();
        assert_eq!(peek_publish(&buf), Some((1, 4242)));
        assert_eq!(buf[0] & 1, 1, "retain flag");
    }

    #[test]
    fn connect_level_is_read_from_the_variable_header() {
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0];
        assert_eq!(connect_level(&connect), Ok(Some(5)));
        assert_eq!(connect_level(&connect[..5]), Ok(None));
        assert_eq!(connect_level(&[0x30, 0]), Err(()));
    }

    #[test]
    fn packets_only_a_server_sends_are_refused_without_a_panic() {
        for first in [0x00u8, 0x20, 0x90, 0xB0, 0xD0, 0xF0] {
            for mut codec in [Codec::V4(V4), Codec::V5(V5)] {
                let mut buf = BytesMut::from(&[first, 3, 0, 0, 0][..]);
                assert!(codec.read(&mut buf, 1024).is_err(), "{first:#x}");
            }
        }
    }

    #[test]
    fn published_flags_round_trip_and_restore_the_clients_indicator() {
        for own in [None, Some(0), Some(1)] {
            for (qos, retain) in [(0, false), (1, true), (2, false)] {
                let mut props = own.map(|v| rumqttd::protocol::PublishProperties {
                    payload_format_indicator: Some(v),
                    ..Default::default()
                });
                mark_published(&mut props, qos, retain);
                assert_eq!(take_published(&mut props), Some((qos, retain)));
                assert_eq!(props.and_then(|p| p.payload_format_indicator), own);
            }
        }
        assert_eq!(take_published(&mut None), None);
    }

    #[test]
    fn v5_disconnects_carry_their_reason_code() {
        let mut b = BytesMut::new();
        disconnect_v5(rumqttd::protocol::DisconnectReasonCode::ReceiveMaximumExceeded, &mut b);
        assert_eq!(&b[..], &[0xE0, 2, 0x93, 0]);
        let back = V5.read_mut(&mut b, 16).unwrap();
        assert!(
            matches!(back, Packet::Disconnect(d, _) if d.reason_code == rumqttd::protocol::DisconnectReasonCode::ReceiveMaximumExceeded)
        );
    }

    #[test]
    fn hostile_client_ids_get_distinct_router_names() {
        assert_eq!(router_client_id("a/b"), "a%2Fb");
        assert_ne!(router_client_id("a/b"), router_client_id("a%2Fb"));
    }
}
