//! Rate-limited warnings: an outage must not flood the log.

use std::sync::atomic::Ordering::Relaxed;

/// A warning logged at most once per 5 s (an outage would otherwise flood the log); one
/// `static` per kind of warning, so one kind never hides another.
pub struct RateLimited(std::sync::atomic::AtomicU64, u64);

impl RateLimited {
    pub const fn new() -> RateLimited {
        Self::every(5000)
    }

    /// At most once per `ms` milliseconds.
    pub const fn every(ms: u64) -> RateLimited {
        RateLimited(std::sync::atomic::AtomicU64::new(0), ms)
    }

    pub fn warn(&self, msg: impl FnOnce() -> String) {
        let now = crate::model::now_ms() as u64;
        let last = self.0.load(Relaxed);
        if now.saturating_sub(last) >= self.1 && self.0.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            tracing::warn!("{}", msg());
        }
    }
}

impl Default for RateLimited {
    fn default() -> Self {
        Self::new()
    }
}
