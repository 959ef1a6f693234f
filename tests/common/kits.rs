//! One kit per backend: isolated storage for one test, the pool lines of its conf, and direct
//! reads of what the broker wrote, straight from the real database.
#![allow(async_fn_in_trait)]

use std::path::PathBuf;

pub trait Kit: Sized {
    const DB: &'static str;
    /// Fresh, isolated storage (file, database, key space) with the custom table `t(c, p)`.
    async fn new() -> Self;
    /// Storage no other test touches, for a scenario whose broker acts on all stored data
    /// (the `message_ttl` cleanup deletes every old message, not only the test's own).
    async fn alone() -> Self {
        Self::new().await
    }
    /// `backend.<db>.pool1.*` lines.
    fn pool_conf(&self) -> String;
    /// The action of a custom rule that stores `${clientid}` and `${payload}` into `t`.
    fn custom_action(&self) -> String;
    /// Like `custom_action`, for a text value in `${payload}`'s place (a typed database needs
    /// a conversion where `p` is binary).
    fn custom_text_action(&self) -> String {
        self.custom_action()
    }
    async fn client_state(&self, clientid: &str) -> Option<i64>;
    async fn stored_count(&self, topic: &str) -> i64;
    async fn retained(&self, topic: &str) -> Option<Vec<u8>>;
    /// The `p` values stored for `clientid`, in the order they were written.
    async fn custom_rows(&self, clientid: &str) -> Vec<Vec<u8>>;
    async fn add_subscription(&self, clientid: &str, topic: &str, qos: i64);

    /// The plugin conf: pools, the default rule set, and the custom rule on `custom/#`.
    fn plugin_conf(&self) -> String {
        let db = Self::DB;
        let r = |hook: &str, n: u32, topic: &str, f: &str| {
            format!(
                "backend.{db}.hook.{hook}.{n} = {{\"topic\": \"{topic}\", \"action\": {{\"function\": \"{f}\"}}, \"pool\": \"pool1\"}}\n"
            )
        };
        let mut s = self.pool_conf();
        s.push_str(&format!(
            "backend.{db}.hook.client.connected.1 = {{\"action\": {{\"function\": \"on_client_connected\"}}, \"pool\": \"pool1\"}}\n"
        ));
        s.push_str(&format!(
            "backend.{db}.hook.client.connected.2 = {{\"action\": {{\"function\": \"on_subscribe_lookup\"}}, \"pool\": \"pool1\"}}\n"
        ));
        s.push_str(&format!(
            "backend.{db}.hook.client.disconnected.1 = {{\"action\": {{\"function\": \"on_client_disconnected\"}}, \"pool\": \"pool1\"}}\n"
        ));
        s.push_str(&r("session.subscribed", 1, "#", "on_message_fetch"));
        s.push_str(&r("session.subscribed", 2, "#", "on_retain_lookup"));
        s.push_str(&r("session.subscribed", 3, "queue/#", "on_message_fetch_for_queue"));
        s.push_str(&r("session.unsubscribed", 1, "#", "on_acked_delete"));
        s.push_str(&r("message.publish", 1, "#", "on_message_publish"));
        s.push_str(&r("message.publish", 2, "#", "on_message_retain"));
        s.push_str(&r("message.publish", 3, "#", "on_retain_delete"));
        s.push_str(&r("message.acked", 1, "#", "on_message_acked"));
        s.push_str(&r("message.acked", 2, "queue/#", "on_message_acked_for_queue"));
        s.push_str(&r("session.subscribed", 4, "latest/#", "on_message_fetch_for_keep_latest"));
        s.push_str(&r("message.publish", 4, "latest/#", "on_message_store_keep_latest"));
        s.push_str(&r("message.acked", 3, "latest/#", "on_message_acked_for_keep_latest"));
        s.push_str(&format!(
            "backend.{db}.hook.message.publish.9 = {{\"topic\": \"custom/#\", \"action\": {}, \"pool\": \"pool1\"}}\n",
            self.custom_action()
        ));
        s
    }
}

pub struct SqliteKit {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SqliteKit {
    pub fn conn(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        c
    }
}

impl Kit for SqliteKit {
    const DB: &'static str = "sqlite";

    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kit.db");
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(mqtt_persist::backends::sqlite::SCHEMA).unwrap();
        c.execute_batch("CREATE TABLE t (c TEXT, p BLOB)").unwrap();
        SqliteKit { _dir: dir, path }
    }

    fn pool_conf(&self) -> String {
        format!("backend.sqlite.pool1.path = {}\n", self.path.display())
    }

    fn custom_action(&self) -> String {
        r#"{"sql": ["insert into t(c, p) values (${clientid}, ${payload})"]}"#.to_string()
    }

    async fn client_state(&self, clientid: &str) -> Option<i64> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row("SELECT state FROM mqtt_client WHERE clientid = ?1", [clientid], |r| r.get(0))
            .optional()
            .unwrap()
    }

    async fn stored_count(&self, topic: &str) -> i64 {
        self.conn()
            .query_row("SELECT count(*) FROM mqtt_msg WHERE topic = ?1", [topic], |r| r.get(0))
            .unwrap()
    }

    async fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row("SELECT payload FROM mqtt_retain WHERE topic = ?1", [topic], |r| r.get(0))
            .optional()
            .unwrap()
    }

    async fn custom_rows(&self, clientid: &str) -> Vec<Vec<u8>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT p FROM t WHERE c = ?1 ORDER BY rowid").unwrap();
        let rows = st.query_map([clientid], |r| {
            Ok(match r.get_ref(0)? {
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => t.to_vec(),
                _ => Vec::new(),
            })
        });
        rows.unwrap().map(Result::unwrap).collect()
    }

    async fn add_subscription(&self, clientid: &str, topic: &str, qos: i64) {
        self.conn()
            .execute(
                "INSERT INTO mqtt_sub (clientid, topic, qos) VALUES (?1, ?2, ?3)",
                rusqlite::params![clientid, topic, qos],
            )
            .unwrap();
    }
}

/// PostgreSQL: a fresh database per test on the server of `PG_URL`.
pub struct PgKit {
    client: tokio_postgres::Client,
    conf: String,
}

pub fn pg_url() -> String {
    std::env::var("PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

pub async fn pg_connect(cfg: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL at {} is unreachable ({e}); start it or set MQTT_PERSIST_SKIP=pgsql",
            pg_url()
        )
    });
    tokio::spawn(conn);
    client
}

impl PgKit {
    /// A client on this kit's own database.
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl Kit for PgKit {
    const DB: &'static str = "pgsql";

    async fn new() -> Self {
        let mut cfg: tokio_postgres::Config = pg_url().parse().expect("PG_URL");
        let admin = pg_connect(&cfg).await;
        let db = crate::common::unique("mp_t").to_lowercase();
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        cfg.dbname(&db);
        let client = pg_connect(&cfg).await;
        client.batch_execute(mqtt_persist::backends::pgsql::SCHEMA).await.unwrap();
        client
            .batch_execute("CREATE TABLE t (id BIGSERIAL, c TEXT, p BYTEA)")
            .await
            .unwrap();
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let mut conf = format!(
            "backend.pgsql.pool1.server = {host}:{port}\nbackend.pgsql.pool1.username = {}\nbackend.pgsql.pool1.database = {db}\nbackend.pgsql.pool1.pool_size = 4\n",
            cfg.get_user().unwrap_or("root")
        );
        if let Some(p) = cfg.get_password() {
            conf.push_str(&format!("backend.pgsql.pool1.password = {}\n", String::from_utf8_lossy(p)));
        }
        PgKit { client, conf }
    }

    fn pool_conf(&self) -> String {
        self.conf.clone()
    }

    fn custom_action(&self) -> String {
        r#"{"sql": ["insert into t(c, p) values (${clientid}, ${payload})"]}"#.to_string()
    }

    fn custom_text_action(&self) -> String {
        r#"{"sql": ["insert into t(c, p) values (${clientid}, convert_to(${payload}, 'UTF8'))"]}"#.to_string()
    }

    async fn client_state(&self, clientid: &str) -> Option<i64> {
        self.client
            .query_opt("SELECT state::int8 FROM mqtt_client WHERE clientid = $1", &[&clientid])
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    async fn stored_count(&self, topic: &str) -> i64 {
        self.client
            .query_one("SELECT count(*) FROM mqtt_msg WHERE topic = $1", &[&topic])
            .await
            .unwrap()
            .get(0)
    }

    async fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.client
            .query_opt("SELECT payload FROM mqtt_retain WHERE topic = $1", &[&topic])
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    async fn custom_rows(&self, clientid: &str) -> Vec<Vec<u8>> {
        self.client
            .query("SELECT p FROM t WHERE c = $1 ORDER BY id", &[&clientid])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn add_subscription(&self, clientid: &str, topic: &str, qos: i64) {
        self.client
            .execute(
                "INSERT INTO mqtt_sub (clientid, topic, qos) VALUES ($1, $2, $3::int8::int2)",
                &[&clientid, &topic, &qos],
            )
            .await
            .unwrap();
    }
}

/// Redis: the server of `REDIS_URL`; tests stay apart by unique client ids and topics.
pub struct RedisKit {
    conn: redis::aio::MultiplexedConnection,
    conf: String,
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

pub async fn redis_connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis_connect_to(redis::IntoConnectionInfo::into_connection_info(url).expect("REDIS_URL"), url).await
}

/// `info` is where to connect; `shown` names it in the failure (no password in it).
async fn redis_connect_to(info: redis::ConnectionInfo, shown: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(info)
        .expect("REDIS_URL")
        .get_multiplexed_tokio_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis at {shown} is unreachable ({e}); start it or set MQTT_PERSIST_SKIP=redis"))
}

impl RedisKit {
    /// On the server of `REDIS_URL`, in its database or in `db`.
    async fn on(db: Option<i64>) -> Self {
        let mut info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(redis_url().as_str()).unwrap();
        if let Some(db) = db {
            info.redis.db = db;
        }
        let conn = redis_connect_to(info.clone(), &redis_url()).await;
        let (host, port) = match info.addr {
            redis::ConnectionAddr::Tcp(h, p) => (h, p),
            _ => ("127.0.0.1".into(), 6379),
        };
        let mut conf = format!(
            "backend.redis.pool1.type = single\nbackend.redis.pool1.server = {host}:{port}\nbackend.redis.pool1.database = {}\n",
            info.redis.db
        );
        if let Some(p) = info.redis.password {
            conf.push_str(&format!("backend.redis.pool1.password = {p}\n"));
        }
        RedisKit { conn, conf }
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, c: &mut redis::Cmd) -> T {
        c.query_async(&mut self.conn.clone()).await.unwrap()
    }
}

impl Kit for RedisKit {
    const DB: &'static str = "redis";

    async fn new() -> Self {
        Self::on(None).await
    }

    /// The last of Redis's 16 databases, emptied first: only this kind of scenario uses it.
    async fn alone() -> Self {
        let kit = Self::on(Some(15)).await;
        kit.cmd::<()>(&mut redis::cmd("FLUSHDB")).await;
        kit
    }

    fn pool_conf(&self) -> String {
        self.conf.clone()
    }

    fn custom_action(&self) -> String {
        r#"{"commands": ["RPUSH t:${clientid} ${payload}"]}"#.to_string()
    }

    async fn client_state(&self, clientid: &str) -> Option<i64> {
        let s: Option<String> = self
            .cmd(redis::cmd("HGET").arg(format!("mqtt:client:{clientid}")).arg("state"))
            .await;
        s.and_then(|s| s.parse().ok())
    }

    async fn stored_count(&self, topic: &str) -> i64 {
        self.cmd(redis::cmd("ZCARD").arg(format!("mqtt:msg:{topic}"))).await
    }

    async fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.cmd(redis::cmd("HGET").arg(format!("mqtt:retain:{topic}")).arg("payload"))
            .await
    }

    async fn custom_rows(&self, clientid: &str) -> Vec<Vec<u8>> {
        self.cmd(redis::cmd("LRANGE").arg(format!("t:{clientid}")).arg(0).arg(-1)).await
    }

    async fn add_subscription(&self, clientid: &str, topic: &str, qos: i64) {
        let _: () = self
            .cmd(redis::cmd("HSET").arg(format!("mqtt:sub:{clientid}")).arg(topic).arg(qos))
            .await;
    }
}

/// PostgreSQL with `prepare = off` (PgBouncer transaction pooling): unnamed statements,
/// still bound parameters. Runs the whole suite a second time.
pub struct PgUnpreparedKit(PgKit);

impl Kit for PgUnpreparedKit {
    const DB: &'static str = "pgsql";

    async fn new() -> Self {
        PgUnpreparedKit(PgKit::new().await)
    }
    fn pool_conf(&self) -> String {
        format!("{}backend.pgsql.pool1.prepare = off\n", self.0.pool_conf())
    }
    fn custom_action(&self) -> String {
        self.0.custom_action()
    }
    fn custom_text_action(&self) -> String {
        self.0.custom_text_action()
    }
    async fn client_state(&self, clientid: &str) -> Option<i64> {
        self.0.client_state(clientid).await
    }
    async fn stored_count(&self, topic: &str) -> i64 {
        self.0.stored_count(topic).await
    }
    async fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.0.retained(topic).await
    }
    async fn custom_rows(&self, clientid: &str) -> Vec<Vec<u8>> {
        self.0.custom_rows(clientid).await
    }
    async fn add_subscription(&self, clientid: &str, topic: &str, qos: i64) {
        self.0.add_subscription(clientid, topic, qos).await
    }
}
