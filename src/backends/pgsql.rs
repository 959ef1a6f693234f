//! PostgreSQL through deadpool-postgres. Consecutive stores, pointer advances and retained
//! upserts in a batch become one `UNNEST` statement each (no bind-parameter cap, one round
//! trip); everything else runs in order. Statements are prepared and cached per connection,
//! or sent unnamed (`prepare = off`) for PgBouncer in transaction mode — bound either way.

use super::tls::Verify;
use super::{
    fetch_page, retained_page, BResult, Backend, BackendError, Cursor, FetchRequest, Page, Scanned, Source, Span, SqlAction, StoredMessage,
    Table, WriteOp, Written, SCAN_ROWS_PER_MATCH,
};
use crate::actions::Statement;
use crate::config::{ConfError, PoolConf};
use crate::model::{Message, Value};
use crate::topic;
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::Row;

pub const SCHEMA: &str = include_str!("../../schema/pgsql.sql");

/// Parsed `backend.pgsql.<pool>.*` settings.
#[derive(Clone)]
pub struct PgSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub pool_size: usize,
    /// Batches written at once, each in a connection of its own (at most `pool_size`).
    pub write_concurrency: usize,
    pub prepare: bool,
    pub auto_create_schema: bool,
    pub connect_timeout: Duration,
    pub tls: Option<(SslMode, Verify, super::tls::TlsFiles)>,
}

impl std::fmt::Debug for PgSettings {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }
}

impl PgSettings {
    pub fn parse(pool: &PoolConf) -> Result<Self, ConfError> {
        let server = pool.str_or("server", "127.0.0.1:5432");
        let (host, port) = match server.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .map_err(|_| pool.error("server", format!("bad port in `{server}`: expected host:port")))?,
            ),
            None => (server.to_string(), 5432),
        };
        // `ssl = on` alone verifies chain and host name; `ssl_mode` picks PostgreSQL's levels
        // (`require` encrypts without checking the certificate, as libpq does).
        let mode = match pool.str("ssl_mode").filter(|m| !m.is_empty()) {
            None if pool.flag("ssl", false)? => Some((SslMode::Require, Verify::Full)),
            None | Some("disable") => None,
            Some("prefer") => Some((SslMode::Prefer, Verify::Encrypt)),
            Some("require") => Some((SslMode::Require, Verify::Encrypt)),
            Some("verify-ca") => Some((SslMode::Require, Verify::Chain)),
            Some("verify-full") => Some((SslMode::Require, Verify::Full)),
            Some(other) => {
                return Err(pool.error(
                    "ssl_mode",
                    format!("`ssl_mode` must be disable, prefer, require, verify-ca or verify-full, found `{other}`"),
                ))
            }
        };
        let tls = match mode {
            Some((mode, verify)) => Some((mode, verify, super::tls::TlsFiles::parse(pool, "cacertfile")?)),
            None => None,
        };
        Ok(PgSettings {
            host,
            port,
            user: pool.str_or("username", "root").to_string(),
            password: pool.str("password").filter(|p| !p.is_empty()).map(str::to_string),
            database: pool.str_or("database", "mqtt").to_string(),
            pool_size: pool.num("pool_size", 8usize)?.max(1),
            write_concurrency: pool.num("write_concurrency", 4usize)?.max(1),
            prepare: pool.flag("prepare", true)?,
            auto_create_schema: pool.flag("auto_create_schema", false)?,
            connect_timeout: Duration::from_millis(pool.num("connect_timeout", 5000u64)?),
            tls,
        })
    }
}

pub struct PgBackend {
    label: String,
    pool: Pool,
    write_concurrency: usize,
    prepare: bool,
    /// `prepare = off`: the parameter types the server reported for each custom statement,
    /// learned once, so values convert to them as with prepared statements.
    param_types: parking_lot::Mutex<HashMap<Arc<str>, Arc<[Type]>>>,
    /// The message tables have the `props` column (MQTT 5 properties). Tables of an earlier
    /// version or EMQX 4's do not: the first statement that finds it missing turns this off
    /// (one warning naming the ALTER TABLE to run), and messages are stored without properties.
    props: std::sync::atomic::AtomicBool,
}

/// SQLSTATE undefined_column.
fn undefined_column(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| d.code().code() == "42703" && d.message().contains("props"))
}

const ADD_PROPS: &str = "ALTER TABLE mqtt_msg ADD COLUMN IF NOT EXISTS props text; ALTER TABLE mqtt_retain ADD COLUMN IF NOT EXISTS props text; ALTER TABLE mqtt_latest ADD COLUMN IF NOT EXISTS props text";

fn classify(e: &tokio_postgres::Error) -> BackendError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // Connection, resources, operator intervention, serialization/deadlock: retry.
            let transient = ["08", "53", "57", "40", "58"].iter().any(|c| code.starts_with(c));
            BackendError::new(transient, format!("{} ({code})", db.message()))
        }
        // A value our binding could not convert is refused data, not an outage.
        None if is_conversion(e) => BackendError::permanent(format!("{e}: {}", e.source().map(|s| s.to_string()).unwrap_or_default())),
        None => BackendError::transient(e.to_string()),
    }
}

fn is_conversion(e: &tokio_postgres::Error) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.downcast_ref::<Conversion>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

fn pool_err(e: deadpool_postgres::PoolError) -> BackendError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => classify(&e),
        other => BackendError::transient(format!("postgres pool: {other}")),
    }
}

impl PgBackend {
    pub async fn connect(pool: &PoolConf) -> Result<Self, ConfError> {
        let s = PgSettings::parse(pool)?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&s.host)
            .port(s.port)
            .user(&s.user)
            .dbname(&s.database)
            .connect_timeout(s.connect_timeout)
            .application_name("mqtt-persist");
        if let Some(p) = &s.password {
            cfg.password(p);
        }
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &s.tls {
            Some((mode, verify, files)) => {
                cfg.ssl_mode(*mode);
                let tls = files.postgres_connector(*verify).map_err(|e| pool.error("ssl", e))?;
                Manager::from_config(cfg, tls, mgr_cfg)
            }
            None => Manager::from_config(cfg, tokio_postgres::NoTls, mgr_cfg),
        };
        let built = Pool::builder(mgr)
            .max_size(s.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(s.connect_timeout))
            .build()
            .map_err(|e| pool.error("server", format!("cannot build the postgres pool: {e}")))?;
        let backend = PgBackend {
            label: pool.label(),
            pool: built,
            write_concurrency: s.write_concurrency.min(s.pool_size),
            prepare: s.prepare,
            param_types: Default::default(),
            props: std::sync::atomic::AtomicBool::new(true),
        };
        if s.auto_create_schema {
            let c = backend
                .pool
                .get()
                .await
                .map_err(|e| pool.error("server", format!("cannot connect to {s:?}: {}", pool_err(e))))?;
            c.batch_execute(SCHEMA)
                .await
                .map_err(|e| pool.error("auto_create_schema", format!("creating the schema failed: {}", classify(&e))))?;
            // Tables created by an earlier version get the column in place.
            c.batch_execute(ADD_PROPS)
                .await
                .map_err(|e| pool.error("auto_create_schema", format!("adding the props column failed: {}", classify(&e))))?;
        }
        Ok(backend)
    }

    async fn client(&self) -> BResult<Conn> {
        self.pool.get().await.map(|c| Conn(Some(c))).map_err(pool_err)
    }

    async fn exec(
        &self,
        c: &deadpool_postgres::Object,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        if self.prepare {
            let st = c.prepare_typed_cached(sql, types).await?;
            c.execute(&st, params).await
        } else {
            let p: Vec<(&(dyn ToSql + Sync), Type)> = params.iter().copied().zip(types.iter().cloned()).collect();
            c.query_typed(sql, &p).await.map(|r| r.len() as u64)
        }
    }

    async fn query(
        &self,
        c: &deadpool_postgres::Object,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        if self.prepare {
            let st = c.prepare_typed_cached(sql, types).await?;
            c.query(&st, params).await
        } else {
            let p: Vec<(&(dyn ToSql + Sync), Type)> = params.iter().copied().zip(types.iter().cloned()).collect();
            c.query_typed(sql, &p).await
        }
    }

    /// One bounded scan (see [`Source::scan`]): ids and topics only, narrowed by the index on
    /// the topic prefix; `x/#` also matches `x` itself, which `LIKE 'x/%'` does not reach.
    async fn scan_rows(
        &self,
        c: &deadpool_postgres::Object,
        table: Table,
        filter: &str,
        span: Span,
        desc: bool,
        want: usize,
    ) -> BResult<Scanned> {
        let parent: Option<&str> = topic::parent_level(filter);
        let (cond, pattern) = if !topic::has_wildcards(filter) {
            ("topic = $1", filter.to_string())
        } else {
            let prefix = topic::literal_prefix(filter);
            let escaped: String = prefix
                .chars()
                .flat_map(|c| if matches!(c, '\\' | '%' | '_') { vec!['\\', c] } else { vec![c] })
                .collect();
            ("(topic LIKE $1 OR topic = $4)", format!("{escaped}%"))
        };
        let order = if desc { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT msgid, topic FROM {} WHERE {cond} AND msgid > $2 AND msgid <= $5 AND arrived >= $3 ORDER BY msgid {order} LIMIT $6",
            table.name()
        );
        let limit = (want.max(1) * SCAN_ROWS_PER_MATCH) as i64;
        // Ids stay below 2^63 until 2039-09 (`ms << 22` passes it then); "no bound" saturates.
        let (after, upto) = (span.after.min(i64::MAX as u64) as i64, span.upto.min(i64::MAX as u64) as i64);
        let params: [&(dyn ToSql + Sync); 6] = [&pattern, &after, &span.since, &parent, &upto, &limit];
        let types = [Type::TEXT, Type::INT8, Type::INT8, Type::TEXT, Type::INT8, Type::INT8];
        let rows = self.query(c, &sql, &types, &params).await.map_err(|e| classify(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = int_col(r, 0, table.name())? as u64;
            let t = text_col(r, 1, table.name())?.ok_or_else(|| unexpected(r, 1, table.name(), "text", "NULL"))?;
            out.push((id, t));
        }
        let reached = (out.len() as i64 == limit).then(|| out.last().map(|(id, _)| *id)).flatten();
        Ok(Scanned { rows: out, reached })
    }

    /// Whole rows by msgid (`mqtt_msg`) or by topic (the one-row-per-topic tables, whose msgid
    /// has no index).
    async fn load_rows(&self, c: &deadpool_postgres::Object, table: Table, rows: &[(u64, String)]) -> BResult<Vec<StoredMessage>> {
        let retain_col = if table == Table::Retain { "true" } else { "retain" };
        let found = self.load_rows_with(c, table, rows, retain_col, self.has_props()).await;
        let found = match found {
            Err(e) if undefined_column(&e) => {
                self.no_props();
                self.load_rows_with(c, table, rows, retain_col, false).await
            }
            other => other,
        }
        .map_err(|e| classify(&e))?;
        found.iter().map(|r| row_msg(r, table.name())).collect()
    }

    fn has_props(&self) -> bool {
        self.props.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn no_props(&self) {
        if self.props.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(pool = %self.label, "the message tables have no props column: MQTT 5 properties are not stored; add it with: {ADD_PROPS}");
        }
    }

    async fn load_rows_with(
        &self,
        c: &deadpool_postgres::Object,
        table: Table,
        rows: &[(u64, String)],
        retain_col: &str,
        props: bool,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let props_col = if props { "props" } else { "NULL::text" };
        let cols = format!("msgid, sender, topic, qos, {retain_col}, payload, arrived, {props_col}");
        if table == Table::Msg {
            let ids: Vec<i64> = rows.iter().map(|(id, _)| *id as i64).collect();
            let sql = format!("SELECT {cols} FROM {} WHERE msgid = ANY($1)", table.name());
            self.query(c, &sql, &[Type::INT8_ARRAY], &[&ids]).await
        } else {
            let topics: Vec<&str> = rows.iter().map(|(_, t)| t.as_str()).collect();
            let sql = format!("SELECT {cols} FROM {} WHERE topic = ANY($1)", table.name());
            self.query(c, &sql, &[Type::TEXT_ARRAY], &[&topics]).await
        }
    }

    async fn store_many(&self, c: &deadpool_postgres::Object, table: &str, msgs: &[&Arc<Message>]) -> Result<u64, tokio_postgres::Error> {
        match self.store_many_with(c, table, msgs, self.has_props()).await {
            Err(e) if undefined_column(&e) => {
                self.no_props();
                self.store_many_with(c, table, msgs, false).await
            }
            other => other,
        }
    }

    async fn store_many_with(
        &self,
        c: &deadpool_postgres::Object,
        table: &str,
        msgs: &[&Arc<Message>],
        with_props: bool,
    ) -> Result<u64, tokio_postgres::Error> {
        let ids: Vec<i64> = msgs.iter().map(|m| m.msgid as i64).collect();
        let senders: Vec<&str> = msgs.iter().map(|m| &*m.sender).collect();
        let topics: Vec<&str> = msgs.iter().map(|m| &*m.topic).collect();
        let qos: Vec<i16> = msgs.iter().map(|m| i16::from(m.qos)).collect();
        let retain: Vec<bool> = msgs.iter().map(|m| m.retain).collect();
        let payloads: Vec<&[u8]> = msgs.iter().map(|m| &m.payload[..]).collect();
        let arrived: Vec<i64> = msgs.iter().map(|m| m.timestamp).collect();
        let props: Vec<Option<String>> = msgs.iter().map(|m| m.props_json()).collect();
        let p: [&(dyn ToSql + Sync); 8] = [&ids, &senders, &topics, &qos, &retain, &payloads, &arrived, &props];
        let types = [
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::INT2_ARRAY,
            Type::BOOL_ARRAY,
            Type::BYTEA_ARRAY,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
        ];
        let n = if with_props { 8 } else { 7 };
        let sql = match (table, with_props) {
            ("mqtt_msg", true) => {
                "INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived, props)
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int2[], $5::bool[], $6::bytea[], $7::int8[], $8::text[])
                 ON CONFLICT (msgid) DO NOTHING"
            }
            ("mqtt_msg", false) => {
                "INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived)
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int2[], $5::bool[], $6::bytea[], $7::int8[])
                 ON CONFLICT (msgid) DO NOTHING"
            }
            (_, true) => {
                "INSERT INTO mqtt_latest (msgid, sender, topic, qos, retain, payload, arrived, props)
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int2[], $5::bool[], $6::bytea[], $7::int8[], $8::text[])
                 ON CONFLICT (topic) DO UPDATE SET msgid = EXCLUDED.msgid, sender = EXCLUDED.sender, qos = EXCLUDED.qos,
                   retain = EXCLUDED.retain, payload = EXCLUDED.payload, arrived = EXCLUDED.arrived, props = EXCLUDED.props
                 WHERE EXCLUDED.msgid > mqtt_latest.msgid"
            }
            (_, false) => {
                "INSERT INTO mqtt_latest (msgid, sender, topic, qos, retain, payload, arrived)
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int2[], $5::bool[], $6::bytea[], $7::int8[])
                 ON CONFLICT (topic) DO UPDATE SET msgid = EXCLUDED.msgid, sender = EXCLUDED.sender, qos = EXCLUDED.qos,
                   retain = EXCLUDED.retain, payload = EXCLUDED.payload, arrived = EXCLUDED.arrived
                 WHERE EXCLUDED.msgid > mqtt_latest.msgid"
            }
        };
        self.exec(c, sql, &types[..n], &p[..n]).await
    }

    async fn retain_many(&self, c: &deadpool_postgres::Object, msgs: &[&Arc<Message>]) -> Result<u64, tokio_postgres::Error> {
        match self.retain_many_with(c, msgs, self.has_props()).await {
            Err(e) if undefined_column(&e) => {
                self.no_props();
                self.retain_many_with(c, msgs, false).await
            }
            other => other,
        }
    }

    async fn retain_many_with(
        &self,
        c: &deadpool_postgres::Object,
        msgs: &[&Arc<Message>],
        with_props: bool,
    ) -> Result<u64, tokio_postgres::Error> {
        let ids: Vec<i64> = msgs.iter().map(|m| m.msgid as i64).collect();
        let senders: Vec<&str> = msgs.iter().map(|m| &*m.sender).collect();
        let topics: Vec<&str> = msgs.iter().map(|m| &*m.topic).collect();
        let qos: Vec<i16> = msgs.iter().map(|m| i16::from(m.qos)).collect();
        let payloads: Vec<&[u8]> = msgs.iter().map(|m| &m.payload[..]).collect();
        let arrived: Vec<i64> = msgs.iter().map(|m| m.timestamp).collect();
        let props: Vec<Option<String>> = msgs.iter().map(|m| m.props_json()).collect();
        let p: [&(dyn ToSql + Sync); 7] = [&topics, &ids, &senders, &qos, &payloads, &arrived, &props];
        let types = [
            Type::TEXT_ARRAY,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
            Type::INT2_ARRAY,
            Type::BYTEA_ARRAY,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
        ];
        let (sql, n) = if with_props {
            (
                "INSERT INTO mqtt_retain (topic, msgid, sender, qos, payload, arrived, props)
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int2[], $5::bytea[], $6::int8[], $7::text[])
                 ON CONFLICT (topic) DO UPDATE SET msgid = EXCLUDED.msgid, sender = EXCLUDED.sender, qos = EXCLUDED.qos,
                   payload = EXCLUDED.payload, arrived = EXCLUDED.arrived, props = EXCLUDED.props
                 WHERE EXCLUDED.msgid >= mqtt_retain.msgid",
                7,
            )
        } else {
            (
                "INSERT INTO mqtt_retain (topic, msgid, sender, qos, payload, arrived)
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int2[], $5::bytea[], $6::int8[])
                 ON CONFLICT (topic) DO UPDATE SET msgid = EXCLUDED.msgid, sender = EXCLUDED.sender, qos = EXCLUDED.qos,
                   payload = EXCLUDED.payload, arrived = EXCLUDED.arrived
                 WHERE EXCLUDED.msgid >= mqtt_retain.msgid",
                6,
            )
        };
        self.exec(c, sql, &types[..n], &p[..n]).await
    }

    async fn advance_many(&self, c: &deadpool_postgres::Object, ops: &[&WriteOp]) -> Result<u64, tokio_postgres::Error> {
        // One row per (client, filter): an UPDATE may not hit a row twice.
        let mut max: HashMap<(&str, &str), i64> = HashMap::new();
        for op in ops {
            if let WriteOp::AdvancePointer { clientid, filters, msgid } = op {
                for f in filters.iter() {
                    let e = max.entry((clientid, f)).or_insert(0);
                    *e = (*e).max(*msgid as i64);
                }
            }
        }
        let (mut cs, mut ts, mut ms) = (Vec::new(), Vec::new(), Vec::new());
        for ((c, t), m) in max {
            cs.push(c);
            ts.push(t);
            ms.push(m);
        }
        let p: [&(dyn ToSql + Sync); 3] = [&cs, &ts, &ms];
        self.exec(
            c,
            "UPDATE mqtt_acked a SET mid = GREATEST(a.mid, v.mid)
             FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS v(clientid, topic, mid)
             WHERE a.clientid = v.clientid AND a.topic = v.topic",
            &[Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY],
            &p,
        )
        .await
    }

    /// One op on its own; `Ok(true)` when a custom statement in it was refused (and skipped).
    /// One op; `Ok(true)` when a custom statement of it was refused. `done` counts the custom
    /// statements of its list that are finished (committed or refused), for a retry.
    async fn single(&self, c: &deadpool_postgres::Object, op: &WriteOp, done: &mut usize) -> Result<bool, tokio_postgres::Error> {
        use Type as T;
        match op {
            WriteOp::ClientConnected {
                clientid,
                node,
                connected_at,
            } => {
                self.exec(
                    c,
                    "INSERT INTO mqtt_client (clientid, state, node, online_at, offline_at) VALUES ($1, 1, $2, $3, NULL)
                     ON CONFLICT (clientid) DO UPDATE SET state = 1, node = EXCLUDED.node, online_at = EXCLUDED.online_at, offline_at = NULL
                     WHERE EXCLUDED.online_at >= coalesce(mqtt_client.online_at, 0)",
                    &[T::TEXT, T::TEXT, T::INT8],
                    &[&&**clientid, &&**node, connected_at],
                )
                .await?;
            }
            WriteOp::ClientDisconnected {
                clientid,
                connected_at,
                disconnected_at,
                ..
            } => {
                self.exec(
                    c,
                    "UPDATE mqtt_client SET state = 0, offline_at = $1 WHERE clientid = $2 AND online_at = $3",
                    &[T::INT8, T::TEXT, T::INT8],
                    &[disconnected_at, &&**clientid, connected_at],
                )
                .await?;
            }
            WriteOp::RetainDelete { topic, msgid } => {
                self.exec(
                    c,
                    "DELETE FROM mqtt_retain WHERE topic = $1 AND msgid < $2",
                    &[T::TEXT, T::INT8],
                    &[&&**topic, &WriteOp::delete_below(*msgid)],
                )
                .await?;
            }
            WriteOp::DeletePointer { clientid, filter } => {
                self.exec(
                    c,
                    "DELETE FROM mqtt_acked WHERE clientid = $1 AND topic = $2",
                    &[T::TEXT, T::TEXT],
                    &[&&**clientid, &&**filter],
                )
                .await?;
            }
            WriteOp::DeletePointers { clientid } => {
                self.exec(c, "DELETE FROM mqtt_acked WHERE clientid = $1", &[T::TEXT], &[&&**clientid])
                    .await?;
            }
            WriteOp::DeleteMessage { msgid, .. } => {
                self.exec(c, "DELETE FROM mqtt_msg WHERE msgid = $1", &[T::INT8], &[&(*msgid as i64)])
                    .await?;
            }
            WriteOp::DeleteLatest { topic, msgid } => {
                self.exec(
                    c,
                    "DELETE FROM mqtt_latest WHERE topic = $1 AND msgid = $2",
                    &[T::TEXT, T::INT8],
                    &[&&**topic, &(*msgid as i64)],
                )
                .await?;
            }
            WriteOp::Custom(custom) => {
                let Some(sql) = custom.compiled::<SqlAction>() else {
                    tracing::warn!(pool = %self.label, action = ?custom.action, "not an SQL statement list: skipped");
                    return Ok(true);
                };
                let mut refused = false;
                for (i, ps) in custom.pending() {
                    let Some(st) = sql.stmts.get(i) else { break };
                    // Autocommit per statement: a failing one is logged and the next runs.
                    if let Err(e) = self.custom(c, st, ps).await {
                        let be = classify(&e);
                        if be.transient {
                            return Err(e);
                        }
                        tracing::warn!(pool = %self.label, statement = %st.text, error = %be, "custom statement failed");
                        refused = true;
                    }
                    *done += 1;
                }
                return Ok(refused);
            }
            WriteOp::StoreMessage { msg, .. } => {
                self.store_many(c, "mqtt_msg", &[msg]).await?;
            }
            WriteOp::StoreLatest { msg, .. } => {
                self.store_many(c, "mqtt_latest", &[msg]).await?;
            }
            WriteOp::RetainUpsert { msg, .. } => {
                self.retain_many(c, &[msg]).await?;
            }
            WriteOp::AdvancePointer { .. } => {
                self.advance_many(c, &[op]).await?;
            }
        }
        Ok(false)
    }

    /// A user statement: values converted to the parameter types the server reports.
    async fn custom(&self, c: &deadpool_postgres::Object, st: &Statement, ps: &[Value]) -> Result<u64, tokio_postgres::Error> {
        let binds: Vec<Bind<'_>> = ps.iter().map(Bind).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = binds.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
        if self.prepare {
            let prepared = c.prepare_cached(&st.text).await?;
            c.execute(&prepared, &refs).await
        } else {
            let types = self.param_types_of(c, &st.text).await?;
            let r = self.exec(c, &st.text, &types, &refs).await;
            if r.as_ref().err().and_then(|e| e.code()).is_some_and(|c| c.code().starts_with("42")) {
                // The table may have changed since the types were learned: learn them again.
                self.param_types.lock().remove(&st.text);
            }
            r
        }
    }

    /// The server's parameter types for `sql`, without leaving a named statement behind: the
    /// statement is prepared and closed inside one transaction, which PgBouncer's transaction
    /// pooling keeps on one server connection.
    async fn param_types_of(&self, c: &deadpool_postgres::Object, sql: &Arc<str>) -> Result<Arc<[Type]>, tokio_postgres::Error> {
        if let Some(t) = self.param_types.lock().get(sql) {
            return Ok(t.clone());
        }
        c.batch_execute("BEGIN").await?;
        let learned = match c.prepare(sql).await {
            Ok(st) => Ok(Arc::<[Type]>::from(st.params())),
            Err(e) => Err(e),
        };
        let end = c.batch_execute(if learned.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
        let types = learned?;
        end?;
        self.param_types.lock().insert(sql.clone(), types.clone());
        Ok(types)
    }
}

/// A stored message from a row of `table` (columns as `scan` selects them). Tables made by hand
/// or by EMQX 4 may use other integer widths (`qos integer`) or a text payload: those convert;
/// anything else is an error naming table, column, expected and found type, never a panic.
fn row_msg(r: &Row, table: &str) -> BResult<StoredMessage> {
    Ok(StoredMessage {
        msgid: int_col(r, 0, table)? as u64,
        sender: text_col(r, 1, table)?.unwrap_or_default(),
        topic: text_col(r, 2, table)?.ok_or_else(|| unexpected(r, 2, table, "text", "NULL"))?,
        qos: int_col(r, 3, table)?.clamp(0, 2) as u8,
        retain: match *r.columns()[4].type_() {
            Type::BOOL => r
                .try_get::<_, Option<bool>>(4)
                .map_err(|e| read_error(r, 4, table, e))?
                .unwrap_or(false),
            _ => int_col(r, 4, table)? != 0,
        },
        payload: match *r.columns()[5].type_() {
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(5).map_err(|e| read_error(r, 5, table, e))?,
            _ => text_col(r, 5, table)?.map(String::into_bytes),
        }
        .unwrap_or_default()
        .into(),
        arrived: int_col(r, 6, table)?,
        props: r
            .try_get::<_, Option<String>>(7)
            .ok()
            .flatten()
            .and_then(|t| crate::model::MsgProps::from_json(&t)),
    })
}

fn unexpected(r: &Row, i: usize, table: &str, expected: &str, found: &str) -> BackendError {
    let col = &r.columns()[i];
    BackendError::permanent(format!("{table}.{}: expected {expected}, found {found}", col.name()))
}

fn read_error(r: &Row, i: usize, table: &str, e: tokio_postgres::Error) -> BackendError {
    let col = &r.columns()[i];
    BackendError::permanent(format!("{table}.{}: cannot read a {} value: {e}", col.name(), col.type_()))
}

/// An integer column of any width; NULL is an error.
fn int_col(r: &Row, i: usize, table: &str) -> BResult<i64> {
    let ty = r.columns()[i].type_().clone();
    let v = match ty {
        Type::INT8 => r.try_get::<_, Option<i64>>(i),
        Type::INT4 => r.try_get::<_, Option<i32>>(i).map(|v| v.map(i64::from)),
        Type::INT2 => r.try_get::<_, Option<i16>>(i).map(|v| v.map(i64::from)),
        _ => return Err(unexpected(r, i, table, "an integer (int2, int4 or int8)", ty.name())),
    };
    v.map_err(|e| read_error(r, i, table, e))?
        .ok_or_else(|| unexpected(r, i, table, "an integer", "NULL"))
}

/// A text column (text, varchar, char, name); NULL is `None`.
fn text_col(r: &Row, i: usize, table: &str) -> BResult<Option<String>> {
    let ty = r.columns()[i].type_().clone();
    if !<String as tokio_postgres::types::FromSql>::accepts(&ty) {
        return Err(unexpected(r, i, table, "text", ty.name()));
    }
    r.try_get::<_, Option<String>>(i).map_err(|e| read_error(r, i, table, e))
}

/// Binds a template value to whatever type the server reports for its parameter.
#[derive(Debug)]
struct Bind<'a>(&'a Value);

impl Bind<'_> {
    fn text(&self) -> Result<std::borrow::Cow<'_, str>, Box<dyn StdError + Sync + Send>> {
        Ok(match self.0 {
            Value::Str(s) => std::borrow::Cow::Borrowed(&**s),
            Value::Int(i) => i.to_string().into(),
            Value::Bool(b) => b.to_string().into(),
            Value::Bytes(b) => std::str::from_utf8(b)
                .map_err(|_| "payload is not valid UTF-8 and the parameter is text (use a bytea column)")?
                .into(),
            Value::Null => "".into(),
        })
    }
}

/// A value that cannot take the parameter's type (invalid UTF-8 for text, "abc" for an
/// integer): the data is refused, never a reason to retry.
#[derive(Debug)]
struct Conversion(String);

impl std::fmt::Display for Conversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Conversion {}

impl ToSql for Bind<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        self.encode(ty, out)
            .map_err(|e| Box::new(Conversion(e.to_string())) as Box<dyn StdError + Sync + Send>)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    /// Types this binder has no binary encoder for (numeric, uuid, inet, interval, arrays, …),
    /// and times given as text, go in PostgreSQL's text format: the server parses them with the
    /// type's own input function, exactly as it would a literal.
    fn encode_format(&self, ty: &Type) -> tokio_postgres::types::Format {
        if self.binary(ty) {
            tokio_postgres::types::Format::Binary
        } else {
            tokio_postgres::types::Format::Text
        }
    }

    tokio_postgres::types::to_sql_checked!();
}

impl Bind<'_> {
    /// Whether `encode` writes the binary form for `ty` (otherwise the text form).
    fn binary(&self, ty: &Type) -> bool {
        match *ty {
            Type::BYTEA | Type::INT2 | Type::INT4 | Type::INT8 | Type::FLOAT4 | Type::FLOAT8 => true,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::JSON | Type::JSONB => true,
            // `true`, `yes`, `on`, … as text are the server's to parse.
            Type::BOOL => matches!(self.0, Value::Bool(_) | Value::Int(_)),
            // Milliseconds (a number, or digits) convert here; a time written as text is the
            // server's to parse, like a literal.
            Type::TIMESTAMPTZ | Type::TIMESTAMP | Type::DATE => match self.0 {
                Value::Int(_) => true,
                _ => self.text().is_ok_and(|t| t.trim().parse::<i64>().is_ok()),
            },
            _ => false,
        }
    }

    fn encode(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if matches!(self.0, Value::Null) {
            return Ok(IsNull::Yes);
        }
        if !self.binary(ty) {
            out.extend_from_slice(self.text()?.as_bytes());
            return Ok(IsNull::No);
        }
        let float = || -> Result<f64, Box<dyn StdError + Sync + Send>> {
            match self.0 {
                Value::Int(i) => Ok(*i as f64),
                Value::Bool(b) => Ok(f64::from(u8::from(*b))),
                _ => Ok(self
                    .text()?
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("cannot convert {:?} to {ty}", self.0))?),
            }
        };
        let int = || -> Result<i64, Box<dyn StdError + Sync + Send>> {
            match self.0 {
                Value::Int(i) => Ok(*i),
                Value::Bool(b) => Ok(i64::from(*b)),
                _ => Ok(self
                    .text()?
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("cannot convert {:?} to {ty}", self.0))?),
            }
        };
        match *ty {
            Type::BYTEA => match self.0 {
                Value::Bytes(b) => (&b[..]).to_sql(ty, out),
                _ => self.text()?.as_bytes().to_sql(ty, out),
            },
            Type::INT2 => i16::try_from(int()?)?.to_sql(ty, out),
            Type::INT4 => i32::try_from(int()?)?.to_sql(ty, out),
            Type::INT8 => int()?.to_sql(ty, out),
            Type::FLOAT8 => float()?.to_sql(ty, out),
            Type::FLOAT4 => (float()? as f32).to_sql(ty, out),
            Type::BOOL => match self.0 {
                Value::Bool(b) => b.to_sql(ty, out),
                _ => (int()? != 0).to_sql(ty, out),
            },
            Type::TIMESTAMPTZ | Type::TIMESTAMP => (std::time::UNIX_EPOCH + Duration::from_millis(int()?.max(0) as u64)).to_sql(ty, out),
            Type::DATE => {
                // Days since 2000-01-01 (PostgreSQL's epoch), from milliseconds since 1970.
                let days = (int()?.div_euclid(86_400_000) - 10_957) as i32;
                out.extend_from_slice(&days.to_be_bytes());
                Ok(IsNull::No)
            }
            Type::JSON => {
                out.extend_from_slice(self.text()?.as_bytes());
                Ok(IsNull::No)
            }
            Type::JSONB => {
                out.extend_from_slice(&[1]);
                out.extend_from_slice(self.text()?.as_bytes());
                Ok(IsNull::No)
            }
            _ => {
                // text, varchar, bpchar, name, unknown: their binary form is the text.
                out.extend_from_slice(self.text()?.as_bytes());
                Ok(IsNull::No)
            }
        }
    }
}

impl Backend for PgBackend {
    fn label(&self) -> &str {
        &self.label
    }

    fn write_concurrency(&self) -> usize {
        self.write_concurrency
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp]) -> BoxFuture<'a, BResult<Written>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = async {
                // Every statement runs in autocommit: ops[..committed] are in the database.
                let mut committed = 0;
                // Statements of ops[committed]'s list that are finished.
                let mut partial = 0;
                let mut written = Written::default();
                let mut i = 0;
                while i < ops.len() {
                    let kind = std::mem::discriminant(&ops[i]);
                    let mut j = i + 1;
                    while j < ops.len() && std::mem::discriminant(&ops[j]) == kind {
                        j += 1;
                    }
                    let run = &ops[i..j];
                    let r = match &ops[i] {
                        WriteOp::StoreMessage { .. } | WriteOp::StoreLatest { .. } => {
                            let table = if matches!(ops[i], WriteOp::StoreMessage { .. }) {
                                "mqtt_msg"
                            } else {
                                "mqtt_latest"
                            };
                            let mut msgs: Vec<&Arc<Message>> = run
                                .iter()
                                .filter_map(|o| match o {
                                    WriteOp::StoreMessage { msg, .. } | WriteOp::StoreLatest { msg, .. } => Some(msg),
                                    _ => None,
                                })
                                .collect();
                            if table == "mqtt_latest" {
                                dedupe_newest(&mut msgs);
                            }
                            self.store_many(&c, table, &msgs).await.map(|_| ())
                        }
                        WriteOp::RetainUpsert { .. } => {
                            let mut msgs: Vec<&Arc<Message>> = run
                                .iter()
                                .filter_map(|o| match o {
                                    WriteOp::RetainUpsert { msg, .. } => Some(msg),
                                    _ => None,
                                })
                                .collect();
                            dedupe_newest(&mut msgs);
                            self.retain_many(&c, &msgs).await.map(|_| ())
                        }
                        WriteOp::AdvancePointer { .. } => {
                            let refs: Vec<&WriteOp> = run.iter().collect();
                            self.advance_many(&c, &refs).await.map(|_| ())
                        }
                        _ => {
                            // One by one, each committed on its own: on an error the ones
                            // before it are done, and the retry must not run them again.
                            let mut r = Ok(());
                            for op in run {
                                partial = 0;
                                match self.single(&c, op, &mut partial).await {
                                    Ok(refused) => {
                                        if refused {
                                            written.refused.push(committed);
                                        }
                                        committed += 1;
                                    }
                                    Err(e) => {
                                        r = Err(e);
                                        break;
                                    }
                                }
                            }
                            r
                        }
                    };
                    r.map_err(|e| classify(&e).after(committed).within(partial))?;
                    i = j;
                    committed = j;
                    partial = 0;
                }
                Ok(written)
            }
            .await;
            c.release();
            r
        })
    }

    fn fetch<'a>(&'a self, req: &'a FetchRequest, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
        Box::pin(fetch_page(self, req, cursor))
    }

    fn retained<'a>(&'a self, filter: &'a str, cursor: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
        Box::pin(retained_page(self, filter, cursor))
    }

    fn subscriptions<'a>(&'a self, clientid: &'a str) -> BoxFuture<'a, BResult<Vec<(String, u8)>>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = async {
                let rows = self
                    .query(
                        &c,
                        "SELECT topic, qos::int8 FROM mqtt_sub WHERE clientid = $1 ORDER BY id",
                        &[Type::TEXT],
                        &[&clientid],
                    )
                    .await
                    .map_err(|e| classify(&e))?;
                rows.iter()
                    .map(|r| {
                        let topic = text_col(r, 0, "mqtt_sub")?.ok_or_else(|| unexpected(r, 0, "mqtt_sub", "text", "NULL"))?;
                        Ok((topic, int_col(r, 1, "mqtt_sub")?.clamp(0, 2) as u8))
                    })
                    .collect()
            }
            .await;
            c.release();
            r
        })
    }

    fn delete_expired(&self, before_ms: i64) -> BoxFuture<'_, BResult<u64>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = async {
                let mut total = 0;
                loop {
                    let n = self
                        .exec(
                            &c,
                            "DELETE FROM mqtt_msg WHERE id IN (SELECT id FROM mqtt_msg WHERE arrived < $1 LIMIT 5000)",
                            &[Type::INT8],
                            &[&before_ms],
                        )
                        .await
                        .map_err(|e| classify(&e))?;
                    total += n;
                    if n < 5000 {
                        return Ok(total);
                    }
                }
            }
            .await;
            c.release();
            r
        })
    }

    fn ping(&self) -> BoxFuture<'_, BResult<()>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = async { c.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| classify(&e)) }.await;
            c.release();
            r
        })
    }
}

impl Source for PgBackend {
    fn pointer<'a>(&'a self, clientid: &'a str, filter: &'a str) -> BoxFuture<'a, BResult<Option<u64>>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = async {
                let rows = self
                    .query(
                        &c,
                        "SELECT mid FROM mqtt_acked WHERE clientid = $1 AND topic = $2",
                        &[Type::TEXT, Type::TEXT],
                        &[&clientid, &filter],
                    )
                    .await
                    .map_err(|e| classify(&e))?;
                rows.first()
                    .map(|r| int_col(r, 0, "mqtt_acked").map(|p| p.max(0) as u64))
                    .transpose()
            }
            .await;
            c.release();
            r
        })
    }

    fn create_pointer<'a>(&'a self, clientid: &'a str, filter: &'a str, msgid: u64) -> BoxFuture<'a, BResult<()>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = self
                .exec(
                    &c,
                    "INSERT INTO mqtt_acked (clientid, topic, mid) VALUES ($1, $2, $3) ON CONFLICT (clientid, topic) DO NOTHING",
                    &[Type::TEXT, Type::TEXT, Type::INT8],
                    &[&clientid, &filter, &(msgid.min(i64::MAX as u64) as i64)],
                )
                .await
                .map(|_| ())
                .map_err(|e| classify(&e));
            c.release();
            r
        })
    }

    fn scan<'a>(&'a self, table: Table, filter: &'a str, span: Span, desc: bool, want: usize) -> BoxFuture<'a, BResult<Scanned>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = self.scan_rows(&c, table, filter, span, desc, want).await;
            c.release();
            r
        })
    }

    fn load<'a>(&'a self, table: Table, rows: &'a [(u64, String)]) -> BoxFuture<'a, BResult<Vec<StoredMessage>>> {
        Box::pin(async move {
            let c = self.client().await?;
            let r = self.load_rows(&c, table, rows).await;
            c.release();
            r
        })
    }
}

/// A pooled connection that leaves the pool if the operation using it is abandoned (dropped
/// mid-request by a write or read timeout): its request may still be pending, and the next
/// user would queue behind a server that stopped answering. Operations that ran to their end,
/// successful or not, [`release`](Conn::release) it back to the pool.
struct Conn(Option<deadpool_postgres::Object>);

impl Conn {
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("held until released")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(abandoned) = self.0.take() {
            drop(deadpool_postgres::Object::take(abandoned));
        }
    }
}

/// Keep only the newest message per topic (an upsert batch may not touch a row twice).
fn dedupe_newest(msgs: &mut Vec<&Arc<Message>>) {
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for m in msgs.iter() {
        let e = newest.entry(&m.topic).or_insert(0);
        *e = (*e).max(m.msgid);
    }
    msgs.retain(|m| newest.get(&*m.topic) == Some(&m.msgid));
}
