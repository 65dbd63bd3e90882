//! The primary's change log, as a sync manager consumes it: the outbox read in a gap-free
//! order, durable per-consumer cursors fenced by leases, dead letters, pruning and a snapshot
//! for backfills.
//!
//! **Why a cursor is two numbers.** On SQLite the outbox `seq` is handed out in commit order,
//! so `seq` alone orders the log. On PostgreSQL `seq` is handed out in call order but rows
//! become visible in commit order, so a reader that advanced past the highest visible `seq`
//! could skip a slower transaction's lower one. There the log is read in `(transaction id,
//! seq)` order and only below the oldest transaction still running: every transaction below
//! that horizon has finished, so nothing can appear behind the cursor later. A
//! [`ChangeCursor`] is that pair (on SQLite, `seq` twice).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{LogicalId, ResourceType, StoredResource};
use crate::secondary::Change;
use crate::tenant::TenantId;

/// A position in the change log; everything at or before it has been consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeCursor {
    /// The transaction id on PostgreSQL; the outbox `seq` on SQLite.
    pub major: i64,
    /// The outbox `seq`.
    pub minor: i64,
}

/// One entry of the log, with the version it wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedChange {
    /// Its position.
    pub cursor: ChangeCursor,
    /// Its outbox sequence number: the consistency token its write returned.
    pub seq: i64,
    /// The version (or tombstone) written.
    pub change: Change,
}

/// A change a consumer could not apply and set aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The outbox sequence number; 0 for a change met during a backfill.
    pub seq: i64,
    /// Tenant, type, id and version of the change.
    pub tenant: String,
    /// The resource type.
    pub resource_type: String,
    /// The resource id.
    pub id: String,
    /// The version.
    pub version: i64,
    /// Why the consumer refused it.
    pub error: String,
}

/// A consumer's durable state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerState {
    /// Everything at or before this has been applied.
    pub cursor: ChangeCursor,
    /// A backfill in progress: the log position it started at and the last key it applied.
    pub backfill: Option<Backfill>,
}

/// A resumable backfill: stream the primary's current state, then continue the log from
/// `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backfill {
    /// The log position taken before the snapshot was read: everything at or before it is in
    /// the snapshot.
    pub start: ChangeCursor,
    /// The last key applied, in snapshot order; `None` before the first batch.
    pub after: Option<(TenantId, ResourceType, LogicalId)>,
}

/// The primary's change log: every committed version in order, read by position.
#[async_trait]
pub trait ChangeLog: Send + Sync {
    /// Up to `limit` entries after `after`, in log order, each with its version's body. Only
    /// entries no running transaction can still precede are returned.
    async fn changes_after(&self, after: ChangeCursor, limit: u32) -> Result<Vec<LoggedChange>>;

    /// The position up to which the log is complete now.
    async fn log_head(&self) -> Result<ChangeCursor>;

    /// A value that changes with every commit to the primary, by this process or any other,
    /// read without a round trip to the database; `None` when there is no such value (or it
    /// cannot be read now). A primary that gives one also numbers its log without gaps (an
    /// entry's `seq` is one more than the previous entry's) and reports as its head the
    /// highest `seq` ever committed, pruned or not: a reader that stopped at some entry can
    /// then tell whether entries were pruned before it read them. The in-process cache of
    /// `fhirstore-sync` serves reads only while this vouches that nothing committed unseen.
    fn change_stamp(&self) -> Option<u128> {
        None
    }

    /// Where an entry stands in the log, by its sequence number; `None` when it was pruned
    /// (every consumer had passed it) or never existed.
    async fn position_of(&self, seq: i64) -> Result<Option<ChangeCursor>>;

    /// How many entries follow `after`, and the microsecond timestamp of the oldest of them.
    async fn backlog(&self, after: ChangeCursor) -> Result<(u64, Option<i64>)>;

    /// Deletes the entries at or before `upto`; returns how many.
    async fn prune(&self, upto: ChangeCursor) -> Result<u64>;

    /// The current version (or tombstone) of every resource of every tenant, in (tenant, type,
    /// id) order after `after`, `limit` at a time: what a backfill streams.
    async fn snapshot(
        &self,
        after: Option<&(TenantId, ResourceType, LogicalId)>,
        limit: u32,
    ) -> Result<Vec<StoredResource>>;
}

/// The log's named consumers (a secondary's name): durable cursors, leases so that one holder
/// at a time drains a consumer, and backfill state.
#[async_trait]
pub trait Consumers: Send + Sync {
    /// A consumer's durable state, registering it on first use.
    async fn consumer(&self, name: &str) -> Result<ConsumerState>;

    /// Takes or renews the consumer's lease for `ttl`: `true` when `holder` now holds it. One
    /// holder at a time drains a consumer, and a dead holder's lease expires.
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool>;

    /// Gives the lease up.
    async fn release(&self, name: &str, holder: &str) -> Result<()>;

    /// Moves the consumer's cursor forward (never back) and records the backfill state;
    /// `false`, changing nothing, when `holder` no longer holds the lease.
    async fn advance(
        &self,
        name: &str,
        holder: &str,
        cursor: ChangeCursor,
        backfill: Option<&Backfill>,
    ) -> Result<bool>;

    /// Starts a backfill for the consumer: records it and moves the cursor to its start (back
    /// if need be: a secondary that lost its data replays from there). `false` without the
    /// lease.
    async fn begin_backfill(&self, name: &str, holder: &str, backfill: &Backfill) -> Result<bool>;

    /// Every registered consumer's name and cursor.
    async fn consumers(&self) -> Result<Vec<(String, ChangeCursor)>>;
}

/// Changes a consumer rejected for good, set aside instead of blocking its cursor.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Sets a change aside for the consumer.
    async fn dead_letter(&self, name: &str, change: &LoggedChange, error: &str) -> Result<()>;

    /// The changes set aside for the consumer.
    async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>>;
}

/// Read fences across processes: after a failed synchronous apply, no process serves reads
/// from that secondary until it has caught up, and readers acknowledge that by lease.
#[async_trait]
pub trait ReadFences: Send + Sync {
    /// Renews `holder`'s lease to serve reads of `name`'s secondary for `ttl`, and returns the
    /// consumer's read fence, which the renewal acknowledges. Renewals and
    /// [`ReadFences::raise_read_fence`] are serialised, so a renewal either sees a raised fence
    /// or is one its raiser waits for.
    async fn renew_reader(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<ChangeCursor>>;

    /// Raises `name`'s read fence to `at`: a synchronous apply of the change at `at` failed, so
    /// no process may serve reads from the secondary until its cursor has passed `at`.
    async fn raise_read_fence(&self, name: &str, at: ChangeCursor) -> Result<()>;

    /// Whether every reader of `name` other than `holder` has acknowledged a fence at or past
    /// `at`, or its lease has run out.
    async fn readers_fenced(&self, name: &str, holder: &str, at: ChangeCursor) -> Result<bool>;
}

/// A reconcile job as the primary keeps it, so a job stopped by a crash or a cancellation
/// resumes where it was. The plan and report are the reconciler's JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// The job's id.
    pub id: String,
    /// The resolved steps and settings.
    pub plan: String,
    /// The first step not yet done.
    pub next_step: u64,
    /// The report so far.
    pub report: String,
    /// `running`, `cancelled` or `done`.
    pub state: String,
}

/// Where reconcile jobs are recorded.
#[async_trait]
pub trait JobLog: Send + Sync {
    /// Creates or replaces a job record.
    async fn save_job(&self, job: &JobRecord) -> Result<()>;

    /// A job record by id.
    async fn load_job(&self, id: &str) -> Result<Option<JobRecord>>;
}

/// The role of the store every write goes through first: it stores and searches resources,
/// keeps the ordered change log with its consumers, dead letters and read fences, answers
/// digests for reconciliation, records reconcile jobs, and keeps subscriptions' events.
/// `CompositeStorage` and the reconciler hold it as `Arc<dyn Primary>`; any type with all of
/// these is one.
pub trait Primary:
    crate::ResourceStorage
    + ChangeLog
    + Consumers
    + DeadLetters
    + ReadFences
    + crate::secondary::DigestSource
    + JobLog
    + crate::subscription::SubscriptionLog
{
}

impl<T> Primary for T where
    T: crate::ResourceStorage
        + ChangeLog
        + Consumers
        + DeadLetters
        + ReadFences
        + crate::secondary::DigestSource
        + JobLog
        + crate::subscription::SubscriptionLog
        + ?Sized
{
}
