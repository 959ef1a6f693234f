//! The `Backend` trait every database implements, and the shared write queue in front of it.
//!
//! A backend knows how to apply an ordered batch of [`WriteOp`]s and answer the reads that
//! on-subscribe and on-connect rules need. Everything generic — batching, retries, no-loss
//! acknowledgements, metrics — lives in [`queue`] once, for all databases.

use crate::config::{Db, OfflineOpts, PoolConf};
use crate::model::{Event, Hook, Message, StoredMessage, Value};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

pub use crate::model::ControlSink;
pub use pool::Pool;
pub use sql::SqlAction;

pub mod health;
#[cfg(feature = "pgsql")]
pub mod pgsql;
mod pool;
pub mod queue;
#[cfg(feature = "redis")]
pub mod redis;
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "tls")]
pub mod tls;

/// One write, in the order the broker produced it. Every builtin op is idempotent, so a batch
/// can be retried after an error whose outcome is unknown. Custom `Statements` / `Commands` are
/// the user's and may not be: a backend that commits op by op reports the committed prefix
/// ([`BackendError::applied`], and [`BackendError::partial`] inside the next op's list) so the
/// retry skips it; what it cannot vouch for runs again (at least once). Serializable for the disk spool.
///
/// The builtin variants are the storage model every database implements (SPEC §3); a rule's
/// own statements travel as [`WriteOp::Custom`], which only the backend that compiled them
/// looks inside.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum WriteOp {
    ClientConnected {
        clientid: Arc<str>,
        node: Arc<str>,
        connected_at: i64,
    },
    /// Applies only if the stored `online_at` equals `connected_at` (takeover guard).
    ClientDisconnected {
        clientid: Arc<str>,
        node: Arc<str>,
        connected_at: i64,
        disconnected_at: i64,
    },
    StoreMessage {
        msg: Arc<Message>,
        ttl: Duration,
    },
    StoreLatest {
        msg: Arc<Message>,
        ttl: Duration,
    },
    RetainUpsert {
        msg: Arc<Message>,
        /// Redis: the rule's `expired_time` as the retained key's TTL (zero: none; spool
        /// records written before it existed have none).
        #[serde(default)]
        ttl: Duration,
    },
    /// The empty retained publish `msgid` clears the topic: a retained message stored with a
    /// newer msgid (another node's, a later publish written first) stays. Spool records written
    /// before the field existed have 0: they delete whatever is there.
    RetainDelete {
        topic: Arc<str>,
        #[serde(default)]
        msgid: u64,
    },
    /// Move the read pointers of these filters forward to `msgid` (never backwards).
    AdvancePointer {
        clientid: Arc<str>,
        filters: Arc<[Arc<str>]>,
        msgid: u64,
    },
    DeletePointer {
        clientid: Arc<str>,
        filter: Arc<str>,
    },
    /// Every read pointer of the client: its session ended (clean start, expiry).
    DeletePointers {
        clientid: Arc<str>,
    },
    /// Queue model: the first ack by anyone deletes the message.
    DeleteMessage {
        msgid: u64,
        topic: Arc<str>,
    },
    DeleteLatest {
        topic: Arc<str>,
        msgid: u64,
    },
    /// A rule's own statements or commands with one event's values (spool records of earlier
    /// versions named it `Statements` or `Commands`).
    #[serde(alias = "Statements", alias = "Commands")]
    Custom(CustomOp),
}

impl WriteOp {
    /// Ops with equal keys are committed in the order they were queued; the writer may run
    /// others side by side. The key is the row an op changes: a client's presence, pointers and
    /// rule statements (by `client`, whose event made the op: per-client order), a topic's
    /// retained or latest value, one message (its insert and its queue-model delete). Two
    /// inserts of different messages commute: readers order them by msgid, not commit time.
    ///
    /// Computed for every queued write on the publishing connection, so it is a cheap mix, not
    /// SipHash: two rows that collide only wait for each other, which is safe.
    pub fn order_key(&self, client: &str) -> u64 {
        fn text(kind: u64, s: &str) -> u64 {
            // FNV-1a over the bytes, seeded by the kind of row.
            s.bytes().fold(0xcbf2_9ce4_8422_2325 ^ kind, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        }
        fn id(msgid: u64) -> u64 {
            // splitmix64's finalizer: neighbouring msgids spread over the whole range.
            let mut z = msgid ^ 0x9e37_79b9_7f4a_7c15;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        match self {
            WriteOp::ClientConnected { clientid, .. }
            | WriteOp::ClientDisconnected { clientid, .. }
            | WriteOp::AdvancePointer { clientid, .. }
            | WriteOp::DeletePointer { clientid, .. }
            | WriteOp::DeletePointers { clientid } => text(0, clientid),
            WriteOp::Custom(_) => text(0, client),
            WriteOp::StoreMessage { msg, .. } => id(msg.msgid),
            WriteOp::DeleteMessage { msgid, .. } => id(*msgid),
            WriteOp::StoreLatest { msg, .. } => text(2, &msg.topic),
            WriteOp::DeleteLatest { topic, .. } => text(2, topic),
            WriteOp::RetainUpsert { msg, .. } => text(3, &msg.topic),
            WriteOp::RetainDelete { topic, .. } => text(3, topic),
        }
    }

    /// For a guarded delete: the msgid below which stored rows go (`i64::MAX`: all of them).
    pub fn delete_below(msgid: u64) -> i64 {
        if msgid == 0 {
            i64::MAX
        } else {
            msgid as i64
        }
    }

    /// This op without the first `n` steps of its custom action (they are committed); any
    /// other op as it is.
    pub fn rest_after(&self, n: usize) -> WriteOp {
        match self {
            WriteOp::Custom(c) if n > 0 => WriteOp::Custom(CustomOp {
                skip: c.skip + n,
                ..c.clone()
            }),
            other => other.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Custom actions. A rule may list its own statements instead of a builtin function: `sql` for
// SQL databases, `commands` for Redis (later `cql`, a MongoDB document, a DynamoDB item). Each
// backend compiles them when the rules are bound ([`compile_custom`]); everything between the
// hook and the database (queue, batching, retries, spool, metrics) carries the compiled action
// and one event's values without looking inside.

/// A rule's own action, compiled by its database's backend.
pub trait CustomAction: Send + Sync + std::fmt::Debug + 'static {
    /// The values one event binds: a list per step (statement or command), in step order.
    fn bind(&self, ev: &Event, node: &Arc<str>) -> Vec<Vec<Value>>;
    /// The compiled action as JSON, for the spool; [`revive`] turns it back into the action.
    fn spool(&self) -> serde_json::Value;
    /// For the backend that compiled it, to get its own type back.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A custom action with the values of one event.
#[derive(Debug, Clone)]
pub struct CustomOp {
    pub action: Arc<dyn CustomAction>,
    /// One list per step.
    pub args: Vec<Vec<Value>>,
    /// Steps at the start that are finished (a retry after a partial failure runs the rest).
    pub skip: usize,
}

impl CustomOp {
    /// The action as the type its backend compiled, `None` if another backend compiled it.
    pub fn compiled<T: 'static>(&self) -> Option<&T> {
        self.action.as_any().downcast_ref()
    }

    /// The values of the steps still to run, with their step index.
    pub fn pending(&self) -> impl Iterator<Item = (usize, &[Value])> {
        self.args.iter().enumerate().skip(self.skip).map(|(i, a)| (i, a.as_slice()))
    }
}

impl serde::Serialize for CustomOp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("CustomOp", 3)?;
        st.serialize_field("action", &self.action.spool())?;
        st.serialize_field("args", &self.args)?;
        st.serialize_field("skip", &self.skip)?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for CustomOp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        /// This version's record, or an earlier version's `Statements { stmts, params }` /
        /// `Commands { pipeline, commands, args }`.
        #[derive(serde::Deserialize)]
        struct Wire {
            action: Option<serde_json::Value>,
            args: Option<serde_json::Value>,
            #[serde(default)]
            skip: usize,
            stmts: Option<serde_json::Value>,
            params: Option<Vec<Vec<Value>>>,
            commands: Option<serde_json::Value>,
            pipeline: Option<bool>,
        }
        let w = Wire::deserialize(d)?;
        let (spooled, args) = if let Some(action) = w.action {
            let args = serde_json::from_value(w.args.unwrap_or_default()).map_err(D::Error::custom)?;
            (action, args)
        } else if let Some(stmts) = w.stmts {
            (serde_json::json!({ "sql": stmts }), w.params.unwrap_or_default())
        } else if let Some(commands) = w.commands {
            let raw: Vec<Vec<Vec<u8>>> = serde_json::from_value(w.args.unwrap_or_default()).map_err(D::Error::custom)?;
            let args = raw
                .into_iter()
                .map(|c| c.into_iter().map(|a| Value::Bytes(a.into())).collect())
                .collect();
            (
                serde_json::json!({ "commands": commands, "pipeline": w.pipeline.unwrap_or(false) }),
                args,
            )
        } else {
            return Err(D::Error::custom("a custom write without its action"));
        };
        let action = revive(&spooled).map_err(D::Error::custom)?;
        Ok(CustomOp {
            action,
            args,
            skip: w.skip,
        })
    }
}

/// Compiles a rule's own statements (`items`, as listed under the database's `key`) for `db`.
/// The error is the message for the rule's conf line.
pub fn compile_custom(db: Db, hook: Hook, key: &str, items: &[serde_json::Value]) -> Result<Arc<dyn CustomAction>, String> {
    match db {
        #[cfg(feature = "redis")]
        Db::Redis => redis::CommandsAction::compile(&strings(key, items)?, hook),
        Db::Sqlite | Db::Pgsql | Db::Mysql => SqlAction::compile(&strings(key, items)?, sql::param_style(db), hook),
        other => Err(format!("custom statements for `{other}` are not built into this binary yet")),
    }
}

/// The items of a language written as text (SQL, Redis commands).
fn strings<'a>(key: &str, items: &'a [serde_json::Value]) -> Result<Vec<&'a str>, String> {
    items
        .iter()
        .map(|i| i.as_str().ok_or_else(|| format!("`action.{key}` items must be strings, found {i}")))
        .collect()
}

/// A spooled action back from [`CustomAction::spool`].
pub fn revive(spooled: &serde_json::Value) -> Result<Arc<dyn CustomAction>, String> {
    if spooled.get("sql").is_some() {
        return SqlAction::revive(spooled);
    }
    #[cfg(feature = "redis")]
    if spooled.get("commands").is_some() {
        return redis::CommandsAction::revive(spooled);
    }
    Err(format!("a spooled custom action this build cannot run: {spooled}"))
}

/// Which stored-message model a fetch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchKind {
    /// One-to-many by read pointer.
    Pointer,
    /// One-to-one: everything stored; acks delete.
    Queue,
    /// Newest message per topic.
    KeepLatest,
}

#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub clientid: Arc<str>,
    pub filter: Arc<str>,
    pub kind: FetchKind,
    pub opts: OfflineOpts,
    pub now: i64,
}

impl FetchRequest {
    /// The oldest `arrived` a `time_range` lets through (`i64::MIN`: no bound).
    pub fn since(&self) -> i64 {
        self.opts
            .time_range
            .map_or(i64::MIN, |d| self.now.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Worth retrying (connection lost, timeout); otherwise the data itself was refused.
    pub transient: bool,
    pub message: String,
    /// How many ops at the start of the batch are known to be committed despite the error:
    /// the retry resumes after them, so a custom statement that already ran is not run again.
    pub applied: usize,
    /// Of the op right after those, how many custom statements at the start of its list are
    /// finished (committed or refused): the retry runs only the rest (see [`WriteOp::rest_after`]).
    pub partial: usize,
}

impl BackendError {
    pub fn new(transient: bool, message: impl Into<String>) -> Self {
        BackendError {
            transient,
            message: message.into(),
            applied: 0,
            partial: 0,
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(true, message)
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(false, message)
    }
    pub fn after(mut self, applied: usize) -> Self {
        self.applied = applied;
        self
    }
    pub fn within(mut self, partial: usize) -> Self {
        self.partial = partial;
        self
    }
}

pub type BResult<T> = Result<T, BackendError>;

/// A batch that was applied, with the ops in it where a custom statement or command was
/// refused (SPEC 2.1: logged, the next one runs), so their rules count a failure.
#[derive(Debug, Default)]
pub struct Written {
    /// Indices into the batch.
    pub refused: Vec<usize>,
}

pub trait Backend: Send + Sync + 'static {
    /// `db:pool`.
    fn label(&self) -> &str;
    /// Apply ops in order. On error the batch may be partly applied; the queue retries it from
    /// `BackendError::applied` on (builtin ops are idempotent; custom ones at least once).
    fn write<'a>(&'a self, ops: &'a [WriteOp]) -> BoxFuture<'a, BResult<Written>>;
    /// Stored messages for a new subscription (SPEC §3.1), a page at a time, oldest first.
    ///
    /// Without a cursor the fetch *opens*: a first subscription's pointer is created, and where
    /// the newest N start and the newest msgid delivered are fixed. Opening returns no
    /// messages, only the first page's cursor: it runs before the SUBACK (an unsubscribe must
    /// not overtake the pointer it creates), while pages follow the client's acks.
    fn fetch<'a>(&'a self, req: &'a FetchRequest, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>>;
    /// Retained messages whose topic matches `filter` (SPEC §3.2), paged like [`fetch`](Self::fetch).
    fn retained<'a>(&'a self, filter: &'a str, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>>;
    /// The client's stored subscriptions `(filter, qos)`.
    fn subscriptions<'a>(&'a self, clientid: &'a str) -> BoxFuture<'a, BResult<Vec<(String, u8)>>>;
    /// Remove stored messages that arrived before `before_ms`; returns how many.
    fn delete_expired(&self, before_ms: i64) -> BoxFuture<'_, BResult<u64>>;
    /// Round-trip to the server.
    fn ping(&self) -> BoxFuture<'_, BResult<()>>;
    /// Start listening for server-side commands (Redis control channel), once the broker runs.
    fn start_control(&self, _sink: ControlSink) {}
    /// How many batches the writer may have in [`write`](Self::write) at once (each on a
    /// connection of its own, or pipelined on a shared one). Ops that must stay in order
    /// ([`WriteOp::order_key`]) are never in two of them.
    fn write_concurrency(&self) -> usize {
        1
    }
}

/// Build a backend for a pool. `data_dir` anchors relative SQLite paths.
pub async fn connect(pool: &PoolConf, data_dir: &std::path::Path) -> Result<Arc<dyn Backend>, crate::config::ConfError> {
    use crate::config::Db;
    match pool.db {
        #[cfg(feature = "sqlite")]
        Db::Sqlite => Ok(Arc::new(sqlite::SqliteBackend::open(pool, data_dir)?)),
        #[cfg(feature = "pgsql")]
        Db::Pgsql => Ok(Arc::new(pgsql::PgBackend::connect(pool).await?)),
        #[cfg(feature = "redis")]
        Db::Redis => Ok(Arc::new(redis::RedisBackend::connect(pool).await?)),
        other => {
            let _ = data_dir;
            Err(pool.error(
                "",
                format!("backend `{other}` is not built into this binary yet (pool {})", pool.name),
            ))
        }
    }
}

/// Validate a pool's settings without connecting (used by `check`).
pub fn validate(pool: &PoolConf) -> Result<(), crate::config::ConfError> {
    match pool.db {
        #[cfg(feature = "sqlite")]
        Db::Sqlite => sqlite::SqliteSettings::parse(pool, std::path::Path::new(".")).map(|_| ()),
        #[cfg(feature = "pgsql")]
        Db::Pgsql => pgsql::PgSettings::parse(pool).map(|_| ()),
        #[cfg(feature = "redis")]
        Db::Redis => redis::RedisSettings::parse(pool).map(|_| ()),
        other => Err(pool.error("", format!("backend `{other}` is not built into this binary yet"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Paged reads. A fetch or retained lookup delivers its stored messages a page at a time, so a
// subscriber of `#` over millions of stored messages costs one page of memory, not all of them.
// The paging logic lives here once; a database answers four small questions ([`Source`]).

/// Messages per page of a fetch or retained lookup.
pub const PAGE: usize = 256;

/// SQL scans read this many rows per match wanted: the topic prefix only narrows and matching
/// is exact in Rust, so a page usually fills (a short one just means the next goes on).
pub(crate) const SCAN_ROWS_PER_MATCH: usize = 4;

/// Where a paged read goes on, made by the backend when the read opens and handed back for
/// each page. Opaque to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Every msgid up to this one was scanned (the next page starts above it).
    pub(crate) after: u64,
    /// The newest msgid the read delivers, fixed when it opened: what is stored later arrives
    /// live, never also from storage.
    pub(crate) upto: u64,
    /// Reads that walk a topic index instead (Redis retained and keep-latest): the last topic
    /// scanned, `None` at the start.
    pub(crate) topic: Option<String>,
}

/// One page of a paged read: at most [`PAGE`] messages, oldest first (a Redis retained page in
/// topic order), and where the next page starts (`None`: this was the last). A page may be
/// empty and still have a next one.
#[derive(Debug, Default)]
pub struct Page {
    pub msgs: Vec<StoredMessage>,
    pub next: Option<Cursor>,
}

/// The tables a read pages through by msgid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Msg,
    Latest,
    Retain,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Msg => "mqtt_msg",
            Table::Latest => "mqtt_latest",
            Table::Retain => "mqtt_retain",
        }
    }
}

/// The rows a scan covers: `after < msgid <= upto` and `arrived >= since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub after: u64,
    pub upto: u64,
    pub since: i64,
}

impl Span {
    pub const ALL: Span = Span {
        after: 0,
        upto: u64::MAX,
        since: i64::MIN,
    };
}

/// What one bounded scan found.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// `(msgid, topic)` in scan order: candidates, which may include topics the filter does
    /// not match (SQL narrows by the topic prefix only).
    pub rows: Vec<(u64, String)>,
    /// The last msgid the scan went through, when the span may hold more beyond it; `None`
    /// when the span is exhausted.
    pub reached: Option<u64>,
}

/// What a database answers for a paged read; [`fetch_page`] and [`retained_page`] do the rest,
/// the same for every database. Each call is one bounded query, holding no connection after it.
pub(crate) trait Source: Send + Sync {
    /// The client's read pointer for `filter`.
    fn pointer<'a>(&'a self, clientid: &'a str, filter: &'a str) -> BoxFuture<'a, BResult<Option<u64>>>;
    /// Creates the pointer at `msgid` unless it exists.
    fn create_pointer<'a>(&'a self, clientid: &'a str, filter: &'a str, msgid: u64) -> BoxFuture<'a, BResult<()>>;
    /// Candidate rows for `filter` in `span`, newest first if `desc`: enough for `want` matches
    /// when the table holds them (ids only, no payloads).
    fn scan<'a>(&'a self, table: Table, filter: &'a str, span: Span, desc: bool, want: usize) -> BoxFuture<'a, BResult<Scanned>>;
    /// The messages of rows `scan` returned, in any order; rows gone since are left out.
    fn load<'a>(&'a self, table: Table, rows: &'a [(u64, String)]) -> BoxFuture<'a, BResult<Vec<StoredMessage>>>;
}

/// [`Backend::fetch`] over a [`Source`].
pub(crate) async fn fetch_page<S: Source + ?Sized>(src: &S, req: &FetchRequest, cursor: Option<&Cursor>) -> BResult<Page> {
    let table = match req.kind {
        FetchKind::KeepLatest => Table::Latest,
        FetchKind::Pointer | FetchKind::Queue => Table::Msg,
    };
    let since = req.since();
    match cursor {
        None => Ok(Page {
            msgs: Vec::new(),
            next: open_fetch(src, req, table, since).await?,
        }),
        Some(c) => {
            let span = Span {
                after: c.after,
                upto: c.upto,
                since,
            };
            page(src, table, &req.filter, span).await
        }
    }
}

/// [`Backend::retained`] over a [`Source`]: every matching row, by msgid, up to the newest one
/// when the lookup opened (a topic updated meanwhile arrives live).
pub(crate) async fn retained_page<S: Source + ?Sized>(src: &S, filter: &str, cursor: Option<&Cursor>) -> BResult<Page> {
    match cursor {
        None => {
            let (newest, _) = nth_newest(src, Table::Retain, filter, Span::ALL, 1).await?;
            Ok(Page {
                msgs: Vec::new(),
                next: newest.map(|upto| Cursor {
                    after: 0,
                    upto,
                    topic: None,
                }),
            })
        }
        Some(c) => {
            let span = Span {
                after: c.after,
                upto: c.upto,
                since: i64::MIN,
            };
            page(src, Table::Retain, filter, span).await
        }
    }
}

/// Opens a fetch (SPEC §3.1): the span its pages cover, `None` when there is nothing to deliver.
async fn open_fetch<S: Source + ?Sized>(src: &S, req: &FetchRequest, table: Table, since: i64) -> BResult<Option<Cursor>> {
    let filter = &*req.filter;
    let mut after = 0;
    if req.kind == FetchKind::Pointer {
        match src.pointer(&req.clientid, filter).await? {
            Some(p) => after = p,
            None => {
                // First subscription: the pointer starts at the newest stored message (EMQX).
                let (newest, _) = nth_newest(src, table, filter, Span::ALL, 1).await?;
                src.create_pointer(&req.clientid, filter, newest.unwrap_or(0)).await?;
                if !(req.opts.first_subscribe_time_range && req.opts.time_range.is_some()) {
                    return Ok(None);
                }
            }
        }
    }
    let span = Span {
        after,
        upto: u64::MAX,
        since,
    };
    let cap = req.opts.max_returned_count.map(|n| n as usize);
    let (newest, nth) = nth_newest(src, table, filter, span, cap.unwrap_or(1)).await?;
    let Some(upto) = newest else { return Ok(None) };
    // The newest N: pages start right below the Nth newest (all of them when fewer match).
    if let (Some(_), Some(nth)) = (cap, nth) {
        after = after.max(nth - 1);
    }
    Ok(Some(Cursor { after, upto, topic: None }))
}

/// The newest msgid matching `filter` in `span`, and the `n`th newest (`None` when fewer
/// match): an id-only scan, newest first, that stops at the `n`th.
async fn nth_newest<S: Source + ?Sized>(
    src: &S,
    table: Table,
    filter: &str,
    mut span: Span,
    n: usize,
) -> BResult<(Option<u64>, Option<u64>)> {
    let n = n.max(1);
    let (mut newest, mut seen) = (None, 0usize);
    loop {
        let scanned = src.scan(table, filter, span, true, (n - seen).min(PAGE)).await?;
        for (id, t) in &scanned.rows {
            if crate::topic::matches(t, filter) {
                newest.get_or_insert(*id);
                seen += 1;
                if seen == n {
                    return Ok((newest, Some(*id)));
                }
            }
        }
        match scanned.reached {
            Some(id) if id > span.after.saturating_add(1) => span.upto = id - 1,
            _ => return Ok((newest, None)),
        }
    }
}

/// One page: a scan ascending from the cursor, exact matching here, at most [`PAGE`] messages
/// loaded. The next page starts after the last row scanned, matching or not.
async fn page<S: Source + ?Sized>(src: &S, table: Table, filter: &str, span: Span) -> BResult<Page> {
    if span.after >= span.upto {
        return Ok(Page::default());
    }
    let scanned = src.scan(table, filter, span, false, PAGE).await?;
    let mut reached = scanned.reached;
    let mut rows = scanned.rows;
    rows.retain(|(_, t)| crate::topic::matches(t, filter));
    if rows.len() > PAGE {
        rows.truncate(PAGE);
        reached = rows.last().map(|(id, _)| *id);
    }
    let mut msgs = if rows.is_empty() {
        Vec::new()
    } else {
        src.load(table, &rows).await?
    };
    // The scan's bounds may be approximate (Redis narrows by the id's time); these are exact.
    msgs.retain(|m| m.msgid > span.after && m.msgid <= span.upto && m.arrived >= span.since && crate::topic::matches(&m.topic, filter));
    msgs.sort_by_key(|m| m.msgid);
    let next = reached.filter(|&r| r < span.upto).map(|after| Cursor {
        after,
        upto: span.upto,
        topic: None,
    });
    Ok(Page { msgs, next })
}

#[cfg(test)]
mod paging_tests {
    use super::*;
    use bytes::Bytes;
    use parking_lot::Mutex;

    /// An in-memory table: the SQL backends' contract (a prefix-narrowed superset, LIMIT rows).
    #[derive(Default)]
    struct Mem {
        rows: Vec<StoredMessage>,
        pointer: Mutex<Option<u64>>,
        scans: Mutex<usize>,
        loaded: Mutex<usize>,
    }

    impl Source for Mem {
        fn pointer<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, BResult<Option<u64>>> {
            Box::pin(async move { Ok(*self.pointer.lock()) })
        }
        fn create_pointer<'a>(&'a self, _: &'a str, _: &'a str, msgid: u64) -> BoxFuture<'a, BResult<()>> {
            Box::pin(async move {
                self.pointer.lock().get_or_insert(msgid);
                Ok(())
            })
        }
        fn scan<'a>(&'a self, _: Table, _: &'a str, span: Span, desc: bool, want: usize) -> BoxFuture<'a, BResult<Scanned>> {
            Box::pin(async move {
                *self.scans.lock() += 1;
                let limit = want * 2;
                let mut rows: Vec<(u64, String)> = self
                    .rows
                    .iter()
                    .filter(|m| m.msgid > span.after && m.msgid <= span.upto && m.arrived >= span.since)
                    .map(|m| (m.msgid, m.topic.clone()))
                    .collect();
                rows.sort();
                if desc {
                    rows.reverse();
                }
                rows.truncate(limit);
                let reached = (rows.len() == limit).then(|| rows.last().map(|r| r.0)).flatten();
                Ok(Scanned { rows, reached })
            })
        }
        fn load<'a>(&'a self, _: Table, rows: &'a [(u64, String)]) -> BoxFuture<'a, BResult<Vec<StoredMessage>>> {
            Box::pin(async move {
                *self.loaded.lock() += rows.len();
                Ok(self.rows.iter().filter(|m| rows.iter().any(|r| r.0 == m.msgid)).cloned().collect())
            })
        }
    }

    fn msg(msgid: u64, topic: &str, arrived: i64) -> StoredMessage {
        StoredMessage {
            msgid,
            sender: "s".into(),
            topic: topic.into(),
            payload: Bytes::new(),
            qos: 1,
            retain: false,
            arrived,
            props: None,
        }
    }

    fn req(max: Option<u32>, time_range: Option<Duration>) -> FetchRequest {
        FetchRequest {
            clientid: "c".into(),
            filter: "a/#".into(),
            kind: FetchKind::Pointer,
            opts: OfflineOpts {
                max_returned_count: max,
                time_range,
                first_subscribe_time_range: false,
                clean_start_fetch: false,
            },
            now: 10_000,
        }
    }

    async fn all(src: &Mem, req: &FetchRequest) -> (Vec<u64>, usize) {
        let mut cur = fetch_page(src, req, None).await.unwrap().next;
        let (mut ids, mut pages) = (Vec::new(), 0);
        while let Some(c) = cur {
            let p = fetch_page(src, req, Some(&c)).await.unwrap();
            assert!(p.msgs.len() <= PAGE);
            ids.extend(p.msgs.iter().map(|m| m.msgid));
            cur = p.next;
            pages += 1;
        }
        (ids, pages)
    }

    /// 2000 rows, every third on a sibling topic the prefix scan also returns.
    fn mem(pointer: Option<u64>) -> Mem {
        let rows = (1..=2000u64)
            .map(|i| msg(i, if i % 3 == 0 { "ab/x" } else { "a/x" }, i as i64 * 10))
            .collect();
        Mem {
            rows,
            pointer: Mutex::new(pointer),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn pages_deliver_everything_after_the_pointer_once_in_order() {
        let src = mem(Some(100));
        let (ids, pages) = all(&src, &req(None, None)).await;
        let want: Vec<u64> = (101..=2000).filter(|i| i % 3 != 0).collect();
        assert_eq!(ids, want);
        assert!(pages > want.len() / PAGE, "paged: {pages}");
        assert_eq!(*src.loaded.lock(), want.len(), "only matching rows are loaded");
    }

    #[tokio::test]
    async fn the_newest_n_come_oldest_first_and_only_they_are_loaded() {
        let src = mem(Some(0));
        let (ids, _) = all(&src, &req(Some(10), None)).await;
        let all: Vec<u64> = (1..=2000).filter(|i| i % 3 != 0).collect();
        let want = all[all.len() - 10..].to_vec();
        assert_eq!(ids, want);
        assert_eq!(*src.loaded.lock(), 10);
    }

    #[tokio::test]
    async fn time_range_and_the_cap_combine() {
        // now = 10 000, 5 s back: arrived >= 5000, i.e. msgid >= 500.
        let src = mem(Some(0));
        let range = Some(Duration::from_secs(5));
        let (ids, _) = all(&src, &req(Some(5000), range)).await;
        let want: Vec<u64> = (500..=2000).filter(|i| i % 3 != 0).collect();
        assert_eq!(ids, want, "fewer than the cap: everything in the time range");
        let (ids, _) = all(&src, &req(Some(1000), range)).await;
        assert_eq!(ids, want[1..], "the newest 1000 of them");
    }

    #[tokio::test]
    async fn a_first_subscription_creates_the_pointer_and_delivers_nothing() {
        let src = mem(None);
        let (ids, pages) = all(&src, &req(None, None)).await;
        assert!(ids.is_empty() && pages == 0);
        assert_eq!(*src.pointer.lock(), Some(2000), "the newest matching msgid");
    }

    #[tokio::test]
    async fn messages_stored_after_the_read_opened_are_not_paged() {
        let mut src = mem(Some(1990));
        let r = req(None, None);
        let c = fetch_page(&src, &r, None).await.unwrap().next.unwrap();
        src.rows.push(msg(2001, "a/x", 20_010));
        let p = fetch_page(&src, &r, Some(&c)).await.unwrap();
        assert_eq!(
            p.msgs.iter().map(|m| m.msgid).collect::<Vec<_>>(),
            vec![1991, 1993, 1994, 1996, 1997, 1999, 2000]
        );
        assert!(p.next.is_none());
    }

    #[tokio::test]
    async fn retained_pages_cover_every_matching_row() {
        let src = mem(None);
        let mut cur = retained_page(&src, "a/#", None).await.unwrap().next;
        let mut n = 0;
        while let Some(c) = cur {
            let p = retained_page(&src, "a/#", Some(&c)).await.unwrap();
            n += p.msgs.len();
            cur = p.next;
        }
        assert_eq!(n, 2000 - 2000 / 3);
    }
}

#[cfg(test)]
mod spool_format_tests {
    use super::{compile_custom, CustomOp, WriteOp};
    use crate::model::{Message, Value};
    use std::sync::Arc;

    fn message(payload: &[u8]) -> Arc<Message> {
        Arc::new(Message {
            msgid: 42,
            sender: "dev\"1".into(),
            username: None,
            topic: "a/b".into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            qos: 1,
            retain: false,
            timestamp: 7,
            props: None,
        })
    }

    #[test]
    fn payloads_are_base64_in_the_spool_and_round_trip_verbatim() {
        let payload: Vec<u8> = (0..=255u8).chain(*b"'\"\\\n{}").collect();
        let ops = vec![
            WriteOp::RetainUpsert {
                msg: message(&payload),
                ttl: std::time::Duration::ZERO,
            },
            WriteOp::Custom(CustomOp {
                action: compile_custom(
                    crate::config::Db::Sqlite,
                    crate::model::Hook::MessagePublish,
                    "sql",
                    &["INSERT INTO t VALUES (${payload}, ${qos})".into()],
                )
                .unwrap(),
                args: vec![vec![Value::Bytes(bytes::Bytes::from_static(b"\x00\xffbin")), Value::Int(1)]],
                skip: 0,
            }),
        ];
        let line = serde_json::to_string(&ops).unwrap();
        assert!(
            line.len() < 2 * payload.len() + 300,
            "compact: {} bytes for a {} byte payload",
            line.len(),
            payload.len()
        );
        let back: Vec<WriteOp> = serde_json::from_str(&line).unwrap();
        match (&back[0], &back[1]) {
            (WriteOp::RetainUpsert { msg, .. }, WriteOp::Custom(c)) => {
                assert_eq!(&msg.payload[..], &payload[..]);
                assert_eq!(c.args[0][0], Value::Bytes(bytes::Bytes::from_static(b"\x00\xffbin")));
                let sql = c.compiled::<super::SqlAction>().expect("revived as SQL");
                assert_eq!(&*sql.stmts[0].text, "INSERT INTO t VALUES (?, ?)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spools_written_with_number_arrays_still_read() {
        let old = r#"[{"RetainUpsert":{"msg":{"msgid":42,"sender":"d","username":null,"topic":"a/b","payload":[104,105,0,255],"qos":1,"retain":false,"timestamp":7}}}]"#;
        let back: Vec<WriteOp> = serde_json::from_str(old).unwrap();
        match &back[0] {
            WriteOp::RetainUpsert { msg, .. } => assert_eq!(&msg.payload[..], b"hi\x00\xff"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn custom_writes_spooled_by_earlier_versions_still_replay() {
        let old = r#"[{"Statements":{"stmts":[{"text":"INSERT INTO t VALUES ($1)","params":["Clientid"]}],"params":[[{"Str":"c1"}]]}},{"Commands":{"pipeline":false,"commands":[{"args":[{"Literal":[83,69,84]},{"Var":"Clientid"}]}],"args":[[[83,69,84],[99,49]]]}}]"#;
        let back: Vec<WriteOp> = serde_json::from_str(old).unwrap();
        match (&back[0], &back[1]) {
            (WriteOp::Custom(sql), WriteOp::Custom(cmds)) => {
                assert_eq!(
                    &*sql.compiled::<super::SqlAction>().unwrap().stmts[0].text,
                    "INSERT INTO t VALUES ($1)"
                );
                assert_eq!(sql.args, vec![vec![Value::Str("c1".into())]]);
                #[cfg(feature = "redis")]
                assert_eq!(cmds.compiled::<super::redis::CommandsAction>().unwrap().commands.len(), 1);
                assert_eq!(
                    cmds.args,
                    vec![vec![
                        Value::Bytes(bytes::Bytes::from_static(b"SET")),
                        Value::Bytes(bytes::Bytes::from_static(b"c1"))
                    ]]
                );
            }
            other => panic!("{other:?}"),
        }
        // And what this version writes reads back the same.
        let again: Vec<WriteOp> = serde_json::from_str(&serde_json::to_string(&back).unwrap()).unwrap();
        assert!(matches!(&again[0], WriteOp::Custom(c) if c.args == vec![vec![Value::Str("c1".into())]]));
    }
}
