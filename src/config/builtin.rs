//! Builtin functions (SPEC §3): conf names → one enum, with the hook each belongs to.
//! Names that are aliases on some databases (pubsub, cassa's `on_subscription_lookup`) map to the
//! same variant, so every backend implements each behaviour once.

use super::Db;
use crate::model::Hook;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    ClientConnected,
    ClientDisconnected,
    SubscribeLookup,
    /// Store QoS 1/2 messages.
    MessagePublish,
    /// Store every message, QoS 0 too.
    MessageStore,
    MessageRetain,
    RetainDelete,
    /// Offline delivery by read pointer (one-to-many).
    MessageFetch,
    RetainLookup,
    /// Advance the read pointer.
    MessageAcked,
    MessageDelivered,
    AckedDelete,
    FetchForQueue,
    AckedForQueue,
    StoreKeepLatest,
    FetchForKeepLatest,
    AckedForKeepLatest,
}

const NAMES: &[(&str, Builtin)] = &[
    ("on_client_connected", Builtin::ClientConnected),
    ("on_client_disconnected", Builtin::ClientDisconnected),
    ("on_subscribe_lookup", Builtin::SubscribeLookup),
    ("on_subscription_lookup", Builtin::SubscribeLookup),
    ("on_message_publish", Builtin::MessagePublish),
    ("on_message_store", Builtin::MessageStore),
    ("on_message_retain", Builtin::MessageRetain),
    ("on_retain_delete", Builtin::RetainDelete),
    ("on_message_fetch", Builtin::MessageFetch),
    ("on_message_fetch_for_pubsub", Builtin::MessageFetch),
    ("on_retain_lookup", Builtin::RetainLookup),
    ("on_message_acked", Builtin::MessageAcked),
    ("on_message_acked_for_pubsub", Builtin::MessageAcked),
    ("on_message_delivered", Builtin::MessageDelivered),
    ("on_acked_delete", Builtin::AckedDelete),
    ("on_message_fetch_for_queue", Builtin::FetchForQueue),
    ("on_message_acked_for_queue", Builtin::AckedForQueue),
    ("on_message_store_keep_latest", Builtin::StoreKeepLatest),
    ("on_message_fetch_for_keep_latest", Builtin::FetchForKeepLatest),
    ("on_message_acked_for_keep_latest", Builtin::AckedForKeepLatest),
];

impl Builtin {
    /// Resolves a conf name for a database. `on_subscription_lookup` is cassa's spelling only.
    pub fn parse(name: &str, db: Db) -> Option<Builtin> {
        if name == "on_subscription_lookup" && db != Db::Cassa {
            return None;
        }
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    pub fn names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(n, _)| *n)
    }

    pub fn hook(self) -> Hook {
        use Builtin::*;
        match self {
            ClientConnected | SubscribeLookup => Hook::ClientConnected,
            ClientDisconnected => Hook::ClientDisconnected,
            MessagePublish | MessageStore | MessageRetain | RetainDelete | StoreKeepLatest => Hook::MessagePublish,
            MessageFetch | RetainLookup | FetchForQueue | FetchForKeepLatest => Hook::SessionSubscribed,
            MessageAcked | AckedForQueue | AckedForKeepLatest => Hook::MessageAcked,
            MessageDelivered => Hook::MessageDelivered,
            AckedDelete => Hook::SessionUnsubscribed,
        }
    }

    /// Functions that store the published message (and so gate PUBACKs in no-loss mode).
    pub fn stores_message(self) -> bool {
        matches!(self, Builtin::MessagePublish | Builtin::MessageStore | Builtin::StoreKeepLatest)
    }

    /// Functions that return stored messages for injection on subscribe.
    pub fn delivers_stored(self) -> bool {
        matches!(
            self,
            Builtin::MessageFetch | Builtin::RetainLookup | Builtin::FetchForQueue | Builtin::FetchForKeepLatest
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_to_one_behaviour() {
        assert_eq!(
            Builtin::parse("on_message_fetch_for_pubsub", Db::Redis),
            Some(Builtin::MessageFetch)
        );
        assert_eq!(Builtin::parse("on_subscription_lookup", Db::Cassa), Some(Builtin::SubscribeLookup));
        assert_eq!(Builtin::parse("on_subscription_lookup", Db::Pgsql), None);
        assert_eq!(Builtin::parse("on_mesage_fetch", Db::Pgsql), None);
        for (name, b) in NAMES {
            assert!(b.hook().vars().len() > 1, "{name}");
        }
    }
}
