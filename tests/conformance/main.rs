//! The conformance suite: every scenario against every backend. A backend whose server is
//! unreachable fails loudly unless `MQTT_PERSIST_SKIP` names it.

#[path = "../common/mod.rs"]
mod common;
mod integrity;
mod scenarios;

macro_rules! conformance {
    ($module:ident, $kit:ty) => {
        mod $module {
            use super::common::kits::Kit;
            macro_rules! scenario {
                ($name:ident) => {
                    scenario!(scenarios::$name);
                };
                ($file:ident :: $name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        if super::common::skipped(<$kit as Kit>::DB) {
                            eprintln!(
                                "SKIPPED: {} on {} (MQTT_PERSIST_SKIP)",
                                stringify!($name),
                                <$kit as Kit>::DB
                            );
                            return;
                        }
                        super::$file::$name::<$kit>().await;
                    }
                };
            }
            scenario!(retained_message_survives_a_broker_restart);
            scenario!(retained_lookup_matches_wildcards_with_one_copy_per_topic);
            scenario!(offline_messages_reach_only_the_resubscribing_client);
            scenario!(clean_sessions_have_no_read_pointers);
            scenario!(mqtt5_properties_and_expiry_survive_storage);
            scenario!(persistent_session_gets_queued_messages_exactly_once);
            scenario!(client_state_follows_connects_and_takeovers);
            scenario!(custom_statements_store_hostile_input_verbatim);
            scenario!(binary_payloads_round_trip_through_offline_fetch);
            scenario!(wildcard_fetch_delivers_only_matching_topics);
            scenario!(qos0_is_not_stored_by_on_message_publish);
            scenario!(subscribe_lookup_subscribes_the_client_from_storage);
            scenario!(queue_messages_are_deleted_by_the_first_ack);
            scenario!(keep_latest_delivers_only_the_newest_message_per_topic);
            scenario!(offline_fetch_returns_the_newest_n_at_the_lower_qos);
            scenario!(unsubscribe_deletes_the_pointer);
            scenario!(leading_wildcards_do_not_fetch_dollar_topics);
            scenario!(retained_lookup_returns_every_topic_at_any_qos);
            scenario!(first_subscribe_time_range_delivers_recent_messages);
            scenario!(out_of_order_acks_never_move_the_pointer_back);
            scenario!(stored_messages_older_than_message_ttl_are_deleted);
            scenario!(rules_run_in_n_order_and_bind_username_peerhost_node);
            scenario!(one_clients_writes_keep_its_event_order);
            scenario!(an_unsubscribe_right_after_the_subscribe_leaves_no_pointer);
            scenario!(hash_filters_match_the_parent_level_in_fetch_and_retained);
            scenario!(integrity::unsubscribe_then_subscribe_keeps_the_new_subscriptions_pointer);
            scenario!(integrity::a_refused_write_is_never_acked_as_stored);
        }
    };
}

conformance!(sqlite, crate::common::kits::SqliteKit);
conformance!(pgsql, crate::common::kits::PgKit);
conformance!(pgsql_unprepared, crate::common::kits::PgUnpreparedKit);
conformance!(redis, crate::common::kits::RedisKit);
