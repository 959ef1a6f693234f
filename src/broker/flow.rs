//! What a client allows the broker to send it, and what the broker allows the client (MQTT 5
//! flow control, §4.9; maximum packet size, §3.1.2.11.4; topic aliases, §3.3.2.3.4). rumqttd's
//! router knows none of the client's limits for local links, so the connection applies them
//! to every PUBLISH it writes, router forwards and injected stored messages alike.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};

/// The client's limits on what it receives.
pub struct Outbound {
    /// Receive Maximum: QoS 1/2 publishes sent and not yet completed (PUBACK, PUBCOMP).
    receive_max: usize,
    unacked: usize,
    /// Maximum Packet Size the client accepts.
    pub max_packet: usize,
    aliases: Aliases,
}

/// Server → client topic aliases: a topic seen before goes out as its alias alone.
struct Aliases {
    max: u16,
    by_topic: HashMap<Bytes, u16>,
    /// Round-robin replacement once every alias is taken.
    next: u16,
    topics: Vec<Bytes>,
}

/// How a publish is to go out.
pub enum Aliased {
    /// No alias: the topic as it is.
    None,
    /// A new alias (the topic goes with it); forget it if the packet is not sent.
    New(u16),
    /// A known alias: the topic is left out.
    Known(u16),
}

impl Outbound {
    pub fn new(receive_max: Option<u16>, max_packet: Option<u32>, topic_alias_max: Option<u16>) -> Outbound {
        Outbound {
            receive_max: receive_max.filter(|m| *m > 0).unwrap_or(u16::MAX).into(),
            unacked: 0,
            max_packet: max_packet.filter(|m| *m > 0).map_or(usize::MAX, |m| m as usize),
            aliases: Aliases {
                max: topic_alias_max.unwrap_or(0),
                by_topic: HashMap::new(),
                next: 1,
                topics: Vec::new(),
            },
        }
    }

    /// True while another QoS 1/2 publish may be sent now.
    pub fn may_send(&self) -> bool {
        self.unacked < self.receive_max
    }

    pub fn sent(&mut self) {
        self.unacked += 1;
    }

    /// The client completed a QoS 1/2 delivery.
    pub fn completed(&mut self) {
        self.unacked = self.unacked.saturating_sub(1);
    }

    /// The alias for `topic`, assigning one when the client allows it.
    pub fn alias(&mut self, topic: &Bytes) -> Aliased {
        let a = &mut self.aliases;
        if a.max == 0 || topic.is_empty() {
            return Aliased::None;
        }
        if let Some(n) = a.by_topic.get(topic) {
            return Aliased::Known(*n);
        }
        let n = a.next;
        a.next = if n >= a.max { 1 } else { n + 1 };
        let slot = usize::from(n) - 1;
        if let Some(old) = a.topics.get(slot) {
            a.by_topic.remove(old);
            a.topics[slot] = topic.clone();
        } else {
            a.topics.push(topic.clone());
        }
        a.by_topic.insert(topic.clone(), n);
        Aliased::New(n)
    }

    /// Takes back an alias assigned for a packet that was not sent.
    pub fn unalias(&mut self, n: u16) {
        let a = &mut self.aliases;
        if let Some(t) = a.topics.get(usize::from(n) - 1) {
            a.by_topic.remove(t);
        }
    }
}

/// Client → server topic aliases (at most `max`, set by the client per connection).
pub struct InAliases {
    max: u16,
    topics: HashMap<u16, Bytes>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AliasError {
    /// 0 or above the maximum: DISCONNECT 0x94.
    Invalid,
    /// An empty topic with an alias never set: DISCONNECT 0x82.
    Unknown,
}

impl InAliases {
    pub fn new(max: u16) -> Self {
        InAliases {
            max,
            topics: HashMap::new(),
        }
    }

    /// The topic a publish is for: its own (remembered under `alias`), or the alias's.
    pub fn resolve(&mut self, topic: Bytes, alias: u16) -> Result<Bytes, AliasError> {
        if alias == 0 || alias > self.max {
            return Err(AliasError::Invalid);
        }
        if topic.is_empty() {
            return self.topics.get(&alias).cloned().ok_or(AliasError::Unknown);
        }
        self.topics.insert(alias, topic.clone());
        Ok(topic)
    }
}

/// The packet ids of QoS 1/2 publishes received and not yet completed by the broker's PUBACK or
/// PUBCOMP: the client's side of the broker's Receive Maximum. A list, not a bitmap: memory
/// follows what is in flight (a few ids per connection), and it is short enough to scan.
#[derive(Default)]
pub struct Inbound {
    pkids: Vec<u16>,
}

impl Inbound {
    /// Records `pkid`; false when that makes more than `max` in flight. A retransmission of a
    /// packet id still in flight counts once.
    pub fn received(&mut self, pkid: u16, max: u16) -> bool {
        if !self.pkids.contains(&pkid) {
            self.pkids.push(pkid);
        }
        self.pkids.len() <= usize::from(max)
    }

    pub fn done(&mut self, pkid: u16) {
        if let Some(i) = self.pkids.iter().position(|p| *p == pkid) {
            self.pkids.swap_remove(i);
        }
    }
}

/// MQTT 5 subscription options the layer applies at delivery (the router ignores them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubOpts {
    pub nolocal: bool,
    pub retain_as_published: bool,
    pub id: Option<usize>,
}

/// Publishes held back by the client's Receive Maximum, in order.
pub type Deferred<T> = VecDeque<T>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_reused_for_known_topics_and_replaced_round_robin() {
        let mut o = Outbound::new(None, None, Some(2));
        let (a, b, c) = (Bytes::from("a"), Bytes::from("b"), Bytes::from("c"));
        assert!(matches!(o.alias(&a), Aliased::New(1)));
        assert!(matches!(o.alias(&a), Aliased::Known(1)));
        assert!(matches!(o.alias(&b), Aliased::New(2)));
        assert!(matches!(o.alias(&c), Aliased::New(1)), "replaces the oldest");
        assert!(matches!(o.alias(&a), Aliased::New(2)));
        o.unalias(2);
        assert!(matches!(o.alias(&b), Aliased::New(1)));
        let mut none = Outbound::new(None, None, None);
        assert!(matches!(none.alias(&a), Aliased::None));
    }

    #[test]
    fn client_aliases_resolve_and_refuse_what_the_spec_refuses() {
        let mut i = InAliases::new(3);
        assert_eq!(i.resolve(Bytes::new(), 1), Err(AliasError::Unknown));
        assert_eq!(i.resolve("t".into(), 1), Ok(Bytes::from("t")));
        assert_eq!(i.resolve(Bytes::new(), 1), Ok(Bytes::from("t")));
        assert_eq!(i.resolve("t".into(), 0), Err(AliasError::Invalid));
        assert_eq!(i.resolve("t".into(), 4), Err(AliasError::Invalid));
    }

    #[test]
    fn inbound_counts_each_packet_id_once() {
        let mut i = Inbound::default();
        assert!(i.received(7, 2));
        assert!(i.received(7, 2), "a retransmission");
        assert!(i.received(8, 2));
        assert!(!i.received(9, 2));
        i.done(9);
        i.done(9);
        i.done(7);
        assert!(i.received(10, 2), "8 and 10 in flight");
        assert!(!i.received(11, 2));
    }
}
