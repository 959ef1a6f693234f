//! The shared data model, a leaf every other module may use: broker events and the values
//! templates read from them, messages read back from storage, completion tickets, and the
//! commands a database may send to a live connection. It imports nothing of ours.

pub mod b64;
mod event;
mod ticket;

pub use event::*;
pub use ticket::{Outcome, Ticket};

use bytes::Bytes;
use std::sync::Arc;

/// A message read back from a database.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub msgid: u64,
    pub sender: String,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub arrived: i64,
    /// Its MQTT 5 properties, if it had any (the `props` column).
    pub props: Option<MsgProps>,
}

/// The MQTT 5 PUBLISH properties a stored message keeps so that a fetch or a retained lookup
/// replays it faithfully: user properties in order (duplicates kept), content type, response
/// topic, correlation data, payload format, and the expiry interval as published (the time
/// left is computed from `arrived` at delivery). Stored as one JSON text (`props` column,
/// Redis hash field), short keys, absent fields left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsgProps {
    #[serde(rename = "pfi", default, skip_serializing_if = "Option::is_none")]
    pub payload_format: Option<u8>,
    #[serde(rename = "exp", default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<u32>,
    #[serde(rename = "ct", default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(rename = "rt", default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Base64.
    #[serde(rename = "cd", default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<String>,
    #[serde(rename = "up", default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<(String, String)>,
}

impl MsgProps {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for an empty column; a value that is not ours is ignored (the message still
    /// goes, without properties).
    pub fn from_json(text: &str) -> Option<MsgProps> {
        if text.is_empty() {
            return None;
        }
        serde_json::from_str(text).ok()
    }

    /// Seconds left of the expiry interval at `now_ms` for a message that arrived at
    /// `arrived_ms`: `None` = no expiry, `Some(0)` = expired.
    pub fn remaining(&self, arrived_ms: i64, now_ms: i64) -> Option<u32> {
        let exp = self.expiry?;
        let gone = (now_ms - arrived_ms).max(0) / 1000;
        Some(u32::try_from(i64::from(exp) - gone).unwrap_or(0))
    }
}

impl StoredMessage {
    /// Expired (MQTT 5 message expiry): not to be delivered any more.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.props.as_ref().and_then(|p| p.remaining(self.arrived, now_ms)) == Some(0)
    }
}

/// A stored message to deliver to one subscriber.
#[derive(Debug, Clone)]
pub struct Injection {
    pub msg: StoredMessage,
    /// From a retained lookup: delivered with the retain flag.
    pub retained: bool,
}

/// Something done to a live connection from outside it (the Redis control channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Subscribe { filter: String, qos: u8 },
    Unsubscribe { filter: String },
}

/// Where control commands go: `(clientid, command)`, true if that client is connected here.
pub type ControlSink = Arc<dyn Fn(&str, Control) -> bool + Send + Sync>;
