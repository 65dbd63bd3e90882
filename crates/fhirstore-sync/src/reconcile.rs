//! The reconciler: finds drift between the primary and a secondary by comparing XOR digests
//! top down, and repairs it through the secondary's version-guarded apply.
//!
//! For each (tenant, type): equal roots end the comparison. Otherwise the segment digests of both
//! sides are compared (for a type of more than [`COARSE_ABOVE`] resources, the 4,096 coarse
//! group digests first, then only the segments within the groups that differ), and only the
//! segments that differ have their keys `(id, version, E)` read, from both sides. Each key there is one of:
//! - **missing**: the secondary lacks it;
//! - **extra**: the primary has no such key;
//! - **stale**: the secondary holds an older version, or the same version with another `E`;
//! - **ahead**: the secondary holds a newer version than the primary (reported, never
//!   repaired backwards).
//!
//! `Repair` applies the primary's current version of every missing and stale key (with
//! [`Secondary::repair`], so a damaged copy of the same version is replaced too), then
//! re-reads the repaired segments' digests and reports those still differing. An extra key
//! cannot be removed through the version-guarded contract, so it is reported only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use fhirstore_core::changelog::{ChangeCursor, JobRecord, Primary};
use fhirstore_core::digest::{group_of, Digest};
use fhirstore_core::secondary::{
    Change, DigestSource, DigestView, GroupDigest, KeyState, Secondary, SegmentDigest,
};
use fhirstore_core::{ResourceStorage, ResourceType, Result, TenantContext, TenantId};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

/// Whether a run only reports, or also repairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconcileMode {
    /// Compare and report.
    DryRun,
    /// Compare, repair missing and stale keys, and re-check.
    Repair,
}

/// The outcome for one (secondary, tenant, type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeReport {
    /// The secondary.
    pub secondary: String,
    /// The tenant.
    pub tenant: String,
    /// The resource type.
    pub resource_type: String,
    /// Whether the root digests were equal (nothing else was read).
    pub roots_equal: bool,
    /// Segment groups whose digests differ (0 when the type was small enough to compare its
    /// segments directly).
    #[serde(default)]
    pub groups_differing: u64,
    /// Segments whose digests differ (within the differing groups).
    pub segments_differing: u64,
    /// Segments examined (at most `max_segments`).
    pub segments_examined: u64,
    /// Keys the secondary lacks.
    pub missing: u64,
    /// Keys the primary lacks.
    pub extra: u64,
    /// Keys the secondary holds older, or with another body.
    pub stale: u64,
    /// Keys the secondary holds newer than the primary.
    pub ahead: u64,
    /// Keys repaired.
    pub repaired: u64,
    /// Segments that still differ after the repair.
    pub still_differing: u64,
    /// Group and segment digest rows read, both sides.
    #[serde(default)]
    pub digest_rows_read: u64,
    /// Key rows read from the primary.
    pub keys_read_primary: u64,
    /// Key rows read from the secondary.
    pub keys_read_secondary: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// The deep scrub that ran first, when the job asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<ScrubReport>,
}

/// What a deep scrub of one (secondary, tenant, type) found; see [`Secondary::scrub`]. Keys
/// it removed are then repaired by the comparison that follows, and counted there as missing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Whether the secondary can be scrubbed at all (one that keeps no digest apart from its
    /// data cannot).
    pub supported: bool,
    /// Segments scrubbed.
    pub segments: u64,
    /// Documents read and hashed again.
    pub keys_read: u64,
    /// Keys listed whose document was gone.
    pub lost: u64,
    /// Documents whose body no longer matched their element hash.
    pub corrupted: u64,
    /// Documents that could not be read at all.
    pub unreadable: u64,
    /// Segments whose maintained digest disagreed with what was held.
    pub segments_rewritten: u64,
    /// The first ids of each kind, for a person to look at.
    pub examples: Vec<String>,
}

/// How many damaged ids a scrub report lists.
const SCRUB_EXAMPLES: usize = 100;

/// Deep-scrubs every segment either side lists for one (tenant, type), in chunks, at most
/// `keys_per_second` documents a second (0: unbounded), fixing what it finds when `fix`.
pub async fn scrub_type<P>(
    primary: &P,
    secondary: &dyn Secondary,
    tenant: &TenantId,
    rt: ResourceType,
    fix: bool,
    keys_per_second: u64,
) -> Result<ScrubReport>
where
    P: DigestSource + ?Sized,
{
    let mut segments: BTreeSet<u16> = primary
        .segment_digests(tenant, rt)
        .await?
        .iter()
        .map(|s| s.segment)
        .collect();
    segments.extend(
        secondary
            .segment_digests(tenant, rt)
            .await?
            .iter()
            .map(|s| s.segment),
    );
    let segments: Vec<u16> = segments.into_iter().collect();
    let mut report = ScrubReport {
        supported: true,
        ..ScrubReport::default()
    };
    let start = Instant::now();
    for chunk in segments.chunks(256) {
        let found = match secondary.scrub(tenant, rt, chunk, fix).await {
            Err(fhirstore_core::Error::Unsupported(_)) => {
                return Ok(ScrubReport::default());
            }
            other => other?,
        };
        report.segments += chunk.len() as u64;
        report.keys_read += found.keys_read;
        report.lost += found.lost.len() as u64;
        report.corrupted += found.corrupted.len() as u64;
        report.unreadable += found.unreadable.len() as u64;
        report.segments_rewritten += found.segments_rewritten;
        for (kind, ids) in [
            ("lost", &found.lost),
            ("corrupted", &found.corrupted),
            ("unreadable", &found.unreadable),
        ] {
            for id in ids {
                if report.examples.len() < SCRUB_EXAMPLES {
                    report.examples.push(format!("{kind} {rt}/{id}"));
                }
            }
        }
        if keys_per_second > 0 {
            // Rate-limited so a scrub of a large secondary does not crowd out live traffic.
            let due = std::time::Duration::from_secs_f64(
                report.keys_read as f64 / keys_per_second as f64,
            );
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(report)
}

/// Progress after each (secondary, tenant, type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileProgress {
    /// Segments compared so far.
    pub segments_compared: u64,
    /// Key rows fetched so far, both sides.
    pub keys_fetched: u64,
    /// Keys repaired so far.
    pub repaired: u64,
}

/// The numbers (of segments, or of groups) whose digests differ between the two sides, a
/// number listed on one side only included.
fn differing(
    p: impl IntoIterator<Item = (u16, Digest)>,
    s: impl IntoIterator<Item = (u16, Digest)>,
) -> Vec<u16> {
    let mut by: BTreeMap<u16, [Option<Digest>; 2]> = BTreeMap::new();
    for (n, d) in p {
        by.entry(n).or_default()[0] = Some(d);
    }
    for (n, d) in s {
        by.entry(n).or_default()[1] = Some(d);
    }
    by.into_iter()
        .filter(|(_, [a, b])| a != b)
        .map(|(n, _)| n)
        .collect()
}

fn segments(d: &[SegmentDigest]) -> impl Iterator<Item = (u16, Digest)> + '_ {
    d.iter().map(|x| (x.segment, x.digest))
}

fn groups(d: &[GroupDigest]) -> impl Iterator<Item = (u16, Digest)> + '_ {
    d.iter().map(|x| (x.group, x.digest))
}

/// Drifted keys by id, with the primary's side (absent for an extra key) and the class.
type Drift = BTreeMap<String, (Option<KeyState>, Class)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Missing,
    Extra,
    Stale,
    Ahead,
}

fn classify(p_keys: &[KeyState], s_keys: &[KeyState]) -> Drift {
    let p_by: BTreeMap<&str, &KeyState> = p_keys.iter().map(|k| (k.id.as_str(), k)).collect();
    let s_by: BTreeMap<&str, &KeyState> = s_keys.iter().map(|k| (k.id.as_str(), k)).collect();
    let ids: BTreeSet<&str> = p_by.keys().chain(s_by.keys()).copied().collect();
    let mut out = BTreeMap::new();
    for id in ids {
        let class = match (p_by.get(id), s_by.get(id)) {
            (Some(_), None) => Class::Missing,
            (None, Some(_)) => Class::Extra,
            (Some(p), Some(s)) if s.version > p.version => Class::Ahead,
            (Some(p), Some(s)) if s.version < p.version || s.e != p.e => Class::Stale,
            _ => continue,
        };
        out.insert(id.to_owned(), (p_by.get(id).map(|k| (*k).clone()), class));
    }
    out
}

/// How the reconciler tells drift from changes still on their way: the change log and the
/// secondary's consumer name. Differing keys are looked at again once the consumer's cursor
/// has passed the log position taken after the first look (or `wait` has gone by), and only
/// keys that drifted the same way both times count.
pub struct InFlight<'a> {
    /// The primary: its change log and its consumers.
    pub log: &'a dyn Primary,
    /// The secondary's consumer name.
    pub consumer: &'a str,
    /// The longest wait for the consumer.
    pub wait: std::time::Duration,
}

impl InFlight<'_> {
    /// Whether the secondary is fed from the log at all: a secondary no sync manager feeds
    /// has nothing on its way.
    async fn tracked(&self) -> Result<bool> {
        Ok(self
            .log
            .consumers()
            .await?
            .iter()
            .any(|(name, _)| name == self.consumer))
    }

    /// Waits (at most `wait`) until the secondary has applied everything logged by now, when
    /// a sync manager feeds it.
    pub(crate) async fn settle_now(&self) -> Result<()> {
        if self.tracked().await? {
            let head = self.log.log_head().await?;
            self.settle(head).await?;
        }
        Ok(())
    }

    async fn settle(&self, head: ChangeCursor) -> Result<()> {
        let deadline = Instant::now() + self.wait;
        while Instant::now() < deadline {
            let cursor = self.log.consumer(self.consumer).await?.cursor;
            let next = self.log.changes_after(cursor, 1).await?;
            if next.first().is_none_or(|c| c.cursor > head) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Above this many elements on either side, the descent compares group digests before
/// segments. Below it most groups hold a single non-empty segment, so reading the groups first
/// would only add rows.
pub const COARSE_ABOVE: i64 = 2 * fhirstore_core::digest::GROUPS as i64;

/// Where two digest views of one (tenant, type) disagree.
enum Divergence {
    /// The roots agree.
    None {
        /// Digest rows read to find out.
        rows_read: u64,
    },
    /// They do not: the segments to examine, at most the limit asked for.
    Segments {
        rows_read: u64,
        groups_differing: u64,
        segments_differing: u64,
        examined: Vec<u16>,
    },
}

/// Descends two views of one (tenant, type) from the root to the segments that differ, reading
/// groups first for a large type so only the segments of differing groups are read. The
/// reference view `a`'s root is the fold of its groups: one read of the groups serves the root
/// comparison and the coarse step (PostgreSQL aggregates them in one pass over the segments,
/// which a separate root would repeat).
async fn diverging_segments<A, B>(
    a: &A,
    b: &B,
    tenant: &TenantId,
    rt: ResourceType,
    max_segments: usize,
) -> Result<Divergence>
where
    A: DigestView + ?Sized,
    B: DigestView + ?Sized,
{
    let a_groups = a.group_digests(tenant, rt).await?;
    let mut a_root = Digest::default();
    a_groups.iter().for_each(|g| a_root.merge(g.digest));
    let b_root = b.root_digest(tenant, rt).await?;
    let mut rows_read = a_groups.len() as u64;
    if a_root == b_root {
        return Ok(Divergence::None { rows_read });
    }
    let mut groups_differing = 0;
    let (a_segs, b_segs) = if a_root.count.max(b_root.count) > COARSE_ABOVE {
        let b_groups = b.group_digests(tenant, rt).await?;
        let diff_groups = differing(groups(&a_groups), groups(&b_groups));
        groups_differing = diff_groups.len() as u64;
        rows_read += b_groups.len() as u64;
        (
            a.segment_digests_in(tenant, rt, &diff_groups).await?,
            b.segment_digests_in(tenant, rt, &diff_groups).await?,
        )
    } else {
        (
            a.segment_digests(tenant, rt).await?,
            b.segment_digests(tenant, rt).await?,
        )
    };
    rows_read += (a_segs.len() + b_segs.len()) as u64;
    let diff = differing(segments(&a_segs), segments(&b_segs));
    Ok(Divergence::Segments {
        rows_read,
        groups_differing,
        segments_differing: diff.len() as u64,
        examined: diff.into_iter().take(max_segments.max(1)).collect(),
    })
}

/// The keys both views hold in `segments`.
async fn keys_of_both<A, B>(
    a: &A,
    b: &B,
    tenant: &TenantId,
    rt: ResourceType,
    segments: &[u16],
) -> Result<(Vec<KeyState>, Vec<KeyState>)>
where
    A: DigestView + ?Sized,
    B: DigestView + ?Sized,
{
    Ok((
        a.segment_keys(tenant, rt, segments).await?,
        b.segment_keys(tenant, rt, segments).await?,
    ))
}

/// Compares one (tenant, type) and repairs it when asked.
#[allow(clippy::too_many_arguments)]
pub async fn reconcile_type<P>(
    primary: &P,
    secondary: &dyn Secondary,
    name: &str,
    tenant: &TenantId,
    rt: ResourceType,
    mode: ReconcileMode,
    max_segments: usize,
    in_flight: Option<&InFlight<'_>>,
) -> Result<TypeReport>
where
    P: DigestSource + ResourceStorage + ?Sized,
{
    let start = Instant::now();
    let mut report = TypeReport {
        secondary: name.to_owned(),
        tenant: tenant.to_string(),
        resource_type: rt.to_string(),
        ..TypeReport::default()
    };
    let examined = match diverging_segments(primary, secondary, tenant, rt, max_segments).await? {
        Divergence::None { rows_read } => {
            report.digest_rows_read = rows_read;
            report.roots_equal = true;
            report.duration_ms = start.elapsed().as_millis() as u64;
            return Ok(report);
        }
        Divergence::Segments {
            rows_read,
            groups_differing,
            segments_differing,
            examined,
        } => {
            report.digest_rows_read = rows_read;
            report.groups_differing = groups_differing;
            report.segments_differing = segments_differing;
            examined
        }
    };
    report.segments_examined = examined.len() as u64;
    let (p_keys, s_keys) = keys_of_both(primary, secondary, tenant, rt, &examined).await?;
    report.keys_read_primary = p_keys.len() as u64;
    report.keys_read_secondary = s_keys.len() as u64;
    let mut drift = classify(&p_keys, &s_keys);
    let tracked = match in_flight {
        Some(f) if !drift.is_empty() => f.tracked().await?,
        _ => false,
    };
    if let (Some(f), true) = (in_flight, tracked) {
        // Everything the first look saw is in the log by now: wait until the secondary's
        // worker has passed it.
        let head = f.log.log_head().await?;
        f.settle(head).await?;
        let (p_again, s_again) = keys_of_both(primary, secondary, tenant, rt, &examined).await?;
        report.keys_read_primary += p_again.len() as u64;
        report.keys_read_secondary += s_again.len() as u64;
        let again = classify(&p_again, &s_again);
        // Drift both times, the same way, against the same primary version: a key written
        // again since the first look is on its way once more, not drift.
        let same = |a: &Option<KeyState>, b: &Option<KeyState>| {
            a.as_ref().map(|k| (k.version, k.e)) == b.as_ref().map(|k| (k.version, k.e))
        };
        drift = again
            .into_iter()
            .filter(|(id, (p, class))| {
                drift
                    .get(id)
                    .is_some_and(|(p1, c)| c == class && same(p1, p))
            })
            .collect();
    }
    let mut to_repair = Vec::new();
    for (p, class) in drift.values() {
        match class {
            Class::Missing => report.missing += 1,
            Class::Extra => report.extra += 1,
            Class::Stale => report.stale += 1,
            Class::Ahead => report.ahead += 1,
        }
        if matches!(class, Class::Missing | Class::Stale) {
            to_repair.extend(p.as_ref());
        }
    }
    if mode == ReconcileMode::Repair && !to_repair.is_empty() {
        let ctx = TenantContext::full(tenant.clone());
        let mut changes = Vec::with_capacity(to_repair.len());
        for k in &to_repair {
            let current = primary.vread(&ctx, rt, &k.id, k.version).await?;
            changes.push(Change::of(&current));
        }
        for batch in changes.chunks(500) {
            let applied = secondary.repair(batch).await?;
            report.repaired += applied.applied;
        }
        secondary.flush().await?;
        let touched: Vec<u16> = examined
            .iter()
            .map(|s| group_of(*s))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let after = secondary.segment_digests_in(tenant, rt, &touched).await?;
        let p_now = primary.segment_digests_in(tenant, rt, &touched).await?;
        let still: BTreeSet<u16> = differing(segments(&p_now), segments(&after))
            .into_iter()
            .collect();
        report.still_differing = examined.iter().filter(|s| still.contains(s)).count() as u64;
    }
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// A reconcile job's request; see [`Reconciler::run`].
#[derive(Clone, Debug)]
pub struct JobRequest {
    /// Tenants; `None`: every tenant the primary has.
    pub tenants: Option<Vec<TenantId>>,
    /// Types; `None`: every type of each tenant.
    pub types: Option<Vec<ResourceType>>,
    /// Secondaries by name; `None`: all.
    pub secondaries: Option<Vec<String>>,
    /// Report or repair.
    pub mode: ReconcileMode,
    /// Differing segments examined per (tenant, type) and pass.
    pub max_segments: usize,
    /// Recompute the primary's digests from its rows first, repairing the digest table.
    pub self_check: bool,
    /// Deep-scrub each secondary before comparing (see [`scrub_type`]): finds keys lost or
    /// damaged out of band, which leave the maintained digests unchanged.
    pub deep: bool,
    /// The deep scrub's pace in documents a second; 0 is unbounded.
    pub deep_keys_per_second: u64,
}

/// A job's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// One entry per (secondary, tenant, type).
    pub entries: Vec<TypeReport>,
    /// Primary digest segments the self-check found wrong and rewrote.
    pub primary_segments_repaired: u64,
    /// The job was cancelled before it finished.
    pub cancelled: bool,
}

/// Runs reconcile jobs for a primary and named secondaries.
pub struct Reconciler {
    primary: std::sync::Arc<dyn Primary>,
    secondaries: Vec<(String, std::sync::Arc<dyn Secondary>)>,
    /// How long the in-flight re-check waits for a secondary's worker.
    pub settle_wait: std::time::Duration,
}

impl Reconciler {
    /// A reconciler over these secondaries; names are their sync consumer names.
    pub fn new(
        primary: std::sync::Arc<dyn Primary>,
        secondaries: Vec<(String, std::sync::Arc<dyn Secondary>)>,
    ) -> Self {
        Reconciler {
            primary,
            secondaries,
            settle_wait: std::time::Duration::from_secs(5),
        }
    }

    pub(crate) fn primary(&self) -> &std::sync::Arc<dyn Primary> {
        &self.primary
    }

    pub(crate) fn secondaries(
        &self,
    ) -> impl Iterator<Item = (&str, &std::sync::Arc<dyn Secondary>)> {
        self.secondaries.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// Runs a job: for each requested secondary, tenant and type, the descent, the in-flight
    /// re-check and (in `Repair` mode) the repair. The resolved plan and each step's report are
    /// recorded in the primary under the returned job id, so [`Self::resume`] continues a job
    /// stopped by a crash or by `cancel` (checked between steps). `progress` is called after
    /// each step.
    pub async fn run(
        &self,
        request: &JobRequest,
        progress: &(dyn Fn(&ReconcileProgress) + Send + Sync),
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<(String, JobReport)> {
        let mut report = JobReport::default();
        let tenants = match &request.tenants {
            Some(t) => t.clone(),
            None => self.primary.tenants().await?,
        };
        let mut steps = Vec::new();
        for (name, _) in &self.secondaries {
            if request
                .secondaries
                .as_ref()
                .is_some_and(|only| !only.contains(name))
            {
                continue;
            }
            for tenant in &tenants {
                let types = match &request.types {
                    Some(t) => t.clone(),
                    None => self.primary.types_of(tenant).await?,
                };
                for rt in types {
                    steps.push(Step {
                        secondary: name.clone(),
                        tenant: tenant.to_string(),
                        resource_type: rt.to_string(),
                    });
                }
            }
        }
        if request.self_check {
            let mut checked = BTreeSet::new();
            for s in &steps {
                if checked.insert((s.tenant.clone(), s.resource_type.clone())) {
                    let (t, rt) = s.key()?;
                    report.primary_segments_repaired += self.primary.self_check(&t, rt).await?;
                }
            }
        }
        let plan = Plan {
            steps,
            mode: request.mode,
            max_segments: request.max_segments,
            deep: request.deep,
            deep_keys_per_second: request.deep_keys_per_second,
        };
        let job = JobRecord {
            id: format!("reconcile-{}", uuid::Uuid::now_v7().simple()),
            plan: to_json(&plan)?,
            next_step: 0,
            report: to_json(&report)?,
            state: "running".to_owned(),
        };
        self.primary.save_job(&job).await?;
        self.continue_job(job, plan, report, progress, cancel).await
    }

    /// Continues a recorded job from its first step not done.
    pub async fn resume(
        &self,
        id: &str,
        progress: &(dyn Fn(&ReconcileProgress) + Send + Sync),
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<JobReport> {
        let job = self
            .primary
            .load_job(id)
            .await?
            .ok_or_else(|| fhirstore_core::Error::NotFound(format!("reconcile job {id}")))?;
        let plan: Plan = from_json(&job.plan)?;
        let report: JobReport = from_json(&job.report)?;
        Ok(self
            .continue_job(job, plan, report, progress, cancel)
            .await?
            .1)
    }

    async fn continue_job(
        &self,
        mut job: JobRecord,
        plan: Plan,
        mut report: JobReport,
        progress: &(dyn Fn(&ReconcileProgress) + Send + Sync),
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<(String, JobReport)> {
        use std::sync::atomic::Ordering;
        report.cancelled = false;
        let mut seen = ReconcileProgress::default();
        for (i, step) in plan.steps.iter().enumerate().skip(job.next_step as usize) {
            if cancel.load(Ordering::SeqCst) {
                report.cancelled = true;
                job.state = "cancelled".to_owned();
                job.report = to_json(&report)?;
                self.primary.save_job(&job).await?;
                return Ok((job.id, report));
            }
            let Some((_, secondary)) = self.secondaries.iter().find(|(n, _)| *n == step.secondary)
            else {
                return Err(fhirstore_core::Error::NotFound(format!(
                    "secondary {} of job {}",
                    step.secondary, job.id
                )));
            };
            let (tenant, rt) = step.key()?;
            let in_flight = InFlight {
                log: &*self.primary,
                consumer: &step.secondary,
                wait: self.settle_wait,
            };
            let span = tracing::info_span!("reconcile", secondary = %step.secondary, tenant = %step.tenant, resource_type = %step.resource_type);
            let scrub = if plan.deep {
                let fix = plan.mode == ReconcileMode::Repair;
                Some(
                    scrub_type(
                        &*self.primary,
                        &**secondary,
                        &tenant,
                        rt,
                        fix,
                        plan.deep_keys_per_second,
                    )
                    .instrument(span.clone())
                    .await?,
                )
            } else {
                None
            };
            let mut r = reconcile_type(
                &*self.primary,
                &**secondary,
                &step.secondary,
                &tenant,
                rt,
                plan.mode,
                plan.max_segments,
                Some(&in_flight),
            )
            .instrument(span)
            .await?;
            r.scrub = scrub;
            seen.segments_compared += r.segments_examined;
            seen.keys_fetched += r.keys_read_primary + r.keys_read_secondary;
            seen.repaired += r.repaired;
            report.entries.push(r);
            job.next_step = i as u64 + 1;
            job.report = to_json(&report)?;
            self.primary.save_job(&job).await?;
            progress(&seen);
        }
        job.state = "done".to_owned();
        self.primary.save_job(&job).await?;
        Ok((job.id, report))
    }
}

/// One step of a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Step {
    secondary: String,
    tenant: String,
    resource_type: String,
}

impl Step {
    fn key(&self) -> Result<(TenantId, ResourceType)> {
        Ok((
            TenantId::new(&self.tenant)?,
            ResourceType::new(&self.resource_type)?,
        ))
    }
}

/// A job's resolved plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Plan {
    steps: Vec<Step>,
    mode: ReconcileMode,
    max_segments: usize,
    /// Absent in jobs recorded before deep scrubs existed.
    #[serde(default)]
    deep: bool,
    #[serde(default)]
    deep_keys_per_second: u64,
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| fhirstore_core::Error::backend_msg(format!("job record: {e}"), false))
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| fhirstore_core::Error::backend_msg(format!("job record: {e}"), false))
}
