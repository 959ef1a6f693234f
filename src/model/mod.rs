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
