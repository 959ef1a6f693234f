//! The per-pool write queue: bounded, batched, retried, with completion signals.
//!
//! Hooks push [`Job`]s without waiting on the database. One writer task per pool drains what is
//! queued into one batch (group commit), hands it to the backend, and retries transient
//! failures with exponential backoff and jitter while the queue absorbs new work. A job may
//! carry a [`Ticket`]; the ticket fires when every job holding it is done, which is how the
//! no-loss mode sends a PUBACK only after the message is committed.

use super::health::{jitter, Health, MAX_BACKOFF, MIN_BACKOFF};
use super::{BResult, Backend, BackendError, WriteOp};
use crate::deadletter::DeadLetter;
use crate::metrics::{PoolMetrics, RuleMetrics};
use crate::model::Ticket;
use crate::ratelimit::RateLimited;
use futures::future::BoxFuture;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

impl Job {
    /// This job's write did not commit: its ticket (if any) must not ack the publisher.
    fn refused(&self, reason: &str) {
        if let Some(t) = &self.ticket {
            t.fail(reason);
        }
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
    /// The pool's circuit breaker, shared with the reads of subscribe/connect rules.
    pub health: Arc<Health>,
}

/// How the writer batches and how long it waits for the database.
#[derive(Debug, Clone, Copy)]
pub struct WriterConf {
    pub capacity: usize,
    pub batch_size: usize,
    pub linger: Duration,
    pub timeout: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Enqueue {
    Queued,
    /// The queue was full (async mode) or closed; the job was dropped and counted.
    Dropped,
}

impl WriteQueue {
    /// Start the writer task for `backend`.
    /// `dead`: where spooled writes the database refuses on replay are kept (they were acked).
    pub fn spawn(backend: Arc<dyn Backend>, conf: WriterConf, spool: Option<Spool>, dead: Arc<DeadLetter>) -> WriteQueue {
        let (tx, rx) = mpsc::channel(conf.capacity);
        let label: Arc<str> = backend.label().into();
        let metrics = Arc::new(PoolMetrics {
            label: label.to_string(),
            ..Default::default()
        });
        let health = Arc::new(Health::new(metrics.clone()));
        let w = Writer {
            backend,
            health: health.clone(),
            metrics: metrics.clone(),
            timeout: conf.timeout,
            outage: None,
            dead,
        };
        tokio::spawn(w.run(rx, conf.batch_size, conf.linger, spool));
        WriteQueue {
            tx,
            label,
            metrics,
            health,
        }
    }

    /// Waits for room: back-pressure for no-loss writes.
    pub async fn push(&self, job: Job) -> Enqueue {
        RuleMetrics::inc(&job.rule.queued);
        match self.tx.send(job).await {
            Ok(()) => Enqueue::Queued,
            Err(e) => {
                RuleMetrics::inc(&e.0.rule.dropped);
                e.0.refused(&format!("the write queue of {} is closed", self.label));
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
                job.refused(&format!("the write queue of {} is full", self.label));
                static FULL: RateLimited = RateLimited::new();
                FULL.warn(|| format!("write queue of {} is full: dropped a write of rule {}", self.label, job.rule.label));
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

/// Bounds one database call: no answer within `limit` is a transient failure.
pub async fn timed<T>(limit: Duration, f: BoxFuture<'_, BResult<T>>) -> BResult<T> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(BackendError::transient(format!("no answer within {} ms", limit.as_millis()))))
}

struct Writer {
    backend: Arc<dyn Backend>,
    health: Arc<Health>,
    metrics: Arc<PoolMetrics>,
    timeout: Duration,
    outage: Option<Outage>,
    dead: Arc<DeadLetter>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, batch_size: usize, linger: Duration, mut spool: Option<Spool>) {
        let mut jobs: Vec<Job> = Vec::with_capacity(batch_size);
        let mut ops: Vec<WriteOp> = Vec::with_capacity(batch_size);
        // While writes wait in the spool, replay is attempted on a backoff schedule, not per
        // batch: new batches keep going to disk (and their acks out) in between.
        let mut replay_delay = MIN_BACKOFF;
        let mut next_replay = Instant::now();
        loop {
            if let Some(sp) = spool.as_mut().filter(|s| s.pending() && Instant::now() >= next_replay) {
                // Replayed in order, before anything newer, once the database answers.
                if self.replay(sp).await {
                    tracing::info!(pool = self.backend.label(), "spooled writes replayed");
                    self.back();
                    replay_delay = MIN_BACKOFF;
                } else {
                    next_replay = Instant::now() + jitter(replay_delay);
                    replay_delay = (replay_delay * 2).min(MAX_BACKOFF);
                }
            }
            let received = if spool.as_ref().is_some_and(Spool::pending) {
                let until_replay = next_replay.saturating_duration_since(Instant::now());
                match tokio::time::timeout(until_replay, rx.recv_many(&mut jobs, batch_size)).await {
                    Ok(n) => n,
                    Err(_) => continue,
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
            self.metrics.in_flight.store(jobs.len() as u64, Relaxed);
            self.metrics.queue_depth.store(rx.len() as u64, Relaxed);
            self.commit(&mut ops, &jobs, &mut spool).await;
            ops.clear();
            jobs.clear(); // drops tickets: acks may go out now
            self.metrics.in_flight.store(0, Relaxed);
        }
    }

    /// Writes one batch until it is committed, spooled, or refused by the database. After a
    /// failure the retry resumes after what the backend reports as already committed: whole
    /// ops, then the first statements of the next op's list.
    async fn commit(&mut self, ops: &mut [WriteOp], jobs: &[Job], spool: &mut Option<Spool>) {
        let mut done = 0;
        while done < ops.len() {
            let (ops_left, jobs_left) = (&ops[done..], &jobs[done..]);
            if let Some(sp) = spool.as_mut().filter(|s| s.pending()) {
                if spool_jobs(&*self.backend, sp, ops_left, jobs_left) {
                    return;
                }
            }
            match timed(self.timeout, self.backend.write(ops_left)).await {
                Ok(written) => {
                    self.back();
                    committed(jobs_left, &written.refused);
                    return;
                }
                Err(e) => {
                    let applied = e.applied.min(ops_left.len());
                    committed(&jobs_left[..applied], &[]);
                    done += applied;
                    if done == ops.len() {
                        return;
                    }
                    if e.partial > 0 {
                        ops[done] = ops[done].rest_after(e.partial);
                    }
                    if !e.transient {
                        // The data was refused: isolate the bad op so the rest commits.
                        self.one_by_one(&ops[done..], &jobs[done..], &e).await;
                        return;
                    }
                    let wait = self.down(&e);
                    // With a spool, the rest of the batch goes to disk and its acks go out now.
                    if let Some(sp) = spool.as_mut() {
                        if spool_jobs(&*self.backend, sp, &ops[done..], &jobs[done..]) {
                            return;
                        }
                    }
                    for j in &jobs[done..] {
                        RuleMetrics::inc(&j.rule.retried);
                    }
                    // The circuit is open: probe with a cheap ping instead of resending the
                    // batch, then resend it once the database answers.
                    self.probe(wait).await;
                }
            }
        }
    }

    /// A transient failure: opens the circuit; logs once per outage, not per batch.
    fn down(&mut self, e: &BackendError) -> Duration {
        let label = self.backend.label();
        let o = self.outage.get_or_insert_with(|| {
            tracing::error!(pool = label, error = %e.message, "database write failed; retrying with backoff");
            Outage {
                since: Instant::now(),
                failures: 0,
            }
        });
        o.failures += 1;
        tracing::debug!(pool = label, error = %e.message, failures = o.failures, "write attempt failed");
        self.health.failed()
    }

    /// The database answered: close the circuit and say so if it was an outage.
    fn back(&mut self) {
        self.health.succeeded();
        if let Some(o) = self.outage.take() {
            tracing::info!(
                pool = self.backend.label(),
                failures = o.failures,
                secs = o.since.elapsed().as_secs_f32(),
                "database is back; writes resumed"
            );
        }
    }

    /// A ping is tiny: a database that needs longer than this to answer one is not healthy, and
    /// while the spool is in use a probe must not hold up new batches for a whole write timeout.
    fn probe_timeout(&self) -> Duration {
        self.timeout.min(Duration::from_secs(2))
    }

    /// Waits, pings, and backs off further until the database answers a ping.
    async fn probe(&mut self, mut wait: Duration) {
        loop {
            tokio::time::sleep(wait).await;
            match timed(self.probe_timeout(), self.backend.ping()).await {
                Ok(()) => return,
                Err(e) => wait = self.down(&e),
            }
        }
    }

    /// Writes every spooled batch in order; clears the spool when all landed.
    async fn replay(&mut self, sp: &mut Spool) -> bool {
        if let Err(e) = timed(self.probe_timeout(), self.backend.ping()).await {
            self.down(&e);
            return false;
        }
        let batches = match sp.read_all() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(pool = self.backend.label(), error = %e, "cannot read the spool");
                return false;
            }
        };
        for batch in &batches {
            match timed(self.timeout, self.backend.write(batch)).await {
                Ok(_) => {}
                Err(e) if e.transient => {
                    self.down(&e);
                    return false;
                }
                Err(_) => {
                    for op in batch {
                        match timed(self.timeout, self.backend.write(std::slice::from_ref(op))).await {
                            Ok(_) => {}
                            Err(e) if e.transient => {
                                self.down(&e);
                                return false;
                            }
                            Err(e) => {
                                // Acked when it reached the spool: keep it where an operator finds it.
                                tracing::warn!(pool = self.backend.label(), error = %e.message, "spooled write refused by the database");
                                let mut rec = serde_json::Map::new();
                                rec.insert("pool".into(), self.backend.label().into());
                                rec.insert("op".into(), serde_json::to_value(op).unwrap_or_default());
                                let _ = self.dead.record(&e.message, rec);
                            }
                        }
                    }
                }
            }
        }
        match sp.clear() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(pool = self.backend.label(), error = %e, "cannot clear the spool");
                false
            }
        }
    }

    /// After a refused batch: each op alone, so only the bad one fails.
    async fn one_by_one(&mut self, ops: &[WriteOp], jobs: &[Job], first: &BackendError) {
        let backend = self.backend.clone();
        let label = backend.label();
        if jobs.len() == 1 {
            RuleMetrics::inc(&jobs[0].rule.failed);
            jobs[0].refused(&first.message);
            tracing::warn!(pool = label, rule = %jobs[0].rule.label, error = %first.message, "write refused by the database");
            return;
        }
        for (op, j) in ops.iter().zip(jobs) {
            let mut rest: Option<WriteOp> = None;
            loop {
                let o = rest.as_ref().unwrap_or(op);
                match timed(self.timeout, self.backend.write(std::slice::from_ref(o))).await {
                    Ok(written) => {
                        committed(std::slice::from_ref(j), &written.refused);
                        break;
                    }
                    Err(e) if e.applied > 0 => {
                        committed(std::slice::from_ref(j), &[]);
                        break;
                    }
                    Err(e) if e.transient => {
                        if e.partial > 0 {
                            rest = Some(o.rest_after(e.partial));
                        }
                        RuleMetrics::inc(&j.rule.retried);
                        let wait = self.down(&e);
                        self.probe(wait).await;
                    }
                    Err(e) => {
                        RuleMetrics::inc(&j.rule.failed);
                        j.refused(&e.message);
                        tracing::warn!(pool = label, rule = %j.rule.label, error = %e.message, "write refused by the database");
                        break;
                    }
                }
            }
        }
    }
}

/// Counts applied jobs and their enqueue-to-commit latency: a success, or a failure where a
/// custom statement of the job was refused (`refused`: indices into `jobs`).
fn committed(jobs: &[Job], refused: &[usize]) {
    for (i, j) in jobs.iter().enumerate() {
        if refused.contains(&i) {
            RuleMetrics::inc(&j.rule.failed);
            j.refused("a statement of the rule was refused by the database");
        } else {
            RuleMetrics::inc(&j.rule.success);
        }
        j.rule.observe(j.queued_at.elapsed());
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
            static FULL: RateLimited = RateLimited::new();
            FULL.warn(|| {
                format!(
                    "spool of {} is full ({} bytes): holding writes in memory",
                    backend.label(),
                    sp.max_bytes
                )
            });
            false
        }
        Err(e) => {
            static FAILED: RateLimited = RateLimited::new();
            FAILED.warn(|| format!("spool of {} failed: {e}", backend.label()));
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
