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

/// A QoS 1 subscription that goes away at once: the database creates its read pointer at the
/// newest stored message, so what is published afterwards is "offline" for this client.
async fn first_subscription(addr: std::net::SocketAddr, id: &str, filter: &str, clean: bool) {
    let c = connect(addr, id, clean).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.disconnect().await;
}

pub async fn retained_message_survives_a_broker_restart<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let topic = format!("{}/temp", unique("r"));
    let port = broker.port().to_string();
    let st = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", &topic, "-m", "21.5", "-r", "-q", "1"])
        .status()
        .expect("mosquitto_pub installed");
    assert!(st.success());
    eventually("retained row", WAIT, || async { kit.retained(&topic).await }).await;
    let broker = broker.restart();
    let port = broker.port().to_string();
    let out = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", &topic, "-v", "-W", "2"])
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
    first_subscription(broker.addr, &id, &filter, false).await;
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
    let broker = broker.restart();
    let mut other = connect(broker.addr, &unique("other"), true).await;
    other.subscribe(&filter, QoS::AtLeastOnce).await;
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(3, WAIT).await;
    assert_eq!(
        got.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        vec![b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()]
    );
    other.expect_none(Duration::from_millis(800)).await;
    a.disconnect().await;
    // Acked: a reconnect after another restart gets nothing again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, false).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    a.expect_none(Duration::from_secs(1)).await;
}

pub async fn persistent_session_gets_queued_messages_exactly_once<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("ps");
    let filter = format!("{base}/+");
    let id = unique("dev");
    first_subscription(broker.addr, &id, &filter, false).await;
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

pub async fn client_state_follows_connects_and_takeovers<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let id = unique("st");
    let c = connect(broker.addr, &id, true).await;
    state_of(&kit, &id, 1).await;
    c.disconnect().await;
    state_of(&kit, &id, 0).await;
    // Takeover: the old connection's late disconnect must not mark the new one offline.
    for _ in 0..5 {
        let first = connect(broker.addr, &id, true).await;
        let second = connect(broker.addr, &id, true).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        state_of(&kit, &id, 1).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(kit.client_state(&id).await, Some(1), "takeover left the client offline");
        second.disconnect().await;
        state_of(&kit, &id, 0).await;
    }
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
    first_subscription(broker.addr, &id, &format!("{base}/#"), false).await;
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
    first_subscription(broker.addr, &id, &filter, false).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for t in ["k1/temp", "k2/temp", "k1/hum", "k1/temp/x"] {
        p.publish(&format!("{base}/{t}"), QoS::AtLeastOnce, false, t.as_bytes().to_vec())
            .await;
    }
    let t = format!("{base}/k1/hum");
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 1).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    w2.subscribe(&format!("{base}/#"), QoS::AtLeastOnce).await;
    w2.expect_none(Duration::from_millis(800)).await;
}

pub async fn keep_latest_delivers_only_the_newest_message_per_topic<K: Kit>() {
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("latest/");
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..3 {
        p.publish(&format!("{base}/a"), QoS::AtLeastOnce, false, format!("a{i}")).await;
    }
    p.publish(&format!("{base}/b"), QoS::AtLeastOnce, false, "b0").await;
    let t = format!("{base}/b");
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 1).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = connect(broker.addr, &unique("s"), true).await;
    s.subscribe(&format!("{base}/+"), QoS::AtLeastOnce).await;
    let mut got: Vec<Vec<u8>> = s.expect(2, WAIT).await.iter().map(|m| m.payload.to_vec()).collect();
    got.sort();
    assert_eq!(got, vec![b"a2".to_vec(), b"b0".to_vec()]);
    // The first ack deletes the latest message: the next subscriber gets none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s2 = connect(broker.addr, &unique("s"), true).await;
    s2.subscribe(&format!("{base}/+"), QoS::AtLeastOnce).await;
    s2.expect_none(Duration::from_millis(800)).await;
}

/// SPEC §3.1.3: the newest `max_returned_count` messages, oldest first, at min(stored QoS,
/// subscription QoS); a QoS 0 subscription fetches nothing.
pub async fn offline_fetch_returns_the_newest_n_at_the_lower_qos<K: Kit>() {
    let kit = K::new().await;
    let db = K::DB;
    // The default fetch rule, capped at 2 messages (a later duplicate key wins).
    let conf = format!(
        "{}backend.{db}.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"offline_opts\": {{\"max_returned_count\": 2}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let broker = BrokerProc::start(K::DB, &conf);
    let base = unique("n");
    let filter = format!("{base}/#");
    let (a_id, c_id) = (unique("dev"), unique("dev0"));
    // First subscriptions: pointers start at the newest stored message.
    for id in [&a_id, &c_id] {
        first_subscription(broker.addr, id, &filter, true).await;
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
    c.subscribe(&filter, QoS::AtMostOnce).await;
    c.expect_none(Duration::from_secs(1)).await;
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
    first_subscription(broker.addr, &id, &filter, true).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "kept").await;
    eventually("stored", WAIT, || async { (kit.stored_count(&topic).await == 1).then_some(()) }).await;
    // With a pointer: the stored message arrives; then unsubscribe.
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    assert_eq!(a.expect(1, WAIT).await[0].payload.to_vec(), b"kept".to_vec());
    a.client.unsubscribe(&filter).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.disconnect().await;
    for m in ["m1", "m2"] {
        p.publish(&topic, QoS::AtLeastOnce, false, m).await;
    }
    eventually("3 stored", WAIT, || async { (kit.stored_count(&topic).await == 3).then_some(()) }).await;
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    a.expect_none(Duration::from_secs(1)).await;
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
    first_subscription(broker.addr, &id, &filter, true).await;
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
    for i in [0, n / 2, n - 1] {
        let topic = format!("{base}/{i}");
        eventually("retained rows", WAIT, || async { kit.retained(&topic).await }).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
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
        "{}backend.{db}.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}, \"offline_opts\": {{\"first_subscribe\": \"time_range\", \"time_range\": \"1h\"}}, \"pool\": \"pool1\"}}\n",
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
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("ack");
    let filter = format!("{base}/#");
    let topic = format!("{base}/x");
    let id = unique("dev");
    first_subscription(broker.addr, &id, &filter, true).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    for m in ["m0", "m1", "m2"] {
        p.publish(&topic, QoS::AtLeastOnce, false, m).await;
    }
    eventually("3 stored", WAIT, || async { (kit.stored_count(&topic).await == 3).then_some(()) }).await;
    let broker = broker.restart();
    let mut o = rumqttc::MqttOptions::new(id.clone(), "127.0.0.1", broker.port());
    o.set_manual_acks(true);
    let mut a = connect_with(o).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(3, WAIT).await;
    // The newest first, then the older ones.
    for i in [2, 0, 1] {
        a.client.ack(&got[i]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let broker = broker.restart();
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    a.expect_none(Duration::from_secs(1)).await;
}

/// SPEC §3.3: `backend.<db>.message_ttl` removes older stored messages, off the hot path.
pub async fn stored_messages_older_than_message_ttl_are_deleted<K: Kit>() {
    let kit = K::alone().await;
    let db = K::DB;
    let conf = format!("{}backend.{db}.message_ttl = 2s\n", kit.plugin_conf());
    let broker = BrokerProc::start(K::DB, &conf);
    let p = connect(broker.addr, &unique("pub"), true).await;
    let t = format!("{}/ttl", unique("ttl"));
    p.publish(&t, QoS::AtLeastOnce, false, "old").await;
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 1).then_some(()) }).await;
    eventually("deleted after the TTL", WAIT, || async {
        (kit.stored_count(&t).await == 0).then_some(())
    })
    .await;
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
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    p.publish(&topic, QoS::AtLeastOnce, false, "while away").await;
    eventually("2 stored", WAIT, || async { (kit.stored_count(&topic).await == 2).then_some(()) }).await;
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    a.expect_none(Duration::from_secs(1)).await;
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
    first_subscription(broker.addr, &id, &filter, false).await;
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
