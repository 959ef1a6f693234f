//! The `Backend` trait every database implements, and the shared write queue in front of it.
//!
//! A backend knows how to apply an ordered batch of [`WriteOp`]s and answer the reads that
//! on-subscribe and on-connect rules need. Everything generic — batching, retries, no-loss
//! acknowledgements, metrics — lives in [`queue`] once, for all databases.

use crate::actions::{Command, Statement};
use crate::config::{OfflineOpts, PoolConf};
use crate::hooks::{Message, Value};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

pub mod b64;
pub mod deadletter;
pub mod health;
#[cfg(feature = "pgsql")]
pub mod pgsql;
pub mod queue;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "tls")]
pub mod tls;

/// One write, in the order the broker produced it. Every builtin op is idempotent, so a batch
/// can be retried after an error whose outcome is unknown. Custom `Statements` / `Commands` are
/// the user's and may not be: a backend that commits op by op reports the committed prefix
/// ([`BackendError::applied`], and [`BackendError::partial`] inside the next op's list) so the
/// retry skips it; what it cannot vouch for runs again (at least once). Serializable for the disk spool.
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
    RetainDelete {
        topic: Arc<str>,
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
    /// Queue model: the first ack by anyone deletes the message.
    DeleteMessage {
        msgid: u64,
        topic: Arc<str>,
    },
    DeleteLatest {
        topic: Arc<str>,
        msgid: u64,
    },
    Statements {
        stmts: Arc<[Statement]>,
        params: Vec<Vec<Value>>,
    },
    Commands {
        pipeline: bool,
        commands: Arc<[Command]>,
        args: Vec<Vec<Vec<u8>>>,
    },
}

impl WriteOp {
    /// This op without the first `n` statements of its list (they are committed); any other
    /// op as it is.
    pub fn rest_after(&self, n: usize) -> WriteOp {
        match self {
            WriteOp::Statements { stmts, params } if n > 0 => WriteOp::Statements {
                stmts: stmts.iter().skip(n).cloned().collect(),
                params: params.iter().skip(n).cloned().collect(),
            },
            other => other.clone(),
        }
    }
}

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
    /// Stored messages for a new subscription (SPEC §3.1), oldest first.
    fn fetch<'a>(&'a self, req: &'a FetchRequest) -> BoxFuture<'a, BResult<Vec<StoredMessage>>>;
    /// Retained messages whose topic matches `filter` (SPEC §3.2).
    fn retained<'a>(&'a self, filter: &'a str) -> BoxFuture<'a, BResult<Vec<StoredMessage>>>;
    /// The client's stored subscriptions `(filter, qos)`.
    fn subscriptions<'a>(&'a self, clientid: &'a str) -> BoxFuture<'a, BResult<Vec<(String, u8)>>>;
    /// Remove stored messages that arrived before `before_ms`; returns how many.
    fn delete_expired(&self, before_ms: i64) -> BoxFuture<'_, BResult<u64>>;
    /// Round-trip to the server.
    fn ping(&self) -> BoxFuture<'_, BResult<()>>;
    /// Start listening for server-side commands (Redis control channel), once the broker runs.
    fn start_control(&self, _sink: ControlSink) {}
}

/// Where control commands go: `(clientid, command)`, true if that client is connected here.
pub type ControlSink = Arc<dyn Fn(&str, crate::broker::Control) -> bool + Send + Sync>;

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
    use crate::config::Db;
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

/// Keeps the newest `max` of `msgs` (which are oldest first).
pub fn keep_newest(mut msgs: Vec<StoredMessage>, max: Option<u32>) -> Vec<StoredMessage> {
    if let Some(max) = max {
        let max = max as usize;
        if msgs.len() > max {
            msgs.drain(..msgs.len() - max);
        }
    }
    msgs
}
