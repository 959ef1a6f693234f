//! MQTT 5 behaviour the layer owns on top of rumqttd: sessions that expire, wills that wait,
//! assigned client ids, the CONNACK's promises. Each test talks raw MQTT 5 (tests/common/v5.rs)
//! so that the packets themselves are checked, not what a client library makes of them.

mod common;

use common::kits::{Kit, SqliteKit};
use common::v5::*;
use common::*;
use std::time::{Duration, Instant};

async fn broker() -> (SqliteKit, BrokerProc) {
    let kit = SqliteKit::new().await;
    let b = BrokerProc::start("sqlite", &kit.plugin_conf());
    (kit, b)
}

fn will(topic: &str, payload: &str, delay: Option<u32>) -> LastWill {
    LastWill {
        topic: topic.to_string().into(),
        message: payload.to_string().into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: delay.map(|d| LastWillProperties {
            delay_interval: Some(d),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_states_what_the_broker_supports() {
    let (_kit, b) = broker().await;
    let (_c, ack) = V5::connected(b.addr, &unique("caps"), Hello::default()).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.max_packet_size, Some(1 << 20), "mqtt.max_packet_size is announced");
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifiers_available, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_client_id_gets_an_assigned_one_even_without_clean_start() {
    let (_kit, b) = broker().await;
    let hello = Hello::resume(60);
    let (_c, ack) = V5::connected(b.addr, "", hello).await;
    let id = ack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("assigned client id");
    assert!(!id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_publishes_the_will_and_a_normal_one_does_not() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/will", unique("p"));
    let (mut s, _) = V5::connected(b.addr, &unique("s"), Hello::default()).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    for (reason, payload) in [
        (DisconnectReasonCode::NormalDisconnection, "after normal"),
        (DisconnectReasonCode::DisconnectWithWillMessage, "after 0x04"),
    ] {
        let hello = Hello {
            will: Some(will(&topic, payload, None)),
            ..Hello::default()
        };
        let (c, _) = V5::connected(b.addr, &unique("w"), hello).await;
        c.disconnect(reason).await;
    }
    // A marker published after both disconnects: only the 0x04 will may come before it.
    let (mut m, _) = V5::connected(b.addr, &unique("m"), Hello::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.publish(&topic, QoS::AtLeastOnce, false, b"marker", None).await;
    let first = s.publish_in().await;
    assert_eq!(&first.payload[..], b"after 0x04");
    let second = s.publish_in().await;
    assert_eq!(&second.payload[..], b"marker", "no will after a normal disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_waits_for_its_delay_and_a_reconnect_cancels_it() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/will", unique("p"));
    let (mut s, _) = V5::connected(b.addr, &unique("s"), Hello::default()).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;

    // Dropped, never back: the will comes after its 2 s delay.
    let hello = Hello {
        will: Some(will(&topic, "late", Some(2))),
        ..Hello::session(60)
    };
    let (c, _) = V5::connected(b.addr, &unique("gone"), hello.clone()).await;
    let dropped = Instant::now();
    drop(c);
    let got = s.publish_in().await;
    assert_eq!(&got.payload[..], b"late");
    let waited = dropped.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "published after {waited:?}, before its delay"
    );

    // Dropped, back within the delay: no will; a marker published after the delay comes first.
    let id = unique("back");
    let (c, _) = V5::connected(b.addr, &id, hello.clone()).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut again, ack) = V5::connected(
        b.addr,
        &id,
        Hello {
            clean_start: false,
            ..hello
        },
    )
    .await;
    assert!(ack.session_present);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    again.publish(&topic, QoS::AtLeastOnce, false, b"marker", None).await;
    assert_eq!(&s.publish_in().await.payload[..], b"marker", "the reconnect cancelled the will");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lives_for_its_expiry_interval_and_no_longer() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/q", unique("p"));
    let id = unique("sess");
    let resume = Hello::resume(2);
    let (mut c, ack) = V5::connected(b.addr, &id, Hello::session(2)).await;
    assert!(!ack.session_present);
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;

    // Back within the interval: the session and what was published meanwhile are there.
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"while away", None).await;
    let (mut c, ack) = V5::connected(b.addr, &id, resume.clone()).await;
    assert!(ack.session_present, "resumed within the expiry interval");
    let got = c.publish_in().await;
    assert_eq!(&got.payload[..], b"while away");
    c.puback(got.pkid).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;

    // Away longer than the interval: a new session, nothing queued for it.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (_c, ack) = V5::connected(b.addr, &id, resume).await;
    assert!(!ack.session_present, "the session expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_zero_ends_the_session_with_the_connection() {
    let (_kit, b) = broker().await;
    let id = unique("zero");
    let (mut c, _) = V5::connected(b.addr, &id, Hello::session(60)).await;
    c.subscribe(&format!("{}/x", unique("p")), QoS::AtLeastOnce).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    // Resumed, but with expiry 0 this time: it ends when this connection does.
    let (c, ack) = V5::connected(b.addr, &id, Hello::resume(0)).await;
    assert!(ack.session_present);
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    let ack = eventually("the session to end", WAIT, || {
        let id = id.clone();
        async move {
            let (c, ack) = V5::connected(b.addr, &id, Hello::resume(0)).await;
            c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
            (!ack.session_present).then_some(ack)
        }
    })
    .await;
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_start_with_an_expiry_starts_a_new_session_that_outlives_the_connection() {
    let (_kit, b) = broker().await;
    let id = unique("fresh");
    let (mut c, _) = V5::connected(b.addr, &id, Hello::session(60)).await;
    c.subscribe(&format!("{}/x", unique("p")), QoS::AtLeastOnce).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    let (c, ack) = V5::connected(b.addr, &id, Hello::session(60)).await;
    assert!(!ack.session_present, "clean start discards the old session");
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    let (_c, ack) = V5::connected(b.addr, &id, Hello::resume(60)).await;
    assert!(ack.session_present, "the new session was kept");
}

fn limits(receive_max: Option<u16>, max_packet: Option<u32>, alias_max: Option<u16>) -> Hello {
    let mut h = Hello::default();
    h.props.receive_maximum = receive_max;
    h.props.max_packet_size = max_packet;
    h.props.topic_alias_max = alias_max;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_keepalive_is_capped_by_server_keep_alive() {
    let (_kit, b) = broker().await;
    let hello = Hello {
        keep_alive: 120,
        ..Hello::default()
    };
    let (_c, ack) = V5::connected(b.addr, &unique("ka"), hello).await;
    assert_eq!(ack.properties.unwrap().server_keep_alive, Some(60));
    let (_c, ack) = V5::connected(b.addr, &unique("ka"), Hello::default()).await;
    assert_eq!(ack.properties.unwrap().server_keep_alive, None, "30 s is granted as asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_receive_maximum_bounds_unacked_live_deliveries() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/flow", unique("p"));
    let (mut c, _) = V5::connected(b.addr, &unique("rm"), limits(Some(2), None, None)).await;
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    for i in 0..5u8 {
        p.publish(&topic, QoS::AtLeastOnce, false, &[i], None).await;
    }
    // Two may be unacked; the third comes only after an ack, and so on, in order.
    let first = c.publish_in().await;
    let second = c.publish_in().await;
    assert_eq!((first.payload[0], second.payload[0]), (0, 1));
    // Anything before the ack must not be a publish: a PINGREQ's answer proves the broker
    // wrote what it had.
    c.send(Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq)).await;
    assert!(
        matches!(c.recv().await, Packet::PingResp(_)),
        "a third publish went out beyond the receive maximum"
    );
    c.puback(first.pkid).await;
    assert_eq!(c.publish_in().await.payload[0], 2);
    c.puback(second.pkid).await;
    assert_eq!(c.publish_in().await.payload[0], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_unacked_publishes_than_the_brokers_receive_maximum_is_a_disconnect_0x93() {
    let kit = SqliteKit::new().await;
    let b = BrokerProc::start_with("sqlite", &kit.plugin_conf(), "mqtt.max_inflight = 3");
    let (mut c, ack) = V5::connected(b.addr, &unique("flood"), Hello::default()).await;
    assert_eq!(ack.properties.unwrap().receive_max, Some(3));
    for i in 1..=4u16 {
        // QoS 2 without PUBREL: each stays in flight.
        c.send(Packet::Publish(publish(
            &format!("{}/x", unique("p")),
            QoS::ExactlyOnce,
            i,
            b"x",
            None,
        )))
        .await;
    }
    loop {
        match c.recv_within(WAIT).await {
            Some(Packet::PubRec(_)) => continue,
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::ReceiveMaximumExceeded);
                break;
            }
            other => panic!("expected DISCONNECT 0x93, got {other:?}\n{}", b.log()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_topic_aliases_resolve_and_a_bad_one_is_a_disconnect() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/alias", unique("p"));
    let (mut s, _) = V5::connected(b.addr, &unique("s"), Hello::default()).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut c, ack) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    assert!(ack.properties.unwrap().topic_alias_max.unwrap_or(0) > 0);
    let alias = |n| {
        Some(PublishProperties {
            topic_alias: Some(n),
            ..Default::default()
        })
    };
    c.publish(&topic, QoS::AtLeastOnce, false, b"named", alias(1)).await;
    c.publish("", QoS::AtLeastOnce, false, b"by alias", alias(1)).await;
    for want in ["named", "by alias"] {
        let p = s.publish_in().await;
        assert_eq!(&p.topic[..], topic.as_bytes(), "the subscriber sees the topic, never the alias");
        assert_eq!(&p.payload[..], want.as_bytes());
        s.puback(p.pkid).await;
    }
    c.send(Packet::Publish(publish(&topic, QoS::AtMostOnce, 0, b"zero", alias(0))))
        .await;
    match c
        .recv_within(WAIT)
        .await
        .unwrap_or_else(|| panic!("closed without DISCONNECT\n{}", b.log()))
    {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::TopicAliasInvalid),
        other => panic!("expected DISCONNECT 0x94, got {other:?}\n{}", b.log()),
    }
    // Aliases belong to one connection.
    let (mut c, _) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    c.send(Packet::Publish(publish("", QoS::AtMostOnce, 0, b"unknown", alias(1)))).await;
    match c.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_uses_topic_aliases_when_the_client_allows_them() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/alias", unique("p"));
    let (mut c, _) = V5::connected(b.addr, &unique("sa"), limits(None, None, Some(1))).await;
    c.subscribe(&topic, QoS::AtMostOnce).await;
    for _ in 0..3 {
        c.publish(&topic, QoS::AtMostOnce, false, b"x", None).await;
    }
    let first = c.publish_in().await;
    assert_eq!(&first.topic[..], topic.as_bytes());
    let n = first.properties.and_then(|p| p.topic_alias).expect("an alias with the first");
    for _ in 0..2 {
        let p = c.publish_in().await;
        assert!(p.topic.is_empty(), "the topic is left out once aliased");
        assert_eq!(p.properties.and_then(|p| p.topic_alias), Some(n));
    }
    // Without the client's consent, never.
    let (mut d, _) = V5::connected(b.addr, &unique("na"), Hello::default()).await;
    d.subscribe(&topic, QoS::AtMostOnce).await;
    d.publish(&topic, QoS::AtMostOnce, false, b"y", None).await;
    let p = d.publish_in().await;
    assert!(p.properties.and_then(|p| p.topic_alias).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_larger_than_the_client_accepts_are_not_sent() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/big", unique("p"));
    let (mut c, _) = V5::connected(b.addr, &unique("mp"), limits(None, Some(64 + topic.len() as u32), None)).await;
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, &[7u8; 64], None).await;
    p.publish(&topic, QoS::AtLeastOnce, false, &[1u8; 8], None).await;
    // The large one was dropped (and acked to the router as if delivered); the small one comes.
    let got = c.publish_in().await;
    assert_eq!(&got.payload[..], &[1u8; 8]);
    c.puback(got.pkid).await;
}

/// The receive maximum holds for stored messages too: 5000 fetched from the database after a
/// restart reach a client that allows 10 unacked, all of them, in order, never more than 10
/// outstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_respect_the_receive_maximum() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/many", unique("p"));
    let id = unique("rm10");
    let persistent = || {
        let mut h = limits(Some(10), None, None);
        h.props.session_expiry_interval = Some(u32::MAX);
        h.clean_start = false;
        h
    };
    let (mut c, _) = V5::connected(b.addr, &id, persistent()).await;
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    for i in 0..5000u32 {
        let pkid = (i % 60_000 + 1) as u16;
        p.send(Packet::Publish(publish(&topic, QoS::AtLeastOnce, pkid, &i.to_be_bytes(), None)))
            .await;
        if i % 500 == 499 {
            // Drain the acks now and then so the publisher's own window stays small.
            while let Some(Packet::PubAck(a)) = p.recv_within(WAIT).await {
                if a.pkid == (i % 60_000 + 1) as u16 {
                    break;
                }
            }
        }
    }
    drop(p);
    // The router forgets sessions at a restart; the database does not.
    let b = b.restart();
    let (mut c, ack) = V5::connected(b.addr, &id, persistent()).await;
    assert!(!ack.session_present);
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut unacked = std::collections::VecDeque::new();
    let mut next = 0u32;
    while next < 5000 {
        // Let the broker fill the window, then read what it sent; ack the oldest.
        let p = c.publish_in().await;
        let n = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
        assert_eq!(n, next, "in order");
        next += 1;
        unacked.push_back(p.pkid);
        assert!(unacked.len() <= 10, "{} unacked deliveries", unacked.len());
        if unacked.len() == 10 || next == 5000 {
            let pkid = unacked.pop_front().unwrap();
            c.puback(pkid).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_keeps_a_clients_own_messages_from_it() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/nl", unique("p"));
    let (mut me, _) = V5::connected(b.addr, &unique("me"), Hello::default()).await;
    me.subscribe_with(vec![filter(&topic, true, false, RetainForwardRule::OnEverySubscribe)], None)
        .await;
    let (mut other, _) = V5::connected(b.addr, &unique("other"), Hello::default()).await;
    other.subscribe(&topic, QoS::AtLeastOnce).await;
    me.publish(&topic, QoS::AtLeastOnce, false, b"mine", None).await;
    let got = other.publish_in().await;
    assert_eq!(&got.payload[..], b"mine", "other subscribers get it");
    other.puback(got.pkid).await;
    other.publish(&topic, QoS::AtLeastOnce, false, b"theirs", None).await;
    let got = me.publish_in().await;
    assert_eq!(&got.payload[..], b"theirs", "its own message never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_keeps_the_retain_flag_of_live_messages() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/rap", unique("p"));
    let (mut rap, _) = V5::connected(b.addr, &unique("rap"), Hello::default()).await;
    rap.subscribe_with(vec![filter(&topic, false, true, RetainForwardRule::Never)], None)
        .await;
    let (mut plain, _) = V5::connected(b.addr, &unique("plain"), Hello::default()).await;
    plain
        .subscribe_with(vec![filter(&topic, false, false, RetainForwardRule::Never)], None)
        .await;
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, true, b"kept", None).await;
    assert!(rap.publish_in().await.retain, "retain as published");
    assert!(!plain.publish_in().await.retain, "a live message goes with retain 0 by default");
    p.publish(&topic, QoS::AtLeastOnce, true, b"", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_decides_when_stored_retained_messages_come() {
    let (_kit, b) = broker().await;
    let base = unique("rh");
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    for t in ["a", "b"] {
        p.publish(&format!("{base}/{t}"), QoS::AtLeastOnce, true, t.as_bytes(), None).await;
    }
    let all = format!("{base}/+");
    let marker = format!("{base}/marker");
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    // Until the marker arrives, what comes is what the subscription brought.
    async fn retained_until_marker(c: &mut V5, p: &mut V5, marker: &str) -> usize {
        p.publish(marker, QoS::AtMostOnce, false, b"m", None).await;
        let mut n = 0;
        loop {
            let got = c.publish_in().await;
            if &got.topic[..] == marker.as_bytes() {
                return n;
            }
            assert!(got.retain, "{got:?}");
            n += 1;
            if got.qos != QoS::AtMostOnce {
                c.puback(got.pkid).await;
            }
        }
    }
    for (rule, first, again) in [
        (RetainForwardRule::OnEverySubscribe, 2, 2),
        (RetainForwardRule::OnNewSubscribe, 2, 0),
        (RetainForwardRule::Never, 0, 0),
    ] {
        let f = filter(&all, false, false, rule.clone());
        c.subscribe_with(vec![f.clone()], None).await;
        assert_eq!(
            retained_until_marker(&mut c, &mut p, &marker).await,
            first,
            "{:?}, new",
            f.retain_forward_rule
        );
        c.subscribe_with(vec![f], None).await;
        assert_eq!(retained_until_marker(&mut c, &mut p, &marker).await, again, "{rule:?}, again");
        c.send(Packet::Unsubscribe(rumqttc::v5::mqttbytes::v5::Unsubscribe::new(&all, None)))
            .await;
        assert!(matches!(c.recv().await, Packet::UnsubAck(_)));
    }
    for t in ["a", "b"] {
        p.publish(&format!("{base}/{t}"), QoS::AtLeastOnce, true, b"", None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_with_identifiers_get_one_copy_with_every_identifier() {
    let (_kit, b) = broker().await;
    let base = unique("sid");
    let topic = format!("{base}/x");
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    let id = |n| {
        Some(SubscribeProperties {
            id: Some(n),
            user_properties: vec![],
        })
    };
    c.subscribe_with(vec![Filter::new(&topic, QoS::AtLeastOnce)], id(2)).await;
    c.subscribe_with(vec![Filter::new(format!("{base}/#"), QoS::AtLeastOnce)], id(3))
        .await;
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"one", None).await;
    let got = c.publish_in().await;
    assert_eq!(
        got.properties.as_ref().map(|p| p.subscription_identifiers.clone()),
        Some(vec![2, 3])
    );
    c.puback(got.pkid).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"two", None).await;
    let next = c.publish_in().await;
    assert_eq!(&next.payload[..], b"two", "the second copy of `one` was not sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_are_refused_per_filter_and_dollar_and_shared_filters_are_granted() {
    let (_kit, b) = broker().await;
    let good = format!("{}/ok", unique("p"));
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    let ack = c
        .subscribe_with(
            vec![
                Filter::new("a/#/b", QoS::AtLeastOnce),
                Filter::new(&good, QoS::AtLeastOnce),
                Filter::new("$SYS/#", QoS::AtMostOnce),
                Filter::new("$share/g/x", QoS::AtLeastOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.return_codes,
        vec![
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
    // Still connected, and the good filter works.
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&good, QoS::AtLeastOnce, false, b"x", None).await;
    assert_eq!(&c.publish_in().await.payload[..], b"x");
}

/// `acl.file` in Mosquitto's format: a denied filter gets SUBACK 0x87 (0x80 for 3.1.1), a
/// denied publish PUBACK 0x87 and goes nowhere, and a stored message on a topic the client
/// may no longer read is not delivered to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_file_refuses_subscriptions_publishes_and_deliveries() {
    let kit = SqliteKit::new().await;
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite #\ntopic deny test/nosubscribe\n").unwrap();
    let b = BrokerProc::start_with("sqlite", &kit.plugin_conf(), &format!("acl.file = {}", acl.display()));
    let base = unique("acl");
    let secret = format!("{base}/secret");
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&secret, QoS::AtLeastOnce, true, b"kept from before", None).await;

    // 3.1.1 and 5 refuse the denied filter, grant the rest of the same SUBSCRIBE.
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    let ack = c
        .subscribe_with(
            vec![
                Filter::new("test/nosubscribe", QoS::AtLeastOnce),
                Filter::new(format!("{base}/#"), QoS::AtLeastOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::NotAuthorized, SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let got = c.publish_in().await;
    assert_eq!(&got.payload[..], b"kept from before", "the retained message, readable for now");
    c.puback(got.pkid).await;
    let mut v4 = raw_connect(b.addr, &unique("v4"), 30, None).await;
    let sub = rumqttd::protocol::Subscribe {
        pkid: 7,
        filters: vec![v4_filter("test/nosubscribe")],
    };
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        v4.write_all(&v4_bytes(vec![rumqttd::protocol::Packet::Subscribe(sub, None)]))
            .await
            .unwrap();
        let mut suback = [0u8; 5];
        tokio::time::timeout(WAIT, v4.read_exact(&mut suback)).await.unwrap().unwrap();
        assert_eq!(suback, [0x90, 3, 0, 7, 0x80], "3.1.1 SUBACK failure");
    }

    // The ACL changes (reload): the secret topic is denied.
    std::fs::write(
        &acl,
        format!("topic readwrite #\ntopic deny test/nosubscribe\ntopic deny {secret}\n"),
    )
    .unwrap();
    b.signal("-HUP");
    let reader = unique("r");
    let ack = eventually("the reloaded ACL", WAIT, || {
        let reader = reader.clone();
        let secret = secret.clone();
        async move {
            let (mut r, _) = V5::connected(b.addr, &reader, Hello::default()).await;
            let ack = r.subscribe(&secret, QoS::AtLeastOnce).await;
            (ack.return_codes == vec![SubscribeReasonCode::NotAuthorized]).then_some(ack)
        }
    })
    .await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]);
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    let ack = p.publish(&secret, QoS::AtLeastOnce, false, b"no", None).await.unwrap();
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);
    // A wildcard subscriber is granted, but neither the stored retained message nor anything
    // else on the denied topic reaches it: the marker is the first message.
    let (mut w, _) = V5::connected(b.addr, &unique("w"), Hello::default()).await;
    w.subscribe(&format!("{base}/#"), QoS::AtLeastOnce).await;
    p.publish(&format!("{base}/marker"), QoS::AtLeastOnce, false, b"marker", None).await;
    assert_eq!(&w.publish_in().await.payload[..], b"marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_out_at_the_lower_of_the_published_and_the_granted_qos() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/q", unique("p"));
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    c.subscribe(&topic, QoS::ExactlyOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("pub"), Hello::default()).await;
    p.publish(&topic, QoS::AtMostOnce, false, b"zero", None).await;
    let got = c.publish_in().await;
    assert_eq!((got.qos, &got.payload[..]), (QoS::AtMostOnce, &b"zero"[..]));
    for round in 0..3 {
        p.publish(&topic, QoS::AtLeastOnce, false, b"one", None).await;
        let got = c.publish_in().await;
        assert_eq!(got.qos, QoS::AtLeastOnce, "round {round}");
        // The PUBACK completes the router's QoS 2 flow: the next rounds still arrive.
        c.puback(got.pkid).await;
    }
    // QoS 2 is routed once the publisher releases it.
    p.publish(&topic, QoS::ExactlyOnce, false, b"two", None).await;
    let Packet::PubRec(rec) = p.recv().await else { panic!("PUBREC") };
    p.send(Packet::PubRel(rumqttc::v5::mqttbytes::v5::PubRel::new(rec.pkid, None)))
        .await;
    assert_eq!(c.publish_in().await.qos, QoS::ExactlyOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_subscribers_at_qos2_still_get_other_clients_qos1_messages() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/nl2", unique("p"));
    let mut f = filter(&topic, true, false, RetainForwardRule::OnEverySubscribe);
    f.qos = QoS::ExactlyOnce;
    let (mut a, _) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    a.subscribe_with(vec![f.clone()], None).await;
    let (mut bc, _) = V5::connected(b.addr, &unique("b"), Hello::default()).await;
    bc.subscribe_with(vec![f], None).await;
    a.publish(&topic, QoS::AtLeastOnce, false, b"from a", None).await;
    let got = bc.publish_in().await;
    assert_eq!((&got.payload[..], got.qos), (&b"from a"[..], QoS::AtLeastOnce));
}

/// Collects PUBLISHes from `members` (acking QoS 1 ones) until `n` arrived in all.
async fn collect_shared(members: &mut [&mut V5], n: usize) -> Vec<Vec<String>> {
    let mut got = vec![Vec::new(); members.len()];
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.iter().map(Vec::len).sum::<usize>() < n {
        assert!(Instant::now() < deadline, "only {got:?} of {n} shared messages arrived");
        for (i, m) in members.iter_mut().enumerate() {
            if let Ok(Some(Packet::Publish(p))) = tokio::time::timeout(Duration::from_millis(50), m.recv_within(WAIT)).await {
                if p.qos == QoS::AtLeastOnce {
                    m.puback(p.pkid).await;
                }
                got[i].push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gives_each_message_to_one_member_in_turn() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/x", unique("share"));
    let shared = format!("$share/g/{topic}");
    let (mut a, ack) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    assert_eq!(ack.properties.and_then(|p| p.shared_subscription_available), Some(1));
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    let (mut plain, _) = V5::connected(b.addr, &unique("plain"), Hello::default()).await;
    // Granted at most QoS 1.
    assert_eq!(
        a.subscribe(&shared, QoS::ExactlyOnce).await.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "{}",
        b.log()
    );
    assert_eq!(
        c.subscribe(&shared, QoS::AtLeastOnce).await.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    plain.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    for i in 0..10 {
        p.publish(&topic, QoS::AtLeastOnce, false, format!("m{i}").as_bytes(), None).await;
    }
    let got = collect_shared(&mut [&mut a, &mut c], 10).await;
    let mut all: Vec<&String> = got.iter().flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "each message once to the group: {got:?}");
    assert_eq!((got[0].len(), got[1].len()), (5, 5), "in turn: {got:?}");
    for i in 0..10 {
        assert_eq!(
            plain.publish_in().await.payload,
            format!("m{i}").as_bytes(),
            "a plain subscriber gets every one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_message_a_member_left_unacked_goes_to_another_member() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/x", unique("share"));
    let shared = format!("$share/g/{topic}");
    let (mut a, _) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    a.subscribe(&shared, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"first", None).await;
    // The only member gets it and never acks; then a second member joins and the first goes.
    assert_eq!(&a.publish_in().await.payload[..], b"first");
    let (mut c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    c.subscribe(&shared, QoS::AtLeastOnce).await;
    drop(a);
    let again = c.publish_in().await;
    assert_eq!(&again.payload[..], b"first", "redelivered to the member still there");
    c.puback(again.pkid).await;
    // And the group goes on with the one member.
    p.publish(&topic, QoS::AtLeastOnce, false, b"second", None).await;
    assert_eq!(&c.publish_in().await.payload[..], b"second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_messages_wait_for_an_offline_persistent_member() {
    let (_kit, b) = broker().await;
    let topic = format!("{}/x", unique("share"));
    let shared = format!("$share/g/{topic}");
    let id = unique("a");
    let (mut a, _) = V5::connected(b.addr, &id, Hello::session(60)).await;
    a.subscribe(&shared, QoS::AtLeastOnce).await;
    drop(a);
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"while away", None).await;
    p.publish(&topic, QoS::AtMostOnce, false, b"qos0 while away", None).await;
    // The session kept the membership: back, the member gets the QoS 1 message.
    let (mut a, ack) = V5::connected(b.addr, &id, Hello::resume(60)).await;
    assert!(ack.session_present);
    assert_eq!(&a.publish_in().await.payload[..], b"while away");
    // A clean start ends the membership; the group ends with its last session.
    let (mut a, _) = V5::connected(b.addr, &id, Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"after", None).await;
    // (had the old membership lived on, this subscription would take over what it kept)
    a.subscribe(&shared, QoS::AtLeastOnce).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"marker", None).await;
    assert_eq!(
        &a.publish_in().await.payload[..],
        b"marker",
        "nothing of the old membership arrived first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_refuse_bad_filters_and_no_local() {
    let (_kit, b) = broker().await;
    let (mut a, _) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    let codes = a
        .subscribe_with(
            vec![
                Filter::new("$share/g", QoS::AtLeastOnce),
                Filter::new("$share/g+/t", QoS::AtLeastOnce),
                Filter::new("$share/g/t", QoS::AtMostOnce),
            ],
            None,
        )
        .await
        .return_codes;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
    // MQTT-3.8.3-4: No Local on a shared subscription is a Protocol Error.
    let pkid = a.pkid();
    a.send(Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![filter("$share/g/t", true, false, RetainForwardRule::OnEverySubscribe)],
        properties: None,
    }))
    .await;
    match a.recv_within(WAIT).await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}

/// A broker whose router keeps about 1 KiB of each filter's messages (ten of 100 B).
async fn forgetful_broker() -> (SqliteKit, BrokerProc) {
    let kit = SqliteKit::new().await;
    let b = BrokerProc::start_metered(
        "sqlite",
        &kit.plugin_conf(),
        "mqtt.router_segment_size = 1024\nmqtt.router_segments = 1\n",
    );
    (kit, b)
}

/// Acks what arrives until the broker's DISCONNECT, which must be 0x97.
async fn acked_until_quota_disconnect(s: &mut V5, b: &BrokerProc) {
    loop {
        // The broker may close while an ack is on its way: a failed write is fine here.
        match s.recv_within(WAIT).await {
            Some(Packet::Publish(m)) => {
                s.try_send(Packet::PubAck(PubAck::new(m.pkid, None))).await;
            }
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::QuotaExceeded);
                return;
            }
            other => panic!("expected DISCONNECT 0x97, got {other:?}\n{}", b.log()),
        }
    }
}

/// A QoS 1 subscriber that fell behind by more than the router keeps of its filter is told,
/// never left to miss messages silently: DISCONNECT 0x97, and the loss is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_the_router_dropped_messages_for_is_disconnected_with_a_reason() {
    let (_kit, b) = forgetful_broker().await;
    let topic = format!("{}/t", unique("slow"));
    let (mut s, _) = V5::connected(b.addr, &unique("s"), Hello::default()).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    // The router sends 100 unacked; the rest waits in its log, which keeps only the newest.
    for _ in 0..300 {
        p.publish(&topic, QoS::AtLeastOnce, false, &[b'x'; 100], None).await;
    }
    let mut unacked = Vec::new();
    for _ in 0..100 {
        unacked.push(s.publish_in().await.pkid);
    }
    // Acked now, the router reads on from where this subscriber was: gone from its log.
    for pkid in unacked {
        s.try_send(Packet::PubAck(PubAck::new(pkid, None))).await;
    }
    acked_until_quota_disconnect(&mut s, &b).await;
    assert!(b.metric("mqtt_persist_router_lost_total").await >= 1);
}

/// With no rule that needs a message's id, acks still complete the router's deliveries: a
/// subscriber gets far more than the router's 100 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rules_a_subscriber_gets_every_qos1_message_past_the_routers_window() {
    let b = BrokerProc::start("sqlite", "backend.sqlite.pool1.path = data/none.db\n");
    let topic = format!("{}/t", unique("plain"));
    let (mut s, _) = V5::connected(b.addr, &unique("s"), Hello::default()).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    for i in 0..300u32 {
        p.publish(&topic, QoS::AtLeastOnce, false, &i.to_be_bytes(), None).await;
        let m = s.publish_in().await;
        assert_eq!(&m.payload[..], &i.to_be_bytes());
        s.puback(m.pkid).await;
    }
}

/// The same for a persistent session that was offline while the router dropped its messages:
/// back, it is told once (0x97), and the next connection goes on normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_back_from_offline_is_told_the_router_dropped_its_messages() {
    let (_kit, b) = forgetful_broker().await;
    let topic = format!("{}/t", unique("away"));
    let id = unique("s");
    let (mut s, _) = V5::connected(b.addr, &id, Hello::session(60)).await;
    s.subscribe(&topic, QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    p.publish(&topic, QoS::AtLeastOnce, false, b"before", None).await;
    let m = s.publish_in().await;
    s.puback(m.pkid).await;
    s.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    for _ in 0..300 {
        p.publish(&topic, QoS::AtLeastOnce, false, &[b'x'; 100], None).await;
    }
    let (mut s, ack) = V5::connected(b.addr, &id, Hello::resume(60)).await;
    assert!(ack.session_present);
    acked_until_quota_disconnect(&mut s, &b).await;
    assert!(b.metric("mqtt_persist_router_lost_total").await >= 100);
    // Told once: the session goes on.
    let (mut s, ack) = V5::connected(b.addr, &id, Hello::resume(60)).await;
    assert!(ack.session_present);
    p.publish(&topic, QoS::AtLeastOnce, false, b"after", None).await;
    loop {
        let m = s.publish_in().await;
        s.puback(m.pkid).await;
        if &m.payload[..] == b"after" {
            break;
        }
    }
}

/// Overlapping subscriptions: the router sends a copy per filter from each filter's own log,
/// which the gap check cannot tell apart; it must never take that for lost messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_filters_are_never_taken_for_lost_messages() {
    let (_kit, b) = broker().await;
    let root = unique("ov");
    let (mut s, _) = V5::connected(b.addr, &unique("s"), Hello::default()).await;
    s.subscribe(&format!("{root}/#"), QoS::AtLeastOnce).await;
    s.subscribe(&format!("{root}/+/x"), QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connected(b.addr, &unique("p"), Hello::default()).await;
    // Single-filter, double and single again: each filter's log moves on differently.
    let plan = [
        format!("{root}/c"),
        format!("{root}/k/x"),
        format!("{root}/k/x"),
        format!("{root}/c"),
        format!("{root}/c"),
    ];
    for t in &plan {
        p.publish(t, QoS::AtLeastOnce, false, t.as_bytes(), None).await;
    }
    p.publish(&format!("{root}/end"), QoS::AtLeastOnce, false, b"end", None).await;
    let mut got = 0;
    loop {
        match s.recv().await {
            Packet::Publish(m) => {
                s.puback(m.pkid).await;
                if &m.payload[..] == b"end" {
                    break;
                }
                got += 1;
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(got, 7, "one copy per matching filter, and no disconnect");
}

/// `mqtt.max_connections`: one connection more is refused in CONNACK (0x97), and a place
/// freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_in_connack() {
    let kit = SqliteKit::new().await;
    let b = BrokerProc::start_metered("sqlite", &kit.plugin_conf(), "mqtt.max_connections = 2\n");
    let (a, _) = V5::connected(b.addr, &unique("a"), Hello::default()).await;
    let (_c, _) = V5::connected(b.addr, &unique("c"), Hello::default()).await;
    let (_, ack) = V5::connect(b.addr, &unique("over"), Hello::default()).await;
    assert_eq!(ack.code, ConnectReturnCode::QuotaExceeded);
    a.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    // Freed once the broker counted the departure.
    for _ in 0..100 {
        if b.metric("mqtt_persist_connections").await < 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    V5::connected(b.addr, &unique("again"), Hello::default()).await;
}
