//! The in-process cache of current versions: the tier before Redis and the primary for reads
//! by id.
//!
//! Reads by id must never return a version older than one a write returned to any caller in
//! any process. Another process's writes reach this one only through the primary, so before
//! serving from memory a read asks the primary for its change stamp
//! ([`fhirstore_core::changelog::ChangeLog::change_stamp`]): a value that moves with every
//! commit and is read without a round trip (SQLite: the header of its WAL index). When it
//! moved, the cache first reads the change log from where it last stopped and drops every
//! key written since, its own process's writes included. A primary without such a stamp
//! (PostgreSQL, whose log also lags commits behind the oldest open transaction) is never
//! cached: checking it would cost a round trip, as much as the read it saves.
//!
//! A read that missed fills the cache only if no change was dropped while it read: otherwise
//! it may hold a version that a change already caught up with made stale.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fhirstore_core::changelog::{ChangeCursor, Primary};
use fhirstore_core::{LogicalId, ResourceType, Result, StoredResource, TenantId};

/// Entries of the change log read per round trip while catching up. A backlog longer than
/// this (a bulk import in another process, say) empties the cache instead: reading every
/// body to learn which keys to drop would cost more than refilling.
const CATCH_UP_LIMIT: u32 = 1_000;

type Key = (TenantId, ResourceType, LogicalId);

/// What the cache says about one read.
pub(crate) enum Lookup {
    /// The current version, valid for this read.
    Hit(StoredResource),
    /// Not held; fill with [`MemoryCache::fill`] and this epoch once read elsewhere.
    Miss(u64),
    /// The cache cannot vouch for anything now (no stamp): read elsewhere, do not fill.
    Bypass,
}

struct State {
    entries: lru::LruCache<Key, (Arc<StoredResource>, usize)>,
    bytes: usize,
    /// The primary's stamp when the cache last caught up with its log.
    stamp: Option<u128>,
    /// Where in the log the cache caught up to; `None` before the first catch-up.
    seen: Option<ChangeCursor>,
    /// Moves whenever a key is dropped for a change: a fill started before it may be stale.
    epoch: u64,
}

/// Hit and miss counters, for status and the bench.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoryCacheStats {
    /// Reads answered from memory.
    pub hits: u64,
    /// Reads the cache could have answered but did not hold.
    pub misses: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now (canonical JSON of the bodies).
    pub bytes: u64,
}

/// See the module documentation.
pub(crate) struct MemoryCache {
    max_bytes: usize,
    state: parking_lot::Mutex<State>,
    /// One catch-up at a time; the others wait for it and find the stamp current.
    catching_up: tokio::sync::Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl MemoryCache {
    /// A cache of at most `max_bytes` of bodies; `None` for 0 (off).
    pub(crate) fn new(max_bytes: usize) -> Option<Self> {
        (max_bytes > 0).then(|| MemoryCache {
            max_bytes,
            state: parking_lot::Mutex::new(State {
                entries: lru::LruCache::unbounded(),
                bytes: 0,
                stamp: None,
                seen: None,
                epoch: 0,
            }),
            catching_up: tokio::sync::Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Looks `key` up after making sure every commit before this call is accounted for.
    pub(crate) async fn get(
        &self,
        primary: &dyn Primary,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Lookup> {
        let Some(stamp) = primary.change_stamp() else {
            return Ok(Lookup::Bypass);
        };
        if self.state.lock().stamp != Some(stamp) && !self.catch_up(primary).await? {
            return Ok(Lookup::Bypass);
        }
        let key = (tenant.clone(), resource_type, id.clone());
        let mut state = self.state.lock();
        if state.seen.is_none() {
            return Ok(Lookup::Bypass);
        }
        match state.entries.get(&key) {
            Some((r, _)) => {
                // The copy the caller owns is made outside the lock.
                let r = Arc::clone(r);
                drop(state);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Lookup::Hit(StoredResource::clone(&r)))
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(Lookup::Miss(state.epoch))
            }
        }
    }

    /// Keeps `r`, read after a [`Lookup::Miss`] at `epoch`, unless a change was dropped since
    /// (then `r` may already be stale) or it is a tombstone.
    pub(crate) fn fill(&self, epoch: u64, r: &StoredResource) {
        if r.deleted {
            return;
        }
        let size = serde_json::to_vec(&r.content).map_or(0, |b| b.len()) + 128;
        if size > self.max_bytes {
            return;
        }
        let key = (r.tenant.clone(), r.key.resource_type, r.key.id.clone());
        let mut state = self.state.lock();
        if state.epoch != epoch {
            return;
        }
        if let Some((_, old)) = state.entries.put(key, (Arc::new(r.clone()), size)) {
            state.bytes -= old;
        }
        state.bytes += size;
        while state.bytes > self.max_bytes {
            match state.entries.pop_lru() {
                Some((_, (_, s))) => state.bytes -= s,
                None => break,
            }
        }
    }

    /// Brings the cache up to the primary's stamp: drops every key the log shows written
    /// since the last catch-up. `false` when the primary has no stamp now.
    async fn catch_up(&self, primary: &dyn Primary) -> Result<bool> {
        let _one = self.catching_up.lock().await;
        // Read before the log: a commit after it moves the stamp again, and the next read
        // catches up once more.
        let Some(stamp) = primary.change_stamp() else {
            return Ok(false);
        };
        let seen = {
            let state = self.state.lock();
            if state.stamp == Some(stamp) {
                return Ok(true);
            }
            state.seen
        };
        let Some(mut at) = seen else {
            return self.restart(primary, stamp).await.map(|()| true);
        };
        loop {
            let batch = primary.changes_after(at, CATCH_UP_LIMIT).await?;
            // The log is numbered without gaps (see `change_stamp`): a gap means entries were
            // pruned before this cache read them, and a long backlog is cheaper to forget.
            let gap = batch
                .iter()
                .scan(at.minor, |prev, c| {
                    let next = c.seq != *prev + 1;
                    *prev = c.seq;
                    Some(next)
                })
                .any(|g| g);
            if gap || batch.len() >= CATCH_UP_LIMIT as usize {
                return self.restart(primary, stamp).await.map(|()| true);
            }
            let Some(last) = batch.last() else {
                // The stamp moved, so something committed: a lease or a cursor (nothing in the
                // log), or changes pruned already, which the head, a high-water mark, shows.
                if primary.log_head().await?.minor > at.minor {
                    return self.restart(primary, stamp).await.map(|()| true);
                }
                self.state.lock().stamp = Some(stamp);
                return Ok(true);
            };
            at = last.cursor;
            let mut state = self.state.lock();
            for c in &batch {
                let key = (
                    c.change.tenant.clone(),
                    c.change.key.resource_type,
                    c.change.key.id.clone(),
                );
                if let Some((_, size)) = state.entries.pop(&key) {
                    state.bytes -= size;
                }
            }
            state.epoch += 1;
            state.seen = Some(at);
        }
    }

    /// Empties the cache and starts over from the log's head.
    async fn restart(&self, primary: &dyn Primary, stamp: u128) -> Result<()> {
        let head = primary.log_head().await?;
        let mut state = self.state.lock();
        state.entries.clear();
        state.bytes = 0;
        state.epoch += 1;
        state.seen = Some(head);
        state.stamp = Some(stamp);
        Ok(())
    }

    /// The counters and the size held.
    pub(crate) fn stats(&self) -> MemoryCacheStats {
        let state = self.state.lock();
        MemoryCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: state.entries.len() as u64,
            bytes: state.bytes as u64,
        }
    }
}
