//! The per-pool write queue: bounded, batched, retried, with completion signals.
//!
//! Hooks push [`Job`]s without waiting on the database. One writer task per pool forms batches
//! of everything queued (group commit) and keeps up to the backend's
//! [`write_concurrency`](Backend::write_concurrency) of them in flight, ops that must stay in
//! order never in two at once; each batch retries transient failures with exponential backoff
//! and jitter while the queue absorbs new work. A job may
//! carry a [`Ticket`]; the ticket fires when every job holding it is done, which is how the
//! no-loss mode sends a PUBACK only after the message is committed.

use super::health::{jitter, Health, MAX_BACKOFF, MIN_BACKOFF};
use super::{BResult, Backend, BackendError, WriteOp};
use crate::deadletter::DeadLetter;
use crate::metrics::{PoolMetrics, RuleMetrics};
use crate::model::Ticket;
use crate::ratelimit::RateLimited;
use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Jobs with the same key commit in queue order ([`WriteOp::order_key`]).
    pub key: u64,
}

impl Job {
    /// `client`: the client whose event made the op, which orders ops that name no row of
    /// their own (a rule's statements).
    pub fn new(op: WriteOp, rule: Arc<RuleMetrics>, ticket: Option<Arc<Ticket>>, client: &str) -> Job {
        Job {
            key: op.order_key(client),
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
        let lanes = backend.write_concurrency().max(1);
        let w = Writer {
            shared: Arc::new(Shared {
                backend,
                health: health.clone(),
                metrics: metrics.clone(),
                timeout: conf.timeout,
                outage: Mutex::new(None),
                dead,
                spool: spool.map(tokio::sync::Mutex::new),
            }),
            batch_size: conf.batch_size.max(1),
            linger: conf.linger,
            lanes,
            pending: VecDeque::new(),
            busy: HashMap::new(),
        };
        tokio::spawn(w.run(rx));
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

/// What every batch in flight shares with the pool's writer.
struct Shared {
    backend: Arc<dyn Backend>,
    health: Arc<Health>,
    metrics: Arc<PoolMetrics>,
    timeout: Duration,
    outage: Mutex<Option<Outage>>,
    dead: Arc<DeadLetter>,
    /// Locked only around appends, checks and the replay (which runs with nothing in flight).
    spool: Option<tokio::sync::Mutex<Spool>>,
}

/// One pool's writer: takes what is queued into `pending`, and keeps up to `lanes` batches in
/// flight, each formed from everything pending that does not share an order key with a
/// batch in flight (or with a job left behind for one): ops of one client, one topic's
/// retained value, one message, commit in the order they were queued; the rest goes in
/// parallel on the pool's connections.
struct Writer {
    shared: Arc<Shared>,
    batch_size: usize,
    linger: Duration,
    lanes: usize,
    pending: VecDeque<Job>,
    /// Order keys of the batches in flight, with how many jobs hold each.
    busy: HashMap<u64, usize>,
}

type InFlight = futures::stream::FuturesUnordered<BoxFuture<'static, Done>>;

/// A finished batch: how many jobs it held, and their order keys (with more than one lane).
struct Done {
    jobs: usize,
    keys: Vec<u64>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut inflight = InFlight::new();
        let mut buf: Vec<Job> = Vec::with_capacity(self.batch_size);
        let mut closed = false;
        // While writes wait in the spool, replay is attempted on a backoff schedule, not per
        // batch: new batches keep going to disk (and their acks out) in between.
        let mut replay_delay = MIN_BACKOFF;
        let mut next_replay = Instant::now();
        // Pending jobs beyond this wait in the channel, whose bound is the back-pressure.
        let cap = self.batch_size * self.lanes;
        loop {
            if self.spool_pending().await && Instant::now() >= next_replay {
                // Replayed in order, before anything newer, with nothing else in flight.
                while let Some(done) = inflight.next().await {
                    self.release(done);
                }
                if self.replay().await {
                    tracing::info!(pool = self.shared.backend.label(), "spooled writes replayed");
                    self.shared.back();
                    replay_delay = MIN_BACKOFF;
                } else {
                    next_replay = Instant::now() + jitter(replay_delay);
                    replay_delay = (replay_delay * 2).min(MAX_BACKOFF);
                }
            }
            // Group commit under light load: give a small batch a moment to grow, so a steady
            // trickle costs the database a few transactions per second instead of one per message.
            if inflight.is_empty()
                && !closed
                && !self.linger.is_zero()
                && !self.pending.is_empty()
                && self.pending.len() < self.batch_size / 8
            {
                let deadline = tokio::time::Instant::now() + self.linger;
                while self.pending.len() < self.batch_size {
                    let room = self.batch_size - self.pending.len();
                    match tokio::time::timeout_at(deadline, rx.recv_many(&mut buf, room)).await {
                        Ok(n) if n > 0 => self.take(&mut buf),
                        _ => break,
                    }
                }
            }
            // Batches first, then parallel: another batch goes out beside those in flight only
            // when a full one is waiting (the database falls behind even at full batches); a
            // partial one waits for the connection in use and grows meanwhile.
            while inflight.is_empty() || (inflight.len() < self.lanes && self.pending.len() >= self.batch_size) {
                let Some(batch) = self.form() else { break };
                inflight.push(self.start(batch));
            }
            self.shared
                .metrics
                .queue_depth
                .store((rx.len() + self.pending.len()) as u64, Relaxed);
            if closed && inflight.is_empty() && self.pending.is_empty() {
                return; // every sender is gone: the pool was replaced or the broker stops
            }
            let room = cap.saturating_sub(self.pending.len());
            let until_replay = tokio::time::Instant::from_std(next_replay);
            let replay_wait = self.spool_pending().await;
            tokio::select! {
                Some(done) = inflight.next(), if !inflight.is_empty() => self.release(done),
                n = rx.recv_many(&mut buf, room), if room > 0 && !closed => {
                    if n == 0 {
                        closed = true;
                    } else {
                        self.take(&mut buf);
                    }
                }
                _ = tokio::time::sleep_until(until_replay), if replay_wait => {}
                // Unreachable (a full `pending` means a batch is in flight), but never a panic.
                else => tokio::task::yield_now().await,
            }
        }
    }

    fn take(&mut self, buf: &mut Vec<Job>) {
        self.shared.metrics.in_flight.fetch_add(buf.len() as u64, Relaxed);
        self.pending.extend(buf.drain(..));
    }

    /// The next batch: pending jobs in queue order, skipping (and holding back everything
    /// after) any whose order key a batch in flight holds.
    fn form(&mut self) -> Option<Vec<Job>> {
        if self.pending.is_empty() {
            return None;
        }
        let mut batch = Vec::with_capacity(self.pending.len().min(self.batch_size));
        if self.busy.is_empty() {
            let n = self.pending.len().min(self.batch_size);
            batch.extend(self.pending.drain(..n));
        } else {
            let mut held: Vec<Job> = Vec::new();
            let mut blocked: HashSet<u64> = HashSet::new();
            // Bounded work per batch: what lies further back waits for the next one.
            let mut scan = self.batch_size * 2;
            while batch.len() < self.batch_size && scan > 0 {
                let Some(j) = self.pending.pop_front() else { break };
                scan -= 1;
                if self.busy.contains_key(&j.key) || blocked.contains(&j.key) {
                    blocked.insert(j.key);
                    held.push(j);
                } else {
                    batch.push(j);
                }
            }
            for j in held.into_iter().rev() {
                self.pending.push_front(j);
            }
        }
        if batch.is_empty() {
            return None;
        }
        // With one lane no batch ever starts beside another: nothing to track.
        if self.lanes > 1 {
            for j in &batch {
                *self.busy.entry(j.key).or_default() += 1;
            }
        }
        Some(batch)
    }

    fn release(&mut self, done: Done) {
        self.shared.metrics.in_flight.fetch_sub(done.jobs as u64, Relaxed);
        for k in done.keys {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.busy.entry(k) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Writes one batch to its end; yields what it held, its tickets dropped (acks may go out).
    fn start(&self, jobs: Vec<Job>) -> BoxFuture<'static, Done> {
        let shared = self.shared.clone();
        let tracked = self.lanes > 1;
        Box::pin(async move {
            let mut ops: Vec<WriteOp> = jobs.iter().map(|j| j.op.clone()).collect();
            shared.commit(&mut ops, &jobs).await;
            Done {
                jobs: jobs.len(),
                keys: if tracked {
                    jobs.iter().map(|j| j.key).collect()
                } else {
                    Vec::new()
                },
            }
        })
    }

    async fn spool_pending(&self) -> bool {
        match &self.shared.spool {
            Some(sp) => sp.lock().await.pending(),
            None => false,
        }
    }

    /// Writes every spooled batch in order; clears the spool when all landed.
    async fn replay(&self) -> bool {
        let s = &*self.shared;
        let Some(sp) = &s.spool else { return true };
        let mut sp = sp.lock().await;
        if let Err(e) = timed(s.probe_timeout(), s.backend.ping()).await {
            s.down(&e);
            return false;
        }
        let batches = match sp.read_all() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(pool = s.backend.label(), error = %e, "cannot read the spool");
                return false;
            }
        };
        for batch in &batches {
            match timed(s.timeout, s.backend.write(batch)).await {
                Ok(_) => {}
                Err(e) if e.transient => {
                    s.down(&e);
                    return false;
                }
                Err(_) => {
                    for op in batch {
                        match timed(s.timeout, s.backend.write(std::slice::from_ref(op))).await {
                            Ok(_) => {}
                            Err(e) if e.transient => {
                                s.down(&e);
                                return false;
                            }
                            Err(e) => {
                                // Acked when it reached the spool: keep it where an operator finds it.
                                tracing::warn!(pool = s.backend.label(), error = %e.message, "spooled write refused by the database");
                                let mut rec = serde_json::Map::new();
                                rec.insert("pool".into(), s.backend.label().into());
                                rec.insert("op".into(), serde_json::to_value(op).unwrap_or_default());
                                let _ = s.dead.record(&e.message, rec);
                            }
                        }
                    }
                }
            }
        }
        match sp.clear() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(pool = s.backend.label(), error = %e, "cannot clear the spool");
                false
            }
        }
    }
}

impl Shared {
    /// Appends a batch to the spool when one is in use and already holds writes (newer writes
    /// must not overtake them); true when it did, so the batch's acks may go out.
    async fn behind_spool(&self, ops: &[WriteOp], jobs: &[Job]) -> bool {
        match &self.spool {
            Some(sp) => {
                let mut sp = sp.lock().await;
                sp.pending() && spool_jobs(&*self.backend, &mut sp, ops, jobs)
            }
            None => false,
        }
    }

    /// Writes one batch until it is committed, spooled, or refused by the database. After a
    /// failure the retry resumes after what the backend reports as already committed: whole
    /// ops, then the first statements of the next op's list.
    async fn commit(&self, ops: &mut [WriteOp], jobs: &[Job]) {
        let mut done = 0;
        while done < ops.len() {
            let (ops_left, jobs_left) = (&ops[done..], &jobs[done..]);
            if self.behind_spool(ops_left, jobs_left).await {
                return;
            }
            let started = Instant::now();
            let r = timed(self.timeout, self.backend.write(ops_left)).await;
            self.metrics.observe_write(started.elapsed(), ops_left.len());
            match r {
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
                    if let Some(sp) = &self.spool {
                        if spool_jobs(&*self.backend, &mut *sp.lock().await, &ops[done..], &jobs[done..]) {
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
    fn down(&self, e: &BackendError) -> Duration {
        let label = self.backend.label();
        {
            let mut outage = self.outage.lock();
            let o = outage.get_or_insert_with(|| {
                tracing::error!(pool = label, error = %e.message, "database write failed; retrying with backoff");
                Outage {
                    since: Instant::now(),
                    failures: 0,
                }
            });
            o.failures += 1;
            tracing::debug!(pool = label, error = %e.message, failures = o.failures, "write attempt failed");
        }
        self.health.failed()
    }

    /// The database answered: close the circuit and say so if it was an outage.
    fn back(&self) {
        self.health.succeeded();
        if let Some(o) = self.outage.lock().take() {
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
    async fn probe(&self, mut wait: Duration) {
        loop {
            tokio::time::sleep(wait).await;
            match timed(self.probe_timeout(), self.backend.ping()).await {
                Ok(()) => return,
                Err(e) => wait = self.down(&e),
            }
        }
    }

    /// After a refused batch: each op alone, so only the bad one fails.
    async fn one_by_one(&self, ops: &[WriteOp], jobs: &[Job], first: &BackendError) {
        let label = self.backend.label();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{Cursor, FetchRequest, Page, Written};
    use crate::model::Message;

    /// Records every write: which ops were in flight together, and the order ops committed.
    #[derive(Default)]
    struct Recorder {
        in_flight: Mutex<Vec<u64>>,
        committed: Mutex<Vec<WriteOp>>,
        overlap: std::sync::atomic::AtomicUsize,
        max_parallel: std::sync::atomic::AtomicUsize,
        parallel: std::sync::atomic::AtomicUsize,
        /// While set, every write and ping fails as an unreachable server would.
        down: std::sync::atomic::AtomicBool,
    }

    fn key(op: &WriteOp) -> u64 {
        op.order_key("c")
    }

    impl Backend for Recorder {
        fn label(&self) -> &str {
            "test:pool1"
        }
        fn write<'a>(&'a self, ops: &'a [WriteOp]) -> BoxFuture<'a, BResult<Written>> {
            Box::pin(async move {
                if self.down.load(Relaxed) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    return Err(BackendError::transient("connection refused"));
                }
                let keys: Vec<u64> = ops.iter().map(key).collect();
                {
                    let mut f = self.in_flight.lock();
                    if keys.iter().any(|k| f.contains(k)) {
                        self.overlap.fetch_add(1, Relaxed);
                    }
                    f.extend(&keys);
                }
                let now = self.parallel.fetch_add(1, Relaxed) + 1;
                self.max_parallel.fetch_max(now, Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
                self.parallel.fetch_sub(1, Relaxed);
                self.committed.lock().extend(ops.iter().cloned());
                let mut f = self.in_flight.lock();
                for k in &keys {
                    let i = f.iter().position(|x| x == k).unwrap();
                    f.swap_remove(i);
                }
                Ok(Written::default())
            })
        }
        fn fetch<'a>(&'a self, _: &'a FetchRequest, _: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
            unimplemented!()
        }
        fn retained<'a>(&'a self, _: &'a str, _: Option<&'a Cursor>) -> BoxFuture<'a, BResult<Page>> {
            unimplemented!()
        }
        fn subscriptions<'a>(&'a self, _: &'a str) -> BoxFuture<'a, BResult<Vec<(String, u8)>>> {
            unimplemented!()
        }
        fn delete_expired(&self, _: i64) -> BoxFuture<'_, BResult<u64>> {
            unimplemented!()
        }
        fn ping(&self) -> BoxFuture<'_, BResult<()>> {
            Box::pin(async move {
                if self.down.load(Relaxed) {
                    Err(BackendError::transient("connection refused"))
                } else {
                    Ok(())
                }
            })
        }
        fn write_concurrency(&self) -> usize {
            4
        }
    }

    fn msg(msgid: u64, topic: &str) -> Arc<Message> {
        Arc::new(Message {
            msgid,
            sender: "c".into(),
            username: None,
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 1,
            retain: true,
            timestamp: 0,
            props: None,
        })
    }

    /// Batches run side by side once a full one waits, yet ops with one order key (a topic's
    /// retained value) are never in two writes at once and commit in the order queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_batches_keep_the_order_of_each_key() {
        let rec = Arc::new(Recorder::default());
        let dir = tempfile::tempdir().unwrap();
        let q = spawn(&rec, dir.path(), None);
        push_all(&q, 4000).await;
        assert!(rec.max_parallel.load(Relaxed) > 1, "batches never ran side by side");
        check(&rec, 4000);
    }

    fn spawn(rec: &Arc<Recorder>, dir: &std::path::Path, spool: Option<Spool>) -> WriteQueue {
        let dead = DeadLetter::new(dir.join("dead.jsonl"), Default::default());
        let conf = WriterConf {
            capacity: 100_000,
            batch_size: 50,
            linger: Duration::ZERO,
            timeout: Duration::from_secs(5),
        };
        WriteQueue::spawn(rec.clone(), conf, spool, dead)
    }

    /// Queues `n` writes holding tickets (every tenth a retained upsert on one of three topics)
    /// and waits until every ticket fired, each committed (or spooled).
    async fn push_all(q: &WriteQueue, n: u64) {
        let rule = RuleMetrics::new("r".into());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 1..=n {
            let op = if i % 10 == 0 {
                WriteOp::RetainUpsert {
                    msg: msg(i, &format!("t/{}", i % 3)),
                    ttl: Duration::ZERO,
                }
            } else {
                WriteOp::StoreMessage {
                    msg: msg(i, "m"),
                    ttl: Duration::ZERO,
                }
            };
            let ticket = Ticket::new(i, tx.clone());
            assert_eq!(q.push(Job::new(op, rule.clone(), Some(ticket), "c")).await, Enqueue::Queued);
        }
        drop(tx);
        let mut done = 0;
        while let Some((_, outcome)) = rx.recv().await {
            outcome.unwrap();
            done += 1;
        }
        assert_eq!(done, n, "every ticket fired");
    }

    /// All `n` ops reached the database once, no key was in two writes at once, and each
    /// topic's retained upserts committed in queue order.
    fn check(rec: &Recorder, n: u64) {
        assert_eq!(rec.overlap.load(Relaxed), 0, "ops of one key were in two writes at once");
        let committed = rec.committed.lock();
        assert_eq!(committed.len() as u64, n);
        let mut last: HashMap<String, u64> = HashMap::new();
        for op in committed.iter() {
            if let WriteOp::RetainUpsert { msg, .. } = op {
                let prev = last.insert(msg.topic.to_string(), msg.msgid).unwrap_or(0);
                assert!(prev < msg.msgid, "{} committed after {prev} on {}", msg.msgid, msg.topic);
            }
        }
    }

    /// During an outage batches in flight side by side go to the spool (their tickets fire: on
    /// disk counts as kept) and so does everything after them; once the database answers, the
    /// replay writes it all once, each topic's retained upserts still in queue order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_spools_parallel_batches_and_replays_them_in_order() {
        let rec = Arc::new(Recorder::default());
        rec.down.store(true, Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("spool").join("test.spool"), 64 << 20).unwrap();
        let q = spawn(&rec, dir.path(), Some(spool));
        push_all(&q, 3000).await;
        assert!(rec.committed.lock().is_empty(), "nothing reached the database while it was down");
        rec.down.store(false, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while (rec.committed.lock().len() as u64) < 3000 {
            assert!(Instant::now() < deadline, "spooled writes were not replayed within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check(&rec, 3000);
    }
}
