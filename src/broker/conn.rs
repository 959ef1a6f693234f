//! One task per client: decodes packets, raises hook events, feeds the client's rumqttd local
//! link, and writes the router's notifications back to the socket.
//!
//! The layer owns everything rumqttd's local links don't do (keepalive, wills, takeover
//! reporting, ping) and the things only it can do: carry msgids across the router in a user
//! property, hold PUBACKs until storage committed (no-loss), and inject stored messages into one
//! client before its subscription's live traffic, with packet ids outside the router's 1..=100.

use super::engine::{ConnMsg, Engine};
use super::flow::{AliasError, Aliased, Deferred, InAliases, Inbound, Outbound, SubOpts};
use super::share::{self, Delivery, GroupRef, Member};
use super::wire::{self, encode_meta, strip_meta, take_meta, Codec, Meta, META_KEY};
use crate::acl::{Access, ClientAcl};
use crate::hooks::Dispatcher;
use crate::model::Control;
use crate::model::{now_ms, Client, Event, Hook, Injection, Message, Outcome, Ticket};
use crate::ratelimit::RateLimited;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Packet, PingResp, PubAck, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule, Subscribe,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use rumqttd::{Forward, Notification};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Router packet ids are 1..=100; ours for injected messages start above.
const FIRST_INJECT_PKID: u16 = 101;
/// The next page of stored messages is read only while fewer injected messages than this are
/// unacked: with a page of `backends::PAGE` on top, what one client has in flight is bounded
/// (and far below the 65 435 packet ids injections can use).
const INJECT_WINDOW: usize = 256;
/// Shared subscription deliveries one member may have unacked (less if its Receive Maximum
/// says so): the rest of the group's messages go to members with room.
const SHARE_WINDOW: u16 = 32;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out waiting for CONNECT")]
    ConnectTimeout,
}

pub async fn serve(stream: TcpStream, peer: SocketAddr, engine: Arc<Engine>) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = run(stream, peer, engine).await {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

enum AckKind {
    PubAck,
    PubRec,
}

/// A router-numbered outgoing QoS>0 publish awaiting the client's ack.
struct RouterInflight {
    pkid: u16,
    /// Set once the client acked (or the layer suppressed the publish).
    ack: Option<AckKind>,
}

/// An injected publish awaiting the client's ack (packet ids ≥ 101, never seen by the router).
struct Injected {
    msgid: u64,
    topic: Arc<str>,
    /// A shared subscription's delivery: its group learns of the ack.
    share: Option<(GroupRef, u64)>,
}

/// A publish held back by the client's Receive Maximum.
struct Held {
    publish: Publish,
    props: Option<PublishProperties>,
    qos: u8,
    pkid: u16,
    injected: bool,
}

/// What became of a publish for the client.
#[derive(PartialEq, Eq)]
enum Sent {
    Now,
    Later,
    /// Not sent, handled as if delivered: larger than the client's Maximum Packet Size
    /// (MQTT-3.1.2-25), or not for this client (No Local, ACL, a copy already delivered).
    Dropped,
}

/// A PUBACK/PUBREC held until storage committed (no-loss mode).
#[derive(Default)]
struct HeldAck {
    committed: bool,
    /// Storage refused the message: a v5 publisher gets a failure reason code instead.
    failure: Option<Arc<str>>,
    router_ack: Option<Packet>,
}

/// The stored messages of one SUBSCRIBE's filters, from the task that reads them: a page per
/// request, read only when asked (nothing is read ahead), `(filter, granted QoS, page)`. The
/// task ends when every read is done, or when this is dropped (the client went away).
struct Feed {
    want: mpsc::Sender<()>,
    pages: mpsc::Receiver<(Arc<str>, u8, Vec<Injection>)>,
    /// A page was asked for and has not arrived yet.
    asked: bool,
}

/// A SUBSCRIBE sent to the router, in order; the router answers each with one SUBACK.
struct PendingSub {
    lookups: Option<Feed>,
    /// Codes the layer decided itself (refused filters, `$` filters the router cannot take),
    /// by position in the client's SUBSCRIBE: spliced into the router's SUBACK.
    local: Vec<(usize, SubscribeReasonCode)>,
}

struct Session {
    engine: Arc<Engine>,
    d: Arc<Dispatcher>,
    generation: u64,
    client: Arc<Client>,
    codec: Codec,
    tx: LinkTx,
    to_router: Vec<Packet>,
    /// Storage writes of the publishes in `to_router`, queued after them (see [`Session::flush`]).
    to_store: Vec<(Arc<Message>, Option<Arc<Ticket>>)>,
    wbuf: BytesMut,
    subs: HashMap<Arc<str>, u8>,
    /// Publishes carry their msgid across the router (`Dispatcher::needs_meta`); plain QoS 0
    /// ones only when `meta_qos0`.
    meta: bool,
    meta_qos0: bool,
    out_meta: Vec<Option<(Meta, Bytes)>>,
    router_inflight: VecDeque<RouterInflight>,
    injected: HashMap<u16, Injected>,
    next_pkid: u16,
    held: HashMap<u16, HeldAck>,
    /// Publishes awaiting their commit: packet id, and the message for the dead-letter file.
    tickets: HashMap<u64, (u16, Arc<Message>)>,
    next_seq: u64,
    done_tx: mpsc::UnboundedSender<(u64, Outcome)>,
    /// QoS 2 publishes refused by storage whose flow the layer ended with the router itself.
    swallow_pubcomp: HashSet<u16>,
    pending_subs: VecDeque<PendingSub>,
    /// Filters whose subscribe reads may still be opening (creating pointers); the receiver
    /// errs once they are open.
    lookups_running: Vec<(Arc<str>, watch::Receiver<()>)>,
    recent_injected: HashSet<u64>,
    will: Option<(rumqttd::protocol::LastWill, Option<rumqttd::protocol::LastWillProperties>)>,
    /// Seconds the session outlives the connection (u32::MAX: for ever, 0: ends with it).
    expiry: u32,
    /// The client's limits on what it is sent, and the publishes they hold back.
    out: Outbound,
    deferred: Deferred<Held>,
    /// QoS 2 forwards dropped as too large for the client: the router's PUBREL is answered here.
    swallow_pubrel: HashSet<u16>,
    in_aliases: InAliases,
    inbound: Inbound,
    /// Subscriptions with options that need per-message work (No Local, Retain As Published,
    /// an identifier), counted in `Engine::option_subs` while this connection lives.
    opts: HashMap<Arc<str>, SubOpts>,
    /// What this client may subscribe to, publish and receive (`acl.file`); none: anything.
    acl: Option<Arc<dyn ClientAcl>>,
    /// The highest QoS among this client's subscriptions: a forward of a message published at
    /// a lower QoS may need to go out lower than the router sends it.
    max_sub_qos: u8,
    /// This connection's QoS 2 subscriptions, as counted in `Engine::qos2_subs`.
    qos2_counted: usize,
    /// Router QoS 2 forwards sent to the client at QoS 1 (published at 1): its PUBACK
    /// completes them towards the router.
    downgraded: HashSet<u16>,
    /// QoS 2 publishes refused by the ACL to a 3.1.1 client: its PUBREL is answered here.
    refused_qos2: HashSet<u16>,
    /// Msgids delivered once, while overlapping subscriptions with identifiers make the router
    /// send a copy per subscription (one copy goes out, with every identifier).
    delivered_ids: HashSet<u64>,
    /// Per filter, the router log offset its next message should have (see `check_gap`).
    next_offset: HashMap<Arc<str>, u64>,
    /// SUBSCRIBE / UNSUBSCRIBE packets the router has not answered yet: until it has, a
    /// forward may come from a read that is ending or starting, and gaps are not judged.
    router_changes: usize,
    /// This connection's id in the engine (shared subscription groups tell connections apart).
    conn_id: u64,
    /// The shared subscriptions this connection is a member of, by their `$share/…` filter.
    shares: HashMap<Arc<str>, GroupRef>,
    /// This connection's own channel (`Engine::register`), for its shared subscription groups.
    share_tx: mpsc::UnboundedSender<ConnMsg>,
    share_window: usize,
    reason: &'static str,
    closing: bool,
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), ConnError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, stream.read_buf(buf)).await {
        Ok(Ok(0)) => Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ConnError::ConnectTimeout),
    }
}

async fn run(mut stream: TcpStream, peer: SocketAddr, engine: Arc<Engine>) -> Result<(), ConnError> {
    let max = engine.conf.max_packet_size;
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    let level = loop {
        match wire::connect_level(&rbuf) {
            Ok(Some(l)) => break l,
            Ok(None) => read_more(&mut stream, &mut rbuf).await?,
            Err(()) => return Err(ConnError::Protocol("first packet is not CONNECT".into())),
        }
    };
    let mut codec = match level {
        4 => Codec::V4(rumqttd::protocol::v4::V4),
        5 => Codec::V5(rumqttd::protocol::v5::V5),
        other => {
            // 3.1 (level 3) and unknown levels: "unacceptable protocol version".
            let mut b = BytesMut::new();
            let _ = Codec::V4(rumqttd::protocol::v4::V4).write(
                Packet::ConnAck(
                    ConnAck {
                        session_present: false,
                        code: ConnectReturnCode::RefusedProtocolVersion,
                    },
                    None,
                ),
                &mut b,
            );
            stream.write_all(&b).await?;
            return Err(ConnError::Protocol(format!("unsupported protocol level {other}")));
        }
    };
    let packet = loop {
        match codec.read(&mut rbuf, max) {
            Ok(p) => break p,
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => read_more(&mut stream, &mut rbuf).await?,
            Err(e) => return Err(ConnError::Protocol(e.to_string())),
        }
    };
    let Packet::Connect(connect, connect_props, will, will_props, login) = packet else {
        return Err(ConnError::Protocol("first packet is not CONNECT".into()));
    };
    // MQTT 1.5.4: a UTF-8 string never holds U+0000. rumqttd accepts it, and a database would
    // refuse it only after the client was acked (PostgreSQL text cannot hold it): refuse now.
    let will_topic_ok = will
        .as_ref()
        .is_none_or(|w| std::str::from_utf8(&w.topic).is_ok_and(crate::topic::valid_topic));
    let refusal = if connect.client_id.contains('\0') {
        Some((ConnectReturnCode::ClientIdentifierNotValid, "client id holds a NUL character"))
    } else if login.as_ref().is_some_and(|l| l.username.contains('\0')) {
        Some((ConnectReturnCode::BadUserNamePassword, "user name holds a NUL character"))
    } else if !will_topic_ok {
        Some((ConnectReturnCode::TopicNameInvalid, "invalid will topic"))
    } else if engine.metrics.broker.connections.load(std::sync::atomic::Ordering::Relaxed) as usize >= engine.conf.mqtt.max_connections {
        Some((
            if codec.is_v5() {
                ConnectReturnCode::QuotaExceeded
            } else {
                ConnectReturnCode::ServiceUnavailable
            },
            "mqtt.max_connections reached",
        ))
    } else if connect.client_id.is_empty() && !connect.clean_session && !codec.is_v5() {
        // MQTT-3.1.3-8 (3.1.1 only; MQTT 5 assigns an id whatever Clean Start says).
        Some((ConnectReturnCode::ClientIdentifierNotValid, "empty client id without clean session"))
    } else {
        None
    };
    if let Some((code, why)) = refusal {
        // v3.1.1 has no code for a bad will topic: the connection just closes (MQTT-3.1.4-1).
        if codec.is_v5() || code != ConnectReturnCode::TopicNameInvalid {
            let mut b = BytesMut::new();
            let _ = codec.write(
                Packet::ConnAck(
                    ConnAck {
                        session_present: false,
                        code,
                    },
                    None,
                ),
                &mut b,
            );
            stream.write_all(&b).await?;
        }
        return Err(ConnError::Protocol(why.into()));
    }
    let mut assigned = None;
    let clientid = if connect.client_id.is_empty() {
        let id = format!("mqtt-persist-{:x}", engine.msgids.next());
        assigned = Some(id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    let router_id = wire::router_client_id(&clientid);
    let clean = connect.clean_session;
    let limits = engine.conf.mqtt;
    // MQTT 5 clients asking for a longer keepalive are told the broker's (Server Keep Alive).
    let keep_alive = if codec.is_v5() {
        connect.keep_alive.min(limits.max_keepalive)
    } else {
        connect.keep_alive
    };
    // How long the session outlives the connection, in seconds (u32::MAX: for ever): MQTT 5
    // says so in CONNECT, 3.1.1 by clean session.
    let expiry = if codec.is_v5() {
        connect_props.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0)
    } else if clean {
        0
    } else {
        u32::MAX
    };
    let shared_id: Arc<str> = clientid.as_str().into();
    // This connection cancels a pending session end of the client id; one already under way
    // (the router link being taken over) is waited for, so it cannot take this one over.
    let mut arrival = 0;
    for _ in 0..1000 {
        if let Some(n) = engine.arrive(&clientid) {
            arrival = n;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    engine.note_takeover(&shared_id, !clean);
    let eng = engine.clone();
    let link = tokio::task::spawn_blocking(move || {
        if clean && expiry > 0 {
            // Clean Start with a session that outlives this connection: end the old session,
            // then open one the router keeps (a clean link would be forgotten at disconnect).
            eng.end_router_session(&router_id);
            eng.link(&router_id, false)
        } else {
            eng.link(&router_id, clean)
        }
    })
    .await
    .map_err(|e| ConnError::Protocol(e.to_string()))?;
    let (tx, mut rx, note) = link.map_err(|e| ConnError::Protocol(format!("router refused the link: {e}")))?;
    let session_present = match note {
        Notification::DeviceAck(ack) => matches!(Packet::from(ack), Packet::ConnAck(ConnAck { session_present: true, .. }, _)),
        _ => false,
    };
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let share_tx = ctl_tx.clone();
    let (conn_id, connected_at) = engine.register(&clientid, now_ms(), ctl_tx);
    if clean || expiry == 0 {
        // No session to continue: the read pointers of an earlier one go too, before any
        // subscription of this connection reads them.
        if let Some(done) = engine.dispatcher().discard_pointers(&shared_id) {
            engine.pointer_delete_queued(&shared_id, &Arc::from(""), done);
        }
    }
    let client = Arc::new(Client {
        clientid: clientid.as_str().into(),
        username: login.map(|l| Arc::from(l.username.as_str())).filter(|u: &Arc<str>| !u.is_empty()),
        peerhost: peer.ip().to_string(),
        peerport: peer.port(),
        proto_ver: level,
        keepalive: keep_alive,
        clean_start: clean,
        persistent: expiry > 0,
        connected_at,
    });
    let mut opts = HashMap::new();
    let mut offsets = HashMap::new();
    let subs = if clean {
        engine.shares.forget(&clientid);
        engine.sessions.lock().remove(&clientid);
        engine.session_opts.lock().remove(&clientid);
        engine.session_offsets.lock().remove(&clientid);
        HashMap::new()
    } else if session_present {
        engine
            .sessions
            .lock()
            .get(&clientid)
            .map(|s| s.iter().map(|(f, q)| (Arc::from(f.as_str()), *q)).collect())
            .inspect(|_: &HashMap<Arc<str>, u8>| {
                offsets = engine.session_offsets.lock().remove(&clientid).unwrap_or_default();
                opts = engine.session_opts.lock().get(&clientid).cloned().unwrap_or_default();
                engine.option_subs.fetch_add(opts.len(), std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap_or_default()
    } else {
        HashMap::new()
    };
    let subs_max = subs.values().copied().max().unwrap_or(0);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let generation = engine.generation();
    let d = engine.dispatcher();
    let mut s = Session {
        meta: d.needs_meta(),
        meta_qos0: d.needs_meta_qos0(),
        d,
        generation,
        engine: engine.clone(),
        client: client.clone(),
        codec: codec.clone(),
        tx,
        to_router: Vec::new(),
        to_store: Vec::new(),
        // Grows to what the traffic needs (an idle connection keeps next to nothing).
        wbuf: BytesMut::new(),
        subs,
        out_meta: Vec::new(),
        router_inflight: VecDeque::new(),
        injected: HashMap::new(),
        next_pkid: FIRST_INJECT_PKID,
        held: HashMap::new(),
        tickets: HashMap::new(),
        next_seq: 0,
        done_tx,
        swallow_pubcomp: HashSet::new(),
        pending_subs: VecDeque::new(),
        lookups_running: Vec::new(),
        recent_injected: HashSet::new(),
        will: will.map(|w| (w, will_props)),
        expiry,
        out: Outbound::new(
            connect_props.as_ref().and_then(|p| p.receive_maximum),
            connect_props.as_ref().and_then(|p| p.max_packet_size),
            connect_props.as_ref().and_then(|p| p.topic_alias_max).filter(|_| codec.is_v5()),
        ),
        deferred: Deferred::new(),
        swallow_pubrel: HashSet::new(),
        in_aliases: InAliases::new(limits.max_topic_alias),
        inbound: Inbound::default(),
        opts,
        acl: engine.authorizer().map(|a| a.for_client(&client)),
        refused_qos2: HashSet::new(),
        max_sub_qos: subs_max,
        qos2_counted: 0,
        downgraded: HashSet::new(),
        delivered_ids: HashSet::new(),
        conn_id,
        next_offset: offsets,
        router_changes: 0,
        shares: HashMap::new(),
        share_tx,
        share_window: usize::from(
            connect_props
                .as_ref()
                .and_then(|p| p.receive_maximum)
                .unwrap_or(u16::MAX)
                .clamp(1, SHARE_WINDOW),
        ),
        reason: "normal",
        closing: false,
    };
    s.sub_qos_changed();
    // A continued session is again a member of its shared subscriptions' groups.
    let kept: Vec<(Arc<str>, u8)> = s
        .subs
        .iter()
        .filter(|(f, _)| f.starts_with("$share/"))
        .map(|(f, q)| (f.clone(), *q))
        .collect();
    for (f, q) in kept {
        if let Some((g, inner)) = share::group(&f) {
            if let Err(e) = s.join_share(&f, g, inner, q) {
                tracing::warn!(clientid = %client.clientid, filter = %f, error = %e, "cannot rejoin a shared subscription");
            }
        }
    }
    let props = codec.is_v5().then(|| ConnAckProperties {
        assigned_client_identifier: assigned,
        receive_max: Some(limits.max_inflight),
        topic_alias_max: Some(limits.max_topic_alias).filter(|m| *m > 0),
        server_keep_alive: (connect.keep_alive > limits.max_keepalive).then_some(limits.max_keepalive),
        max_packet_size: u32::try_from(max).ok(),
        retain_available: Some(1),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        ..Default::default()
    });
    s.write(Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        props,
    ));
    stream.write_all(&s.wbuf).await?;
    s.wbuf.clear();
    engine.metrics.broker.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(clientid = %client.clientid, %peer, clean, session_present, "client connected");
    s.d.fire(&Event::Connected { client: client.clone() });
    if s.d.has_subscribe_lookup() {
        let d = s.d.clone();
        let c = client.clone();
        let eng = engine.clone();
        let cid = clientid.clone();
        tokio::spawn(async move {
            for (filter, qos) in d.subscribe_lookup(&c).await {
                eng.control(&cid, Control::Subscribe { filter, qos });
            }
        });
    }

    let keepalive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let far = Duration::from_secs(86_400 * 365);
    let idle = tokio::time::sleep(keepalive.unwrap_or(far));
    tokio::pin!(idle);
    let (mut reader, mut writer) = stream.into_split();
    // The stored messages being injected: the subscription's live traffic (the router link)
    // waits until the last page is written.
    let mut hold: Option<Feed> = None;
    let mut link_open = true;
    let mut need_wake = false;
    // Packets the client sent right behind its CONNECT, read with it: handled at once, not
    // when the client next sends something.
    let mut leftover = !rbuf.is_empty();
    let result: Result<(), ConnError> = loop {
        tokio::select! {
            _ = std::future::ready(()), if leftover => {
                leftover = false;
                if let Err(e) = s.read_packets(&mut rbuf).await {
                    s.reason = "protocol_error";
                    break Err(e);
                }
                if s.closing {
                    break Ok(());
                }
            }
            r = reader.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) => { s.reason = "sock_closed"; break Ok(()); }
                    Err(e) => { s.reason = "sock_error"; break Err(e.into()); }
                    Ok(_) => {}
                }
                if let Some(k) = keepalive {
                    idle.as_mut().reset(tokio::time::Instant::now() + k);
                }
                if rbuf.first().is_some_and(|b| b >> 4 == 3) {
                    // A PUBLISH: connections woken with this one go first (tokio runs the task
                    // woken last first), so a SUBSCRIBE another client sent just before it
                    // reaches the router first, as it would on a one-threaded broker.
                    tokio::task::yield_now().await;
                }
                if let Err(e) = s.read_packets(&mut rbuf).await {
                    s.reason = "protocol_error";
                    break Err(e);
                }
                if s.closing {
                    break Ok(());
                }
            }
            n = rx.next(), if hold.is_none() && link_open => {
                match n {
                    Ok(Some(first)) => {
                        let mut next = Some(first);
                        let mut count = 0;
                        while let Some(note) = next.take() {
                            match s.notification(note) {
                                Step::Continue => {}
                                Step::Wake => need_wake = true,
                                Step::Hold(h) => { hold = Some(h); break; }
                                Step::Close => { s.closing = true; break; }
                            }
                            count += 1;
                            if count < 512 {
                                next = rx.next().now_or_never().and_then(|r| r.ok().flatten());
                            }
                        }
                        if s.closing { break Ok(()); }
                    }
                    Ok(None) => {}
                    Err(_) => {
                        // The router dropped this link: another connection took the client id.
                        link_open = false;
                        s.reason = "takenover";
                        s.disconnect_v5(DisconnectReasonCode::SessionTakenOver);
                        break Ok(());
                    }
                }
            }
            page = async { hold.as_mut().expect("guarded").pages.recv().await }, if hold.as_ref().is_some_and(|f| f.asked) => {
                match page {
                    Some((filter, qos, page)) => {
                        if let Some(f) = hold.as_mut() {
                            f.asked = false;
                        }
                        // Unsubscribed meanwhile: the rest is not wanted (and stays stored).
                        if s.subs.contains_key(&filter) {
                            s.inject(qos, page);
                        }
                    }
                    None => hold = None,
                }
            }
            Some((seq, outcome)) = done_rx.recv() => {
                // A committed batch completes many tickets at once: answer them in one write.
                s.committed(seq, outcome);
                while let Ok((seq, outcome)) = done_rx.try_recv() {
                    s.committed(seq, outcome);
                }
                if s.closing { break Ok(()); }
            }
            Some(m) = ctl_rx.recv() => {
                match m {
                    ConnMsg::Control(cmd) => s.control(cmd),
                    ConnMsg::Shared(d) => s.shared(*d),
                }
                if s.closing { break Ok(()); }
            }
            _ = &mut idle => {
                s.reason = "keepalive_timeout";
                s.disconnect_v5(DisconnectReasonCode::KeepAliveTimeout);
                break Ok(());
            }
        }
        if let Some(f) = hold.as_mut() {
            s.ask_for_page(f);
        }
        if let Err(e) = s.flush().await {
            s.reason = "router_closed";
            break Err(e);
        }
        if !s.wbuf.is_empty() {
            if let Err(e) = writer.write_all(&s.wbuf).await {
                s.reason = "sock_error";
                break Err(e.into());
            }
            s.wbuf.clear();
        }
        if need_wake {
            need_wake = false;
            let _ = rx.wake().await;
        }
    };
    if !s.wbuf.is_empty() {
        let _ = writer.write_all(&s.wbuf).await;
    }
    let _ = writer.shutdown().await;
    let will = s.close(link_open).await;
    // A kept router session that ends with the connection (MQTT 5 expiry 0, Clean Start 0)
    // ends now, before the client id is free again: a reconnect waits for it.
    let ends_now =
        arrival > 0 && will.is_none() && s.expiry == 0 && !clean && s.reason != "takenover" && engine.begin_discard(&clientid, arrival);
    engine.unregister(&clientid, conn_id);
    if ends_now {
        if let Some(done) = s.d.discard_pointers(&s.client.clientid) {
            engine.pointer_delete_queued(&s.client.clientid, &Arc::from(""), done);
        }
        let eng = engine.clone();
        let (cid, rid) = (clientid.clone(), wire::router_client_id(&clientid));
        let _ = tokio::task::spawn_blocking(move || eng.discard_session(&cid, &rid)).await;
    }
    engine.leave(&clientid, arrival);
    if s.reason == "protocol_error" || s.reason == "quota_exceeded" {
        // The client may still be writing when the broker ends the connection (an MQTT 5
        // DISCONNECT with a reason is on its way): read on until it closes, briefly, so that it
        // reads that DISCONNECT instead of running into a reset.
        let mut sink = [0u8; 4096];
        let drain = async { while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
    // What outlives the connection: its session until it expires (for ever: nothing to do),
    // a delayed will. A session that ends with the connection ends now, unless the router
    // forgets it by itself (a clean link).
    let lingering = will.is_some() || (s.expiry != u32::MAX && s.expiry > 0);
    if lingering && s.reason != "takenover" && engine.depart(&s.client.clientid, conn_id) {
        tokio::spawn(departure(
            engine.clone(),
            s.d.clone(),
            s.client.clone(),
            conn_id,
            s.expiry,
            will,
            s.meta,
        ));
    }
    engine.metrics.broker.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    result
}

enum Step {
    Continue,
    Wake,
    Hold(Feed),
    Close,
}

impl Session {
    /// Tells an MQTT 5 client why the broker closes the connection (3.1.1 has no way to).
    fn disconnect_v5(&mut self, code: DisconnectReasonCode) {
        if self.codec.is_v5() {
            wire::disconnect_v5(code, &mut self.wbuf);
        }
    }

    fn write(&mut self, p: Packet) {
        if let Err(e) = self.codec.write(p, &mut self.wbuf) {
            tracing::warn!(clientid = %self.client.clientid, error = %e, "cannot encode packet");
        }
    }

    /// Sends everything queued for the router with one notification (trap 5).
    fn flush_router(&mut self) -> Result<(), ConnError> {
        let Some(last) = self.to_router.pop() else { return Ok(()) };
        {
            let mut buf = self.tx.buffer();
            buf.extend(self.to_router.drain(..));
        }
        futures::executor::block_on(self.tx.send(last))
            .map(|_| ())
            .map_err(|e| ConnError::Protocol(format!("router link closed: {e}")))
    }

    /// Routes what was read, then queues the storage writes of its publishes. In that order,
    /// subscribers get a message without waiting for the storage thread to wake up and take
    /// its share of the CPU first (it measurably cut publish→deliver p99 on 2 cores); the
    /// PUBACK still waits for the commit. Any other event of this client flushes first, so
    /// its writes keep the client's event order.
    async fn flush(&mut self) -> Result<(), ConnError> {
        self.flush_router()?;
        self.queue_stores().await;
        Ok(())
    }

    async fn queue_stores(&mut self) {
        if !self.to_store.is_empty() {
            let mut pending = std::mem::take(&mut self.to_store);
            for (msg, ticket) in pending.drain(..) {
                self.d.publish(&msg, ticket.as_ref()).await;
            }
            self.to_store = pending;
        }
    }

    /// After a reload, this connection's next events use the new rules.
    fn refresh_rules(&mut self) {
        let g = self.engine.generation();
        if g != self.generation {
            self.generation = g;
            self.d = self.engine.dispatcher();
            self.meta = self.d.needs_meta();
            self.meta_qos0 = self.d.needs_meta_qos0();
        }
    }

    async fn read_packets(&mut self, rbuf: &mut BytesMut) -> Result<(), ConnError> {
        self.refresh_rules();
        let max = self.engine.conf.max_packet_size;
        loop {
            let hdr = wire::peek_publish(rbuf);
            match self.codec.read(rbuf, max) {
                Ok(p) => self.incoming(p, hdr).await?,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e @ rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                    self.disconnect_v5(DisconnectReasonCode::PacketTooLarge);
                    return Err(ConnError::Protocol(e.to_string()));
                }
                Err(e) => return Err(ConnError::Protocol(e.to_string())),
            }
            if self.closing {
                return Ok(());
            }
        }
    }

    async fn incoming(&mut self, p: Packet, hdr: Option<(u8, u16)>) -> Result<(), ConnError> {
        if !self.to_store.is_empty() && !matches!(p, Packet::Publish(..)) {
            self.flush().await?;
        }
        match p {
            Packet::Publish(publish, props) => {
                let (qos, pkid) = hdr.unwrap_or((0, 0));
                self.publish(publish, props, qos, pkid).await?;
            }
            Packet::PubAck(ack, _) => {
                self.client_ack(ack.pkid, AckKind::PubAck);
                self.completed();
            }
            Packet::PubRec(rec, _) => {
                if self.injected.contains_key(&rec.pkid) {
                    self.write(Packet::PubRel(
                        PubRel {
                            pkid: rec.pkid,
                            reason: PubRelReason::Success,
                        },
                        None,
                    ));
                } else {
                    self.client_ack(rec.pkid, AckKind::PubRec);
                }
            }
            Packet::PubComp(comp, _) => {
                if let Some(inj) = self.injected.remove(&comp.pkid) {
                    self.injected_acked(inj);
                } else {
                    self.to_router.push(Packet::PubComp(comp, None));
                }
                self.completed();
            }
            Packet::PubRel(rel, _) if self.refused_qos2.remove(&rel.pkid) => {
                self.inbound.done(rel.pkid);
                self.write(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason: PubCompReason::Success,
                    },
                    None,
                ));
            }
            Packet::PubRel(rel, _) => self.to_router.push(Packet::PubRel(rel, None)),
            Packet::Subscribe(sub, props) => self.subscribe(sub, props),
            Packet::Unsubscribe(unsub, _) => self.unsubscribe(unsub).await,
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)),
            Packet::Disconnect(d, props) => {
                // 0x04: a normal end that still wants the will published.
                if d.reason_code != DisconnectReasonCode::DisconnectWithWillMessage {
                    self.will = None;
                }
                // MQTT-3.14.2-2: a session that ended with the connection cannot be revived.
                if let Some(e) = props.and_then(|p| p.session_expiry_interval) {
                    if self.expiry > 0 {
                        self.expiry = e;
                    }
                }
                self.reason = "normal";
                self.closing = true;
            }
            other => return Err(ConnError::Protocol(format!("unexpected packet {other:?}"))),
        }
        Ok(())
    }

    async fn publish(&mut self, mut publish: Publish, mut props: Option<PublishProperties>, qos: u8, pkid: u16) -> Result<(), ConnError> {
        // Only MQTT 5 clients were told the broker's Receive Maximum; 3.1.1 has none.
        if qos > 0 && self.codec.is_v5() && !self.inbound.received(pkid, self.engine.conf.mqtt.max_inflight) {
            self.disconnect_v5(DisconnectReasonCode::ReceiveMaximumExceeded);
            return Err(ConnError::Protocol("more unacknowledged publishes than the receive maximum".into()));
        }
        if props.as_ref().and_then(|p| p.payload_format_indicator).is_some_and(|v| v > 1) {
            self.disconnect_v5(DisconnectReasonCode::ProtocolError);
            return Err(ConnError::Protocol("payload format indicator other than 0 or 1".into()));
        }
        let published_retain = publish.retain;
        if let Some(alias) = props.as_mut().and_then(|p| p.topic_alias.take()) {
            match self.in_aliases.resolve(std::mem::take(&mut publish.topic), alias) {
                Ok(t) => publish.topic = t,
                Err(e) => {
                    let code = match e {
                        AliasError::Invalid => DisconnectReasonCode::TopicAliasInvalid,
                        AliasError::Unknown => DisconnectReasonCode::ProtocolError,
                    };
                    self.disconnect_v5(code);
                    return Err(ConnError::Protocol(format!("topic alias {alias}: {e:?}")));
                }
            }
            if props.as_ref().is_some_and(|p| *p == PublishProperties::default()) {
                props = None;
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Err(ConnError::Protocol("topic is not UTF-8".into()));
        };
        if !crate::topic::valid_topic(topic) {
            self.disconnect_v5(DisconnectReasonCode::TopicNameInvalid);
            return Err(ConnError::Protocol(format!("invalid topic name {topic:?}")));
        }
        strip_meta(&mut props);
        if self.acl.as_ref().is_some_and(|a| !a.allows(Access::Write, topic, false)) {
            self.refuse_publish(topic.to_string(), qos, pkid);
            return Ok(());
        }
        self.engine
            .metrics
            .broker
            .messages_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A plain QoS 0 message that no rule writes and nothing reads the msgid of costs no
        // msgid, no allocation and no dispatch.
        let has_rules = self.d.writes_publish(qos, publish.retain);
        let meta =
            (if qos > 0 { self.meta } else { self.meta_qos0 }) || self.engine.option_subs.load(std::sync::atomic::Ordering::Relaxed) > 0;
        if has_rules || meta {
            let msg = Arc::new(Message {
                msgid: self.engine.msgids.next(),
                sender: self.client.clientid.clone(),
                username: self.client.username.clone(),
                topic: topic.into(),
                payload: publish.payload.clone(),
                qos,
                retain: publish.retain,
                timestamp: now_ms(),
                props: stored_props(&props),
            });
            if has_rules {
                if qos > 0 && self.d.no_loss() {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.held.insert(pkid, HeldAck::default());
                    self.tickets.insert(seq, (pkid, msg.clone()));
                    let ticket = Ticket::new(seq, self.done_tx.clone());
                    self.to_store.push((msg.clone(), Some(ticket)));
                } else {
                    self.to_store.push((msg.clone(), None));
                }
                if publish.retain && self.d.retain_in_db(topic) {
                    publish.retain = false;
                }
            }
            if meta {
                props.get_or_insert_with(Default::default).user_properties.push(encode_meta(&msg));
            }
        }
        // Only a message that may have to go out below the router's QoS, or with its retain
        // flag, needs the mark: QoS 0 (to any QoS 1/2 subscriber), QoS 1 while someone
        // subscribes at QoS 2, and retained ones (Retain As Published).
        if qos == 0 || published_retain || (qos == 1 && self.engine.qos2_subs.load(std::sync::atomic::Ordering::Relaxed) > 0) {
            wire::mark_published(&mut props, qos, published_retain);
        }
        self.to_router.push(Packet::Publish(publish, props));
        Ok(())
    }

    /// A publish the ACL does not allow: MQTT 5 learns it from the ack (0x87), 3.1.1 gets a
    /// normal ack (it has no negative one); the message goes nowhere.
    fn refuse_publish(&mut self, topic: String, qos: u8, pkid: u16) {
        static DENIED: RateLimited = RateLimited::new();
        DENIED.warn(|| format!("{}: publish to {topic:?} not authorized", self.client.clientid));
        let v5 = self.codec.is_v5();
        match qos {
            1 => {
                self.inbound.done(pkid);
                let reason = if v5 { PubAckReason::NotAuthorized } else { PubAckReason::Success };
                self.write(Packet::PubAck(PubAck { pkid, reason }, None));
            }
            2 if v5 => {
                self.inbound.done(pkid);
                self.write(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::NotAuthorized,
                    },
                    None,
                ));
            }
            2 => {
                self.refused_qos2.insert(pkid);
                self.write(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ));
            }
            _ => {}
        }
    }

    /// Storage finished with the publish of this ticket: committed, or refused.
    fn committed(&mut self, seq: u64, outcome: Outcome) {
        let Some((pkid, msg)) = self.tickets.remove(&seq) else { return };
        let failure = match outcome {
            Ok(()) => None,
            Err(reason) if self.codec.is_v5() => Some(reason),
            Err(reason) => {
                // MQTT 3.1.1 has no negative ack: the message is kept before it is acked.
                let mut rec = serde_json::Map::new();
                rec.insert("message".into(), serde_json::to_value(&*msg).unwrap_or_default());
                if self.engine.dead_letter.record(&reason, rec).is_err() {
                    // Kept nowhere: no ack. The client sends it again when it reconnects.
                    self.held.remove(&pkid);
                    self.reason = "storage_failed";
                    self.closing = true;
                    return;
                }
                None
            }
        };
        if let Some(h) = self.held.get_mut(&pkid) {
            h.committed = true;
            h.failure = failure;
            if h.router_ack.is_some() {
                if let Some(h) = self.held.remove(&pkid) {
                    self.release_held(pkid, h);
                }
            }
        }
    }

    /// Sends a held publisher ack once both the router and storage are done with the message:
    /// the router's own ack, or (v5, storage refused it) one with reason code 0x80.
    fn release_held(&mut self, pkid: u16, h: HeldAck) {
        let Some(ack) = h.router_ack else { return };
        if h.failure.is_some() || matches!(ack, Packet::PubAck(..)) {
            self.inbound.done(pkid);
        }
        match (h.failure, ack) {
            (Some(_), Packet::PubAck(..)) => self.write(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::UnspecifiedError,
                },
                None,
            )),
            (Some(_), Packet::PubRec(..)) => {
                self.write(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::UnspecifiedError,
                    },
                    None,
                ));
                // A failed PUBREC ends the exchange for the client; the router still holds
                // the publish until a PUBREL, which the layer sends itself.
                self.to_router.push(Packet::PubRel(
                    PubRel {
                        pkid,
                        reason: PubRelReason::Success,
                    },
                    None,
                ));
                self.swallow_pubcomp.insert(pkid);
            }
            (_, ack) => self.write(ack),
        }
    }

    fn client_ack(&mut self, pkid: u16, kind: AckKind) {
        if let Some(inj) = self.injected.remove(&pkid) {
            self.injected_acked(inj);
            return;
        }
        if pkid == 0 || pkid > 100 {
            return;
        }
        if let Some((meta, topic)) = self.out_meta.get_mut(pkid as usize).and_then(Option::take) {
            if let Ok(t) = std::str::from_utf8(&topic) {
                self.fire_acked(meta.msgid, t.into());
            }
        }
        // Sent at QoS 1 for a router QoS 2 flow: the PUBACK completes it towards the router.
        let kind = if matches!(kind, AckKind::PubAck) && !self.downgraded.is_empty() && self.downgraded.remove(&pkid) {
            self.swallow_pubrel.insert(pkid);
            AckKind::PubRec
        } else {
            kind
        };
        if let Some(e) = self.router_inflight.iter_mut().find(|e| e.pkid == pkid && e.ack.is_none()) {
            e.ack = Some(kind);
        }
        self.release_router_acks();
    }

    /// The router requires acks in its send order: release the acked prefix.
    fn release_router_acks(&mut self) {
        while self.router_inflight.front().is_some_and(|e| e.ack.is_some()) {
            let e = self.router_inflight.pop_front().expect("checked");
            let p = match e.ack {
                Some(AckKind::PubRec) => Packet::PubRec(
                    PubRec {
                        pkid: e.pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ),
                _ => Packet::PubAck(
                    PubAck {
                        pkid: e.pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ),
            };
            self.to_router.push(p);
        }
    }

    /// An injected publish is done with: acked by the client, or counted as delivered.
    fn injected_acked(&self, inj: Injected) {
        if let Some((g, seq)) = &inj.share {
            g.acked(*seq, self.conn_id);
        }
        self.fire_acked(inj.msgid, inj.topic);
    }

    fn fire_acked(&self, msgid: u64, topic: Arc<str>) {
        if !self.d.has(Hook::MessageAcked) {
            return;
        }
        let filters: Arc<[Arc<str>]> = self
            .subs
            .keys()
            .filter(|f| crate::topic::matches(&topic, share::filter_part(f)))
            .cloned()
            .collect();
        self.d.fire(&Event::Acked {
            client: self.client.clone(),
            msgid,
            topic,
            filters,
        });
    }

    fn subscribe(&mut self, mut sub: Subscribe, props: Option<rumqttd::protocol::SubscribeProperties>) {
        let v5 = self.codec.is_v5();
        let limits = self.engine.conf.mqtt;
        let id = props.as_ref().and_then(|p| p.id).filter(|_| v5);
        let mut new = Vec::new();
        let mut shared_new = Vec::new();
        let mut local = Vec::new();
        let mut routed = Vec::with_capacity(sub.filters.len());
        for (i, f) in std::mem::take(&mut sub.filters).into_iter().enumerate() {
            let path = f.path.as_str();
            let shared = share::parse(path);
            // A shared subscription's topic rules apply to its filter part.
            let inner = share::filter_part(path);
            if shared.is_some() && f.nolocal && v5 {
                // MQTT-3.8.3-4: No Local on a shared subscription is a Protocol Error.
                self.reason = "protocol_error";
                self.disconnect_v5(DisconnectReasonCode::ProtocolError);
                self.closing = true;
                return;
            }
            let refused = if shared == Some(Err(()))
                || !crate::topic::valid_filter(path)
                || path.len() > limits.max_topic_length
                || path.split('/').count() > limits.max_topic_levels
            {
                Some(SubscribeReasonCode::TopicFilterInvalid)
            } else if self.acl.as_ref().is_some_and(|a| !a.allows(Access::Read, inner, true)) {
                Some(SubscribeReasonCode::NotAuthorized)
            } else if limits.max_subscriptions > 0 && !self.subs.contains_key(path) && self.subs.len() >= limits.max_subscriptions {
                Some(SubscribeReasonCode::QuotaExceeded)
            } else {
                None
            };
            if let Some(code) = refused {
                local.push((i, if v5 { code } else { SubscribeReasonCode::Failure }));
                continue;
            }
            let q = f.qos as u8;
            let filter: Arc<str> = path.into();
            if let Some((group, inner)) = share::group(path) {
                // Granted at most QoS 1 (the group's own subscription); no retained messages
                // and no stored fetch for a shared subscription (MQTT 4.8.2).
                let q = q.min(1);
                let code = match self.join_share(&filter, group, inner, q) {
                    Ok(()) => {
                        self.subs.insert(filter.clone(), q);
                        shared_new.push((filter, q));
                        SubscribeReasonCode::Success(if q == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce })
                    }
                    Err(e) => {
                        tracing::warn!(clientid = %self.client.clientid, %filter, error = %e, "cannot join a shared subscription");
                        SubscribeReasonCode::Unspecified
                    }
                };
                local.push((i, if v5 { code } else { v4_code(code) }));
                continue;
            }
            let is_new = self.subs.insert(filter.clone(), q).is_none();
            // The router may start a repeated subscription's reads anew.
            self.next_offset.remove(&filter);
            // Retain Handling: 0 = on every subscribe, 1 = only a new one, 2 = never.
            let retained = match f.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => true,
                RetainForwardRule::OnNewSubscribe => is_new,
                RetainForwardRule::Never => false,
            };
            let o = SubOpts {
                nolocal: f.nolocal && v5,
                retain_as_published: f.preserve_retain && v5,
                id,
            };
            self.set_opts(&filter, o);
            new.push((filter, q, is_new, retained));
            if path.starts_with('$') {
                // The router disconnects on `$` filters (other than shared ones); nothing it
                // routes could match them anyway (MQTT-4.7.2-1): granted here, not routed.
                local.push((i, SubscribeReasonCode::Success(f.qos)));
            } else {
                routed.push(f);
            }
        }
        let routed_any = !routed.is_empty();
        let pkid = sub.pkid;
        let mut local = Some(local);
        if routed_any {
            // To the router at once, before the hooks and reads below: a publish another
            // client sends right after this SUBSCRIBE must find the subscription there.
            sub.filters = routed;
            self.pending_subs.push_back(PendingSub {
                lookups: None,
                local: local.take().unwrap_or_default(),
            });
            self.to_router.push(Packet::Subscribe(sub, props));
            self.router_changes += 1;
            let _ = self.flush_router();
        }
        self.sub_qos_changed();
        self.sync_session();
        // The hook's writes are queued now, before anything this client sends next (an
        // UNSUBSCRIBE in the same read must not overtake them); only the reads run apart.
        for (filter, qos) in shared_new.iter().map(|(f, q)| (f, q)).chain(new.iter().map(|(f, q, _, _)| (f, q))) {
            self.d.fire(&Event::Subscribed {
                client: self.client.clone(),
                filter: filter.clone(),
                qos: *qos,
            });
        }
        let lookups = self.d.has(Hook::SessionSubscribed).then(|| {
            let d = self.d.clone();
            let client = self.client.clone();
            let (running, done) = watch::channel(());
            self.lookups_running.retain(|(_, r)| r.has_changed().is_ok());
            self.lookups_running
                .extend(new.iter().map(|(f, _, _, _)| (f.clone(), done.clone())));
            // An unsubscribe of the same filter whose pointer delete is still queued (this
            // connection's, or a taken-over one's) must land before the fetch reads the pointer.
            let pending: Vec<_> = new
                .iter()
                .map(|(f, _, _, _)| self.engine.pointer_deletes_of(&self.client.clientid, f))
                .collect();
            let (want, mut asked) = mpsc::channel(1);
            let (page_tx, pages) = mpsc::channel(1);
            tokio::spawn(async move {
                // Opening creates the pointers: done before an unsubscribe may delete them.
                let mut opened = Vec::new();
                for ((filter, qos, is_new, retained), pending) in new.into_iter().zip(pending) {
                    opened.push((qos, d.subscribed_after(&client, &filter, qos, is_new, retained, pending).await));
                }
                drop(running);
                let mut opened = opened.into_iter();
                let mut current = opened.next();
                while asked.recv().await.is_some() {
                    let page = loop {
                        let Some((qos, reads)) = current.as_mut() else { return };
                        match d.next_page(reads).await {
                            Some(page) => break (reads.filter().clone(), *qos, page),
                            None => current = opened.next(),
                        }
                    };
                    if page_tx.send(page).await.is_err() {
                        return;
                    }
                }
            });
            Feed { want, pages, asked: false }
        });
        if routed_any {
            // The router's SUBACK is read by this task, after this call: the reads are in place.
            if let Some(p) = self.pending_subs.back_mut() {
                p.lookups = lookups;
            }
            return;
        }
        // Nothing for the router: the SUBACK is the layer's alone.
        if pkid != 0 {
            let codes = local.unwrap_or_default().into_iter().map(|(_, c)| c).collect();
            self.write_suback(pkid, codes);
        }
        // No stored reads either: refused filters have none, and `$` topics are not fetched for
        // `$` filters (dropping the feed ends its task).
        drop(lookups);
    }

    /// After this client's subscriptions changed: its highest QoS, and its QoS 2 subscriptions
    /// in the engine's count (publishers at QoS 1 mark their QoS while there are any).
    fn sub_qos_changed(&mut self) {
        self.max_sub_qos = self.subs.values().copied().max().unwrap_or(0);
        let q2 = self.subs.values().filter(|q| **q == 2).count();
        let c = &self.engine.qos2_subs;
        if q2 > self.qos2_counted {
            c.fetch_add(q2 - self.qos2_counted, std::sync::atomic::Ordering::Relaxed);
        } else {
            c.fetch_sub(self.qos2_counted - q2, std::sync::atomic::Ordering::Relaxed);
        }
        self.qos2_counted = q2;
    }

    /// Records the options of a subscription (replacing earlier ones of the same filter).
    fn set_opts(&mut self, filter: &Arc<str>, o: SubOpts) {
        use std::sync::atomic::Ordering::Relaxed;
        let plain = o == SubOpts::default();
        let had = if plain {
            self.opts.remove(filter).is_some()
        } else {
            self.opts.insert(filter.clone(), o).is_some()
        };
        match (had, plain) {
            (false, false) => {
                self.engine.option_subs.fetch_add(1, Relaxed);
            }
            (true, true) => {
                self.engine.option_subs.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
    }

    /// The SUBACK for a SUBSCRIBE whose filters were all decided by the layer.
    fn write_suback(&mut self, pkid: u16, codes: Vec<SubscribeReasonCode>) {
        let v5 = self.codec.is_v5();
        let return_codes = codes.into_iter().map(|c| if v5 { c } else { v4_code(c) }).collect();
        self.write(Packet::SubAck(rumqttd::protocol::SubAck { pkid, return_codes }, None));
    }

    async fn unsubscribe(&mut self, unsub: Unsubscribe) {
        let mut reasons = Vec::new();
        for f in &unsub.filters {
            // The subscribe's reads may still create this filter's read pointer: its delete
            // must come after (bounded by fetch_timeout per read; rare: same filter, same ms).
            for (_, done) in self.lookups_running.iter_mut().filter(|(g, _)| **g == **f) {
                let _ = done.changed().await;
            }
            let existed = self.drop_subscription(f);
            reasons.push(if existed {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
            self.fire_unsubscribed(f.as_str().into());
        }
        self.sub_qos_changed();
        self.sync_session();
        if !self.codec.is_v5() {
            reasons.clear();
        }
        self.write(Packet::UnsubAck(UnsubAck { pkid: unsub.pkid, reasons }, None));
    }

    /// Ends this client's subscription of `filter` (an UNSUBSCRIBE, or a server-side one):
    /// its options and gap baseline go, a shared one leaves its group, a routed one leaves the
    /// router. False when there was none.
    fn drop_subscription(&mut self, filter: &str) -> bool {
        let existed = self.subs.remove(filter).is_some();
        self.next_offset.remove(filter);
        self.set_opts(&Arc::from(filter), SubOpts::default());
        if let Some(g) = self.shares.remove(filter) {
            g.leave(&self.client.clientid, self.conn_id);
        } else if existed && !filter.starts_with('$') {
            // One filter per router packet: the router acks each filter separately, and not
            // at all for unknown ones; the client gets our own UNSUBACK.
            self.router_changes += 1;
            self.to_router.push(Packet::Unsubscribe(
                Unsubscribe {
                    pkid: 0,
                    filters: vec![filter.to_string()],
                },
                None,
            ));
        }
        existed
    }

    /// `session.unsubscribed`, remembering its queued writes (the pointer delete) so that a
    /// later subscription of the filter reads the pointer only after them.
    fn fire_unsubscribed(&self, filter: Arc<str>) {
        if !self.d.has(Hook::SessionUnsubscribed) {
            return;
        }
        let (ticket, done) = Ticket::watched();
        self.d.fire_with(
            &Event::Unsubscribed {
                client: self.client.clone(),
                filter: filter.clone(),
            },
            Some(&ticket),
        );
        drop(ticket);
        self.engine.pointer_delete_queued(&self.client.clientid, &filter, done);
    }

    fn sync_session(&self) {
        if self.expiry > 0 {
            let subs = self.subs.iter().map(|(f, q)| (f.to_string(), *q)).collect();
            self.engine.sessions.lock().insert(self.client.clientid.to_string(), subs);
            let mut opts = self.engine.session_opts.lock();
            if self.opts.is_empty() {
                opts.remove(&*self.client.clientid);
            } else {
                opts.insert(self.client.clientid.to_string(), self.opts.clone());
            }
        }
    }

    fn notification(&mut self, n: Notification) -> Step {
        match n {
            Notification::Forward(f) => {
                self.forward(f);
                Step::Continue
            }
            Notification::DeviceAck(ack) => match Packet::from(ack) {
                Packet::SubAck(suback, p) => {
                    self.router_change_done();
                    let mut pending = self.pending_subs.pop_front();
                    if suback.pkid != 0 {
                        let mut suback = suback;
                        // The layer's own codes go back where their filters were.
                        for (i, c) in pending.as_mut().map(|p| std::mem::take(&mut p.local)).unwrap_or_default() {
                            let i = i.min(suback.return_codes.len());
                            suback.return_codes.insert(i, c);
                        }
                        // The router grants what was asked; a v4 client needs the plain codes.
                        if !self.codec.is_v5() {
                            suback.return_codes = suback.return_codes.into_iter().map(v4_code).collect();
                        }
                        self.write(Packet::SubAck(suback, p.filter(|_| self.codec.is_v5())));
                    }
                    match pending.and_then(|p| p.lookups) {
                        Some(h) => Step::Hold(h),
                        None => Step::Continue,
                    }
                }
                Packet::UnsubAck(..) => {
                    self.router_change_done();
                    Step::Continue
                }
                Packet::PingResp(_) | Packet::ConnAck(..) => Step::Continue,
                Packet::PubComp(c, _) if self.swallow_pubcomp.remove(&c.pkid) => Step::Continue,
                Packet::PubComp(c, _) => {
                    self.inbound.done(c.pkid);
                    self.write(Packet::PubComp(c, None));
                    Step::Continue
                }
                Packet::PubRel(r, _) if self.swallow_pubrel.remove(&r.pkid) => {
                    // The client never got this publish (too large): complete it for the router.
                    self.to_router.push(Packet::PubComp(
                        PubComp {
                            pkid: r.pkid,
                            reason: PubCompReason::Success,
                        },
                        None,
                    ));
                    Step::Continue
                }
                Packet::PubAck(ack, _) => {
                    self.publisher_ack(ack.pkid, Packet::PubAck(ack, None));
                    Step::Continue
                }
                Packet::PubRec(rec, _) => {
                    self.publisher_ack(rec.pkid, Packet::PubRec(rec, None));
                    Step::Continue
                }
                other => {
                    let other = if self.codec.is_v5() { other } else { strip_props(other) };
                    self.write(other);
                    Step::Continue
                }
            },
            Notification::Unschedule => Step::Wake,
            Notification::Disconnect(d, _) => {
                self.reason = "router_disconnect";
                self.disconnect_v5(d.reason_code);
                Step::Close
            }
            _ => Step::Continue,
        }
    }

    /// The router acked a client's publish: pass it on, or hold it until storage committed.
    fn publisher_ack(&mut self, pkid: u16, ack: Packet) {
        match self.held.get_mut(&pkid) {
            Some(h) if h.committed => {
                if let Some(mut h) = self.held.remove(&pkid) {
                    h.router_ack = Some(ack);
                    self.release_held(pkid, h);
                }
            }
            Some(h) => h.router_ack = Some(ack),
            None => {
                if matches!(ack, Packet::PubAck(..)) {
                    self.inbound.done(pkid);
                }
                self.write(ack)
            }
        }
    }

    fn forward(&mut self, mut f: Forward) {
        if let Some((_, offset)) = f.cursor {
            self.check_gap(&f.publish.topic, offset);
        }
        let published = wire::take_published(&mut f.properties);
        // Always taken off, even when this connection's rules do not read it (a publisher on
        // another rule generation may have added it).
        let meta = take_meta(&mut f.properties).filter(|_| self.meta || !self.opts.is_empty());
        let published_retain = published.is_some_and(|(_, r)| r);
        let denied = self
            .acl
            .as_ref()
            .is_some_and(|a| std::str::from_utf8(&f.publish.topic).is_ok_and(|t| !a.allows(Access::Read, t, false)));
        let skip = denied || (!self.opts.is_empty() && meta.as_ref().is_some_and(|m| self.apply_options(m, published_retain, &mut f)));
        if !self.codec.is_v5() {
            f.properties = None;
        }
        self.engine
            .metrics
            .broker
            .messages_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let duplicate = meta.as_ref().is_some_and(|m| self.recent_injected.contains(&m.msgid));
        let topic = f.publish.topic.clone();
        let payload = f.publish.payload.clone();
        let downgrade = published.filter(|(q, _)| *q < self.max_sub_qos);
        // The router's QoS and packet id, wanted only off the plain path.
        let (rq, rpkid) = if skip || duplicate || downgrade.is_some() {
            self.qos_pkid(&f.publish)
        } else {
            (0, 0)
        };
        let (qos, pkid, sent) = if skip {
            // Not for this client after all (No Local, ACL, or a copy already delivered).
            (rq, rpkid, Some(Sent::Dropped))
        } else if duplicate {
            let (qos, pkid) = (rq, rpkid);
            if qos == 2 {
                let (qos, pkid, sent) = self.send_publish(f.publish, f.properties, false);
                (qos, pkid, Some(sent))
            } else {
                (qos, pkid, None)
            }
        } else if let Some((pq, _)) = downgrade {
            // Maybe published below the subscription's QoS: delivered at the published one
            // (MQTT-3.8.4-8), the router's flow completed here.
            let pkid = rpkid;
            if pq >= rq {
                let (qos, pkid, sent) = self.send_publish(f.publish, f.properties, false);
                (qos, pkid, Some(sent))
            } else if pq == 0 {
                let p = Publish::new(f.publish.topic.clone(), f.publish.payload.clone(), f.publish.retain);
                let _ = self.send_publish(p, f.properties, false);
                self.router_inflight.push_back(RouterInflight {
                    pkid,
                    ack: Some(if rq == 2 { AckKind::PubRec } else { AckKind::PubAck }),
                });
                if rq == 2 {
                    self.swallow_pubrel.insert(pkid);
                }
                self.release_router_acks();
                self.fire_delivered(meta, topic, payload, 0);
                return;
            } else {
                let p = wire::build_publish(&f.publish.topic, &f.publish.payload, 1, f.publish.retain, pkid);
                self.downgraded.insert(pkid);
                let (_, _, sent) = self.send_publish(p, f.properties, false);
                (rq, pkid, Some(sent))
            }
        } else {
            let (qos, pkid, sent) = self.send_publish(f.publish, f.properties, false);
            (qos, pkid, Some(sent))
        };
        if sent.is_none() {
            // Already delivered from storage just before this live copy: drop it, and ack the
            // router ourselves when it expects an ack.
            if qos == 1 {
                self.router_inflight.push_back(RouterInflight {
                    pkid,
                    ack: Some(AckKind::PubAck),
                });
                self.release_router_acks();
            }
            return;
        }
        if qos > 0 {
            self.router_inflight.push_back(RouterInflight { pkid, ack: None });
            if meta.is_some() && self.out_meta.is_empty() {
                // Sized on first use: an idle connection keeps nothing of it.
                self.out_meta.resize(101, None);
            }
            if let (Some(m), Some(slot)) = (&meta, self.out_meta.get_mut(pkid as usize)) {
                *slot = Some((m.clone(), topic.clone()));
            }
            if sent == Some(Sent::Dropped) {
                self.dropped_publish(qos, pkid, false);
            }
        }
        self.fire_delivered(meta, topic, payload, qos);
    }

    /// The router reads each filter's log in order, one offset after the other, unless this
    /// subscriber fell behind by more than it keeps: it then jumps ahead and the messages in
    /// between are lost for this client. Counted; a client promised QoS 1/2 on that filter is
    /// disconnected (MQTT 5: 0x97) rather than left to miss them silently. Told apart only
    /// where one of the client's filters matches the topic.
    fn check_gap(&mut self, topic: &[u8], offset: u64) {
        if self.router_changes > 0 {
            return;
        }
        let Ok(topic) = std::str::from_utf8(topic) else { return };
        // One subscription (the common case) is the one the router read from: forwards of
        // ended reads came before the router's answer, which `router_changes` waited for.
        let only = self.subs.len() == 1;
        let mut matching = self
            .subs
            .iter()
            .filter(|(f, _)| !f.starts_with('$') && (only || crate::topic::matches(topic, f)));
        let (filter, qos) = match (matching.next(), matching.next()) {
            (Some((f, q)), None) => (f.clone(), *q),
            (Some(_), Some(_)) => {
                // Overlapping filters: which log this came from is unknown; their baselines
                // start again with their next single-filter message.
                let all: Vec<Arc<str>> = self
                    .subs
                    .keys()
                    .filter(|f| !f.starts_with('$') && crate::topic::matches(topic, f))
                    .cloned()
                    .collect();
                for f in all {
                    self.next_offset.remove(&f);
                }
                return;
            }
            _ => return,
        };
        let expected = self.next_offset.insert(filter.clone(), offset + 1);
        let Some(lost) = expected.and_then(|e| offset.checked_sub(e)).filter(|n| *n > 0) else {
            return;
        };
        self.engine
            .metrics
            .broker
            .router_lost
            .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
        if qos > 0 && !self.closing {
            tracing::warn!(
                clientid = %self.client.clientid, %filter, lost,
                "a subscriber fell behind by more than the router keeps of a filter (mqtt.router_segment_size x mqtt.router_segments): messages it had not read are lost for it; disconnecting it"
            );
            self.reason = "quota_exceeded";
            self.disconnect_v5(DisconnectReasonCode::QuotaExceeded);
            self.closing = true;
        }
    }

    /// The router answered a SUBSCRIBE or UNSUBSCRIBE; once it answered all, the reads it
    /// sends from are the current ones, and every filter's baseline starts again.
    fn router_change_done(&mut self) {
        self.router_changes = self.router_changes.saturating_sub(1);
        if self.router_changes == 0 {
            self.next_offset.clear();
        }
    }

    /// `message.delivered` for a live message that went out at `qos`.
    fn fire_delivered(&self, meta: Option<Meta>, topic: Bytes, payload: Bytes, qos: u8) {
        let Some(m) = meta else { return };
        if !self.d.has(Hook::MessageDelivered) {
            return;
        }
        if let Ok(t) = std::str::from_utf8(&topic) {
            let msg = Arc::new(Message {
                msgid: m.msgid,
                sender: m.sender,
                username: None,
                topic: t.into(),
                payload,
                qos,
                retain: false,
                timestamp: m.timestamp,
                props: None,
            });
            self.d.fire(&Event::Delivered {
                client: self.client.clone(),
                msg,
                qos,
            });
        }
    }

    /// MQTT 5 subscription options on a forward: sets the subscription identifiers of every
    /// matching subscription and the retain flag as published where asked; true when the
    /// client is not to get it (No Local on every matching subscription, or the copy of a
    /// message already delivered through another subscription).
    fn apply_options(&mut self, m: &Meta, published_retain: bool, f: &mut Forward) -> bool {
        let Ok(topic) = std::str::from_utf8(&f.publish.topic) else {
            return false;
        };
        let mut matching = 0;
        let mut all_nolocal = true;
        let mut rap = false;
        let mut ids = Vec::new();
        for filter in self.subs.keys().filter(|s| crate::topic::matches(topic, s)) {
            matching += 1;
            let o = self.opts.get(filter).copied().unwrap_or_default();
            all_nolocal &= o.nolocal;
            rap |= o.retain_as_published;
            ids.extend(o.id);
        }
        if matching == 0 {
            return false;
        }
        if all_nolocal && *m.sender == *self.client.clientid {
            return true;
        }
        if !ids.is_empty() && matching > 1 {
            if self.delivered_ids.len() > 100_000 {
                self.delivered_ids.clear();
            }
            if !self.delivered_ids.insert(m.msgid) {
                return true;
            }
        }
        if !ids.is_empty() {
            ids.sort_unstable();
            f.properties.get_or_insert_with(Default::default).subscription_identifiers = ids;
        }
        if rap && published_retain {
            f.publish.retain = true;
        }
        false
    }

    fn qos_pkid(&mut self, p: &Publish) -> (u8, u16) {
        wire::qos_pkid(p, &mut self.wbuf)
    }

    /// Writes a publish to the client, or holds it back while the client's Receive Maximum is
    /// reached (QoS 0 is never held). Returns its QoS and packet id as encoded.
    fn send_publish(&mut self, publish: Publish, props: Option<PublishProperties>, injected: bool) -> (u8, u16, Sent) {
        if !self.out.may_send() || !self.deferred.is_empty() {
            let (qos, pkid) = self.qos_pkid(&publish);
            if qos > 0 {
                self.deferred.push_back(Held {
                    publish,
                    props,
                    qos,
                    pkid,
                    injected,
                });
                return (qos, pkid, Sent::Later);
            }
        }
        self.emit(publish, props)
    }

    /// Encodes a publish with the client's topic aliases, unless it is larger than the client
    /// accepts.
    fn emit(&mut self, mut publish: Publish, mut props: Option<PublishProperties>) -> (u8, u16, Sent) {
        let alias = self.out.alias(&publish.topic);
        match alias {
            Aliased::None => {}
            Aliased::New(n) => props.get_or_insert_with(Default::default).topic_alias = Some(n),
            Aliased::Known(n) => {
                publish.topic = Bytes::new();
                props.get_or_insert_with(Default::default).topic_alias = Some(n);
            }
        }
        let start = self.wbuf.len();
        self.write(Packet::Publish(publish, props));
        let (qos, pkid) = wire::peek_publish(&self.wbuf[start..]).unwrap_or((0, 0));
        if self.wbuf.len() - start > self.out.max_packet {
            self.wbuf.truncate(start);
            if let Aliased::New(n) = alias {
                self.out.unalias(n);
            }
            return (qos, pkid, Sent::Dropped);
        }
        if qos > 0 {
            self.out.sent();
        }
        (qos, pkid, Sent::Now)
    }

    /// A QoS 1/2 publish not sent to the client ([`Sent::Dropped`]) counts as delivered.
    fn dropped_publish(&mut self, qos: u8, pkid: u16, injected: bool) {
        if injected {
            if let Some(inj) = self.injected.remove(&pkid) {
                self.injected_acked(inj);
            }
        } else if qos == 2 {
            self.swallow_pubrel.insert(pkid);
            self.client_ack(pkid, AckKind::PubRec);
        } else {
            self.client_ack(pkid, AckKind::PubAck);
        }
    }

    /// The client completed a QoS 1/2 delivery: what its Receive Maximum held back may go.
    fn completed(&mut self) {
        self.out.completed();
        while self.out.may_send() {
            let Some(h) = self.deferred.pop_front() else { break };
            let (_, _, sent) = self.emit(h.publish, h.props);
            if sent == Sent::Dropped {
                self.dropped_publish(h.qos, h.pkid, h.injected);
            }
        }
    }

    /// A packet id for an injected publish, never one still awaiting its ack (`None`: all
    /// 65 435 are, which paced injection never reaches).
    fn alloc_pkid(&mut self) -> Option<u16> {
        for _ in FIRST_INJECT_PKID..=u16::MAX {
            let p = self.next_pkid;
            self.next_pkid = if p == u16::MAX { FIRST_INJECT_PKID } else { p + 1 };
            if !self.injected.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Asks `feed` for its next page once fewer than a window of injected messages await
    /// their ack (a QoS 0 page needs none; the socket write paces it).
    fn ask_for_page(&self, feed: &mut Feed) {
        if feed.asked || self.injected.len() >= INJECT_WINDOW {
            return;
        }
        // Full cannot happen (one request at a time); closed means the reads are done, and
        // the page channel then says so.
        let _ = feed.want.try_send(());
        feed.asked = true;
    }

    /// Writes stored messages to this client only, oldest first, at most the subscription's QoS.
    fn inject(&mut self, sub_qos: u8, msgs: Vec<Injection>) {
        if self.recent_injected.len() > 100_000 {
            self.recent_injected.clear();
        }
        let now = now_ms();
        for inj in msgs {
            if self.acl.as_ref().is_some_and(|a| !a.allows(Access::Read, &inj.msg.topic, false)) {
                continue;
            }
            // Expired while stored (MQTT 5 message expiry): never delivered.
            if inj.msg.expired(now) {
                continue;
            }
            let mut qos = inj.msg.qos.min(sub_qos);
            let pkid = if qos > 0 {
                match self.alloc_pkid() {
                    Some(p) => p,
                    None => {
                        static FULL: RateLimited = RateLimited::new();
                        FULL.warn(|| {
                            format!(
                                "{}: every injection packet id awaits its ack; a stored message goes at QoS 0",
                                self.client.clientid
                            )
                        });
                        qos = 0;
                        0
                    }
                }
            } else {
                0
            };
            let publish = wire::build_publish(inj.msg.topic.as_bytes(), &inj.msg.payload, qos, inj.retained, pkid);
            let props = inj
                .msg
                .props
                .as_ref()
                .filter(|_| self.codec.is_v5())
                .map(|p| replay_props(p, inj.msg.arrived, now));
            let (_, _, sent) = self.send_publish(publish, props, true);
            if !inj.retained {
                self.recent_injected.insert(inj.msg.msgid);
            }
            let topic: Arc<str> = inj.msg.topic.as_str().into();
            if qos > 0 {
                self.injected.insert(
                    pkid,
                    Injected {
                        msgid: inj.msg.msgid,
                        topic: topic.clone(),
                        share: None,
                    },
                );
                if sent == Sent::Dropped {
                    self.dropped_publish(qos, pkid, true);
                }
            }
            if self.d.has(Hook::MessageDelivered) {
                let m = &inj.msg;
                let msg = Arc::new(Message {
                    msgid: m.msgid,
                    sender: m.sender.as_str().into(),
                    username: None,
                    topic,
                    payload: m.payload.clone(),
                    qos,
                    retain: inj.retained,
                    timestamp: m.arrived,
                    props: None,
                });
                self.d.fire(&Event::Delivered {
                    client: self.client.clone(),
                    msg,
                    qos,
                });
            }
        }
    }

    /// Joins (or updates this connection's membership of) the group of a shared subscription.
    fn join_share(&mut self, full: &Arc<str>, group: &str, inner: &str, qos: u8) -> Result<(), String> {
        let member = Member {
            clientid: self.client.clientid.clone(),
            conn: self.conn_id,
            qos,
            window: self.share_window,
            tx: self.share_tx.clone(),
        };
        let eng = self.engine.clone();
        let g = self
            .engine
            .shares
            .join(group, inner, member, &self.engine.metrics, |id| eng.link(id, true))?;
        self.shares.insert(full.clone(), g);
        Ok(())
    }

    /// A message a shared subscription's group chose this connection for.
    fn shared(&mut self, d: Delivery) {
        if !self.shares.values().any(|g| g.same(&d.group)) {
            // Unsubscribed since: the group took it back when told.
            return;
        }
        self.engine
            .metrics
            .broker
            .messages_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let denied = self
            .acl
            .as_ref()
            .is_some_and(|a| std::str::from_utf8(&d.topic).is_ok_and(|t| !a.allows(Access::Read, t, false)));
        let pkid = if denied || d.qos == 0 { None } else { self.alloc_pkid() };
        let Some(pkid) = pkid else {
            if !denied {
                let p = Publish::new(d.topic.clone(), d.payload.clone(), false);
                let _ = self.send_publish(p, d.props.filter(|_| self.codec.is_v5()), true);
                self.fire_delivered(d.meta, d.topic, d.payload, 0);
            }
            if d.qos > 0 {
                d.group.acked(d.seq, self.conn_id);
            }
            return;
        };
        let publish = wire::build_publish(&d.topic, &d.payload, d.qos, false, pkid);
        let (_, _, sent) = self.send_publish(publish, d.props.filter(|_| self.codec.is_v5()), true);
        let topic: Arc<str> = String::from_utf8_lossy(&d.topic).into();
        self.injected.insert(
            pkid,
            Injected {
                msgid: d.meta.as_ref().map_or(0, |m| m.msgid),
                topic,
                share: Some((d.group, d.seq)),
            },
        );
        if sent == Sent::Dropped {
            self.dropped_publish(d.qos, pkid, true);
        }
        self.fire_delivered(d.meta, d.topic, d.payload, d.qos);
    }

    fn control(&mut self, cmd: Control) {
        match cmd {
            Control::Subscribe { filter, qos } => {
                if !crate::topic::valid_filter(&filter) {
                    tracing::warn!(clientid = %self.client.clientid, %filter, "server-side subscribe with an invalid filter ignored");
                    return;
                }
                let qos = rumqttd::protocol::qos(qos.min(2)).unwrap_or_default();
                let f = Filter {
                    path: filter,
                    qos,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                };
                self.subscribe(Subscribe { pkid: 0, filters: vec![f] }, None);
            }
            Control::Unsubscribe { filter } => {
                if self.drop_subscription(&filter) {
                    self.sub_qos_changed();
                    self.sync_session();
                    self.fire_unsubscribed(filter.as_str().into());
                }
            }
        }
    }

    /// Ends the connection. Returns the will when it is to be published later (MQTT 5 will
    /// delay, while the session lasts): the caller waits for it.
    async fn close(&mut self, link_open: bool) -> Option<Will> {
        self.queue_stores().await;
        self.engine
            .option_subs
            .fetch_sub(self.opts.len(), std::sync::atomic::Ordering::Relaxed);
        self.engine
            .qos2_subs
            .fetch_sub(self.qos2_counted, std::sync::atomic::Ordering::Relaxed);
        self.qos2_counted = 0;
        let mut delayed = None;
        // A will goes where its client may publish, no further.
        let allowed = |w: &rumqttd::protocol::LastWill| {
            self.acl
                .as_ref()
                .is_none_or(|a| std::str::from_utf8(&w.topic).is_ok_and(|t| a.allows(Access::Write, t, false)))
        };
        if let Some((will, props)) = self.will.take().filter(|(w, _)| allowed(w)) {
            // Taken over by a connection that continues the session: the client is back.
            let back = self.reason == "takenover" && self.engine.took_over(&self.client.clientid);
            let delay = props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
            if back {
            } else if delay > 0 && self.expiry > 0 {
                delayed = Some(Will {
                    will,
                    props,
                    delay: delay.min(self.expiry),
                });
            } else {
                publish_will(&self.engine, &self.d, &self.client, self.meta, will, props).await;
            }
        }
        // Shared subscriptions: what this connection had unacked goes to another member; the
        // membership stays with a session that outlives the connection.
        for (_, g) in self.shares.drain() {
            if self.expiry > 0 {
                g.offline(self.conn_id);
            } else {
                g.leave(&self.client.clientid, self.conn_id);
            }
        }
        if link_open {
            self.to_router.push(Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            ));
            let _ = self.flush_router();
        }
        self.sync_session();
        if self.expiry > 0
            && self.reason != "takenover"
            && !self.next_offset.is_empty()
            && self.engine.is_current(&self.client.clientid, self.conn_id)
        {
            let offsets = std::mem::take(&mut self.next_offset);
            self.engine.session_offsets.lock().insert(self.client.clientid.to_string(), offsets);
        }
        let at = now_ms();
        self.d.fire(&Event::Disconnected {
            client: self.client.clone(),
            reason: self.reason.into(),
            disconnected_at: at,
        });
        tracing::debug!(clientid = %self.client.clientid, reason = self.reason, "client disconnected");
        delayed
    }
}

/// A will waiting for its delay (MQTT 5 will delay interval), in seconds.
struct Will {
    will: rumqttd::protocol::LastWill,
    props: Option<rumqttd::protocol::LastWillProperties>,
    delay: u32,
}

/// What outlives a connection: a delayed will, and the session until it expires. Both end
/// when the client connects again first.
async fn departure(
    engine: Arc<Engine>,
    d: Arc<Dispatcher>,
    client: Arc<Client>,
    conn_id: u64,
    expiry: u32,
    will: Option<Will>,
    meta: bool,
) {
    let mut waited = 0u32;
    if let Some(w) = will {
        tokio::time::sleep(Duration::from_secs(u64::from(w.delay))).await;
        waited = w.delay;
        if !engine.still_departed(&client.clientid, conn_id, false) {
            return;
        }
        publish_will(&engine, &d, &client, meta, w.will, w.props).await;
    }
    if expiry == u32::MAX {
        return;
    }
    tokio::time::sleep(Duration::from_secs(u64::from(expiry - waited))).await;
    if engine.still_departed(&client.clientid, conn_id, true) {
        if let Some(done) = d.discard_pointers(&client.clientid) {
            engine.pointer_delete_queued(&client.clientid, &Arc::from(""), done);
        }
        let router_id = wire::router_client_id(&client.clientid);
        let cid = client.clientid.clone();
        let eng = engine.clone();
        let _ = tokio::task::spawn_blocking(move || eng.discard_session(&cid, &router_id)).await;
        tracing::debug!(clientid = %client.clientid, "session expired");
    }
}

async fn publish_will(
    engine: &Engine,
    d: &Dispatcher,
    client: &Client,
    meta: bool,
    will: rumqttd::protocol::LastWill,
    props: Option<rumqttd::protocol::LastWillProperties>,
) {
    {
        let Ok(topic) = std::str::from_utf8(&will.topic) else { return };
        let mut p = props.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator.filter(|v| *v <= 1),
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            content_type: p.content_type,
            ..Default::default()
        });
        strip_meta(&mut p);
        let msg = Arc::new(Message {
            msgid: engine.msgids.next(),
            sender: client.clientid.clone(),
            username: client.username.clone(),
            topic: topic.into(),
            payload: will.message.clone(),
            qos: will.qos as u8,
            retain: will.retain,
            timestamp: now_ms(),
            props: stored_props(&p),
        });
        d.publish(&msg, None).await;
        let retain = will.retain && !d.retain_in_db(topic);
        let publish = wire::build_publish(&will.topic, &will.message, 0, retain, 0);
        strip_meta(&mut p);
        if meta {
            p.get_or_insert_with(Default::default).user_properties.push(encode_meta(&msg));
        }
        wire::mark_published(&mut p, will.qos as u8, will.retain);
        engine.internal_publish(publish, p);
    }
}

/// The properties a stored copy of a publish keeps (SPEC: faithful replay), if it has any.
fn stored_props(p: &Option<PublishProperties>) -> Option<Arc<crate::model::MsgProps>> {
    use base64::Engine as _;
    let p = p.as_ref()?;
    let user: Vec<(String, String)> = p.user_properties.iter().filter(|(k, _)| k != META_KEY).cloned().collect();
    let m = crate::model::MsgProps {
        payload_format: p.payload_format_indicator,
        expiry: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p
            .correlation_data
            .as_ref()
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
        user,
    };
    (m != crate::model::MsgProps::default()).then(|| Arc::new(m))
}

/// A stored message's properties as it goes out, its expiry interval counted down.
fn replay_props(p: &crate::model::MsgProps, arrived: i64, now: i64) -> PublishProperties {
    use base64::Engine as _;
    PublishProperties {
        payload_format_indicator: p.payload_format.filter(|v| *v <= 1),
        message_expiry_interval: p.remaining(arrived, now),
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p
            .correlation_data
            .as_ref()
            .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
            .map(Bytes::from),
        user_properties: p.user.clone(),
        ..Default::default()
    }
}

/// A SUBACK code as MQTT 3.1.1 writes it: the granted QoS, or 0x80.
fn v4_code(c: SubscribeReasonCode) -> SubscribeReasonCode {
    match c {
        SubscribeReasonCode::Success(q) => match q as u8 {
            0 => SubscribeReasonCode::QoS0,
            1 => SubscribeReasonCode::QoS1,
            _ => SubscribeReasonCode::QoS2,
        },
        c @ (SubscribeReasonCode::QoS0 | SubscribeReasonCode::QoS1 | SubscribeReasonCode::QoS2) => c,
        _ => SubscribeReasonCode::Failure,
    }
}

/// v4 cannot encode properties.
fn strip_props(p: Packet) -> Packet {
    match p {
        Packet::PubRel(r, _) => Packet::PubRel(r, None),
        Packet::PubComp(c, _) => Packet::PubComp(c, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::PubRec(r, _) => Packet::PubRec(r, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        other => other,
    }
}
