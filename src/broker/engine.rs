//! The broker engine: rumqttd's router, a factory for local links, the msgid clock, the
//! registry of live connections (for server-side subscribe and injection), and the persistent
//! session subscriptions the layer must remember to know which subscriptions are new.

use crate::config::BrokerConf;
use crate::deadletter::DeadLetter;
use crate::hooks::Dispatcher;
use crate::metrics::Registry;
use parking_lot::{Mutex, RwLock};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A new local link: its halves and the router's CONNACK notification.
pub type Link = (LinkTx, LinkRx, Notification);
type LinkFactory = Box<dyn Fn(&str, bool) -> Result<Link, String> + Send + Sync>;

use crate::model::Control;

pub struct Engine {
    links: LinkFactory,
    dispatcher: RwLock<Arc<Dispatcher>>,
    pub conf: BrokerConf,
    pub msgids: MsgIdGen,
    pub metrics: Arc<Registry>,
    /// Subscriptions of persistent sessions, while the router keeps the session.
    pub sessions: Mutex<HashMap<String, HashMap<String, u8>>>,
    /// The MQTT 5 options of those subscriptions, where they have any.
    pub session_opts: Mutex<HashMap<String, HashMap<Arc<str>, super::flow::SubOpts>>>,
    /// Per filter of those sessions, the router log offset of the next message the session
    /// should get: a session back from offline notices what the router dropped meanwhile.
    pub session_offsets: Mutex<HashMap<String, HashMap<Arc<str>, u64>>>,
    clients: Mutex<HashMap<String, Live>>,
    next_conn: AtomicU64,
    internal: Mutex<Option<LinkTx>>,
    /// Bumped on every reload so connections pick up the new dispatcher.
    generation: AtomicU64,
    /// The runtime of database work (writers, pools, cleanup), apart from connections.
    pub storage: tokio::runtime::Handle,
    /// Where v3.1.1 publishes no database accepted are kept before they are acked.
    pub dead_letter: Arc<DeadLetter>,
    /// Pointer deletes (unsubscribes) still queued, per client id and filter: a new
    /// subscription's fetch waits for them, from this connection or a later one (takeover).
    pointer_deletes: Mutex<PointerDeletes>,
    /// Clients whose session or delayed will outlives their connection, by the connection id
    /// that left: a new connection of the client removes the entry, and with it the pending
    /// will and session end (MQTT 5 will delay, session expiry).
    departed: Mutex<HashMap<Arc<str>, u64>>,
    /// A new connection taking over a client id says whether it continues the session (the
    /// old connection then publishes no will).
    takeovers: Mutex<HashMap<Arc<str>, bool>>,
    /// Live subscriptions with MQTT 5 options applied at delivery (No Local, Retain As
    /// Published, identifiers): while there are any, every publish carries its sender, QoS and
    /// retain flag across the router.
    pub option_subs: AtomicUsize,
    /// Live QoS 2 subscriptions: while there are any, QoS 1 publishes carry their QoS across
    /// the router (to go out at QoS 1 to them).
    pub qos2_subs: AtomicUsize,
    /// Who may subscribe, publish and receive what (`acl.file`); none: everyone, everything.
    authorizer: RwLock<Option<Arc<dyn crate::acl::Authorizer>>>,
    /// Per client id, the count of connections that arrived ([`Engine::arrive`]): a session end
    /// decided by a connection is void once a later one arrived.
    arrivals: Mutex<HashMap<Arc<str>, u64>>,
    /// Client ids whose router session is being discarded; their next connection waits.
    discarding: Mutex<std::collections::HashSet<Arc<str>>>,
    /// Shared subscription groups (`$share/<group>/<filter>`), owned by the layer.
    pub shares: super::share::Shares,
}

/// Closed when a queued pointer delete is done.
pub type PointerDelete = tokio::sync::watch::Receiver<()>;

/// Per client id: the filters whose pointer deletes may still be queued.
type PointerDeletes = HashMap<Arc<str>, Vec<(Arc<str>, PointerDelete)>>;

/// A live connection: its id, its `connected_at`, its control channel.
type Live = (u64, i64, mpsc::UnboundedSender<ConnMsg>);

/// What reaches a live connection from elsewhere in the broker, on one channel (one channel
/// block per connection, not two).
pub enum ConnMsg {
    Control(Control),
    /// A message its shared subscription group chose it for (boxed: the channel's blocks
    /// hold 32 of these, allocated with each connection).
    Shared(Box<super::share::Delivery>),
}

/// Router settings whose memory stays bounded: each filter's commitlog holds at most
/// `router_segment_size × router_segments` bytes of topics and payloads (older data of
/// subscribers that fell behind is gone from the router: `conn` notices the gap).
pub fn router_config(limits: &crate::config::MqttLimits) -> RouterConfig {
    RouterConfig {
        // Shared subscription groups hold links of their own.
        max_connections: limits.max_connections + 1024,
        max_outgoing_packet_count: 200,
        max_segment_size: limits.router_segment_size,
        max_segment_count: limits.router_segments,
        ..Default::default()
    }
}

impl Engine {
    pub fn new(
        conf: BrokerConf,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Registry>,
        storage: tokio::runtime::Handle,
        dead_letter: Arc<DeadLetter>,
    ) -> Result<Arc<Engine>, String> {
        let mark = conf.data_dir.join("msgid.hw");
        std::fs::create_dir_all(&conf.data_dir).map_err(|e| format!("cannot create {}: {e}", conf.data_dir.display()))?;
        let msgids = MsgIdGen::open(conf.node_id, mark.clone()).map_err(|e| format!("msgid high-water mark {}: {e}", mark.display()))?;
        let router_tx = Router::new(conf.node_id as usize, router_config(&conf.mqtt)).spawn();
        let links: LinkFactory = Box::new(move |id, clean| {
            LinkBuilder::new(id, router_tx.clone())
                .clean_session(clean)
                .dynamic_filters(true)
                .build()
                .map_err(|e| e.to_string())
        });
        let engine = Arc::new(Engine {
            links,
            dispatcher: RwLock::new(dispatcher),
            msgids,
            conf,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            session_opts: Mutex::new(HashMap::new()),
            session_offsets: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            internal: Mutex::new(None),
            generation: AtomicU64::new(0),
            storage,
            dead_letter,
            pointer_deletes: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashMap::new()),
            option_subs: AtomicUsize::new(0),
            qos2_subs: AtomicUsize::new(0),
            authorizer: RwLock::new(None),
            takeovers: Mutex::new(HashMap::new()),
            discarding: Mutex::new(Default::default()),
            arrivals: Mutex::new(HashMap::new()),
            shares: Default::default(),
        });
        engine.start_internal_link();
        Ok(engine)
    }

    /// A link for publishes the broker makes itself (wills); its notifications are drained.
    fn start_internal_link(&self) {
        match (self.links)("mqtt-persist-internal", true) {
            Ok((tx, mut rx, _)) => {
                *self.internal.lock() = Some(tx);
                std::thread::Builder::new()
                    .name("mqtt-persist-internal".into())
                    .spawn(move || while rx.recv().is_ok() {})
                    .ok();
            }
            Err(e) => tracing::error!(error = %e, "cannot create the internal router link"),
        }
    }

    /// Publish through the internal link (QoS 0 at the router: subscribers get their own QoS).
    pub fn internal_publish(&self, publish: rumqttd::protocol::Publish, props: Option<rumqttd::protocol::PublishProperties>) {
        if let Some(tx) = self.internal.lock().as_mut() {
            if let Err(e) = futures::executor::block_on(tx.send(rumqttd::protocol::Packet::Publish(publish, props))) {
                tracing::error!(error = %e, "internal publish failed");
            }
        }
    }

    /// Builds a local link; blocks on the router, so call it off the async threads.
    pub fn link(&self, router_id: &str, clean: bool) -> Result<Link, String> {
        (self.links)(router_id, clean)
    }

    pub fn dispatcher(&self) -> Arc<Dispatcher> {
        self.dispatcher.read().clone()
    }

    /// Swaps in a new rule set (reload): new events use it; old pools drain and close.
    pub fn set_dispatcher(&self, d: Arc<Dispatcher>) {
        *self.dispatcher.write() = d;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Sets the authorizer new connections use (start and reload).
    pub fn set_authorizer(&self, a: Option<Arc<dyn crate::acl::Authorizer>>) {
        *self.authorizer.write() = a;
    }

    pub fn authorizer(&self) -> Option<Arc<dyn crate::acl::Authorizer>> {
        self.authorizer.read().clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Registers a live connection; returns its unique id.
    /// Registers a new connection of `clientid`; returns its connection id and `connected_at`.
    /// A takeover within the same millisecond gets a later `connected_at` than the connection
    /// it replaces: the stored state's takeover guard tells connections apart by it.
    pub fn register(&self, clientid: &str, now_ms: i64, tx: mpsc::UnboundedSender<ConnMsg>) -> (u64, i64) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut clients = self.clients.lock();
        let at = match clients.get(clientid) {
            Some((_, prev, _)) if *prev >= now_ms => prev + 1,
            _ => now_ms,
        };
        clients.insert(clientid.to_string(), (id, at, tx));
        self.departed.lock().remove(clientid);
        (id, at)
    }

    /// True while connection `id` is the registered one of `clientid`.
    pub fn is_current(&self, clientid: &str, id: u64) -> bool {
        self.clients.lock().get(clientid).is_some_and(|(i, _, _)| *i == id)
    }

    pub fn unregister(&self, clientid: &str, id: u64) {
        let mut c = self.clients.lock();
        if c.get(clientid).is_some_and(|(i, _, _)| *i == id) {
            c.remove(clientid);
        }
    }

    /// Connection `id` of `clientid` ended with its session (or a delayed will) still
    /// pending. False when another connection of the client is already live: nothing is
    /// pending then.
    pub fn depart(&self, clientid: &Arc<str>, id: u64) -> bool {
        let clients = self.clients.lock();
        if clients.get(&**clientid).is_some_and(|(i, _, _)| *i != id) {
            return false;
        }
        self.departed.lock().insert(clientid.clone(), id);
        true
    }

    /// True while no connection of `clientid` came after connection `id` left; `claim`
    /// also ends the wait (the caller now ends the session).
    pub fn still_departed(&self, clientid: &str, id: u64, claim: bool) -> bool {
        let clients = self.clients.lock();
        let mut departed = self.departed.lock();
        let gone = !clients.contains_key(clientid) && departed.get(clientid) == Some(&id);
        if gone && claim {
            departed.remove(clientid);
            self.discarding.lock().insert(clientid.into());
        }
        gone
    }

    /// Ends a client's router session (its subscriptions and queued messages): a clean link of
    /// the same name takes it over and closes. Blocking; the caller claimed the client id with
    /// [`still_departed`](Self::still_departed).
    pub fn discard_session(&self, clientid: &str, router_id: &str) {
        self.end_router_session(router_id);
        self.shares.forget(clientid);
        self.sessions.lock().remove(clientid);
        self.session_opts.lock().remove(clientid);
        self.session_offsets.lock().remove(clientid);
        self.discarding.lock().remove(clientid);
    }

    /// Makes the router forget the session of `router_id` (blocking).
    pub fn end_router_session(&self, router_id: &str) {
        match (self.links)(router_id, true) {
            Ok((mut tx, _rx, _)) => {
                let _ = futures::executor::block_on(tx.send(rumqttd::protocol::Packet::Disconnect(
                    rumqttd::protocol::Disconnect {
                        reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                )));
            }
            Err(e) => tracing::warn!(client = %router_id, error = %e, "cannot end the router session"),
        }
    }

    /// A connection of `clientid` is about to open its link: a pending session end is
    /// cancelled. False while one is under way (the caller waits and asks again).
    pub fn arrive(&self, clientid: &str) -> Option<u64> {
        let mut departed = self.departed.lock();
        if self.discarding.lock().contains(clientid) {
            return None;
        }
        departed.remove(clientid);
        let mut arrivals = self.arrivals.lock();
        let n = arrivals.entry(clientid.into()).or_insert(0);
        *n += 1;
        Some(*n)
    }

    /// Connection `id`, still registered, ends its session now: unless another connection of
    /// the client is live, the client id is marked as being discarded (see [`arrive`]).
    ///
    /// [`arrive`]: Self::arrive
    pub fn begin_discard(&self, clientid: &str, arrival: u64) -> bool {
        let _departed = self.departed.lock();
        let mut arrivals = self.arrivals.lock();
        if arrivals.get(clientid) != Some(&arrival) {
            return false;
        }
        arrivals.remove(clientid);
        self.discarding.lock().insert(clientid.into());
        true
    }

    /// The connection of arrival `arrival` is gone; forgets the count if no later one came.
    pub fn leave(&self, clientid: &str, arrival: u64) {
        let mut arrivals = self.arrivals.lock();
        if arrivals.get(clientid) == Some(&arrival) {
            arrivals.remove(clientid);
        }
    }

    /// A new connection of `clientid` is about to take over any live one.
    pub fn note_takeover(&self, clientid: &Arc<str>, continues_session: bool) {
        if self.clients.lock().contains_key(&**clientid) {
            self.takeovers.lock().insert(clientid.clone(), continues_session);
        }
    }

    /// Whether the connection that took `clientid` over continues its session.
    pub fn took_over(&self, clientid: &str) -> bool {
        self.takeovers.lock().remove(clientid).unwrap_or(false)
    }

    /// Remembers a queued pointer delete of `clientid`'s `filter` (every filter: `""`) until it
    /// is done.
    pub fn pointer_delete_queued(&self, clientid: &Arc<str>, filter: &Arc<str>, done: PointerDelete) {
        let mut all = self.pointer_deletes.lock();
        all.retain(|_, v| {
            v.retain(|(_, d)| d.has_changed().is_ok());
            !v.is_empty()
        });
        all.entry(clientid.clone()).or_default().push((filter.clone(), done));
    }

    /// The pointer deletes of `clientid`'s `filter` that may still be queued.
    pub fn pointer_deletes_of(&self, clientid: &str, filter: &str) -> Vec<PointerDelete> {
        self.pointer_deletes
            .lock()
            .get(clientid)
            .map(|v| {
                v.iter()
                    .filter(|(f, d)| (**f == *filter || f.is_empty()) && d.has_changed().is_ok())
                    .map(|(_, d)| d.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends a control command to a connected client; false if it is not connected here.
    pub fn control(&self, clientid: &str, cmd: Control) -> bool {
        self.clients
            .lock()
            .get(clientid)
            .is_some_and(|(_, _, tx)| tx.send(ConnMsg::Control(cmd)).is_ok())
    }
}

/// 64-bit message ids: ms clock (41 bits) | node id (10 bits) | per-ms sequence (12 bits).
/// Strictly increasing per node; unique across nodes with distinct ids (SPEC §2); and unique
/// across restarts of a node, even with its clock stepped back: ids are handed out only below a
/// high-water mark kept on disk (`<data.dir>/msgid.hw`, written ahead of use), and a restart
/// starts above it. Stored rows use the msgid as their key, so a repeat would drop or
/// overwrite a message that was already acked.
pub struct MsgIdGen {
    last: AtomicU64,
    node: u64,
    /// Every id below this is covered by the mark on disk.
    reserved: AtomicU64,
    file: Option<Mutex<std::path::PathBuf>>,
    clock: fn() -> i64,
}

/// How far ahead of the clock the mark on disk runs: one small synced write per this much
/// time, on whichever connection crosses it.
const RESERVE_MS: u64 = 10_000;

impl MsgIdGen {
    /// In memory only (unique within this process).
    pub fn new(node: u16) -> Self {
        Self::build(node, None, crate::model::now_ms, 0)
    }

    /// Unique across restarts: continues above the mark in `path` (created if missing).
    pub fn open(node: u16, path: std::path::PathBuf) -> std::io::Result<Self> {
        Self::open_with_clock(node, path, crate::model::now_ms)
    }

    fn open_with_clock(node: u16, path: std::path::PathBuf, clock: fn() -> i64) -> std::io::Result<Self> {
        let floor = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} does not hold a msgid high-water mark: {:?}", path.display(), t.trim()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        // Every id of the mark's millisecond counts as used: the first new one takes the next.
        let floor = if floor == 0 {
            0
        } else {
            floor | (u64::from(node & 0x3FF) << 12) | 0xFFF
        };
        let g = Self::build(node, Some(path), clock, floor);
        g.reserve(floor)?;
        Ok(g)
    }

    fn build(node: u16, file: Option<std::path::PathBuf>, clock: fn() -> i64, floor: u64) -> Self {
        MsgIdGen {
            last: AtomicU64::new(floor),
            node: u64::from(node & 0x3FF),
            reserved: AtomicU64::new(if file.is_some() { floor } else { u64::MAX }),
            file: file.map(Mutex::new),
            clock,
        }
    }

    pub fn next(&self) -> u64 {
        let now = (self.clock)().max(0) as u64;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let base = (now << 22) | (self.node << 12);
            let next = if base > last {
                base
            } else if last & 0xFFF == 0xFFF {
                // Sequence exhausted within this ms: borrow the next ms.
                (((last >> 22) + 1) << 22) | (self.node << 12)
            } else {
                last + 1
            };
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    if next >= self.reserved.load(Ordering::Acquire) {
                        if let Err(e) = self.reserve(next) {
                            // The id is still unique in this process; only a restart with the
                            // clock stepped back could repeat it.
                            tracing::error!(error = %e, "cannot write the msgid high-water mark");
                        }
                    }
                    return next;
                }
                Err(l) => last = l,
            }
        }
    }

    /// Moves the mark on disk past `id` and `RESERVE_MS` ahead of the clock, synced before any
    /// id under it is used.
    fn reserve(&self, id: u64) -> std::io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let path = file.lock();
        if id < self.reserved.load(Ordering::Acquire) {
            return Ok(()); // another caller got there first
        }
        let ms = ((self.clock)().max(0) as u64).max(id >> 22) + RESERVE_MS;
        let mark = ms << 22;
        let tmp = path.with_extension("hw.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(format!("{mark}\n").as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &*path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.reserved.store(mark, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgids_increase_strictly_and_embed_the_node() {
        let g = MsgIdGen::new(7);
        let mut prev = 0;
        for _ in 0..20_000 {
            let id = g.next();
            assert!(id > prev);
            assert_eq!((id >> 12) & 0x3FF, 7);
            assert!(id < i64::MAX as u64);
            prev = id;
        }
    }

    const T: i64 = 1_800_000_000_000;

    #[test]
    fn a_restart_never_repeats_an_id_even_with_the_clock_stepped_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("msgid.hw");
        let first: Vec<u64> = {
            let g = MsgIdGen::open_with_clock(3, path.clone(), || T).unwrap();
            (0..5).map(|_| g.next()).collect()
        };
        // Restarted in the same millisecond, then with the clock 5 s behind: both continue above.
        for clock in [(|| T) as fn() -> i64, || T - 5_000] {
            let g = MsgIdGen::open_with_clock(3, path.clone(), clock).unwrap();
            let id = g.next();
            assert!(id > *first.last().unwrap(), "{id} repeats or precedes an earlier id");
            assert_eq!((id >> 12) & 0x3FF, 3);
        }
        // In memory only, the same ids come back: what the mark prevents.
        let g = MsgIdGen::build(3, None, || T, 0);
        assert_eq!(g.next(), first[0]);
    }

    #[test]
    fn the_mark_moves_ahead_before_ids_pass_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("msgid.hw");
        let g = MsgIdGen::open_with_clock(1, path.clone(), || T).unwrap();
        let mark: u64 = std::fs::read_to_string(&path).unwrap().trim().parse().unwrap();
        assert_eq!(mark, ((T as u64) + RESERVE_MS) << 22);
        // Exhaust the reservation by borrowing milliseconds: the mark moves first.
        g.last.store(mark - 1, Ordering::Relaxed);
        let id = g.next();
        let moved: u64 = std::fs::read_to_string(&path).unwrap().trim().parse().unwrap();
        assert!(id < moved && id >= mark, "{id} under {moved}");
        std::fs::write(&path, "garbage").unwrap();
        assert!(MsgIdGen::open(1, path).is_err(), "a damaged mark is an error, never silently 0");
    }
}
