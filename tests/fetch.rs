//! Paged fetch and retained lookup: stored messages reach a subscriber a page at a time, paced
//! by its acks, so one subscriber of `#` over thousands of stored messages costs the broker a
//! bounded amount of memory, and on Redis only what is delivered is loaded.
//!
//! "Nothing more came" is never a timed silence here: a live message published afterwards (the
//! subscription's live traffic waits for the last stored page), or a PINGRESP (the broker
//! answers packets in order), marks the end of what the broker had sent.

mod common;

use common::kits::{Kit, SqliteKit};
use common::servers::RedisServer;
use common::*;
use rumqttc::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
/// `backends::PAGE` and the connection's injection window.
const PAGE: usize = 256;
const WINDOW: usize = 256;
const N: usize = 3000;

fn sqlite_count(kit: &SqliteKit) -> usize {
    kit.conn()
        .query_row("SELECT count(*) FROM mqtt_msg", [], |r| r.get::<_, i64>(0))
        .unwrap() as usize
}

/// `n` QoS 1 publishes, payload `i`, round-robin over `topics` topics under `base`.
async fn publish_many(addr: std::net::SocketAddr, base: &str, topics: usize, n: usize) {
    let p = connect(addr, &unique("pub"), true).await;
    for i in 0..n {
        p.publish(&format!("{base}/t{}", i % topics), QoS::AtLeastOnce, false, i.to_string())
            .await;
    }
    // rumqttc sends in the background: the disconnect goes out after every publish.
    p.disconnect().await;
}

/// The payloads `from..to`, as published by [`publish_many`].
fn sequence(from: usize, to: usize) -> Vec<Vec<u8>> {
    (from..to).map(|i| i.to_string().into_bytes()).collect()
}

/// Receives `n` publishes, then a live `marker`: nothing else came in between.
async fn expect_then_marker(c: &mut Client, n: usize, marker_topic: &str, addr: std::net::SocketAddr) -> Vec<rumqttc::Publish> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        got.push(c.next(WAIT).await);
    }
    let p = connect(addr, &unique("pub"), true).await;
    p.publish(marker_topic, QoS::AtLeastOnce, false, "marker").await;
    let next = c.next(WAIT).await;
    assert_eq!(
        (next.topic.as_str(), &next.payload[..]),
        (marker_topic, &b"marker"[..]),
        "after the {n} stored messages, the live one (no duplicate or extra stored one)"
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_subscriber_gets_thousands_of_stored_messages_once_in_order() {
    let kit = SqliteKit::new().await;
    let broker = BrokerProc::start("sqlite", &kit.plugin_conf());
    let id = unique("dev");
    let first = connect(broker.addr, &id, true).await;
    first.subscribe("#", QoS::AtLeastOnce).await;
    eventually("the first subscription's pointer", WAIT, || async { kit.pointer(&id, "#").await }).await;
    first.disconnect().await;
    let base = unique("h");
    publish_many(broker.addr, &base, 3, N).await;
    eventually("all stored", WAIT, || async { (sqlite_count(&kit) == N).then_some(()) }).await;

    // rumqttc acks each publish as it arrives: the pages keep coming.
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe("#", QoS::AtLeastOnce).await;
    let got = expect_then_marker(&mut a, N, &format!("{base}/marker"), broker.addr).await;
    assert_eq!(got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(), sequence(0, N));
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce && !p.retain));
    // The acks moved the pointer to the newest of them (the marker's ack may take it further).
    let newest: i64 = kit
        .conn()
        .query_row("SELECT max(msgid) FROM mqtt_msg WHERE CAST(payload AS TEXT) != 'marker'", [], |r| {
            r.get(0)
        })
        .unwrap();
    eventually("the pointer at the newest delivered msgid", WAIT, || async {
        kit.pointer(&id, "#").await.filter(|&p| p >= newest)
    })
    .await;
}

/// A raw MQTT 3.1.1 connection that acks only when told to.
struct Raw {
    s: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

enum In {
    Publish { pkid: u16, payload: Vec<u8> },
    PingResp,
    Other,
}

impl Raw {
    async fn next(&mut self) -> In {
        loop {
            if let Some((first, hl, len)) = header(&self.buf).filter(|(_, hl, len)| self.buf.len() >= hl + len) {
                let frame = self.buf.split_to(hl + len);
                let body = &frame[hl..];
                return match first >> 4 {
                    3 => {
                        let qos = (first >> 1) & 3;
                        let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                        let mut at = 2 + tl;
                        let pkid = if qos > 0 {
                            at += 2;
                            u16::from_be_bytes([body[2 + tl], body[3 + tl]])
                        } else {
                            0
                        };
                        In::Publish {
                            pkid,
                            payload: body[at..].to_vec(),
                        }
                    }
                    13 => In::PingResp,
                    _ => In::Other,
                };
            }
            let n = tokio::time::timeout(WAIT, self.s.read_buf(&mut self.buf))
                .await
                .expect("a packet within the wait")
                .unwrap();
            assert!(n > 0, "the broker closed the connection");
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }
}

/// (first byte, header length, remaining length) of the frame at the start of `buf`.
fn header(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((buf[0], 2 + i, len));
        }
    }
    None
}

/// The broker's reads of this SQLite database are serialized on one connection: once a new
/// subscriber got a retained message `rounds` times (each a lookup opened and a page read, on
/// the same connection after any page another subscriber had asked for before), the broker
/// had read and sent whatever pages it was going to send meanwhile.
async fn sqlite_reads_went_round(addr: std::net::SocketAddr, clock: &str, rounds: usize) {
    let mut z = connect(addr, &unique("clock"), true).await;
    for i in 0..rounds {
        z.subscribe(&format!("{clock}/{i}"), QoS::AtMostOnce).await;
        assert!(z.next(WAIT).await.retain);
    }
    z.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_ack_holds_at_most_a_window_and_a_page() {
    use rumqttd::protocol::{Packet, Subscribe};
    let kit = SqliteKit::new().await;
    let broker = BrokerProc::start("sqlite", &kit.plugin_conf());
    let (base, clock) = (unique("w"), unique("clock"));
    let filter = format!("{base}/#");
    let id = unique("slow");
    let first = connect(broker.addr, &id, true).await;
    first.subscribe(&filter, QoS::AtLeastOnce).await;
    eventually("the first subscription's pointer", WAIT, || async {
        kit.pointer(&id, &filter).await
    })
    .await;
    first.disconnect().await;
    publish_many(broker.addr, &base, 2, N).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..3 {
        p.publish(&format!("{clock}/{i}"), QoS::AtMostOnce, true, "tick").await;
    }
    p.disconnect().await;
    eventually("all stored", WAIT, || async {
        let retained: i64 = kit.conn().query_row("SELECT count(*) FROM mqtt_retain", [], |r| r.get(0)).unwrap();
        (sqlite_count(&kit) == N && retained == 3).then_some(())
    })
    .await;

    let mut raw = Raw {
        s: raw_connect(broker.addr, &id, 600, None).await,
        buf: bytes::BytesMut::new(),
    };
    let sub = Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![v4_filter(&filter)],
        },
        None,
    );
    raw.send(&v4_bytes(vec![sub])).await;
    let (mut got, mut unacked): (Vec<Vec<u8>>, Vec<u16>) = (Vec::new(), Vec::new());
    while got.len() < PAGE {
        if let In::Publish { pkid, payload } = raw.next().await {
            got.push(payload);
            unacked.push(pkid);
        }
    }
    // Acking nothing: whatever the broker was going to read meanwhile is read ...
    sqlite_reads_went_round(broker.addr, &clock, 3).await;
    let mut rounds = 0;
    while got.len() < N {
        // ... and sent before it answers a PINGREQ (in order): at most a window and a page
        // beyond what it had seen acked.
        raw.send(&[0xC0, 0]).await;
        loop {
            match raw.next().await {
                In::Publish { pkid, payload } => {
                    got.push(payload);
                    unacked.push(pkid);
                }
                In::PingResp => break,
                In::Other => {}
            }
        }
        assert!(
            unacked.len() <= WINDOW + PAGE,
            "{} injected messages unacked after {rounds} rounds of acks (window {WINDOW}, page {PAGE})",
            unacked.len()
        );
        // Ack what came: more pages follow.
        let acks: Vec<u8> = unacked.drain(..).flat_map(|p| [0x40, 2, (p >> 8) as u8, p as u8]).collect();
        raw.send(&acks).await;
        while got.len() < N {
            // The next page, before the next barrier.
            if let In::Publish { pkid, payload } = raw.next().await {
                got.push(payload);
                unacked.push(pkid);
                break;
            }
        }
        rounds += 1;
    }
    assert!(rounds >= N / (WINDOW + PAGE), "paced by acks: {rounds} rounds");
    assert_eq!(got, sequence(0, N), "every stored message once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_lookup_pages_through_more_topics_than_a_page() {
    let kit = SqliteKit::new().await;
    let broker = BrokerProc::start("sqlite", &kit.plugin_conf());
    let base = unique("rp");
    let n = 2 * PAGE + 100;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..n {
        p.publish(&format!("{base}/{i}"), QoS::AtLeastOnce, true, format!("v{i}")).await;
    }
    p.disconnect().await;
    let count = || async {
        let c: i64 = kit.conn().query_row("SELECT count(*) FROM mqtt_retain", [], |r| r.get(0)).unwrap();
        (c as usize == n).then_some(())
    };
    eventually("retained rows", WAIT, count).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let mut s = connect(broker.addr, &unique("sub"), true).await;
        s.subscribe(&format!("{base}/+"), qos).await;
        let got = expect_then_marker(&mut s, n, &format!("{base}/marker"), broker.addr).await;
        let topics: std::collections::HashSet<_> = got.iter().map(|p| p.topic.clone()).collect();
        assert_eq!(topics.len(), n, "one copy of every topic at {qos:?}");
        assert!(got.iter().all(|p| p.retain && p.qos == qos));
    }
}

/// `cmdstat_hgetall:calls` of a Redis server: how many message hashes were loaded.
async fn hgetall_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hgetall:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// On a Redis server of its own (commandstats are server-wide, and the shared one serves other
/// tests at the same time), so every HGETALL counted is this broker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_fetch_loads_only_what_it_delivers() {
    if skip("redis", "test") {
        return;
    }
    let server = RedisServer::start();
    let rule = |hook: &str, n: u32, topic: &str, f: &str, extra: &str| {
        format!("backend.redis.hook.{hook}.{n} = {{\"topic\": \"{topic}\", \"action\": {{\"function\": \"{f}\"}},{extra} \"pool\": \"pool1\"}}\n")
    };
    let mut conf = format!(
        "backend.redis.pool1.type = single\nbackend.redis.pool1.server = 127.0.0.1:{}\n",
        server.port
    );
    conf.push_str(&rule(
        "session.subscribed",
        1,
        "capped/#",
        "on_message_fetch",
        " \"offline_opts\": {\"max_returned_count\": 10, \"clean_start\": \"fetch\"},",
    ));
    conf.push_str(&rule(
        "session.subscribed",
        2,
        "all/#",
        "on_message_fetch",
        " \"offline_opts\": {\"clean_start\": \"fetch\"},",
    ));
    conf.push_str(&rule(
        "session.subscribed",
        4,
        "recent/#",
        "on_message_fetch",
        " \"offline_opts\": {\"max_returned_count\": 5, \"time_range\": \"4s\", \"clean_start\": \"fetch\"},",
    ));
    conf.push_str(&rule("session.subscribed", 3, "ret/#", "on_retain_lookup", ""));
    conf.push_str(&rule("message.publish", 1, "#", "on_message_publish", ""));
    conf.push_str(&rule("message.publish", 2, "ret/#", "on_message_retain", ""));
    conf.push_str(&rule("message.acked", 1, "#", "on_message_acked", ""));
    let broker = BrokerProc::start("redis", &conf);
    let mut r = kits::redis_connect(&server.url()).await;
    let (capped, all, recent) = (unique("capped"), unique("all"), unique("recent"));
    for (id, filter) in [(&capped, "capped/#"), (&all, "all/#"), (&recent, "recent/#")] {
        let c = connect(broker.addr, id, true).await;
        c.subscribe(filter, QoS::AtLeastOnce).await;
        let key = format!("mqtt:acked:{id}:{filter}");
        eventually("the first subscription's pointer", WAIT, || {
            let mut r = r.clone();
            let key = key.clone();
            async move {
                let exists: bool = redis::cmd("EXISTS").arg(&key).query_async(&mut r).await.unwrap();
                exists.then_some(())
            }
        })
        .await;
        c.disconnect().await;
    }
    for base in ["capped", "all"] {
        publish_many(broker.addr, base, 3, N).await;
        eventually("all stored", WAIT, || {
            let mut r = r.clone();
            async move {
                let mut total = 0;
                for t in 0..3 {
                    let n: usize = redis::cmd("ZCARD")
                        .arg(format!("mqtt:msg:{base}/t{t}"))
                        .query_async(&mut r)
                        .await
                        .unwrap();
                    total += n;
                }
                (total == N).then_some(())
            }
        })
        .await;
    }

    // The newest 10 of 3000: ids are counted, and exactly 10 hashes are loaded.
    let before = hgetall_calls(&mut r).await;
    let mut a = connect(broker.addr, &capped, true).await;
    a.subscribe("capped/#", QoS::AtLeastOnce).await;
    let got = expect_then_marker(&mut a, 10, "capped/marker", broker.addr).await;
    assert_eq!(got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(), sequence(N - 10, N));
    assert_eq!(hgetall_calls(&mut r).await - before, 10, "hashes loaded for 10 delivered");

    // No cap: all 3000, merged across the three topics in msgid order, each loaded once.
    let before = hgetall_calls(&mut r).await;
    let mut b = connect(broker.addr, &all, true).await;
    b.subscribe("all/#", QoS::AtLeastOnce).await;
    let got = expect_then_marker(&mut b, N, "all/marker", broker.addr).await;
    assert_eq!(got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(), sequence(0, N));
    assert_eq!(hgetall_calls(&mut r).await - before, N as u64, "each hash loaded once");

    // Retained lookup: the topic index walked a page of topics at a time, one copy each.
    let n = PAGE + 50;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..n {
        p.publish(&format!("ret/{i}"), QoS::AtLeastOnce, true, format!("v{i}")).await;
    }
    p.disconnect().await;
    eventually("retained keys", WAIT, || {
        let mut r = r.clone();
        async move {
            let c: usize = redis::cmd("ZCARD").arg("mqtt:topics:retain").query_async(&mut r).await.unwrap();
            (c == n).then_some(())
        }
    })
    .await;
    let mut s = connect(broker.addr, &unique("sub"), true).await;
    s.subscribe("ret/+", QoS::AtLeastOnce).await;
    let got = expect_then_marker(&mut s, n, "ret/marker", broker.addr).await;
    let topics: std::collections::HashSet<_> = got.iter().map(|p| p.topic.clone()).collect();
    assert_eq!(topics.len(), n, "one copy of every retained topic");
    assert!(got.iter().all(|p| p.retain));

    // `time_range` near the ids' clock: the ids narrow, each message's own `ts` decides (read
    // alone, no hash loaded), and the cap counts only what is in the range.
    publish_many(broker.addr, "recent/old", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    publish_many(broker.addr, "recent/new", 1, 8).await;
    eventually("all stored", WAIT, || {
        let mut r = r.clone();
        async move {
            let n: usize = redis::cmd("ZCARD").arg("mqtt:msg:recent/new/t0").query_async(&mut r).await.unwrap();
            (n == 8).then_some(())
        }
    })
    .await;
    let before = hgetall_calls(&mut r).await;
    let mut c = connect(broker.addr, &recent, true).await;
    c.subscribe("recent/#", QoS::AtLeastOnce).await;
    let got = expect_then_marker(&mut c, 5, "recent/marker", broker.addr).await;
    assert_eq!(
        got.iter().map(|p| (p.topic.clone(), p.payload.to_vec())).collect::<Vec<_>>(),
        (3..8)
            .map(|i| ("recent/new/t0".to_string(), i.to_string().into_bytes()))
            .collect::<Vec<_>>(),
        "the newest 5 that arrived within 4 s, oldest first"
    );
    assert_eq!(hgetall_calls(&mut r).await - before, 5, "hashes loaded for 5 delivered");
}
