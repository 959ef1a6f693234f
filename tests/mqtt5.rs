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
    let hello = Hello {
        clean_start: false,
        ..Hello::session(60)
    };
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
    let resume = Hello {
        clean_start: false,
        ..Hello::session(2)
    };
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
    let (c, ack) = V5::connected(
        b.addr,
        &id,
        Hello {
            clean_start: false,
            ..Hello::session(0)
        },
    )
    .await;
    assert!(ack.session_present);
    c.disconnect(DisconnectReasonCode::NormalDisconnection).await;
    let ack = eventually("the session to end", WAIT, || {
        let id = id.clone();
        async move {
            let (c, ack) = V5::connected(
                b.addr,
                &id,
                Hello {
                    clean_start: false,
                    ..Hello::session(0)
                },
            )
            .await;
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
    let (_c, ack) = V5::connected(
        b.addr,
        &id,
        Hello {
            clean_start: false,
            ..Hello::session(60)
        },
    )
    .await;
    assert!(ack.session_present, "the new session was kept");
}
