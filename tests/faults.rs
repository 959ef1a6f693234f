//! Database outages while the broker runs, against throwaway server instances.

mod common;

use common::kits::pg_connect;
use common::servers::{PgServer, RedisServer};
use common::*;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

/// `pool1` on a throwaway PostgreSQL: its `postgres` database, quick to give up connecting.
fn pg_pool(port: u16) -> String {
    format!(
        "backend.pgsql.pool1.server = 127.0.0.1:{port}\nbackend.pgsql.pool1.username = root\nbackend.pgsql.pool1.database = postgres\nbackend.pgsql.pool1.connect_timeout = 1000\n"
    )
}

fn pg_conf(port: u16) -> String {
    format!(
        "{}backend.pgsql.pool1.pool_size = 2\nbackend.pgsql.pool1.auto_create_schema = on\n\
         backend.pgsql.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n",
        pg_pool(port)
    )
}

/// A throwaway PostgreSQL with `schema` applied, and a client on it.
async fn throwaway_pg(schema: &str) -> (PgServer, tokio_postgres::Client) {
    let pg = PgServer::start();
    let db = pg_connect(&pg.url().parse().unwrap()).await;
    db.batch_execute(schema).await.unwrap();
    (pg, db)
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_kill_loses_no_acknowledged_message_and_drops_no_client() {
    if skip("pgsql", "fault test") {
        return;
    }
    let pg = PgServer::start();
    let broker = BrokerProc::start("pgsql", &pg_conf(pg.port));
    let topic = unique("fault/");
    // Publish at a steady ~100 msg/s for 16 s; PostgreSQL dies at 3 s and is back at 13 s.
    let pg = std::sync::Arc::new(pg);
    let (p1, p2) = (pg.clone(), pg.clone());
    let events: Vec<(u64, Box<dyn FnMut() + Send>)> = vec![(3, Box::new(move || p1.kill())), (13, Box::new(move || p2.resume()))];
    let (sent, acked) = steady_publisher(broker.port(), &topic, 16, events).await;
    assert_eq!(acked, sent);
    let db = pg_connect(&pg.url().parse().unwrap()).await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM mqtt_msg WHERE topic LIKE $1", &[&format!("{topic}/%")])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as u64, acked, "rows in mqtt_msg = PUBACKs received");
    let log = broker.log();
    let failures = log.matches("database write failed").count();
    assert_eq!(failures, 1, "one error per outage, not per message:\n{log}");
    assert!(log.contains("database is back"), "{log}");
}

/// PostgreSQL stops answering without closing anything (SIGSTOP: a hung server or a network
/// partition). Writes time out, the circuit opens, the spool keeps PUBACKs flowing, a client
/// subscribing mid-outage gets its live traffic at once instead of waiting out the fetch
/// timeout, and after the thaw every acknowledged message is a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_postgres_opens_the_circuit_and_nothing_waits_on_it() {
    if skip("pgsql", "fault test") {
        return;
    }
    let pg = std::sync::Arc::new(PgServer::start());
    let spool = tempfile::tempdir().unwrap();
    let conf = format!(
        "{}backend.pgsql.spool.dir = {}
\
         backend.pgsql.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"pool\": \"pool1\"}}\n",
        // Connecting to a frozen server hangs too: for the stock 5 s, not the other tests' 1 s.
        pg_conf(pg.port).replace("connect_timeout = 1000", "connect_timeout = 5000"),
        spool.path().display()
    );
    let fetch_timeout = Duration::from_secs(8);
    let broker = BrokerProc::start_with(
        "pgsql",
        &conf,
        &format!(
            "persist.write_timeout = 1000\npersist.fetch_timeout = {}\n",
            fetch_timeout.as_millis()
        ),
    );
    let topic = unique("freeze/");
    // Frozen from 2 s to 10 s; at 5 s (the first write timed out at ~3 s) a client subscribes.
    let addr = broker.addr;
    let filter = format!("{topic}/#");
    let subscriber = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut sub = connect(addr, &unique("frozen-sub"), true).await;
        let t0 = Instant::now();
        sub.subscribe(&filter, QoS::AtLeastOnce).await;
        sub.next(fetch_timeout + Duration::from_secs(2)).await;
        t0.elapsed()
    });
    let (p1, p2) = (pg.clone(), pg.clone());
    let events: Vec<(u64, Box<dyn FnMut() + Send>)> = vec![(2, Box::new(move || p1.freeze())), (10, Box::new(move || p2.thaw()))];
    let (sent, acked) = steady_publisher(broker.port(), &topic, 13, events).await;
    assert_eq!(acked, sent);
    let waited = subscriber.await.unwrap();
    assert!(
        waited < Duration::from_secs(2),
        "a subscriber during the outage waited {waited:?} for live traffic (fetch timeout {fetch_timeout:?}):\n{}",
        broker.log()
    );
    let db = pg_connect(&pg.url().parse().unwrap()).await;
    let pattern = format!("{topic}/%");
    let rows = eventually("every acknowledged message stored after the thaw", Duration::from_secs(30), || {
        let (db, pattern) = (&db, &pattern);
        async move {
            let rows: i64 = db
                .query_one("SELECT count(*) FROM mqtt_msg WHERE topic LIKE $1", &[pattern])
                .await
                .unwrap()
                .get(0);
            (rows as u64 >= acked).then_some(rows)
        }
    })
    .await;
    assert_eq!(rows as u64, acked, "rows in mqtt_msg = PUBACKs received");
    let log = broker.log();
    assert_eq!(log.matches("database write failed").count(), 1, "one error per outage:\n{log}");
    assert!(log.contains("spooled writes replayed"), "{log}");
}

fn redis_conf(port: u16) -> String {
    format!(
        "backend.redis.pool1.server = 127.0.0.1:{port}\n\
         backend.redis.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n"
    )
}

/// Publishes QoS1 at ~100 msg/s for `secs`, running `at` callbacks at given seconds; returns
/// (sent, acked) once every PUBACK arrived, failing if the client was ever disconnected.
async fn steady_publisher(port: u16, topic: &str, secs: u64, mut at: Vec<(u64, Box<dyn FnMut() + Send>)>) -> (u64, u64) {
    let mut o = MqttOptions::new(unique("steady"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_inflight(1000);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 2000);
    let (acks_tx, mut acks_rx) = tokio::sync::watch::channel(0u64);
    let driver = tokio::spawn(async move {
        let mut acks = 0u64;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks += 1;
                    let _ = acks_tx.send(acks);
                }
                Ok(_) => {}
                Err(e) => return Err::<(), String>(format!("client connection failed after {acks} acks: {e}")),
            }
        }
    });
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        at.retain_mut(|(t, f)| {
            if start.elapsed() >= Duration::from_secs(*t) {
                f();
                false
            } else {
                true
            }
        });
        client
            .publish(format!("{topic}/{}", sent % 7), QoS::AtLeastOnce, false, format!("m{sent}"))
            .await
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!driver.is_finished(), "the publisher was disconnected");
    let acked = tokio::time::timeout(Duration::from_secs(30), acks_rx.wait_for(|a| *a >= sent))
        .await
        .expect("all PUBACKs within 30 s of recovery")
        .map(|a| *a)
        .unwrap();
    assert!(!driver.is_finished(), "the publisher was disconnected");
    (sent, acked)
}

/// The messages stored for `topic`: the ids in its index whose message hash exists (the index
/// alone may name messages that are gone).
async fn redis_stored(conn: &redis::aio::MultiplexedConnection, topic: &str) -> usize {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("mqtt:msg:{topic}"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let mut n = 0;
    for id in ids {
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("mqtt:msg:{}", id.parse::<u64>().unwrap()))
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        n += usize::from(exists);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_clients_connected_and_writes_resume() {
    if skip("redis", "fault test") {
        return;
    }
    let redis = std::sync::Arc::new(std::sync::Mutex::new(RedisServer::start()));
    let port = redis.lock().unwrap().port;
    let broker = BrokerProc::start("redis", &redis_conf(port));
    let topic = unique("rfault/");
    let (r1, r2) = (redis.clone(), redis.clone());
    let events: Vec<(u64, Box<dyn FnMut() + Send>)> = vec![
        (2, Box::new(move || r1.lock().unwrap().kill())),
        (8, Box::new(move || r2.lock().unwrap().resume())),
    ];
    let (sent, acked) = steady_publisher(broker.port(), &topic, 12, events).await;
    assert_eq!(sent, acked);
    let url = redis.lock().unwrap().url();
    let conn = common::kits::redis_connect(&url).await;
    let mut stored = 0usize;
    for i in 0..7 {
        stored += redis_stored(&conn, &format!("{topic}/{i}")).await;
    }
    assert_eq!(stored as u64, acked, "every acknowledged message is in Redis");
    let log = broker.log();
    assert_eq!(log.matches("database write failed").count(), 1, "one error per outage:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_writes_survive_a_broker_kill_during_an_outage() {
    if skip("pgsql", "fault test") {
        return;
    }
    let (pg, db) = throwaway_pg(mqtt_persist::backends::pgsql::SCHEMA).await;
    let spool = tempfile::tempdir().unwrap();
    let conf = format!(
        "{}backend.pgsql.spool.dir = {}\n\
         backend.pgsql.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n",
        pg_pool(pg.port),
        spool.path().display()
    );
    let broker = BrokerProc::start("pgsql", &conf);
    let topic = unique("spool/");
    let (client, mut acks) = acking_client(broker.port());
    for i in 0..5 {
        client
            .publish(format!("{topic}/a"), QoS::AtLeastOnce, false, format!("before{i}"))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .expect("PUBACK while the database is up");
    }
    drop(db);
    pg.kill();
    // During the outage every PUBACK still arrives: the writes are on disk in the spool.
    for i in 0..20 {
        client
            .publish(format!("{topic}/b"), QoS::AtLeastOnce, false, format!("during{i}"))
            .await
            .unwrap();
    }
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(20), acks.recv())
            .await
            .expect("PUBACK from the spool during the outage");
    }
    let spooled = std::fs::read_dir(spool.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.metadata().unwrap().len())
        .sum::<u64>();
    assert!(spooled > 0, "the spool holds the writes");
    // kill -9 the broker while the database is still down, start it again, then the database.
    let broker = broker.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.resume();
    let db = pg_connect(&pg.url().parse().unwrap()).await;
    let like = format!("{topic}/%");
    let mut rows = 0i64;
    // The writer probes the database with backoff (at most ~6 s between probes).
    for _ in 0..600 {
        rows = db
            .query_one("SELECT count(*) FROM mqtt_msg WHERE topic LIKE $1", &[&like])
            .await
            .unwrap()
            .get(0);
        if rows == 25 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows, 25, "spooled writes replayed after restart:\n{}", broker.log());
    // The writer logs the replay once it committed: just after the rows are visible.
    for _ in 0..50 {
        if broker.log().contains("spooled writes replayed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(broker.log().contains("spooled writes replayed"), "{}", broker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_starts_while_redis_is_down_and_catches_up() {
    if skip("redis", "fault test") {
        return;
    }
    let mut redis = RedisServer::start();
    redis.kill();
    let broker = BrokerProc::start("redis", &redis_conf(redis.port));
    assert!(broker.log().contains("redis is unreachable; starting anyway"), "{}", broker.log());
    let topic = unique("late/");
    let (client, mut seen) = watching_client(broker.port());
    client.subscribe(format!("{topic}/#"), QoS::AtLeastOnce).await.unwrap();
    assert_eq!(next_seen(&mut seen, Duration::from_secs(10)).await, Seen::SubAck);
    client.publish(format!("{topic}/0"), QoS::AtLeastOnce, false, "held").await.unwrap();
    client.publish(format!("{topic}/1"), QoS::AtMostOnce, false, "after").await.unwrap();
    // Routing does not wait for storage: both come back to this client through the router,
    // which acks "held" before it routes "after" to anyone. No-loss: that ack is held back
    // while nothing can store the message, so "after" arrives with no PUBACK before it.
    loop {
        match next_seen(&mut seen, Duration::from_secs(10)).await {
            Seen::Publish(p) if p == b"after" => break,
            Seen::Publish(p) => assert_eq!(p, b"held"),
            other => panic!("{other:?} before the message was stored"),
        }
    }
    redis.resume();
    assert_eq!(
        next_seen(&mut seen, Duration::from_secs(20)).await,
        Seen::PubAck,
        "PUBACK once Redis is up"
    );
    let conn = common::kits::redis_connect(&redis.url()).await;
    assert_eq!(redis_stored(&conn, &format!("{topic}/0")).await, 1);
}

#[derive(Debug, PartialEq)]
enum Seen {
    SubAck,
    PubAck,
    Publish(Vec<u8>),
}

/// A client whose incoming SUBACKs, PUBACKs and publishes arrive, in wire order, on the
/// returned channel.
fn watching_client(port: u16) -> (rumqttc::AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let mut o = MqttOptions::new(unique("watch"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            let s = match ev {
                Event::Incoming(Packet::SubAck(_)) => Seen::SubAck,
                Event::Incoming(Packet::PubAck(_)) => Seen::PubAck,
                Event::Incoming(Packet::Publish(p)) => Seen::Publish(p.payload.to_vec()),
                _ => continue,
            };
            let _ = tx.send(s);
        }
    });
    (client, seen)
}

async fn next_seen(seen: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>, wait: Duration) -> Seen {
    tokio::time::timeout(wait, seen.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing within {wait:?}"))
        .expect("client connection alive")
}

/// A QoS1 publisher whose PUBACKs arrive, one `()` each, on the returned channel.
fn acking_client(port: u16) -> (rumqttc::AsyncClient, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let mut o = MqttOptions::new(unique("acks"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                let _ = tx.send(());
            }
        }
    });
    (client, acks)
}

/// A connection lost in the middle of a batch (here the batch's own custom statement ends its
/// session): the retry resumes after what is committed — the ops before, and the statements
/// before it in the same action's list — so a custom statement that ran is not run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_batch_does_not_rerun_committed_statements() {
    if skip("pgsql", "fault test") {
        return;
    }
    let (pg, db) = throwaway_pg("CREATE TABLE seen (p text); CREATE TABLE killed (n int); CREATE SEQUENCE kills").await;
    // The kill rule's second statement terminates its own connection the first time only (a
    // sequence is not rolled back by the lost session); its third runs after the retry.
    let conf = format!(
        "{}backend.pgsql.hook.message.publish.1 = {{\"topic\": \"seen/#\", \"action\": {{\"sql\": [\"insert into seen values (${{payload}})\"]}}, \"pool\": \"pool1\"}}\n\
         backend.pgsql.hook.message.publish.2 = {{\"topic\": \"kill/#\", \"action\": {{\"sql\": [\"insert into killed values (1)\", \"select pg_terminate_backend(pg_backend_pid()) where nextval('kills') = 1\", \"insert into killed values (3)\"]}}, \"pool\": \"pool1\"}}\n",
        pg_pool(pg.port)
    );
    // Both publishes wait for each other in one batch.
    let broker = BrokerProc::start_metered("pgsql", &conf, "persist.batch_linger = 300000");
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish("seen/x", QoS::AtLeastOnce, false, "once").await;
    p.publish("kill/x", QoS::AtLeastOnce, false, "k").await;
    eventually("the list finished after the lost connection", Duration::from_secs(15), || async {
        (count(&db, "SELECT count(*) FROM killed WHERE n = 3").await == 1).then_some(())
    })
    .await;
    // Both jobs are done (counted once committed): nothing of them runs again.
    for rule in ["pgsql.hook.message.publish.1", "pgsql.hook.message.publish.2"] {
        let series = format!("mqtt_persist_rule_success_total{{rule=\"{rule}\"}}");
        eventually("both jobs counted", Duration::from_secs(15), || async {
            (broker.metric(&series).await == 1).then_some(())
        })
        .await;
    }
    let log = broker.log();
    assert_eq!(
        count(&db, "SELECT count(*) FROM seen").await,
        1,
        "the op committed before the loss ran once:\n{log}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM killed WHERE n = 1").await,
        1,
        "the statement before the lost one in the same list ran once:\n{log}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM killed WHERE n = 3").await, 1, "{log}");
    assert!(log.contains("database is back"), "{log}");
}

/// SPEC 2/2.1: a payload the column cannot take (invalid UTF-8 into text) is a refused
/// statement, logged and counted as the rule's failure; the list's next statement runs and the
/// writer goes on (it used to take the conversion error for an outage and retry it forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_column_refuses_is_counted_and_the_writer_goes_on() {
    if skip("pgsql", "test") {
        return;
    }
    let (pg, db) = throwaway_pg("CREATE TABLE words (w text); CREATE TABLE seen (c text)").await;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = format!(
        "{}backend.pgsql.hook.message.publish.1 = {{\"topic\": \"txt/#\", \"action\": {{\"sql\": [\"insert into words values (${{payload}})\", \"insert into seen values (${{clientid}})\"]}}, \"pool\": \"pool1\"}}\n",
        pg_pool(pg.port)
    );
    let broker = BrokerProc::start_with("pgsql", &conf, &format!("metrics.listen = 127.0.0.1:{metrics}"));
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish("txt/a", QoS::AtLeastOnce, false, vec![0xff, 0xfe, b'x']).await;
    p.publish("txt/b", QoS::AtLeastOnce, false, "fine").await;
    eventually("the valid word stored after the refused one", Duration::from_secs(10), || async {
        (count(&db, "SELECT count(*) FROM words WHERE w = 'fine'").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM words").await,
        1,
        "the invalid payload is not stored mangled"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM seen").await,
        2,
        "the statement after the refused one still ran"
    );
    let body = metrics_text(metrics).await;
    let rule = "{rule=\"pgsql.hook.message.publish.1\"}";
    assert!(body.contains(&format!("mqtt_persist_rule_failed_total{rule} 1")), "{body}");
    assert!(body.contains(&format!("mqtt_persist_rule_success_total{rule} 1")), "{body}");
    assert!(
        !broker.log().contains("database write failed"),
        "no outage was declared:\n{}",
        broker.log()
    );
}

/// Tables made for EMQX 4 or by hand use other column types. Values that convert are read
/// (`qos integer`); others are an error naming table, column, expected and found type, never a
/// panic, and the subscriber still gets its live traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_column_types_in_replies_are_errors_not_panics() {
    use common::kits::{Kit, PgKit};
    if skip("pgsql", "test") {
        return;
    }
    let kit = PgKit::new().await;
    kit.client()
        .batch_execute(
            "ALTER TABLE mqtt_msg ALTER COLUMN qos TYPE integer;
             ALTER TABLE mqtt_retain ALTER COLUMN msgid TYPE numeric",
        )
        .await
        .unwrap();
    let broker = BrokerProc::start("pgsql", &kit.plugin_conf());
    let base = unique("ct");
    let (filter, topic) = (format!("{base}/#"), format!("{base}/x"));
    let id = unique("dev");
    let c = connect(broker.addr, &id, false).await;
    c.subscribe(&filter, QoS::AtLeastOnce).await;
    eventually("the read pointer", Duration::from_secs(10), || async {
        kit.pointer(&id, &filter).await
    })
    .await;
    c.disconnect().await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, true, "kept").await;
    eventually("stored", Duration::from_secs(10), || async {
        (kit.stored_count(&topic).await == 1 && kit.retained(&topic).await.is_some()).then_some(())
    })
    .await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    // The offline message (qos integer) arrives; the retained lookup fails with a clear error.
    let got = a.next(Duration::from_secs(10)).await;
    assert_eq!((&got.payload[..], got.retain), (&b"kept"[..], false));
    eventually("the column error in the log", Duration::from_secs(10), || async {
        broker
            .log()
            .contains("mqtt_retain.msgid: expected an integer (int2, int4 or int8), found numeric")
            .then_some(())
    })
    .await;
    assert!(!broker.log().contains("panicked"), "{}", broker.log());
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "live").await;
    assert_eq!(&a.next(Duration::from_secs(10)).await.payload[..], b"live");
}
