//! Counters per rule and per pool, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct RuleMetrics {
    pub label: String,
    pub matched: AtomicU64,
    pub success: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub retried: AtomicU64,
    pub queued: AtomicU64,
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
}

#[derive(Debug, Default)]
pub struct BrokerMetrics {
    pub connections: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

/// Everything the `/metrics` endpoint shows.
#[derive(Default)]
pub struct Registry {
    pub broker: BrokerMetrics,
    pub rules: parking_lot::Mutex<Vec<Arc<RuleMetrics>>>,
}

impl Registry {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let b = &self.broker;
        let _ = writeln!(out, "mqtt_persist_connections {}", b.connections.load(Relaxed));
        let _ = writeln!(out, "mqtt_persist_messages_in_total {}", b.messages_in.load(Relaxed));
        let _ = writeln!(out, "mqtt_persist_messages_out_total {}", b.messages_out.load(Relaxed));
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
        }
        out
    }
}
