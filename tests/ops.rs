//! Operations: hot reload, the metrics endpoint, graceful shutdown, storage priority
//! (message TTL cleanup is in the conformance suite, for every backend).

mod common;

use common::kits::{Kit, SqliteKit};
use common::*;
use rumqttc::QoS;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn plugin_path(b: &BrokerProc) -> std::path::PathBuf {
    b.dir.path().join("etc/plugins/emqx_backend_sqlite.conf")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_conf_keeps_the_old_rules_and_names_file_and_line() {
    let kit = SqliteKit::new().await;
    let broker = BrokerProc::start("sqlite", &kit.plugin_conf());
    let p = connect(broker.addr, &unique("pub"), true).await;
    let good = kit.plugin_conf();
    std::fs::write(
        plugin_path(&broker),
        format!(
            "{good}backend.sqlite.hook.message.publish.20 = {{\"action\": {{\"function\": \"on_mesage_store\"}}, \"pool\": \"pool1\"}}\n"
        ),
    )
    .unwrap();
    broker.signal("-HUP");
    eventually("reload rejected", WAIT, || async {
        broker.log().contains("reload rejected").then_some(())
    })
    .await;
    let line = good.lines().count() + 1;
    assert!(
        broker
            .log()
            .contains(&format!("emqx_backend_sqlite.conf:{line}: unknown function `on_mesage_store`")),
        "{}",
        broker.log()
    );
    // The old rules still run, on the existing connection.
    let t = format!("{}/still", unique("rl"));
    p.publish(&t, QoS::AtLeastOnce, false, "x").await;
    eventually("stored by the old rules", WAIT, || async {
        (kit.stored_count(&t).await == 1).then_some(())
    })
    .await;
    // A good change applies to the same connection's next events: QoS0 now stored too.
    std::fs::write(plugin_path(&broker), format!("{good}backend.sqlite.hook.message.publish.20 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_store\"}}, \"pool\": \"pool1\"}}\n")).unwrap();
    let out = Command::new(bin())
        .args(["reload", "--etc"])
        .arg(broker.dir.path().join("etc"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("reloaded", WAIT, || async {
        broker.log().contains("configuration reloaded").then_some(())
    })
    .await;
    let t0 = format!("{}/qos0", unique("rl"));
    p.publish(&t0, QoS::AtMostOnce, false, "zero").await;
    p.publish(&t0, QoS::AtLeastOnce, false, "flush").await;
    eventually("QoS0 stored by the new rule", WAIT, || async {
        (kit.stored_count(&t0).await >= 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_rules_pools_and_connections() {
    let kit = SqliteKit::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let broker = BrokerProc::start_with("sqlite", &kit.plugin_conf(), &format!("metrics.listen = 127.0.0.1:{port}"));
    let p = connect(broker.addr, &unique("pub"), true).await;
    let t = format!("{}/m", unique("met"));
    for _ in 0..3 {
        p.publish(&t, QoS::AtLeastOnce, false, "x").await;
    }
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 3).then_some(()) }).await;
    let body = metrics_text(port).await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("mqtt_persist_connections 1"), "{body}");
    assert!(body.contains("mqtt_persist_pool_connected{pool=\"sqlite:pool1\"} 1"), "{body}");
    let success = body
        .lines()
        .find(|l| l.starts_with("mqtt_persist_rule_success_total{rule=\"sqlite.hook.message.publish.1\"}"))
        .unwrap_or_else(|| panic!("{body}"));
    assert!(success.ends_with(" 3"), "{success}");
    assert!(
        body.contains("mqtt_persist_rule_write_latency_seconds_count{rule=\"sqlite.hook.message.publish.1\"} 3"),
        "{body}"
    );
    // A reload keeps the counters of rules that survive it: the series continues at 4, not 1.
    broker.signal("-HUP");
    eventually("reloaded", WAIT, || async {
        broker.log().contains("configuration reloaded").then_some(())
    })
    .await;
    p.publish(&t, QoS::AtLeastOnce, false, "x").await;
    eventually("stored after the reload", WAIT, || async {
        (kit.stored_count(&t).await == 4).then_some(())
    })
    .await;
    let rule_success = "mqtt_persist_rule_success_total{rule=\"sqlite.hook.message.publish.1\"} ";
    eventually("the success counter continued across the reload", WAIT, || async {
        let body = metrics_text(port).await;
        body.lines().any(|l| l == format!("{rule_success}4")).then_some(())
    })
    .await;
}

/// SIGTERM with a non-empty write queue: every acked message is stored before the exit. The
/// test holds SQLite's write lock, so the broker's writer waits on it (its busy timeout is
/// longer than the test) while a burst of QoS 1 publishes is acked (`no_loss = off`: acks do
/// not wait for storage) and queued; nothing is stored when the signal arrives; the lock goes
/// only after the broker has begun shutting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_queued_writes_and_exits_cleanly() {
    let kit = SqliteKit::new().await;
    let conf = format!("{}backend.sqlite.pool1.busy_timeout = 60000\n", kit.plugin_conf());
    let mut broker = BrokerProc::start_with("sqlite", &conf, "persist.no_loss = off");
    let id = unique("pub");
    let (client, mut acks) = acking_client(broker.port(), &id);
    eventually("the publisher's connect stored", WAIT, || async {
        (kit.client_state(&id).await == Some(1)).then_some(())
    })
    .await;
    let lock = kit.conn();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let t = format!("{}/term", unique("term"));
    let n = 2000;
    for i in 0..n {
        client.publish(&t, QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    tokio::time::timeout(WAIT, acks.wait_for(|a| *a >= n))
        .await
        .expect("every PUBACK while the database is locked")
        .unwrap();
    assert_eq!(
        kit.stored_count(&t).await,
        0,
        "written before the signal: the drain would have nothing to do"
    );
    broker.signal("-TERM");
    eventually("shutdown begun", WAIT, || async {
        broker
            .log()
            .contains("shutting down: no new connections, draining write queues")
            .then_some(())
    })
    .await;
    lock.execute_batch("ROLLBACK").unwrap();
    assert_eq!(broker.wait_exit(Duration::from_secs(15)), Some(true), "{}", broker.log());
    assert_eq!(
        kit.stored_count(&t).await,
        n as i64,
        "acked messages lost at shutdown:\n{}",
        broker.log()
    );
    assert!(!broker.log().contains("dropped"), "{}", broker.log());
}

/// A QoS 1 publisher whose count of PUBACKs received is on the returned channel.
fn acking_client(port: u16, id: &str) -> (rumqttc::AsyncClient, tokio::sync::watch::Receiver<usize>) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(u16::MAX);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10_000);
    let (tx, acks) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev {
                tx.send_modify(|n| *n += 1);
            }
        }
    });
    (client, acks)
}

/// Nice values of the broker process's threads with this name.
fn thread_nice(pid: u32, name: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
        // After "pid (comm) ", field 3 (state) comes first; nice is field 19.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        out.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_storage_priority_lowers_only_the_database_threads() {
    let kit = SqliteKit::new().await;
    let broker = BrokerProc::start_with("sqlite", &kit.plugin_conf(), "persist.storage_priority = low");
    // A new thread names (and renices) itself once it runs: wait for that, not for a moment.
    let pid = broker.pid();
    eventually("storage threads at nice 10", WAIT, || async {
        let store = thread_nice(pid, "mqtt-store");
        (!store.is_empty() && store.iter().all(|n| *n == 10)).then_some(())
    })
    .await;
    let conn = eventually("named connection threads", WAIT, || async {
        Some(thread_nice(pid, "mqtt-conn")).filter(|c| !c.is_empty())
    })
    .await;
    assert!(conn.iter().all(|n| *n == 0), "connection threads: {conn:?}");
    // And storage still works at that priority.
    let p = connect(broker.addr, &unique("pub"), true).await;
    let t = format!("{}/low", unique("prio"));
    p.publish(&t, QoS::AtLeastOnce, false, "x").await;
    eventually("stored", WAIT, || async { (kit.stored_count(&t).await == 1).then_some(()) }).await;
    let normal = BrokerProc::start("sqlite", &kit.plugin_conf());
    let store = eventually("named storage threads", WAIT, || async {
        Some(thread_nice(normal.pid(), "mqtt-store")).filter(|s| !s.is_empty())
    })
    .await;
    assert!(store.iter().all(|n| *n == 0), "default: {store:?}");
}
