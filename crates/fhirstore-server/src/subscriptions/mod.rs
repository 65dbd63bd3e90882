//! R4 Subscriptions with rest-hook delivery, fed by the change log.
//!
//! Two loops run in every `serve` process:
//! - **Matching** is a consumer of the change log (`subscriptions`), drained by whichever
//!   process holds its lease. It keeps every tenant's subscriptions in memory, judges each
//!   change against the criteria of its own tenant's subscriptions from the version's index
//!   entries (no query per subscription; a chain or `_has` asks the primary), and records the
//!   matches as numbered events in the same transaction that moves its cursor. A crash before
//!   that commit replays the same changes; after it, the events are durable.
//! - **Delivery** claims subscriptions with undelivered events under a lease of their own, so
//!   several processes share the work and each subscription has one sender at a time, in
//!   order. An event counts as delivered only after the endpoint's 2xx: a crash in between
//!   sends it again with the same number. Failures retry with exponential backoff and jitter
//!   for the retry period, then the Subscription goes to `error` with the reason; setting it
//!   back to `active` (or `requested`) resumes from the first event not delivered.

pub mod deliver;
pub mod notify;
pub(crate) mod rest;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_core::changelog::{ChangeCursor, LoggedChange, Primary};
use fhirstore_core::registry::Registry;
use fhirstore_core::search::{ChainLink, Criterion, CriterionValues, ReferenceValue};
use fhirstore_core::subscription::{
    Attempt, Criteria, Event, Finished, Matched, Spec, State, Status,
};
use fhirstore_core::{
    now_micros, Handling, LogicalId, ResourceStorage, ResourceType, Result, SearchQuery,
    TenantContext, TenantId, VersionId,
};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::deploy::Deployment;

/// The change-log consumer that matches subscriptions.
pub const CONSUMER: &str = "subscriptions";

/// How subscriptions are delivered; see `serve --help` for each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// URL prefixes allowed beyond the default rule (https on public addresses).
    pub endpoints: Vec<String>,
    /// The longest one delivery may take.
    pub timeout: Duration,
    /// How long a failing endpoint is retried before the subscription goes to `error`.
    pub retry_period: Duration,
    /// The first retry's delay.
    pub retry_base: Duration,
    /// The longest delay between retries.
    pub retry_max: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// How long delivered events are kept for `$events`.
    pub retention: Duration,
    /// Events one `$events` call returns at most.
    pub max_events: u32,
    /// How often the loops look for work when nothing woke them.
    pub poll: Duration,
    /// Extra trusted root certificates (DER) for https endpoints.
    pub extra_roots: Vec<Vec<u8>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            endpoints: Vec::new(),
            timeout: Duration::from_secs(10),
            retry_period: Duration::from_secs(3_600),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            concurrency: 16,
            retention: Duration::from_secs(7 * 86_400),
            max_events: 1_000,
            poll: Duration::from_millis(200),
            extra_roots: Vec::new(),
        }
    }
}

/// Changes read from the log per matching round.
const MATCH_BATCH: u32 = 500;
/// Events sent per delivery round of one subscription before its lease is given back.
const DELIVERY_BATCH: u32 = 100;

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// One subscription as the matcher holds it.
struct Sub {
    version: i64,
    spec: Spec,
    /// The type its criteria select, as written before the `?`.
    rt: String,
    /// The criteria, compiled in the registry they were parsed with (a tenant's own
    /// SearchParameters can change it); `Err` when they no longer parse.
    compiled: Option<(usize, std::result::Result<Arc<Criteria>, String>)>,
}

impl Sub {
    fn new(version: i64, spec: Spec) -> Sub {
        Sub {
            version,
            rt: spec.criteria.split('?').next().unwrap_or("").to_owned(),
            spec,
            compiled: None,
        }
    }

    /// Whether it records a change of type `rt` written at `at`.
    fn hears(&self, rt: &str, at: i64) -> bool {
        self.spec.status.records() && self.rt == rt && self.spec.end.is_none_or(|end| at <= end)
    }
}

/// Every tenant's subscriptions, as of the matcher's cursor.
#[derive(Default)]
struct Subs {
    /// In id order, so events of one change are recorded in the same order every time.
    by_tenant: HashMap<TenantId, BTreeMap<LogicalId, Sub>>,
}

impl Subs {
    fn load(states: Vec<State>) -> Subs {
        let mut subs = Subs::default();
        for s in states {
            subs.by_tenant
                .entry(s.tenant)
                .or_default()
                .insert(s.id, Sub::new(s.version, s.spec));
        }
        subs
    }

    /// Applies a Subscription version; `false` when an equal or newer one is already held
    /// (a bootstrap listing can be ahead of the log).
    fn apply(
        &mut self,
        tenant: &TenantId,
        id: &LogicalId,
        version: i64,
        spec: Option<Spec>,
    ) -> bool {
        let tenant_subs = self.by_tenant.entry(tenant.clone()).or_default();
        if tenant_subs.get(id).is_some_and(|s| s.version >= version) {
            return false;
        }
        match spec {
            Some(spec) => {
                tenant_subs.insert(id.clone(), Sub::new(version, spec));
            }
            None => {
                tenant_subs.remove(id);
            }
        }
        true
    }
}

/// The subscription engine of one server process.
pub struct Engine {
    store: Arc<Deployment>,
    settings: Settings,
    /// The base URL notifications name resources under, without the tenant.
    base: String,
    /// This process's name in leases.
    holder: String,
    policy: deliver::Policy,
    sender: deliver::Sender,
    /// Woken by this process's writes, so matching starts at once.
    wrote: Notify,
    /// Woken when matching recorded events.
    matched: Notify,
    stop: AtomicBool,
}

impl Engine {
    /// An engine over `store`; `base` is the server's public URL (without `/fhir/{tenant}`).
    pub fn new(store: Arc<Deployment>, settings: Settings, base: String) -> Arc<Engine> {
        Arc::new(Engine {
            policy: deliver::Policy::new(settings.endpoints.clone()),
            sender: deliver::Sender::with_roots(settings.extra_roots.clone()),
            store,
            settings,
            base,
            holder: format!("subscriptions-{}", uuid::Uuid::now_v7().simple()),
            wrote: Notify::new(),
            matched: Notify::new(),
            stop: AtomicBool::new(false),
        })
    }

    /// The endpoint rule in force.
    pub fn policy(&self) -> &deliver::Policy {
        &self.policy
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The base URL of a tenant, as notifications name it.
    pub fn tenant_base(&self, tenant: &TenantId) -> String {
        format!("{}/fhir/{tenant}", self.base)
    }

    /// Something was written: look at the log now rather than at the next poll.
    pub fn wake(&self) {
        self.wrote.notify_one();
    }

    fn primary(&self) -> &Arc<dyn Primary> {
        self.store.composite().primary()
    }

    /// Runs matching and delivery until [`Engine::stop`]. On a store where matching never
    /// ran, it first records the subscriptions already stored and starts matching at the log's
    /// head; a caller that awaits this before taking writes (as `serve` does) has every later
    /// write matched.
    pub async fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let bootstrapped = match self.begin().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "subscription matching could not start yet; retrying");
                false
            }
        };
        let (m, d) = (self.clone(), self.clone());
        vec![
            tokio::spawn(async move { m.match_loop(bootstrapped).await }),
            tokio::spawn(async move { d.deliver_loop().await }),
        ]
    }

    /// Takes the matcher's lease and, when its cursor has never moved, bootstraps it.
    async fn begin(&self) -> Result<()> {
        let p = self.primary();
        if p.lease(CONSUMER, &self.holder, self.match_lease()).await?
            && p.consumer(CONSUMER).await?.cursor == ChangeCursor::default()
        {
            self.bootstrap().await?;
        }
        Ok(())
    }

    fn match_lease(&self) -> Duration {
        (self.settings.poll * 10).max(Duration::from_secs(10))
    }

    /// Stops both loops after their current round.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wrote.notify_one();
        self.matched.notify_one();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    async fn idle(&self, notify: &Notify) {
        let _ = tokio::time::timeout(self.settings.poll, notify.notified()).await;
    }

    async fn match_loop(self: Arc<Self>, mut bootstrapped: bool) {
        let mut subs: Option<Subs> = None;
        while !self.stopped() {
            match self.match_round(&mut subs, &mut bootstrapped).await {
                Ok(true) => {}
                Ok(false) => self.idle(&self.wrote).await,
                Err(e) => {
                    tracing::warn!(error = %e, "subscription matching failed; retrying");
                    subs = None;
                    self.idle(&self.wrote).await;
                }
            }
        }
        let _ = self.primary().release(CONSUMER, &self.holder).await;
    }

    /// One round: `true` when it did work and another may follow at once.
    async fn match_round(&self, subs: &mut Option<Subs>, bootstrapped: &mut bool) -> Result<bool> {
        let p = self.primary();
        if !p.lease(CONSUMER, &self.holder, self.match_lease()).await? {
            *subs = None;
            return Ok(false);
        }
        let state = p.consumer(CONSUMER).await?;
        if state.cursor == ChangeCursor::default() && !*bootstrapped {
            *bootstrapped = true;
            self.bootstrap().await?;
            *subs = None;
            return Ok(true);
        }
        let subs = match subs {
            Some(s) => s,
            None => subs.insert(Subs::load(p.subscription_states().await?)),
        };
        let batch = p.changes_after(state.cursor, MATCH_BATCH).await?;
        let Some(last) = batch.last().map(|c| c.cursor) else {
            return Ok(false);
        };
        let matched = self.judge_batch(subs, &batch).await?;
        if !p
            .record_matches(CONSUMER, &self.holder, last, &matched)
            .await?
        {
            return Err(fhirstore_core::Error::backend(
                "the subscription matcher lost its lease",
                true,
                std::io::Error::other("lease lost"),
            ));
        }
        if !matched.events.is_empty() {
            self.matched.notify_one();
        }
        Ok(true)
    }

    /// The first run on a store: subscriptions written before matching existed are read from
    /// the primary, and matching starts at the log's head (a subscription notifies what
    /// happens after it exists).
    async fn bootstrap(&self) -> Result<()> {
        let p = self.primary();
        let head = p.log_head().await?;
        let mut matched = Matched::default();
        let rt = ResourceType::new("Subscription")?;
        for tenant in p.tenants().await? {
            let ctx = TenantContext::full(tenant.clone());
            let mut q = SearchQuery::all(Some(rt));
            q.count = Some(500);
            loop {
                let page = p.search(&ctx, &q).await?;
                for r in &page.matches {
                    let spec = Spec::from_resource(&r.content).ok();
                    matched.specs.push((
                        tenant.clone(),
                        r.key.id.clone(),
                        i64::try_from(r.version.get()).unwrap_or(i64::MAX),
                        spec,
                    ));
                }
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => break,
                }
            }
        }
        p.record_matches(CONSUMER, &self.holder, head, &matched)
            .await?;
        Ok(())
    }

    /// Judges a batch of changes in log order, updating the subscriptions as the batch
    /// creates, changes or deletes them.
    async fn judge_batch(&self, subs: &mut Subs, batch: &[LoggedChange]) -> Result<Matched> {
        let p = self.primary();
        let mut matched = Matched::default();
        let mut registries: HashMap<TenantId, Arc<Registry>> = HashMap::new();
        let now = now_micros();
        for lc in batch {
            let ch = &lc.change;
            let version = i64::try_from(ch.version.get()).unwrap_or(i64::MAX);
            if ch.key.resource_type.as_str() == "Subscription" {
                let spec = match &ch.content {
                    None => None,
                    Some(body) => match Spec::from_resource(body) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            tracing::warn!(tenant = %ch.tenant, id = %ch.key.id, error = %e,
                                "a Subscription this server cannot serve was written; it is ignored");
                            None
                        }
                    },
                };
                if subs.apply(&ch.tenant, &ch.key.id, version, spec.clone()) {
                    matched
                        .specs
                        .push((ch.tenant.clone(), ch.key.id.clone(), version, spec));
                }
            }
            let Some(tenant_subs) = subs.by_tenant.get_mut(&ch.tenant) else {
                continue;
            };
            let at = fhirstore_core::to_micros(ch.last_updated);
            let rt = ch.key.resource_type.as_str();
            let interested = tenant_subs.values().any(|s| s.hears(rt, at));
            if !interested {
                continue;
            }
            let ctx = TenantContext::full(ch.tenant.clone());
            let reg = match registries.get(&ch.tenant) {
                Some(r) => r.clone(),
                None => {
                    let r = p.search_parameters(&ctx).await?;
                    registries.insert(ch.tenant.clone(), r.clone());
                    r
                }
            };
            // A deletion is judged by the version it removed: a subscription hears of a
            // resource leaving its criteria's set.
            let judged = match &ch.content {
                Some(body) => Some(fhirstore_core::StoredResource {
                    tenant: ch.tenant.clone(),
                    key: ch.key.clone(),
                    version: ch.version,
                    last_updated: ch.last_updated,
                    deleted: false,
                    content: body.clone(),
                }),
                None => match VersionId::new(ch.version.get().saturating_sub(1)) {
                    Some(prev) => p
                        .vread(&ctx, ch.key.resource_type, &ch.key.id, prev)
                        .await
                        .ok()
                        .filter(|r| !r.deleted),
                    None => None,
                },
            };
            let Some(judged) = judged else { continue };
            let reg_key = Arc::as_ptr(&reg) as usize;
            // Extracted once for every subscription that judges this version.
            let entries = fhirstore_core::index::extract_in(&reg, &judged.content);
            for (id, sub) in tenant_subs.iter_mut() {
                if !sub.hears(rt, at) {
                    continue;
                }
                if sub.compiled.as_ref().is_none_or(|(k, _)| *k != reg_key) {
                    let c = Criteria::parse(&reg, &sub.spec.criteria)
                        .map(Arc::new)
                        .map_err(|e| e.to_string());
                    sub.compiled = Some((reg_key, c));
                }
                let Some((_, Ok(criteria))) = &sub.compiled else {
                    continue;
                };
                let hit = match criteria.undecided_in(&entries, &judged, now) {
                    None => false,
                    Some(open) if open.is_empty() => true,
                    Some(open) => self.ask_store(&ctx, &entries, &judged, &open).await?,
                };
                if hit {
                    matched.events.push((
                        ch.tenant.clone(),
                        id.clone(),
                        Event {
                            number: 0,
                            resource_type: ch.key.resource_type,
                            id: ch.key.id.clone(),
                            version,
                            deleted: ch.content.is_none(),
                            at,
                        },
                    ));
                }
            }
        }
        Ok(matched)
    }

    /// Criteria memory cannot settle, asked of the primary. A chain starts from the judged
    /// version's own references (so it is judged at that version) and asks only about the
    /// resources they name; `_has` asks for resources referencing this one; anything else
    /// (a composite, a hierarchy modifier) asks about this resource as the primary holds it
    /// now, which is the judged version unless it was written again since.
    async fn ask_store(
        &self,
        ctx: &TenantContext,
        entries: &fhirstore_core::index::IndexEntries,
        judged: &fhirstore_core::StoredResource,
        open: &[&Criterion],
    ) -> Result<bool> {
        let p = self.primary();
        let rt = judged.key.resource_type;
        for c in open {
            let rest = Criterion {
                chain: c.chain.iter().skip(1).cloned().collect(),
                ..(*c).clone()
            };
            let q = match c.chain.first() {
                Some(ChainLink::Forward { param, target }) => {
                    let ids: Vec<LogicalId> = entries
                        .references
                        .iter()
                        .filter(|r| r.param == param.as_str() && r.target_type == target.as_str())
                        .filter_map(|r| LogicalId::new(r.target_id.as_str()).ok())
                        .collect();
                    if ids.is_empty() {
                        return Ok(false);
                    }
                    let mut q = SearchQuery::all(Some(*target)).with(rest);
                    q.among = Some(ids.into());
                    q
                }
                Some(ChainLink::Reverse { source, param }) => {
                    let back = Criterion::new(
                        param.clone(),
                        CriterionValues::Reference(vec![ReferenceValue::Local {
                            resource_type: Some(rt),
                            id: judged.key.id.as_str().to_owned(),
                        }]),
                    );
                    SearchQuery::all(Some(*source)).with(back).with(rest)
                }
                None => {
                    let mut q = SearchQuery::all(Some(rt)).with(rest);
                    q.add_param("_id", judged.key.id.as_str(), Handling::Strict)?;
                    q
                }
            };
            let mut q = q;
            q.count = Some(1);
            if p.search(ctx, &q).await?.matches.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn deliver_loop(self: Arc<Self>) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.settings.concurrency));
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        let flusher = tokio::spawn(self.clone().flush_loop(done_rx));
        let mut last_prune = Instant::now();
        while !self.stopped() {
            let free = permits.available_permits();
            if free > 0 {
                let lease = self.delivery_lease();
                match self
                    .primary()
                    .claim_deliveries(
                        &self.holder,
                        lease,
                        now_micros(),
                        u32::try_from(free).unwrap_or(u32::MAX),
                    )
                    .await
                {
                    Ok(claimed) => {
                        for state in claimed {
                            let Ok(permit) = permits.clone().acquire_owned().await else {
                                break;
                            };
                            let (me, done) = (self.clone(), done_tx.clone());
                            tokio::spawn(async move {
                                let finished = me.deliver(state).await;
                                drop(permit);
                                let _ = done.send(finished);
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming subscription deliveries failed"),
                }
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                let before = now_micros().saturating_sub(micros(self.settings.retention));
                if let Err(e) = self.primary().prune_events(before, 10_000).await {
                    tracing::warn!(error = %e, "pruning delivered subscription events failed");
                }
            }
            self.idle(&self.matched).await;
        }
        // Rounds in flight finish (each within the timeout) and are recorded; a round cut off
        // here is sent again once its lease runs out.
        drop(done_tx);
        let _ = tokio::time::timeout(self.delivery_lease() / 2, flusher).await;
    }

    /// Records finished rounds, as many as have finished, in one transaction: under load one
    /// commit covers many notifications instead of one each. A subscription stays leased
    /// until its round is recorded, so no other round of it starts before.
    async fn flush_loop(self: Arc<Self>, mut done: tokio::sync::mpsc::UnboundedReceiver<Finished>) {
        let mut batch = Vec::new();
        while done.recv_many(&mut batch, 1_000).await > 0 {
            let more = batch
                .iter()
                .any(|f| matches!(f.attempt, Attempt::Delivered { .. }));
            // A temporary failure (a serialisation conflict, a dropped connection) is tried
            // again: given up, the rounds would be sent twice once their leases ran out.
            let mut tries = 0;
            let recorded = loop {
                tries += 1;
                match self
                    .primary()
                    .finish_deliveries(&self.holder, &batch, now_micros())
                    .await
                {
                    Err(e) if e.is_temporary() && tries < 5 => {
                        tokio::time::sleep(Duration::from_millis(10 << tries)).await;
                    }
                    other => break other,
                }
            };
            match recorded {
                Ok(held) => {
                    for (f, held) in batch.iter().zip(held) {
                        if !held {
                            tracing::warn!(tenant = %f.tenant, id = %f.id,
                                "a subscription's delivery lease ran out before its round was recorded");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e,
                    "recording subscription deliveries failed; they will be sent again"),
            }
            batch.clear();
            if more {
                self.matched.notify_one();
            }
        }
    }

    /// Long enough that a round (at most half of it, see [`Engine::deliver`]) ends well
    /// before another process may take the subscription.
    fn delivery_lease(&self) -> Duration {
        (self.settings.timeout * 4).max(Duration::from_secs(30))
    }

    /// One delivery round for a claimed subscription: its next events in order, or a
    /// heartbeat. Returns what to record.
    async fn deliver(&self, state: State) -> Finished {
        let started = Instant::now();
        let base = self.tenant_base(&state.tenant);
        let timeout = state
            .spec
            .timeout
            .map_or(self.settings.timeout, |t| t.min(self.settings.timeout));
        let mut through = state.delivered;
        let outcome: std::result::Result<(), String> = async {
            let target = self.policy.check(&state.spec.endpoint)?;
            if state.delivered >= state.events {
                let body = notify::bundle(&base, &state, notify::Kind::Heartbeat, &[]);
                let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
                self.sender
                    .post(&target, &state.spec.headers, bytes, timeout)
                    .await?;
                return Ok(());
            }
            let events = self
                .primary()
                .subscription_events(
                    &state.tenant,
                    &state.id,
                    state.delivered + 1,
                    state.events,
                    DELIVERY_BATCH,
                )
                .await
                .map_err(|e| e.to_string())?;
            for event in events {
                if started.elapsed() > self.delivery_lease() / 2 {
                    break;
                }
                let item = self.item(&state, event).await;
                let mut shown = state.clone();
                shown.last_error = None;
                let body = notify::bundle(
                    &base,
                    &shown,
                    notify::Kind::Event,
                    std::slice::from_ref(&item),
                );
                let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
                self.sender
                    .post(&target, &state.spec.headers, bytes, timeout)
                    .await?;
                through = item.event.number;
            }
            Ok(())
        }
        .await;
        let now = now_micros();
        let attempt = match outcome {
            Ok(()) => Attempt::Delivered {
                through,
                heartbeat_due: state.spec.heartbeat_after(now),
            },
            Err(error) => self.failed(&state, through, error, now).await,
        };
        Finished {
            tenant: state.tenant,
            id: state.id,
            attempt,
        }
    }

    /// The event with the version it names, read when the payload carries resources.
    pub(crate) async fn item(&self, state: &State, event: Event) -> notify::Item {
        let body = if state.spec.content == fhirstore_core::subscription::Content::FullResource
            && !event.deleted
        {
            let ctx = TenantContext::full(state.tenant.clone());
            match VersionId::new(u64::try_from(event.version).unwrap_or(0)) {
                Some(v) => self
                    .primary()
                    .vread(&ctx, event.resource_type, &event.id, v)
                    .await
                    .ok()
                    .map(|r| r.content),
                None => None,
            }
        } else {
            None
        };
        notify::Item { event, body }
    }

    /// A failed attempt: retry after a backoff with jitter, or give up past the retry period
    /// and set the Subscription to `error`.
    async fn failed(&self, state: &State, through: i64, error: String, now: i64) -> Attempt {
        let since = if state.failing_since == 0 || through > state.delivered {
            now
        } else {
            state.failing_since
        };
        let deadline = since.saturating_add(micros(self.settings.retry_period));
        if now >= deadline {
            let reason = format!(
                "delivery failed for {:?}: {error}",
                self.settings.retry_period
            );
            self.mark_error(state, &reason).await;
            return Attempt::GaveUp {
                through,
                error: reason,
                version: state.version,
            };
        }
        let failures = if through > state.delivered {
            0
        } else {
            state.failures
        };
        let exp = u32::try_from(failures.clamp(0, 20)).unwrap_or(20);
        let delay = self
            .settings
            .retry_base
            .saturating_mul(1u32 << exp.min(20))
            .min(self.settings.retry_max);
        let jitter_max = micros(delay) / 2;
        let jitter = if jitter_max > 0 {
            i64::from(uuid::Uuid::new_v4().as_bytes()[0]) * jitter_max / 255
        } else {
            0
        };
        Attempt::Failed {
            through,
            error,
            retry_at: now
                .saturating_add(micros(delay))
                .saturating_add(jitter)
                .min(deadline),
        }
    }

    /// Writes `status: error` and the reason into the Subscription, unless it changed since
    /// the failing version (a client may have just fixed it).
    async fn mark_error(&self, state: &State, reason: &str) {
        let ctx = TenantContext::full(state.tenant.clone());
        let Ok(rt) = ResourceType::new("Subscription") else {
            return;
        };
        let storage = self.store.storage();
        let Ok(current) = storage.read(&ctx, rt, &state.id).await else {
            return;
        };
        if i64::try_from(current.version.get()).ok() != Some(state.version) {
            return;
        }
        let mut body = current.content;
        body["status"] = json!(Status::Error.code());
        body["error"] = Value::String(reason.to_owned());
        if let Err(e) = storage
            .update(&ctx, rt, &state.id, body, Some(current.version))
            .await
        {
            tracing::warn!(tenant = %state.tenant, id = %state.id, error = %e,
                "could not set a failing Subscription to error");
        }
        self.wake();
    }

    /// Every subscription's delivery state, for `/admin/status` and `/metrics`.
    pub async fn report(&self) -> Result<Vec<State>> {
        self.primary().subscription_states().await
    }
}

/// A subscription's delivery state as `/admin/status` shows it.
pub fn state_json(s: &State) -> Value {
    let at =
        |us: i64| (us > 0).then(|| fhirstore_core::format_instant(fhirstore_core::from_micros(us)));
    json!({
        "tenant": s.tenant.as_str(),
        "id": s.id.as_str(),
        "status": s.spec.status.code(),
        "criteria": s.spec.criteria,
        "events": s.events,
        "delivered": s.delivered,
        "lag": s.events - s.delivered,
        "lastDelivery": at(s.last_sent),
        "failures": s.failures,
        "failingSince": at(s.failing_since),
        "nextAttempt": at(s.next_attempt),
        "lastError": s.last_error,
    })
}
