//! Redis with EMQX's key layout (SPEC §4). A batch of writes is one pipeline (one round trip);
//! checks that must be atomic (the connect/disconnect guard, the monotonic ack pointer) are
//! small Lua scripts. Message ids are stored zero-padded to 20 digits with score 0, so sorted
//! sets order them exactly by lexicographic range — never through a float score.
//!
//! Wildcard fetch and retain lookups use topic indexes (`mqtt:topics:msg|retain|latest`,
//! sorted sets of topic names): a filter's literal prefix selects the candidate topics with
//! range queries, so a subscribe costs O(matching topics), not O(all keys).
//!
//! Reads are paged (see `backends::Source`): a fetch merges the matching topics' id sets in
//! msgid order, walking the topic index a chunk at a time, and loads only one page's hashes per
//! round trip; the cap and the time bound apply to ids before any hash is loaded. Retained and
//! keep-latest lookups walk the topic index, a page of topics at a time.

use super::{
    fetch_page, BResult, Backend, BackendError, ControlSink, Cursor, CustomAction, FetchKind, FetchRequest, Page, Scanned, Source, Span,
    StoredMessage, Table, WriteOp, Written, PAGE,
};
use crate::actions::Command;
use crate::config::{ConfError, PoolConf};
use crate::model::{self, Control, Event, Hook, Message};
use crate::topic;
use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionAddr, ConnectionInfo, Pipeline, ProtocolVersion, RedisConnectionInfo, RedisError, Value};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Duration;
use tokio::sync::RwLock;

const TOPICS_MSG: &str = "mqtt:topics:msg";
const TOPICS_RETAIN: &str = "mqtt:topics:retain";
const TOPICS_LATEST: &str = "mqtt:topics:latest";

const CONNECT_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], 'online_at')
if cur and tonumber(cur) and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 1, 'online_at', ARGV[1], 'offline_at', '', 'node', ARGV[2])
return 1";
const DISCONNECT_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'online_at') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 0, 'offline_at', ARGV[2])
return 1";
/// Deletes a hash field only if it still holds the given value.
const HDEL_IF_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0";
/// Moves an existing pointer forward only (padded ids compare as strings).
const ADVANCE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur >= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1";
/// Replaces the retained message unless the stored one is newer (ids compare as decimal
/// strings by length, then bytes: Lua numbers are doubles and would round 64-bit ids), with the
/// rule's `expired_time` as TTL.
const RETAIN_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], 'id')
local id = ARGV[1]
if cur and (#cur > #id or (#cur == #id and cur > id)) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'id', id, 'from', ARGV[2], 'qos', ARGV[3], 'topic', ARGV[4], 'payload', ARGV[5], 'ts', ARGV[6], 'retain', 'true')
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'props', ARGV[8]) end
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
return 1";
const DEL_IF_ID_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// The set of a client's pointer filters (`mqtt:acked:<clientid>:<filter>` keys).
fn pointer_index(clientid: &str) -> String {
    format!("mqtt:acked_index:{clientid}")
}

fn pad(id: u64) -> String {
    format!("{id:020}")
}

/// A message's `arrived` is taken just after its msgid, whose top 42 bits are the ms clock
/// (`id >> 22`): so it is at most about this much later than its id's time ...
const ARRIVED_AFTER_ID_MS: i64 = 1_000;
/// ... and at most this much earlier: after a restart ids start above the high-water mark,
/// up to 10 s ahead of the clock.
const ARRIVED_BEFORE_ID_MS: i64 = 11_000;
/// What one merge round trip may return at most: topics per trip times ids per topic.
const IDS_PER_TRIP: usize = 8192;

/// The smallest msgid of millisecond `ms`.
fn first_id_at(ms: i64) -> u64 {
    (ms.max(0) as u64) << 22
}

/// The ms clock in a msgid.
fn id_time(id: u64) -> i64 {
    (id >> 22) as i64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Single,
    Sentinel,
    Cluster,
}

#[derive(Clone)]
pub struct RedisSettings {
    pub kind: Kind,
    pub servers: Vec<(String, u16)>,
    pub sentinel: String,
    pub database: i64,
    pub password: Option<String>,
    pub channel: String,
    pub tls: Option<super::tls::TlsFiles>,
    /// Batches pipelined at once on the pool's connection.
    pub write_concurrency: usize,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis {:?} {:?} db {}", self.kind, self.servers, self.database)
    }
}

impl RedisSettings {
    pub fn parse(pool: &PoolConf) -> Result<Self, ConfError> {
        let kind = match pool.str_or("type", "single") {
            "single" => Kind::Single,
            "sentinel" => Kind::Sentinel,
            "cluster" => Kind::Cluster,
            other => return Err(pool.error("type", format!("`type` must be single, sentinel or cluster, found `{other}`"))),
        };
        let mut servers = Vec::new();
        for s in pool
            .str_or("server", "127.0.0.1:6379")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (h, p) = match s.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| pool.error("server", format!("bad port in `{s}`")))?),
                None => (s, if kind == Kind::Sentinel { 26379 } else { 6379 }),
            };
            servers.push((h.to_string(), p));
        }
        if servers.is_empty() {
            return Err(pool.error("server", "`server` needs at least one host[:port]"));
        }
        let sentinel = pool.str_or("sentinel", "").to_string();
        let kind = if kind == Kind::Single && !sentinel.is_empty() {
            Kind::Sentinel
        } else {
            kind
        };
        if kind == Kind::Sentinel && sentinel.is_empty() {
            return Err(pool.error("sentinel", "`type = sentinel` needs `sentinel` (the master name)"));
        }
        let tls = if pool.flag("ssl", false)? {
            Some(super::tls::TlsFiles::parse(pool, "cafile")?)
        } else {
            None
        };
        Ok(RedisSettings {
            kind,
            servers,
            sentinel,
            database: pool.num("database", 0i64)?,
            password: pool.str("password").filter(|p| !p.is_empty()).map(str::to_string),
            channel: pool.str_or("channel", "mqtt_channel").to_string(),
            tls,
            write_concurrency: pool.num("write_concurrency", 4usize)?.max(1),
        })
    }

    fn info(&self, host: &str, port: u16) -> ConnectionInfo {
        let addr = match &self.tls {
            Some(_) => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(host.to_string(), port),
        };
        ConnectionInfo {
            addr,
            redis: RedisConnectionInfo {
                db: self.database,
                username: None,
                password: self.password.clone(),
                protocol: ProtocolVersion::RESP2,
            },
        }
    }

    /// A client for the data node: the configured server, or the master a sentinel names now.
    async fn data_client(&self) -> Result<redis::Client, RedisError> {
        match self.kind {
            Kind::Sentinel => {
                let sentinels: Vec<ConnectionInfo> = self
                    .servers
                    .iter()
                    .map(|(h, p)| ConnectionInfo {
                        addr: ConnectionAddr::Tcp(h.clone(), *p),
                        redis: RedisConnectionInfo::default(),
                    })
                    .collect();
                let mut sentinel = redis::sentinel::Sentinel::build(sentinels)?;
                let node = redis::sentinel::SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(self.info("", 0).redis),
                };
                // The sentinel names the master's address; the client for it is built here, so
                // the master gets the pool's TLS files (CA, client certificate) like a single node.
                let master = sentinel.async_master_for(&self.sentinel, Some(&node)).await?;
                match &master.get_connection_info().addr {
                    ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => self.client(self.info(host, *port)),
                    _ => Ok(master),
                }
            }
            _ => {
                let (h, p) = &self.servers[0];
                self.client(self.info(h, *p))
            }
        }
    }

    fn client(&self, info: ConnectionInfo) -> Result<redis::Client, RedisError> {
        match &self.tls {
            None => redis::Client::open(info),
            Some(files) => {
                let read = |p: &Option<std::path::PathBuf>| p.as_ref().map(std::fs::read).transpose();
                let (ca, cert, key) = (read(&files.ca)?, read(&files.cert)?, read(&files.key)?);
                let client_tls = cert
                    .zip(key)
                    .map(|(client_cert, client_key)| redis::ClientTlsConfig { client_cert, client_key });
                redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert: ca })
            }
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(Box<ConnectionManager>),
    Cluster(ClusterConnection),
}

pub struct RedisBackend {
    label: String,
    settings: RedisSettings,
    /// `None` until the server is first reached: a Redis outage at start does not stop the
    /// broker; writes queue (or spool) and are retried like any outage.
    conn: RwLock<Option<Conn>>,
    /// Ends the control-channel listener when this pool is replaced (reload) or dropped.
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn classify(e: RedisError) -> BackendError {
    use redis::ErrorKind::*;
    let transient = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.kind(), TryAgain | ClusterDown | BusyLoadingError | MasterDown | ReadOnly);
    BackendError::new(transient, e.to_string())
}

/// A reply error that says the server cannot take writes now, not that the data is wrong.
fn transient_reply(e: &RedisError) -> bool {
    use redis::ErrorKind::*;
    matches!(e.kind(), TryAgain | ClusterDown | BusyLoadingError | MasterDown | ReadOnly)
        || e.code().is_some_and(|c| {
            matches!(
                c,
                "BUSY" | "NOREPLICAS" | "MOVED" | "ASK" | "LOADING" | "TRYAGAIN" | "MASTERDOWN" | "READONLY"
            )
        })
}

/// redis 0.27 feeds `factor` to backon as a multiplier on a 1 s base delay: the default (100)
/// makes the second reconnect attempt wait 100 s. Keep it short and capped; the write queue
/// does the long-term retrying.
fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(Duration::from_secs(10))
        .set_factor(2)
        .set_max_delay(1000)
        .set_number_of_retries(2)
}

async fn open(s: &RedisSettings) -> Result<Conn, RedisError> {
    match s.kind {
        Kind::Single | Kind::Sentinel => Ok(Conn::Single(Box::new(
            ConnectionManager::new_with_config(s.data_client().await?, manager_config()).await?,
        ))),
        Kind::Cluster => {
            let nodes: Vec<ConnectionInfo> = s.servers.iter().map(|(h, p)| s.info(h, *p)).collect();
            let mut b = redis::cluster::ClusterClientBuilder::new(nodes);
            if let Some(p) = &s.password {
                b = b.password(p.clone());
            }
            Ok(Conn::Cluster(b.build()?.get_async_connection().await?))
        }
    }
}

impl RedisBackend {
    pub async fn connect(pool: &PoolConf) -> Result<Self, ConfError> {
        let settings = RedisSettings::parse(pool)?;
        let conn = match open(&settings).await.map_err(classify) {
            Ok(c) => Some(c),
            Err(e) if e.transient => {
                tracing::warn!(pool = %pool.label(), error = %e, "redis is unreachable; starting anyway and retrying");
                None
            }
            Err(e) => return Err(pool.error("server", format!("cannot connect to {settings:?}: {e}"))),
        };
        Ok(RedisBackend {
            label: pool.label(),
            settings,
            conn: RwLock::new(conn),
            stop: tokio::sync::watch::channel(false).0,
        })
    }

    /// The connection, opening it first if the server was never reached.
    async fn conn(&self) -> BResult<Conn> {
        if let Some(c) = &*self.conn.read().await {
            return Ok(c.clone());
        }
        let mut w = self.conn.write().await;
        if w.is_none() {
            *w = Some(open(&self.settings).await.map_err(classify)?);
        }
        Ok(w.clone().expect("just opened"))
    }

    async fn run_pipe<T: redis::FromRedisValue>(&self, p: &Pipeline) -> BResult<T> {
        let r = match self.conn().await? {
            Conn::Single(mut m) => p.query_async(&mut *m).await,
            Conn::Cluster(mut m) => p.query_async(&mut m).await,
        };
        self.after(r).await
    }

    /// A pipeline's replies one by one, a refused command's error among them as a value.
    async fn run_pipe_raw(&self, p: &Pipeline, n: usize) -> BResult<Vec<Value>> {
        use redis::aio::ConnectionLike;
        let r = match self.conn().await? {
            Conn::Single(mut m) => m.req_packed_commands(p, 0, n).await,
            Conn::Cluster(mut m) => m.req_packed_commands(p, 0, n).await,
        };
        self.after(r).await
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> BResult<T> {
        let r = match self.conn().await? {
            Conn::Single(mut m) => cmd.query_async(&mut *m).await,
            Conn::Cluster(mut m) => cmd.query_async(&mut m).await,
        };
        self.after(r).await
    }

    /// Sentinel pools look the master up again after a connection error (failover).
    async fn after<T>(&self, r: Result<T, RedisError>) -> BResult<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let e = classify(e);
                if e.transient && self.settings.kind == Kind::Sentinel {
                    if let Ok(c) = open(&self.settings).await {
                        *self.conn.write().await = Some(c);
                    }
                }
                Err(e)
            }
        }
    }

    fn add_op(p: &mut Pipeline, op: &WriteOp) {
        match op {
            WriteOp::ClientConnected {
                clientid,
                node,
                connected_at,
            } => {
                p.cmd("EVAL")
                    .arg(CONNECT_LUA)
                    .arg(1)
                    .arg(format!("mqtt:client:{clientid}"))
                    .arg(connected_at)
                    .arg(&**node)
                    .ignore();
                p.cmd("HSET")
                    .arg(format!("mqtt:node:{node}"))
                    .arg(&**clientid)
                    .arg(connected_at)
                    .ignore();
            }
            WriteOp::ClientDisconnected {
                clientid,
                node,
                connected_at,
                disconnected_at,
            } => {
                p.cmd("EVAL")
                    .arg(DISCONNECT_LUA)
                    .arg(1)
                    .arg(format!("mqtt:client:{clientid}"))
                    .arg(connected_at)
                    .arg(disconnected_at)
                    .ignore();
                p.cmd("EVAL")
                    .arg(HDEL_IF_LUA)
                    .arg(1)
                    .arg(format!("mqtt:node:{node}"))
                    .arg(&**clientid)
                    .arg(connected_at)
                    .ignore();
            }
            WriteOp::StoreMessage { msg, ttl } => {
                let key = format!("mqtt:msg:{}", msg.msgid);
                hset_message(p, &key, msg);
                p.cmd("EXPIRE").arg(&key).arg(ttl.as_secs()).ignore();
                let zkey = format!("mqtt:msg:{}", msg.topic);
                p.cmd("ZADD").arg(&zkey).arg(0).arg(pad(msg.msgid)).ignore();
                p.cmd("EXPIRE").arg(&zkey).arg(ttl.as_secs()).ignore();
                p.cmd("ZADD").arg(TOPICS_MSG).arg(0).arg(&*msg.topic).ignore();
            }
            WriteOp::StoreLatest { msg, ttl } => {
                let key = format!("mqtt:latest_msg:{}", msg.topic);
                hset_message(p, &key, msg);
                p.cmd("EXPIRE").arg(&key).arg(ttl.as_secs()).ignore();
                p.cmd("ZADD").arg(TOPICS_LATEST).arg(0).arg(&*msg.topic).ignore();
            }
            WriteOp::RetainUpsert { msg, ttl } => {
                // Monotonic: a replayed (spooled, retried) older message never replaces a newer one.
                p.cmd("EVAL")
                    .arg(RETAIN_LUA)
                    .arg(1)
                    .arg(format!("mqtt:retain:{}", msg.topic))
                    .arg(msg.msgid)
                    .arg(&*msg.sender)
                    .arg(msg.qos)
                    .arg(&*msg.topic)
                    .arg(&msg.payload[..])
                    .arg(msg.timestamp)
                    .arg(ttl.as_secs())
                    .arg(msg.props_json().unwrap_or_default())
                    .ignore();
                p.cmd("ZADD").arg(TOPICS_RETAIN).arg(0).arg(&*msg.topic).ignore();
            }
            // Not guarded by msgid yet: the topic index entry would have to go in the same
            // script, and the two keys live in different cluster slots.
            WriteOp::RetainDelete { topic, .. } => {
                p.cmd("DEL").arg(format!("mqtt:retain:{topic}")).ignore();
                p.cmd("ZREM").arg(TOPICS_RETAIN).arg(&**topic).ignore();
            }
            WriteOp::AdvancePointer { clientid, filters, msgid } => {
                for f in filters.iter() {
                    p.cmd("EVAL")
                        .arg(ADVANCE_LUA)
                        .arg(1)
                        .arg(format!("mqtt:acked:{clientid}:{f}"))
                        .arg(pad(*msgid))
                        .ignore();
                }
            }
            WriteOp::DeletePointer { clientid, filter } => {
                p.cmd("DEL").arg(format!("mqtt:acked:{clientid}:{filter}")).ignore();
                p.cmd("SREM").arg(pointer_index(clientid)).arg(&**filter).ignore();
            }
            // Expanded by `write` into one DEL per pointer of the client's index.
            WriteOp::DeletePointers { .. } => {}
            WriteOp::DeleteMessage { msgid, topic } => {
                p.cmd("DEL").arg(format!("mqtt:msg:{msgid}")).ignore();
                p.cmd("ZREM").arg(format!("mqtt:msg:{topic}")).arg(pad(*msgid)).ignore();
            }
            WriteOp::DeleteLatest { topic, msgid } => {
                p.cmd("EVAL")
                    .arg(DEL_IF_ID_LUA)
                    .arg(1)
                    .arg(format!("mqtt:latest_msg:{topic}"))
                    .arg(msgid.to_string())
                    .ignore();
            }
            WriteOp::Custom(c) => {
                for (_, a) in c.pending() {
                    let Some((name, rest)) = a.split_first() else { continue };
                    let mut cmd = redis::cmd(&String::from_utf8_lossy(&name.to_bytes()));
                    for x in rest {
                        cmd.arg(x.to_bytes());
                    }
                    p.add_command(cmd).ignore();
                }
            }
        }
    }

    /// One step of a walk over the topics of `index` matching `filter`, in name order: of the
    /// `n` index entries after `from`, those that match, and where the next step starts (`None`:
    /// the walk is done). A filter without wildcards is its only topic.
    async fn topics_step(&self, index: &str, filter: &str, from: Option<&str>, n: usize) -> BResult<(Vec<String>, Option<String>)> {
        if !topic::has_wildcards(filter) {
            return Ok((if from.is_none() { vec![filter.to_string()] } else { Vec::new() }, None));
        }
        let (lo, hi) = match topic::prefix_range(filter) {
            Some((lo, hi)) => (format!("[{lo}"), format!("({hi}")),
            None => ("-".to_string(), "+".to_string()),
        };
        let lo = from.map_or(lo, |t| format!("({t}"));
        let names: Vec<String> = self
            .run(redis::cmd("ZRANGEBYLEX").arg(index).arg(lo).arg(hi).arg("LIMIT").arg(0).arg(n))
            .await?;
        let next = (names.len() >= n).then(|| names.last().cloned()).flatten();
        Ok((names.into_iter().filter(|t| topic::matches(t, filter)).collect(), next))
    }

    /// Reads message hashes; ids whose hash expired are removed from their topic set lazily.
    async fn load_hashes(&self, keyed: Vec<(String, String, String)>) -> BResult<Vec<StoredMessage>> {
        if keyed.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for (key, _, _) in &keyed {
            p.cmd("HGETALL").arg(key);
        }
        let maps: Vec<HashMap<String, Vec<u8>>> = self.run_pipe(&p).await?;
        let mut out = Vec::new();
        let mut stale = redis::pipe();
        let mut any_stale = false;
        for ((_, zkey, member), m) in keyed.into_iter().zip(maps) {
            match parse_message(&m) {
                Some(msg) => out.push(msg),
                None if !zkey.is_empty() => {
                    stale.cmd("ZREM").arg(zkey).arg(member).ignore();
                    any_stale = true;
                }
                None => {}
            }
        }
        if any_stale {
            let _ = self.run_pipe::<()>(&stale).await;
        }
        Ok(out)
    }

    /// [`Source::scan`] of the stored messages: the matching topics' id sets merged in msgid
    /// order. Each round trip asks a chunk of topics for their nearest `want` ids; what lies
    /// beyond a topic's last returned id is unknown, so only ids up to the nearest such edge
    /// (`bound`) are complete, and the chunks after narrow their ranges to it. Memory: at most
    /// [`IDS_PER_TRIP`] ids per round trip and `want` kept.
    async fn scan_ids(&self, filter: &str, span: Span, desc: bool, want: usize) -> BResult<Scanned> {
        let want = want.max(1);
        // Ids older than the time bound cannot have arrived in time: skip them unseen.
        let mut lo = span.after;
        if span.since > i64::MIN {
            lo = lo.max(first_id_at(span.since.saturating_sub(ARRIVED_AFTER_ID_MS)).saturating_sub(1));
        }
        let hi = span.upto;
        if lo >= hi {
            return Ok(Scanned::default());
        }
        // Ascending: every id in (lo, bound] is known; descending: every id in [bound, hi].
        let mut bound = if desc { lo + 1 } else { hi };
        let mut found: BTreeMap<u64, std::sync::Arc<str>> = BTreeMap::new();
        let mut gone = Vec::new();
        let chunk = (IDS_PER_TRIP / want).clamp(1, PAGE);
        let mut from: Option<String> = None;
        loop {
            let (topics, next) = self.topics_step(TOPICS_MSG, filter, from.as_deref(), chunk).await?;
            // A query over a whole set that finds nothing: the set expired.
            let whole = lo == 0 && if desc { hi == u64::MAX && bound == 1 } else { bound == u64::MAX };
            if !topics.is_empty() {
                let mut p = redis::pipe();
                for t in &topics {
                    let key = format!("mqtt:msg:{t}");
                    if desc {
                        p.cmd("ZREVRANGEBYLEX")
                            .arg(key)
                            .arg(format!("[{}", pad(hi)))
                            .arg(format!("[{}", pad(bound)))
                    } else {
                        p.cmd("ZRANGEBYLEX")
                            .arg(key)
                            .arg(format!("({}", pad(lo)))
                            .arg(format!("[{}", pad(bound)))
                    }
                    .arg("LIMIT")
                    .arg(0)
                    .arg(want);
                }
                let replies: Vec<Vec<String>> = self.run_pipe(&p).await?;
                for (t, ids) in topics.into_iter().zip(replies) {
                    if ids.is_empty() && whole {
                        gone.push(t);
                        continue;
                    }
                    let full = ids.len() >= want;
                    let t: std::sync::Arc<str> = t.into();
                    let mut edge = None;
                    for id in ids.iter().filter_map(|i| i.parse::<u64>().ok()) {
                        found.insert(id, t.clone());
                        edge = Some(id);
                    }
                    if let (true, Some(e)) = (full, edge) {
                        bound = if desc { bound.max(e) } else { bound.min(e) };
                    }
                }
                // Keep the complete part, and of it only the `want` nearest: once that many are
                // known, nothing beyond the farthest of them matters either.
                if desc {
                    found = found.split_off(&bound);
                    while found.len() > want {
                        found.pop_first();
                    }
                    if found.len() == want {
                        bound = bound.max(found.first_key_value().map_or(bound, |(k, _)| *k));
                    }
                } else {
                    if bound < u64::MAX {
                        drop(found.split_off(&(bound + 1)));
                    }
                    while found.len() > want {
                        found.pop_last();
                    }
                    if found.len() == want {
                        bound = bound.min(found.last_key_value().map_or(bound, |(k, _)| *k));
                    }
                }
            }
            match next {
                Some(t) => from = Some(t),
                None => break,
            }
        }
        if !gone.is_empty() {
            let mut p = redis::pipe();
            for t in gone {
                p.cmd("ZREM").arg(TOPICS_MSG).arg(t).ignore();
            }
            let _ = self.run_pipe::<()>(&p).await;
        }
        let more = found.len() == want || if desc { bound > lo + 1 } else { bound < hi };
        let mut rows: Vec<(u64, String)> = found.into_iter().map(|(id, t)| (id, t.to_string())).collect();
        if desc {
            rows.reverse();
        }
        if span.since > i64::MIN {
            rows = self.arrived_since(rows, span.since).await?;
        }
        Ok(Scanned {
            rows,
            reached: more.then_some(bound),
        })
    }

    /// Of ids that passed the time bound, those whose message really arrived since `since`:
    /// only ids near the bound need their `ts` read (no payload), the others are certain.
    async fn arrived_since(&self, rows: Vec<(u64, String)>, since: i64) -> BResult<Vec<(u64, String)>> {
        let unsure = |id: u64| id_time(id) < since.saturating_add(ARRIVED_BEFORE_ID_MS);
        let mut p = redis::pipe();
        for (id, _) in rows.iter().filter(|(id, _)| unsure(*id)) {
            p.cmd("HGET").arg(format!("mqtt:msg:{id}")).arg("ts");
        }
        if p.cmd_iter().next().is_none() {
            return Ok(rows);
        }
        let ts: Vec<Option<String>> = self.run_pipe(&p).await?;
        let mut ts = ts.into_iter();
        Ok(rows
            .into_iter()
            .filter(|(id, _)| !unsure(*id) || ts.next().flatten().and_then(|t| t.parse::<i64>().ok()).is_some_and(|t| t >= since))
            .collect())
    }

    /// Keep-latest fetch: one hash per topic, so it walks the topic index a page of topics at
    /// a time (each page in msgid order). Opening reads ids and times only (`HMGET id ts`) to
    /// fix the newest msgid and, with `max_returned_count` N, the Nth newest (keeping at most
    /// N ids, 8 bytes each).
    async fn latest_page(&self, req: &FetchRequest, cursor: Option<&Cursor>) -> BResult<Page> {
        let filter = &*req.filter;
        let since = req.since();
        let Some(c) = cursor else {
            let cap = req.opts.max_returned_count.map(|n| n as usize);
            let mut newest: Option<u64> = None;
            let mut nearest: BinaryHeap<std::cmp::Reverse<u64>> = BinaryHeap::new();
            let mut from: Option<String> = None;
            loop {
                let (topics, next) = self.topics_step(TOPICS_LATEST, filter, from.as_deref(), PAGE).await?;
                for (_, id) in self.latest_ids(topics, since).await? {
                    newest = newest.max(Some(id));
                    if let Some(n) = cap {
                        nearest.push(std::cmp::Reverse(id));
                        if nearest.len() > n {
                            nearest.pop();
                        }
                    }
                }
                match next {
                    Some(t) => from = Some(t),
                    None => break,
                }
            }
            let after = match (cap, nearest.peek()) {
                (Some(n), Some(std::cmp::Reverse(nth))) if nearest.len() == n => nth - 1,
                _ => 0,
            };
            return Ok(Page {
                msgs: Vec::new(),
                next: newest.map(|upto| Cursor { after, upto, topic: None }),
            });
        };
        let (topics, next) = self.topics_step(TOPICS_LATEST, filter, c.topic.as_deref(), PAGE).await?;
        // Ids first: only the hashes this page delivers are loaded.
        let keyed = self
            .latest_ids(topics, since)
            .await?
            .into_iter()
            .filter(|(_, id)| *id > c.after && *id <= c.upto)
            .map(|(t, _)| (format!("mqtt:latest_msg:{t}"), String::new(), String::new()))
            .collect();
        let mut msgs = self.load_hashes(keyed).await?;
        msgs.retain(|m| m.msgid > c.after && m.msgid <= c.upto && m.arrived >= since);
        msgs.sort_by_key(|m| m.msgid);
        Ok(Page {
            msgs,
            next: next.map(|t| Cursor {
                topic: Some(t),
                ..c.clone()
            }),
        })
    }

    /// The keep-latest msgid of each of `topics` whose message arrived since `since` (ids and
    /// times only, one round trip).
    async fn latest_ids(&self, topics: Vec<String>, since: i64) -> BResult<Vec<(String, u64)>> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for t in &topics {
            p.cmd("HMGET").arg(format!("mqtt:latest_msg:{t}")).arg("id").arg("ts");
        }
        let replies: Vec<Vec<Option<String>>> = self.run_pipe(&p).await?;
        Ok(topics
            .into_iter()
            .zip(replies)
            .filter_map(|(t, r)| {
                let num = |i: usize| r.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
                match (num(0), num(1)) {
                    (Some(id), Some(ts)) if id > 0 && ts >= since => Some((t, id as u64)),
                    _ => None,
                }
            })
            .collect())
    }

    /// Retained lookup: a page of matching topics of the index per call, one copy per topic.
    async fn retained_step(&self, filter: &str, cursor: Option<&Cursor>) -> BResult<Page> {
        let Some(c) = cursor else {
            return Ok(Page {
                msgs: Vec::new(),
                next: Some(Cursor {
                    after: 0,
                    upto: u64::MAX,
                    topic: None,
                }),
            });
        };
        let (topics, next) = self.topics_step(TOPICS_RETAIN, filter, c.topic.as_deref(), PAGE).await?;
        let keyed = topics
            .into_iter()
            .map(|t| (format!("mqtt:retain:{t}"), String::new(), String::new()))
            .collect();
        let mut msgs = self.load_hashes(keyed).await?;
        for m in &mut msgs {
            m.retain = true;
        }
        Ok(Page {
            msgs,
            next: next.map(|t| Cursor {
                topic: Some(t),
                ..c.clone()
            }),
        })
    }
}

impl Source for RedisBackend {
    fn pointer<'a>(&'a self, clientid: &'a str, filter: &'a str) -> BoxFuture<'a, BResult<Option<u64>>> {
        Box::pin(async move {
            let ptr: Option<String> = self.run(redis::cmd("GET").arg(format!("mqtt:acked:{clientid}:{filter}"))).await?;
            Ok(ptr.and_then(|p| p.parse::<u64>().ok()))
        })
    }

    fn create_pointer<'a>(&'a self, clientid: &'a str, filter: &'a str, msgid: u64) -> BoxFuture<'a, BResult<()>> {
        Box::pin(async move {
            // The client's index of pointers lets a session end delete them all without a
            // keyspace scan (`DeletePointers`).
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(format!("mqtt:acked:{clientid}:{filter}"))
                .arg(pad(msgid))
                .arg("NX")
                .ignore();
            p.cmd("SADD").arg(pointer_index(clientid)).arg(filter).ignore();
            let _: Value = self.run_pipe(&p).await?;
            Ok(())
        })
    }

    fn scan<'a>(&'a self, table: Table, filter: &'a str, span: Span, desc: bool, want: usize) -> BoxFuture<'a, BResult<Scanned>> {
        Box::pin(async move {
            match table {
                Table::Msg => self.scan_ids(filter, span, desc, want).await,
                // Keyed by topic in Redis: read by walking the topic index instead.
                other => Err(BackendError::permanent(format!("redis does not page {} by msgid", other.name()))),
            }
        })
    }

    fn load<'a>(&'a self, _table: Table, rows: &'a [(u64, String)]) -> BoxFuture<'a, BResult<Vec<StoredMessage>>> {
        let keyed = rows
            .iter()
            .map(|(id, t)| (format!("mqtt:msg:{id}"), format!("mqtt:msg:{t}"), pad(*id)))
            .collect();
        Box::pin(self.load_hashes(keyed))
    }
}

/// Stores a run of messages with per-topic commands grouped (exactly the keys of
/// `WriteOp::StoreMessage`, fewer round-trip commands).
fn store_run(p: &mut Pipeline, ops: &[WriteOp]) {
    let mut per_topic: Vec<(&str, u64, Vec<String>)> = Vec::new();
    for op in ops {
        let WriteOp::StoreMessage { msg, ttl } = op else { continue };
        let key = format!("mqtt:msg:{}", msg.msgid);
        hset_message(p, &key, msg);
        p.cmd("EXPIRE").arg(&key).arg(ttl.as_secs()).ignore();
        match per_topic.iter_mut().find(|(t, _, _)| *t == &*msg.topic) {
            Some((_, t, ids)) => {
                *t = (*t).max(ttl.as_secs());
                ids.push(pad(msg.msgid));
            }
            None => per_topic.push((&msg.topic, ttl.as_secs(), vec![pad(msg.msgid)])),
        }
    }
    for (topic, ttl, ids) in &per_topic {
        let zkey = format!("mqtt:msg:{topic}");
        let zadd = p.cmd("ZADD").arg(&zkey);
        for id in ids {
            zadd.arg(0).arg(id);
        }
        zadd.ignore();
        p.cmd("EXPIRE").arg(&zkey).arg(*ttl).ignore();
    }
    if !per_topic.is_empty() {
        let idx = p.cmd("ZADD").arg(TOPICS_MSG);
        for (topic, _, _) in &per_topic {
            idx.arg(0).arg(*topic);
        }
        idx.ignore();
    }
}

fn hset_message(p: &mut Pipeline, key: &str, m: &Message) {
    p.cmd("HSET")
        .arg(key)
        .arg("id")
        .arg(m.msgid)
        .arg("from")
        .arg(&*m.sender)
        .arg("qos")
        .arg(m.qos)
        .arg("topic")
        .arg(&*m.topic)
        .arg("payload")
        .arg(&m.payload[..])
        .arg("ts")
        .arg(m.timestamp)
        .arg("retain")
        .arg(if m.retain { "true" } else { "false" })
        .ignore();
    if let Some(props) = m.props_json() {
        p.cmd("HSET").arg(key).arg("props").arg(props).ignore();
    }
}

fn parse_message(m: &HashMap<String, Vec<u8>>) -> Option<StoredMessage> {
    let s = |k: &str| m.get(k).and_then(|v| std::str::from_utf8(v).ok());
    Some(StoredMessage {
        msgid: s("id")?.parse().ok()?,
        sender: s("from").unwrap_or("").to_string(),
        topic: s("topic")?.to_string(),
        payload: m.get("payload").cloned().unwrap_or_default().into(),
        qos: s("qos").and_then(|q| q.parse::<u8>().ok()).unwrap_or(0).min(2),
        retain: s("retain") == Some("true"),
        arrived: s("ts").and_then(|t| t.parse().ok()).unwrap_or(0),
        props: s("props").and_then(crate::model::MsgProps::from_json),
    })
}

impl Backend for RedisBackend {
    fn label(&self) -> &str {
        &self.label
    }

    fn write_concurrency(&self) -> usize {
        self.settings.write_concurrency
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp]) -> BoxFuture<'a, BResult<Written>> {
        Box::pin(async move {
            // One pipeline in op order, custom command lists included (with or without their
            // "pipeline" element: per-client order holds either way). Redis runs every command
            // of a pipeline whatever the others answer, so each reply is read on its own: a
            // refused command fails only its op (logged, counted), and nothing runs twice.
            // The pointers of clients whose session ended, read first (a pipeline cannot).
            let mut ended: Vec<(usize, Vec<String>)> = Vec::new();
            for (k, op) in ops.iter().enumerate() {
                if let WriteOp::DeletePointers { clientid } = op {
                    let filters: Vec<String> = self.run(redis::cmd("SMEMBERS").arg(pointer_index(clientid))).await?;
                    ended.push((k, filters));
                }
            }
            let mut p = redis::pipe();
            // The ops each range of commands belongs to: (end of the range, first op, last op).
            let mut owners: Vec<(usize, usize, usize)> = Vec::new();
            let mut i = 0;
            while i < ops.len() {
                let j = match &ops[i] {
                    WriteOp::StoreMessage { .. } => {
                        // A run of stores: one hash + TTL per message, then per topic one
                        // multi-member ZADD, one EXPIRE and one index entry.
                        let j = ops[i..]
                            .iter()
                            .position(|o| !matches!(o, WriteOp::StoreMessage { .. }))
                            .map_or(ops.len(), |k| i + k);
                        store_run(&mut p, &ops[i..j]);
                        j
                    }
                    WriteOp::DeletePointers { clientid } => {
                        for (_, filters) in ended.iter().filter(|(k, _)| *k == i) {
                            for f in filters {
                                p.cmd("DEL").arg(format!("mqtt:acked:{clientid}:{f}")).ignore();
                            }
                        }
                        p.cmd("DEL").arg(pointer_index(clientid)).ignore();
                        i + 1
                    }
                    op => {
                        Self::add_op(&mut p, op);
                        i + 1
                    }
                };
                owners.push((p.cmd_iter().count(), i, j - 1));
                i = j;
            }
            let n = p.cmd_iter().count();
            let mut written = Written::default();
            if n == 0 {
                return Ok(written);
            }
            let replies = self.run_pipe_raw(&p, n).await?;
            let mut first = 0;
            for (end, lo, hi) in owners {
                let errors: Vec<RedisError> = replies
                    .get(first..end)
                    .unwrap_or_default()
                    .iter()
                    .filter(|v| matches!(v, Value::ServerError(_)))
                    .filter_map(|v| v.clone().extract_error().err())
                    .collect();
                first = end;
                if errors.is_empty() {
                    continue;
                }
                if let Some(e) = errors.iter().find(|e| transient_reply(e)) {
                    // The server is failing over or loading: not the data's fault, retry.
                    return Err(BackendError::transient(e.to_string()));
                }
                for e in &errors {
                    tracing::warn!(pool = %self.label, error = %e, "redis command refused");
                }
                written.refused.extend(lo..=hi);
            }
            Ok(written)
        })
    }

    fn fetch<'a>(&'a self, req: &'a FetchRequest, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
        match req.kind {
            FetchKind::KeepLatest => Box::pin(self.latest_page(req, cursor)),
            FetchKind::Pointer | FetchKind::Queue => Box::pin(fetch_page(self, req, cursor)),
        }
    }

    fn retained<'a>(&'a self, filter: &'a str, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
        Box::pin(self.retained_step(filter, cursor))
    }

    fn subscriptions<'a>(&'a self, clientid: &'a str) -> BoxFuture<'a, BResult<Vec<(String, u8)>>> {
        Box::pin(async move {
            let m: HashMap<String, String> = self.run(redis::cmd("HGETALL").arg(format!("mqtt:sub:{clientid}"))).await?;
            let mut v: Vec<(String, u8)> = m
                .into_iter()
                .map(|(t, q)| (t, q.trim().parse::<i64>().unwrap_or(0).clamp(0, 2) as u8))
                .collect();
            v.sort();
            Ok(v)
        })
    }

    fn delete_expired(&self, before_ms: i64) -> BoxFuture<'_, BResult<u64>> {
        Box::pin(async move {
            // msgids start with their ms timestamp: everything below this id is older.
            let bound = pad((before_ms.max(0) as u64) << 22);
            let topics: Vec<String> = self.run(redis::cmd("ZRANGEBYLEX").arg(TOPICS_MSG).arg("-").arg("+")).await?;
            let mut total = 0u64;
            // In chunks: a topic with a million old messages is a million keys, and one reply
            // or pipeline of that size would stall the server and this pool.
            const CHUNK: usize = 1000;
            for t in topics {
                let zkey = format!("mqtt:msg:{t}");
                loop {
                    let old: Vec<String> = self
                        .run(
                            redis::cmd("ZRANGEBYLEX")
                                .arg(&zkey)
                                .arg("-")
                                .arg(format!("({bound}"))
                                .arg("LIMIT")
                                .arg(0)
                                .arg(CHUNK),
                        )
                        .await?;
                    let Some(last) = old.last() else { break };
                    let mut p = redis::pipe();
                    for id in &old {
                        p.cmd("DEL").arg(format!("mqtt:msg:{}", id.parse::<u64>().unwrap_or(0))).ignore();
                    }
                    p.cmd("ZREMRANGEBYLEX").arg(&zkey).arg("-").arg(format!("[{last}")).ignore();
                    self.run_pipe::<()>(&p).await?;
                    total += old.len() as u64;
                    if old.len() < CHUNK {
                        break;
                    }
                }
            }
            Ok(total)
        })
    }

    fn ping(&self) -> BoxFuture<'_, BResult<()>> {
        Box::pin(async move { self.run::<String>(&redis::cmd("PING")).await.map(|_| ()) })
    }

    fn start_control(&self, sink: ControlSink) {
        if self.settings.kind == Kind::Cluster {
            return;
        }
        let settings = self.settings.clone();
        let label = self.label.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = control_loop(settings, label, sink) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

/// A rule's `commands` list: each command compiled by EMQX's tokenizing rules, sent in order
/// in the pool's pipeline (a leading `"pipeline"` item is accepted and changes nothing: every
/// batch is one pipeline).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CommandsAction {
    pub pipeline: bool,
    pub commands: Vec<Command>,
}

impl CommandsAction {
    pub fn compile(items: &[&str], hook: Hook) -> Result<std::sync::Arc<dyn CustomAction>, String> {
        let pipeline = items.first().is_some_and(|s| s.eq_ignore_ascii_case("pipeline"));
        let commands = items
            .iter()
            .skip(usize::from(pipeline))
            .map(|c| Command::compile(c, hook).map_err(|e| format!("in `{c}`: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if commands.is_empty() {
            return Err("`action.commands` holds only \"pipeline\": list the commands to send after it".into());
        }
        Ok(std::sync::Arc::new(CommandsAction { pipeline, commands }))
    }

    pub fn revive(spooled: &serde_json::Value) -> Result<std::sync::Arc<dyn CustomAction>, String> {
        let a: CommandsAction = serde_json::from_value(spooled.clone()).map_err(|e| format!("a spooled commands action: {e}"))?;
        Ok(std::sync::Arc::new(a))
    }
}

impl CustomAction for CommandsAction {
    /// Each command's arguments, each a separate binary-safe value.
    fn bind(&self, ev: &Event, node: &std::sync::Arc<str>) -> Vec<Vec<model::Value>> {
        self.commands
            .iter()
            .map(|c| c.bind(ev, node).into_iter().map(|a| model::Value::Bytes(a.into())).collect())
            .collect()
    }

    fn spool(&self) -> serde_json::Value {
        serde_json::json!({ "commands": self.commands, "pipeline": self.pipeline })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The control channel: JSON commands published to `channel` act on connected clients.
async fn control_loop(s: RedisSettings, label: String, sink: ControlSink) {
    let mut logged = false;
    loop {
        let r: Result<(), RedisError> = async {
            let client = s.data_client().await?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&s.channel).await?;
            tracing::info!(pool = %label, channel = %s.channel, "listening on the control channel");
            logged = false;
            let mut stream = ps.on_message();
            while let Some(msg) = stream.next().await {
                let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                match parse_control(&payload) {
                    Ok((clientid, cmd)) => {
                        if !sink(&clientid, cmd) {
                            tracing::debug!(pool = %label, %clientid, "control command for a client not connected here");
                        }
                    }
                    Err(e) => tracing::warn!(pool = %label, error = %e, "ignoring a bad control message"),
                }
            }
            Err(RedisError::from((redis::ErrorKind::IoError, "control channel closed")))
        }
        .await;
        if let Err(e) = r {
            if !logged {
                tracing::warn!(pool = %label, error = %e, "control channel down; reconnecting");
                logged = true;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `{"type":"subscribe","topic":"t","clientid":"c","qos":1}` (qos may be a string; missing = 0).
pub fn parse_control(payload: &[u8]) -> Result<(String, Control), String> {
    let v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("invalid JSON: {e}"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("missing string field `{k}`"))
    };
    let clientid = field("clientid")?;
    let filter = field("topic")?;
    let qos = match v.get("qos") {
        None | Some(serde_json::Value::Null) => 0,
        Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(serde_json::Value::String(s)) => s.trim().parse().map_err(|_| format!("bad qos `{s}`"))?,
        Some(other) => return Err(format!("bad qos {other}")),
    };
    match field("type")?.as_str() {
        "subscribe" => Ok((
            clientid,
            Control::Subscribe {
                filter,
                qos: qos.min(2) as u8,
            },
        )),
        "unsubscribe" => Ok((clientid, Control::Unsubscribe { filter })),
        other => Err(format!("unknown type `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_parse_like_emqx() {
        let (c, cmd) = parse_control(br#"{"type":"subscribe","topic":"a/b","clientid":"c1","qos":"1"}"#).unwrap();
        assert_eq!(c, "c1");
        assert!(matches!(cmd, Control::Subscribe { ref filter, qos: 1 } if filter == "a/b"));
        assert!(matches!(
            parse_control(br#"{"type":"subscribe","topic":"a","clientid":"c"}"#).unwrap().1,
            Control::Subscribe { qos: 0, .. }
        ));
        assert!(matches!(
            parse_control(br#"{"type":"unsubscribe","topic":"a","clientid":"c"}"#).unwrap().1,
            Control::Unsubscribe { .. }
        ));
        assert!(parse_control(b"not json").is_err());
        assert!(parse_control(br#"{"type":"explode","topic":"a","clientid":"c"}"#).is_err());
    }

    #[test]
    fn padded_ids_sort_like_numbers() {
        let (a, b) = (pad(9_007_199_254_740_993), pad(9_007_199_254_740_992));
        assert!(a > b && a.len() == 20);
    }
}
