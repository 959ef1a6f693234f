//! Wiring: configuration → pools and queues → dispatcher → engine → listener.
//! Used by `mqtt-persist run` and by the tests, which start brokers in-process on port 0.

use crate::backends::queue::{Spool, WriteQueue};
use crate::broker::{self, Engine};
use crate::config::{ConfError, Config};
use crate::hooks::{Dispatcher, Pool};
use crate::metrics::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// A running broker.
pub struct Broker {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    accept: tokio::task::JoinHandle<()>,
    /// MQTT connections run here, apart from database work, so a busy writer never delays
    /// a packet (and a router send that blocks never stalls a database task).
    conn_rt: Option<tokio::runtime::Runtime>,
}

impl Broker {
    /// Stops accepting new connections (existing ones end when their clients go).
    pub fn stop_accepting(&self) {
        self.accept.abort();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(rt) = self.conn_rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Connects every pool of every loaded backend and builds the dispatcher.
pub async fn build_dispatcher(conf: &Config, registry: &Registry) -> Result<Dispatcher, Vec<ConfError>> {
    let mut pools = BTreeMap::new();
    let mut errors = Vec::new();
    for b in &conf.backends {
        for pool in b.pools.values() {
            match crate::backends::connect(pool, &conf.broker.data_dir).await {
                Ok(backend) => {
                    tracing::info!(pool = %pool.label(), "pool ready");
                    let spool = match &b.spool_dir {
                        Some(dir) => match Spool::open(dir.join(format!("{}-{}.spool", pool.db, pool.name)), b.spool_max_bytes) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                errors.push(ConfError::new(
                                    &crate::config::Origin::Default,
                                    format!("cannot open the spool in {}: {e}", dir.display()),
                                ));
                                continue;
                            }
                        },
                        None => None,
                    };
                    let queue = WriteQueue::spawn(
                        backend.clone(),
                        conf.broker.queue_capacity,
                        conf.broker.batch_size,
                        conf.broker.batch_linger,
                        spool,
                    );
                    pools.insert(pool.label(), Arc::new(Pool { backend, queue }));
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    for b in &conf.backends {
        let Some(ttl) = b.message_ttl else { continue };
        for pool in b.pools.values() {
            if let Some(p) = pools.get(&pool.label()) {
                spawn_ttl_cleanup(Arc::downgrade(p), ttl);
            }
        }
    }
    Ok(Dispatcher::new(conf, &pools, registry))
}

/// Deletes stored messages older than `ttl` in batches, off the hot path, until the pool is
/// replaced or dropped.
fn spawn_ttl_cleanup(pool: std::sync::Weak<Pool>, ttl: std::time::Duration) {
    let every = (ttl / 4).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(p) = pool.upgrade() else { return };
            let before = crate::hooks::now_ms() - ttl.as_millis() as i64;
            match p.backend.delete_expired(before).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(pool = p.backend.label(), deleted = n, "expired stored messages removed"),
                Err(e) => tracing::warn!(pool = p.backend.label(), error = %e, "message TTL cleanup failed"),
            }
        }
    });
}

/// Re-reads the configuration and swaps the rule set in; a bad configuration is rejected with
/// all its errors and the running one stays.
pub async fn reload(engine: &Arc<Engine>, etc: &std::path::Path, overrides: &crate::config::Overrides) -> Result<usize, String> {
    let conf = Config::load(etc, overrides).map_err(|e| e.to_string())?;
    let dispatcher = build_dispatcher(&conf, &engine.metrics)
        .await
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))?;
    let rules = conf.rules().count();
    let dispatcher = Arc::new(dispatcher);
    let weak = Arc::downgrade(engine);
    let sink: crate::backends::ControlSink = Arc::new(move |clientid, cmd| weak.upgrade().is_some_and(|e| e.control(clientid, cmd)));
    for p in &dispatcher.pools {
        p.backend.start_control(sink.clone());
    }
    engine.set_dispatcher(dispatcher);
    Ok(rules)
}

pub async fn start(conf: &Config) -> Result<Broker, String> {
    let registry = Arc::new(Registry::default());
    let dispatcher = build_dispatcher(conf, &registry)
        .await
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))?;
    let listener = broker::bind(&conf.broker.listen).await?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let conn_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name("mqtt-conn")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the connection runtime: {e}"))?;
    let listener = listener.into_std().map_err(|e| e.to_string())?;
    let dispatcher = Arc::new(dispatcher);
    let engine = Engine::new(conf.broker.clone(), dispatcher.clone(), registry);
    let weak = Arc::downgrade(&engine);
    let sink: crate::backends::ControlSink = Arc::new(move |clientid, cmd| weak.upgrade().is_some_and(|e| e.control(clientid, cmd)));
    for p in &dispatcher.pools {
        p.backend.start_control(sink.clone());
    }
    let accept = {
        let _guard = conn_rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        conn_rt.spawn(broker::accept_loop(listener, engine.clone()))
    };
    Ok(Broker {
        addr,
        engine,
        accept,
        conn_rt: Some(conn_rt),
    })
}
