//! PostgreSQL specifics: how template values bind to the column types of user tables.

mod common;

use common::kits::{Kit, PgKit};
use common::*;
use rumqttc::QoS;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// SPEC §2.1: values convert to the parameter type the server reports, whatever the column
/// type, with prepared statements and without (`prepare = off`, for PgBouncer): numbers, text,
/// bytes, times, dates, floats, numeric, uuid, inet, interval, json and jsonb.
async fn every_common_column_type_binds(prepare: bool) {
    if skip("pgsql", "test") {
        return;
    }
    let kit = PgKit::new().await;
    kit.client()
        .batch_execute(
            "CREATE TABLE typed (id bigserial, k text, i2 int2, i4 int4, i8 int8, num numeric, f4 float4, f8 float8,
               b bool, t text, vc varchar(300), by bytea, tstz timestamptz, ts timestamp, d date, u uuid, ip inet,
               iv interval, jb jsonb, j json)",
        )
        .await
        .unwrap();
    let all = "insert into typed(k, i2, i4, i8, num, f4, f8, b, t, vc, by, tstz, ts, d, jb, j) values (${clientid}, ${qos}, ${qos}, ${msgid}, ${msgid}, ${qos}, ${timestamp}, ${retain}, ${payload}, ${topic}, ${payload}, ${timestamp}, ${timestamp}, ${timestamp}, ${payload}, ${payload})";
    let mut conf = kit.plugin_conf();
    if !prepare {
        conf.push_str("backend.pgsql.pool1.prepare = off\n");
    }
    let rule = |n: u32, topic: &str, sql: &str| {
        format!("backend.pgsql.hook.message.publish.{n} = {{\"topic\": \"{topic}\", \"action\": {{\"sql\": [\"{sql}\"]}}, \"pool\": \"pool1\"}}\n")
    };
    conf.push_str(&rule(20, "ty/all/#", all));
    for (n, col) in [(21, "u"), (22, "ip"), (23, "iv"), (24, "num"), (25, "f4"), (26, "b"), (27, "tstz")] {
        conf.push_str(&rule(
            n,
            &format!("ty/{col}/#"),
            &format!("insert into typed(k, {col}) values (${{clientid}}, ${{payload}})"),
        ));
    }
    let broker = BrokerProc::start("pgsql", &conf);
    let id = unique("typed");
    let p = connect(broker.addr, &id, true).await;
    let base = unique("");
    p.publish(&format!("ty/all/{base}"), QoS::AtLeastOnce, false, r#"{"a": 1}"#).await;
    for (col, v) in [
        ("u", "6f1c2e9a-5b7d-4c1e-9a3f-2b8d7e6c5a41"),
        ("ip", "10.1.2.3"),
        ("iv", "1 hour"),
        ("num", "12.5"),
        ("f4", "0.25"),
        ("b", "yes"),
        ("tstz", "2026-01-02 03:04:05+00"),
    ] {
        p.publish(&format!("ty/{col}/{base}"), QoS::AtLeastOnce, false, v).await;
    }
    let db = kit.client();
    eventually("8 typed rows", WAIT, || async {
        let n: i64 = db
            .query_one("SELECT count(*) FROM typed WHERE k = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        (n == 8).then_some(())
    })
    .await;
    let r = db
        .query_one(
            "SELECT i2::int8, i4::int8, i8, num::text, f4::float8, b, t, vc, by, (extract(epoch FROM tstz) * 1000)::int8,
                    (extract(epoch FROM ts) * 1000)::int8, d::text, jb->>'a', j::text, f8
             FROM typed WHERE k = $1 AND t IS NOT NULL",
            &[&id],
        )
        .await
        .unwrap();
    let msgid: i64 = db
        .query_one("SELECT msgid FROM mqtt_msg WHERE topic = $1", &[&format!("ty/all/{base}")])
        .await
        .unwrap()
        .get(0);
    let ts: f64 = r.get(14);
    let ts = ts as i64;
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (1, 1), "qos into int2/int4");
    assert_eq!(r.get::<_, i64>(2), msgid, "msgid into int8");
    assert_eq!(r.get::<_, String>(3), msgid.to_string(), "msgid into numeric");
    assert_eq!(r.get::<_, f64>(4), 1.0, "qos into float4");
    assert!(!r.get::<_, bool>(5), "retain into bool");
    assert_eq!(r.get::<_, String>(6), r#"{"a": 1}"#, "payload into text");
    assert_eq!(r.get::<_, String>(7), format!("ty/all/{base}"), "topic into varchar");
    assert_eq!(r.get::<_, Vec<u8>>(8), br#"{"a": 1}"#.to_vec(), "payload into bytea");
    assert_eq!((r.get::<_, i64>(9), r.get::<_, i64>(10)), (ts, ts), "ms into timestamptz/timestamp");
    let day = db
        .query_one(
            "SELECT (to_timestamp($1::float8 / 1000) AT TIME ZONE 'UTC')::date::text",
            &[&(ts as f64)],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(r.get::<_, String>(11), day, "ms into date");
    assert_eq!(r.get::<_, String>(12), "1", "payload into jsonb");
    assert_eq!(r.get::<_, String>(13), r#"{"a": 1}"#, "payload into json");
    let one = |sql: &'static str| {
        let id = id.clone();
        async move { db.query_one(sql, &[&id]).await.unwrap().get::<_, String>(0) }
    };
    assert_eq!(
        one("SELECT u::text FROM typed WHERE k = $1 AND u IS NOT NULL").await,
        "6f1c2e9a-5b7d-4c1e-9a3f-2b8d7e6c5a41"
    );
    assert_eq!(one("SELECT host(ip) FROM typed WHERE k = $1 AND ip IS NOT NULL").await, "10.1.2.3");
    assert_eq!(one("SELECT iv::text FROM typed WHERE k = $1 AND iv IS NOT NULL").await, "01:00:00");
    assert_eq!(
        one("SELECT num::text FROM typed WHERE k = $1 AND num IS NOT NULL AND t IS NULL").await,
        "12.5"
    );
    assert_eq!(
        one("SELECT f4::text FROM typed WHERE k = $1 AND f4 IS NOT NULL AND t IS NULL").await,
        "0.25"
    );
    assert_eq!(
        one("SELECT b::text FROM typed WHERE k = $1 AND b IS NOT NULL AND t IS NULL").await,
        "true"
    );
    assert_eq!(
        one("SELECT (extract(epoch FROM tstz))::int8::text FROM typed WHERE k = $1 AND tstz IS NOT NULL AND t IS NULL").await,
        "1767323045"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_common_column_type_binds_with_prepared_statements() {
    every_common_column_type_binds(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_common_column_type_binds_without_prepared_statements() {
    every_common_column_type_binds(false).await;
}
