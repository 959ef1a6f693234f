//! Database outages while the broker runs, against throwaway server instances.

mod common;

use common::servers::PgServer;
use common::*;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

fn pg_conf(port: u16) -> String {
    format!(
        "backend.pgsql.pool1.server = 127.0.0.1:{port}\nbackend.pgsql.pool1.username = root\nbackend.pgsql.pool1.database = postgres\nbackend.pgsql.pool1.pool_size = 2\nbackend.pgsql.pool1.auto_create_schema = on\nbackend.pgsql.pool1.connect_timeout = 1000\n\
         backend.pgsql.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_kill_loses_no_acknowledged_message_and_drops_no_client() {
    if skipped("pgsql") {
        eprintln!("SKIPPED: pgsql fault test (MQTT_PERSIST_SKIP)");
        return;
    }
    let pg = PgServer::start();
    let broker = BrokerProc::start("pgsql", &pg_conf(pg.port));
    let topic = unique("fault/");
    let mut o = MqttOptions::new(unique("steady"), "127.0.0.1", broker.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_inflight(1000);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 2000);
    let (acks_tx, mut acks_rx) = tokio::sync::watch::channel(0u64);
    let driver = tokio::spawn(async move {
        let mut acks = 0u64;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks += 1;
                    let _ = acks_tx.send(acks);
                }
                Ok(_) => {}
                Err(e) => return Err::<(), String>(format!("client connection failed after {acks} acks: {e}")),
            }
        }
    });
    // Publish at a steady ~100 msg/s for 16 s; PostgreSQL dies at 3 s and is back at 13 s.
    let start = Instant::now();
    let mut sent = 0u64;
    let mut killed = false;
    let mut resumed = false;
    while start.elapsed() < Duration::from_secs(16) {
        if !killed && start.elapsed() > Duration::from_secs(3) {
            pg.kill();
            killed = true;
        }
        if killed && !resumed && start.elapsed() > Duration::from_secs(13) {
            pg.resume();
            resumed = true;
        }
        client
            .publish(format!("{topic}/{}", sent % 7), QoS::AtLeastOnce, false, format!("m{sent}"))
            .await
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!driver.is_finished(), "the publisher was disconnected");
    let acked = tokio::time::timeout(Duration::from_secs(30), acks_rx.wait_for(|a| *a >= sent))
        .await
        .expect("all PUBACKs within 30 s of recovery")
        .map(|a| *a)
        .unwrap();
    assert!(!driver.is_finished(), "the publisher was disconnected");
    let db = pg_connect(&pg.url().parse().unwrap()).await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM mqtt_msg WHERE topic LIKE $1", &[&format!("{topic}/%")])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as u64, acked, "rows in mqtt_msg = PUBACKs received");
    assert_eq!(acked, sent);
    let log = broker.log();
    let failures = log.matches("database write failed").count();
    assert_eq!(failures, 1, "one error per outage, not per message:\n{log}");
    assert!(log.contains("database is back"), "{log}");
}

async fn pg_connect(cfg: &tokio_postgres::Config) -> tokio_postgres::Client {
    common::kits::pg_connect(cfg).await
}
