//! The background worker of one secondary: holds the consumer's lease, backfills when the
//! secondary needs a rebuild, drains the outbox in batches, and moves the durable cursor only
//! after a batch is applied and flushed.

use std::sync::Arc;
use std::time::Duration;

use fhirstore_core::changelog::{Backfill, ChangeCursor, LoggedChange, Primary};
use fhirstore_core::secondary::{Change, Health};
use fhirstore_core::{now_micros, Error};
use tracing::Instrument as _;

use crate::config::{RejectPolicy, SyncConfig};
use crate::lane::{CircuitState, Lane};

/// Why a worker stopped early.
enum Halt {
    /// Shut down, or a failpoint simulated a crash.
    Exit,
}

pub(crate) struct Worker {
    pub primary: Arc<dyn Primary>,
    pub lane: Arc<Lane>,
    pub config: SyncConfig,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// When the lease was last taken or renewed: renewed at a third of its life, so an idle
    /// worker writes to the primary rarely. `advance` checks the holder, so a lease lost
    /// meanwhile only costs a batch applied twice.
    pub renewed: Option<std::time::Instant>,
}

/// Exponential backoff with jitter, from the clock's low bits (no random source needed).
pub(crate) fn backoff(config: &SyncConfig, attempt: u32) -> Duration {
    let base = config
        .retry_base
        .saturating_mul(1u32 << attempt.min(16))
        .min(config.retry_max);
    let jitter = (now_micros().unsigned_abs() % 1000) as u32;
    base.mul_f64(0.5 + f64::from(jitter) / 2000.0)
}

impl Worker {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps, waking early on shutdown.
    async fn pause(&mut self, d: Duration) {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.changed() => {}
        }
    }

    pub(crate) async fn run(mut self) {
        let span = tracing::info_span!("sync.worker", secondary = %self.lane.name);
        async move {
            loop {
                if self.stopping() {
                    let _ = self
                        .primary
                        .release(&self.lane.name, &self.config.holder)
                        .await;
                    return;
                }
                match self.step().await {
                    Ok(()) => {}
                    Err(Halt::Exit) => return,
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One pass: lease, health, backfill or one batch.
    async fn step(&mut self) -> std::result::Result<(), Halt> {
        let lane = self.lane.clone();
        let name = lane.name.as_str();
        let health = lane.secondary.health().await;
        lane.lock().health = health.clone();
        match self.renew().await {
            Ok(true) => {}
            Ok(false) => {
                // Another process drains this secondary; follow its cursor for status.
                self.refresh().await;
                let wait = self.config.poll_interval;
                self.pause(wait).await;
                return Ok(());
            }
            Err(e) => {
                self.note_error(&e);
                let wait = backoff(&self.config, 3);
                self.pause(wait).await;
                return Ok(());
            }
        }
        let state = match self.primary.consumer(name).await {
            Ok(s) => s,
            Err(e) => {
                self.note_error(&e);
                let wait = backoff(&self.config, 3);
                self.pause(wait).await;
                return Ok(());
            }
        };
        lane.set_cursor(state.cursor);
        lane.lock().backfilling = state.backfill.is_some();
        if lane.lock().stopped.is_some() {
            let wait = self.config.poll_interval;
            self.pause(wait).await;
            return Ok(());
        }
        if let Some(b) = state.backfill {
            return self.backfill(b).await;
        }
        match health {
            Health::NeedsRebuild(why) => {
                tracing::info!(%why, "secondary needs a rebuild; starting a backfill");
                match self.primary.log_head().await {
                    Ok(start) => {
                        let b = Backfill { start, after: None };
                        match self
                            .primary
                            .begin_backfill(name, &self.config.holder, &b)
                            .await
                        {
                            Ok(true) => self.backfill(b).await,
                            Ok(false) => Ok(()),
                            Err(e) => {
                                self.note_error(&e);
                                Ok(())
                            }
                        }
                    }
                    Err(e) => {
                        self.note_error(&e);
                        Ok(())
                    }
                }
            }
            Health::Unavailable(_) => {
                let wait = backoff(&self.config, 4);
                self.pause(wait).await;
                Ok(())
            }
            Health::Healthy => self.drain(state.cursor).await,
        }
    }

    /// Takes or renews the lease, at most every third of its life.
    async fn renew(&mut self) -> fhirstore_core::Result<bool> {
        if self
            .renewed
            .is_some_and(|t| t.elapsed() < self.config.lease_ttl / 3)
        {
            return Ok(true);
        }
        let held = self
            .primary
            .lease(&self.lane.name, &self.config.holder, self.config.lease_ttl)
            .await?;
        self.renewed = held.then(std::time::Instant::now);
        Ok(held)
    }

    async fn refresh(&self) {
        if let Ok(s) = self.primary.consumer(&self.lane.name).await {
            self.lane.lock().backfilling = s.backfill.is_some();
            self.lane.set_cursor(s.cursor);
        }
        self.update_lag().await;
    }

    /// The value, or `None` with the error noted (the step ends; the next one retries).
    fn ok<T>(&self, r: fhirstore_core::Result<T>) -> Option<T> {
        r.map_err(|e| self.note_error(&e)).ok()
    }

    fn note_error(&self, e: &Error) {
        tracing::warn!(secondary = %self.lane.name, error = %e, "sync step failed");
        let mut s = self.lane.lock();
        s.errors += 1;
        s.last_error = Some(e.to_string());
    }

    async fn update_lag(&self) {
        let cursor = self.lane.lock().cursor;
        if let Ok((n, oldest)) = self.primary.backlog(cursor).await {
            let mut s = self.lane.lock();
            s.lag_changes = n;
            s.lag_ms = oldest.map_or(0, |t| {
                u64::try_from(now_micros().saturating_sub(t) / 1000).unwrap_or(0)
            });
        }
    }

    /// Streams the primary's current state into the secondary from where the backfill left
    /// off, recording progress after each batch; at the end the cursor stays at the backfill's
    /// start, from which the outbox replays everything written since.
    async fn backfill(&mut self, mut b: Backfill) -> std::result::Result<(), Halt> {
        let lane = self.lane.clone();
        lane.lock().backfilling = true;
        loop {
            if self.stopping() {
                return Ok(());
            }
            // A long backfill keeps its lease; if another process took it, that one goes on.
            if !matches!(self.renew().await, Ok(true)) {
                return Ok(());
            }
            let rows = match self
                .primary
                .snapshot(b.after.as_ref(), self.config.batch_size)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    self.note_error(&e);
                    let wait = backoff(&self.config, 3);
                    self.pause(wait).await;
                    return Ok(());
                }
            };
            let Some(last) = rows.last() else { break };
            let next = (
                last.tenant.clone(),
                last.key.resource_type,
                last.key.id.clone(),
            );
            let changes: Vec<Change> = rows.iter().map(Change::of).collect();
            if !self.apply_retrying(&changes, None).await? {
                return Ok(());
            }
            if self.ok(lane.secondary.flush().await).is_none() {
                return Ok(());
            }
            b.after = Some(next);
            let advanced = self
                .primary
                .advance(&lane.name, &self.config.holder, b.start, Some(&b))
                .await;
            if self.ok(advanced) != Some(true) {
                return Ok(());
            }
        }
        let finished = self
            .primary
            .advance(&lane.name, &self.config.holder, b.start, None)
            .await;
        if self.ok(finished) != Some(true) || self.ok(lane.secondary.mark_built().await).is_none() {
            return Ok(());
        }
        tracing::info!("backfill complete");
        let mut s = lane.lock();
        s.backfilling = false;
        s.health = Health::Healthy;
        Ok(())
    }

    /// Applies with retries and backoff, through the circuit breaker. `Ok(false)`: give up for
    /// now (shutdown, or the secondary is stopped by policy). A change the secondary rejects
    /// for good is found by applying the batch one change at a time, and dead-lettered or
    /// stops delivery, by policy.
    async fn apply_retrying(
        &mut self,
        changes: &[Change],
        logged: Option<&[LoggedChange]>,
    ) -> std::result::Result<bool, Halt> {
        let lane = self.lane.clone();
        let mut attempt = 0u32;
        loop {
            if self.stopping() {
                return Ok(false);
            }
            let state = lane.lock().breaker.state();
            if state == CircuitState::Open {
                let wait = self.config.breaker_cooldown;
                self.pause(wait).await;
                continue;
            }
            if self.config.fail("apply") {
                return Err(Halt::Exit);
            }
            match lane.secondary.apply(changes).await {
                Ok(r) => {
                    let mut s = lane.lock();
                    s.breaker.success();
                    s.applied += r.applied;
                    s.skipped += r.skipped;
                    return Ok(true);
                }
                Err(e) if e.is_temporary() => {
                    self.note_error(&e);
                    lane.lock()
                        .breaker
                        .failure(self.config.breaker_threshold, self.config.breaker_cooldown);
                    let wait = backoff(&self.config, attempt);
                    attempt = attempt.saturating_add(1);
                    self.pause(wait).await;
                }
                Err(e) => {
                    self.note_error(&e);
                    return self.apply_singly(changes, logged).await;
                }
            }
        }
    }

    async fn apply_singly(
        &mut self,
        changes: &[Change],
        logged: Option<&[LoggedChange]>,
    ) -> std::result::Result<bool, Halt> {
        let lane = self.lane.clone();
        for (i, c) in changes.iter().enumerate() {
            let mut attempt = 0u32;
            loop {
                match lane.secondary.apply(std::slice::from_ref(c)).await {
                    Ok(r) => {
                        let mut s = lane.lock();
                        s.applied += r.applied;
                        s.skipped += r.skipped;
                        break;
                    }
                    Err(e) if e.is_temporary() => {
                        self.note_error(&e);
                        let wait = backoff(&self.config, attempt);
                        attempt = attempt.saturating_add(1);
                        self.pause(wait).await;
                        if self.stopping() {
                            return Ok(false);
                        }
                    }
                    Err(e) => {
                        let why =
                            format!("{}/{} v{}: {e}", c.key.resource_type, c.key.id, c.version);
                        match lane.config.on_reject {
                            RejectPolicy::DeadLetter => {
                                // A backfill streams rows, not log entries: no seq (0).
                                let entry =
                                    logged.and_then(|l| l.get(i)).cloned().unwrap_or_else(|| {
                                        LoggedChange {
                                            cursor: ChangeCursor::default(),
                                            seq: 0,
                                            change: c.clone(),
                                        }
                                    });
                                if let Err(db) = self
                                    .primary
                                    .dead_letter(&lane.name, &entry, &e.to_string())
                                    .await
                                {
                                    self.note_error(&db);
                                    return Ok(false);
                                }
                                tracing::warn!(%why, "change rejected; dead-lettered");
                                lane.lock().dead_letters += 1;
                                break;
                            }
                            RejectPolicy::Stop => {
                                tracing::error!(%why, "change rejected; delivery stopped");
                                lane.lock().stopped = Some(why);
                                return Ok(false);
                            }
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    /// Waits for changes after `cursor` (up to a batch, or `batch_wait` once some are there),
    /// applies them, flushes, and moves the cursor.
    async fn drain(&mut self, cursor: ChangeCursor) -> std::result::Result<(), Halt> {
        let lane = self.lane.clone();
        let limit = self.config.batch_size;
        let mut batch = match self.primary.changes_after(cursor, limit).await {
            Ok(b) => b,
            Err(e) => {
                self.note_error(&e);
                let wait = backoff(&self.config, 3);
                self.pause(wait).await;
                return Ok(());
            }
        };
        if batch.is_empty() {
            self.update_lag().await;
            let wait = self.config.poll_interval;
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = lane.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            return Ok(());
        }
        if (batch.len() as u32) < limit && !self.config.batch_wait.is_zero() {
            let wait = self.config.batch_wait;
            self.pause(wait).await;
            if let Ok(more) = self.primary.changes_after(cursor, limit).await {
                if more.len() > batch.len() {
                    batch = more;
                }
            }
        }
        let span = tracing::debug_span!("sync.apply", changes = batch.len());
        let changes: Vec<Change> = batch.iter().map(|l| l.change.clone()).collect();
        let applied = self
            .apply_retrying(&changes, Some(&batch))
            .instrument(span)
            .await?;
        if !applied {
            return Ok(());
        }
        if let Err(e) = lane.secondary.flush().await {
            self.note_error(&e);
            return Ok(());
        }
        if self.config.fail("applied") {
            return Err(Halt::Exit);
        }
        let Some(last) = batch.last().map(|l| l.cursor) else {
            return Ok(());
        };
        match self
            .primary
            .advance(&lane.name, &self.config.holder, last, None)
            .await
        {
            Ok(true) => {
                lane.set_cursor(last);
                if self.config.fail("advanced") {
                    return Err(Halt::Exit);
                }
                self.update_lag().await;
                if self.config.prune {
                    self.prune().await;
                }
            }
            Ok(false) => {}
            Err(e) => self.note_error(&e),
        }
        Ok(())
    }

    /// Deletes outbox entries every registered consumer has passed.
    async fn prune(&self) {
        match self.primary.consumers().await {
            Ok(all) => {
                if let Some(min) = all.iter().map(|(_, c)| *c).min() {
                    if let Err(e) = self.primary.prune(min).await {
                        self.note_error(&e);
                    }
                }
            }
            Err(e) => self.note_error(&e),
        }
    }
}
