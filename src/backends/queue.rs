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
    pub fn spawn(backend: Arc<dyn Backend>, capacity: usize, batch_size: usize, linger: Duration, spool: Option<Spool>) -> WriteQueue {
        let (tx, rx) = mpsc::channel(capacity);
        let label: Arc<str> = backend.label().into();
        let metrics = Arc::new(PoolMetrics {
            label: label.to_string(),
            ..Default::default()
        });
        metrics.connected.store(true, Relaxed);
        tokio::spawn(writer(backend, rx, batch_size, linger, metrics.clone(), spool));
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

async fn writer(
    backend: Arc<dyn Backend>,
    mut rx: mpsc::Receiver<Job>,
    batch_size: usize,
    linger: Duration,
    metrics: Arc<PoolMetrics>,
    mut spool: Option<Spool>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch_size);
    let mut ops: Vec<WriteOp> = Vec::with_capacity(batch_size);
    let mut outage: Option<Outage> = None;
    let mut replay_delay = Duration::from_millis(200);
    loop {
        let spooling = spool.as_ref().is_some_and(Spool::pending);
        if spooling {
            // Writes wait on disk: replay them (in order, before anything newer) once the
            // database answers; meanwhile new writes join the spool.
            if try_replay(&*backend, spool.as_mut().expect("pending spool")).await {
                tracing::info!(pool = backend.label(), "spooled writes replayed");
                outage = None;
                metrics.connected.store(true, Relaxed);
                replay_delay = Duration::from_millis(200);
            } else {
                metrics.connected.store(false, Relaxed);
            }
        }
        let spooling = spool.as_ref().is_some_and(Spool::pending);
        let received = if spooling {
            match tokio::time::timeout(jitter(replay_delay), rx.recv_many(&mut jobs, batch_size)).await {
                Ok(n) => n,
                Err(_) => {
                    replay_delay = (replay_delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        } else {
            rx.recv_many(&mut jobs, batch_size).await
        };
        if received == 0 {
            return; // every sender is gone: the pool was replaced or the broker stops
        }
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
            if spool.as_ref().is_some_and(Spool::pending) && spool_jobs(&*backend, spool.as_mut().expect("pending spool"), &ops, &jobs) {
                break;
            }
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
                    // With a spool, the batch goes to disk and its acks go out now.
                    if let Some(sp) = spool.as_mut() {
                        if spool_jobs(&*backend, sp, &ops, &jobs) {
                            break;
                        }
                    }
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

/// Appends a batch to the spool; true when it is safely on disk (its acks may go out).
fn spool_jobs(backend: &dyn Backend, sp: &mut Spool, ops: &[WriteOp], jobs: &[Job]) -> bool {
    match sp.append(ops) {
        Ok(true) => {
            for j in jobs {
                RuleMetrics::inc(&j.rule.queued);
            }
            true
        }
        Ok(false) => {
            rate_limited_warn(&format!(
                "spool of {} is full ({} bytes): holding writes in memory",
                backend.label(),
                sp.max_bytes
            ));
            false
        }
        Err(e) => {
            rate_limited_warn(&format!("spool of {} failed: {e}", backend.label()));
            false
        }
    }
}

/// Writes every spooled batch in order; clears the spool when all landed.
async fn try_replay(backend: &dyn Backend, sp: &mut Spool) -> bool {
    if backend.ping().await.is_err() {
        return false;
    }
    let batches = match sp.read_all() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(pool = backend.label(), error = %e, "cannot read the spool");
            return false;
        }
    };
    for batch in &batches {
        match backend.write(batch).await {
            Ok(()) => {}
            Err(e) if e.transient => return false,
            Err(_) => {
                for op in batch {
                    if let Err(e) = backend.write(std::slice::from_ref(op)).await {
                        if e.transient {
                            return false;
                        }
                        tracing::warn!(pool = backend.label(), error = %e.message, "spooled write refused by the database");
                    }
                }
            }
        }
    }
    match sp.clear() {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(pool = backend.label(), error = %e, "cannot clear the spool");
            false
        }
    }
}

/// An append-only file of batches (one JSON array per line, fsynced), written during a
/// database outage so queued writes survive a broker restart; replayed in order.
pub struct Spool {
    path: std::path::PathBuf,
    max_bytes: u64,
    len: u64,
}

impl Spool {
    pub fn open(path: std::path::PathBuf, max_bytes: u64) -> std::io::Result<Spool> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(Spool { path, max_bytes, len })
    }

    pub fn pending(&self) -> bool {
        self.len > 0
    }

    /// `Ok(false)` when the size cap would be exceeded.
    fn append(&mut self, ops: &[WriteOp]) -> std::io::Result<bool> {
        use std::io::Write;
        let mut line = serde_json::to_vec(ops).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.len + line.len() as u64 > self.max_bytes {
            return Ok(false);
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        self.len += line.len() as u64;
        Ok(true)
    }

    fn read_all(&self) -> std::io::Result<Vec<Vec<WriteOp>>> {
        let text = std::fs::read(&self.path)?;
        let mut out = Vec::new();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice(line) {
                Ok(batch) => out.push(batch),
                // A torn last line from a crash mid-append: its acks never went out.
                Err(e) => tracing::warn!(spool = %self.path.display(), error = %e, "skipping an incomplete spool record"),
            }
        }
        Ok(out)
    }

    fn clear(&mut self) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(true)
            .open(&self.path)?;
        f.sync_all()?;
        self.len = 0;
        Ok(())
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
