//! Side-by-side benchmarks, each comparing two things in one run (ratios, not absolute
//! targets). Run: `cargo bench --bench bench -- [layer|pgsql|redis|noloss|latency|memory|all]`.
//! Servers: PG_URL, REDIS_URL as for the tests. Results are printed as markdown rows.

use bytes::BytesMut;
use mqtt_persist::broker::wire;
use rumqttd::protocol::{v4::V4, Connect, Packet, Protocol, PubAck, PubAckReason, QoS as RQoS, Subscribe};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod matrix;
mod memory;

const PAYLOAD: usize = 100;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries too: benchmarks are not tests.
        println!("benchmarks run with `cargo bench --bench bench -- <scenario>`; nothing to do under cargo test");
        return;
    }
    let which: Vec<&str> = args.iter().skip(1).filter(|a| !a.starts_with('-')).map(String::as_str).collect();
    let all = which.is_empty() || which.contains(&"all");
    // As `mqtt-persist run` logs (rumqttd's per-packet spans off), to stderr.
    mqtt_persist::app::init_logging(tracing_subscriber::EnvFilter::from_default_env(), std::io::stderr);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("| benchmark | A | B | ratio A/B |\n|---|---|---|---|");
        if all || which.contains(&"layer") {
            layer().await;
        }
        if all || which.contains(&"pgsql") {
            pgsql().await;
        }
        if all || which.contains(&"redis") {
            redis_bench().await;
        }
        if all || which.contains(&"noloss") {
            noloss().await;
        }
        if all || which.contains(&"latency") {
            latency().await;
        }
        if all || which.contains(&"fetch") {
            fetch().await;
        }
        if all || which.contains(&"qos0") {
            qos0_default_conf().await;
        }
        if which.contains(&"matrix") {
            matrix::matrix().await;
        }
        if all || which.contains(&"memory") {
            memory::memory().await;
        }
    });
}

fn row(name: &str, a_label: &str, a: f64, b_label: &str, b: f64, unit: &str) {
    println!("| {name} | {a_label}: {a:.0} {unit} | {b_label}: {b:.0} {unit} | {:.2} |", a / b);
}

// ---------------------------------------------------------------- raw MQTT load generator

struct Raw {
    s: TcpStream,
    r: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr, id: &str) -> Raw {
        Self::connect_session(addr, id, true).await
    }

    /// `clean: false`: a persistent session (MQTT 3.1.1 clean session 0).
    async fn connect_session(addr: SocketAddr, id: &str, clean: bool) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = BytesMut::new();
        V4.write(
            Packet::Connect(
                Connect {
                    keep_alive: 60,
                    client_id: id.into(),
                    clean_session: clean,
                },
                None,
                None,
                None,
                None,
            ),
            &mut b,
        )
        .unwrap();
        s.write_all(&b).await.unwrap();
        let mut raw = Raw {
            s,
            r: BytesMut::with_capacity(1 << 20),
        };
        match raw.next().await {
            Packet::ConnAck(..) => raw,
            p => panic!("expected CONNACK, got {p:?}"),
        }
    }

    async fn next(&mut self) -> Packet {
        loop {
            match V4.read_mut(&mut self.r, 1 << 20) {
                Ok(p) => return p,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {
                    if self.s.read_buf(&mut self.r).await.unwrap() == 0 {
                        panic!("connection closed");
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: RQoS) {
        let mut b = BytesMut::new();
        let f = rumqttd::protocol::Filter {
            path: filter.into(),
            qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
        };
        V4.write(Packet::Subscribe(Subscribe { pkid: 1, filters: vec![f] }, None), &mut b)
            .unwrap();
        self.s.write_all(&b).await.unwrap();
        loop {
            if let Packet::SubAck(..) = self.next().await {
                return;
            }
        }
    }
}

/// Decodes every whole packet in `r`, hands each PUBLISH to `each` and writes a PUBACK for each
/// QoS 1 one into `out`.
fn drain_publishes(r: &mut BytesMut, out: &mut BytesMut, mut each: impl FnMut(rumqttd::protocol::Publish)) {
    loop {
        let hdr = wire::peek_publish(r);
        match V4.read_mut(r, 1 << 20) {
            Ok(Packet::Publish(p, _)) => {
                if let Some((1, pkid)) = hdr {
                    let ack = PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    };
                    V4.write(Packet::PubAck(ack, None), out).unwrap();
                }
                each(p);
            }
            Ok(_) => {}
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Decodes every whole packet in `r` and hands each PUBACK's packet id to `each`.
fn drain_pubacks(r: &mut BytesMut, mut each: impl FnMut(u16)) {
    loop {
        match V4.read_mut(r, 1 << 20) {
            Ok(Packet::PubAck(a, _)) => each(a.pkid),
            Ok(_) => {}
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Receives `n` publishes (acking QoS1), returns when all arrived. Payload bytes 0..8 carry
/// the send time in µs since `epoch`, so latencies can be read.
async fn subscriber(mut sub: Raw, n: u64, epoch: Instant, lat: Option<Arc<parking_lot::Mutex<Vec<u64>>>>) -> Instant {
    let mut got = 0u64;
    let mut out = BytesMut::new();
    loop {
        // Decode what is buffered, ack in one write.
        drain_publishes(&mut sub.r, &mut out, |p| {
            got += 1;
            if let Some(l) = &lat {
                let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                l.lock().push(epoch.elapsed().as_micros() as u64 - sent);
            }
        });
        if !out.is_empty() {
            sub.s.write_all(&out).await.unwrap();
            out.clear();
        }
        if got >= n {
            return Instant::now();
        }
        if sub.s.read_buf(&mut sub.r).await.unwrap() == 0 {
            panic!("subscriber closed after {got}/{n}");
        }
    }
}

/// Publishes `n` messages of PAYLOAD bytes at QoS `qos` keeping up to `window` unacked;
/// returns when the last PUBACK arrived (QoS1) or the last byte was written (QoS0).
async fn publisher(p: Raw, topic: &str, n: u64, qos: u8, window: u64, rate: Option<u64>, epoch: Instant) -> Instant {
    let (mut rd, mut wr) = p.s.into_split();
    let acked = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let (acked, notify) = (acked.clone(), notify.clone());
        let mut r = p.r;
        tokio::spawn(async move {
            loop {
                drain_pubacks(&mut r, |_| {
                    acked.fetch_add(1, Ordering::Relaxed);
                });
                notify.notify_one();
                if acked.load(Ordering::Relaxed) >= n {
                    return;
                }
                if rd.read_buf(&mut r).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        })
    };
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut payload = vec![b'x'; PAYLOAD];
    let mut sent = 0u64;
    let mut pkid: u16 = 0;
    let start = Instant::now();
    while sent < n {
        if qos > 0 {
            while sent - acked.load(Ordering::Relaxed) >= window {
                notify.notified().await;
            }
        }
        let burst = match rate {
            Some(r) => {
                let due = (start.elapsed().as_secs_f64() * r as f64) as u64;
                if due <= sent {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    continue;
                }
                (due - sent).min(64)
            }
            None => 256,
        };
        let room = if qos > 0 {
            window - (sent - acked.load(Ordering::Relaxed))
        } else {
            u64::MAX
        };
        for _ in 0..burst.min(room).min(n - sent) {
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            payload[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
            V4.write(
                Packet::Publish(wire::build_publish(topic.as_bytes(), &payload, qos, false, pkid), None),
                &mut buf,
            )
            .unwrap();
            sent += 1;
        }
        wr.write_all(&buf).await.unwrap();
        buf.clear();
    }
    if qos > 0 {
        let _ = reader.await;
    } else {
        reader.abort();
    }
    Instant::now()
}

/// Messages per second for `pubs` publishers → 1 subscriber (QoS `qos`) through `addr`.
async fn pub_sub(addr: SocketAddr, n: u64, qos: u8, tag: &str) -> f64 {
    let topic = format!("bench/{tag}/{}", mqtt_persist::model::now_ms());
    let mut sub = Raw::connect(addr, &format!("sub-{tag}")).await;
    sub.subscribe(&topic, if qos == 0 { RQoS::AtMostOnce } else { RQoS::AtLeastOnce })
        .await;
    let p = Raw::connect(addr, &format!("pub-{tag}")).await;
    let epoch = Instant::now();
    let s = tokio::spawn(subscriber(sub, n, epoch, None));
    let t0 = Instant::now();
    publisher(p, &topic, n, qos, 1000, None, epoch).await;
    let done = s.await.unwrap();
    n as f64 / (done - t0).as_secs_f64()
}

// ---------------------------------------------------------------- brokers under test

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// rumqttd's own broker with its own v4 listener, on the same router settings as ours.
fn rumqttd_broker() -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let settings = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let mut v4 = std::collections::HashMap::new();
    v4.insert("v4".to_string(), settings);
    let config = rumqttd::Config {
        id: 0,
        router: mqtt_persist::broker::engine::router_config(&Default::default()),
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let mut b = rumqttd::Broker::new(config);
        let _ = b.start();
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

fn conf_dir(plugin: Option<(&str, String)>, extra: &str) -> (tempfile::TempDir, mqtt_persist::config::Config) {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("plugins")).unwrap();
    let load = plugin.as_ref().map(|(d, _)| *d).unwrap_or("");
    std::fs::write(
        etc.join("mqtt-persist.conf"),
        format!(
            "listener.tcp.external = 127.0.0.1:0\nplugins.load = {load}\ndata.dir = {}\n{extra}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    if let Some((db, text)) = plugin {
        std::fs::write(etc.join("plugins").join(format!("emqx_backend_{db}.conf")), text).unwrap();
    }
    let conf = mqtt_persist::config::Config::load(&etc, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    (dir, conf)
}

/// Our broker on a runtime of its own (as in `mqtt-persist run`), so its database tasks never
/// share worker threads with the load generator's clients.
struct OurBroker {
    addr: SocketAddr,
    metrics: Arc<mqtt_persist::metrics::Registry>,
    _dir: tempfile::TempDir,
    _stop: std::sync::mpsc::Sender<()>,
}

async fn our_broker(plugin: Option<(&str, String)>, extra: &str) -> (tempfile::TempDir, OurBroker) {
    let (dir, conf) = conf_dir(plugin, extra);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let broker = rt.block_on(mqtt_persist::app::start(&conf)).unwrap();
        addr_tx.send((broker.addr, broker.engine.metrics.clone())).unwrap();
        let _ = stop_rx.recv();
        drop(broker);
        rt.shutdown_background();
    });
    let (addr, metrics) = addr_rx.recv().unwrap();
    let keep = tempfile::tempdir().unwrap();
    (
        dir,
        OurBroker {
            addr,
            metrics,
            _dir: keep,
            _stop: stop_tx,
        },
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---------------------------------------------------------------- scenarios

/// Our connection layer vs rumqttd's own listener, same router config, alternating runs.
async fn layer() {
    let theirs = rumqttd_broker();
    let (_d, ours) = our_broker(None, "").await;
    // QoS0 volume stays under one filter's commitlog (8 × 4 MiB): beyond it rumqttd drops QoS0
    // data for a slow subscriber (cursor jump), in both brokers alike.
    for (qos, n) in [(0u8, 150_000u64), (1, 200_000)] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..3 {
            a.push(pub_sub(ours.addr, n, qos, &format!("o{qos}{round}")).await);
            b.push(pub_sub(theirs, n, qos, &format!("r{qos}{round}")).await);
        }
        row(
            &format!("1 pub → 1 sub, QoS{qos}, {PAYLOAD} B, median of 3"),
            "mqtt-persist layer",
            median(a),
            "rumqttd listener",
            median(b),
            "msg/s",
        );
    }
}

fn pg_url() -> String {
    std::env::var("PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

async fn pg_fresh_db() -> (String, tokio_postgres::Client, String) {
    let mut cfg: tokio_postgres::Config = pg_url().parse().unwrap();
    let (admin, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("PostgreSQL");
    tokio::spawn(conn);
    let db = format!("mp_bench_{}", mqtt_persist::model::now_ms());
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    cfg.dbname(&db);
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.batch_execute(mqtt_persist::backends::pgsql::SCHEMA).await.unwrap();
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let pool = format!(
        "backend.pgsql.pool1.server = {host}:{}\nbackend.pgsql.pool1.username = {}\nbackend.pgsql.pool1.database = {db}\nbackend.pgsql.pool1.pool_size = 4\n",
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_user().unwrap_or("root")
    );
    (db, c, pool)
}

const PUBLISH_RULE: &str = r##"{"topic": "#", "action": {"function": "on_message_publish"}, "pool": "pool1"}"##;

/// Persisted msg/s: `pubs` QoS1 publishers, no-loss (PUBACK = committed), until all acked.
async fn persisted(addr: SocketAddr, pubs: u64, per: u64, tag: &str) -> f64 {
    let mut handles = Vec::new();
    let epoch = Instant::now();
    let mut clients = Vec::new();
    for i in 0..pubs {
        clients.push(Raw::connect(addr, &format!("p-{tag}-{i}")).await);
    }
    let t0 = Instant::now();
    for (i, c) in clients.into_iter().enumerate() {
        let topic = format!("bench/{tag}/{i}");
        handles.push(tokio::spawn(async move { publisher(c, &topic, per, 1, 2000, None, epoch).await }));
    }
    let mut end = t0;
    for h in handles {
        end = end.max(h.await.unwrap());
    }
    (pubs * per) as f64 / (end - t0).as_secs_f64()
}

/// The broker's batched `mqtt_msg` insert (one UNNEST statement per batch, autocommit).
const PG_INSERT: &str = "INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived) SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int2[], $5::bool[], $6::bytea[], $7::int8[]) ON CONFLICT (msgid) DO NOTHING";

/// One bare-ceiling transaction: `size` rows as the broker writes them, in one statement.
async fn pg_insert_batch(
    c: &tokio_postgres::Client,
    st: &tokio_postgres::Statement,
    ids: &mqtt_persist::broker::engine::MsgIdGen,
    topic: &str,
    size: usize,
) {
    let payload = [b'x'; PAYLOAD];
    let msgids: Vec<i64> = (0..size).map(|_| ids.next() as i64).collect();
    let now = mqtt_persist::model::now_ms();
    c.execute(
        st,
        &[
            &msgids,
            &vec!["bench"; size],
            &vec![topic; size],
            &vec![1i16; size],
            &vec![false; size],
            &vec![&payload[..]; size],
            &vec![now; size],
        ],
    )
    .await
    .unwrap();
}

async fn pgsql() {
    let (db, c, pool) = pg_fresh_db().await;
    let n = 200_000u64;
    // Ceiling: the same UNNEST statement, batches of 1000 rows, from this process.
    let st = c.prepare(PG_INSERT).await.unwrap();
    let t0 = Instant::now();
    let ids = mqtt_persist::broker::engine::MsgIdGen::new(9);
    for _ in 0..n / 1000 {
        pg_insert_batch(&c, &st, &ids, "bench/ceiling", 1000).await;
    }
    let ceiling = n as f64 / t0.elapsed().as_secs_f64();
    let (_d, ours) = our_broker(
        Some(("pgsql", format!("{pool}backend.pgsql.hook.message.publish.1 = {PUBLISH_RULE}\n"))),
        "",
    )
    .await;
    let rate = persisted(ours.addr, 4, n / 4, "pg").await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM mqtt_msg WHERE topic LIKE 'bench/pg/%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as u64, n, "every acked message is a row");
    row(
        &format!("PostgreSQL: QoS1 → mqtt_msg rows (no-loss, 4 publishers, {n} msgs)"),
        "broker persisted",
        rate,
        "bare UNNEST insert",
        ceiling,
        "msg/s",
    );
    drop(c);
    drop(ours);
    pg_drop_db(&db).await;
}

/// Drops a database `pg_fresh_db` made, so runs leave nothing behind on the shared server.
/// After a benchmark on `db`: its PostgreSQL database dropped, or its Redis database emptied.
async fn leave_nothing_behind(db: &str, pg: Option<(String, tokio_postgres::Client)>) {
    match pg {
        Some((name, client)) => {
            drop(client);
            pg_drop_db(&name).await;
        }
        None if db == "redis" => drop(redis_flushed().await),
        None => {}
    }
}

async fn pg_drop_db(db: &str) {
    let (admin, conn) = pg_url()
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// One bare-ceiling pipeline: the keys the broker writes for `size` messages on one topic
/// (hash + TTL per message; one multi-member ZADD, EXPIRE and topic-index ZADD per batch).
fn redis_ceiling_pipe(ids: &mqtt_persist::broker::engine::MsgIdGen, topic: &str, size: usize) -> redis::Pipeline {
    let payload = [b'x'; PAYLOAD];
    let mut p = redis::pipe();
    let zkey = format!("mqtt:msg:{topic}");
    let mut members = Vec::with_capacity(size);
    for _ in 0..size {
        let id = ids.next();
        let key = format!("mqtt:msg:{id}");
        p.cmd("HSET")
            .arg(&key)
            .arg("id")
            .arg(id)
            .arg("from")
            .arg("bench")
            .arg("qos")
            .arg(1)
            .arg("topic")
            .arg(topic)
            .arg("payload")
            .arg(&payload[..])
            .arg("ts")
            .arg(0)
            .arg("retain")
            .arg("false")
            .ignore();
        p.cmd("EXPIRE").arg(&key).arg(600).ignore();
        members.push(format!("{id:020}"));
    }
    let z = p.cmd("ZADD").arg(&zkey);
    for m in &members {
        z.arg(0).arg(m);
    }
    z.ignore();
    p.cmd("EXPIRE").arg(&zkey).arg(600).ignore();
    p.cmd("ZADD").arg("mqtt:topics:msg").arg(0).arg(topic).ignore();
    p
}

async fn redis_bench() {
    let mut c = redis_flushed().await;
    let n = 200_000u64;
    let ids = mqtt_persist::broker::engine::MsgIdGen::new(9);
    let topic = format!("bench/ceiling/{}", mqtt_persist::model::now_ms());
    let t0 = Instant::now();
    for _ in 0..n / 1000 {
        let _: () = redis_ceiling_pipe(&ids, &topic, 1000).query_async(&mut c).await.unwrap();
    }
    let ceiling = n as f64 / t0.elapsed().as_secs_f64();
    let (_d, ours) = our_broker(Some(("redis", redis_plugin())), "").await;
    let tag = format!("rd{}", mqtt_persist::model::now_ms());
    let rate = persisted(ours.addr, 4, n / 4, &tag).await;
    let mut stored = 0i64;
    for i in 0..4 {
        let k: i64 = redis::cmd("ZCARD")
            .arg(format!("mqtt:msg:bench/{tag}/{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
        stored += k;
    }
    assert_eq!(stored as u64, n, "every acked message is stored");
    redis_flushed().await;
    row(
        &format!("Redis: QoS1 → message hashes + indexes (no-loss, 4 publishers, {n} msgs)"),
        "broker persisted",
        rate,
        "bare pipelined client",
        ceiling,
        "msg/s",
    );
}

/// The server of `REDIS_URL`, database 14: a million benchmark keys (600 s TTL) must not sit
/// in the database the tests and users share.
fn redis_info() -> redis::ConnectionInfo {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
    info.redis.db = 14;
    info
}

/// A connection to the benchmark's database, emptied.
async fn redis_flushed() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis_info()).unwrap();
    let mut c = client.get_multiplexed_tokio_connection().await.expect("Redis");
    let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    c
}

/// The Redis plugin conf for the broker under test: `on_message_publish` on every topic.
fn redis_plugin() -> String {
    let info = redis_info();
    let server = match info.addr {
        redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
        _ => "127.0.0.1:6379".into(),
    };
    let rule = r##"{"topic": "#", "action": {"function": "on_message_publish"}, "expired_time": 600, "pool": "pool1"}"##;
    format!(
        "backend.redis.pool1.server = {server}\nbackend.redis.pool1.database = {}\nbackend.redis.hook.message.publish.1 = {rule}\n",
        info.redis.db
    )
}

/// The same PostgreSQL load with PUBACK-after-commit vs asynchronous writes (until all rows landed).
async fn noloss() {
    let n = 200_000u64;
    let mut results = Vec::new();
    for mode in ["on", "off"] {
        let (db, c, pool) = pg_fresh_db().await;
        // A queue that holds the whole burst, so async mode drops nothing either.
        let extra = format!("persist.no_loss = {mode}\npersist.queue_capacity = 1000000");
        let (_d, ours) = our_broker(
            Some(("pgsql", format!("{pool}backend.pgsql.hook.message.publish.1 = {PUBLISH_RULE}\n"))),
            &extra,
        )
        .await;
        let t0 = Instant::now();
        persisted(ours.addr, 4, n / 4, "nl").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows: i64 = c.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
            if rows as u64 >= n {
                break;
            }
            assert!(Instant::now() < deadline, "no-loss={mode}: only {rows}/{n} rows after 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        results.push(n as f64 / t0.elapsed().as_secs_f64());
        drop(ours);
        drop(c);
        pg_drop_db(&db).await;
    }
    row(
        "PostgreSQL persisted throughput, until every row landed",
        "no-loss (PUBACK after commit)",
        results[0],
        "async",
        results[1],
        "msg/s",
    );
}

/// publish→deliver p99 at a fixed rate, with persistence (no-loss) vs without, for each
/// database (or those listed in `BENCH_LAT_DB`, comma-separated): both brokers run side by
/// side, rounds alternate, the median p99 of `BENCH_ROUNDS` (5) rounds is reported (a single sub-millisecond p99 on 2 shared cores is
/// mostly scheduling noise).
async fn latency() {
    let rate: u64 = std::env::var("BENCH_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(5_000);
    let extra = std::env::var("BENCH_EXTRA").unwrap_or_default().replace(';', "\n");
    let only = std::env::var("BENCH_LAT_DB").ok();
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    for db in ["sqlite", "redis", "pgsql"] {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|o| o == db)) {
            continue;
        }
        let (pg, plugin) = match db {
            "sqlite" => (
                None,
                format!("backend.sqlite.pool1.path = data/lat.db\nbackend.sqlite.hook.message.publish.1 = {PUBLISH_RULE}\n"),
            ),
            "redis" => {
                redis_flushed().await;
                (None, redis_plugin())
            }
            _ => {
                let (name, client, pool) = pg_fresh_db().await;
                (
                    Some((name, client)),
                    format!("{pool}backend.pgsql.hook.message.publish.1 = {PUBLISH_RULE}\n"),
                )
            }
        };
        let (with, without) = p99_side_by_side(rate, rounds, (db, plugin), &extra).await;
        leave_nothing_behind(db, pg).await;
        row(
            &format!("publish→deliver p99 at {rate} msg/s QoS1 (median of {rounds} alternating rounds)"),
            &format!("with {db} persistence (no-loss)"),
            with,
            "without persistence",
            without,
            "µs",
        );
    }
}

async fn p99_side_by_side(rate: u64, rounds: usize, plugin: (&str, String), extra: &str) -> (f64, f64) {
    let n = rate * 3;
    let (_d1, with_db) = our_broker(Some(plugin), extra).await;
    let (_d2, without) = our_broker(None, extra).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (addr, out) in [(with_db.addr, &mut a), (without.addr, &mut b)] {
            let topic = format!("bench/lat/{round}/{}", addr.port());
            let mut sub = Raw::connect(addr, &format!("lsub{round}-{}", addr.port())).await;
            sub.subscribe(&topic, RQoS::AtLeastOnce).await;
            let p = Raw::connect(addr, &format!("lpub{round}-{}", addr.port())).await;
            let epoch = Instant::now();
            let lat = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let s = tokio::spawn(subscriber(sub, n, epoch, Some(lat.clone())));
            publisher(p, &topic, n, 1, 1000, Some(rate), epoch).await;
            s.await.unwrap();
            let mut v = lat.lock().clone();
            v.sort();
            out.push(v[v.len() * 99 / 100] as f64);
        }
    }
    (median(a), median(b))
}

/// Offline delivery: 10k QoS1 messages stored behind a subscriber's read pointer, delivered on
/// its next subscription (fetch, paged, acked as they come) vs the same 10k delivered live
/// through the same broker, per database.
async fn fetch() {
    let n = 10_000u64;
    let rules = |pool: &str, db: &str| {
        format!(
            "backend.{db}.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"{pool}\"}}\n\
             backend.{db}.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"offline_opts\": {{\"max_returned_count\": \"infinity\"}}, \"pool\": \"{pool}\"}}\n\
             backend.{db}.hook.message.acked.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_acked\"}}, \"pool\": \"{pool}\"}}\n"
        )
    };
    for db in ["sqlite", "pgsql", "redis"] {
        let mut pg = None;
        let plugin = match db {
            "sqlite" => format!("backend.sqlite.pool1.path = data/fetch.db\n{}", rules("pool1", "sqlite")),
            "redis" => {
                redis_flushed().await;
                let info = redis_info();
                let server = match info.addr {
                    redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
                    _ => "127.0.0.1:6379".into(),
                };
                format!(
                    "backend.redis.pool1.server = {server}\nbackend.redis.pool1.database = {}\n{}",
                    info.redis.db,
                    rules("pool1", "redis")
                )
            }
            _ => {
                let (name, client, pool) = pg_fresh_db().await;
                pg = Some((name, client));
                format!("{pool}{}", rules("pool1", "pgsql"))
            }
        };
        let (_d, ours) = our_broker(Some((db, plugin)), "").await;
        let tag = format!("{db}{}", mqtt_persist::model::now_ms());
        let filter = format!("bench/fetch/{tag}/#");
        let topic = format!("bench/fetch/{tag}/t");
        let sub_id = format!("fetch-{tag}");
        // The first subscription creates the read pointer; then the subscriber goes away.
        let mut s = Raw::connect(ours.addr, &sub_id).await;
        s.subscribe(&filter, RQoS::AtLeastOnce).await;
        drop(s);
        let epoch = Instant::now();
        publisher(Raw::connect(ours.addr, &format!("fp-{tag}")).await, &topic, n, 1, 100, None, epoch).await;
        let mut s = Raw::connect(ours.addr, &sub_id).await;
        let t0 = Instant::now();
        s.subscribe(&filter, RQoS::AtLeastOnce).await;
        let done = subscriber(s, n, epoch, None).await;
        let fetched = n as f64 / (done - t0).as_secs_f64();
        let live = pub_sub(ours.addr, n, 1, &format!("l{tag}")).await;
        drop(ours);
        leave_nothing_behind(db, pg).await;
        row(
            &format!("{db}: {n} stored QoS1 messages fetched on subscribe (paged, acked)"),
            "fetch",
            fetched,
            "live delivery, same broker",
            live,
            "msg/s",
        );
    }
}

/// QoS0 deliveries through a broker on the shipped SQLite conf (which stores QoS 1/2 and
/// retained messages, so a plain QoS0 message has nothing to store) vs the same broker with no
/// backend loaded, alternating rounds.
async fn qos0_default_conf() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/plugins/emqx_backend_sqlite.conf")).unwrap();
    let (_d1, with) = our_broker(Some(("sqlite", shipped)), "").await;
    let (_d2, without) = our_broker(None, "").await;
    let n = 150_000u64;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..5 {
        a.push(pub_sub(with.addr, n, 0, &format!("q0d{round}")).await);
        b.push(pub_sub(without.addr, n, 0, &format!("q0n{round}")).await);
    }
    row(
        &format!("1 pub → 1 sub, QoS0, {PAYLOAD} B, median of 5"),
        "shipped SQLite conf",
        median(a),
        "no backend",
        median(b),
        "msg/s",
    );
}
