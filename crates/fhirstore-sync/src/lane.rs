//! One secondary's delivery state, shared by its worker, the write path and routing.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fhirstore_core::changelog::ChangeCursor;
use fhirstore_core::secondary::{Health, Secondary};
use tokio::sync::Notify;

use crate::config::SecondaryConfig;

/// A circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are not made until the cooldown ends.
    Open,
    /// The cooldown ended: the next call is a trial.
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            failures: 0,
            open_until: None,
        }
    }

    pub(crate) fn state(&self) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(t) if Instant::now() < t => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    pub(crate) fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }

    pub(crate) fn failure(&mut self, threshold: u32, cooldown: Duration) {
        self.failures += 1;
        if self.failures >= threshold || self.open_until.is_some() {
            self.open_until = Some(Instant::now() + cooldown);
        }
    }
}

/// How many recent synchronously applied sequence numbers a lane remembers, for read-your-
/// writes without waiting for the worker.
const RECENT_SYNCED: usize = 4_096;

#[derive(Debug)]
pub(crate) struct LaneState {
    pub cursor: ChangeCursor,
    pub applied: u64,
    pub skipped: u64,
    pub errors: u64,
    pub dead_letters: u64,
    pub last_error: Option<String>,
    pub breaker: Breaker,
    /// A synchronous apply failed at this log position: reads stay off this secondary until
    /// the worker has passed it.
    pub fence: Option<ChangeCursor>,
    /// A synchronous apply failed but the position is not known yet (set before the lookup).
    pub fence_pending: bool,
    /// The highest read fence any process raised, as last heard from the primary: reads stay
    /// off this secondary until the cursor has passed it.
    pub shared_fence: Option<ChangeCursor>,
    /// Until when this process may serve reads from it (see `SyncConfig::read_lease_ttl`).
    pub read_lease: Option<Instant>,
    pub stopped: Option<String>,
    pub backfilling: bool,
    pub health: Health,
    pub lag_changes: u64,
    pub lag_ms: u64,
    pub recent_synced: VecDeque<i64>,
}

/// One secondary and everything known about its delivery.
pub(crate) struct Lane {
    pub name: String,
    pub secondary: Arc<dyn Secondary>,
    pub config: SecondaryConfig,
    pub state: Mutex<LaneState>,
    /// Wakes the worker: a local write committed, or shutdown.
    pub wake: Notify,
    /// Signalled whenever the cursor moves.
    pub moved: Notify,
    /// One read-lease renewal at a time, so their answers are applied in the order the
    /// primary gave them.
    pub renewing: tokio::sync::Mutex<()>,
}

impl Lane {
    pub(crate) fn new(
        name: String,
        secondary: Arc<dyn Secondary>,
        config: SecondaryConfig,
    ) -> Self {
        Lane {
            name,
            secondary,
            config,
            state: Mutex::new(LaneState {
                cursor: ChangeCursor::default(),
                applied: 0,
                skipped: 0,
                errors: 0,
                dead_letters: 0,
                last_error: None,
                breaker: Breaker::new(),
                fence: None,
                fence_pending: false,
                shared_fence: None,
                read_lease: None,
                stopped: None,
                backfilling: false,
                health: Health::Unavailable("not probed yet".to_owned()),
                lag_changes: 0,
                lag_ms: 0,
                recent_synced: VecDeque::new(),
            }),
            wake: Notify::new(),
            moved: Notify::new(),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock()
    }

    /// Whether the secondary may answer at all now: healthy, circuit not open, delivering.
    pub(crate) fn available(&self) -> bool {
        let s = self.lock();
        s.health == Health::Healthy
            && s.breaker.state() != CircuitState::Open
            && s.stopped.is_none()
            && !s.backfilling
    }

    /// Whether this process may serve reads by id from it at all: see
    /// [`SecondaryConfig::serve_reads`]. Such a lane holds a read lease.
    pub(crate) fn serves_reads(&self) -> bool {
        self.config.serve_reads && self.config.mode == crate::SyncMode::Synchronous
    }

    /// Whether the read lease is in force now.
    pub(crate) fn read_leased(&self) -> bool {
        self.lock().read_lease.is_some_and(|t| Instant::now() < t)
    }

    /// Whether reads by id may come from it now: it serves reads, is available, holds its read
    /// lease, and no fence (this process's or another's) is ahead of its cursor.
    pub(crate) fn readable(&self) -> bool {
        self.serves_reads() && self.available() && self.read_leased() && {
            let s = self.lock();
            s.fence.is_none() && !s.fence_pending && s.shared_fence.is_none_or(|f| s.cursor >= f)
        }
    }

    /// Records the durable cursor (read from the primary or just advanced): lifts a read
    /// fence it has passed and wakes whoever waits for it to move.
    pub(crate) fn set_cursor(&self, cursor: ChangeCursor) {
        {
            let mut s = self.lock();
            s.cursor = cursor;
            if s.fence.is_some_and(|f| f <= cursor) {
                s.fence = None;
            }
        }
        self.moved.notify_waiters();
    }

    pub(crate) fn note_synced(&self, seqs: impl IntoIterator<Item = i64>) {
        let mut s = self.lock();
        for seq in seqs {
            if s.recent_synced.len() >= RECENT_SYNCED {
                s.recent_synced.pop_front();
            }
            s.recent_synced.push_back(seq);
        }
    }
}
