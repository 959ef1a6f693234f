//! The typed configuration: broker settings, and per loaded backend its pools and hook rules.
//! Everything is validated here, once, so the running broker never matches strings.

use super::grammar::{did_you_mean, ConfError, Entries, Entry, Origin};
use super::Builtin;
use crate::model::Hook;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The databases of SPEC §1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Db {
    Sqlite,
    Pgsql,
    Mysql,
    Redis,
    Mongo,
    Cassa,
}

impl Db {
    pub const ALL: [Db; 6] = [Db::Sqlite, Db::Pgsql, Db::Mysql, Db::Redis, Db::Mongo, Db::Cassa];

    pub fn name(self) -> &'static str {
        match self {
            Db::Sqlite => "sqlite",
            Db::Pgsql => "pgsql",
            Db::Mysql => "mysql",
            Db::Redis => "redis",
            Db::Mongo => "mongo",
            Db::Cassa => "cassa",
        }
    }

    pub fn parse(s: &str) -> Option<Db> {
        Db::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The key prefix of pool settings (`backend.ecql.` for Cassandra, an EMQX quirk).
    pub fn pool_prefix(self) -> &'static str {
        match self {
            Db::Cassa => "backend.ecql.",
            Db::Sqlite => "backend.sqlite.",
            Db::Pgsql => "backend.pgsql.",
            Db::Mysql => "backend.mysql.",
            Db::Redis => "backend.redis.",
            Db::Mongo => "backend.mongo.",
        }
    }

    /// Pool attributes this database understands.
    pub fn pool_keys(self) -> &'static [&'static str] {
        match self {
            Db::Sqlite => &["path", "synchronous", "busy_timeout", "auto_create_schema", "pool_size"],
            Db::Pgsql => &[
                "server",
                "pool_size",
                "username",
                "password",
                "database",
                "ssl",
                "ssl_mode",
                "cacertfile",
                "certfile",
                "keyfile",
                "prepare",
                "auto_create_schema",
                "connect_timeout",
                "write_concurrency",
            ],
            Db::Mysql => &[
                "server",
                "pool_size",
                "user",
                "password",
                "database",
                "ssl",
                "cacertfile",
                "certfile",
                "keyfile",
                "auto_create_schema",
            ],
            Db::Redis => &[
                "type",
                "server",
                "sentinel",
                "pool_size",
                "database",
                "password",
                "channel",
                "ssl",
                "cafile",
                "certfile",
                "keyfile",
                "write_concurrency",
            ],
            Db::Mongo => &[
                "type",
                "rs_set_name",
                "srv_record",
                "server",
                "c_pool_size",
                "database",
                "login",
                "password",
                "auth_source",
                "ssl",
                "keyfile",
                "certfile",
                "cacertfile",
                "w_mode",
                "r_mode",
                "auto_create_schema",
            ],
            Db::Cassa => &[
                "nodes",
                "size",
                "auto_reconnect",
                "username",
                "password",
                "keyspace",
                "logger",
                "auto_create_schema",
            ],
        }
    }

    /// EMQX 4 keys we accept and ignore (warned once), so old files load unchanged.
    fn ignored_pool_keys(self) -> &'static [&'static str] {
        &[
            "auto_reconnect",
            "ssl_opts.keyfile",
            "ssl_opts.certfile",
            "ssl_opts.cacertfile",
            "pool_type",
            "batch_size",
            "encoding",
        ]
    }

    /// The statement-list key of `action` for this database.
    pub fn statement_key(self) -> &'static str {
        match self {
            Db::Sqlite | Db::Pgsql | Db::Mysql => "sql",
            Db::Redis => "commands",
            Db::Cassa => "cql",
            Db::Mongo => "mongo",
        }
    }
}

impl fmt::Display for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A pool's raw attributes; each backend parses the ones it needs with typed getters that
/// report errors at the attribute's origin.
#[derive(Debug, Clone)]
pub struct PoolConf {
    pub db: Db,
    pub name: String,
    pub attrs: BTreeMap<String, Entry>,
    pub origin: Origin,
}

impl PoolConf {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(|e| e.value.as_str())
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.str(key).unwrap_or(default)
    }

    pub fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ConfError> {
        match self.attrs.get(key) {
            None => Ok(default),
            Some(e) => e
                .value
                .parse()
                .map_err(|_| ConfError::new(&e.origin, format!("`{}` must be a number, found `{}`", e.key, e.value))),
        }
    }

    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfError> {
        match self.attrs.get(key) {
            None => Ok(default),
            Some(e) => {
                parse_bool(&e.value).ok_or_else(|| ConfError::new(&e.origin, format!("`{}` must be on/off, found `{}`", e.key, e.value)))
            }
        }
    }

    /// An error at an attribute (or at the pool when the attribute is absent).
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfError {
        let origin = self.attrs.get(key).map(|e| e.origin.clone()).unwrap_or_else(|| self.origin.clone());
        ConfError::new(&origin, message)
    }

    /// `db:pool`, for logs and metrics.
    pub fn label(&self) -> String {
        format!("{}:{}", self.db, self.name)
    }
}

pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" | "enable" | "enabled" => Some(true),
        "off" | "false" | "0" | "no" | "disable" | "disabled" => Some(false),
        _ => None,
    }
}

/// `offline_opts` of fetch rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OfflineOpts {
    pub max_returned_count: Option<u32>,
    pub time_range: Option<Duration>,
    /// Deliver `time_range` worth of messages on a first subscription instead of nothing.
    pub first_subscribe_time_range: bool,
    /// `clean_start = "fetch"`: keep read pointers of clients that connect with clean start
    /// (EMQX 4), instead of discarding them with the session (the default, `"discard"`).
    pub clean_start_fetch: bool,
}

/// What a rule does.
#[derive(Debug, Clone)]
pub enum Action {
    Builtin(Builtin),
    /// The rule's own statements or commands, as written under the database's key (`sql`,
    /// `commands`, …), each item still JSON (a string, or a document for MongoDB): compiled by
    /// that database's backend when the rules are bound.
    Custom {
        key: String,
        items: Vec<serde_json::Value>,
    },
}

/// One `backend.<db>.hook.<hook>.<N>` line.
#[derive(Debug, Clone)]
pub struct Rule {
    pub db: Db,
    pub hook: Hook,
    pub n: u32,
    pub topic: Option<String>,
    pub action: Action,
    pub pool: String,
    pub offline: OfflineOpts,
    /// Redis TTL of stored messages.
    pub expired_time: Duration,
    pub payload_format: Option<String>,
    pub origin: Origin,
}

impl Rule {
    pub fn builtin(&self) -> Option<Builtin> {
        match self.action {
            Action::Builtin(b) => Some(b),
            _ => None,
        }
    }

    pub fn label(&self) -> String {
        format!("{}.hook.{}.{}", self.db, self.hook, self.n)
    }
}

#[derive(Debug, Clone)]
pub struct BackendConf {
    pub db: Db,
    pub file: PathBuf,
    pub pools: BTreeMap<String, PoolConf>,
    pub rules: Vec<Rule>,
    pub message_ttl: Option<Duration>,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: u64,
}

/// No-loss mode (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoLoss {
    /// On when a storing `message.publish` rule exists.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone)]
pub struct BrokerConf {
    pub node_name: Arc<str>,
    pub node_id: u16,
    pub listen: String,
    pub plugins: Vec<Db>,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub metrics_listen: Option<String>,
    pub no_loss: NoLoss,
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub batch_linger: Duration,
    pub fetch_timeout: Duration,
    /// A write (or probe) with no answer after this is a transient failure: retried, spooled.
    pub write_timeout: Duration,
    /// `persist.storage_priority = low`: database threads yield the CPU to MQTT traffic.
    pub storage_low_priority: bool,
    pub max_packet_size: usize,
    pub mqtt: MqttLimits,
    /// `acl.file`, resolved against etc/ (None: no authorization, everyone may do anything).
    pub acl_file: Option<PathBuf>,
}

/// What the broker allows each client (announced to MQTT 5 clients in CONNACK).
#[derive(Debug, Clone, Copy)]
pub struct MqttLimits {
    /// QoS 1/2 publishes a client may have unacknowledged towards the broker (Receive Maximum).
    pub max_inflight: u16,
    /// Longest keepalive a v5 client is granted (Server Keep Alive when it asks for more).
    pub max_keepalive: u16,
    /// Topic aliases a v5 client may set (Topic Alias Maximum).
    pub max_topic_alias: u16,
    /// Topic and filter length in bytes, and levels.
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
    /// Subscriptions per client (0: no limit).
    pub max_subscriptions: usize,
    /// Connections at once; more are refused in CONNACK.
    pub max_connections: usize,
    /// What rumqttd's router keeps of each filter's routed messages, for subscribers behind:
    /// segments of this many bytes (topic + payload), this many segments.
    pub router_segment_size: usize,
    pub router_segments: usize,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_inflight: 1024,
            max_keepalive: 60,
            max_topic_alias: 128,
            max_topic_length: 4096,
            max_topic_levels: 128,
            max_subscriptions: 0,
            max_connections: 100_000,
            router_segment_size: 4 << 20,
            router_segments: 8,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub etc: PathBuf,
    pub broker: BrokerConf,
    pub backends: Vec<BackendConf>,
    pub warnings: Vec<String>,
}

/// All errors of a load, so `check` can show every problem at once.
#[derive(Debug, thiserror::Error)]
pub struct ConfErrors(pub Vec<ConfError>);

impl fmt::Display for ConfErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

const BROKER_KEYS: &[&str] = &[
    "node.name",
    "node.id",
    "listener.tcp.external",
    "plugins.load",
    "data.dir",
    "log.level",
    "metrics.listen",
    "persist.no_loss",
    "persist.queue_capacity",
    "persist.batch_size",
    "persist.batch_linger",
    "persist.fetch_timeout",
    "persist.write_timeout",
    "persist.storage_priority",
    "mqtt.max_packet_size",
    "mqtt.max_inflight",
    "mqtt.max_keepalive",
    "mqtt.max_topic_alias",
    "mqtt.max_topic_length",
    "mqtt.max_topic_levels",
    "mqtt.max_subscriptions",
    "mqtt.max_connections",
    "mqtt.router_segment_size",
    "mqtt.router_segments",
    "acl.file",
];

/// Command-line overrides, applied on top of files and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Loads `etc/mqtt-persist.conf` and the plugin files it lists, with environment overrides.
    /// Reads and validates the configuration; rules' own statements are only checked to be
    /// lists of strings (see [`Config::load_checked`]).
    pub fn load(etc: &Path, overrides: &Overrides) -> Result<Config, ConfErrors> {
        Self::load_checked(etc, overrides, &|_| Ok(()))
    }

    /// Like [`Config::load`], with `check` run on every rule that parsed (the caller compiles
    /// rules' own statements with their backends there), so that all errors come in one list.
    pub fn load_checked(etc: &Path, overrides: &Overrides, check: &dyn Fn(&Rule) -> Result<(), String>) -> Result<Config, ConfErrors> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(super::grammar::ENV_PREFIX))
            .collect();
        Self::load_with_env(etc, overrides, &env, check)
    }

    pub fn load_with_env(
        etc: &Path,
        overrides: &Overrides,
        env: &[(String, String)],
        check: &dyn Fn(&Rule) -> Result<(), String>,
    ) -> Result<Config, ConfErrors> {
        let mut errors = Vec::new();
        let mut entries = Entries::default();
        let main = etc.join("mqtt-persist.conf");
        if main.exists() {
            if let Err(e) = entries.parse_file(&main, &mut errors) {
                errors.push(ConfError::new(&Origin::Default, format!("cannot read {}: {e}", main.display())));
            }
        }
        entries.apply_env(env, |k| !k.starts_with("backend."));
        let mut warnings = std::mem::take(&mut entries.warnings);
        for e in entries.map.values() {
            if !BROKER_KEYS.contains(&e.key.as_str()) {
                errors.push(ConfError::new(
                    &e.origin,
                    format!("unknown key `{}`{}", e.key, did_you_mean(&e.key, BROKER_KEYS.iter().copied())),
                ));
            }
        }
        let broker = broker_conf(&entries, overrides, etc, &mut errors);
        let mut backends = Vec::new();
        for db in &broker.plugins {
            let file = etc.join("plugins").join(format!("emqx_backend_{db}.conf"));
            let mut pe = Entries::default();
            if file.exists() {
                if let Err(e) = pe.parse_file(&file, &mut errors) {
                    errors.push(ConfError::new(&Origin::Default, format!("cannot read {}: {e}", file.display())));
                }
            } else {
                errors.push(ConfError::new(
                    &Origin::Default,
                    format!("plugin `{db}` is listed in plugins.load but {} does not exist", file.display()),
                ));
            }
            let prefixes = [format!("backend.{db}."), db.pool_prefix().to_string()];
            pe.apply_env(env, |k| prefixes.iter().any(|p| k.starts_with(p.as_str())));
            warnings.append(&mut pe.warnings);
            backends.push(backend_conf(*db, file, &pe, &broker, &mut errors, &mut warnings));
        }
        for r in backends.iter().flat_map(|b| &b.rules) {
            if let Err(e) = check(r) {
                errors.push(ConfError::new(&r.origin, e));
            }
        }
        if errors.is_empty() {
            Ok(Config {
                etc: etc.to_path_buf(),
                broker,
                backends,
                warnings,
            })
        } else {
            Err(ConfErrors(errors))
        }
    }

    /// Every rule of every loaded backend, in hook and `N` order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.backends.iter().flat_map(|b| b.rules.iter())
    }
}

fn broker_conf(e: &Entries, ov: &Overrides, etc: &Path, errors: &mut Vec<ConfError>) -> BrokerConf {
    let get = |k: &str, d: &str| e.get(k).map(|x| x.value.clone()).unwrap_or_else(|| d.to_string());
    let mut num = |k: &str, d: u64, max: u64| -> u64 {
        match e.get(k) {
            None => d,
            Some(x) => match x.value.parse::<u64>() {
                Ok(v) if v <= max => v,
                _ => {
                    errors.push(ConfError::new(
                        &x.origin,
                        format!("`{k}` must be an integer in 0..={max}, found `{}`", x.value),
                    ));
                    d
                }
            },
        }
    };
    let node_id = num("node.id", 1, 1023) as u16;
    let queue_capacity = num("persist.queue_capacity", 100_000, u32::MAX as u64).max(1) as usize;
    let batch_size = num("persist.batch_size", 1000, 65_535).max(1) as usize;
    let max_packet_size = num("mqtt.max_packet_size", 1 << 20, 268_435_455) as usize;
    let d = MqttLimits::default();
    let mqtt = MqttLimits {
        max_inflight: num("mqtt.max_inflight", d.max_inflight.into(), 65_535).max(1) as u16,
        max_keepalive: num("mqtt.max_keepalive", d.max_keepalive.into(), 65_535).max(1) as u16,
        max_topic_alias: num("mqtt.max_topic_alias", d.max_topic_alias.into(), 65_535) as u16,
        max_topic_length: num("mqtt.max_topic_length", d.max_topic_length as u64, 65_535).max(1) as usize,
        max_topic_levels: num("mqtt.max_topic_levels", d.max_topic_levels as u64, 65_535).max(1) as usize,
        max_subscriptions: num("mqtt.max_subscriptions", d.max_subscriptions as u64, u32::MAX as u64) as usize,
        max_connections: num("mqtt.max_connections", d.max_connections as u64, 10_000_000).max(1) as usize,
        router_segment_size: num("mqtt.router_segment_size", d.router_segment_size as u64, 1 << 30).max(1024) as usize,
        router_segments: num("mqtt.router_segments", d.router_segments as u64, 1024).max(1) as usize,
    };
    let fetch_timeout = Duration::from_millis(num("persist.fetch_timeout", 5000, 600_000));
    let batch_linger = Duration::from_micros(num("persist.batch_linger", 0, 1_000_000));
    let write_timeout = Duration::from_millis(num("persist.write_timeout", 10_000, 3_600_000).max(1));
    let mut plugins = Vec::new();
    let load = get("plugins.load", "sqlite");
    for name in load.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match Db::parse(name) {
            Some(db) if !plugins.contains(&db) => plugins.push(db),
            Some(_) => {}
            None => {
                let origin = e.get("plugins.load").map(|x| x.origin.clone()).unwrap_or(Origin::Default);
                errors.push(ConfError::new(
                    &origin,
                    format!(
                        "unknown backend `{name}` in plugins.load{}",
                        did_you_mean(name, Db::ALL.iter().map(|d| d.name()))
                    ),
                ));
            }
        }
    }
    let no_loss = match e.get("persist.no_loss") {
        None => NoLoss::Auto,
        Some(x) if x.value == "auto" => NoLoss::Auto,
        Some(x) => match parse_bool(&x.value) {
            Some(true) => NoLoss::On,
            Some(false) => NoLoss::Off,
            None => {
                errors.push(ConfError::new(
                    &x.origin,
                    format!("`persist.no_loss` must be auto, on or off, found `{}`", x.value),
                ));
                NoLoss::Auto
            }
        },
    };
    let storage_low_priority = match e.get("persist.storage_priority") {
        None => false,
        Some(x) if x.value == "normal" => false,
        Some(x) if x.value == "low" => true,
        Some(x) => {
            errors.push(ConfError::new(
                &x.origin,
                format!("`persist.storage_priority` must be normal or low, found `{}`", x.value),
            ));
            false
        }
    };
    let metrics_listen = e
        .get("metrics.listen")
        .map(|x| x.value.clone())
        .filter(|v| !v.is_empty() && v != "off");
    BrokerConf {
        node_name: get("node.name", "mqtt-persist@127.0.0.1").into(),
        node_id,
        listen: ov.listen.clone().unwrap_or_else(|| get("listener.tcp.external", "0.0.0.0:1883")),
        plugins,
        data_dir: ov.data_dir.clone().unwrap_or_else(|| PathBuf::from(get("data.dir", "data"))),
        log_level: get("log.level", "info"),
        metrics_listen,
        no_loss,
        queue_capacity,
        batch_size,
        batch_linger,
        fetch_timeout,
        write_timeout,
        storage_low_priority,
        max_packet_size,
        mqtt,
        acl_file: e
            .get("acl.file")
            .map(|x| x.value.trim().to_string())
            .filter(|v| !v.is_empty() && v != "off")
            .map(|v| etc.join(v)),
    }
}

fn backend_conf(
    db: Db,
    file: PathBuf,
    e: &Entries,
    broker: &BrokerConf,
    errors: &mut Vec<ConfError>,
    warnings: &mut Vec<String>,
) -> BackendConf {
    let hook_prefix = format!("backend.{db}.hook.");
    let global_prefix = format!("backend.{db}.");
    let pool_prefix = db.pool_prefix();
    let mut pools: BTreeMap<String, PoolConf> = BTreeMap::new();
    let mut raw_rules = Vec::new();
    let mut defaults = OfflineOpts::default();
    let mut message_ttl = None;
    let mut spool_dir = None;
    let mut spool_max_bytes = 1u64 << 30;
    let mut ignored_once = std::collections::HashSet::new();
    for entry in e.map.values() {
        let key = entry.key.as_str();
        if let Some(rest) = key.strip_prefix(&hook_prefix) {
            raw_rules.push((rest, entry));
            continue;
        }
        let global = key.strip_prefix(&global_prefix);
        match global {
            Some("max_returned_count") => {
                match parse_max_returned_count(&entry.value) {
                    Ok(v) => defaults.max_returned_count = v,
                    Err(m) => errors.push(ConfError::new(&entry.origin, m)),
                }
                continue;
            }
            Some("time_range") => {
                match parse_duration(&entry.value) {
                    Ok(v) => defaults.time_range = v,
                    Err(m) => errors.push(ConfError::new(&entry.origin, m)),
                }
                continue;
            }
            Some("message_ttl") => {
                match parse_duration(&entry.value) {
                    Ok(v) => message_ttl = v,
                    Err(m) => errors.push(ConfError::new(&entry.origin, m)),
                }
                continue;
            }
            Some("spool.max_size") => {
                match parse_size("spool.max_size", &entry.value) {
                    Ok(v) => spool_max_bytes = v,
                    Err(m) => errors.push(ConfError::new(&entry.origin, m)),
                }
                continue;
            }
            Some("spool.dir") => {
                spool_dir = Some(PathBuf::from(&entry.value)).filter(|p| !p.as_os_str().is_empty());
                continue;
            }
            Some(g) if g.starts_with("topology.") || g.starts_with("msg.") => {
                warnings.push(format!("{}: `{key}` is accepted for EMQX compatibility and ignored", entry.origin));
                continue;
            }
            _ => {}
        }
        let Some(rest) = key.strip_prefix(pool_prefix) else {
            errors.push(ConfError::new(
                &entry.origin,
                format!("unknown key `{key}` in the {db} conf: expected `{pool_prefix}<pool>.<attr>` or `backend.{db}.hook.<hook>.<N>`"),
            ));
            continue;
        };
        let Some((pool, attr)) = rest.split_once('.') else {
            errors.push(ConfError::new(
                &entry.origin,
                format!("unknown key `{key}`: expected `{pool_prefix}<pool>.<attr>`"),
            ));
            continue;
        };
        if db.ignored_pool_keys().contains(&attr) {
            if ignored_once.insert(attr.to_string()) {
                warnings.push(format!("{}: `{attr}` is accepted for EMQX compatibility and ignored", entry.origin));
            }
            continue;
        }
        if !db.pool_keys().contains(&attr) {
            errors.push(ConfError::new(
                &entry.origin,
                format!(
                    "unknown {db} pool setting `{attr}`{}",
                    did_you_mean(attr, db.pool_keys().iter().copied())
                ),
            ));
            continue;
        }
        let p = pools.entry(pool.to_string()).or_insert_with(|| PoolConf {
            db,
            name: pool.to_string(),
            attrs: BTreeMap::new(),
            origin: entry.origin.clone(),
        });
        p.attrs.insert(attr.to_string(), entry.clone());
    }
    let mut rules = Vec::new();
    for (rest, entry) in raw_rules {
        match parse_rule(db, rest, entry, &pools, &defaults) {
            Ok(r) => {
                if r.topic.is_some() && !r.hook.has_topic() {
                    warnings.push(format!("{}: `topic` is ignored on {} rules", entry.origin, r.hook));
                }
                rules.push(r)
            }
            Err(m) => errors.push(ConfError::new(&entry.origin, m)),
        }
    }
    rules.sort_by_key(|r| (r.hook, r.n));
    let _ = broker;
    BackendConf {
        db,
        file,
        pools,
        rules,
        message_ttl,
        spool_dir,
        spool_max_bytes,
    }
}

/// `1048576`, `512KB`, `64MB`, `2GB` (binary multiples) for the setting `key`.
fn parse_size(key: &str, s: &str) -> Result<u64, String> {
    let upper = s.trim().to_ascii_uppercase();
    let t = upper.strip_suffix('B').unwrap_or(&upper);
    let (num, mult) = if let Some(n) = t.strip_suffix('K') {
        (n, 1u64 << 10)
    } else if let Some(n) = t.strip_suffix('M') {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix('G') {
        (n, 1 << 30)
    } else {
        (t, 1)
    };
    let too_large = || format!("`{key}` = `{s}` is too large: at most {} bytes", u64::MAX);
    match num.trim().parse::<u64>() {
        Ok(n) => n.checked_mul(mult).ok_or_else(too_large),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(too_large()),
        Err(_) => Err(format!("`{key}` must be a size like 512MB or 2GB, found `{s}`")),
    }
}

/// The longest duration accepted: backends subtract durations, in milliseconds, from an `i64` clock.
const MAX_DURATION_SECS: u64 = i64::MAX as u64 / 1000;

/// `2h`, `30m`, `45s`, `1d`, plain seconds, or `infinity`/`0`/`off` for none.
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim().trim_matches('"');
    if matches!(s, "infinity" | "off" | "0" | "") {
        return Ok(None);
    }
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'd')) => (&s[..i], 86_400u64),
        Some((i, 'h')) => (&s[..i], 3_600),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 's')) => (&s[..i], 1),
        _ => (s, 1),
    };
    let too_large = || format!("duration `{s}` is too large: at most {MAX_DURATION_SECS}s; write `infinity` for no limit");
    match num.trim().parse::<u64>() {
        Ok(n) => match n.checked_mul(mult) {
            // `0s` means what `0` means: off. A zero `message_ttl` would otherwise delete every
            // stored message, and a zero `time_range` would fetch nothing.
            Some(0) => Ok(None),
            Some(secs) if secs <= MAX_DURATION_SECS => Ok(Some(Duration::from_secs(secs))),
            _ => Err(too_large()),
        },
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(too_large()),
        Err(_) => Err(format!(
            "invalid duration `{s}`: expected e.g. `2h`, `30m`, `10s`, `1d` or `infinity`"
        )),
    }
}

/// `max_returned_count`: 1..=u32::MAX, or `infinity` (EMQX's spelling) for no limit. 0 is refused
/// rather than read as "no limit": a fetch delivers the newest N, so 0 would silently deliver
/// no offline messages, while some users write 0 meaning
/// unlimited; either reading would surprise someone.
fn parse_max_returned_count(s: &str) -> Result<Option<u32>, String> {
    let s = s.trim().trim_matches('"');
    if s == "infinity" {
        return Ok(None);
    }
    let out_of_range = || {
        format!(
            "`max_returned_count` = {s} is out of range: at most {}, or \"infinity\" for no limit",
            u32::MAX
        )
    };
    match s.parse::<u64>() {
        Ok(0) => Err(
            "`max_returned_count` = 0 would deliver no offline messages: write a count of at least 1, or \"infinity\" for no limit".into(),
        ),
        Ok(n) => u32::try_from(n).map(Some).map_err(|_| out_of_range()),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(out_of_range()),
        Err(_) => Err(format!(
            "`max_returned_count` must be an integer in 1..={} or \"infinity\" (no limit), found `{s}`",
            u32::MAX
        )),
    }
}

const RULE_FIELDS: [&str; 6] = ["topic", "action", "pool", "offline_opts", "expired_time", "payload_format"];

fn parse_rule(db: Db, rest: &str, entry: &Entry, pools: &BTreeMap<String, PoolConf>, defaults: &OfflineOpts) -> Result<Rule, String> {
    let Some((hook_name, n)) = rest.rsplit_once('.') else {
        return Err(format!(
            "malformed hook key `{}`: expected `backend.{db}.hook.<hook>.<N>`",
            entry.key
        ));
    };
    let hook = Hook::parse(hook_name).ok_or_else(|| format!("unknown hook `{hook_name}`{}", did_you_mean(hook_name, Hook::all_names())))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("hook rule number must be an integer, found `{n}` in `{}`", entry.key))?;
    let json: serde_json::Value = serde_json::from_str(&entry.value).map_err(|e| format!("invalid JSON value: {e}"))?;
    let obj = json.as_object().ok_or("hook value must be a JSON object")?;
    for k in obj.keys() {
        if !RULE_FIELDS.contains(&k.as_str()) {
            return Err(format!("unknown field `{k}` in hook rule{}", did_you_mean(k, RULE_FIELDS)));
        }
    }
    let topic = match obj.get("topic") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(t)) if crate::topic::valid_filter(t) => Some(t.clone()),
        Some(t) => return Err(format!("`topic` must be a valid MQTT topic filter, found {t}")),
    };
    let pool = match obj.get("pool") {
        Some(serde_json::Value::String(p)) => p.clone(),
        None if pools.len() == 1 => pools.keys().next().cloned().unwrap_or_default(),
        None => return Err("`pool` must name a configured pool".into()),
        Some(v) => return Err(format!("`pool` must be a string naming a configured pool, found {v}")),
    };
    if !pools.contains_key(&pool) {
        let names: Vec<&str> = pools.keys().map(String::as_str).collect();
        return Err(format!(
            "unknown pool `{pool}`{} (configured: {})",
            did_you_mean(&pool, names.iter().copied()),
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        ));
    }
    let action = obj
        .get("action")
        .and_then(|a| a.as_object())
        .ok_or("`action` must be an object with `function` or a statement list")?;
    let key = db.statement_key();
    let statement_keys: Vec<&str> = Db::ALL.iter().map(|d| d.statement_key()).collect();
    // EMQX let `function` win silently; a rule that also lists statements means something else.
    if action.contains_key("function") {
        if let Some(k) = action.keys().find(|k| statement_keys.contains(&k.as_str())) {
            return Err(format!(
                "`action` has both `function` and `{k}`, which are exclusive: keep `function` to run the builtin, or `{key}` to run your own statements (one rule each)"
            ));
        }
    }
    if let Some(k) = action.keys().find(|k| *k != "function" && *k != key) {
        return Err(if statement_keys.contains(&k.as_str()) {
            format!("`action.{k}` is not for {db} rules: write `{key}` (or `function`)")
        } else if RULE_FIELDS.contains(&k.as_str()) {
            format!("`{k}` belongs to the rule, not inside `action`: move it next to `action`")
        } else {
            format!(
                "unknown field `{k}` in `action`{}: expected `function` or `{key}`",
                did_you_mean(k, ["function", key])
            )
        });
    }
    let action = if let Some(f) = action.get("function") {
        let name = f.as_str().ok_or("`action.function` must be a string")?;
        let b = Builtin::parse(name, db).ok_or_else(|| format!("unknown function `{name}`{}", did_you_mean(name, Builtin::names())))?;
        if b.hook() != hook {
            return Err(format!("function `{name}` belongs to hook {}, not {hook}", b.hook()));
        }
        Action::Builtin(b)
    } else {
        // The items stay JSON: statement text for SQL and Redis, documents for MongoDB; the
        // backend's compiler says what its language accepts.
        let items = match action.get(key) {
            Some(serde_json::Value::Array(items)) => items.clone(),
            Some(v @ (serde_json::Value::String(_) | serde_json::Value::Object(_))) => vec![v.clone()],
            Some(v) if db == Db::Mongo => return Err(format!("`action.{key}` must be a list of documents, found {v}")),
            Some(v) => return Err(format!("`action.{key}` must be a list of strings, found {v}")),
            None => return Err(format!("`action` needs `function` or `{key}` for {db}")),
        };
        if items.is_empty() {
            return Err(format!("`action.{key}` is empty: list at least one statement, or use `function`"));
        }
        Action::Custom {
            key: key.to_string(),
            items,
        }
    };
    let mut offline = defaults.clone();
    if let Some(o) = obj.get("offline_opts") {
        let o = o.as_object().ok_or("`offline_opts` must be an object")?;
        for (k, v) in o {
            match k.as_str() {
                "max_returned_count" => {
                    // The same text as the global key: `500`, or `"infinity"` for no limit.
                    offline.max_returned_count = parse_max_returned_count(&v.to_string())?
                }
                "time_range" => {
                    let s = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        _ => return Err("`time_range` must be a duration string like \"2h\"".into()),
                    };
                    offline.time_range = parse_duration(&s)?;
                }
                "first_subscribe" => {
                    offline.first_subscribe_time_range = match v.as_str() {
                        Some("time_range") => true,
                        Some("newest") => false,
                        _ => {
                            return Err(format!(
                                "`first_subscribe` must be \"newest\" (the default) or \"time_range\", found {v}"
                            ))
                        }
                    }
                }
                "clean_start" => {
                    offline.clean_start_fetch = match v.as_str() {
                        Some("fetch") => true,
                        Some("discard") => false,
                        _ => {
                            return Err(format!(
                                "`clean_start` must be \"discard\" (the default: a clean session has no read pointers) or \"fetch\" (EMQX 4), found {v}"
                            ))
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown field `{other}` in offline_opts{}",
                        did_you_mean(other, ["max_returned_count", "time_range", "first_subscribe", "clean_start"])
                    ))
                }
            }
        }
    }
    // EMQX documented `<= 0` as "the default" only for its global `msg.expired_after`; no EMQX
    // rule we know of writes 0 here, so a zero or negative TTL is an error, not a silent 2h.
    let expired_time = match obj.get("expired_time") {
        None => 7200,
        Some(v) => match v.as_i64() {
            Some(s) if s > 0 => s as u64,
            _ => {
                return Err(format!(
                    "`expired_time` must be a positive integer (seconds), found {v}: omit it for the default, 7200"
                ))
            }
        },
    };
    let payload_format = match obj.get("payload_format") {
        None => None,
        Some(serde_json::Value::String(s)) if s == "mongo_json" || s == "plain_text" => Some(s.clone()),
        Some(v) => return Err(format!("`payload_format` must be \"mongo_json\" or \"plain_text\", found {v}")),
    };
    Ok(Rule {
        db,
        hook,
        n,
        topic,
        action,
        pool,
        offline,
        expired_time: Duration::from_secs(expired_time),
        payload_format,
        origin: entry.origin.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_checked_not_wrapped() {
        assert_eq!(parse_duration("2h"), Ok(Some(Duration::from_secs(7200))));
        assert_eq!(parse_duration("0s"), Ok(None));
        assert_eq!(parse_duration("infinity"), Ok(None));
        let max = format!("{MAX_DURATION_SECS}s");
        assert_eq!(parse_duration(&max), Ok(Some(Duration::from_secs(MAX_DURATION_SECS))));
        for big in ["9223372036854776s", "213503982334602d", "18446744073709551616"] {
            let e = parse_duration(big).unwrap_err();
            assert!(e.contains("too large"), "{big}: {e}");
        }
        assert!(parse_duration("-1s").unwrap_err().contains("invalid duration"));
    }

    #[test]
    fn sizes_are_checked_not_wrapped() {
        assert_eq!(parse_size("k", "512KB"), Ok(512 << 10));
        assert_eq!(parse_size("k", "2gb"), Ok(2 << 30));
        assert_eq!(parse_size("k", "1048576"), Ok(1 << 20));
        assert!(parse_size("k", "17179869184GB").unwrap_err().contains("too large"));
        assert!(parse_size("k", "18446744073709551616").unwrap_err().contains("too large"));
        assert!(parse_size("k", "5BB").unwrap_err().contains("must be a size"));
    }

    #[test]
    fn max_returned_count_range() {
        assert_eq!(parse_max_returned_count("500"), Ok(Some(500)));
        assert_eq!(parse_max_returned_count("4294967295"), Ok(Some(u32::MAX)));
        assert_eq!(parse_max_returned_count("\"infinity\""), Ok(None));
        assert!(parse_max_returned_count("4294967296").unwrap_err().contains("out of range"));
        assert!(parse_max_returned_count("0")
            .unwrap_err()
            .contains("would deliver no offline messages"));
        assert!(parse_max_returned_count("1.5").unwrap_err().contains("must be an integer"));
    }
}
