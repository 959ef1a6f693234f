//! Redis specifics: the control channel, the key layout, binary-safe custom commands.

mod common;

use common::kits::{Kit, RedisKit};
use common::*;
use rumqttc::QoS;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_subscribes_a_live_client() {
    if skip("redis", "test") {
        return;
    }
    let kit = RedisKit::new().await;
    let channel = unique("chan");
    let conf = format!("{}backend.redis.pool1.channel = {channel}\n", kit.plugin_conf());
    let broker = BrokerProc::start("redis", &conf);
    eventually("control channel up", WAIT, || async {
        broker.log().contains("listening on the control channel").then_some(())
    })
    .await;
    let id = unique("dev");
    let topic = format!("{}/cmd", unique("ctl"));
    let mut c = connect(broker.addr, &id, true).await;
    // Bad JSON is logged and ignored; the good command subscribes the client.
    let _: i64 = kit.cmd(redis::cmd("PUBLISH").arg(&channel).arg("{not json")).await;
    let cmd = format!(r#"{{"type":"subscribe","topic":"{topic}","clientid":"{id}","qos":"1"}}"#);
    let _: i64 = kit.cmd(redis::cmd("PUBLISH").arg(&channel).arg(cmd)).await;
    let p = connect(broker.addr, &unique("pub"), true).await;
    // The subscribe is asynchronous: publish until the client gets one (bounded by WAIT).
    let deadline = std::time::Instant::now() + WAIT;
    let got = loop {
        p.publish(&topic, QoS::AtLeastOnce, false, "go").await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), c.rx.recv()).await {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "the control subscribe never took effect");
    };
    assert_eq!(&got.payload[..], b"go");
    assert!(broker.log().contains("ignoring a bad control message"), "{}", broker.log());
    let unsub = format!(r#"{{"type":"unsubscribe","topic":"{topic}","clientid":"{id}"}}"#);
    let _: i64 = kit.cmd(redis::cmd("PUBLISH").arg(&channel).arg(unsub)).await;
    // The unsubscribe is asynchronous too: once a round's marker (on a topic the client
    // subscribed itself) arrives with nothing on the unsubscribed topic before it, it took
    // effect; later rounds must stay that way.
    let marker = format!("{topic}-marker");
    c.subscribe_acked(&marker, QoS::AtLeastOnce).await;
    let deadline = std::time::Instant::now() + WAIT;
    let mut quiet = 0;
    while quiet < 3 {
        p.publish(&topic, QoS::AtLeastOnce, false, "stop").await;
        p.publish(&marker, QoS::AtLeastOnce, false, "marker").await;
        let mut stray = false;
        loop {
            let m = c.next(WAIT).await;
            if m.topic == marker {
                break;
            }
            stray = true;
        }
        if stray {
            assert_eq!(quiet, 0, "a message after the unsubscribe had taken effect");
            assert!(std::time::Instant::now() < deadline, "the control unsubscribe never took effect");
        } else {
            quiet += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_messages_follow_the_emqx_key_layout_with_exact_ordering() {
    if skip("redis", "test") {
        return;
    }
    let kit = RedisKit::new().await;
    let conf = kit.plugin_conf().replace(
        r#""function": "on_message_publish"}, "pool""#,
        r#""function": "on_message_publish"}, "expired_time": 600, "pool""#,
    );
    let broker = BrokerProc::start("redis", &conf);
    let topic = format!("{}/t", unique("lay"));
    let p = connect(broker.addr, &unique("pub"), true).await;
    for i in 0..3 {
        p.publish(&topic, QoS::AtLeastOnce, false, format!("v{i}")).await;
    }
    eventually("3 stored", WAIT, || async { (kit.stored_count(&topic).await == 3).then_some(()) }).await;
    let ids: Vec<String> = kit
        .cmd(redis::cmd("ZRANGEBYLEX").arg(format!("mqtt:msg:{topic}")).arg("-").arg("+"))
        .await;
    assert!(ids.iter().all(|i| i.len() == 20), "zero-padded ids: {ids:?}");
    let nums: Vec<u64> = ids.iter().map(|i| i.parse().unwrap()).collect();
    assert!(
        nums.windows(2).all(|w| w[0] < w[1]) && nums[0] > (1u64 << 53),
        "ordered ids above 2^53: {nums:?}"
    );
    let key = format!("mqtt:msg:{}", nums[2]);
    let fields: std::collections::HashMap<String, Vec<u8>> = kit.cmd(redis::cmd("HGETALL").arg(&key)).await;
    assert_eq!(fields.get("payload").map(|v| &v[..]), Some(&b"v2"[..]));
    assert_eq!(fields.get("topic").map(|v| &v[..]), Some(topic.as_bytes()));
    assert_eq!(fields.get("retain").map(|v| &v[..]), Some(&b"false"[..]));
    let ttl: i64 = kit.cmd(redis::cmd("TTL").arg(&key)).await;
    assert!(ttl > 500 && ttl <= 600, "expired_time is the TTL: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_with_spaces_cannot_add_command_arguments() {
    if skip("redis", "test") {
        return;
    }
    let kit = RedisKit::new().await;
    let hash = unique("h");
    let conf = format!(
        "{}backend.redis.hook.message.publish.10 = {{\"topic\": \"inj/#\", \"action\": {{\"commands\": [\"HSET {hash}:${{clientid}} f ${{payload}}\"]}}, \"pool\": \"pool1\"}}\n",
        kit.pool_conf()
    );
    let broker = BrokerProc::start("redis", &conf);
    let id = format!("{} extra1 x extra2 y", unique("a"));
    let p = connect(broker.addr, &id, true).await;
    p.publish("inj/x", QoS::AtLeastOnce, false, "v w\r\n*3\r\n").await;
    let key = format!("{hash}:{id}");
    let fields: std::collections::HashMap<String, Vec<u8>> = eventually("hash written", WAIT, || async {
        let m: std::collections::HashMap<String, Vec<u8>> = kit.cmd(redis::cmd("HGETALL").arg(&key)).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(fields.len(), 1, "exactly one field: {fields:?}");
    assert_eq!(fields["f"], b"v w\r\n*3\r\n".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_pool_writes_to_the_master_the_sentinel_names() {
    if skip("redis", "test") {
        return;
    }
    let master = common::servers::RedisServer::start();
    let sentinel = common::servers::SentinelServer::start(master.port, "mp-master");
    let conf = format!(
        "backend.redis.pool1.type = sentinel\nbackend.redis.pool1.server = 127.0.0.1:{}\nbackend.redis.pool1.sentinel = mp-master\n\
         backend.redis.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n",
        sentinel.port
    );
    let broker = BrokerProc::start("redis", &conf);
    let p = connect(broker.addr, &unique("pub"), true).await;
    let topic = format!("{}/s", unique("sent"));
    p.publish(&topic, QoS::AtLeastOnce, false, "via sentinel").await;
    let on_master = common::kits::redis_connect(&master.url()).await;
    let key = format!("mqtt:msg:{topic}");
    eventually("the message stored on the master", WAIT, || {
        let (mut c, key) = (on_master.clone(), &key);
        async move {
            let n: i64 = redis::cmd("ZCARD").arg(key).query_async(&mut c).await.unwrap();
            (n == 1).then_some(())
        }
    })
    .await;
}

/// The `message_ttl` cleanup deletes in chunks of 1000 (one reply or pipeline per million old
/// messages would stall the server): 2500 old messages of one topic all go, hashes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ttl_cleanup_deletes_more_than_one_chunk() {
    if skip("redis", "test") {
        return;
    }
    let kit = RedisKit::alone().await;
    let broker = BrokerProc::start("redis", &format!("{}backend.redis.message_ttl = 4s\n", kit.plugin_conf()));
    let p = connect(broker.addr, &unique("pub"), true).await;
    let t = format!("{}/ttl", unique("chunks"));
    for i in 0..2500 {
        p.publish(&t, QoS::AtLeastOnce, false, format!("{i}")).await;
    }
    eventually("2500 stored", WAIT, || async { (kit.stored_count(&t).await == 2500).then_some(()) }).await;
    eventually("all deleted after the TTL", WAIT, || async {
        (kit.stored_count(&t).await == 0).then_some(())
    })
    .await;
    let hashes: Vec<String> = kit.cmd(redis::cmd("KEYS").arg("mqtt:msg:[0-9]*")).await;
    assert!(hashes.is_empty(), "{} message hashes left", hashes.len());
}

/// SPEC §1.4: `expired_time` is the retained key's TTL too; and the retained upsert is
/// monotonic like the SQL backends': an older message (a replay) never replaces a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_carry_expired_time_and_never_go_back_to_an_older_message() {
    if skip("redis", "test") {
        return;
    }
    let kit = RedisKit::new().await;
    let conf = format!(
        "{}backend.redis.hook.message.publish.2 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_retain\"}}, \"expired_time\": 60, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let broker = BrokerProc::start("redis", &conf);
    let p = connect(broker.addr, &unique("pub"), true).await;
    let topic = format!("{}/r", unique("rt"));
    p.publish(&topic, QoS::AtLeastOnce, true, "v1").await;
    eventually("retained", WAIT, || async { kit.retained(&topic).await }).await;
    let ttl: i64 = kit.cmd(redis::cmd("TTL").arg(format!("mqtt:retain:{topic}"))).await;
    assert!((1..=60).contains(&ttl), "TTL {ttl}");
    // A newer message is stored (as after a replay reordered writes): an older one must not win.
    let newer = u64::MAX / 2;
    let _: () = kit
        .cmd(
            redis::cmd("HSET")
                .arg(format!("mqtt:retain:{topic}"))
                .arg("id")
                .arg(newer)
                .arg("payload")
                .arg("newer"),
        )
        .await;
    p.publish(&topic, QoS::AtLeastOnce, true, "older").await;
    let other = format!("{topic}/x");
    p.publish(&other, QoS::AtLeastOnce, true, "after").await;
    eventually("the later write landed", WAIT, || async { kit.retained(&other).await }).await;
    assert_eq!(kit.retained(&topic).await.as_deref(), Some(&b"newer"[..]));
}

/// SPEC §2.1: the commands of a list run in order; a refused one is logged and counted and the
/// next runs; nothing runs twice, and one client's writes keep their order across rules,
/// whether a list has the leading "pipeline" element or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_in_a_list_is_skipped_and_every_other_runs_once_in_order() {
    if skip("redis", "test") {
        return;
    }
    let kit = RedisKit::new().await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Each RPUSH adds a tag and the payload; INCRBY refuses a payload that is not a number.
    let conf = format!(
        "{}backend.redis.hook.message.publish.10 = {{\"topic\": \"multi/#\", \"action\": {{\"commands\": [\"RPUSH t:${{clientid}} a ${{payload}}\", \"INCRBY n:${{clientid}} ${{payload}}\", \"RPUSH t:${{clientid}} b ${{payload}}\"]}}, \"pool\": \"pool1\"}}\n\
         backend.redis.hook.message.publish.11 = {{\"topic\": \"multi/#\", \"action\": {{\"commands\": [\"pipeline\", \"RPUSH t:${{clientid}} p ${{payload}}\", \"INCRBY m:${{clientid}} ${{payload}}\"]}}, \"pool\": \"pool1\"}}\n",
        kit.plugin_conf()
    );
    let broker = BrokerProc::start_with("redis", &conf, &format!("metrics.listen = 127.0.0.1:{metrics_port}\n"));
    let id = unique("multi");
    let p = connect(broker.addr, &id, true).await;
    let topic = format!("multi/{}", unique("x"));
    for payload in ["x", "5", "1"] {
        p.publish(&topic, QoS::AtLeastOnce, false, payload).await;
    }
    let want: Vec<&str> = [
        "a", "x", "b", "x", "p", "x", "a", "5", "b", "5", "p", "5", "a", "1", "b", "1", "p", "1",
    ]
    .to_vec();
    // The counters are written last: once they show the last message, every row is in.
    eventually("the last message's writes", WAIT, || async {
        let m: Option<i64> = kit.cmd(redis::cmd("GET").arg(format!("m:{id}"))).await;
        (m == Some(6)).then_some(())
    })
    .await;
    let rows: Vec<String> = kit
        .custom_rows(&id)
        .await
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(rows, want, "in order, each once");
    let n: i64 = kit.cmd(redis::cmd("GET").arg(format!("n:{id}"))).await;
    assert_eq!(n, 6, "the numeric payloads were added once each");
    let text = metrics_text(metrics_port).await;
    for rule in ["redis.hook.message.publish.10", "redis.hook.message.publish.11"] {
        assert!(
            text.contains(&format!("mqtt_persist_rule_failed_total{{rule=\"{rule}\"}} 1")),
            "{text}"
        );
    }
    for key in [format!("t:{id}"), format!("n:{id}"), format!("m:{id}")] {
        let _: () = kit.cmd(redis::cmd("DEL").arg(key)).await;
    }
}
