//! Rules per hook, in `N` order, each bound to its pool. Turns events into queued writes
//! (never waiting on the database, except the no-loss back-pressure) and runs the reads that
//! subscribe and connect rules need.

use crate::backends::queue::Job;
use crate::backends::{Cursor, CustomAction, CustomOp, FetchKind, FetchRequest, Page, Pool, WriteOp};
use crate::config::{Action, Builtin, ConfError, Config, NoLoss, Rule};
use crate::metrics::{Registry, RuleMetrics};
use crate::model::{now_ms, Client, Event, Hook, Injection, Message, StoredMessage, Ticket};
use crate::ratelimit::RateLimited;
use crate::topic;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

struct Bound {
    rule: Rule,
    pool: Arc<Pool>,
    metrics: Arc<RuleMetrics>,
    /// The rule's own statements, compiled by its backend.
    custom: Option<Arc<dyn CustomAction>>,
}

impl Bound {
    fn matches(&self, ev_topic: Option<&str>) -> bool {
        match (&self.rule.topic, ev_topic) {
            (None, _) | (_, None) => true,
            // Session hooks test the subscription filter string as if it were a topic (EMQX).
            (Some(f), Some(t)) => topic::matches(t, f),
        }
    }

    /// The custom op for an event, if this rule has one.
    fn custom_op(&self, ev: &Event, node: &Arc<str>) -> Option<WriteOp> {
        let action = self.custom.as_ref()?;
        Some(WriteOp::Custom(CustomOp {
            args: action.bind(ev, node),
            action: action.clone(),
            skip: 0,
        }))
    }
}

/// One rule's own statements compiled by its backend (`None`: a builtin); the check
/// [`Config::load_checked`] runs.
pub fn compile_rule(rule: &Rule) -> Result<Option<Arc<dyn CustomAction>>, String> {
    match &rule.action {
        Action::Builtin(_) => Ok(None),
        Action::Custom { key, items } => crate::backends::compile_custom(rule.db, rule.hook, key, items).map(Some),
    }
}

/// Compiles every rule's own statements with its database's backend; the errors name the
/// rule's conf line. `check` runs it as well, so a bad template never waits for a start.
pub fn compile(conf: &Config) -> Result<Vec<Option<Arc<dyn CustomAction>>>, Vec<ConfError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for rule in conf.rules() {
        match compile_rule(rule) {
            Ok(a) => out.push(a),
            Err(e) => errors.push(ConfError::new(&rule.origin, e)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What a new subscription gets from storage before its live traffic (SPEC §3.1, §3.2): its
/// rules' reads, opened when it subscribed (pointers created, bounds fixed), then read a page
/// at a time with [`Dispatcher::next_page`] as the subscriber acks.
pub struct StoredReads {
    client: Arc<Client>,
    filter: Arc<str>,
    reads: VecDeque<OpenRead>,
    /// Msgids delivered so far, kept only when several reads may return the same message (two
    /// pools storing the same publishes); at most [`MAX_SEEN`], then no longer deduplicated.
    seen: Option<HashSet<(bool, u64)>>,
}

const MAX_SEEN: usize = 100_000;

/// One rule's opened read.
struct OpenRead {
    pool: Arc<Pool>,
    metrics: Arc<RuleMetrics>,
    /// `None`: a retained lookup.
    fetch: Option<FetchRequest>,
    /// Messages the opening returned itself (the builtin backends return none).
    first: Vec<StoredMessage>,
    next: Option<Cursor>,
}

impl StoredReads {
    pub fn filter(&self) -> &Arc<str> {
        &self.filter
    }
}

/// A subscription's stored messages could not be read: nothing is lost (pointers move only on
/// acks), and the subscription's live traffic goes on.
fn warn_unread(rule: &str, clientid: &str, filter: &str, e: &str) {
    static SKIPPED: RateLimited = RateLimited::new();
    SKIPPED.warn(|| {
        format!("rule {rule}: stored messages for {clientid} on {filter:?} not read ({e}); live traffic goes on, a later subscription reads them")
    });
}

pub struct Dispatcher {
    node: Arc<str>,
    hooks: BTreeMap<Hook, Vec<Bound>>,
    no_loss: bool,
    retain_in_db: Vec<Option<String>>,
    has_retain_lookup: bool,
    /// Some `message.publish` rule may write a QoS 0 message that is not retained
    /// (`on_message_store`, keep-latest, a rule's own statements): without one, such a
    /// message costs the hooks nothing.
    writes_plain_qos0: bool,
    fetch_timeout: Duration,
    /// Some fetch rule keeps pointers of session-less clients (`offline_opts.clean_start`).
    clean_start_fetch: bool,
    pub pools: Vec<Arc<Pool>>,
}

/// Whether the builtin `f` of a `message.publish` rule writes anything for a message of this
/// QoS, retain flag and payload: the one place that decides, for the dispatch and for the
/// connection's shortcut past the hooks for plain QoS 0 ([`Dispatcher::writes_publish`]).
fn publish_builtin_writes(f: Builtin, qos: u8, retain: bool, empty_payload: bool) -> bool {
    let empty_retained = retain && empty_payload;
    match f {
        Builtin::MessagePublish => qos > 0 && !empty_retained,
        Builtin::MessageStore | Builtin::StoreKeepLatest => !empty_retained,
        Builtin::MessageRetain => retain && !empty_payload,
        Builtin::RetainDelete => empty_retained,
        _ => false,
    }
}

impl Dispatcher {
    /// Binds rules to connected pools (keyed `db:pool`); `custom` is [`compile`]'s answer for
    /// the same configuration.
    pub fn new(
        conf: &Config,
        custom: Vec<Option<Arc<dyn CustomAction>>>,
        pools: &BTreeMap<String, Arc<Pool>>,
        registry: &Registry,
    ) -> Dispatcher {
        let mut hooks: BTreeMap<Hook, Vec<Bound>> = BTreeMap::new();
        let mut metrics = registry.rules.lock();
        // A reload keeps the counters of rules that are still there (same label): Prometheus
        // series continue instead of resetting to zero.
        let previous: std::collections::HashMap<String, Arc<RuleMetrics>> = metrics.drain(..).map(|m| (m.label.clone(), m)).collect();
        for (rule, custom) in conf.rules().zip(custom) {
            let Some(pool) = pools.get(&format!("{}:{}", rule.db, rule.pool)) else {
                continue;
            };
            let label = rule.label();
            let m = previous.get(&label).cloned().unwrap_or_else(|| RuleMetrics::new(label));
            metrics.push(m.clone());
            hooks.entry(rule.hook).or_default().push(Bound {
                rule: rule.clone(),
                pool: pool.clone(),
                metrics: m,
                custom,
            });
        }
        for rules in hooks.values_mut() {
            rules.sort_by_key(|b| (b.rule.n, b.rule.db));
        }
        let storing = hooks
            .get(&Hook::MessagePublish)
            .is_some_and(|r| r.iter().any(|b| b.rule.builtin().is_none_or(Builtin::stores_message)));
        let no_loss = match conf.broker.no_loss {
            NoLoss::On => true,
            NoLoss::Off => false,
            NoLoss::Auto => storing,
        };
        let retain_in_db = hooks
            .get(&Hook::MessagePublish)
            .map(|r| {
                r.iter()
                    .filter(|b| b.rule.builtin() == Some(Builtin::MessageRetain))
                    .map(|b| b.rule.topic.clone())
                    .collect()
            })
            .unwrap_or_default();
        let has_retain_lookup = hooks
            .get(&Hook::SessionSubscribed)
            .is_some_and(|r| r.iter().any(|b| b.rule.builtin() == Some(Builtin::RetainLookup)));
        let writes_plain_qos0 = hooks.get(&Hook::MessagePublish).is_some_and(|r| {
            r.iter()
                .any(|b| b.rule.builtin().is_none_or(|f| publish_builtin_writes(f, 0, false, false)))
        });
        let clean_start_fetch = hooks
            .get(&Hook::SessionSubscribed)
            .is_some_and(|r| r.iter().any(|b| b.rule.offline.clean_start_fetch));
        let mut seen = HashSet::new();
        let pools: Vec<Arc<Pool>> = pools
            .values()
            .filter(|p| seen.insert(p.queue.label().to_string()))
            .cloned()
            .collect();
        *registry.pools.lock() = pools.iter().map(|p| Arc::downgrade(&p.queue.metrics)).collect();
        Dispatcher {
            node: conf.broker.node_name.clone(),
            hooks,
            no_loss,
            retain_in_db,
            has_retain_lookup,
            writes_plain_qos0,
            fetch_timeout: conf.broker.fetch_timeout,
            clean_start_fetch,
            pools,
        }
    }

    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.get(&hook).is_some_and(|r| !r.is_empty())
    }

    pub fn no_loss(&self) -> bool {
        self.no_loss
    }

    /// Deliveries must carry the msgid across the router (delivered/acked rules, fetch dedup).
    ///
    /// It costs a user property per publish, so it is on only when something reads it: rules on
    /// delivered/acked, or fetches whose injected messages must not arrive twice (retained
    /// lookups are never deduplicated against live traffic).
    pub fn needs_meta(&self) -> bool {
        let fetches = self
            .rules(Hook::SessionSubscribed)
            .iter()
            .any(|b| b.rule.builtin().is_some_and(|f| f.delivers_stored() && f != Builtin::RetainLookup));
        self.has(Hook::MessageDelivered) || self.has(Hook::MessageAcked) || fetches
    }

    /// Whether `message.publish` rules may write anything for a message of this QoS and retain
    /// flag: a plain QoS 0 message with the default rules (which store QoS 1/2 and retained
    /// messages) needs no msgid, no event, no dispatch.
    pub fn writes_publish(&self, qos: u8, retain: bool) -> bool {
        self.has(Hook::MessagePublish) && (qos > 0 || retain || self.writes_plain_qos0)
    }

    /// [`needs_meta`](Self::needs_meta) for a plain QoS 0 message (one without the retain flag
    /// or with it): it is never acked, and fetches only deduplicate messages a rule stores.
    pub fn needs_meta_qos0(&self) -> bool {
        self.has(Hook::MessageDelivered) || (self.writes_plain_qos0 && self.needs_meta())
    }

    /// When the database keeps retained messages and serves lookups, the router must not
    /// deliver its own copy as well (one copy per topic, SPEC §3.2).
    pub fn retain_in_db(&self, topic: &str) -> bool {
        self.has_retain_lookup
            && self
                .retain_in_db
                .iter()
                .any(|f| f.as_deref().is_none_or(|f| topic::matches(topic, f)))
    }

    fn rules(&self, hook: Hook) -> &[Bound] {
        self.hooks.get(&hook).map(Vec::as_slice).unwrap_or(&[])
    }

    /// `message.publish`. With a ticket (no-loss, QoS>0), storing writes hold it and wait for
    /// queue room; everything else is fire-and-forget.
    pub async fn publish(&self, msg: &Arc<Message>, ticket: Option<&Arc<Ticket>>) {
        let ev = Event::Publish { msg: msg.clone() };
        for b in self.rules(Hook::MessagePublish) {
            if !b.matches(Some(&msg.topic)) {
                continue;
            }
            RuleMetrics::inc(&b.metrics.matched);
            let (op, stores) = match b.rule.builtin() {
                Some(f) if !publish_builtin_writes(f, msg.qos, msg.retain, msg.payload.is_empty()) => continue,
                Some(Builtin::MessagePublish | Builtin::MessageStore) => (
                    WriteOp::StoreMessage {
                        msg: msg.clone(),
                        ttl: b.rule.expired_time,
                    },
                    true,
                ),
                Some(Builtin::StoreKeepLatest) => (
                    WriteOp::StoreLatest {
                        msg: msg.clone(),
                        ttl: b.rule.expired_time,
                    },
                    true,
                ),
                Some(Builtin::MessageRetain) => (
                    WriteOp::RetainUpsert {
                        msg: msg.clone(),
                        ttl: b.rule.expired_time,
                    },
                    false,
                ),
                Some(Builtin::RetainDelete) => (
                    WriteOp::RetainDelete {
                        topic: msg.topic.clone(),
                        msgid: msg.msgid,
                    },
                    false,
                ),
                Some(_) => continue,
                None => match b.custom_op(&ev, &self.node) {
                    Some(op) => (op, true),
                    None => continue,
                },
            };
            let job = Job::new(op, b.metrics.clone(), None, &msg.sender);
            match ticket {
                Some(t) if stores || msg.retain => {
                    b.pool
                        .queue
                        .push(Job {
                            ticket: Some(t.clone()),
                            ..job
                        })
                        .await;
                }
                _ => {
                    b.pool.queue.try_push(job);
                }
            }
        }
    }

    /// Every other hook's writes: never waits.
    pub fn fire(&self, ev: &Event) {
        self.fire_with(ev, None)
    }

    /// Like [`fire`](Self::fire), the event's writes holding `ticket`, so the caller learns
    /// when they are done.
    pub fn fire_with(&self, ev: &Event, ticket: Option<&Arc<Ticket>>) {
        for b in self.rules(ev.hook()) {
            if !b.matches(ev.topic()) {
                continue;
            }
            let op = match (b.rule.builtin(), ev) {
                (Some(Builtin::ClientConnected), Event::Connected { client }) => WriteOp::ClientConnected {
                    clientid: client.clientid.clone(),
                    node: self.node.clone(),
                    connected_at: client.connected_at,
                },
                (
                    Some(Builtin::ClientDisconnected),
                    Event::Disconnected {
                        client, disconnected_at, ..
                    },
                ) => WriteOp::ClientDisconnected {
                    clientid: client.clientid.clone(),
                    node: self.node.clone(),
                    connected_at: client.connected_at,
                    disconnected_at: *disconnected_at,
                },
                (Some(Builtin::AckedDelete), Event::Unsubscribed { client, filter }) => WriteOp::DeletePointer {
                    clientid: client.clientid.clone(),
                    filter: filter.clone(),
                },
                (
                    Some(Builtin::MessageAcked),
                    Event::Acked {
                        client, msgid, filters, ..
                    },
                ) if !filters.is_empty() && (client.persistent || self.clean_start_fetch) => WriteOp::AdvancePointer {
                    clientid: client.clientid.clone(),
                    filters: filters.clone(),
                    msgid: *msgid,
                },
                (Some(Builtin::AckedForQueue), Event::Acked { msgid, topic, .. }) => WriteOp::DeleteMessage {
                    msgid: *msgid,
                    topic: topic.clone(),
                },
                (Some(Builtin::AckedForKeepLatest), Event::Acked { msgid, topic, .. }) => WriteOp::DeleteLatest {
                    topic: topic.clone(),
                    msgid: *msgid,
                },
                (Some(_), _) => continue,
                (None, ev) => match b.custom_op(ev, &self.node) {
                    Some(op) => op,
                    None => continue,
                },
            };
            RuleMetrics::inc(&b.metrics.matched);
            b.pool
                .queue
                .try_push(Job::new(op, b.metrics.clone(), ticket.cloned(), ev.clientid()));
        }
    }

    /// The client has no session (clean start, MQTT 5 session expiry 0) or its session expired:
    /// its read pointers are session state and go with it (SPEC §3.1), on every pool a fetch
    /// rule reads them from — unless the rule keeps EMQX 4's behaviour (`offline_opts.clean_start
    /// = "fetch"`). The returned receiver closes once the deletes are done.
    pub fn discard_pointers(&self, clientid: &Arc<str>) -> Option<tokio::sync::watch::Receiver<()>> {
        let mut pools = HashSet::new();
        let (ticket, done) = Ticket::watched();
        for b in self.rules(Hook::SessionSubscribed) {
            if b.rule.builtin() != Some(Builtin::MessageFetch) || b.rule.offline.clean_start_fetch {
                continue;
            }
            if !pools.insert(b.pool.queue.label().to_string()) {
                continue;
            }
            b.pool.queue.try_push(Job::new(
                WriteOp::DeletePointers {
                    clientid: clientid.clone(),
                },
                b.metrics.clone(),
                Some(ticket.clone()),
                clientid,
            ));
        }
        (!pools.is_empty()).then_some(done)
    }

    /// `session.subscribed`'s reads, opened: what must be delivered to this client before the
    /// subscription's live traffic (the hook's writes go through [`Dispatcher::fire`], in the
    /// client's event order). `is_new`: new in this session; `retained`: the retained
    /// messages are wanted (MQTT 5 Retain Handling; 3.1.1 always).
    ///
    /// The reads open once the pointer writes in `pending` (this client's unsubscribes of the
    /// same filter, still queued) are done, so a fetch never reads a pointer that is about to be
    /// deleted. The wait is bounded by `persist.fetch_timeout`.
    pub async fn subscribed_after(
        &self,
        client: &Arc<Client>,
        filter: &Arc<str>,
        qos: u8,
        is_new: bool,
        retained: bool,
        pending: Vec<tokio::sync::watch::Receiver<()>>,
    ) -> StoredReads {
        if !pending.is_empty() {
            let all = futures::future::join_all(pending.into_iter().map(|mut rx| async move { while rx.changed().await.is_ok() {} }));
            if tokio::time::timeout(self.fetch_timeout, all).await.is_err() {
                tracing::debug!(clientid = %client.clientid, %filter, "an unsubscribe's pointer delete is still queued; fetching anyway");
            }
        }
        let mut reads = VecDeque::new();
        for b in self.rules(Hook::SessionSubscribed) {
            let Some(f) = b.rule.builtin().filter(|f| f.delivers_stored()) else {
                continue;
            };
            // Fetches serve new subscriptions; retained lookups what Retain Handling asks for.
            let wanted = if f == Builtin::RetainLookup { retained } else { is_new };
            if !wanted || !b.matches(Some(filter)) {
                continue;
            }
            let kind = match f {
                Builtin::MessageFetch => FetchKind::Pointer,
                Builtin::FetchForQueue => FetchKind::Queue,
                Builtin::FetchForKeepLatest => FetchKind::KeepLatest,
                _ => FetchKind::Pointer,
            };
            if f != Builtin::RetainLookup && qos == 0 {
                continue;
            }
            // A session-less client has no read pointers: nothing to fetch, none to create.
            if f == Builtin::MessageFetch && !client.persistent && !b.rule.offline.clean_start_fetch {
                continue;
            }
            RuleMetrics::inc(&b.metrics.matched);
            let fetch = (f != Builtin::RetainLookup).then(|| FetchRequest {
                clientid: client.clientid.clone(),
                filter: filter.clone(),
                kind,
                opts: b.rule.offline.clone(),
                now: now_ms(),
            });
            let open = async {
                match &fetch {
                    Some(req) => b.pool.backend.fetch(req, None).await,
                    None => b.pool.backend.retained(filter, None).await,
                }
            };
            match b.pool.read(self.fetch_timeout, Box::pin(open)).await {
                Ok(Page { msgs, next }) if msgs.is_empty() && next.is_none() => RuleMetrics::inc(&b.metrics.success),
                Ok(Page { msgs, next }) => reads.push_back(OpenRead {
                    pool: b.pool.clone(),
                    metrics: b.metrics.clone(),
                    fetch,
                    first: msgs,
                    next,
                }),
                Err(e) => {
                    RuleMetrics::inc(&b.metrics.failed);
                    warn_unread(&b.metrics.label, &client.clientid, filter, &e);
                }
            }
        }
        StoredReads {
            client: client.clone(),
            filter: filter.clone(),
            seen: (reads.len() > 1).then(HashSet::new),
            reads,
        }
    }

    /// The next page of a subscription's stored messages, oldest first per read; `None` once
    /// every read is done. A page that fails ends its read (warned, counted): live traffic
    /// goes on, and what was not delivered stays stored behind the pointer.
    pub async fn next_page(&self, stored: &mut StoredReads) -> Option<Vec<Injection>> {
        let StoredReads {
            client,
            filter,
            reads,
            seen,
        } = stored;
        loop {
            let r = reads.front_mut()?;
            let retained = r.fetch.is_none();
            let msgs = if !r.first.is_empty() {
                std::mem::take(&mut r.first)
            } else if let Some(cursor) = r.next.clone() {
                let page = async {
                    match &r.fetch {
                        Some(req) => r.pool.backend.fetch(req, Some(&cursor)).await,
                        None => r.pool.backend.retained(filter, Some(&cursor)).await,
                    }
                };
                match r.pool.read(self.fetch_timeout, Box::pin(page)).await {
                    Ok(page) => {
                        r.next = page.next;
                        page.msgs
                    }
                    Err(e) => {
                        RuleMetrics::inc(&r.metrics.failed);
                        warn_unread(&r.metrics.label, &client.clientid, filter, &e);
                        reads.pop_front();
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            if r.first.is_empty() && r.next.is_none() {
                RuleMetrics::inc(&r.metrics.success);
                reads.pop_front();
            }
            let out: Vec<Injection> = msgs
                .into_iter()
                .filter(|m| match seen {
                    Some(seen) if seen.len() < MAX_SEEN => seen.insert((retained, m.msgid)),
                    Some(seen) => !seen.contains(&(retained, m.msgid)),
                    None => true,
                })
                .map(|msg| Injection { msg, retained })
                .collect();
            // Empty pages (rows that did not match exactly) are not worth a trip to the caller.
            if !out.is_empty() {
                return Some(out);
            }
        }
    }

    /// `on_subscribe_lookup`: the client's stored subscriptions.
    pub async fn subscribe_lookup(&self, client: &Arc<Client>) -> Vec<(String, u8)> {
        let mut out = Vec::new();
        for b in self.rules(Hook::ClientConnected) {
            if b.rule.builtin() != Some(Builtin::SubscribeLookup) {
                continue;
            }
            RuleMetrics::inc(&b.metrics.matched);
            match b
                .pool
                .read(self.fetch_timeout, b.pool.backend.subscriptions(&client.clientid))
                .await
            {
                Ok(subs) => {
                    RuleMetrics::inc(&b.metrics.success);
                    for (f, q) in subs {
                        if topic::valid_filter(&f) && !out.iter().any(|(o, _)| *o == f) {
                            out.push((f, q.min(2)));
                        } else if !topic::valid_filter(&f) {
                            tracing::warn!(clientid = %client.clientid, filter = %f, "ignoring invalid stored subscription");
                        }
                    }
                }
                Err(e) => {
                    RuleMetrics::inc(&b.metrics.failed);
                    static SKIPPED: RateLimited = RateLimited::new();
                    SKIPPED.warn(|| {
                        format!(
                            "rule {}: stored subscriptions of {} not read ({e})",
                            b.metrics.label, client.clientid
                        )
                    });
                }
            }
        }
        out
    }

    /// True when any `client.connected` rule subscribes clients from the database.
    pub fn has_subscribe_lookup(&self) -> bool {
        self.rules(Hook::ClientConnected)
            .iter()
            .any(|b| b.rule.builtin() == Some(Builtin::SubscribeLookup))
    }
}
