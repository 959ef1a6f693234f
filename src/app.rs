//! Wiring: configuration → pools and queues → dispatcher → engine → listener.
//! Used by `mqtt-persist run` and by the tests, which start brokers in-process on port 0.

use crate::backends::queue::{Spool, WriteQueue, WriterConf};
use crate::backends::Pool;
use crate::broker::{self, Engine};
use crate::config::{ConfError, Config};
use crate::deadletter::DeadLetter;
use crate::hooks::Dispatcher;
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
    _conn_rt: Background,
    /// Database work: write queues, pools and their connection tasks, TTL cleanup, control
    /// channels, apart from the connections and from whatever runtime called [`start`].
    _storage_rt: Background,
}

/// A runtime that may be dropped from async code (it shuts down in the background), including
/// when `start` fails halfway.
struct Background(Option<tokio::runtime::Runtime>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
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
    }
}

/// Connects every pool of every loaded backend and builds the dispatcher.
pub async fn build_dispatcher(conf: &Config, registry: &Registry, dead: &Arc<DeadLetter>) -> Result<Dispatcher, Vec<ConfError>> {
    let custom = crate::hooks::compile(conf)?;
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
                    let writer = WriterConf {
                        capacity: conf.broker.queue_capacity,
                        batch_size: conf.broker.batch_size,
                        linger: conf.broker.batch_linger,
                        timeout: conf.broker.write_timeout,
                    };
                    let queue = WriteQueue::spawn(backend.clone(), writer, spool, dead.clone());
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
    Ok(Dispatcher::new(conf, custom, &pools, registry))
}

/// Deletes stored messages older than `ttl` in batches, off the hot path, until the pool is
/// replaced or dropped.
fn spawn_ttl_cleanup(pool: std::sync::Weak<Pool>, ttl: std::time::Duration) {
    let every = (ttl / 4).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(p) = pool.upgrade() else { return };
            let before = crate::model::now_ms() - ttl.as_millis() as i64;
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
    let conf = Config::load_checked(etc, overrides, &|r| crate::hooks::compile_rule(r).map(|_| ())).map_err(|e| e.to_string())?;
    let rules = conf.rules().count();
    let acl = load_acl(&conf.broker)?;
    let dispatcher = prepare(&engine.storage, conf, engine.metrics.clone(), engine.dead_letter.clone()).await?;
    start_control(engine, &dispatcher);
    engine.set_dispatcher(dispatcher);
    engine.set_authorizer(acl);
    Ok(rules)
}

/// The `acl.file` authorizer, if one is configured; a bad file is an error naming file:line.
pub fn load_acl(conf: &crate::config::BrokerConf) -> Result<Option<Arc<dyn crate::acl::Authorizer>>, String> {
    match &conf.acl_file {
        None => Ok(None),
        Some(path) => Ok(Some(Arc::new(crate::acl::AclFile::load(path)?))),
    }
}

/// Builds the dispatcher on the storage runtime, so pools, writers and their connection
/// tasks live there.
async fn prepare(
    storage: &tokio::runtime::Handle,
    conf: Config,
    registry: Arc<Registry>,
    dead: Arc<DeadLetter>,
) -> Result<Arc<Dispatcher>, String> {
    storage
        .spawn(async move { build_dispatcher(&conf, &registry, &dead).await })
        .await
        .map_err(|e| format!("pool setup failed: {e}"))?
        .map(Arc::new)
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
}

/// Starts each pool's control channel (server-side subscribe) on the storage runtime.
fn start_control(engine: &Arc<Engine>, dispatcher: &Dispatcher) {
    let weak = Arc::downgrade(engine);
    let sink: crate::backends::ControlSink = Arc::new(move |clientid, cmd| weak.upgrade().is_some_and(|e| e.control(clientid, cmd)));
    let _in_storage = engine.storage.enter();
    for p in &dispatcher.pools {
        p.backend.start_control(sink.clone());
    }
}

/// One worker per two cores (at least one): database work is mostly waiting on the network,
/// and a small runtime keeps its wake-ups off the cores that route and deliver. With `low`
/// priority its threads (and the blocking threads SQLite uses) run at nice 10.
fn storage_runtime(low_priority: bool) -> Result<tokio::runtime::Runtime, String> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads((cores / 2).max(1))
        .thread_name("mqtt-store")
        .on_thread_start(move || {
            if low_priority {
                lower_this_threads_priority();
            }
        })
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the storage runtime: {e}"))
}

/// Nice 10 for the calling thread only (Linux keeps nice per thread; raising it needs no
/// privilege). Elsewhere a no-op.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling weight of the calling thread (`who = 0`).
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, 0, 10) != 0 {
            tracing::warn!("cannot lower the storage threads' priority: {}", std::io::Error::last_os_error());
        }
    }
}

/// Raises this process's open-file limit to its hard limit (each connection is a socket, and
/// the usual soft limit of 1024 would refuse connections long before `mqtt.max_connections`),
/// and returns how many connections the broker takes: `max_connections`, or fewer when even
/// the hard limit is short of it (the rest then get a CONNACK refusal instead of failing at
/// accept). Files for databases, spools and the listener are kept aside.
fn connection_cap(max_connections: usize) -> usize {
    const RESERVED: u64 = 256;
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return max_connections;
    }
    if l.rlim_cur < l.rlim_max {
        let want = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            l.rlim_cur = l.rlim_max;
        }
    }
    let fit = usize::try_from(l.rlim_cur.saturating_sub(RESERVED)).unwrap_or(usize::MAX).max(1);
    if fit < max_connections {
        tracing::info!(
            open_files = l.rlim_cur,
            max_connections,
            "up to {fit} connections at once (the open-file limit); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) for more"
        );
    }
    fit.min(max_connections)
}

pub async fn start(conf: &Config) -> Result<Broker, String> {
    let registry = Arc::new(Registry::default());
    let storage_rt = Background(Some(storage_runtime(conf.broker.storage_low_priority)?));
    let storage = storage_rt.0.as_ref().expect("just built").handle().clone();
    let dead = DeadLetter::new(conf.broker.data_dir.join("dead-letter.jsonl"), registry.clone());
    let dispatcher = prepare(&storage, conf.clone(), registry.clone(), dead.clone()).await?;
    let listener = broker::bind(&conf.broker.listen).await?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let conn_rt = Background(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("mqtt-conn")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the connection runtime: {e}"))?,
    ));
    let conn = conn_rt.0.as_ref().expect("just built").handle().clone();
    let listener = listener.into_std().map_err(|e| e.to_string())?;
    let mut broker_conf = conf.broker.clone();
    broker_conf.mqtt.max_connections = connection_cap(broker_conf.mqtt.max_connections);
    let engine = Engine::new(broker_conf, dispatcher.clone(), registry, storage, dead)?;
    engine.set_authorizer(load_acl(&conf.broker)?);
    start_control(&engine, &dispatcher);
    let accept = {
        let _guard = conn.enter();
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        conn.spawn(broker::accept_loop(listener, engine.clone()))
    };
    Ok(Broker {
        addr,
        engine,
        accept,
        _conn_rt: conn_rt,
        _storage_rt: storage_rt,
    })
}

/// Installs the log subscriber: `filter` decides what is logged, except that rumqttd's
/// per-packet spans are never recorded. rumqttd opens one at ERROR level for every PUBLISH
/// with the topic formatted into it, on the router thread that every message passes; its
/// events (warnings, errors) still log.
pub fn init_logging<W>(filter: tracing_subscriber::EnvFilter, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::prelude::*;
    let no_rumqttd_spans = tracing_subscriber::filter::filter_fn(|m| !(m.is_span() && m.target().starts_with("rumqttd")));
    // One combined filter on the only layer: a span it refuses is disabled outright, so the
    // registry does not even allocate it (two nested filters still let the registry record it).
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_filter(no_rumqttd_spans.and(filter)),
        )
        .init();
}
