//! How each secondary is kept in sync, and the manager's timings.

use std::sync::Arc;
use std::time::Duration;

/// When a write's change reaches a secondary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Before the write returns. If the secondary fails, the write still succeeds (the primary
    /// committed), the result names the secondary as lagging, and the background worker
    /// delivers the change from the outbox.
    Synchronous,
    /// By the background worker only, in batches.
    Asynchronous,
}

/// What the worker does with a change the secondary rejects for good (not a temporary
/// failure: retrying would fail the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectPolicy {
    /// Stop delivering to this secondary; status shows why. Nothing is skipped.
    Stop,
    /// Record the change in the dead-letter table and go on.
    DeadLetter,
}

/// One secondary's settings.
#[derive(Clone, Debug)]
pub struct SecondaryConfig {
    /// Its mode.
    pub mode: SyncMode,
    /// Its cost when routing a search: the cheapest capable, healthy, caught-up backend
    /// answers. The primary's is [`SyncConfig::primary_search_cost`].
    pub search_cost: u32,
    /// Whether reads by id may be served by it (only ever in synchronous mode, and only while
    /// no synchronous apply has failed since the worker last caught up).
    pub serve_reads: bool,
    /// What to do with a change it rejects for good.
    pub on_reject: RejectPolicy,
    /// Routing skips it while more than this many changes wait for it.
    pub max_lag: u64,
}

impl SecondaryConfig {
    /// The defaults for a read cache (Redis): synchronous, serves reads, cheapest search.
    pub fn cache() -> Self {
        SecondaryConfig {
            mode: SyncMode::Synchronous,
            search_cost: 10,
            serve_reads: true,
            on_reject: RejectPolicy::DeadLetter,
            max_lag: 0,
        }
    }

    /// The defaults for a search index (tantivy): asynchronous, no reads, searches only when
    /// caught up within 1,000 changes.
    pub fn index() -> Self {
        SecondaryConfig {
            mode: SyncMode::Asynchronous,
            search_cost: 20,
            serve_reads: false,
            on_reject: RejectPolicy::DeadLetter,
            max_lag: 1_000,
        }
    }
}

/// A test hook: called at each named step of delivery; returning `true` makes that step end
/// as a process crash would (see [`SyncConfig::failpoint`]).
pub type Failpoint = Arc<dyn Fn(&'static str) -> bool + Send + Sync>;

/// The manager's settings.
#[derive(Clone)]
pub struct SyncConfig {
    /// Changes per batch.
    pub batch_size: u32,
    /// How long a worker waits for a batch to fill once it has some changes.
    pub batch_wait: Duration,
    /// How often an idle worker looks at the outbox (local writes wake it at once).
    pub poll_interval: Duration,
    /// First retry delay; doubled each attempt up to `retry_max`, with jitter.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Consecutive failures that open a secondary's circuit.
    pub breaker_threshold: u32,
    /// How long an open circuit stays open before one trial.
    pub breaker_cooldown: Duration,
    /// How long a worker's lease lasts without renewal; another process takes over after.
    pub lease_ttl: Duration,
    /// The primary's search cost (see [`SecondaryConfig::search_cost`]).
    pub primary_search_cost: u32,
    /// How long a write waits for a synchronous secondary before returning with it lagging.
    pub sync_timeout: Duration,
    /// How long a read with a consistency token waits for a secondary before the primary
    /// answers instead.
    pub token_wait: Duration,
    /// How long a search routed to an asynchronous secondary waits for it to apply every
    /// change committed before the search began (the log's head at request time). Past it, the
    /// primary answers if it can; else the secondary answers as it stands, and says so
    /// ([`crate::Routed::behind`]).
    pub search_wait: Duration,
    /// How long this process may serve reads from a synchronous secondary without hearing
    /// from the primary. Renewed every third of it; a write whose synchronous apply failed
    /// waits (at most about this long) until every other process has heard of it.
    pub read_lease_ttl: Duration,
    /// The most ids one side of a split search may hand the other (see
    /// [`crate::CompositeStorage::search_routed`]): when the secondary's criteria match more,
    /// the primary's side drives; when both do, the search is refused naming this limit.
    pub split_bound: usize,
    /// Bytes of current versions kept in this process for reads by id (the tier before Redis
    /// and the primary); 0 turns it off. Used only with a primary that has a change stamp
    /// (SQLite); see the `memory` module.
    pub memory_cache_bytes: usize,
    /// Prune outbox entries every consumer has passed.
    pub prune: bool,
    /// This process's name in leases; unique per process.
    pub holder: String,
    /// Test hook, called with `commit` (a write committed on the primary, before synchronous
    /// applies), `apply` (before a batch is applied), `applied` (after, before the cursor
    /// moves) and `advanced`. `true` ends the step as a crash would: the write returns without
    /// applying, or the worker stops without releasing its lease.
    pub failpoint: Option<Failpoint>,
}

impl std::fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("batch_size", &self.batch_size)
            .field("batch_wait", &self.batch_wait)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            batch_size: 500,
            batch_wait: Duration::from_millis(20),
            poll_interval: Duration::from_millis(200),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(10),
            primary_search_cost: 15,
            sync_timeout: Duration::from_secs(2),
            token_wait: Duration::from_millis(500),
            search_wait: Duration::from_secs(2),
            read_lease_ttl: Duration::from_secs(2),
            split_bound: 100_000,
            memory_cache_bytes: 0,
            prune: true,
            holder: format!("fhirstore-{}", uuid::Uuid::now_v7().simple()),
            failpoint: None,
        }
    }
}

impl SyncConfig {
    pub(crate) fn fail(&self, step: &'static str) -> bool {
        self.failpoint.as_ref().is_some_and(|f| f(step))
    }
}
