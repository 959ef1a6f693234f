//! The throughput matrix: windows × publishers × databases, each cell against the database's
//! bare ceiling measured the same way in the same run, plus the broker with no database and
//! Mosquitto on the same loads. Every cell checks the load: each PUBLISH acked exactly once,
//! each message delivered to the subscriber exactly once, each acked message exactly one row.
//!
//! `cargo bench --bench bench -- matrix`; `BENCH_DB` (sqlite,pgsql,redis), `BENCH_WINDOWS`
//! (10,100,1000), `BENCH_PUBS` (1,4,100), `BENCH_N` (messages per cell, 100000), `BENCH_ROUNDS`
//! (1: more alternate the ceiling and each broker, and report medians),
//! `BENCH_PEERS=off` skips the no-database and Mosquitto rows. `BENCH_VARIANTS` runs several
//! broker confs side by side, cell by cell: `|` between variants, `;` between the plugin lines
//! of one; `backend.` lines of other databases are ignored, other lines go to the broker's conf (e.g.
//! `backend.pgsql.pool1.write_concurrency = 1|backend.pgsql.pool1.write_concurrency = 2`).

use super::*;

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn list_by(var: &str, sep: char) -> Vec<String> {
    let v: Vec<String> = std::env::var(var)
        .unwrap_or_default()
        .split(sep)
        .map(|s| s.trim().to_string())
        .collect();
    if v.is_empty() {
        vec![String::new()]
    } else {
        v
    }
}

fn nums(var: &str, default: &str) -> Vec<u64> {
    list(var, default)
        .iter()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{var}: `{s}` is not a number")))
        .collect()
}

/// The pool size the broker runs with, and the most connections a bare ceiling uses.
const POOL: u64 = 4;
/// The broker's default `persist.batch_size`: the largest transaction it forms.
const BATCH: u64 = 1000;

/// What one checked run saw.
#[derive(Default)]
struct Load {
    rate: f64,
    unacked: u64,
    dup_acks: u64,
    missing: u64,
    dup_deliveries: u64,
}

impl Load {
    fn verdict(&self) -> String {
        if self.unacked + self.dup_acks + self.missing + self.dup_deliveries == 0 {
            "none".into()
        } else {
            format!(
                "**{} unacked, {} acked twice, {} not delivered, {} delivered twice**",
                self.unacked, self.dup_acks, self.missing, self.dup_deliveries
            )
        }
    }
}

/// `pubs` QoS1 publishers on `m/<tag>/<i>` keeping at most `window` unacked, `per` messages
/// each, one QoS1 subscriber on `m/<tag>/#`. Payload bytes 8..16 carry (publisher, sequence).
/// Publishers stop waiting 20 s after the last PUBACK, the subscriber 5 s after the publishers
/// finished and its last delivery: what has not come by then is counted as lost.
async fn checked(addr: SocketAddr, pubs: u64, window: u64, per: u64, tag: &str) -> Load {
    let mut sub = Raw::connect(addr, &format!("ms-{tag}")).await;
    sub.subscribe(&format!("m/{tag}/#"), RQoS::AtLeastOnce).await;
    let mut clients = Vec::new();
    for i in 0..pubs {
        clients.push(Raw::connect(addr, &format!("mp-{tag}-{i}")).await);
    }
    let pubs_done = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = {
        let (pubs_done, finished) = (pubs_done.clone(), finished.clone());
        tokio::spawn(checked_subscriber(sub, pubs, per, pubs_done, finished))
    };
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let topic = format!("m/{tag}/{i}");
        handles.push(tokio::spawn(checked_publisher(c, topic, i as u32, per, window)));
    }
    let mut load = Load::default();
    let mut end = t0;
    for h in handles {
        let (at, unacked, dups) = h.await.unwrap();
        end = end.max(at);
        load.unacked += unacked;
        load.dup_acks += dups;
    }
    finished.store(true, Ordering::Release);
    pubs_done.notify_one();
    let (last, missing, dups) = s.await.unwrap();
    load.missing = missing;
    load.dup_deliveries = dups;
    let end = end.max(last);
    load.rate = (pubs * per - load.unacked.max(missing)) as f64 / (end - t0).as_secs_f64();
    load
}

/// Returns (time of the last PUBACK, messages never acked, PUBACKs for nothing outstanding).
async fn checked_publisher(p: Raw, topic: String, idx: u32, n: u64, window: u64) -> (Instant, u64, u64) {
    let (mut rd, mut wr) = p.s.into_split();
    // pkid → outstanding; the reader clears, the writer sets.
    let outstanding = Arc::new(parking_lot::Mutex::new(vec![false; 65_536]));
    let acked = Arc::new(AtomicU64::new(0));
    let dups = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let (outstanding, acked, dups, notify) = (outstanding.clone(), acked.clone(), dups.clone(), notify.clone());
        let mut r = p.r;
        tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                drain_pubacks(&mut r, |pkid| {
                    if std::mem::take(&mut outstanding.lock()[pkid as usize]) {
                        acked.fetch_add(1, Ordering::Relaxed);
                        last = Instant::now();
                    } else {
                        dups.fetch_add(1, Ordering::Relaxed);
                    }
                });
                notify.notify_one();
                if acked.load(Ordering::Relaxed) >= n {
                    return last;
                }
                match tokio::time::timeout(Duration::from_secs(20), rd.read_buf(&mut r)).await {
                    Ok(Ok(k)) if k > 0 => {}
                    _ => return last,
                }
            }
        })
    };
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut payload = vec![b'x'; PAYLOAD];
    payload[8..12].copy_from_slice(&idx.to_be_bytes());
    let mut sent = 0u64;
    let mut pkid: u16 = 0;
    while sent < n {
        while sent - acked.load(Ordering::Relaxed) >= window {
            if reader.is_finished() {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notify.notified()).await;
        }
        if reader.is_finished() {
            break;
        }
        let room = window - (sent - acked.load(Ordering::Relaxed));
        {
            let mut o = outstanding.lock();
            for _ in 0..room.min(n - sent).min(256) {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                o[pkid as usize] = true;
                payload[12..16].copy_from_slice(&(sent as u32).to_be_bytes());
                V4.write(
                    Packet::Publish(wire::build_publish(topic.as_bytes(), &payload, 1, false, pkid), None),
                    &mut buf,
                )
                .unwrap();
                sent += 1;
            }
        }
        wr.write_all(&buf).await.unwrap();
        buf.clear();
    }
    let last = reader.await.unwrap();
    (last, n - acked.load(Ordering::Relaxed), dups.load(Ordering::Relaxed))
}

/// Returns (time of the last new delivery, messages not delivered, messages delivered twice).
async fn checked_subscriber(
    mut sub: Raw,
    pubs: u64,
    per: u64,
    pubs_done: Arc<tokio::sync::Notify>,
    finished: Arc<std::sync::atomic::AtomicBool>,
) -> (Instant, u64, u64) {
    let total = pubs * per;
    let mut seen = vec![false; total as usize];
    let (mut unique, mut dups) = (0u64, 0u64);
    let mut last = Instant::now();
    let mut out = BytesMut::new();
    loop {
        drain_publishes(&mut sub.r, &mut out, |p| {
            let i = u32::from_be_bytes(p.payload[8..12].try_into().unwrap()) as u64;
            let seq = u32::from_be_bytes(p.payload[12..16].try_into().unwrap()) as u64;
            if std::mem::replace(&mut seen[(i * per + seq) as usize], true) {
                dups += 1;
            } else {
                unique += 1;
                last = Instant::now();
            }
        });
        if !out.is_empty() {
            sub.s.write_all(&out).await.unwrap();
            out.clear();
        }
        if unique >= total {
            return (last, 0, dups);
        }
        // Losses show as silence after the publishers are done.
        let read = async {
            loop {
                if finished.load(Ordering::Acquire) {
                    return tokio::time::timeout(Duration::from_secs(5), sub.s.read_buf(&mut sub.r)).await.ok();
                }
                tokio::select! {
                    r = sub.s.read_buf(&mut sub.r) => return Some(r),
                    _ = pubs_done.notified() => {}
                }
            }
        };
        match read.await {
            Some(Ok(k)) if k > 0 => {}
            _ => return (last, total - unique, dups),
        }
    }
}

/// The database under test: its broker conf, its bare ceiling, and how to count rows.
enum Db {
    Sqlite {
        dir: tempfile::TempDir,
    },
    Pgsql {
        name: String,
        client: tokio_postgres::Client,
        pool: String,
    },
    Redis {
        conn: redis::aio::MultiplexedConnection,
    },
}

impl Db {
    async fn open(kind: &str) -> Db {
        match kind {
            "sqlite" => Db::Sqlite {
                dir: tempfile::tempdir().unwrap(),
            },
            "pgsql" => {
                let (name, client, pool) = pg_fresh_db().await;
                Db::Pgsql { name, client, pool }
            }
            "redis" => Db::Redis {
                conn: redis_flushed().await,
            },
            other => panic!("BENCH_DB: unknown database `{other}` (sqlite, pgsql, redis)"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Pgsql { .. } => "pgsql",
            Db::Redis { .. } => "redis",
        }
    }

    /// The plugin conf, plus the lines of `variant` (`;`-separated, e.g.
    /// `backend.pgsql.pool1.write_concurrency = 1`) that are this database's.
    fn plugin(&self, variant: &str) -> (&'static str, String) {
        let (db, mut text) = self.plugin_base();
        for line in variant.split(';').filter(|l| l.trim().starts_with(&format!("backend.{db}."))) {
            text.push_str(line);
            text.push('\n');
        }
        (db, text)
    }

    fn plugin_base(&self) -> (&'static str, String) {
        match self {
            Db::Sqlite { dir } => (
                "sqlite",
                format!(
                    "backend.sqlite.pool1.path = {}\nbackend.sqlite.hook.message.publish.1 = {PUBLISH_RULE}\n",
                    dir.path().join("broker.db").display()
                ),
            ),
            Db::Pgsql { pool, .. } => ("pgsql", format!("{pool}backend.pgsql.hook.message.publish.1 = {PUBLISH_RULE}\n")),
            Db::Redis { .. } => ("redis", redis_plugin()),
        }
    }

    /// (rows, rows with distinct (publisher, sequence)) stored for cell `tag`.
    async fn rows(&mut self, tag: &str, pubs: u64) -> (u64, u64) {
        let like = format!("m/{tag}/%");
        match self {
            Db::Sqlite { dir } => {
                let path = dir.path().join("broker.db");
                tokio::task::spawn_blocking(move || {
                    let c = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
                    c.query_row(
                        "SELECT count(*), count(DISTINCT substr(payload, 9, 8)) FROM mqtt_msg WHERE topic LIKE ?1",
                        [&like],
                        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                    )
                    .unwrap()
                })
                .await
                .unwrap()
            }
            Db::Pgsql { client, .. } => {
                let r = client
                    .query_one(
                        "SELECT count(*), count(DISTINCT substring(payload from 9 for 8)) FROM mqtt_msg WHERE topic LIKE $1",
                        &[&like],
                    )
                    .await
                    .unwrap();
                (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)
            }
            Db::Redis { conn } => {
                // One index member per stored message: a second row of the same PUBLISH would
                // be a second msgid, so the count alone shows duplicates.
                let mut n = 0u64;
                for i in 0..pubs {
                    let k: u64 = redis::cmd("ZCARD")
                        .arg(format!("mqtt:msg:m/{tag}/{i}"))
                        .query_async(conn)
                        .await
                        .unwrap();
                    n += k;
                }
                (n, n)
            }
        }
    }

    /// The bare ceiling: back-to-back writes of `size` messages at `conc` concurrency, the same
    /// rows (or keys) the broker writes, `n` in all; msg/s.
    async fn ceiling(&mut self, n: u64, size: u64, conc: u64) -> f64 {
        let size = size.max(1);
        let batches = n.div_ceil(size);
        let per_conn = batches.div_ceil(conc);
        match self {
            Db::Sqlite { dir } => {
                let path = dir.path().join("ceiling.db");
                tokio::task::spawn_blocking(move || {
                    let mut c = rusqlite::Connection::open(&path).unwrap();
                    c.pragma_update(None, "journal_mode", "WAL").unwrap();
                    c.pragma_update(None, "synchronous", "full").unwrap();
                    c.execute_batch(mqtt_persist::backends::sqlite::SCHEMA).unwrap();
                    let ids = mqtt_persist::broker::engine::MsgIdGen::new(9);
                    let payload = [b'x'; PAYLOAD];
                    let t0 = Instant::now();
                    for _ in 0..batches {
                        let tx = c.transaction().unwrap();
                        {
                            let mut st = tx.prepare_cached(SQLITE_INSERT).unwrap();
                            for _ in 0..size {
                                st.execute(rusqlite::params![
                                    ids.next() as i64,
                                    "bench",
                                    "ceil/sqlite",
                                    1,
                                    false,
                                    &payload[..],
                                    mqtt_persist::model::now_ms()
                                ])
                                .unwrap();
                            }
                        }
                        tx.commit().unwrap();
                    }
                    (batches * size) as f64 / t0.elapsed().as_secs_f64()
                })
                .await
                .unwrap()
            }
            Db::Pgsql { .. } => {
                let mut tasks = Vec::new();
                for k in 0..conc {
                    let (c, conn) = pg_url()
                        .parse::<tokio_postgres::Config>()
                        .unwrap()
                        .dbname(self.pg_name())
                        .connect(tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    tasks.push(async move {
                        let st = c.prepare(PG_INSERT).await.unwrap();
                        let ids = mqtt_persist::broker::engine::MsgIdGen::new(10 + k as u16);
                        for _ in 0..per_conn {
                            pg_insert_batch(&c, &st, &ids, "ceil/pgsql", size as usize).await;
                        }
                    });
                }
                let t0 = Instant::now();
                futures::future::join_all(tasks).await;
                (per_conn * conc * size) as f64 / t0.elapsed().as_secs_f64()
            }
            Db::Redis { .. } => {
                let mut conns = Vec::new();
                for _ in 0..conc {
                    let client = redis::Client::open(redis_info()).unwrap();
                    conns.push(client.get_multiplexed_tokio_connection().await.unwrap());
                }
                let ids = Arc::new(mqtt_persist::broker::engine::MsgIdGen::new(9));
                let topic = format!("ceil/redis/{}", mqtt_persist::model::now_ms());
                let t0 = Instant::now();
                futures::future::join_all(conns.into_iter().map(|mut c| {
                    let (ids, topic) = (ids.clone(), topic.clone());
                    async move {
                        for _ in 0..per_conn {
                            let p = redis_ceiling_pipe(&ids, &topic, size as usize);
                            let _: () = p.query_async(&mut c).await.unwrap();
                        }
                    }
                }))
                .await;
                (per_conn * conc * size) as f64 / t0.elapsed().as_secs_f64()
            }
        }
    }

    fn pg_name(&self) -> &str {
        match self {
            Db::Pgsql { name, .. } => name,
            _ => unreachable!(),
        }
    }

    async fn close(self) {
        match self {
            Db::Sqlite { .. } => {}
            Db::Pgsql { name, client, .. } => leave_nothing_behind("pgsql", Some((name, client))).await,
            Db::Redis { conn } => {
                drop(conn);
                leave_nothing_behind("redis", None).await;
            }
        }
    }
}

const SQLITE_INSERT: &str =
    "INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (msgid) DO NOTHING";

/// Mosquitto on a free port, memory only, its defaults otherwise; killed on drop.
struct Mosquitto {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Mosquitto { child, addr, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Totals read off the broker's metrics: (writes, ops written, Σ µs × ops in the database,
/// ops committed, Σ µs enqueue → commit).
fn totals(m: &mqtt_persist::metrics::Registry) -> [u64; 5] {
    let mut t = [0u64; 5];
    for p in m.pools.lock().iter().filter_map(std::sync::Weak::upgrade) {
        t[0] += p.writes.load(Ordering::Relaxed);
        t[1] += p.write_ops.load(Ordering::Relaxed);
        t[2] += p.write_op_us.load(Ordering::Relaxed);
    }
    for r in m.rules.lock().iter() {
        let (n, us) = r.latency_totals();
        t[3] += n;
        t[4] += us;
    }
    t
}

/// Where one message's PUBLISH → PUBACK went, from the metrics over a cell: the cycle is the
/// messages in flight over the rate (Little's law).
fn breakdown(before: [u64; 5], after: [u64; 5], in_flight: u64, rate: f64) -> String {
    let d: Vec<f64> = (0..5).map(|i| (after[i] - before[i]) as f64).collect();
    let cycle = in_flight as f64 / rate * 1e6;
    let storage = d[4] / d[3].max(1.0);
    let db = d[2] / d[1].max(1.0);
    format!(
        "{cycle:.0} µs | {:.0} µs | {db:.0} µs | {:.0} µs | {:.0}",
        (storage - db).max(0.0),
        (cycle - storage).max(0.0),
        d[1] / d[0].max(1.0)
    )
}

pub async fn matrix() {
    let dbs = list("BENCH_DB", "sqlite,pgsql,redis");
    let windows = nums("BENCH_WINDOWS", "10,100,1000");
    let pubs = nums("BENCH_PUBS", "1,4,100");
    let n: u64 = nums("BENCH_N", "100000")[0];
    let rounds = nums("BENCH_ROUNDS", "1")[0].max(1);
    let peers = std::env::var("BENCH_PEERS").map_or(true, |v| v != "off");
    let cells: Vec<(u64, u64)> = windows.iter().flat_map(|&w| pubs.iter().map(move |&p| (w, p))).collect();
    let run = mqtt_persist::model::now_ms() % 100_000;
    println!("\n| database | window | publishers | broker, no-loss | bare ceiling (tx size × connections) | ratio | lost / duplicated |\n|---|---|---|---|---|---|---|");
    let mut cycles = Vec::new();
    // Variants of the broker conf run side by side, cell by cell (`BENCH_VARIANTS`, `|` between
    // variants, `;` between the plugin lines of one): an A/B in one run.
    let variants = list_by("BENCH_VARIANTS", '|');
    for kind in &dbs {
        let mut db = Db::open(kind).await;
        let mut brokers = Vec::new();
        for v in &variants {
            // Lines outside `backend.` (persist.*, …) go to the broker's own conf.
            let broker_lines: Vec<&str> = v
                .split(';')
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("backend."))
                .collect();
            brokers.push((v.clone(), our_broker(Some(db.plugin(v)), &broker_lines.join("\n")).await));
        }
        for &(window, p) in &cells {
            let per = n / p;
            let conc = if db.kind() == "sqlite" { 1 } else { p.min(POOL) };
            let size = (p * window / conc).min(BATCH);
            let (mut bares, mut rates) = (Vec::new(), vec![Vec::new(); brokers.len()]);
            let mut befores: Vec<[u64; 5]> = brokers.iter().map(|(_, (_, b))| totals(&b.metrics)).collect();
            let mut verdicts = vec![String::new(); brokers.len()];
            for round in 0..rounds {
                bares.push(db.ceiling(p * per, size, conc).await);
                for (vi, (_, (_, ours))) in brokers.iter().enumerate() {
                    let tag = format!("{}{run}w{window}p{p}v{vi}r{round}", db.kind());
                    if round == 0 {
                        befores[vi] = totals(&ours.metrics);
                    }
                    let load = checked(ours.addr, p, window, per, &tag).await;
                    let (rows, distinct) = db.rows(&tag, p).await;
                    let acked = p * per - load.unacked;
                    let mut verdict = load.verdict();
                    if rows != acked || distinct != rows {
                        verdict = format!("{verdict}; **{acked} acked but {rows} rows ({distinct} distinct)**");
                    }
                    if verdicts[vi].is_empty() || verdict != "none" {
                        verdicts[vi] = verdict;
                    }
                    rates[vi].push(load.rate);
                }
            }
            let bare = median(bares);
            for (vi, (v, (_, ours))) in brokers.iter().enumerate() {
                let label = if v.is_empty() {
                    db.kind().to_string()
                } else {
                    format!("{} ({v})", db.kind())
                };
                let rate = median(rates[vi].clone());
                cycles.push(format!(
                    "| {label} | {window} | {p} | {} |",
                    breakdown(befores[vi], totals(&ours.metrics), p * window, rate)
                ));
                println!(
                    "| {label} | {window} | {p} | {rate:.0} msg/s | {bare:.0} msg/s ({size} × {conc}) | **{:.2}** | {} |",
                    rate / bare,
                    verdicts[vi]
                );
            }
        }
        drop(brokers);
        db.close().await;
    }
    println!("\nWhere a message's PUBLISH → PUBACK goes (means over each cell, from the broker's metrics):\n\n| database | window | publishers | PUBLISH → PUBACK | queued (enqueue → write starts) | in the database | the rest (network, router, hooks, ack release) | ops per write |\n|---|---|---|---|---|---|---|---|");
    for c in cycles {
        println!("{c}");
    }
    if !peers {
        return;
    }
    let mosquitto = Mosquitto::start();
    let (_d, bare_broker) = our_broker(None, "").await;
    println!("\n| window | publishers | mqtt-persist, no database | lost / duplicated | Mosquitto (memory only) | lost / duplicated |\n|---|---|---|---|---|---|");
    for &(window, p) in &cells {
        let per = n / p;
        let ours = checked(bare_broker.addr, p, window, per, &format!("nodb{run}w{window}p{p}")).await;
        let theirs = match &mosquitto {
            Some(m) => {
                let l = checked(m.addr, p, window, per, &format!("mosq{run}w{window}p{p}")).await;
                format!("{:.0} msg/s | {}", l.rate, l.verdict())
            }
            None => "not installed | –".into(),
        };
        println!("| {window} | {p} | {:.0} msg/s | {} | {theirs} |", ours.rate, ours.verdict());
    }
}
