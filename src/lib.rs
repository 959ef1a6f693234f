//! mqtt-persist: an MQTT broker (rumqttd's router behind our own connection layer) that writes
//! broker events to databases the way EMQX 4 "backend" plugins did.
//!
//! Events flow `broker → hooks → backends`, over the shared `model`; the module graph and the
//! `Backend` seam are drawn in docs/architecture.md (and checked by tests/modules.rs).

pub mod acl;
pub mod actions;
pub mod app;
pub mod backends;
pub mod broker;
pub mod config;
pub mod deadletter;
pub mod hooks;
pub mod metrics;
pub mod model;
pub mod ratelimit;
pub mod topic;

/// `mqtt-persist schema print <db>`.
pub fn schema(db: config::Db) -> Option<&'static str> {
    match db {
        #[cfg(feature = "sqlite")]
        config::Db::Sqlite => Some(backends::sqlite::SCHEMA),
        #[cfg(feature = "pgsql")]
        config::Db::Pgsql => Some(backends::pgsql::SCHEMA),
        #[cfg(feature = "redis")]
        config::Db::Redis => Some(include_str!("../schema/redis.txt")),
        _ => None,
    }
}
