//! A connected pool: the backend, the write queue in front of it, and the circuit breaker that
//! gates its reads as well as its writes.

use super::health::Admit;
use super::queue::{timed, WriteQueue};
use super::{BResult, Backend};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

pub struct Pool {
    pub backend: Arc<dyn Backend>,
    pub queue: WriteQueue,
}

impl Pool {
    /// A read for a subscribe/connect rule, bounded by `limit` (`persist.fetch_timeout`). While
    /// the pool's circuit is open it fails at once (and now and then pings in the background),
    /// so an outage costs subscribers their stored messages for now, not their time.
    pub async fn read<T>(&self, limit: Duration, f: BoxFuture<'_, BResult<T>>) -> Result<T, String> {
        let health = &self.queue.health;
        match health.admit() {
            Admit::Go => {}
            Admit::Skip => return Err("the database is unavailable".into()),
            Admit::Probe => {
                let (backend, health) = (self.backend.clone(), health.clone());
                tokio::spawn(async move {
                    match timed(limit, backend.ping()).await {
                        Ok(()) => health.succeeded(),
                        Err(_) => {
                            health.failed();
                            false
                        }
                    }
                });
                return Err("the database is unavailable".into());
            }
        }
        match tokio::time::timeout(limit, f).await {
            Ok(Ok(v)) => {
                health.succeeded();
                Ok(v)
            }
            Ok(Err(e)) => {
                if e.transient {
                    health.failed();
                }
                Err(e.message)
            }
            Err(_) => {
                health.failed();
                Err(format!("no answer within {} ms", limit.as_millis()))
            }
        }
    }
}
