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
    /// The action of a custom rule (on `message.publish`) that the database refuses — a
    /// permanent, data-level error, not an outage — when `${payload}` is the text `bad`, and
    /// that otherwise stores `${clientid}` and `${payload}` so [`custom_rows`](Kit::custom_rows)
    /// shows the accepted payloads. SQLite and PostgreSQL: `custom_action` itself, as `t.p`
    /// has `CHECK (p <> 'bad')`. Redis: see [`RedisKit`].
    fn refusing_action(&self) -> String;
    async fn client_state(&self, clientid: &str) -> Option<i64>;
    /// The stored read pointer of `clientid` on subscription `filter`: the msgid it acked last
    /// (`mqtt_acked.mid`; Redis `mqtt:acked:<clientid>:<filter>`); `None` without a pointer.
    async fn pointer(&self, clientid: &str, filter: &str) -> Option<i64>;
    /// The msgids of the messages stored for `topic` (`mqtt_msg`; Redis: the ids in the
    /// topic's index whose message hash exists), ascending.
    async fn msgids(&self, topic: &str) -> Vec<i64>;
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
        // EMQX 4's fetch for clean sessions too: most scenarios test the fetch itself with
        // clean clients; `clean_sessions_have_no_read_pointers` tests the default.
        s.push_str(&format!(
            "backend.{db}.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"pool\": \"pool1\", \"offline_opts\": {{\"clean_start\": \"fetch\"}}}}\n"
        ));
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
        // Text payloads are bound as TEXT, so the CHECK refuses exactly the text `bad`
        // (refusing_action); binary payloads are BLOBs and always differ from it.
        c.execute_batch("CREATE TABLE t (c TEXT, p BLOB CHECK (p <> 'bad'))").unwrap();
        SqliteKit { _dir: dir, path }
    }

    fn pool_conf(&self) -> String {
        format!("backend.sqlite.pool1.path = {}\n", self.path.display())
    }

    fn custom_action(&self) -> String {
        r#"{"sql": ["insert into t(c, p) values (${clientid}, ${payload})"]}"#.to_string()
    }

    fn refusing_action(&self) -> String {
        self.custom_action()
    }

    async fn client_state(&self, clientid: &str) -> Option<i64> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row("SELECT state FROM mqtt_client WHERE clientid = ?1", [clientid], |r| r.get(0))
            .optional()
            .unwrap()
    }

    async fn pointer(&self, clientid: &str, filter: &str) -> Option<i64> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row(
                "SELECT mid FROM mqtt_acked WHERE clientid = ?1 AND topic = ?2",
                [clientid, filter],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
    }

    async fn msgids(&self, topic: &str) -> Vec<i64> {
        let c = self.conn();
        let mut st = c.prepare("SELECT msgid FROM mqtt_msg WHERE topic = ?1 ORDER BY msgid").unwrap();
        let rows = st.query_map([topic], |r| r.get(0));
        rows.unwrap().map(Result::unwrap).collect()
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

/// PostgreSQL: a fresh database per test on the server of `PG_URL`, dropped with the kit.
pub struct PgKit {
    client: tokio_postgres::Client,
    conf: String,
    db: String,
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

/// The kit's database goes with it (`WITH (FORCE)` ends the connections still on it: the
/// kit's own, a broker's that outlived the test). Drop cannot await, and may run inside the
/// test's runtime, so a thread of its own with a small runtime does the work.
impl Drop for PgKit {
    fn drop(&mut self) {
        let db = self.db.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let cfg: tokio_postgres::Config = pg_url().parse().map_err(|e| format!("PG_URL: {e}"))?;
                let (admin, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database {} not dropped: {e}", self.db),
            Err(_) => eprintln!("test database {} not dropped: the dropping thread panicked", self.db),
        }
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
        // The CHECK makes `custom_action` the refusing action too (refusing_action).
        client
            .batch_execute("CREATE TABLE t (id BIGSERIAL, c TEXT, p BYTEA CHECK (p <> 'bad'::bytea))")
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
        PgKit { client, conf, db }
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

    fn refusing_action(&self) -> String {
        self.custom_action()
    }

    async fn client_state(&self, clientid: &str) -> Option<i64> {
        self.client
            .query_opt("SELECT state::int8 FROM mqtt_client WHERE clientid = $1", &[&clientid])
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    async fn pointer(&self, clientid: &str, filter: &str) -> Option<i64> {
        self.client
            .query_opt(
                "SELECT mid::int8 FROM mqtt_acked WHERE clientid = $1 AND topic = $2",
                &[&clientid, &filter],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    async fn msgids(&self, topic: &str) -> Vec<i64> {
        self.client
            .query("SELECT msgid::int8 FROM mqtt_msg WHERE topic = $1 ORDER BY msgid", &[&topic])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
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

/// Redis: the server of `REDIS_URL`, database 0; tests stay apart by unique client ids and
/// topics. The kit tags every [`unique`](crate::common::unique) name its test makes after it
/// (`…k<pid>x<time>x<n>n<m>`), and deletes the keys holding that mark when dropped: the
/// message hashes of its topics, its members of the shared topic indexes and node hashes.
/// A kit made with [`Kit::alone`] owns database 15 (a lock in database 0 keeps other
/// processes' `alone` kits out meanwhile) and empties it before and after.
///
/// The refusing action (Redis has no CHECK constraint, and a command's tokens other than its
/// key are substituted only when they are a whole placeholder): one command,
/// `HSET t:<tag>n:r:${payload} ${msgid} ${clientid}`, whose key is a plain string for the
/// payload `bad` (the kit sets `t:<tag>n:r:bad` first), so Redis refuses that one with
/// WRONGTYPE — a data error, never retried — and stores every other payload, keyed by itself,
/// with the message's id and client. `custom_rows` lists a client's `t:<clientid>` rows (the
/// custom action's) and then its refusing-action rows in msgid order: the order written.
pub struct RedisKit {
    conn: redis::aio::MultiplexedConnection,
    conf: String,
    info: redis::ConnectionInfo,
    tag: String,
    /// The tag `unique` used before this kit, restored on drop.
    outer_tag: Option<String>,
    /// Database 15 is this kit's (and the lock in database 0 holds this value).
    alone: bool,
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

/// The key in database 0 whose holder owns database 15 (`RedisKit::alone`).
const ALONE_LOCK: &str = "mqtt-persist:test:db15-owner";
const ALONE_DB: i64 = 15;

impl RedisKit {
    /// On the server of `REDIS_URL`, in its database or in `db`.
    async fn on(db: Option<i64>) -> Self {
        let mut info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(redis_url().as_str()).unwrap();
        if let Some(db) = db {
            info.redis.db = db;
        }
        let conn = redis_connect_to(info.clone(), &redis_url()).await;
        let (host, port) = match &info.addr {
            redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
            _ => ("127.0.0.1".into(), 6379),
        };
        let mut conf = format!(
            "backend.redis.pool1.type = single\nbackend.redis.pool1.server = {host}:{port}\nbackend.redis.pool1.database = {}\n",
            info.redis.db
        );
        if let Some(p) = &info.redis.password {
            conf.push_str(&format!("backend.redis.pool1.password = {p}\n"));
        }
        let tag = crate::common::fresh_tag();
        let outer_tag = crate::common::set_unique_tag(Some(tag.clone()));
        RedisKit {
            conn,
            conf,
            info,
            tag,
            outer_tag,
            alone: false,
        }
    }

    /// What every name of this kit's test holds: the tag and the `n` that follows it in
    /// [`unique`](crate::common::unique) names (so tag `…x3` never matches `…x30`'s names).
    fn mark(&self) -> String {
        format!("{}n", self.tag)
    }

    /// The key the refusing action writes for `payload` (a string for `bad`: refused).
    fn refusing_prefix(&self) -> String {
        format!("t:{}:r:", self.mark())
    }

    async fn set_refusal(&self) {
        let _: () = self
            .cmd(redis::cmd("SET").arg(format!("{}bad", self.refusing_prefix())).arg("refused"))
            .await;
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, c: &mut redis::Cmd) -> T {
        c.query_async(&mut self.conn.clone()).await.unwrap()
    }

    /// Every key matching `pattern` (SCAN: never blocks the shared server like KEYS would).
    async fn scan(&self, pattern: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .cmd(redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000))
                .await;
            out.extend(keys);
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }

    /// Deletes what the kit's test stored under tagged names, in database 0 (best effort:
    /// a failure is reported, not raised, as this runs while a failed test unwinds too).
    fn cleanup(&self) -> redis::RedisResult<()> {
        use redis::Commands;
        let client = redis::Client::open(self.info.clone())?;
        let mut c = client.get_connection_with_timeout(std::time::Duration::from_secs(5))?;
        if self.alone {
            redis::cmd("FLUSHDB").query::<()>(&mut c)?;
            redis::cmd("SELECT").arg(0).query::<()>(&mut c)?;
            // Released only if still ours (it expires by itself after a crash).
            redis::cmd("EVAL")
                .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
                .arg(1)
                .arg(ALONE_LOCK)
                .arg(&self.tag)
                .query::<()>(&mut c)?;
            return Ok(());
        }
        let pattern = format!("*{}*", self.mark());
        let keys: Vec<Vec<u8>> = c.scan_match::<_, Vec<u8>>(&pattern)?.collect();
        for key in &keys {
            // A topic's index of stored messages: the message hashes are keyed by msgid.
            if key.starts_with(b"mqtt:msg:") && redis::cmd("TYPE").arg(key).query::<String>(&mut c)? == "zset" {
                let ids: Vec<String> = c.zrange(key, 0, -1)?;
                for chunk in ids.chunks(500) {
                    let hashes: Vec<String> = chunk
                        .iter()
                        .map(|id| format!("mqtt:msg:{}", id.parse::<u64>().unwrap_or(0)))
                        .collect();
                    c.del::<_, ()>(hashes)?;
                }
            }
        }
        for chunk in keys.chunks(500) {
            c.del::<_, ()>(chunk)?;
        }
        for index in ["mqtt:topics:msg", "mqtt:topics:retain", "mqtt:topics:latest"] {
            let members: Vec<Vec<u8>> = c.zscan_match::<_, _, Vec<u8>>(index, &pattern)?.collect();
            // ZSCAN yields member, score, member, score…
            let members: Vec<&Vec<u8>> = members.iter().step_by(2).collect();
            for chunk in members.chunks(500) {
                c.zrem::<_, _, ()>(index, chunk)?;
            }
        }
        let nodes: Vec<Vec<u8>> = c.scan_match::<_, Vec<u8>>("mqtt:node:*")?.collect();
        for node in nodes {
            let fields: Vec<Vec<u8>> = c.hscan_match::<_, _, Vec<u8>>(&node, &pattern)?.collect();
            let fields: Vec<&Vec<u8>> = fields.iter().step_by(2).collect();
            for chunk in fields.chunks(500) {
                c.hdel::<_, _, ()>(&node, chunk)?;
            }
        }
        Ok(())
    }
}

impl Drop for RedisKit {
    fn drop(&mut self) {
        crate::common::set_unique_tag(self.outer_tag.take());
        if let Err(e) = self.cleanup() {
            eprintln!("Redis keys of test kit {} not (all) deleted: {e}", self.tag);
        }
    }
}

impl Kit for RedisKit {
    const DB: &'static str = "redis";

    async fn new() -> Self {
        let kit = Self::on(None).await;
        kit.set_refusal().await;
        kit
    }

    /// The last of Redis's 16 databases, emptied first: only this kind of scenario uses it,
    /// one kit at a time across processes (a lock key in database 0, see [`RedisKit`]).
    async fn alone() -> Self {
        let mut kit = Self::on(Some(ALONE_DB)).await;
        let mut info = kit.info.clone();
        info.redis.db = 0;
        let db0 = redis_connect_to(info, &redis_url()).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let got: Option<String> = redis::cmd("SET")
                .arg(ALONE_LOCK)
                .arg(&kit.tag)
                .arg("NX")
                .arg("PX")
                .arg(300_000)
                .query_async(&mut db0.clone())
                .await
                .unwrap();
            if got.is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Redis database {ALONE_DB} stayed in use by another test (key {ALONE_LOCK} in database 0)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        kit.alone = true;
        kit.cmd::<()>(&mut redis::cmd("FLUSHDB")).await;
        kit.set_refusal().await;
        kit
    }

    fn pool_conf(&self) -> String {
        self.conf.clone()
    }

    fn custom_action(&self) -> String {
        r#"{"commands": ["RPUSH t:${clientid} ${payload}"]}"#.to_string()
    }

    fn refusing_action(&self) -> String {
        format!(
            r#"{{"commands": ["HSET {}${{payload}} ${{msgid}} ${{clientid}}"]}}"#,
            self.refusing_prefix()
        )
    }

    async fn client_state(&self, clientid: &str) -> Option<i64> {
        let s: Option<String> = self
            .cmd(redis::cmd("HGET").arg(format!("mqtt:client:{clientid}")).arg("state"))
            .await;
        s.and_then(|s| s.parse().ok())
    }

    async fn pointer(&self, clientid: &str, filter: &str) -> Option<i64> {
        let s: Option<String> = self.cmd(redis::cmd("GET").arg(format!("mqtt:acked:{clientid}:{filter}"))).await;
        s.map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("pointer of {clientid} on {filter} is not a msgid: {s:?}"))
        })
    }

    async fn msgids(&self, topic: &str) -> Vec<i64> {
        let ids: Vec<String> = self.cmd(redis::cmd("ZRANGE").arg(format!("mqtt:msg:{topic}")).arg(0).arg(-1)).await;
        let ids: Vec<i64> = ids
            .iter()
            .map(|i| i.parse().unwrap_or_else(|_| panic!("index of {topic} holds {i:?}")))
            .collect();
        if ids.is_empty() {
            return ids;
        }
        // The index may still name messages whose hash is gone (expired, deleted): only the
        // hashes are stored messages.
        let mut p = redis::pipe();
        for id in &ids {
            p.cmd("EXISTS").arg(format!("mqtt:msg:{id}"));
        }
        let exists: Vec<bool> = p.query_async(&mut self.conn.clone()).await.unwrap();
        let mut out: Vec<i64> = ids.into_iter().zip(exists).filter(|(_, e)| *e).map(|(i, _)| i).collect();
        out.sort();
        out
    }

    async fn stored_count(&self, topic: &str) -> i64 {
        self.msgids(topic).await.len() as i64
    }

    async fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        self.cmd(redis::cmd("HGET").arg(format!("mqtt:retain:{topic}")).arg("payload"))
            .await
    }

    async fn custom_rows(&self, clientid: &str) -> Vec<Vec<u8>> {
        let mut rows: Vec<Vec<u8>> = self.cmd(redis::cmd("LRANGE").arg(format!("t:{clientid}")).arg(0).arg(-1)).await;
        let prefix = self.refusing_prefix();
        let mut refusing: Vec<(u64, Vec<u8>)> = Vec::new();
        for key in self.scan(&format!("{prefix}*")).await {
            let kind: String = self.cmd(redis::cmd("TYPE").arg(&key)).await;
            if kind != "hash" {
                continue; // the refusal itself (`…:bad`, a string)
            }
            let fields: std::collections::HashMap<String, Vec<u8>> = self.cmd(redis::cmd("HGETALL").arg(&key)).await;
            for (msgid, c) in fields {
                if c == clientid.as_bytes() {
                    refusing.push((msgid.parse().unwrap(), key[prefix.len()..].to_vec()));
                }
            }
        }
        refusing.sort();
        rows.extend(refusing.into_iter().map(|(_, p)| p));
        rows
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
    fn refusing_action(&self) -> String {
        self.0.refusing_action()
    }
    async fn client_state(&self, clientid: &str) -> Option<i64> {
        self.0.client_state(clientid).await
    }
    async fn pointer(&self, clientid: &str, filter: &str) -> Option<i64> {
        self.0.pointer(clientid, filter).await
    }
    async fn msgids(&self, topic: &str) -> Vec<i64> {
        self.0.msgids(topic).await
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
