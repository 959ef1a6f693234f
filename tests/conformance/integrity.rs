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
