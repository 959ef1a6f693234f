//! A pool's circuit breaker, shared by its writer and by the reads of subscribe/connect rules.
//!
//! Closed: everything goes to the database. The first transient failure (an error worth
//! retrying, or an operation that outlived its timeout) opens it. Open: the writer stops
//! resending batches and probes with the backend's cheap `ping` on a backoff schedule; reads
//! fail at once instead of each waiting for its timeout (a subscriber gets its live traffic now
//! and its stored messages on a later subscription), and once per backoff interval a read
//! starts a background ping instead, so the circuit closes even when nothing is written.
//! Any success closes the circuit.

use crate::metrics::PoolMetrics;
use parking_lot::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first probe interval after the circuit opens; it doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Closed: read.
    Go,
    /// Open: fail the read now.
    Skip,
    /// Open, and a probe is due: fail the read now and ping in the background, reporting the
    /// outcome with [`Health::succeeded`] / [`Health::failed`].
    Probe,
}

pub struct Health {
    metrics: Arc<PoolMetrics>,
    state: Mutex<State>,
}

struct State {
    open: bool,
    backoff: Duration,
    next_probe: Instant,
}

impl Health {
    pub fn new(metrics: Arc<PoolMetrics>) -> Health {
        metrics.connected.store(true, Relaxed);
        Health {
            metrics,
            state: Mutex::new(State {
                open: false,
                backoff: MIN_BACKOFF,
                next_probe: Instant::now(),
            }),
        }
    }

    /// Whether a read may go to the database now.
    pub fn admit(&self) -> Admit {
        let mut s = self.state.lock();
        if !s.open {
            return Admit::Go;
        }
        let now = Instant::now();
        if now < s.next_probe {
            return Admit::Skip;
        }
        s.next_probe = now + jitter(s.backoff);
        Admit::Probe
    }

    /// The database answered. True when this closed an open circuit.
    pub fn succeeded(&self) -> bool {
        let mut s = self.state.lock();
        self.metrics.connected.store(true, Relaxed);
        let was_open = s.open;
        s.open = false;
        s.backoff = MIN_BACKOFF;
        was_open
    }

    /// A transient failure: open the circuit, or back off further if it already was.
    /// Returns the wait before the next probe.
    pub fn failed(&self) -> Duration {
        let mut s = self.state.lock();
        self.metrics.connected.store(false, Relaxed);
        if s.open {
            s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
        } else {
            s.open = true;
            s.backoff = MIN_BACKOFF;
        }
        let wait = jitter(s.backoff);
        s.next_probe = Instant::now() + wait;
        wait
    }
}

/// ±25 % jitter without an RNG dependency, so many pools or brokers don't probe in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let frac = 0.75 + (nanos % 1000) as f64 / 2000.0;
    d.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_admits_one_probe_per_interval_and_closes_on_success() {
        let m = Arc::new(PoolMetrics::default());
        let h = Health::new(m.clone());
        assert!(h.admit() == Admit::Go && h.admit() == Admit::Go, "closed: every read goes through");
        let wait = h.failed();
        assert!(wait >= MIN_BACKOFF.mul_f64(0.75) && wait <= MIN_BACKOFF.mul_f64(1.25));
        assert!(!m.connected.load(Relaxed), "open: the pool shows as disconnected");
        assert_eq!(h.admit(), Admit::Skip, "open: reads fail fast until the probe is due");
        std::thread::sleep(wait + Duration::from_millis(5));
        assert_eq!(h.admit(), Admit::Probe, "one probe once the interval passed");
        assert_eq!(h.admit(), Admit::Skip, "and only one");
        let second = h.failed();
        assert!(second > wait, "backoff grows while the database stays down");
        assert!(h.succeeded(), "a success closes the circuit");
        assert!(m.connected.load(Relaxed) && h.admit() == Admit::Go);
        assert!(!h.succeeded(), "closing a closed circuit reports nothing");
    }
}
