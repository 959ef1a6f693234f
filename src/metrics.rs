//! Counters per rule and per pool, rendered in the Prometheus text format on `metrics.listen`.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Upper bounds (ms) of the write-latency histogram buckets (enqueue → commit).
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

#[derive(Debug, Default)]
pub struct RuleMetrics {
    pub label: String,
    pub matched: AtomicU64,
    pub success: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub retried: AtomicU64,
    pub queued: AtomicU64,
    latency: [AtomicU64; BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl RuleMetrics {
    pub fn new(label: String) -> Arc<Self> {
        Arc::new(RuleMetrics {
            label,
            ..Default::default()
        })
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// (writes observed, Σ enqueue → commit in µs).
    pub fn latency_totals(&self) -> (u64, u64) {
        let n = self.latency.iter().map(|c| c.load(Relaxed)).sum();
        (n, self.latency_sum_us.load(Relaxed))
    }

    /// Records one write's latency from enqueue to commit.
    pub fn observe(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        let i = BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(BUCKETS_MS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

/// Per-pool gauges, updated by the pool's writer.
#[derive(Debug, Default)]
pub struct PoolMetrics {
    pub label: String,
    pub connected: AtomicBool,
    /// Jobs the writer took from the queue and has not finished (pending and in flight).
    pub in_flight: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Database writes (batches, retries included), the ops they carried, the time they took,
    /// and that time weighted by ops (Σ duration × ops: what an op spent in the database).
    pub writes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_us: AtomicU64,
    pub write_op_us: AtomicU64,
}

impl PoolMetrics {
    pub fn observe_write(&self, d: Duration, ops: usize) {
        let us = d.as_micros() as u64;
        self.writes.fetch_add(1, Relaxed);
        self.write_ops.fetch_add(ops as u64, Relaxed);
        self.write_us.fetch_add(us, Relaxed);
        self.write_op_us.fetch_add(us * ops as u64, Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct BrokerMetrics {
    pub connections: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Records written to the dead-letter file.
    pub dead_lettered: AtomicU64,
    /// Messages a subscriber never got because it fell behind by more than the router keeps
    /// per filter (`mqtt.router_segment_size` × `mqtt.router_segments`).
    pub router_lost: AtomicU64,
}

/// Everything the `/metrics` endpoint shows.
#[derive(Default)]
pub struct Registry {
    pub broker: BrokerMetrics,
    pub rules: parking_lot::Mutex<Vec<Arc<RuleMetrics>>>,
    pub pools: parking_lot::Mutex<Vec<Weak<PoolMetrics>>>,
}

impl Registry {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let b = &self.broker;
        let _ = writeln!(
            out,
            "# TYPE mqtt_persist_connections gauge\nmqtt_persist_connections {}",
            b.connections.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE mqtt_persist_router_lost_total counter\nmqtt_persist_router_lost_total {}",
            b.router_lost.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE mqtt_persist_messages_in_total counter\nmqtt_persist_messages_in_total {}",
            b.messages_in.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE mqtt_persist_messages_out_total counter\nmqtt_persist_messages_out_total {}",
            b.messages_out.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE mqtt_persist_dead_letter_total counter\nmqtt_persist_dead_letter_total {}",
            b.dead_lettered.load(Relaxed)
        );
        for p in self.pools.lock().iter().filter_map(Weak::upgrade) {
            let _ = writeln!(
                out,
                "mqtt_persist_pool_connected{{pool=\"{}\"}} {}",
                p.label,
                u8::from(p.connected.load(Relaxed))
            );
            let _ = writeln!(
                out,
                "mqtt_persist_pool_in_use{{pool=\"{}\"}} {}",
                p.label,
                p.in_flight.load(Relaxed)
            );
            let _ = writeln!(
                out,
                "mqtt_persist_pool_queue_depth{{pool=\"{}\"}} {}",
                p.label,
                p.queue_depth.load(Relaxed)
            );
            let _ = writeln!(
                out,
                "mqtt_persist_pool_writes_total{{pool=\"{0}\"}} {1}\nmqtt_persist_pool_write_ops_total{{pool=\"{0}\"}} {2}\nmqtt_persist_pool_write_seconds_total{{pool=\"{0}\"}} {3}",
                p.label,
                p.writes.load(Relaxed),
                p.write_ops.load(Relaxed),
                p.write_us.load(Relaxed) as f64 / 1e6
            );
        }
        for r in self.rules.lock().iter() {
            for (name, v) in [
                ("matched", &r.matched),
                ("success", &r.success),
                ("failed", &r.failed),
                ("dropped", &r.dropped),
                ("retried", &r.retried),
                ("queued", &r.queued),
            ] {
                let _ = writeln!(out, "mqtt_persist_rule_{name}_total{{rule=\"{}\"}} {}", r.label, v.load(Relaxed));
            }
            let mut cum = 0;
            for (i, le) in BUCKETS_MS.iter().enumerate() {
                cum += r.latency[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "mqtt_persist_rule_write_latency_seconds_bucket{{rule=\"{}\",le=\"{}\"}} {cum}",
                    r.label,
                    *le as f64 / 1000.0
                );
            }
            cum += r.latency[BUCKETS_MS.len()].load(Relaxed);
            let _ = writeln!(
                out,
                "mqtt_persist_rule_write_latency_seconds_bucket{{rule=\"{}\",le=\"+Inf\"}} {cum}",
                r.label
            );
            let _ = writeln!(
                out,
                "mqtt_persist_rule_write_latency_seconds_sum{{rule=\"{}\"}} {}",
                r.label,
                r.latency_sum_us.load(Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "mqtt_persist_rule_write_latency_seconds_count{{rule=\"{}\"}} {cum}", r.label);
        }
        out
    }
}

/// Serves `GET /metrics` (any path) over plain HTTP/1.1.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let body = registry.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}
