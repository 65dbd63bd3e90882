//! Scheduled reconciliation: every `interval`, a cheap pass over the resources written in the
//! last `window` (one read per key on each side, from the primary's history), then the full
//! digest descent. Off unless a caller starts it.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fhirstore_core::secondary::{Change, Secondary};
use fhirstore_core::{
    HistoryRequest, HistoryScope, ResourceStorage, ResourceType, Result, StoredResource,
    TenantContext, TenantId,
};

use crate::reconcile::{
    InFlight, JobReport, JobRequest, ReconcileMode, ReconcileProgress, Reconciler, TypeReport,
};

/// When scheduled jobs run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Time between the starts of two runs.
    pub interval: Duration,
    /// The recent pass covers resources written this long before the run.
    pub window: Duration,
    /// Report only, or repair too.
    pub mode: ReconcileMode,
    /// Deep-scrub the secondaries in the full pass (see [`crate::reconcile::scrub_type`]), at
    /// most this many documents a second (0: unbounded); `None`: no scrub.
    pub deep: Option<u64>,
}

/// What one scheduled run found: the recent pass's report, then the full job's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScheduledRun {
    /// Over the window's keys.
    pub recent: JobReport,
    /// The full digest descent, with its job id.
    pub full: Option<(String, JobReport)>,
}

/// The key's version on one side, with its element hash.
fn state(r: &StoredResource) -> (u64, u128) {
    (r.version.get(), Change::of(r).element_hash())
}

/// How a key drifted, judged from full versions rather than segment keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Missing,
    Stale,
    Ahead,
}

fn judge(p: &StoredResource, s: Option<&StoredResource>) -> Option<Kind> {
    let Some(s) = s else {
        return Some(Kind::Missing);
    };
    let ((pv, pe), (sv, se)) = (state(p), state(s));
    if sv > pv {
        Some(Kind::Ahead)
    } else if sv < pv || se != pe {
        Some(Kind::Stale)
    } else {
        None
    }
}

/// The newest version of every key the tenant wrote since `since`, from the primary's
/// history (tombstones included).
async fn written_since<P: ResourceStorage + ?Sized>(
    primary: &P,
    ctx: &TenantContext,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<StoredResource>> {
    let mut newest: BTreeMap<(ResourceType, String), StoredResource> = BTreeMap::new();
    let mut request = HistoryRequest::new(HistoryScope::System);
    request.since = Some(since);
    request.count = Some(1_000);
    loop {
        let page = primary.history(ctx, &request).await?;
        for r in page.entries {
            newest
                .entry((r.key.resource_type, r.key.id.as_str().to_owned()))
                .or_insert(r);
        }
        match page.next_cursor {
            Some(c) => request.cursor = Some(c),
            None => break,
        }
    }
    Ok(newest.into_values().collect())
}

/// Compares the keys the tenant wrote since `since`, one read per key on each side, and
/// repairs missing and stale ones in `Repair` mode. Changes still on their way are waited for
/// first (the secondary's cursor reaching the log head), and a key counts as drift only if it
/// drifted the same way against the same primary version when looked at again.
pub async fn reconcile_recent<P>(
    primary: &P,
    secondary: &dyn Secondary,
    name: &str,
    tenant: &TenantId,
    since: chrono::DateTime<chrono::Utc>,
    mode: ReconcileMode,
    in_flight: Option<&InFlight<'_>>,
) -> Result<Vec<TypeReport>>
where
    P: ResourceStorage + ?Sized,
{
    let start = Instant::now();
    let ctx = TenantContext::full(tenant.clone());
    if let Some(f) = in_flight {
        f.settle_now().await?;
    }
    let keys = written_since(primary, &ctx, since).await?;
    let mut reports: BTreeMap<ResourceType, TypeReport> = BTreeMap::new();
    let mut drifted = Vec::new();
    for p in &keys {
        let rt = p.key.resource_type;
        let report = reports.entry(rt).or_insert_with(|| TypeReport {
            secondary: name.to_owned(),
            tenant: tenant.to_string(),
            resource_type: rt.to_string(),
            ..TypeReport::default()
        });
        report.keys_read_primary += 1;
        report.keys_read_secondary += 1;
        let s = secondary.read(&ctx, rt, &p.key.id).await?;
        if let Some(kind) = judge(p, s.as_ref()) {
            drifted.push((p.clone(), kind));
        }
    }
    if !drifted.is_empty() {
        if let Some(f) = in_flight {
            f.settle_now().await?;
        }
        let mut still = Vec::new();
        for (p, kind) in drifted {
            let rt = p.key.resource_type;
            let report = reports.entry(rt).or_default();
            report.keys_read_primary += 1;
            report.keys_read_secondary += 1;
            // The primary's current version: the key may have been written again meanwhile.
            let mut one = HistoryRequest::new(HistoryScope::Instance(rt, p.key.id.clone()));
            one.count = Some(1);
            let now = primary
                .history(&ctx, &one)
                .await?
                .entries
                .into_iter()
                .next();
            let s = secondary.read(&ctx, rt, &p.key.id).await?;
            let same_primary = now.as_ref().is_some_and(|n| n.version == p.version);
            if same_primary && judge(&p, s.as_ref()) == Some(kind) {
                still.push((p, kind));
            }
        }
        drifted = still;
    }
    let mut to_repair: BTreeMap<ResourceType, Vec<Change>> = BTreeMap::new();
    for (p, kind) in &drifted {
        let report = reports.entry(p.key.resource_type).or_default();
        match kind {
            Kind::Missing => report.missing += 1,
            Kind::Stale => report.stale += 1,
            Kind::Ahead => report.ahead += 1,
        }
        if *kind != Kind::Ahead {
            to_repair
                .entry(p.key.resource_type)
                .or_default()
                .push(Change::of(p));
        }
    }
    if mode == ReconcileMode::Repair {
        for (rt, changes) in &to_repair {
            for batch in changes.chunks(500) {
                let applied = secondary.repair(batch).await?;
                reports.entry(*rt).or_default().repaired += applied.applied;
            }
        }
        secondary.flush().await?;
    }
    let took = start.elapsed().as_millis() as u64;
    Ok(reports
        .into_values()
        .map(|mut r| {
            r.roots_equal = r.missing + r.stale + r.ahead == 0;
            r.duration_ms = took;
            r
        })
        .collect())
}

impl Reconciler {
    /// The recent pass over every tenant (or those asked) and every secondary.
    pub async fn run_recent(
        &self,
        tenants: Option<&[TenantId]>,
        since: chrono::DateTime<chrono::Utc>,
        mode: ReconcileMode,
    ) -> Result<JobReport> {
        let tenants = match tenants {
            Some(t) => t.to_vec(),
            None => self.primary().tenants().await?,
        };
        let mut report = JobReport::default();
        for (name, secondary) in self.secondaries() {
            let in_flight = InFlight {
                log: &**self.primary(),
                consumer: name,
                wait: self.settle_wait,
            };
            for tenant in &tenants {
                report.entries.extend(
                    reconcile_recent(
                        &**self.primary(),
                        &**secondary,
                        name,
                        tenant,
                        since,
                        mode,
                        Some(&in_flight),
                    )
                    .await?,
                );
            }
        }
        Ok(report)
    }

    /// Runs on `schedule` until `stop` is set: each run the recent pass, then the full job.
    /// `on_run` gets every run's reports; a failed run is logged and the next one goes ahead.
    pub async fn run_scheduled(
        &self,
        schedule: &Schedule,
        on_run: &(dyn Fn(&ScheduledRun) + Send + Sync),
        stop: &AtomicBool,
    ) {
        use std::sync::atomic::Ordering;
        let mut next = Instant::now() + schedule.interval;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now < next {
                tokio::time::sleep((next - now).min(Duration::from_millis(200))).await;
                continue;
            }
            next = now + schedule.interval;
            // A window beyond chrono's range reaches back to the start of time.
            let since = chrono::TimeDelta::from_std(schedule.window)
                .ok()
                .and_then(|w| chrono::Utc::now().checked_sub_signed(w))
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            let mut run = ScheduledRun::default();
            match self.run_recent(None, since, schedule.mode).await {
                Ok(r) => run.recent = r,
                Err(e) => tracing::warn!(error = %e, "scheduled reconcile: the recent pass failed"),
            }
            let request = JobRequest {
                tenants: None,
                types: None,
                secondaries: None,
                mode: schedule.mode,
                max_segments: 10_000,
                self_check: false,
                deep: schedule.deep.is_some(),
                deep_keys_per_second: schedule.deep.unwrap_or(0),
            };
            let progress = |_: &ReconcileProgress| {};
            match self.run(&request, &progress, stop).await {
                Ok(full) => run.full = Some(full),
                Err(e) => tracing::warn!(error = %e, "scheduled reconcile: the full job failed"),
            }
            on_run(&run);
        }
    }
}
