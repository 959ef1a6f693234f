//! Typed broker events (SPEC §2) and the variables templates may read from them.

use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The seven hooks. Names follow EMQX 4 so conf files carry over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    ClientConnected,
    ClientDisconnected,
    SessionSubscribed,
    SessionUnsubscribed,
    MessagePublish,
    MessageDelivered,
    MessageAcked,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::ClientConnected,
        Hook::ClientDisconnected,
        Hook::SessionSubscribed,
        Hook::SessionUnsubscribed,
        Hook::MessagePublish,
        Hook::MessageDelivered,
        Hook::MessageAcked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::ClientConnected => "client.connected",
            Hook::ClientDisconnected => "client.disconnected",
            Hook::SessionSubscribed => "session.subscribed",
            Hook::SessionUnsubscribed => "session.unsubscribed",
            Hook::MessagePublish => "message.publish",
            Hook::MessageDelivered => "message.delivered",
            Hook::MessageAcked => "message.acked",
        }
    }

    /// Parses a hook name, accepting the 3.x aliases `session.created` and `message.deliver`.
    pub fn parse(name: &str) -> Option<Hook> {
        match name {
            "session.created" => Some(Hook::ClientConnected),
            "message.deliver" => Some(Hook::MessageDelivered),
            _ => Hook::ALL.into_iter().find(|h| h.name() == name),
        }
    }

    pub fn all_names() -> impl Iterator<Item = &'static str> {
        Hook::ALL.into_iter().map(Hook::name).chain(["session.created", "message.deliver"])
    }

    /// The variables an event of this hook carries (SPEC §2).
    pub fn vars(self) -> &'static [Var] {
        use Var::*;
        match self {
            Hook::ClientConnected => &[
                Clientid,
                Username,
                Peerhost,
                Peerport,
                ProtoVer,
                Keepalive,
                CleanStart,
                ConnectedAt,
                Node,
            ],
            Hook::ClientDisconnected => &[Clientid, Username, Peerhost, Reason, ConnectedAt, DisconnectedAt, Node],
            Hook::SessionSubscribed => &[Clientid, Username, Topic, Qos],
            Hook::SessionUnsubscribed => &[Clientid, Username, Topic],
            Hook::MessagePublish => &[
                Clientid,
                Username,
                Msgid,
                Topic,
                Payload,
                Qos,
                Retain,
                Timestamp,
                TimestampStr,
                Node,
                Message,
            ],
            Hook::MessageDelivered => &[Clientid, Msgid, Topic, Qos, Payload, Timestamp],
            Hook::MessageAcked => &[Clientid, Msgid, Topic],
        }
    }

    /// Hooks whose `topic` rule field is matched against something.
    pub fn has_topic(self) -> bool {
        !matches!(self, Hook::ClientConnected | Hook::ClientDisconnected)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `${name}` placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Var {
    Clientid,
    Username,
    Peerhost,
    Peerport,
    ProtoVer,
    Keepalive,
    CleanStart,
    ConnectedAt,
    Node,
    Reason,
    DisconnectedAt,
    Topic,
    Qos,
    Msgid,
    Payload,
    Retain,
    Timestamp,
    TimestampStr,
    /// Redis only: expands to the message's field list.
    Message,
}

impl Var {
    const NAMES: [(&'static str, Var); 19] = [
        ("clientid", Var::Clientid),
        ("username", Var::Username),
        ("peerhost", Var::Peerhost),
        ("peerport", Var::Peerport),
        ("proto_ver", Var::ProtoVer),
        ("keepalive", Var::Keepalive),
        ("clean_start", Var::CleanStart),
        ("connected_at", Var::ConnectedAt),
        ("node", Var::Node),
        ("reason", Var::Reason),
        ("disconnected_at", Var::DisconnectedAt),
        ("topic", Var::Topic),
        ("qos", Var::Qos),
        ("msgid", Var::Msgid),
        ("payload", Var::Payload),
        ("retain", Var::Retain),
        ("timestamp", Var::Timestamp),
        ("timestamp_str", Var::TimestampStr),
        ("message", Var::Message),
    ];

    pub fn parse(name: &str) -> Option<Var> {
        Var::NAMES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    pub fn name(self) -> &'static str {
        Var::NAMES.iter().find(|(_, v)| *v == self).map(|(n, _)| *n).unwrap_or("?")
    }
}

/// A value bound to a statement parameter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Null,
    Int(i64),
    Str(Arc<str>),
    Bytes(#[serde(with = "super::b64")] Bytes),
    Bool(bool),
}

impl Value {
    /// The value as bytes, for binary-safe protocols (Redis arguments).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Value::Null => Vec::new(),
            Value::Int(i) => i.to_string().into_bytes(),
            Value::Str(s) => s.as_bytes().to_vec(),
            Value::Bytes(b) => b.to_vec(),
            Value::Bool(b) => {
                if *b {
                    b"true".to_vec()
                } else {
                    b"false".to_vec()
                }
            }
        }
    }
}

/// A connected client, shared by all events of one connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub clientid: Arc<str>,
    pub username: Option<Arc<str>>,
    pub peerhost: String,
    pub peerport: u16,
    pub proto_ver: u8,
    pub keepalive: u16,
    pub clean_start: bool,
    /// The client's session outlives the connection (3.1.1 clean session 0, MQTT 5 session
    /// expiry > 0): only such a session has read pointers (SPEC §3.1).
    pub persistent: bool,
    pub connected_at: i64,
}

/// A published message as the hooks and backends see it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub msgid: u64,
    pub sender: Arc<str>,
    pub username: Option<Arc<str>>,
    pub topic: Arc<str>,
    #[serde(with = "super::b64")]
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds since the epoch, when the broker received it.
    pub timestamp: i64,
    /// MQTT 5 properties to store with it (none for 3.1.1 and plain v5 publishes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<Arc<super::MsgProps>>,
}

impl Message {
    /// The `props` column's value: JSON text, or NULL.
    pub fn props_json(&self) -> Option<String> {
        self.props.as_ref().map(|p| p.to_json())
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        client: Arc<Client>,
    },
    Disconnected {
        client: Arc<Client>,
        reason: Arc<str>,
        disconnected_at: i64,
    },
    Subscribed {
        client: Arc<Client>,
        filter: Arc<str>,
        qos: u8,
    },
    Unsubscribed {
        client: Arc<Client>,
        filter: Arc<str>,
    },
    Publish {
        msg: Arc<Message>,
    },
    /// `qos` is the QoS the receiver got.
    Delivered {
        client: Arc<Client>,
        msg: Arc<Message>,
        qos: u8,
    },
    /// `filters` are the receiver's subscriptions matching the topic (for ack pointers).
    Acked {
        client: Arc<Client>,
        msgid: u64,
        topic: Arc<str>,
        filters: Arc<[Arc<str>]>,
    },
}

impl Event {
    pub fn hook(&self) -> Hook {
        match self {
            Event::Connected { .. } => Hook::ClientConnected,
            Event::Disconnected { .. } => Hook::ClientDisconnected,
            Event::Subscribed { .. } => Hook::SessionSubscribed,
            Event::Unsubscribed { .. } => Hook::SessionUnsubscribed,
            Event::Publish { .. } => Hook::MessagePublish,
            Event::Delivered { .. } => Hook::MessageDelivered,
            Event::Acked { .. } => Hook::MessageAcked,
        }
    }

    /// What a rule's `topic` filter is matched against: the message topic on message hooks,
    /// the subscription filter on session hooks, nothing on client hooks.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Event::Subscribed { filter, .. } | Event::Unsubscribed { filter, .. } => Some(filter),
            Event::Publish { msg } | Event::Delivered { msg, .. } => Some(&msg.topic),
            Event::Acked { topic, .. } => Some(topic),
            _ => None,
        }
    }

    pub fn clientid(&self) -> &Arc<str> {
        match self {
            Event::Connected { client }
            | Event::Disconnected { client, .. }
            | Event::Subscribed { client, .. }
            | Event::Unsubscribed { client, .. }
            | Event::Delivered { client, .. }
            | Event::Acked { client, .. } => &client.clientid,
            Event::Publish { msg } => &msg.sender,
        }
    }

    /// The value of a placeholder. Templates are checked at load time against
    /// [`Hook::vars`], so a missing value here is `Null`, never a panic.
    pub fn value(&self, var: Var, node: &Arc<str>) -> Value {
        let s = |v: &Arc<str>| Value::Str(v.clone());
        let opt = |v: &Option<Arc<str>>| v.as_ref().map(|v| Value::Str(v.clone())).unwrap_or(Value::Null);
        match (self, var) {
            (_, Var::Node) => s(node),
            (_, Var::Clientid) => s(self.clientid()),
            (Event::Publish { msg }, Var::Username) => opt(&msg.username),
            (Event::Publish { .. }, _) | (Event::Delivered { .. }, _) => self.message_value(var),
            (
                Event::Connected { client }
                | Event::Disconnected { client, .. }
                | Event::Subscribed { client, .. }
                | Event::Unsubscribed { client, .. },
                Var::Username,
            ) => opt(&client.username),
            (Event::Connected { client } | Event::Disconnected { client, .. }, v) => match v {
                Var::Peerhost => Value::Str(client.peerhost.as_str().into()),
                Var::Peerport => Value::Int(client.peerport.into()),
                Var::ProtoVer => Value::Int(client.proto_ver.into()),
                Var::Keepalive => Value::Int(client.keepalive.into()),
                Var::CleanStart => Value::Bool(client.clean_start),
                Var::ConnectedAt => Value::Int(client.connected_at),
                Var::Reason => match self {
                    Event::Disconnected { reason, .. } => s(reason),
                    _ => Value::Null,
                },
                Var::DisconnectedAt => match self {
                    Event::Disconnected { disconnected_at, .. } => Value::Int(*disconnected_at),
                    _ => Value::Null,
                },
                _ => Value::Null,
            },
            (Event::Subscribed { filter, qos, .. }, Var::Topic) => {
                let _ = qos;
                s(filter)
            }
            (Event::Subscribed { qos, .. }, Var::Qos) => Value::Int((*qos).into()),
            (Event::Unsubscribed { filter, .. }, Var::Topic) => s(filter),
            (Event::Acked { msgid, .. }, Var::Msgid) => Value::Int(*msgid as i64),
            (Event::Acked { topic, .. }, Var::Topic) => s(topic),
            _ => Value::Null,
        }
    }

    fn message_value(&self, var: Var) -> Value {
        let (msg, qos) = match self {
            Event::Publish { msg } => (msg, msg.qos),
            Event::Delivered { msg, qos, .. } => (msg, *qos),
            _ => return Value::Null,
        };
        match var {
            Var::Msgid => Value::Int(msg.msgid as i64),
            Var::Topic => Value::Str(msg.topic.clone()),
            Var::Payload => Value::Bytes(msg.payload.clone()),
            Var::Qos => Value::Int(qos.into()),
            Var::Retain => Value::Bool(msg.retain),
            Var::Timestamp => Value::Int(msg.timestamp),
            Var::TimestampStr => Value::Str(timestamp_str(msg.timestamp).into()),
            _ => Value::Null,
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
pub fn timestamp_str(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_formatting() {
        assert_eq!(timestamp_str(0), "1970-01-01 00:00:00.000");
        assert_eq!(timestamp_str(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(timestamp_str(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn hook_aliases() {
        assert_eq!(Hook::parse("session.created"), Some(Hook::ClientConnected));
        assert_eq!(Hook::parse("message.deliver"), Some(Hook::MessageDelivered));
        assert_eq!(Hook::parse("message.acked"), Some(Hook::MessageAcked));
        assert_eq!(Hook::parse("message.ack"), None);
    }
}
