//! Completion signals for writes: how a connection learns that its publish is committed.

use std::sync::Arc;
use tokio::sync::mpsc;

/// What became of the writes holding one ticket: `Ok` when every one committed, `Err` with
/// the first reason when any was refused or could not be queued.
pub type Outcome = Result<(), Arc<str>>;

/// Fires `done(seq, outcome)` on the owning connection when the last clone is dropped. A write
/// that did not commit [`fail`](Ticket::fail)s it first, so the publisher is never acked for it.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    done: Option<mpsc::UnboundedSender<(u64, Outcome)>>,
    /// Set once, by the first write that did not commit.
    failure: std::sync::OnceLock<Arc<str>>,
    /// Closed (dropped) when the writes are done, for any number of waiters.
    _signal: Option<tokio::sync::watch::Sender<()>>,
}

impl Ticket {
    pub fn new(seq: u64, done: mpsc::UnboundedSender<(u64, Outcome)>) -> Arc<Ticket> {
        Arc::new(Ticket {
            seq,
            done: Some(done),
            failure: std::sync::OnceLock::new(),
            _signal: None,
        })
    }

    /// A ticket that only signals completion (committed or not): the receiver's `changed()`
    /// errs once every write holding it is done.
    pub fn watched() -> (Arc<Ticket>, tokio::sync::watch::Receiver<()>) {
        let (tx, rx) = tokio::sync::watch::channel(());
        let t = Ticket {
            seq: 0,
            done: None,
            failure: std::sync::OnceLock::new(),
            _signal: Some(tx),
        };
        (Arc::new(t), rx)
    }

    /// Marks the message as not stored (the first reason is kept).
    pub fn fail(&self, reason: &str) {
        let _ = self.failure.set(reason.into());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let outcome = match self.failure.take() {
            None => Ok(()),
            Some(reason) => Err(reason),
        };
        if let Some(done) = &self.done {
            let _ = done.send((self.seq, outcome));
        }
    }
}
