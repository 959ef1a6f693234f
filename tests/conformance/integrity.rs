//! Scenarios of data integrity at the edges (ordering races, refused writes), run against
//! every backend like the others.

use crate::common::kits::Kit;
use crate::common::*;
use rumqttc::QoS;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// SUBSCRIBE, UNSUBSCRIBE and SUBSCRIBE of one filter in one TCP write: the unsubscribe's
/// pointer delete is queued while the second subscription's fetch would read (and keep) the
/// pointer, which the delete then removes. The fetch waits for the delete, so the second
/// subscription starts a pointer of its own and the client later gets what it missed.
pub async fn unsubscribe_then_subscribe_keeps_the_new_subscriptions_pointer<K: Kit>() {
    use rumqttd::protocol::{Packet, Subscribe, Unsubscribe};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kit = K::new().await;
    let broker = BrokerProc::start(K::DB, &kit.plugin_conf());
    let base = unique("us");
    let (filter, topic) = (format!("{base}/#"), format!("{base}/x"));
    let id = unique("dev");
    let mut s = raw_connect(broker.addr, &id, 30, None).await;
    let sub = |pkid| {
        Packet::Subscribe(
            Subscribe {
                pkid,
                filters: vec![v4_filter(&filter)],
            },
            None,
        )
    };
    let unsub = Packet::Unsubscribe(
        Unsubscribe {
            pkid: 2,
            filters: vec![filter.clone()],
        },
        None,
    );
    s.write_all(&v4_bytes(vec![sub(1), unsub, sub(3)])).await.unwrap();
    // Two SUBACKs (5 bytes each) and the UNSUBACK (4), the latter possibly first.
    let mut acks = [0u8; 14];
    tokio::time::timeout(WAIT, s.read_exact(&mut acks)).await.unwrap().unwrap();
    // Let the queued writes land, then leave; the message below is offline for this client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    let p = connect(broker.addr, &unique("pub"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "missed").await;
    eventually("stored", WAIT, || async { (kit.stored_count(&topic).await == 1).then_some(()) }).await;
    let mut a = connect(broker.addr, &id, true).await;
    a.subscribe(&filter, QoS::AtLeastOnce).await;
    let got = a.expect(1, WAIT).await;
    assert_eq!(&got[0].payload[..], b"missed", "the second subscription's pointer was kept");
}

/// No PUBACK for a write that did not commit, on every backend: a message a custom rule's
/// database refuses gets PUBACK reason 0x80 from an MQTT 5 publisher's point of view, and an
/// MQTT 3.1.1 publisher is acked only once the message is in the dead-letter file.
pub async fn a_refused_write_is_never_acked_as_stored<K: Kit>() {
    use bytes::BytesMut;
    use rumqttd::protocol::{v5::V5, Packet, Protocol, PubAckReason};
    use tokio::io::AsyncWriteExt;
    let kit = K::new().await;
    let db = K::DB;
    let conf = format!(
        "{}backend.{db}.hook.message.publish.10 = {{\"topic\": \"refuse/#\", \"action\": {}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf(),
        kit.refusing_action()
    );
    let broker = BrokerProc::start(K::DB, &conf);
    let topic = format!("refuse/{}", unique("x"));
    let mut s = raw_v5_connect(broker.addr, &unique("v5")).await;
    let mut out = BytesMut::new();
    for (pkid, payload) in [(1, "bad"), (2, "good")] {
        let p = mqtt_persist::broker::wire::build_publish(topic.as_bytes(), payload.as_bytes(), 1, false, pkid);
        V5.write(Packet::Publish(p, None), &mut out).unwrap();
    }
    s.write_all(&out).await.unwrap();
    let mut rbuf = BytesMut::new();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        match read_v5(&mut s, &mut rbuf).await {
            Packet::PubAck(a, _) => acks.push((a.pkid, a.reason == PubAckReason::Success)),
            other => panic!("{other:?}"),
        }
    }
    acks.sort();
    assert_eq!(acks, vec![(1, false), (2, true)], "0x80 for the refused message only");
    let p = connect(broker.addr, &unique("v4"), true).await;
    p.publish(&topic, QoS::AtLeastOnce, false, "bad").await;
    let dead = broker.dir.path().join("data").join("dead-letter.jsonl");
    let text = eventually("the dead-letter record", WAIT, || async {
        std::fs::read_to_string(&dead).ok().filter(|t| !t.is_empty())
    })
    .await;
    let rec: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (rec["message"]["topic"].as_str(), rec["message"]["payload"].as_str()),
        (Some(topic.as_str()), Some("YmFk"))
    );
}
