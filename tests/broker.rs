//! MQTT behaviour of the layer on rumqttd: protocol versions, QoS 2, wills, keepalive, hostile
//! client ids, packet-id cycling, no-loss acknowledgements. Each test also pins a rumqttd trap
//! (ARCHITECTURE §2) so that an upgrade that changes it fails here.

mod common;

use bytes::BytesMut;
use common::kits::{Kit, SqliteKit};
use common::*;
use rumqttc::QoS;
use rumqttd::protocol::{v4::V4, LastWill, Packet, Protocol};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn broker() -> (SqliteKit, BrokerProc) {
    let kit = SqliteKit::new().await;
    let b = BrokerProc::start("sqlite", &kit.plugin_conf());
    (kit, b)
}

/// An MQTT 5 rumqttc client whose incoming publishes arrive on the receiver.
fn v5_subscriber(
    port: u16,
    id: &str,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(P5::Publish(p)) = ev {
                let _ = tx.send(p);
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_clients_keep_their_user_properties_and_never_see_internal_ones() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let (_kit, b) = broker().await;
    let topic = format!("{}/v5", unique("p"));
    let (sub, mut rx) = v5_subscriber(b.port(), &unique("v5sub"));
    sub.subscribe(&topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut o = MqttOptions::new(unique("v5pub"), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (publ, mut el2) = AsyncClient::new(o, 100);
    tokio::spawn(async move { while el2.poll().await.is_ok() {} });
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    publ.publish_with_properties(&topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "hi", props)
        .await
        .unwrap();
    let p = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&p.payload[..], b"hi");
    let props = p.properties.expect("properties forwarded");
    assert_eq!(props.user_properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
}

/// A v5 client that sends a user property named like the broker's internal carrier can neither
/// forge a message's metadata (msgid, sender) nor make a subscriber see it, in a PUBLISH or in
/// its will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_internal_metadata_is_stripped_and_never_reaches_subscribers() {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let kit = SqliteKit::new().await;
    // Acks record the msgid the broker carried to the subscriber.
    let conf = format!(
        "{}backend.sqlite.hook.message.acked.9 = {{\"topic\": \"#\", \"action\": {{\"sql\": [\"insert into t(c, p) values (${{clientid}}, ${{msgid}})\"]}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let b = BrokerProc::start("sqlite", &conf);
    let base = unique("forge");
    let forged = || ("mqtt-persist-meta".to_string(), "1:0:victim".to_string());
    let sub_id = unique("v5sub");
    let (sub, mut rx) = v5_subscriber(b.port(), &sub_id);
    sub.subscribe(format!("{base}/#"), Q5::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pub_id = unique("v5pub");
    let mut o = MqttOptions::new(pub_id.clone(), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(30));
    let will_props = LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![forged(), ("w".into(), "1".into())],
    };
    o.set_last_will(LastWill::new(
        format!("{base}/will"),
        "gone",
        Q5::AtLeastOnce,
        false,
        Some(will_props),
    ));
    let (publ, mut el2) = AsyncClient::new(o, 100);
    let pub_task = tokio::spawn(async move { while el2.poll().await.is_ok() {} });
    let props = PublishProperties {
        user_properties: vec![("a".into(), "1".into()), forged(), ("b".into(), "2".into()), forged()],
        ..Default::default()
    };
    publ.publish_with_properties(format!("{base}/x"), Q5::AtLeastOnce, false, "hi", props)
        .await
        .unwrap();
    let p = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&p.payload[..], b"hi");
    let user = p.properties.map(|p| p.user_properties).unwrap_or_default();
    assert_eq!(user, vec![("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]);
    // The stored row and the ack carry the broker's own msgid and sender.
    let topic = format!("{base}/x");
    let (msgid, sender) = eventually("stored message", WAIT, || async {
        kit.conn()
            .query_row("SELECT msgid, sender FROM mqtt_msg WHERE topic = ?1", [&topic], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .ok()
    })
    .await;
    assert_eq!(sender, pub_id);
    let acked: i64 = eventually("the ack's custom row", WAIT, || async {
        kit.conn().query_row("SELECT p FROM t WHERE c = ?1", [&sub_id], |r| r.get(0)).ok()
    })
    .await;
    assert_eq!(acked, msgid, "the ack carried the stored msgid");
    // The will: the forged property is gone, the client's own one stays.
    pub_task.abort();
    let w = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(&w.payload[..], b"gone");
    let user = w.properties.map(|p| p.user_properties).unwrap_or_default();
    assert_eq!(user, vec![("w".to_string(), "1".to_string())]);
}

/// No PUBACK for a write that did not commit: a v5 publisher whose message a database refuses
/// gets reason code 0x80 (QoS 1 and 2); a v3.1.1 publisher, which has no negative ack, is acked
/// only once the message is in the dead-letter file, counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_is_never_acked_as_stored() {
    let kit = SqliteKit::new().await;
    kit.conn().execute_batch("CREATE TABLE refuse (p BLOB CHECK (p <> 'bad'))").unwrap();
    let conf = format!(
        "{}backend.sqlite.hook.message.publish.10 = {{\"topic\": \"refuse/#\", \"action\": {{\"sql\": [\"insert into refuse(p) values (${{payload}})\"]}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let b = BrokerProc::start_with("sqlite", &conf, &format!("metrics.listen = 127.0.0.1:{metrics_port}\n"));
    let topic = format!("refuse/{}", unique("x"));
    // MQTT 5: the refused message gets 0x80, the next one is acked as usual. (A raw client:
    // rumqttc ends its event loop on a failed PUBACK.)
    use rumqttd::protocol::{v5::V5, PubAckReason, PubRecReason};
    let mut s = raw_v5_connect(b.addr, &unique("v5")).await;
    let mut rbuf = BytesMut::new();
    for (pkid, qos, payload) in [(1, 1, "bad"), (2, 1, "good"), (3, 2, "bad"), (4, 2, "good")] {
        let mut out = BytesMut::new();
        let publish = mqtt_persist::broker::wire::build_publish(topic.as_bytes(), payload.as_bytes(), qos, false, pkid);
        V5.write(Packet::Publish(publish, None), &mut out).unwrap();
        s.write_all(&out).await.unwrap();
        let ok = match read_v5(&mut s, &mut rbuf).await {
            Packet::PubAck(a, _) => a.reason == PubAckReason::Success,
            Packet::PubRec(r, _) => r.reason == PubRecReason::Success,
            other => panic!("{other:?}"),
        };
        assert_eq!(ok, payload == "good", "QoS {qos} {payload}");
    }
    let stored: i64 = kit.conn().query_row("SELECT count(*) FROM refuse", [], |r| r.get(0)).unwrap();
    assert_eq!(stored, 2);
    // MQTT 3.1.1: acked after it was kept in the dead-letter file.
    let p = connect(b.addr, &unique("v4"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "bad").await;
    let dead = b.dir.path().join("data").join("dead-letter.jsonl");
    let line = eventually("a dead-letter record", WAIT, || async {
        std::fs::read_to_string(&dead).ok().filter(|t| !t.is_empty())
    })
    .await;
    let rec: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(rec["message"]["topic"], topic.as_str());
    assert_eq!(rec["message"]["payload"], "YmFk", "base64 of the payload");
    assert!(rec["reason"].as_str().unwrap().contains("refused"), "{rec}");
    let text = metrics_text(metrics_port).await;
    assert!(text.contains("mqtt_persist_dead_letter_total 1"), "{text}");
}

/// Packets sent in the same write as CONNECT are handled at once, not when the client next
/// sends something (a PUBLISH right behind CONNECT got its PUBACK only after a later packet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_sent_with_the_connect_are_handled_at_once() {
    let (kit, b) = broker().await;
    let topic = format!("{}/early", unique("p"));
    let c = rumqttd::protocol::Connect {
        keep_alive: 30,
        client_id: unique("early"),
        clean_session: true,
    };
    let publish = mqtt_persist::broker::wire::build_publish(topic.as_bytes(), b"first", 1, false, 7);
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&v4_bytes(vec![
        Packet::Connect(c, None, None, None, None),
        Packet::Publish(publish, None),
    ]))
    .await
    .unwrap();
    let mut acks = [0u8; 8];
    tokio::time::timeout(WAIT, s.read_exact(&mut acks))
        .await
        .expect("CONNACK and PUBACK")
        .unwrap();
    assert_eq!(acks, [0x20, 2, 0, 0, 0x40, 2, 0, 7]);
    assert_eq!(kit.stored_count(&topic).await, 1, "acked after it was stored");
}

/// MQTT 1.5.4: no UTF-8 string holds U+0000. A client id or user name with one is refused at
/// CONNECT (v3.1.1 code 2 / 4) instead of failing in the database after the client was acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_in_client_ids_and_user_names_are_refused_at_connect() {
    let (_kit, b) = broker().await;
    for (id, user, code) in [("a\0b", None, 2u8), ("ok-id", Some("u\0"), 4)] {
        let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
        let mut buf = BytesMut::new();
        let c = rumqttd::protocol::Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_session: true,
        };
        let login = user.map(|u| rumqttd::protocol::Login {
            username: u.into(),
            password: "p".into(),
        });
        V4.write(Packet::Connect(c, None, None, None, login), &mut buf).unwrap();
        s.write_all(&buf).await.unwrap();
        let mut ack = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await.unwrap().unwrap();
        assert_eq!(ack, [0x20, 2, 0, code], "{id:?} {user:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_messages_flow_end_to_end_and_are_stored() {
    let (kit, b) = broker().await;
    let topic = format!("{}/q2", unique("p"));
    let mut s = connect(b.addr, &unique("s"), true).await;
    s.subscribe(&topic, QoS::ExactlyOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = connect(b.addr, &unique("p"), true).await;
    for i in 0..5 {
        p.publish(&topic, QoS::ExactlyOnce, false, format!("x{i}")).await;
    }
    let got = s.expect(5, WAIT).await;
    assert!(got.iter().all(|m| m.qos == QoS::ExactlyOnce));
    eventually("5 stored", WAIT, || async { (kit.stored_count(&topic).await == 5).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_qos1_messages_than_router_packet_ids_are_delivered_in_order() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/many", unique("p"));
    let mut s = connect(b.addr, &unique("s"), true).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = connect(b.addr, &unique("p"), true).await;
    for i in 0..350 {
        p.publish(&topic, QoS::AtLeastOnce, false, format!("{i}")).await;
    }
    let got = s.expect(350, WAIT).await;
    let nums: Vec<u32> = got
        .iter()
        .map(|m| std::str::from_utf8(&m.payload).unwrap().parse().unwrap())
        .collect();
    assert_eq!(nums, (0..350).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_where_nobody_subscribes_keeps_the_publisher_connected() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/nobody", unique("p"));
    let mut p = connect(b.addr, &unique("p"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "x").await;
    p.publish(&format!("{topic}/2"), QoS::AtMostOnce, false, "y").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let echo = format!("{topic}/echo");
    p.subscribe(&echo, QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.publish(&echo, QoS::AtMostOnce, false, "still here").await;
    assert_eq!(&p.expect(1, WAIT).await[0].payload[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_with_mqtt_special_characters_work() {
    let (kit, b) = broker().await;
    let id = format!("{}/room#1+$x%2F", unique("dev"));
    let topic = format!("{}/t", unique("p"));
    let mut c = connect(b.addr, &id, true).await;
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.publish(&topic, QoS::AtLeastOnce, false, "me").await;
    c.expect(1, WAIT).await;
    eventually("client row", WAIT, || async { kit.client_state(&id).await.filter(|s| *s == 1) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_is_published_on_abnormal_close_but_not_after_disconnect() {
    let (kit, b) = broker().await;
    let topic = format!("{}/will", unique("p"));
    let mut s = connect(b.addr, &unique("s"), true).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let will = |m: &str| LastWill {
        topic: topic.clone().into(),
        message: m.to_string().into(),
        qos: rumqttd::protocol::QoS::AtLeastOnce,
        retain: false,
    };
    let clean_id = unique("w1");
    let clean = raw_connect(b.addr, &clean_id, 30, Some(will("after disconnect"))).await;
    let mut d = BytesMut::new();
    V4.write(
        Packet::Disconnect(
            rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ),
        &mut d,
    )
    .unwrap();
    let mut clean = clean;
    clean.write_all(&d).await.unwrap();
    drop(clean);
    // Its disconnect is stored after its will was decided: then the other client's will must
    // be the first to arrive.
    eventually("the first client offline", WAIT, || async {
        kit.client_state(&clean_id).await.filter(|s| *s == 0)
    })
    .await;
    let dirty = raw_connect(b.addr, &unique("w2"), 30, Some(will("gone"))).await;
    drop(dirty);
    let got = s.expect(1, WAIT).await;
    assert_eq!(&got[0].payload[..], b"gone", "no will after a DISCONNECT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_one_and_a_half_keepalives() {
    let (kit, b) = broker().await;
    let id = unique("ka");
    let mut s = raw_connect(b.addr, &id, 1, None).await;
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap();
    assert_eq!(n, 0, "connection closed");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(4500),
        "closed after {took:?}"
    );
    eventually("offline", WAIT, || async { kit.client_state(&id).await.filter(|s| *s == 0) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_means_no_timeout() {
    let (_kit, b) = broker().await;
    let mut s = raw_connect(b.addr, &unique("ka0"), 0, None).await;
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), s.read(&mut buf)).await.is_err(),
        "connection must stay open"
    );
    let mut ping = BytesMut::new();
    V4.write(Packet::PingReq(rumqttd::protocol::PingReq), &mut ping).unwrap();
    s.write_all(&ping).await.unwrap();
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], &[0xd0, 0], "PINGRESP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_means_the_message_is_already_in_the_database() {
    let (kit, b) = broker().await;
    let topic = format!("{}/nl", unique("p"));
    let mut o = rumqttc::MqttOptions::new(unique("nl"), "127.0.0.1", b.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    for i in 0..30 {
        client.publish(&topic, QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
        loop {
            match tokio::time::timeout(WAIT, el.poll()).await.unwrap().unwrap() {
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => break,
                _ => continue,
            }
        }
        assert_eq!(kit.stored_count(&topic).await, i + 1, "PUBACK before commit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_reach_a_qos2_subscriber() {
    let (kit, b) = broker().await;
    let base = unique("q2f");
    let id = unique("dev");
    let a = connect(b.addr, &id, false).await;
    a.subscribe(&format!("{base}/#"), QoS::ExactlyOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.disconnect().await;
    let p = connect(b.addr, &unique("pub"), true).await;
    p.publish(&format!("{base}/a"), QoS::ExactlyOnce, false, "two").await;
    p.publish(&format!("{base}/a"), QoS::AtLeastOnce, false, "one").await;
    let t = format!("{base}/a");
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 2).then_some(()) }).await;
    let b = b.restart();
    let mut a = connect(b.addr, &id, false).await;
    a.subscribe(&format!("{base}/#"), QoS::ExactlyOnce).await;
    let got = a.expect(2, WAIT).await;
    assert_eq!(
        got.iter().map(|m| (m.qos, m.payload.to_vec())).collect::<Vec<_>>(),
        vec![(QoS::ExactlyOnce, b"two".to_vec()), (QoS::AtLeastOnce, b"one".to_vec())]
    );
    // Acks of injected QoS 2 (PUBREC → PUBREL → PUBCOMP) advance the pointer too.
    a.disconnect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = b.restart();
    let mut a = connect(b.addr, &id, false).await;
    a.subscribe_acked(&format!("{base}/#"), QoS::ExactlyOnce).await;
    let p = connect(b.addr, &unique("pub"), true).await;
    p.publish(&format!("{base}/marker"), QoS::AtLeastOnce, false, "marker").await;
    assert_eq!(&a.next(WAIT).await.payload[..], b"marker", "nothing fetched again");
}
