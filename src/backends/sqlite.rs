//! SQLite: the embedded, zero-setup default. One writer connection in WAL mode applies each
//! batch in a single transaction; a second connection serves reads while writes go on.

use super::{
    fetch_page, retained_page, BResult, Backend, BackendError, Cursor, FetchRequest, Page, Scanned, Source, Span, SqlAction, StoredMessage,
    Table, WriteOp, Written, PAGE, SCAN_ROWS_PER_MATCH,
};
use crate::config::{ConfError, PoolConf};
use crate::model::Value;
use crate::topic;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SCHEMA: &str = include_str!("../../schema/sqlite.sql");

#[derive(Debug, Clone)]
pub struct SqliteSettings {
    pub path: PathBuf,
    pub synchronous: String,
    pub busy_timeout_ms: u64,
    pub auto_create_schema: bool,
}

impl SqliteSettings {
    pub fn parse(pool: &PoolConf, data_dir: &Path) -> Result<Self, ConfError> {
        let path = match pool.str("path") {
            Some(p) => {
                let p = PathBuf::from(p);
                // `data/…` in the shipped conf follows `--data-dir`.
                match p.strip_prefix("data") {
                    Ok(rest) if p.is_relative() => data_dir.join(rest),
                    _ => p,
                }
            }
            None => data_dir.join("mqtt-persist.db"),
        };
        // `full`: a commit is on disk before its PUBACK goes out; `normal` (WAL) loses the
        // last commits on a power loss (see the shipped conf).
        let synchronous = pool.str_or("synchronous", "full").to_ascii_lowercase();
        if !["off", "normal", "full", "extra"].contains(&synchronous.as_str()) {
            return Err(pool.error(
                "synchronous",
                format!("`synchronous` must be off, normal, full or extra, found `{synchronous}`"),
            ));
        }
        Ok(SqliteSettings {
            path,
            synchronous,
            busy_timeout_ms: pool.num("busy_timeout", 5000)?,
            auto_create_schema: pool.flag("auto_create_schema", true)?,
        })
    }
}

pub struct SqliteBackend {
    label: String,
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

fn open_conn(s: &SqliteSettings) -> rusqlite::Result<Connection> {
    let c = Connection::open(&s.path)?;
    c.busy_timeout(std::time::Duration::from_millis(s.busy_timeout_ms))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", &s.synchronous)?;
    Ok(c)
}

impl SqliteBackend {
    pub fn open(pool: &PoolConf, data_dir: &Path) -> Result<Self, ConfError> {
        let s = SqliteSettings::parse(pool, data_dir)?;
        if let Some(dir) = s.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| pool.error("path", format!("cannot create {}: {e}", dir.display())))?;
        }
        let err = |e: rusqlite::Error| pool.error("path", format!("cannot open SQLite database {}: {e}", s.path.display()));
        let writer = open_conn(&s).map_err(err)?;
        if s.auto_create_schema {
            writer.execute_batch(SCHEMA).map_err(err)?;
            migrate(&writer).map_err(err)?;
        }
        let reader = open_conn(&s).map_err(err)?;
        Ok(SqliteBackend {
            label: pool.label(),
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    async fn blocking<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> BResult<T> + Send + 'static,
    ) -> BResult<T> {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| BackendError::transient(format!("sqlite task failed: {e}")))?
    }
}

/// Worth retrying: the database was busy, locked, full or unreachable, not the data refused.
fn is_transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen)
    )
}

fn classify(e: rusqlite::Error) -> BackendError {
    BackendError::new(is_transient(&e), e.to_string())
}

fn to_sql(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Int(i) => S::Integer(*i),
        Value::Str(s) => S::Text(s.to_string()),
        // Text when it is text, so user TEXT columns read naturally; verbatim bytes otherwise.
        Value::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => S::Text(s.to_string()),
            Err(_) => S::Blob(b.to_vec()),
        },
        Value::Bool(b) => S::Integer(i64::from(*b)),
    }
}

/// Applies one op; `Ok(true)` when a custom statement in it was refused (and skipped).
fn apply(tx: &rusqlite::Transaction<'_>, op: &WriteOp) -> rusqlite::Result<bool> {
    match op {
        WriteOp::ClientConnected {
            clientid,
            node,
            connected_at,
        } => {
            tx.prepare_cached(
                "INSERT INTO mqtt_client (clientid, state, node, online_at, offline_at) VALUES (?1, 1, ?2, ?3, NULL)
                 ON CONFLICT (clientid) DO UPDATE SET state = 1, node = excluded.node, online_at = excluded.online_at, offline_at = NULL
                 WHERE excluded.online_at >= coalesce(mqtt_client.online_at, 0)",
            )?
            .execute(params![&**clientid, &**node, connected_at])?;
        }
        WriteOp::ClientDisconnected {
            clientid,
            connected_at,
            disconnected_at,
            ..
        } => {
            tx.prepare_cached("UPDATE mqtt_client SET state = 0, offline_at = ?1 WHERE clientid = ?2 AND online_at = ?3")?
                .execute(params![disconnected_at, &**clientid, connected_at])?;
        }
        WriteOp::StoreMessage { msg, .. } => {
            tx.prepare_cached("INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived, props) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (msgid) DO NOTHING")?
                .execute(params![msg.msgid as i64, &*msg.sender, &*msg.topic, msg.qos, msg.retain, &msg.payload[..], msg.timestamp, msg.props_json()])?;
        }
        WriteOp::StoreLatest { msg, .. } => {
            tx.prepare_cached(
                "INSERT INTO mqtt_latest (topic, msgid, sender, qos, retain, payload, arrived, props) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (topic) DO UPDATE SET msgid = excluded.msgid, sender = excluded.sender, qos = excluded.qos, retain = excluded.retain, payload = excluded.payload, arrived = excluded.arrived, props = excluded.props
                 WHERE excluded.msgid > mqtt_latest.msgid",
            )?
            .execute(params![&*msg.topic, msg.msgid as i64, &*msg.sender, msg.qos, msg.retain, &msg.payload[..], msg.timestamp, msg.props_json()])?;
        }
        WriteOp::RetainUpsert { msg, .. } => {
            tx.prepare_cached(
                "INSERT INTO mqtt_retain (topic, msgid, sender, qos, payload, arrived, props) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (topic) DO UPDATE SET msgid = excluded.msgid, sender = excluded.sender, qos = excluded.qos, payload = excluded.payload, arrived = excluded.arrived, props = excluded.props
                 WHERE excluded.msgid >= mqtt_retain.msgid",
            )?
            .execute(params![&*msg.topic, msg.msgid as i64, &*msg.sender, msg.qos, &msg.payload[..], msg.timestamp, msg.props_json()])?;
        }
        WriteOp::RetainDelete { topic, msgid } => {
            tx.prepare_cached("DELETE FROM mqtt_retain WHERE topic = ?1 AND msgid < ?2")?
                .execute(params![&**topic, WriteOp::delete_below(*msgid)])?;
        }
        WriteOp::AdvancePointer { clientid, filters, msgid } => {
            let mut st = tx.prepare_cached("UPDATE mqtt_acked SET mid = max(mid, ?1) WHERE clientid = ?2 AND topic = ?3")?;
            for f in filters.iter() {
                st.execute(params![*msgid as i64, &**clientid, &**f])?;
            }
        }
        WriteOp::DeletePointer { clientid, filter } => {
            tx.prepare_cached("DELETE FROM mqtt_acked WHERE clientid = ?1 AND topic = ?2")?
                .execute(params![&**clientid, &**filter])?;
        }
        WriteOp::DeletePointers { clientid } => {
            tx.prepare_cached("DELETE FROM mqtt_acked WHERE clientid = ?1")?
                .execute(params![&**clientid])?;
        }
        WriteOp::DeleteMessage { msgid, .. } => {
            tx.prepare_cached("DELETE FROM mqtt_msg WHERE msgid = ?1")?
                .execute(params![*msgid as i64])?;
        }
        WriteOp::DeleteLatest { topic, msgid } => {
            tx.prepare_cached("DELETE FROM mqtt_latest WHERE topic = ?1 AND msgid = ?2")?
                .execute(params![&**topic, *msgid as i64])?;
        }
        WriteOp::Custom(c) => {
            let Some(sql) = c.compiled::<SqlAction>() else {
                tracing::warn!(action = ?c.action, "not an SQL statement list: skipped");
                return Ok(true);
            };
            let mut refused = false;
            for (i, ps) in c.pending() {
                let Some(st) = sql.stmts.get(i) else { break };
                // A failing statement is logged and the next one runs (EMQX semantics).
                let r = tx
                    .prepare_cached(&st.text)
                    .and_then(|mut s| s.execute(rusqlite::params_from_iter(ps.iter().map(to_sql))));
                if let Err(e) = r {
                    if is_transient(&e) {
                        return Err(e);
                    }
                    tracing::warn!(statement = %st.text, error = %e, "custom statement failed");
                    refused = true;
                }
            }
            return Ok(refused);
        }
    }
    Ok(false)
}

const MSG_COLS: &str = "msgid, sender, topic, qos, retain, payload, arrived, props";

/// Tables created by an earlier version lack the `props` column: added in place.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
    for table in ["mqtt_msg", "mqtt_retain", "mqtt_latest"] {
        let has: bool = c
            .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = 'props'"))?
            .exists([])?;
        if !has {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN props TEXT"))?;
        }
    }
    Ok(())
}

/// A stored message from a row of `table`. SQLite columns hold any type: a value of the wrong
/// one is an error naming table, column, expected and found type.
fn row_msg(r: &rusqlite::Row<'_>, table: &str) -> BResult<StoredMessage> {
    use rusqlite::types::ValueRef;
    let payload: Option<Vec<u8>> = match r.get_ref(5).map_err(classify)? {
        ValueRef::Null => None,
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(t.to_vec()),
        ValueRef::Integer(i) => Some(i.to_string().into_bytes()),
        ValueRef::Real(f) => Some(f.to_string().into_bytes()),
    };
    Ok(StoredMessage {
        msgid: int_col(r, 0, table)? as u64,
        sender: text_col(r, 1, table)?.unwrap_or_default(),
        topic: text_col(r, 2, table)?.ok_or_else(|| unexpected(r, 2, table, "text", "NULL"))?,
        qos: int_col(r, 3, table)?.clamp(0, 2) as u8,
        retain: int_col(r, 4, table)? != 0,
        payload: payload.unwrap_or_default().into(),
        arrived: int_col(r, 6, table)?,
        props: text_col(r, 7, table)?.and_then(|t| crate::model::MsgProps::from_json(&t)),
    })
}

fn unexpected(r: &rusqlite::Row<'_>, i: usize, table: &str, expected: &str, found: &str) -> BackendError {
    let name = r.as_ref().column_name(i).unwrap_or("?");
    BackendError::permanent(format!("{table}.{name}: expected {expected}, found {found}"))
}

fn found(v: rusqlite::types::ValueRef<'_>) -> &'static str {
    match v {
        rusqlite::types::ValueRef::Null => "NULL",
        rusqlite::types::ValueRef::Integer(_) => "integer",
        rusqlite::types::ValueRef::Real(_) => "real",
        rusqlite::types::ValueRef::Text(_) => "text",
        rusqlite::types::ValueRef::Blob(_) => "blob",
    }
}

/// An integer; integral text (a column declared TEXT by hand) converts.
fn int_col(r: &rusqlite::Row<'_>, i: usize, table: &str) -> BResult<i64> {
    match r.get_ref(i).map_err(classify)? {
        rusqlite::types::ValueRef::Integer(v) => Ok(v),
        rusqlite::types::ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .ok_or_else(|| unexpected(r, i, table, "an integer", "non-numeric text")),
        other => Err(unexpected(r, i, table, "an integer", found(other))),
    }
}

/// Text (UTF-8); NULL is `None`.
fn text_col(r: &rusqlite::Row<'_>, i: usize, table: &str) -> BResult<Option<String>> {
    match r.get_ref(i).map_err(classify)? {
        rusqlite::types::ValueRef::Null => Ok(None),
        rusqlite::types::ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Ok(Some(s.to_string())),
            Err(_) => Err(unexpected(r, i, table, "UTF-8 text", "invalid UTF-8")),
        },
        other => Err(unexpected(r, i, table, "text", found(other))),
    }
}

/// The filter's topic bounds for a WHERE clause (a superset: matching is exact in Rust).
fn topic_cond(filter: &str, ps: &mut Vec<rusqlite::types::Value>) -> &'static str {
    match topic::prefix_range(filter) {
        Some((lo, _)) if !topic::has_wildcards(filter) => {
            ps.push(lo.into());
            " AND topic = ?"
        }
        Some((lo, hi)) => {
            ps.push(lo.into());
            ps.push(hi.into());
            " AND topic >= ? AND topic < ?"
        }
        None => "",
    }
}

/// A msgid as SQLite stores it (ids stay below 2^63 until 2039-09, when `ms << 22` passes it;
/// "no bound" saturates).
fn sql_id(id: u64) -> i64 {
    id.min(i64::MAX as u64) as i64
}

fn scan_rows(c: &Connection, table: Table, filter: &str, span: Span, desc: bool, want: usize) -> BResult<Scanned> {
    let limit = want.max(1) * SCAN_ROWS_PER_MATCH;
    let mut ps: Vec<rusqlite::types::Value> = vec![sql_id(span.after).into(), sql_id(span.upto).into(), span.since.into()];
    let cond = topic_cond(filter, &mut ps);
    ps.push((limit as i64).into());
    let order = if desc { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT msgid, topic FROM {} WHERE msgid > ? AND msgid <= ? AND arrived >= ?{cond} ORDER BY msgid {order} LIMIT ?",
        table.name()
    );
    let mut st = c.prepare_cached(&sql).map_err(classify)?;
    let mut rows = st.query(rusqlite::params_from_iter(ps)).map_err(classify)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(classify)? {
        let id = int_col(r, 0, table.name())? as u64;
        let t = text_col(r, 1, table.name())?.ok_or_else(|| unexpected(r, 1, table.name(), "text", "NULL"))?;
        out.push((id, t));
    }
    let reached = (out.len() == limit).then(|| out.last().map(|(id, _)| *id)).flatten();
    Ok(Scanned { rows: out, reached })
}

/// Whole rows by msgid (`mqtt_msg`) or by topic (the one-row-per-topic tables, whose msgid has
/// no index). Always [`PAGE`] placeholders, padded with the first key: one cached statement.
fn load_rows(c: &Connection, table: Table, rows: &[(u64, String)]) -> BResult<Vec<StoredMessage>> {
    let Some(first) = rows.first() else { return Ok(Vec::new()) };
    let cols = match table {
        Table::Retain => "msgid, sender, topic, qos, 1, payload, arrived, props",
        Table::Msg | Table::Latest => MSG_COLS,
    };
    let by_id = table == Table::Msg;
    let key = |r: &(u64, String)| -> rusqlite::types::Value {
        if by_id {
            sql_id(r.0).into()
        } else {
            r.1.clone().into()
        }
    };
    let marks = vec!["?"; PAGE].join(", ");
    let sql = format!(
        "SELECT {cols} FROM {} WHERE {} IN ({marks})",
        table.name(),
        if by_id { "msgid" } else { "topic" }
    );
    let mut st = c.prepare_cached(&sql).map_err(classify)?;
    let mut out = Vec::new();
    for chunk in rows.chunks(PAGE) {
        let mut ps: Vec<rusqlite::types::Value> = chunk.iter().map(key).collect();
        ps.resize(PAGE, key(first));
        let mut found = st.query(rusqlite::params_from_iter(ps)).map_err(classify)?;
        while let Some(r) = found.next().map_err(classify)? {
            out.push(row_msg(r, table.name())?);
        }
    }
    Ok(out)
}

impl Source for SqliteBackend {
    fn pointer<'a>(&'a self, clientid: &'a str, filter: &'a str) -> BoxFuture<'a, BResult<Option<u64>>> {
        let (clientid, filter) = (clientid.to_string(), filter.to_string());
        Box::pin(Self::blocking(&self.reader, move |c| {
            let mut st = c
                .prepare_cached("SELECT mid FROM mqtt_acked WHERE clientid = ?1 AND topic = ?2")
                .map_err(classify)?;
            let mut rows = st.query(params![clientid, filter]).map_err(classify)?;
            match rows.next().map_err(classify)? {
                Some(r) => Ok(Some(int_col(r, 0, "mqtt_acked")?.max(0) as u64)),
                None => Ok(None),
            }
        }))
    }

    fn create_pointer<'a>(&'a self, clientid: &'a str, filter: &'a str, msgid: u64) -> BoxFuture<'a, BResult<()>> {
        let (clientid, filter) = (clientid.to_string(), filter.to_string());
        Box::pin(Self::blocking(&self.reader, move |c| {
            c.prepare_cached("INSERT INTO mqtt_acked (clientid, topic, mid) VALUES (?1, ?2, ?3) ON CONFLICT (clientid, topic) DO NOTHING")
                .and_then(|mut s| s.execute(params![clientid, filter, sql_id(msgid)]))
                .map(|_| ())
                .map_err(classify)
        }))
    }

    fn scan<'a>(&'a self, table: Table, filter: &'a str, span: Span, desc: bool, want: usize) -> BoxFuture<'a, BResult<Scanned>> {
        let filter = filter.to_string();
        Box::pin(Self::blocking(&self.reader, move |c| {
            scan_rows(c, table, &filter, span, desc, want)
        }))
    }

    fn load<'a>(&'a self, table: Table, rows: &'a [(u64, String)]) -> BoxFuture<'a, BResult<Vec<StoredMessage>>> {
        let rows = rows.to_vec();
        Box::pin(Self::blocking(&self.reader, move |c| load_rows(c, table, &rows)))
    }
}

impl Backend for SqliteBackend {
    fn label(&self) -> &str {
        &self.label
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp]) -> BoxFuture<'a, BResult<Written>> {
        fn run(c: &mut Connection, ops: &[WriteOp]) -> BResult<Written> {
            let tx = c.transaction().map_err(classify)?;
            let mut written = Written::default();
            for (i, op) in ops.iter().enumerate() {
                if apply(&tx, op).map_err(classify)? {
                    written.refused.push(i);
                }
            }
            tx.commit().map_err(classify)?;
            Ok(written)
        }
        // On a multi-threaded runtime (the broker's storage runtime) the batch runs right here,
        // the runtime moving this worker's other tasks to another thread meanwhile: handing it
        // to a blocking thread and back cost 100-150 µs per batch, a third of a small commit.
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            let writer = self.writer.clone();
            return Box::pin(async move { tokio::task::block_in_place(|| run(&mut writer.lock(), ops)) });
        }
        let ops = ops.to_vec();
        Box::pin(Self::blocking(&self.writer, move |c| run(c, &ops)))
    }

    fn fetch<'a>(&'a self, req: &'a FetchRequest, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
        Box::pin(fetch_page(self, req, cursor))
    }

    fn retained<'a>(&'a self, filter: &'a str, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
        Box::pin(retained_page(self, filter, cursor))
    }

    fn subscriptions<'a>(&'a self, clientid: &'a str) -> BoxFuture<'a, BResult<Vec<(String, u8)>>> {
        let clientid = clientid.to_string();
        Box::pin(Self::blocking(&self.reader, move |c| {
            let mut st = c
                .prepare_cached("SELECT topic, qos FROM mqtt_sub WHERE clientid = ?1 ORDER BY id")
                .map_err(classify)?;
            let mut rows = st.query(params![clientid]).map_err(classify)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(classify)? {
                let topic = text_col(r, 0, "mqtt_sub")?.ok_or_else(|| unexpected(r, 0, "mqtt_sub", "text", "NULL"))?;
                out.push((topic, int_col(r, 1, "mqtt_sub")?.clamp(0, 2) as u8));
            }
            Ok(out)
        }))
    }

    fn delete_expired(&self, before_ms: i64) -> BoxFuture<'_, BResult<u64>> {
        Box::pin(Self::blocking(&self.writer, move |c| {
            let mut total = 0u64;
            loop {
                let n = c
                    .prepare_cached("DELETE FROM mqtt_msg WHERE id IN (SELECT id FROM mqtt_msg WHERE arrived < ?1 LIMIT 5000)")
                    .and_then(|mut s| s.execute(params![before_ms]))
                    .map_err(classify)?;
                total += n as u64;
                if n < 5000 {
                    return Ok(total);
                }
            }
        }))
    }

    fn ping(&self) -> BoxFuture<'_, BResult<()>> {
        Box::pin(Self::blocking(&self.reader, |c| {
            c.query_row("SELECT 1", [], |_| Ok(())).map_err(classify)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on the default pool settings, its file in `dir`.
    fn backend(dir: &Path) -> SqliteBackend {
        let pool = PoolConf {
            db: crate::config::Db::Sqlite,
            name: "pool1".into(),
            attrs: Default::default(),
            origin: crate::config::Origin::Default,
        };
        SqliteBackend::open(&pool, dir).unwrap()
    }

    #[test]
    fn commits_are_synced_to_disk_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        let level: i64 = b.writer.lock().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(level, 2, "FULL: the no-loss PUBACK needs the commit on disk");
    }

    #[tokio::test]
    async fn a_retained_delete_leaves_a_newer_retained_message() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        let msg = |msgid: u64| {
            std::sync::Arc::new(crate::model::Message {
                msgid,
                sender: "c".into(),
                username: None,
                topic: "a/b".into(),
                payload: bytes::Bytes::from_static(b"v"),
                qos: 1,
                retain: true,
                timestamp: 1,
                props: None,
            })
        };
        let retained = || -> Option<i64> { b.writer.lock().query_row("SELECT msgid FROM mqtt_retain", [], |r| r.get(0)).ok() };
        let delete = |msgid| WriteOp::RetainDelete {
            topic: "a/b".into(),
            msgid,
        };
        let upsert = WriteOp::RetainUpsert {
            msg: msg(200),
            ttl: std::time::Duration::ZERO,
        };
        b.write(&[upsert.clone(), delete(100)]).await.unwrap();
        assert_eq!(
            retained(),
            Some(200),
            "an older empty retained publish must not delete a newer value"
        );
        b.write(&[delete(300)]).await.unwrap();
        assert_eq!(retained(), None);
        b.write(&[upsert, delete(0)]).await.unwrap();
        assert_eq!(retained(), None, "a spool record without a msgid deletes whatever is there");
    }
}
