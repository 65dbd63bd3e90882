//! `CompositeStorage`: one [`ResourceStorage`] over the primary and its secondaries.
//!
//! Writes go to the primary, whose transaction appends the outbox entry. A [`SyncMode`] per
//! secondary says when the change reaches it: before the write returns (synchronous) or by the
//! secondary's background worker (asynchronous). Every secondary has a worker either way: it
//! drains the outbox in batches and moves the secondary's durable cursor after each applied
//! batch, so a synchronous apply that failed, a crash or an outage is made good from the
//! outbox. Delivery is at least once; secondaries apply version-guarded, so a change delivered
//! twice or late changes nothing.
//!
//! **The default hybrid** ([`SecondaryConfig::cache`] for Redis, [`SecondaryConfig::index`]
//! for tantivy): Redis synchronous, because it serves reads by id and searches that must show
//! the caller's own write at once, and one Lua call per change costs little; tantivy
//! asynchronous, because its commits are batched anyway (a synchronous apply would not be
//! searchable before the next commit) and full-text callers tolerate a short delay.
//!
//! **Routing.** A search goes to the cheapest backend whose capabilities cover all of it,
//! that is healthy, not behind by more than its `max_lag`, and (with a consistency token) has
//! the token's write; `_text` and `_content` only tantivy can answer. Reads by id come from a
//! synchronous secondary only while no synchronous apply to it has failed, in any process,
//! that its cursor has not yet passed. So a read never returns a version older than a write
//! that returned to any caller:
//! - in the writing process, a failed apply fences reads at once;
//! - across processes, through the primary. Every process serving reads from a secondary holds
//!   a short read lease there (`SyncConfig::read_lease_ttl`), renewed by reading the
//!   secondary's read fence. A write whose synchronous apply failed raises that fence to its
//!   log position and returns only once every other live reader has acknowledged it (their
//!   next renewal, a third of the lease away) or let its lease run out. A process that cannot
//!   renew stops serving reads when its lease ends.
//!
//! Renewals and raises are serialised on the fence row, and a process serves no reads while a
//! renewal is in flight, so an acknowledged fence is always in force locally.
//!
//! Several processes may share one primary: each secondary's outbox is drained by whichever
//! process holds its lease, and a dead process's lease expires.

mod config;
mod lane;
mod memory;
pub mod reconcile;
pub mod schedule;
mod split;
mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fhirstore_core::changelog::{ChangeCursor, DeadLetter, Primary};
use fhirstore_core::registry::Registry;
use fhirstore_core::secondary::{Change, Health, Secondary};
use fhirstore_core::{
    Capabilities, Error, HistoryPage, HistoryRequest, LogicalId, OpOutcome, Permission,
    ReindexOptions, ReindexStatus, ResourceStorage, ResourceType, Result, SearchPage, SearchQuery,
    StoredResource, TenantContext, VersionId, WriteKind, WriteOp,
};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

pub use config::{Failpoint, RejectPolicy, SecondaryConfig, SyncConfig, SyncMode};
pub use lane::CircuitState;
pub use memory::MemoryCacheStats;

use lane::Lane;

/// The name routing reports when the primary answered.
pub const PRIMARY: &str = "primary";

/// The name routing reports when the in-process cache answered a read.
pub const MEMORY: &str = "memory";

/// A write's outcome with what the sync manager did with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Synced<T> {
    /// What the primary returned.
    pub value: T,
    /// The highest outbox sequence number written: the consistency token for read-your-writes.
    pub token: Option<i64>,
    /// Synchronous secondaries that did not apply the change before the write returned; their
    /// workers deliver it from the outbox.
    pub lagging: Vec<String>,
}

/// A search result with the backend that answered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Routed {
    /// The page.
    pub page: SearchPage,
    /// `primary` or a secondary's name.
    pub backend: String,
    /// The secondary that answered had not applied every change committed before the search
    /// began, and waited [`SyncConfig::search_wait`] in vain: recent writes may be missing.
    /// Only when no other backend could answer.
    pub behind: bool,
    /// What each backend did, in order: one part when one backend answered the whole query,
    /// several when the query was split between backends (see [`SyncConfig::split_bound`]).
    pub parts: Vec<RoutePart>,
}

/// One backend's part in answering a search (see [`Routed::parts`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePart {
    /// The backend: `primary` or a secondary's name.
    pub backend: String,
    /// What it was asked: each criterion's parameter as written (with its modifier, and the
    /// chain before it), then `_sort`, `_include` and `_revinclude` when it did those, and
    /// `ids` when the search was restricted to another part's id set.
    pub asked: Vec<String>,
    /// The ids it listed, or the matches on the page it returned.
    pub rows: usize,
    /// How long it took.
    pub took: Duration,
}

impl RoutePart {
    pub(crate) fn new(backend: &str, query: &SearchQuery, rows: usize, started: Instant) -> Self {
        use fhirstore_core::search::ChainLink;
        let mut asked: Vec<String> = query
            .criteria
            .iter()
            .map(|c| {
                let mut name = String::new();
                for link in &c.chain {
                    match link {
                        ChainLink::Forward { param, target } => {
                            name.push_str(&format!("{param}:{target}."));
                        }
                        ChainLink::Reverse { source, param } => {
                            name.push_str(&format!("_has:{source}:{param}:"));
                        }
                    }
                }
                name.push_str(&c.param);
                if let Some(m) = c.modifier {
                    name.push(':');
                    name.push_str(m.code());
                }
                name
            })
            .collect();
        if !query.sort.is_empty() {
            asked.push("_sort".to_owned());
        }
        if !query.includes.is_empty() {
            asked.push("_include".to_owned());
        }
        if !query.revincludes.is_empty() {
            asked.push("_revinclude".to_owned());
        }
        if query.among.is_some() {
            asked.push("ids".to_owned());
        }
        RoutePart {
            backend: backend.to_owned(),
            asked,
            rows,
            took: started.elapsed(),
        }
    }
}

impl std::fmt::Display for RoutePart {
    /// `tantivy[_text] 120 rows 3.1 ms`: the form of the server's `X-Search-Route` header.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}] {} rows {:.1} ms",
            self.backend,
            self.asked.join(","),
            self.rows,
            self.took.as_secs_f64() * 1000.0
        )
    }
}

/// Whether a lane may answer a search now (see [`CompositeStorage::search_routed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fit {
    /// It holds every write that returned before the search began.
    Current,
    /// It is still missing some: only when nothing else can answer, and said so.
    Behind,
    /// It may not answer.
    No,
}

/// Per-operation overrides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Deliver in this mode to every secondary, whatever its configuration.
    pub mode: Option<SyncMode>,
}

/// One secondary's sync status.
#[derive(Clone, Debug, PartialEq)]
pub struct SecondaryStatus {
    /// Its name.
    pub name: String,
    /// Its mode.
    pub mode: SyncMode,
    /// Everything at or before this log position is applied.
    pub cursor: ChangeCursor,
    /// Changes waiting for it.
    pub lag_changes: u64,
    /// Age of the oldest change waiting for it, in milliseconds.
    pub lag_ms: u64,
    /// Changes applied that moved a key forward, by this process.
    pub applied: u64,
    /// Changes that were not newer than what it held.
    pub skipped: u64,
    /// Failed attempts (each retried).
    pub errors: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// Changes set aside in the dead-letter table (all processes).
    pub dead_letters: u64,
    /// The circuit breaker.
    pub circuit: CircuitState,
    /// Its health, as last probed.
    pub health: Health,
    /// A rebuild from the primary is running.
    pub backfilling: bool,
    /// Delivery stopped on a rejected change (by policy), with the reason.
    pub stopped: Option<String>,
    /// Whether it may answer searches now.
    pub healthy: bool,
}

struct Shared {
    primary: Arc<dyn Primary>,
    lanes: Vec<Arc<Lane>>,
    config: SyncConfig,
    memory: Option<memory::MemoryCache>,
}

/// The primary and its secondaries as one [`ResourceStorage`]; see the crate documentation.
pub struct CompositeStorage {
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
    workers: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for CompositeStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.shared.lanes.iter().map(|l| l.name.as_str()).collect();
        f.debug_struct("CompositeStorage")
            .field("secondaries", &names)
            .finish_non_exhaustive()
    }
}

impl CompositeStorage {
    /// Starts one worker per secondary. Names must be unique; they name the durable cursors,
    /// so a secondary keeps its name across restarts.
    pub fn new(
        primary: Arc<dyn Primary>,
        secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
        config: SyncConfig,
    ) -> Result<Self> {
        let mut names = std::collections::HashSet::new();
        for (name, _, _) in &secondaries {
            if name == PRIMARY || !names.insert(name.clone()) {
                return Err(Error::Configuration(format!(
                    "secondary name {name:?} is reserved or used twice"
                )));
            }
        }
        let lanes: Vec<Arc<Lane>> = secondaries
            .into_iter()
            .map(|(name, s, c)| Arc::new(Lane::new(name, s, c)))
            .collect();
        let shared = Arc::new(Shared {
            primary,
            lanes,
            memory: memory::MemoryCache::new(config.memory_cache_bytes),
            config,
        });
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let workers = shared
            .lanes
            .iter()
            .map(|lane| {
                let w = worker::Worker {
                    primary: shared.primary.clone(),
                    lane: lane.clone(),
                    config: shared.config.clone(),
                    shutdown: rx.clone(),
                    renewed: None,
                };
                tokio::spawn(w.run())
            })
            .chain(
                shared
                    .lanes
                    .iter()
                    .filter(|lane| lane.serves_reads())
                    .map(|lane| {
                        tokio::spawn(keep_read_lease(shared.clone(), lane.clone(), rx.clone()))
                    }),
            )
            .collect();
        Ok(CompositeStorage {
            shared,
            shutdown,
            workers: parking_lot::Mutex::new(workers),
        })
    }

    /// The primary.
    pub fn primary(&self) -> &Arc<dyn Primary> {
        &self.shared.primary
    }

    /// Stops the workers: each finishes its current step and gives its lease up.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        for lane in &self.shared.lanes {
            lane.wake.notify_one();
        }
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *self.workers.lock());
        for h in handles {
            let _ = h.await;
        }
    }

    /// Stops the workers at once, as a crash would: no lease is released (tests).
    pub fn abort(&self) {
        for h in self.workers.lock().drain(..) {
            h.abort();
        }
    }

    /// Runs `ops` atomically on the primary, then delivers the changes synchronously where the
    /// mode says so.
    pub async fn transaction_with(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
        options: WriteOptions,
    ) -> Result<Synced<Vec<OpOutcome>>> {
        let outcomes = self.shared.primary.transaction(ctx, ops).await?;
        self.after_write(ctx, outcomes, options).await
    }

    /// Runs `ops` as a batch on the primary (each entry alone), then delivers as
    /// [`Self::transaction_with`] does.
    pub async fn batch_with(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
        options: WriteOptions,
    ) -> Result<Synced<Vec<Result<OpOutcome>>>> {
        let results = self.shared.primary.batch(ctx, ops).await?;
        let ok: Vec<OpOutcome> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let synced = self.after_write(ctx, ok, options).await?;
        Ok(Synced {
            value: results,
            token: synced.token,
            lagging: synced.lagging,
        })
    }

    async fn after_write(
        &self,
        ctx: &TenantContext,
        outcomes: Vec<OpOutcome>,
        options: WriteOptions,
    ) -> Result<Synced<Vec<OpOutcome>>> {
        let mut changes = Vec::new();
        let mut seqs = Vec::new();
        for o in &outcomes {
            match o {
                OpOutcome::Written(w) if w.kind != WriteKind::Unchanged => {
                    changes.push(Change::of(&w.resource));
                    seqs.extend(w.seq);
                }
                OpOutcome::Written(_) => {}
                OpOutcome::Deleted(d) => {
                    seqs.extend(d.seq);
                    for (key, version) in &d.deleted {
                        // The tombstone's lastUpdated is the primary's; read it back.
                        let t = self
                            .shared
                            .primary
                            .vread(ctx, key.resource_type, &key.id, *version)
                            .await?;
                        changes.push(Change::of(&t));
                    }
                }
            }
        }
        let token = seqs.iter().copied().max();
        let mut lagging = Vec::new();
        if changes.is_empty() {
            return Ok(Synced {
                value: outcomes,
                token,
                lagging,
            });
        }
        if self.shared.config.fail("commit") {
            return Ok(Synced {
                value: outcomes,
                token,
                lagging: self.shared.lanes.iter().map(|l| l.name.clone()).collect(),
            });
        }
        for lane in &self.shared.lanes {
            let mode = options.mode.unwrap_or(lane.config.mode);
            if mode == SyncMode::Synchronous && !self.apply_now(lane, &changes, &seqs, token).await
            {
                lagging.push(lane.name.clone());
            }
            lane.wake.notify_one();
        }
        Ok(Synced {
            value: outcomes,
            token,
            lagging,
        })
    }

    /// One synchronous delivery attempt; on failure, reads stay off the secondary until its
    /// worker has delivered past this write.
    async fn apply_now(
        &self,
        lane: &Lane,
        changes: &[Change],
        seqs: &[i64],
        token: Option<i64>,
    ) -> bool {
        let open = lane.lock().breaker.state() == CircuitState::Open;
        let span = tracing::debug_span!("sync.synchronous", secondary = %lane.name);
        let ok = !open && {
            let timeout = self.shared.config.sync_timeout;
            let applied =
                tokio::time::timeout(timeout, lane.secondary.apply(changes).instrument(span))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::backend_msg(
                            format!("no answer within {timeout:?}"),
                            true,
                        ))
                    });
            match applied {
                Ok(r) => {
                    let mut s = lane.lock();
                    s.breaker.success();
                    s.applied += r.applied;
                    s.skipped += r.skipped;
                    true
                }
                Err(e) => {
                    let mut s = lane.lock();
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                    s.breaker.failure(
                        self.shared.config.breaker_threshold,
                        self.shared.config.breaker_cooldown,
                    );
                    false
                }
            }
        };
        if ok {
            lane.note_synced(seqs.iter().copied());
            return true;
        }
        lane.lock().fence_pending = true;
        let fence = match token {
            Some(t) => self.shared.primary.position_of(t).await.ok().flatten(),
            None => None,
        };
        {
            let mut s = lane.lock();
            s.fence_pending = false;
            if let Some(f) = fence {
                if s.cursor < f {
                    s.fence = Some(s.fence.map_or(f, |old| old.max(f)));
                }
            } else if token.is_some() {
                // The position could not be read: fence at the end of the log as it stands.
                s.fence = Some(ChangeCursor {
                    major: i64::MAX,
                    minor: i64::MAX,
                });
            }
        }
        if let Some(f) = fence {
            self.fence_other_readers(lane, f).await;
        }
        false
    }

    /// Raises the lane's read fence in the primary and waits until every other process that
    /// serves reads from it has acknowledged it or lost its lease.
    async fn fence_other_readers(&self, lane: &Lane, at: ChangeCursor) {
        if !lane.serves_reads() {
            return;
        }
        let (primary, config) = (&self.shared.primary, &self.shared.config);
        if let Err(e) = primary.raise_read_fence(&lane.name, at).await {
            tracing::error!(secondary = %lane.name, error = %e,
                "could not raise the read fence: other processes may serve the old version until the change is delivered");
            return;
        }
        let deadline = Instant::now() + config.read_lease_ttl * 2;
        loop {
            match primary.readers_fenced(&lane.name, &config.holder, at).await {
                Ok(true) => return,
                _ if Instant::now() >= deadline => {
                    tracing::error!(secondary = %lane.name,
                        "other readers did not acknowledge the read fence in time");
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Whether `lane` has applied the write with this token.
    async fn has_token(&self, lane: &Lane, token: i64) -> Result<bool> {
        if lane.lock().recent_synced.contains(&token) {
            return Ok(true);
        }
        match self.shared.primary.position_of(token).await? {
            // Pruned: every consumer passed it.
            None => Ok(true),
            Some(p) => Ok(lane.lock().cursor >= p),
        }
    }

    /// Routes a search: see the crate documentation. `token` asks for read-your-writes.
    pub async fn search_routed(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        token: Option<i64>,
    ) -> Result<Routed> {
        if let Some(cursor) = &query.cursor {
            // A page cursor belongs to the backend that made it.
            if let Some(lane) = self
                .shared
                .lanes
                .iter()
                .find(|l| cursor.starts_with(&format!("{}:", l.secondary.name())))
            {
                // Later pages keep the first page's promise: the lane must have every change
                // committed before this page began (and the caller's own write), as for a
                // first page. Only this lane can read the cursor, so when it cannot catch up
                // in time it answers anyway and says it is behind.
                let mut fit = self.may_search(lane, &mut None, false).await?;
                if let Some(t) = token {
                    if !self.wait_for_token(lane, t).await? {
                        fit = Fit::Behind;
                    }
                }
                let started = Instant::now();
                let page = lane.secondary.search(ctx, query).await?;
                return Ok(Routed {
                    parts: vec![RoutePart::new(
                        &lane.name,
                        query,
                        page.matches.len(),
                        started,
                    )],
                    page,
                    backend: lane.name.clone(),
                    behind: fit != Fit::Current,
                });
            }
            if cursor.starts_with(split::SPLIT_CURSOR) {
                if let Some(routed) = self.split(ctx, query, token).await? {
                    return Ok(routed);
                }
            }
            return self.on_primary(ctx, query).await;
        }
        let primary_can = self.shared.primary.capabilities().can_search(query);
        let mut head = None;
        let mut capable: Vec<&Arc<Lane>> = self
            .shared
            .lanes
            .iter()
            .filter(|l| l.secondary.capabilities().can_search(query))
            .collect();
        capable.sort_by_key(|l| l.config.search_cost);
        for lane in capable {
            if primary_can && lane.config.search_cost >= self.shared.config.primary_search_cost {
                break;
            }
            let fit = self.may_search(lane, &mut head, primary_can).await?;
            if fit == Fit::No || (fit == Fit::Behind && primary_can) {
                continue;
            }
            if let Some(t) = token {
                if !self.wait_for_token(lane, t).await? {
                    continue;
                }
            }
            let started = Instant::now();
            match lane.secondary.search(ctx, query).await {
                Ok(page) => {
                    if fit == Fit::Behind {
                        tracing::warn!(secondary = %lane.name,
                            "search answered by a secondary that has not caught up");
                    }
                    return Ok(Routed {
                        parts: vec![RoutePart::new(
                            &lane.name,
                            query,
                            page.matches.len(),
                            started,
                        )],
                        page,
                        backend: lane.name.clone(),
                        behind: fit == Fit::Behind,
                    });
                }
                Err(e) if !primary_can => return Err(e),
                Err(e) => {
                    tracing::warn!(secondary = %lane.name, error = %e, "search failed; the primary answers");
                }
            }
        }
        if !primary_can {
            if let Some(routed) = self.split(ctx, query, token).await? {
                return Ok(routed);
            }
        }
        self.on_primary(ctx, query).await
    }

    /// Whether a lane's view is current enough to answer a search now.
    ///
    /// A synchronous secondary stands for "every write that returned is here", so searches
    /// follow the rule reads by id follow: none while a failed apply, in this process or
    /// another, lies ahead of its cursor. Its lag does not excuse it: a write that returned
    /// after a failed apply is exactly what a lagging search would miss. Other processes'
    /// fences arrive with the read lease, renewed here as for a read. An asynchronous
    /// secondary must have applied every change committed before the search began (`head`,
    /// read from the log once per search): the search waits for it, waking its worker, for at
    /// most `search_wait`, unless the primary can answer instead and the secondary is
    /// unavailable or known to be more than `max_lag` behind.
    async fn may_search(
        &self,
        lane: &Lane,
        head: &mut Option<ChangeCursor>,
        primary_can: bool,
    ) -> Result<Fit> {
        let fit = |ok: bool| if ok { Fit::Current } else { Fit::No };
        if (lane.config.mode == SyncMode::Synchronous || primary_can) && !lane.available() {
            return Ok(Fit::No);
        }
        if lane.config.mode == SyncMode::Synchronous {
            if lane.serves_reads() {
                if !lane.read_leased() {
                    renew_read_lease(&self.shared, lane).await;
                }
                return Ok(fit(lane.readable()));
            }
            let s = lane.lock();
            return Ok(fit(s.fence.is_none()
                && !s.fence_pending
                && s.shared_fence.is_none_or(|f| s.cursor >= f)));
        }
        if primary_can && lane.lock().lag_changes > lane.config.max_lag {
            return Ok(Fit::No);
        }
        let target = match *head {
            Some(h) => h,
            None => *head.insert(self.shared.primary.log_head().await?),
        };
        let deadline = Instant::now() + self.shared.config.search_wait;
        loop {
            let moved = lane.moved.notified();
            // Only the secondary can answer: one still starting (not yet probed, or being
            // built) is worth the same bounded wait.
            let available = lane.available();
            if available && self.holds_all_before(lane, target).await? {
                return Ok(Fit::Current);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(if available { Fit::Behind } else { Fit::No });
            }
            // The worker applies and commits a batch as soon as it wakes: a waiting search
            // need not sit out its poll interval or the index's commit timer.
            lane.wake.notify_one();
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), moved).await;
        }
    }

    /// Whether `lane` has applied every change at or before `target`. Its cursor names the last
    /// change it applied, and a log head need not be a change's position: on PostgreSQL the
    /// head is the oldest transaction still running, which the cursor of a caught-up lane
    /// never reaches. So a cursor short of the head still holds everything when no change
    /// lies between the two.
    async fn holds_all_before(&self, lane: &Lane, target: ChangeCursor) -> Result<bool> {
        let cursor = lane.lock().cursor;
        self.nothing_between(cursor, target).await
    }

    /// Whether no change lies after `cursor` and at or before `target`.
    async fn nothing_between(&self, cursor: ChangeCursor, target: ChangeCursor) -> Result<bool> {
        if cursor >= target {
            return Ok(true);
        }
        let next = self.shared.primary.changes_after(cursor, 1).await?;
        Ok(next.first().is_none_or(|c| c.cursor > target))
    }

    async fn on_primary(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<Routed> {
        let started = Instant::now();
        let page = self.shared.primary.search(ctx, query).await?;
        Ok(Routed {
            parts: vec![RoutePart::new(PRIMARY, query, page.matches.len(), started)],
            page,
            backend: PRIMARY.to_owned(),
            behind: false,
        })
    }

    /// Waits up to `token_wait` for the lane to have the token's write.
    async fn wait_for_token(&self, lane: &Lane, token: i64) -> Result<bool> {
        let deadline = Instant::now() + self.shared.config.token_wait;
        loop {
            let moved = lane.moved.notified();
            if self.has_token(lane, token).await? {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), moved).await;
        }
    }

    /// Reads by id, from a secondary that serves reads when one may (see the crate
    /// documentation), else from the primary. Reports who answered.
    pub async fn read_routed(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<(StoredResource, String)> {
        let fill = match &self.shared.memory {
            Some(cache) => {
                ctx.require(Permission::Read)?;
                match cache
                    .get(&*self.shared.primary, ctx.tenant(), resource_type, id)
                    .await?
                {
                    memory::Lookup::Hit(r) => return Ok((r, MEMORY.to_owned())),
                    memory::Lookup::Miss(epoch) => Some((cache, epoch)),
                    memory::Lookup::Bypass => None,
                }
            }
            None => None,
        };
        let (r, from) = self.read_tiers(ctx, resource_type, id).await?;
        if let Some((cache, epoch)) = fill {
            cache.fill(epoch, &r);
        }
        Ok((r, from))
    }

    /// Hits, misses and size of the in-process cache; `None` when it is off.
    pub fn memory_cache_stats(&self) -> Option<MemoryCacheStats> {
        self.shared.memory.as_ref().map(memory::MemoryCache::stats)
    }

    /// A read by id from the secondaries that serve reads, else the primary.
    async fn read_tiers(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<(StoredResource, String)> {
        for lane in self.shared.lanes.iter().filter(|l| l.serves_reads()) {
            if !lane.read_leased() {
                renew_read_lease(&self.shared, lane).await;
            }
            if !lane.readable() {
                continue;
            }
            match lane.secondary.read(ctx, resource_type, id).await {
                Ok(Some(r)) if r.deleted => {
                    return Err(Error::Gone(format!(
                        "{resource_type}/{id} was deleted in version {}",
                        r.version
                    )))
                }
                Ok(Some(r)) => return Ok((r, lane.name.clone())),
                // Never applied there (or lost): the primary knows.
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(secondary = %lane.name, error = %e, "read failed; the primary answers");
                }
            }
        }
        let r = self.shared.primary.read(ctx, resource_type, id).await?;
        Ok((r, PRIMARY.to_owned()))
    }

    /// Every secondary's status.
    pub async fn status(&self) -> Result<Vec<SecondaryStatus>> {
        let mut out = Vec::new();
        for lane in &self.shared.lanes {
            let dead = self.shared.primary.dead_letters(&lane.name).await?.len() as u64;
            let cursor = self.shared.primary.consumer(&lane.name).await?.cursor;
            let (lag_changes, oldest) = self.shared.primary.backlog(cursor).await?;
            let healthy = lane.available();
            let s = lane.lock();
            out.push(SecondaryStatus {
                name: lane.name.clone(),
                mode: lane.config.mode,
                cursor,
                lag_changes,
                lag_ms: oldest.map_or(0, |t| {
                    u64::try_from(fhirstore_core::now_micros().saturating_sub(t) / 1000)
                        .unwrap_or(0)
                }),
                applied: s.applied,
                skipped: s.skipped,
                errors: s.errors,
                last_error: s.last_error.clone(),
                dead_letters: dead,
                circuit: s.breaker.state(),
                health: s.health.clone(),
                backfilling: s.backfilling,
                stopped: s.stopped.clone(),
                healthy,
            });
        }
        Ok(out)
    }

    /// A reconciler over this composite's primary and secondaries.
    pub fn reconciler(&self) -> reconcile::Reconciler {
        reconcile::Reconciler::new(
            self.shared.primary.clone(),
            self.shared
                .lanes
                .iter()
                .map(|l| (l.name.clone(), l.secondary.clone()))
                .collect(),
        )
    }

    /// The changes a secondary set aside.
    pub async fn dead_letters(&self, secondary: &str) -> Result<Vec<DeadLetter>> {
        self.shared.primary.dead_letters(secondary).await
    }

    /// Waits until every secondary has applied everything committed before the call, or the
    /// timeout passes; `true` when all caught up.
    pub async fn wait_for_sync(&self, timeout: Duration) -> Result<bool> {
        let head = self.shared.primary.log_head().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for lane in &self.shared.lanes {
                let cursor = self.shared.primary.consumer(&lane.name).await?.cursor;
                let behind = !self.nothing_between(cursor, head).await?;
                let s = lane.lock();
                if behind || s.backfilling || s.health != Health::Healthy {
                    all = false;
                }
            }
            if all {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            for lane in &self.shared.lanes {
                lane.wake.notify_one();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Renews a lane's read lease, learning the read fence any process raised.
async fn renew_read_lease(shared: &Shared, lane: &Lane) {
    let _one = lane.renewing.lock().await;
    let started = Instant::now();
    // Once the renewal commits, a writer waiting on it may return: no read may use the old
    // fence from then on, so none is served until the answer is applied.
    lane.lock().read_lease = None;
    let ttl = shared.config.read_lease_ttl;
    match shared
        .primary
        .renew_reader(&lane.name, &shared.config.holder, ttl)
        .await
    {
        Ok(fence) => {
            let mut s = lane.lock();
            if let Some(f) = fence {
                s.shared_fence = Some(s.shared_fence.map_or(f, |old| old.max(f)));
            }
            s.read_lease = Some(started + ttl);
        }
        Err(e) => {
            tracing::debug!(secondary = %lane.name, error = %e, "read lease not renewed; reads go to the primary");
        }
    }
}

/// Keeps a lane's read lease renewed, a third of its life at a time.
async fn keep_read_lease(
    shared: Arc<Shared>,
    lane: Arc<Lane>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        renew_read_lease(&shared, &lane).await;
        tokio::select! {
            _ = tokio::time::sleep(shared.config.read_lease_ttl / 3) => {}
            _ = shutdown.changed() => {}
        }
    }
}

impl Drop for CompositeStorage {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[async_trait]
impl ResourceStorage for CompositeStorage {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.shared.primary.capabilities();
        caps.name = "composite";
        for lane in &self.shared.lanes {
            for p in lane.secondary.capabilities().search_params {
                if !caps.search_params.contains(&p) {
                    caps.search_params.push(p);
                }
            }
            for p in lane.secondary.capabilities().sort_params {
                if !caps.sort_params.contains(&p) {
                    caps.sort_params.push(p);
                }
            }
        }
        caps
    }

    async fn transaction(&self, ctx: &TenantContext, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>> {
        Ok(self
            .transaction_with(ctx, ops, WriteOptions::default())
            .await?
            .value)
    }

    async fn batch(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<OpOutcome>>> {
        Ok(self
            .batch_with(ctx, ops, WriteOptions::default())
            .await?
            .value)
    }

    async fn read(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<StoredResource> {
        Ok(self.read_routed(ctx, resource_type, id).await?.0)
    }

    async fn vread(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
        version: VersionId,
    ) -> Result<StoredResource> {
        self.shared
            .primary
            .vread(ctx, resource_type, id, version)
            .await
    }

    async fn history(&self, ctx: &TenantContext, request: &HistoryRequest) -> Result<HistoryPage> {
        self.shared.primary.history(ctx, request).await
    }

    async fn count(&self, ctx: &TenantContext, resource_type: Option<ResourceType>) -> Result<u64> {
        self.shared.primary.count(ctx, resource_type).await
    }

    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage> {
        Ok(self.search_routed(ctx, query, None).await?.page)
    }

    async fn search_parameters(&self, ctx: &TenantContext) -> Result<Arc<Registry>> {
        self.shared.primary.search_parameters(ctx).await
    }

    async fn reindex_status(&self, ctx: &TenantContext) -> Result<Vec<ReindexStatus>> {
        self.shared.primary.reindex_status(ctx).await
    }

    /// The primary's planner statistics; the secondaries keep none.
    async fn refresh_statistics(&self, ctx: &TenantContext) -> Result<()> {
        self.shared.primary.refresh_statistics(ctx).await
    }

    async fn reindex(
        &self,
        ctx: &TenantContext,
        options: ReindexOptions,
        progress: &(dyn for<'r> Fn(&'r ReindexStatus) + Send + Sync),
    ) -> Result<Vec<ReindexStatus>> {
        self.shared.primary.reindex(ctx, options, progress).await
    }
}
