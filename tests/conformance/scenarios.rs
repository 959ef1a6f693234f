//! End-to-end scenarios, written once and run against every backend: real MQTT clients over
//! TCP → a real broker process → a real database → back to clients.

use crate::common::kits::Kit;
use crate::common::*;
use rumqttc::QoS;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn state_of<K: Kit>(kit: &K, id: &str, want: i64) {
    eventually(&format!("mqtt_client.state = {want} for {id}"), WAIT, || async {
        (kit.client_state(id).await == Some(want)).then_some(())
    })
    .await;
}

/// A QoS 1 subscription that goes away once its read pointer is stored: the database creates
/// it at the newest stored message, so what is published afterwards is "offline" for this
/// client.
async fn first_subscription<K: Kit>(kit: &K, addr: std::net::SocketAddr, id: &str, filter: &str, clean: bool) {
    let c = connect(addr, id, clean).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    eventually(&format!("the read pointer of {id} on {filter}"), WAIT, || async {
        kit.pointer(id, filter).await
    })
    .await;
    c.disconnect().await;
}

/// Positive evidence that a subscription's reads found nothing stored: the broker delivers
/// what they find before any live traffic of the subscription, so when a live marker,
/// published on the subscribed `topic` once the SUBACK is in (`subscribe_acked`), is the first
/// message to arrive, nothing stored came (and nothing could come later).
async fn only_the_marker_arrives(sub: &mut Client, publisher: &Client, topic: &str) {
    publisher.publish(topic, QoS::AtMostOnce, false, "marker").await;
    let first = sub.next(WAIT).await;
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        (topic, &b"marker"[..]),
        "a message arrived before the live marker"
    );
}

/// `mqtt_persist_rule_<what>_total` of rule `<db>.hook.<hook_n>` (`success`, `failed`,
/// `matched`): `success` counts writes committed (and reads answered).
async fn rule_total<K: Kit>(broker: &BrokerProc, what: &str, hook_n: &str) -> u64 {
    let db = K::DB;
    broker
        .metric(&format!("mqtt_persist_rule_{what}_total{{rule=\"{db}.hook.{hook_n}\"}}"))
        .await
}

async fn rule_reaches<K: Kit>(broker: &BrokerProc, what: &str, hook_n: &str, n: u64) {
    eventually(&format!("{what} of rule {hook_n} at {n}"), WAIT, || async {
        (rule_total::<K>(broker, what, hook_n).await >= n).then_some(())
    })
    .await;
    assert_eq!(rule_total::<K>(broker, what, hook_n).await, n, "{what} of rule {hook_n}");
}

pub async fn retained_message_survives_a_broker_restart<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let topic = format!("{}/temp", unique("r"));
    let port = broker.port().to_string();
    // Named clients: a broker-assigned id would be a key no kit knows to clean up.
    let (pub_id, sub_id) = (unique("mpub"), unique("msub"));
    let st = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            &pub_id,
            "-t",
            &topic,
            "-m",
            "21.5",
            "-r",
            "-q",
            "1",
        ])
        .status()
        .expect("mosquitto_pub installed");
    assert!(st.success());
    eventually("retained row", WAIT, || async { kit.retained(&topic).await }).await;
    let broker = broker.restart();
    let port = broker.port().to_string();
    let out = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", &sub_id, "-t", &topic, "-v", "-W", "2"])
        .output()
        .expect("mosquitto_sub installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec![format!("{topic} 21.5")],
        "exactly one retained copy after restart"
    );
}

pub async fn retained_lookup_matches_wildcards_with_one_copy_per_topic<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("rw");
    let p = connect(broker.addr, &unique("pub"), true).await;
    for (i, t) in ["a/1", "a/2", "b/1"].iter().enumerate() {
        p.publish(&format!("{base}/{t}"), QoS::AtLeastOnce, true, format!("v{i}")).await;
    }
    for t in ["a/1", "a/2", "b/1"] {
        let topic = format!("{base}/{t}");
        eventually("retained rows", WAIT, || async { kit.retained(&topic).await }).await;
    }
    let mut s = connect(broker.addr, &unique("sub"), true).await;
    s.subscribe(&format!("{base}/a/+"), QoS::AtLeastOnce).await;
    let got = s.expect(2, WAIT).await;
    let mut topics: Vec<_> = got.iter().map(|p| p.topic.clone()).collect();
    topics.sort();
    assert_eq!(topics, vec![format!("{base}/a/1"), format!("{base}/a/2")]);
    assert!(got.iter().all(|p| p.retain), "retained flag set");
    // An empty retained publish deletes the stored message.
    p.publish(&format!("{base}/a/1"), QoS::AtLeastOnce, true, Vec::new()).await;
    let gone = format!("{base}/a/1");
    eventually("retained row deleted", WAIT, || async {
        kit.retained(&gone).await.is_none().then_some(())
    })
    .await;
}

pub async fn offline_messages_reach_only_the_resubscribing_client<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("o");
    let filter = format!("{base}/#");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, false).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..3 {
        p.publish(&format!("{base}/x"), QoS::AtLeastOnce, false, format!("m{i}")).await;
    }
    let topic = format!("{base}/x");
    eventually("3 stored messages", WAIT, || async {
        (kit.stored_count(&topic).await == 3).then_some(())
    })
    .await;
    p.disconnect().await;
    // The broker restarts: only the database remembers.
    let newest = *kit.msgids(&topic).await.last().unwrap();
    let broker = broker.restart();
    let mut other = connect(broker.addr, &unique("other"), true).await;
    other.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(3, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        vec![b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()]
    );
    // Acked: the pointer is at the newest message (checked before the marker below, which
    // reaches this client too and, delivered at its subscription's QoS 1, is acked as well).
    eventually("the acks stored", WAIT, || async {
        (kit.pointer(&id, &filter).await == Some(newest)).then_some(())
    })
    .await;
    // The other client's first subscription found nothing: the marker comes first.
    let p = connect(broker.addr, &unique("pub"), true).await;
    let marker = format!("{base}/marker");
    only_the_marker_arrives(&mut other, &p, &marker).await;
    // A reconnect after another restart gets nothing again.
    a.disconnect().await;
    let broker = broker.restart();
    let p = connect(broker.addr, &unique("pub"), true).await;
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut a, &p, &marker).await;
}

/// The default: read pointers are session state. A client id that connects with clean start
/// loses the pointers of its earlier persistent session, fetches nothing and keeps no pointers
/// of its own; a persistent session after it starts from its first subscription again.
pub async fn clean_sessions_have_no_read_pointers<K: Kit>() {
    let kit = K::new().await;
    let conf = kit.plugin_conf().replace(r#", "offline_opts": {"clean_start": "fetch"}"#, "");
    assert!(!conf.contains("clean_start"), "the default conf");
    let broker = BrokerProc::start(K::DB, &conf);
    let base = unique("cs");
    let filter = format!("{base}/#");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, false).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&format!("{base}/x"), QoS::AtLeastOnce, false, "stored").await;
    let topic = format!("{base}/x");
    eventually("1 stored message", WAIT, || async {
        (kit.stored_count(&topic).await == 1).then_some(())
    })
    .await;
    // Clean start: the earlier session's pointer goes at connect.
    let mut c = connect(broker.addr, &id, true).await;
    eventually("the pointer deleted", WAIT, || async {
        kit.pointer(&id, &filter).await.is_none().then_some(())
    })
    .await;
    c.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    let marker = format!("{base}/marker");
    only_the_marker_arrives(&mut c, &p, &marker).await;
    assert_eq!(kit.pointer(&id, &filter).await, None, "a clean session keeps no pointer");
    c.disconnect().await;
    // A persistent session now (after a restart, so the router has none): a first subscription.
    let broker = broker.restart();
    let p = connect(broker.addr, &unique("pub"), true).await;
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut a, &p, &marker).await;
    eventually("the new session's pointer", WAIT, || async { kit.pointer(&id, &filter).await }).await;
}

pub async fn persistent_session_gets_queued_messages_exactly_once<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("ps");
    let filter = format!("{base}/+");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, false).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..4 {
        p.publish(&format!("{base}/t"), QoS::AtLeastOnce, false, format!("q{i}")).await;
    }
    let topic = format!("{base}/t");
    eventually("4 stored", WAIT, || async { (kit.stored_count(&topic).await == 4).then_some(()) }).await;
    // Same broker: its session queue and the database both hold the messages.
    let mut a = connect(broker.addr, &id, false).await;
    assert!(a.session_present);
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(4, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        (0..4).map(|i| format!("q{i}").into_bytes()).collect::<Vec<_>>()
    );
}

/// Takeover: the old connection's disconnect, written after the new connection's connect,
/// must not mark the client offline (the `online_at = connected_at` guard). The old
/// connection's close is held until then: its socket takes a message larger than the kernel
/// can buffer, and the test does not read it, so the broker's session of the old connection is
/// stuck writing and notices the takeover only when the test drains the socket.
pub async fn client_state_follows_connects_and_takeovers<K: Kit>() {
    use tokio::io::AsyncReadExt;
    let kit = K::new().await;
    let big = 2 * kernel_send_buffer_max() + (1 << 20);
    let broker = BrokerProc::start_metered(K::DB, &kit.plugin_conf(), &format!("mqtt.max_packet_size = {}", big + 1024));
    let id = unique("st");
    let c = connect(broker.addr, &id, true).await;
    state_of(&kit, &id, 1).await;
    c.disconnect().await;
    state_of(&kit, &id, 0).await;
    let topic = format!("{}/big", unique("st"));
    let mut o = rumqttc::MqttOptions::new(unique("pub"), "127.0.0.1", broker.port());
    o.set_max_packet_size(2 * big, 2 * big);
    let p = connect_with(o).await;
    let mut old = raw_connect_small_window(broker.addr, &id).await;
    subscribe_raw(&mut old, &topic).await;
    // Connects written so far: the first connection's, the publisher's, the old one's.
    rule_reaches::<K>(&broker, "success", "client.connected.1", 3).await;
    p.publish(&topic, QoS::AtMostOnce, false, vec![b'x'; big]).await;
    // Its first bytes arrive: the broker is inside the write of a message the socket cannot
    // take whole, and stays there until the test reads.
    tokio::time::timeout(WAIT, old.peek(&mut [0u8; 1]))
        .await
        .expect("the big message reaches the old connection")
        .unwrap();
    let second = connect(broker.addr, &id, true).await;
    rule_reaches::<K>(&broker, "success", "client.connected.1", 4).await;
    assert_eq!(
        rule_total::<K>(&broker, "matched", "client.disconnected.1").await,
        1,
        "the old connection's disconnect came before the new connect was written: the test proves nothing"
    );
    // Drain: the old session finishes its write, sees the router dropped its link, closes.
    let mut sink = vec![0u8; 1 << 20];
    let read = tokio::time::timeout(WAIT, async {
        let mut n = 0usize;
        loop {
            match old.read(&mut sink).await {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k,
            }
        }
    })
    .await
    .expect("the broker closes the taken-over connection");
    assert!(read >= big, "the old connection got {read} of {big} bytes");
    rule_reaches::<K>(&broker, "success", "client.disconnected.1", 2).await;
    assert_eq!(
        kit.client_state(&id).await,
        Some(1),
        "the late disconnect of the taken-over connection left the client offline"
    );
    second.disconnect().await;
    state_of(&kit, &id, 0).await;
}

/// The most a socket's send buffer grows to (`tcp_wmem`'s maximum).
fn kernel_send_buffer_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20)
}

/// A raw SUBSCRIBE (QoS 1) and its SUBACK.
async fn subscribe_raw(s: &mut tokio::net::TcpStream, filter: &str) {
    use rumqttd::protocol::{Packet, Subscribe};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&v4_bytes(vec![Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![v4_filter(filter)],
        },
        None,
    )]))
    .await
    .unwrap();
    let mut ack = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await.unwrap().unwrap();
    assert_eq!(ack, [0x90, 3, 0, 1, 1], "SUBACK granting QoS 1");
}

pub async fn custom_statements_store_hostile_input_verbatim<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let id = format!("{} '\"; drop table t; --", unique("evil"));
    let p = connect(broker.addr, &id, true).await;
    let base = unique("custom/");
    let payloads: Vec<Vec<u8>> = vec![
        b"'); drop table t; --".to_vec(),
        b"$1 \\ ? ${clientid} %s".to_vec(),
        b"line1\r\n*3\r\n$3\r\nDEL\r\n".to_vec(),
        vec![0xff, 0xfe, 0x01, 0x80, 0x7f],
        vec![b'x'; 256 * 1024],
    ];
    for pl in &payloads {
        p.publish(&format!("{base}/x"), QoS::AtLeastOnce, false, pl.clone()).await;
    }
    // A topic near MQTT's 64 KiB limit is stored verbatim too.
    let long_topic = format!("{base}/{}", "t/".repeat(30_000));
    p.publish(&long_topic, QoS::AtLeastOnce, false, b"long".to_vec()).await;
    eventually("the long-topic message stored", WAIT, || async {
        (kit.stored_count(&long_topic).await == 1).then_some(())
    })
    .await;
    let rows = eventually("custom rows", WAIT, || async {
        let r = kit.custom_rows(&id).await;
        (r.len() == payloads.len() + 1).then_some(r)
    })
    .await;
    let mut rows = rows;
    let mut want = payloads.clone();
    want.push(b"long".to_vec());
    rows.sort();
    want.sort();
    assert_eq!(rows, want);
}

pub async fn binary_payloads_round_trip_through_offline_fetch<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("bin");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &format!("{base}/#"), false).await;
    let payload: Vec<u8> = (0..=255u8).chain([0xc3, 0x28, 0xa0, 0xa1]).collect();
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&format!("{base}/b"), QoS::AtLeastOnce, false, payload.clone()).await;
    let t = format!("{base}/b");
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 1).then_some(()) }).await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&format!("{base}/#"), QoS::AtLeastOnce).await;
    let got = a.expect(1, WAIT).await;
    assert_eq!(got[0].payload.to_vec(), payload);
}

pub async fn wildcard_fetch_delivers_only_matching_topics<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("wc");
    let id = unique("dev");
    let filter = format!("{base}/+/temp");
    first_subscription(&kit, broker.addr, &id, &filter, false).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for t in ["k1/temp", "k2/temp", "k1/hum", "k1/temp/x"] {
        p.publish(&format!("{base}/{t}"), QoS::AtLeastOnce, false, t.as_bytes().to_vec())
            .await;
    }
    // One writer, in publish order: the last one stored means all are.
    let t = format!("{base}/k1/temp/x");
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 1).then_some(()) }).await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(2, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.topic.clone()).collect::<Vec<_>>(),
        vec![format!("{base}/k1/temp"), format!("{base}/k2/temp")]
    );
}

pub async fn qos0_is_not_stored_by_on_message_publish<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("q0");
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&format!("{base}/a"), QoS::AtMostOnce, false, "zero").await;
    p.publish(&format!("{base}/b"), QoS::AtLeastOnce, false, "one").await;
    let b = format!("{base}/b");
    eventually("qos1 stored", WAIT, || async { (kit.stored_count(&b).await == 1).then_some(()) }).await;
    assert_eq!(kit.stored_count(&format!("{base}/a")).await, 0);
}

pub async fn subscribe_lookup_subscribes_the_client_from_storage<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("sl");
    let id = unique("dev");
    kit.add_subscription(&id, &format!("{base}/cmd"), 1).await;
    let mut c = connect(broker.addr, &id, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&format!("{base}/cmd"), QoS::AtLeastOnce, false, "reboot").await;
    let got = c.expect(1, WAIT).await;
    assert_eq!(&got[0].payload[..], b"reboot");
}

pub async fn queue_messages_are_deleted_by_the_first_ack<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("queue/");
    let topic = format!("{base}/jobs");
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..2 {
        p.publish(&topic, QoS::AtLeastOnce, false, format!("job{i}")).await;
    }
    eventually("2 queued", WAIT, || async { (kit.stored_count(&topic).await == 2).then_some(()) }).await;
    let mut w = connect(broker.addr, &unique("worker"), true).await;
    w.subscribe(&format!("{base}/#"), QoS::AtLeastOnce).await;
    let got = w.expect(2, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        vec![b"job0".to_vec(), b"job1".to_vec()]
    );
    eventually("queue drained by acks", WAIT, || async {
        (kit.stored_count(&topic).await == 0).then_some(())
    })
    .await;
    let mut w2 = connect(broker.addr, &unique("worker"), true).await;
    w2.subscribe_acked(&format!("{base}/#"), QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut w2, &p, &format!("{base}/marker")).await;
}

pub async fn keep_latest_delivers_only_the_newest_message_per_topic<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start_metered(K::DB, &kit.plugin_conf(), "");
    let base = unique("latest/");
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..3 {
        p.publish(&format!("{base}/a"), QoS::AtLeastOnce, false, format!("a{i}")).await;
    }
    p.publish(&format!("{base}/b"), QoS::AtLeastOnce, false, "b0").await;
    // message.publish.4 is on_message_store_keep_latest: all four stores committed.
    rule_reaches::<K>(&broker, "success", "message.publish.4", 4).await;
    let mut s = connect(broker.addr, &unique("s"), true).await;
    s.subscribe(&format!("{base}/+"), QoS::AtLeastOnce).await;
    let mut got: Vec<Vec<u8>> = s.expect(2, WAIT).await.iter().map(|m| m.payload.to_vec()).collect();
    got.sort();
    assert_eq!(got, vec![b"a2".to_vec(), b"b0".to_vec()]);
    // The first ack deletes the latest message (message.acked.3, on_message_acked_for_keep_latest,
    // committed for both): the next subscriber gets none.
    rule_reaches::<K>(&broker, "success", "message.acked.3", 2).await;
    let mut s2 = connect(broker.addr, &unique("s"), true).await;
    s2.subscribe_acked(&format!("{base}/+"), QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut s2, &p, &format!("{base}/marker")).await;
}

/// SPEC §3.1.3: the newest `max_returned_count` messages, oldest first, at min(stored QoS,
/// subscription QoS); a QoS 0 subscription fetches nothing.
pub async fn offline_fetch_returns_the_newest_n_at_the_lower_qos<K: Kit>() {
    let kit = K::new().await;
    let db = K::DB;
    // The default fetch rule, capped at 2 messages (a later duplicate key wins).
    let conf = format!(
        "{}backend.{db}.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"offline_opts\": {{\"max_returned_count\": 2, \"clean_start\": \"fetch\"}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let broker = BrokerProc::start(K::DB, &conf);
    let base = unique("n");
    let filter = format!("{base}/#");
    let (a_id, c_id) = (unique("dev"), unique("dev0"));
    // First subscriptions: pointers start at the newest stored message.
    for id in [&a_id, &c_id] {
        first_subscription(&kit, broker.addr, id, &filter, true).await;
    }
    let p = connect(broker.addr, &unique("pub"), true).await;
    let topic = format!("{base}/x");
    for i in 0..3 {
        p.publish(&topic, QoS::AtLeastOnce, false, format!("m{i}")).await;
    }
    p.publish(&topic, QoS::ExactlyOnce, false, "m3").await;
    eventually("4 stored messages", WAIT, || async {
        (kit.stored_count(&topic).await == 4).then_some(())
    })
    .await;
    p.disconnect().await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &a_id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(2, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        vec![b"m2".to_vec(), b"m3".to_vec()],
        "the newest 2, oldest first"
    );
    assert_eq!(got[1].qos, QoS::AtLeastOnce, "stored at QoS 2, subscribed at QoS 1");
    let mut c = connect(broker.addr, &c_id, true).await;
    c.subscribe_acked(&filter, QoS::AtMostOnce).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    only_the_marker_arrives(&mut c, &p, &format!("{base}/marker")).await;
}

/// SPEC §3.1.5: unsubscribing deletes the read pointer, so the next subscription is a first
/// one again and gets nothing of what was stored meanwhile.
pub async fn unsubscribe_deletes_the_pointer<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("u");
    let filter = format!("{base}/#");
    let topic = format!("{base}/x");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, true).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "kept").await;
    eventually("stored", WAIT, || async { (kit.stored_count(&topic).await == 1).then_some(()) }).await;
    // With a pointer: the stored message arrives; then unsubscribe.
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    assert_eq!(a.expect(1, WAIT).await[0].payload.to_vec(), b"kept".to_vec());
    assert!(kit.pointer(&id, &filter).await.is_some(), "a pointer to delete");
    a.client.unsubscribe(&filter).await.unwrap();
    eventually("the pointer deleted", WAIT, || async {
        kit.pointer(&id, &filter).await.is_none().then_some(())
    })
    .await;
    a.disconnect().await;
    for m in ["m1", "m2"] {
        p.publish(&topic, QoS::AtLeastOnce, false, m).await;
    }
    eventually("3 stored", WAIT, || async { (kit.stored_count(&topic).await == 3).then_some(()) }).await;
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut a, &p, &format!("{base}/marker")).await;
}

/// SPEC §3.1.3: a filter starting with a wildcard does not fetch `$`-topics (MQTT 4.7.2).
pub async fn leading_wildcards_do_not_fetch_dollar_topics<K: Kit>() {
    let kit = K::new().await;
    let db = K::DB;
    // `#` does not match `$`-topics either, so storing them takes a rule of their own.
    let conf = format!(
        "{}backend.{db}.hook.message.publish.9 = {{\"topic\": \"$sys/#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let broker = BrokerProc::start(K::DB, &conf);
    let u = unique("d");
    let filter = format!("+/{u}");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, true).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    let (hidden, shown) = (format!("$sys/{u}"), format!("n/{u}"));
    p.publish(&hidden, QoS::AtLeastOnce, false, "hidden").await;
    p.publish(&shown, QoS::AtLeastOnce, false, "shown").await;
    eventually("both stored", WAIT, || async {
        (kit.stored_count(&hidden).await == 1 && kit.stored_count(&shown).await == 1).then_some(())
    })
    .await;
    p.disconnect().await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(1, WAIT).await;
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.to_vec()),
        (shown.as_str(), b"shown".to_vec())
    );
}

/// SPEC §3.2: the retained lookup runs for any subscription QoS and is not capped by the
/// broker's in-flight window: 150 topics, each delivered once, at QoS 0 and at QoS 1.
pub async fn retained_lookup_returns_every_topic_at_any_qos<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("rm");
    let p = connect(broker.addr, &unique("pub"), true).await;
    let n = 150;
    for i in 0..n {
        p.publish(&format!("{base}/{i}"), QoS::AtLeastOnce, true, format!("v{i}")).await;
    }
    // One writer, in publish order: the last row stored means all are.
    for i in [0, n / 2, n - 1] {
        let topic = format!("{base}/{i}");
        eventually("retained rows", WAIT, || async { kit.retained(&topic).await }).await;
    }
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let mut s = connect(broker.addr, &unique("sub"), true).await;
        s.subscribe(&format!("{base}/+"), qos).await;
        let got = s.expect(n, WAIT).await;
        let topics: std::collections::HashSet<_> = got.iter().map(|p| p.topic.clone()).collect();
        assert_eq!(topics.len(), n, "one copy of every topic at {qos:?}");
        assert!(got.iter().all(|p| p.retain), "retained flag set");
    }
}

/// SPEC §3.1.2: with `first_subscribe = "time_range"` a first subscription gets what
/// `time_range` allows (oldest first) instead of nothing.
pub async fn first_subscribe_time_range_delivers_recent_messages<K: Kit>() {
    let kit = K::new().await;
    let db = K::DB;
    let conf = format!(
        "{}backend.{db}.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"offline_opts\": {{\"first_subscribe\": \"time_range\", \"time_range\": \"1h\", \"clean_start\": \"fetch\"}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let broker = BrokerProc::start(K::DB, &conf);
    let base = unique("f");
    let topic = format!("{base}/x");
    let p = connect(broker.addr, &unique("pub"), true).await;
    for m in ["early", "late"] {
        p.publish(&topic, QoS::AtLeastOnce, false, m).await;
    }
    eventually("2 stored", WAIT, || async { (kit.stored_count(&topic).await == 2).then_some(()) }).await;
    let mut s = connect(broker.addr, &unique("new"), true).await;
    s.subscribe(&format!("{base}/#"), QoS::AtLeastOnce).await;
    let got = s.expect(2, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        vec![b"early".to_vec(), b"late".to_vec()]
    );
}

/// SPEC §3 `on_message_acked`: acks arriving out of order never move the pointer back.
pub async fn out_of_order_acks_never_move_the_pointer_back<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start_metered(K::DB, &kit.plugin_conf(), "");
    let base = unique("ack");
    let filter = format!("{base}/#");
    let topic = format!("{base}/x");
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, true).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for m in ["m0", "m1", "m2"] {
        p.publish(&topic, QoS::AtLeastOnce, false, m).await;
    }
    eventually("3 stored", WAIT, || async { (kit.stored_count(&topic).await == 3).then_some(()) }).await;
    let newest = *kit.msgids(&topic).await.last().unwrap();
    let broker = broker.restart();
    let mut o = rumqttc::MqttOptions::new(id.clone(), "127.0.0.1", broker.port());
    o.set_manual_acks(true);
    let mut a = connect_with(o).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(3, WAIT).await;
    // The newest first, then the older ones; all three pointer writes commit.
    for i in [2, 0, 1] {
        a.client.ack(&got[i]).await.unwrap();
    }
    rule_reaches::<K>(&broker, "success", "message.acked.1", 3).await;
    assert_eq!(kit.pointer(&id, &filter).await, Some(newest), "an older ack moved the pointer back");
    a.disconnect().await;
    let broker = broker.restart();
    let p = connect(broker.addr, &unique("pub"), true).await;
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut a, &p, &format!("{base}/marker")).await;
}

/// SPEC §3.3: `backend.<db>.message_ttl` removes older stored messages, off the hot path,
/// and only those: a message stored half a TTL later outlives the cleanup that removes the
/// old one.
pub async fn stored_messages_older_than_message_ttl_are_deleted<K: Kit>() {
    let kit = K::alone().await;
    let db = K::DB;
    // The cleanup runs every TTL / 4: the old message goes 6 to 7.5 s after it came, the
    // fresh one (3 s younger) not before 9 s.
    let ttl = Duration::from_secs(6);
    let conf = format!("{}backend.{db}.message_ttl = {}s\n", kit.plugin_conf(), ttl.as_secs());
    let broker = BrokerProc::start(K::DB, &conf);
    let p = connect(broker.addr, &unique("pub"), true).await;
    let t = format!("{}/ttl", unique("ttl"));
    p.publish(&t, QoS::AtLeastOnce, false, "old").await;
    let old = eventually("stored", WAIT, || async {
        let ids = kit.msgids(&t).await;
        (ids.len() == 1).then(|| ids[0])
    })
    .await;
    let aged = std::time::Instant::now();
    tokio::time::sleep(ttl / 2).await;
    p.publish(&t, QoS::AtLeastOnce, false, "fresh").await;
    let ids = eventually("the fresh message stored", WAIT, || async {
        let ids = kit.msgids(&t).await;
        (ids.len() >= 2 || !ids.contains(&old)).then_some(ids)
    })
    .await;
    assert!(
        ids.len() == 2 && ids[0] == old,
        "the old message was still to be deleted when the fresh one was stored: {ids:?}"
    );
    let fresh = ids[1];
    eventually("the old message deleted after the TTL", WAIT, || async {
        (!kit.msgids(&t).await.contains(&old)).then_some(())
    })
    .await;
    assert_eq!(
        kit.msgids(&t).await,
        vec![fresh],
        "the cleanup that deleted the old message deleted the fresh one too ({:?} after the old one)",
        aged.elapsed()
    );
}

/// SPEC §2 [beyond]: `${username}`, `${peerhost}` and `${node}` bind in custom actions; and
/// §1.4: rules of one hook run in `N` order, whatever their order in the file.
pub async fn rules_run_in_n_order_and_bind_username_peerhost_node<K: Kit>() {
    let kit = K::new().await;
    let db = K::DB;
    let mut conf = kit.plugin_conf();
    for (n, var) in [(12, "node"), (10, "username"), (11, "peerhost")] {
        let action = kit.custom_text_action().replace("${payload}", &format!("${{{var}}}"));
        conf.push_str(&format!(
            "backend.{db}.hook.client.connected.{n} = {{\"action\": {action}, \"pool\": \"pool1\"}}\n"
        ));
    }
    let broker = BrokerProc::start(K::DB, &conf);
    let id = unique("vars");
    let mut o = rumqttc::MqttOptions::new(id.clone(), "127.0.0.1", broker.port());
    o.set_credentials("alice", "pw");
    let _c = connect_with(o).await;
    let rows = eventually("three custom rows", WAIT, || async {
        let rows = kit.custom_rows(&id).await;
        (rows.len() == 3).then_some(rows)
    })
    .await;
    let got: Vec<String> = rows.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
    // N = 10, 11, 12; the test brokers run as node `test@127.0.0.1` (tests/common).
    assert_eq!(got, vec!["alice", "127.0.0.1", "test@127.0.0.1"]);
}

/// SPEC §5: writes keep per-client order. Publishes, an UNSUBSCRIBE between them and a
/// SUBSCRIBE, all in one TCP write (the broker reads them at once), then DISCONNECT: the
/// custom rows of every hook come out in the order the client sent them.
pub async fn one_clients_writes_keep_its_event_order<K: Kit>() {
    use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, Subscribe, Unsubscribe};
    use tokio::io::AsyncWriteExt;
    let kit = K::new().await;
    let db = K::DB;
    let mut conf = kit.plugin_conf();
    for (hook, var) in [
        ("message.publish", "payload"),
        ("session.subscribed", "topic"),
        ("session.unsubscribed", "topic"),
        ("client.disconnected", "reason"),
    ] {
        let action = match var {
            "payload" => kit.custom_action(),
            _ => kit.custom_text_action().replace("${payload}", &format!("${{{var}}}")),
        };
        conf.push_str(&format!(
            "backend.{db}.hook.{hook}.20 = {{\"action\": {action}, \"pool\": \"pool1\"}}\n"
        ));
    }
    let broker = BrokerProc::start(K::DB, &conf);
    let id = unique("order");
    let mut s = raw_connect(broker.addr, &id, 30, None).await;
    let publish = |payload: &str, qos: u8, pkid: u16| {
        Packet::Publish(
            mqtt_persist::broker::wire::build_publish(format!("{id}/t").as_bytes(), payload.as_bytes(), qos, false, pkid),
            None,
        )
    };
    let bytes = v4_bytes(vec![
        publish("p1", 1, 1),
        Packet::Subscribe(
            Subscribe {
                pkid: 2,
                filters: vec![v4_filter("o/a")],
            },
            None,
        ),
        publish("p2", 0, 0),
        Packet::Unsubscribe(
            Unsubscribe {
                pkid: 3,
                filters: vec!["o/a".into()],
            },
            None,
        ),
        publish("p3", 1, 4),
        publish("p4", 1, 5),
        Packet::Subscribe(
            Subscribe {
                pkid: 6,
                filters: vec![v4_filter("o/b")],
            },
            None,
        ),
        Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ),
    ]);
    s.write_all(&bytes).await.unwrap();
    let want = ["p1", "o/a", "p2", "o/a", "p3", "p4", "o/b", "normal"];
    let rows = eventually("eight custom rows", WAIT, || async {
        let rows = kit.custom_rows(&id).await;
        (rows.len() >= want.len()).then_some(rows)
    })
    .await;
    let got: Vec<String> = rows.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
    assert_eq!(got, want, "rows in the order the client's packets came");
}

/// SUBSCRIBE and UNSUBSCRIBE in one TCP write: the unsubscribe's pointer delete must come after
/// the pointer the subscribe's fetch creates, or a later subscription would get what was
/// published while the client was not subscribed.
pub async fn an_unsubscribe_right_after_the_subscribe_leaves_no_pointer<K: Kit>() {
    use rumqttd::protocol::{Packet, Subscribe, Unsubscribe};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kit = K::new().await;
    let broker = BrokerProc::start_metered(K::DB, &kit.plugin_conf(), "");
    let base = unique("su");
    let filter = format!("{base}/#");
    let topic = format!("{base}/x");
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "before").await;
    eventually("stored", WAIT, || async { (kit.stored_count(&topic).await == 1).then_some(()) }).await;
    let id = unique("dev");
    let mut s = raw_connect(broker.addr, &id, 30, None).await;
    s.write_all(&v4_bytes(vec![
        Packet::Subscribe(
            Subscribe {
                pkid: 1,
                filters: vec![v4_filter(&filter)],
            },
            None,
        ),
        Packet::Unsubscribe(
            Unsubscribe {
                pkid: 2,
                filters: vec![filter.clone()],
            },
            None,
        ),
    ]))
    .await
    .unwrap();
    // SUBACK (5 bytes) and UNSUBACK (4 bytes) come back; then leave.
    let mut acks = [0u8; 9];
    tokio::time::timeout(WAIT, s.read_exact(&mut acks)).await.unwrap().unwrap();
    // Both done: the fetch that creates the pointer (session.subscribed.1) and the pointer
    // delete (session.unsubscribed.1, on_acked_delete). The delete came last: no pointer.
    rule_reaches::<K>(&broker, "success", "session.subscribed.1", 1).await;
    rule_reaches::<K>(&broker, "success", "session.unsubscribed.1", 1).await;
    assert_eq!(
        kit.pointer(&id, &filter).await,
        None,
        "the subscribe's pointer outlived the unsubscribe"
    );
    drop(s);
    p.publish(&topic, QoS::AtLeastOnce, false, "while away").await;
    eventually("2 stored", WAIT, || async { (kit.stored_count(&topic).await == 2).then_some(()) }).await;
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe_acked(&filter, QoS::AtLeastOnce).await;
    only_the_marker_arrives(&mut a, &p, &format!("{base}/marker")).await;
}

/// MQTT 4.7.1.2: `x/#` also matches `x`. Offline fetch and the retained lookup both find the
/// parent topic, and skip `x-y`, whose name shares the prefix characters.
pub async fn hash_filters_match_the_parent_level_in_fetch_and_retained<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("pl");
    let filter = format!("{base}/#");
    let (sibling, child) = (format!("{base}-y"), format!("{base}/a"));
    let p = connect(broker.addr, &unique("pub"), true).await;
    for t in [&base, &child, &sibling] {
        p.publish(t, QoS::AtLeastOnce, true, format!("r:{t}")).await;
    }
    for t in [&base, &child, &sibling] {
        eventually("retained rows", WAIT, || async { kit.retained(t).await }).await;
    }
    let id = unique("dev");
    first_subscription(&kit, broker.addr, &id, &filter, false).await;
    for t in [&base, &child, &sibling] {
        p.publish(t, QoS::AtLeastOnce, false, format!("o:{t}")).await;
    }
    eventually("offline messages stored", WAIT, || async {
        (kit.stored_count(&base).await == 2 && kit.stored_count(&sibling).await == 2).then_some(())
    })
    .await;
    p.disconnect().await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let mut got: Vec<(bool, String)> = a
        .expect(4, WAIT)
        .await
        .iter()
        .map(|m| (m.retain, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect();
    got.sort();
    let mut want = vec![
        (false, format!("o:{base}")),
        (false, format!("o:{child}")),
        (true, format!("r:{base}")),
        (true, format!("r:{child}")),
    ];
    want.sort();
    assert_eq!(got, want);
}

/// MQTT 5 properties survive storage: a retained message and an offline message come back
/// after a broker restart with their user properties (order and duplicates kept), content type,
/// response topic and correlation data; a message whose expiry passed while stored is never
/// fetched, and one that has time left goes out with the interval counted down.
pub async fn mqtt5_properties_and_expiry_survive_storage<K: Kit>() {
    use crate::common::v5::*;
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("p5");
    let filter = format!("{base}/#");
    let props = |expiry: Option<u32>| PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: expiry,
        topic_alias: None,
        response_topic: Some(format!("{base}/reply")),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00id\xff")),
        user_properties: vec![("a".into(), "2".into()), ("a".into(), "1".into()), ("c".into(), "3".into())],
        subscription_identifiers: vec![],
        content_type: Some("text/plain".into()),
    };
    let id = unique("dev");
    let persistent = || Hello::resume(u32::MAX);
    let (mut s, _) = V5::connected(broker.addr, &id, persistent()).await;
    s.subscribe(&filter, QoS::AtLeastOnce).await;
    eventually("the read pointer", WAIT, || async { kit.pointer(&id, &filter).await }).await;
    s.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    let (mut p, _) = V5::connected(broker.addr, &unique("pub"), Hello::default()).await;
    p.publish(&format!("{base}/kept"), QoS::AtLeastOnce, true, b"retained", Some(props(None)))
        .await;
    p.publish(&format!("{base}/short"), QoS::AtLeastOnce, false, b"expires", Some(props(Some(1))))
        .await;
    p.publish(&format!("{base}/long"), QoS::AtLeastOnce, false, b"lasts", Some(props(Some(600))))
        .await;
    eventually("2 stored", WAIT, || async {
        (kit.stored_count(&format!("{base}/short")).await + kit.stored_count(&format!("{base}/long")).await == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let broker = broker.restart();
    let (mut s, ack) = V5::connected(broker.addr, &id, persistent()).await;
    assert!(!ack.session_present, "restarted: only the database remembers");
    s.subscribe(&filter, QoS::AtLeastOnce).await;
    // The fetch (the retained message was stored as an offline message too), then the
    // retained lookup.
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = s.publish_in().await;
        s.puback(m.pkid).await;
        got.push(m);
    }
    assert!(
        got.iter().all(|m| &m.payload[..] != b"expires"),
        "an expired message is never fetched: {got:?}"
    );
    assert!(got.iter().any(|m| m.retain && &m.payload[..] == b"retained"), "{got:?}");
    for m in &got {
        let mut p = m.properties.clone().expect("properties");
        if &m.payload[..] == b"lasts" {
            let left = p.message_expiry_interval.take().expect("an expiry");
            assert!((590..600).contains(&left), "counted down: {left}");
        }
        let payload = &m.payload;
        assert_eq!(p, props(None), "{payload:?}");
    }
}
