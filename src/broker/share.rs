//! Shared subscriptions (`$share/<group>/<filter>`, MQTT 5 §4.8.2, also offered to 3.1.1
//! clients as EMQX and Mosquitto do), owned by the layer: rumqttd's own shared subscriptions
//! key a group by its name alone and panic the router when a persistent member leaves with
//! unacked messages (ARCHITECTURE, traps).
//!
//! Each group is one task with one router link subscribed to the filter at QoS 1. It takes
//! every message the router routes there, acks the router at once and hands the message to one
//! member connection: round robin over the connected members that have room in their window
//! (QoS 0 needs none). A QoS 1 delivery stays the group's until that member's client acks it;
//! when the member's connection ends first (or it unsubscribes), the message goes to another
//! member. The group lives while a session holds the subscription, connected or not (a
//! persistent session that is offline keeps it; messages wait for a connected member).
//!
//! Granted QoS is at most 1: a QoS 2 message goes out to a group at QoS 1.

use super::engine::{ConnMsg, Link};
use super::wire::{self, take_meta, Meta};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use parking_lot::Mutex;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, PublishProperties, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::Notification;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// While this many messages wait in a group (no member has room), the group stops reading
/// from the router, which then keeps the rest (bounded by its commitlog).
const MAX_WAITING: usize = 4096;

/// `$share/<group>/<filter>` split, or why it is not a valid shared subscription.
pub fn parse(path: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = path.strip_prefix("$share/")?;
    let Some((group, filter)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    let ok = !group.is_empty() && !group.contains(['+', '#']) && !filter.is_empty() && crate::topic::valid_filter(filter);
    Some(if ok { Ok((group, filter)) } else { Err(()) })
}

/// The group and filter of a shared subscription that gets a group (`$share/g/$SYS/#` does
/// not: nothing is routed to `$` topics, and it is granted like any `$` filter).
pub fn group(path: &str) -> Option<(&str, &str)> {
    parse(path)?.ok().filter(|(_, inner)| !inner.starts_with('$'))
}

/// The filter part of a shared subscription, or the filter itself: what topics it matches.
pub fn filter_part(path: &str) -> &str {
    match parse(path) {
        Some(Ok((_, inner))) => inner,
        _ => path,
    }
}

/// One message for one member connection.
pub struct Delivery {
    pub group: GroupRef,
    pub seq: u64,
    pub topic: Bytes,
    pub payload: Bytes,
    /// The QoS it was published at (at most 1: the group's subscription).
    pub qos: u8,
    pub props: Option<PublishProperties>,
    pub meta: Option<Meta>,
}

/// A member connection of a group.
pub struct Member {
    pub clientid: Arc<str>,
    /// The connection's id (`Engine::register`): a later connection of the client replaces it.
    pub conn: u64,
    pub qos: u8,
    /// QoS 1 deliveries it may have unacked at once.
    pub window: usize,
    pub tx: mpsc::UnboundedSender<ConnMsg>,
}

enum Cmd {
    Join(Member),
    /// The member's connection ended; its session (and membership) lives on.
    Offline {
        conn: u64,
    },
    /// The client's subscription ended (`conn` none: whichever connection holds it).
    Leave {
        clientid: Arc<str>,
        conn: Option<u64>,
    },
    Acked {
        seq: u64,
        conn: u64,
    },
}

/// A connection's handle on its group.
#[derive(Clone)]
pub struct GroupRef(mpsc::UnboundedSender<Cmd>);

impl GroupRef {
    pub fn same(&self, other: &GroupRef) -> bool {
        self.0.same_channel(&other.0)
    }
    /// The member's client acked delivery `seq` (or it counts as delivered: refused, too large).
    pub fn acked(&self, seq: u64, conn: u64) {
        let _ = self.0.send(Cmd::Acked { seq, conn });
    }
    pub fn offline(&self, conn: u64) {
        let _ = self.0.send(Cmd::Offline { conn });
    }
    pub fn leave(&self, clientid: &Arc<str>, conn: u64) {
        let _ = self.0.send(Cmd::Leave {
            clientid: clientid.clone(),
            conn: Some(conn),
        });
    }
}

type Groups = Arc<Mutex<HashMap<(Arc<str>, Arc<str>), GroupRef>>>;

/// Every shared subscription group of the broker.
#[derive(Default)]
pub struct Shares {
    groups: Groups,
    /// Groups started, for their router link names.
    started: std::sync::atomic::AtomicU64,
}

impl Shares {
    /// Adds (or updates) a member of `$share/<group>/<filter>`, starting the group with a new
    /// router link from `link` when it has none. The group's subscription reaches the router
    /// before this returns, so a message published after the member's SUBACK is routed to it.
    pub fn join(
        &self,
        group: &str,
        filter: &str,
        member: Member,
        metrics: &Arc<crate::metrics::Registry>,
        link: impl FnOnce(&str) -> Result<Link, String>,
    ) -> Result<GroupRef, String> {
        let key: (Arc<str>, Arc<str>) = (group.into(), filter.into());
        let member = match self.try_join(&key, member) {
            Ok(g) => return Ok(g),
            Err(m) => m,
        };
        // A new group: its link is built without the lock held (router round trips). Each
        // group's link has a name of its own: one starting `%S`, which no client id reaches
        // the router as (`wire::router_client_id` writes `%` only as `%25`, `%2B`, `%24`,
        // `%23` or `%2F`), so that a group started at the same time elsewhere takes nothing
        // over.
        let n = self.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (mut tx, rx, _) = link(&format!("%S{n}-{}", wire::router_client_id(&format!("{}/{}", key.0, key.1))))?;
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: key.1.to_string(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        };
        futures::executor::block_on(tx.send(Packet::Subscribe(subscribe, None))).map_err(|e| e.to_string())?;
        let mut groups = self.groups.lock();
        let running = groups.get(&key).cloned();
        let member = match running {
            Some(g) => match g.0.send(Cmd::Join(member)) {
                Ok(()) => {
                    // Another connection started the group meanwhile: this link goes.
                    drop(groups);
                    let _ = futures::executor::block_on(tx.send(Packet::Disconnect(
                        Disconnect {
                            reason_code: DisconnectReasonCode::NormalDisconnection,
                        },
                        None,
                    )));
                    return Ok(g);
                }
                Err(mpsc::error::SendError(Cmd::Join(m))) => m,
                Err(_) => unreachable!("sent a join"),
            },
            None => member,
        };
        Ok(self.spawn(&mut groups, key, tx, rx, member, metrics.clone()))
    }

    /// Joins the group if it runs; gives the member back if it does not.
    fn try_join(&self, key: &(Arc<str>, Arc<str>), member: Member) -> Result<GroupRef, Member> {
        let groups = self.groups.lock();
        let Some(g) = groups.get(key) else { return Err(member) };
        match g.0.send(Cmd::Join(member)) {
            Ok(()) => Ok(g.clone()),
            // The group task is gone (it ended, or panicked): a new one starts.
            Err(mpsc::error::SendError(Cmd::Join(m))) => Err(m),
            Err(_) => unreachable!("sent a join"),
        }
    }

    fn spawn(
        &self,
        groups: &mut HashMap<(Arc<str>, Arc<str>), GroupRef>,
        key: (Arc<str>, Arc<str>),
        tx: LinkTx,
        rx: LinkRx,
        member: Member,
        metrics: Arc<crate::metrics::Registry>,
    ) -> GroupRef {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let g = GroupRef(cmd_tx);
        let _ = g.0.send(Cmd::Join(member));
        groups.insert(key.clone(), g.clone());
        tokio::spawn(run(key, tx, rx, cmd_rx, g.clone(), self.groups.clone(), metrics));
        g
    }

    /// The session of `clientid` ended: it leaves every group.
    pub fn forget(&self, clientid: &str) {
        let clientid: Arc<str> = clientid.into();
        for g in self.groups.lock().values() {
            let _ = g.0.send(Cmd::Leave {
                clientid: clientid.clone(),
                conn: None,
            });
        }
    }
}

struct Waiting {
    seq: u64,
    topic: Bytes,
    payload: Bytes,
    qos: u8,
    props: Option<PublishProperties>,
    meta: Option<Meta>,
    at: Instant,
}

struct MemberState {
    m: Member,
    online: bool,
    unacked: usize,
}

#[derive(Default)]
struct State {
    /// The router log offset the group's next message should have: a jump means the group fell
    /// behind by more than the router keeps (its members were all slow or away).
    next_offset: Option<u64>,
    members: Vec<MemberState>,
    next: usize,
    waiting: VecDeque<Waiting>,
    /// QoS 1 deliveries awaiting their ack, by seq: the connection they went to.
    out: HashMap<u64, (u64, Waiting)>,
    next_seq: u64,
}

impl State {
    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Join(m) => match self.members.iter_mut().find(|s| s.m.clientid == m.clientid) {
                Some(s) => {
                    let old = s.m.conn;
                    s.m = m;
                    s.online = true;
                    let conn = s.m.conn;
                    s.unacked = self.out.values().filter(|(c, _)| *c == conn).count();
                    if old != conn {
                        self.requeue(old);
                    }
                }
                None => self.members.push(MemberState {
                    m,
                    online: true,
                    unacked: 0,
                }),
            },
            Cmd::Offline { conn } => {
                if let Some(s) = self.members.iter_mut().find(|s| s.m.conn == conn) {
                    s.online = false;
                }
                self.requeue(conn);
            }
            Cmd::Leave { clientid, conn } => {
                if let Some(i) = self
                    .members
                    .iter()
                    .position(|s| s.m.clientid == clientid && conn.is_none_or(|c| c == s.m.conn))
                {
                    let s = self.members.remove(i);
                    self.requeue(s.m.conn);
                }
            }
            Cmd::Acked { seq, conn } => {
                if self.out.get(&seq).is_some_and(|(c, _)| *c == conn) {
                    self.out.remove(&seq);
                    if let Some(s) = self.members.iter_mut().find(|s| s.m.conn == conn) {
                        s.unacked = s.unacked.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// What connection `conn` had unacked goes to the front of the queue, in order.
    fn requeue(&mut self, conn: u64) {
        let mut back: Vec<u64> = self.out.iter().filter(|(_, (c, _))| *c == conn).map(|(s, _)| *s).collect();
        if back.is_empty() {
            return;
        }
        back.sort_unstable();
        for seq in back.into_iter().rev() {
            if let Some((_, w)) = self.out.remove(&seq) {
                self.waiting.push_front(w);
            }
        }
        if let Some(s) = self.members.iter_mut().find(|s| s.m.conn == conn) {
            s.unacked = 0;
        }
    }

    fn forward(&mut self, mut f: rumqttd::Forward) -> u64 {
        let mut lost = 0;
        if let Some((_, offset)) = f.cursor {
            lost = self.next_offset.and_then(|e| offset.checked_sub(e)).unwrap_or(0);
            self.next_offset = Some(offset + 1);
        }
        let published = wire::take_published(&mut f.properties);
        let meta = take_meta(&mut f.properties);
        // Unmarked: published at QoS 1 or 2 (the router marks none; publishers mark QoS 0).
        let qos = published.map_or(1, |(q, _)| q.min(1));
        self.next_seq += 1;
        self.waiting.push_back(Waiting {
            seq: self.next_seq,
            topic: f.publish.topic,
            payload: f.publish.payload,
            qos,
            props: f.properties,
            meta,
            at: Instant::now(),
        });
        lost
    }

    /// Hands waiting messages to members, oldest first, while one has room.
    fn dispatch(&mut self, me: &GroupRef) {
        while let Some(w) = self.waiting.front() {
            // MQTT 5 message expiry: the time it waited here counts.
            let expiry = w.props.as_ref().and_then(|p| p.message_expiry_interval);
            let waited = w.at.elapsed().as_secs();
            if expiry.is_some_and(|e| u64::from(e) <= waited) {
                self.waiting.pop_front();
                continue;
            }
            let n = self.members.len();
            let qos = w.qos;
            let pick = (0..n).map(|k| (self.next + k) % n).find(|&i| {
                self.members[i].online && (qos == 0 || self.members[i].m.qos == 0 || self.members[i].unacked < self.members[i].m.window)
            });
            let Some(i) = pick else {
                if qos == 0 && !self.members.iter().any(|s| s.online) {
                    // QoS 0 with no member connected: nobody to give it to (MQTT 4.8.2).
                    self.waiting.pop_front();
                    continue;
                }
                return;
            };
            self.next = (i + 1) % n;
            let mut w = self.waiting.pop_front().expect("front checked");
            if let Some(e) = w.props.as_mut().and_then(|p| p.message_expiry_interval.as_mut()) {
                *e -= waited as u32;
            }
            let s = &mut self.members[i];
            let delivered = qos.min(s.m.qos);
            let d = Delivery {
                group: me.clone(),
                seq: w.seq,
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: delivered,
                props: w.props.clone(),
                meta: w.meta.clone(),
            };
            if s.m.tx.send(ConnMsg::Shared(Box::new(d))).is_err() {
                // The connection is gone and has not said so yet.
                s.online = false;
                self.waiting.push_front(w);
                continue;
            }
            if delivered > 0 {
                s.unacked += 1;
                w.at = Instant::now();
                self.out.insert(w.seq, (s.m.conn, w));
            }
        }
    }
}

async fn run(
    key: (Arc<str>, Arc<str>),
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    me: GroupRef,
    groups: Groups,
    metrics: Arc<crate::metrics::Registry>,
) {
    let mut st = State::default();
    let mut acks: Vec<Packet> = Vec::new();
    let mut scratch = BytesMut::new();
    loop {
        let mut wake = false;
        tokio::select! {
            c = cmds.recv() => match c {
                Some(c) => {
                    st.command(c);
                    while let Ok(c) = cmds.try_recv() {
                        st.command(c);
                    }
                }
                None => break,
            },
            n = rx.next(), if st.waiting.len() < MAX_WAITING => match n {
                Ok(Some(first)) => {
                    let mut next = Some(first);
                    while let Some(note) = next.take() {
                        match note {
                            Notification::Forward(f) => {
                                // Acked at once: the message is the group's from here on.
                                let (q, pkid) = wire::qos_pkid(&f.publish, &mut scratch);
                                if q > 0 {
                                    acks.push(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None));
                                }
                                // A retained message (the router sends them on a new
                                // subscription, whatever Retain Handling says) is not for a
                                // shared subscription (MQTT 4.8.2); only routed ones carry a
                                // log cursor.
                                if f.cursor.is_some() {
                                    let lost = st.forward(f);
                                    if lost > 0 {
                                        metrics.broker.router_lost.fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                                        tracing::warn!(group = %key.0, filter = %key.1, lost, "a shared subscription group fell behind by more than the router keeps of its filter (its members are slow or away): messages lost for it");
                                    }
                                }
                            }
                            Notification::Unschedule => wake = true,
                            _ => {}
                        }
                        if st.waiting.len() < MAX_WAITING {
                            next = rx.next().now_or_never().and_then(|r| r.ok().flatten());
                        }
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    tracing::error!(group = %key.0, filter = %key.1, "the router dropped a shared subscription's link");
                    // The next join starts the group again.
                    let mut g = groups.lock();
                    if g.get(&key).is_some_and(|r| r.same(&me)) {
                        g.remove(&key);
                    }
                    break;
                }
            },
        }
        st.dispatch(&me);
        if let Some(last) = acks.pop() {
            tx.buffer().extend(acks.drain(..));
            if tx.send(last).await.is_err() {
                break;
            }
        }
        if wake && rx.wake().await.is_err() {
            break;
        }
        if st.members.is_empty() {
            // The last session left: the group ends, unless a join came meanwhile (joins are
            // sent under the same lock).
            let mut g = groups.lock();
            let mut joined = false;
            while let Ok(c) = cmds.try_recv() {
                joined |= matches!(c, Cmd::Join(_));
                st.command(c);
            }
            if !joined || st.members.is_empty() {
                g.remove(&key);
                break;
            }
        }
    }
    let _ = tx
        .send(Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ))
        .await;
    tracing::debug!(group = %key.0, filter = %key.1, left = st.waiting.len() + st.out.len(), "shared subscription group ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_filters_parse_and_refuse_what_the_spec_refuses() {
        assert_eq!(parse("a/b"), None);
        assert_eq!(parse("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(parse("$share/g/#"), Some(Ok(("g", "#"))));
        for bad in ["$share/g", "$share//a", "$share/g+/a", "$share/g/", "$share/g/a/#/b", "$share/#/a"] {
            assert_eq!(parse(bad), Some(Err(())), "{bad}");
            assert_eq!(filter_part(bad), bad);
        }
        assert_eq!(group("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(group("$share/g/$SYS/#"), None);
        assert_eq!(filter_part("$share/g/$SYS/#"), "$SYS/#");
        assert_eq!(filter_part("a/b"), "a/b");
    }
}
