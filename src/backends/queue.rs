//! The per-pool write queue: bounded, batched, retried, with completion signals.
//!
//! Hooks push [`Job`]s without waiting on the database. One writer task per pool drains what is
//! queued into one batch (group commit), hands it to the backend, and retries transient
//! failures with exponential backoff and jitter while the queue absorbs new work. A job may
//! carry a [`Ticket`]; the ticket fires when every job holding it is done, which is how the
//! no-loss mode sends a PUBACK only after the message is committed.

use super::{Backend, WriteOp};
use crate::metrics::{PoolMetrics, RuleMetrics};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Fires `done(seq)` on the owning connection when the last clone is dropped.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    done: mpsc::UnboundedSender<u64>,
}

impl Ticket {
    pub fn new(seq: u64, done: mpsc::UnboundedSender<u64>) -> Arc<Ticket> {
        Arc::new(Ticket { seq, done })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.done.send(self.seq);
    }
}

pub struct Job {
    pub op: WriteOp,
    pub rule: Arc<RuleMetrics>,
    pub ticket: Option<Arc<Ticket>>,
    pub queued_at: Instant,
}

impl Job {
    pub fn new(op: WriteOp, rule: Arc<RuleMetrics>, ticket: Option<Arc<Ticket>>) -> Job {
        Job {
            op,
            rule,
            ticket,
            queued_at: Instant::now(),
        }
    }
}

/// The sending side, cloned into the dispatcher.
#[derive(Clone)]
pub struct WriteQueue {
    tx: mpsc::Sender<Job>,
    label: Arc<str>,
    pub metrics: Arc<PoolMetrics>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Enqueue {
    Queued,
    /// The queue was full (async mode) or closed; the job was dropped and counted.
    Dropped,
}

impl WriteQueue {
    /// Start the writer task for `backend`.
    pub fn spawn(backend: Arc<dyn Backend>, capacity: usize, batch_size: usize, linger: Duration) -> WriteQueue {
        let (tx, rx) = mpsc::channel(capacity);
        let label: Arc<str> = backend.label().into();
        let metrics = Arc::new(PoolMetrics {
            label: label.to_string(),
            ..Default::default()
        });
        metrics.connected.store(true, Relaxed);
        tokio::spawn(writer(backend, rx, batch_size, linger, metrics.clone()));
        WriteQueue { tx, label, metrics }
    }

    /// Waits for room: back-pressure for no-loss writes.
    pub async fn push(&self, job: Job) -> Enqueue {
        RuleMetrics::inc(&job.rule.queued);
        match self.tx.send(job).await {
            Ok(()) => Enqueue::Queued,
            Err(e) => {
                RuleMetrics::inc(&e.0.rule.dropped);
                Enqueue::Dropped
            }
        }
    }

    /// Never waits: a full queue drops the job, counted and logged (rate-limited).
    pub fn try_push(&self, job: Job) -> Enqueue {
        match self.tx.try_send(job) {
            Ok(()) => Enqueue::Queued,
            Err(e) => {
                let job = match e {
                    mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
                };
                RuleMetrics::inc(&job.rule.dropped);
                rate_limited_warn(&format!(
                    "write queue of {} is full: dropped a write of rule {}",
                    self.label, job.rule.label
                ));
                Enqueue::Dropped
            }
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Free slots left (for metrics and tests).
    pub fn room(&self) -> usize {
        self.tx.capacity()
    }
}

fn rate_limited_warn(msg: &str) {
    use std::sync::atomic::AtomicU64;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::hooks::now_ms() as u64;
    let last = LAST.load(Relaxed);
    if now.saturating_sub(last) >= 5000 && LAST.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
        tracing::warn!("{msg}");
    }
}

async fn writer(backend: Arc<dyn Backend>, mut rx: mpsc::Receiver<Job>, batch_size: usize, linger: Duration, metrics: Arc<PoolMetrics>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch_size);
    let mut ops: Vec<WriteOp> = Vec::with_capacity(batch_size);
    let mut outage: Option<Outage> = None;
    while rx.recv_many(&mut jobs, batch_size).await > 0 {
        // Group commit under light load: give a small batch a moment to grow, so a steady
        // trickle costs the database a few transactions per second instead of one per message.
        if jobs.len() < batch_size / 8 && !linger.is_zero() {
            let deadline = tokio::time::Instant::now() + linger;
            while jobs.len() < batch_size {
                let room = batch_size - jobs.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut jobs, room)).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        ops.extend(jobs.iter().map(|j| j.op.clone()));
        metrics.in_flight.store(jobs.len() as u64, Relaxed);
        metrics.queue_depth.store(rx.len() as u64, Relaxed);
        let mut delay = Duration::from_millis(50);
        loop {
            match backend.write(&ops).await {
                Ok(()) => {
                    if let Some(o) = outage.take() {
                        tracing::info!(
                            pool = backend.label(),
                            failures = o.failures,
                            secs = o.since.elapsed().as_secs_f32(),
                            "database is back; writes resumed"
                        );
                    }
                    metrics.connected.store(true, Relaxed);
                    for j in &jobs {
                        RuleMetrics::inc(&j.rule.success);
                        j.rule.observe(j.queued_at.elapsed());
                    }
                    break;
                }
                Err(e) if e.transient => {
                    let o = outage.get_or_insert_with(|| {
                        // Once per burst, not per message.
                        tracing::error!(pool = backend.label(), error = %e.message, "database write failed; retrying with backoff");
                        Outage {
                            since: Instant::now(),
                            failures: 0,
                        }
                    });
                    o.failures += 1;
                    metrics.connected.store(false, Relaxed);
                    tracing::debug!(pool = backend.label(), error = %e.message, failures = o.failures, "retrying a batch");
                    for j in &jobs {
                        RuleMetrics::inc(&j.rule.retried);
                    }
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The data was refused: isolate the bad op so the rest commits.
                    write_one_by_one(&*backend, &jobs, &e).await;
                    break;
                }
            }
        }
        ops.clear();
        jobs.clear(); // drops tickets: acks may go out now
        metrics.in_flight.store(0, Relaxed);
    }
}

struct Outage {
    since: Instant,
    failures: u64,
}

async fn write_one_by_one(backend: &dyn Backend, jobs: &[Job], first: &super::BackendError) {
    if jobs.len() == 1 {
        RuleMetrics::inc(&jobs[0].rule.failed);
        tracing::warn!(pool = backend.label(), rule = %jobs[0].rule.label, error = %first.message, "write refused by the database");
        return;
    }
    for j in jobs {
        let mut delay = Duration::from_millis(50);
        loop {
            match backend.write(std::slice::from_ref(&j.op)).await {
                Ok(()) => {
                    RuleMetrics::inc(&j.rule.success);
                    break;
                }
                Err(e) if e.transient => {
                    RuleMetrics::inc(&j.rule.retried);
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    RuleMetrics::inc(&j.rule.failed);
                    tracing::warn!(pool = backend.label(), rule = %j.rule.label, error = %e.message, "write refused by the database");
                    break;
                }
            }
        }
    }
}

/// ±25 % jitter without an RNG dependency.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let frac = 0.75 + (nanos % 1000) as f64 / 2000.0;
    d.mul_f64(frac)
}
