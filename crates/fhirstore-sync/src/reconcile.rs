//! The reconciler: finds drift between the primary and a secondary by comparing XOR digests
//! top down, and repairs it through the secondary's version-guarded apply.
//!
//! For each (tenant, type): equal roots end the comparison. Otherwise the non-empty segment
//! digests of both sides are compared, and only the segments that differ have their keys
//! `(id, version, E)` read, from both sides. Each key there is one of:
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

use fhirstore_core::secondary::{Change, DigestSource, KeyState, Secondary, SegmentDigest};
use fhirstore_core::{ResourceStorage, ResourceType, Result, TenantContext, TenantId};
use serde::Serialize;

/// Whether a run only reports, or also repairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ReconcileMode {
    /// Compare and report.
    DryRun,
    /// Compare, repair missing and stale keys, and re-check.
    Repair,
}

/// What to reconcile.
#[derive(Clone, Debug)]
pub struct ReconcileRequest {
    /// The tenants.
    pub tenants: Vec<TenantId>,
    /// The types; `None`: every type the primary has for the tenant.
    pub types: Option<Vec<ResourceType>>,
    /// Report or repair.
    pub mode: ReconcileMode,
    /// At most this many differing segments per (tenant, type) are examined in one run; the
    /// report says how many differed in all.
    pub max_segments: usize,
}

/// The outcome for one (secondary, tenant, type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TypeReport {
    /// The secondary.
    pub secondary: String,
    /// The tenant.
    pub tenant: String,
    /// The resource type.
    pub resource_type: String,
    /// Whether the root digests were equal (nothing else was read).
    pub roots_equal: bool,
    /// Segments whose digests differ.
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
    /// Key rows read from the primary.
    pub keys_read_primary: u64,
    /// Key rows read from the secondary.
    pub keys_read_secondary: u64,
    /// How long it took.
    pub duration_ms: u64,
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

fn differing(p: &[SegmentDigest], s: &[SegmentDigest]) -> Vec<u16> {
    let mut by: BTreeMap<u16, [Option<_>; 2]> = BTreeMap::new();
    for x in p {
        by.entry(x.segment).or_default()[0] = Some(x.digest);
    }
    for x in s {
        by.entry(x.segment).or_default()[1] = Some(x.digest);
    }
    by.into_iter()
        .filter(|(_, [a, b])| a != b)
        .map(|(seg, _)| seg)
        .collect()
}

/// Compares one (tenant, type) and repairs it when asked.
pub async fn reconcile_type<P>(
    primary: &P,
    secondary: &dyn Secondary,
    name: &str,
    tenant: &TenantId,
    rt: ResourceType,
    mode: ReconcileMode,
    max_segments: usize,
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
    if primary.root_digest(tenant, rt).await? == secondary.digest(tenant, rt).await? {
        report.roots_equal = true;
        report.duration_ms = start.elapsed().as_millis() as u64;
        return Ok(report);
    }
    let p_segs = primary.segment_digests_of(tenant, rt).await?;
    let s_segs = secondary.segment_digests(tenant, rt).await?;
    let diff = differing(&p_segs, &s_segs);
    report.segments_differing = diff.len() as u64;
    let examined: Vec<u16> = diff.into_iter().take(max_segments.max(1)).collect();
    report.segments_examined = examined.len() as u64;
    let p_keys = primary.segment_keys_of(tenant, rt, &examined).await?;
    let s_keys = secondary.segment_keys(tenant, rt, &examined).await?;
    report.keys_read_primary = p_keys.len() as u64;
    report.keys_read_secondary = s_keys.len() as u64;
    let p_by: BTreeMap<&str, &KeyState> = p_keys.iter().map(|k| (k.id.as_str(), k)).collect();
    let s_by: BTreeMap<&str, &KeyState> = s_keys.iter().map(|k| (k.id.as_str(), k)).collect();
    let ids: BTreeSet<&str> = p_by.keys().chain(s_by.keys()).copied().collect();
    let mut to_repair = Vec::new();
    for id in ids {
        match (p_by.get(id), s_by.get(id)) {
            (Some(p), None) => {
                report.missing += 1;
                to_repair.push(*p);
            }
            (None, Some(_)) => report.extra += 1,
            (Some(p), Some(s)) if s.version > p.version => report.ahead += 1,
            (Some(p), Some(s)) if s.version < p.version || s.e != p.e => {
                report.stale += 1;
                to_repair.push(*p);
            }
            _ => {}
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
        let after = secondary.segment_digests(tenant, rt).await?;
        let p_now = primary.segment_digests_of(tenant, rt).await?;
        let still: BTreeSet<u16> = differing(&p_now, &after).into_iter().collect();
        report.still_differing = examined.iter().filter(|s| still.contains(s)).count() as u64;
    }
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// Reconciles every requested (tenant, type) against one secondary, calling `progress` after
/// each.
pub async fn reconcile<P>(
    primary: &P,
    secondary: &dyn Secondary,
    name: &str,
    request: &ReconcileRequest,
    progress: &(dyn Fn(&ReconcileProgress) + Send + Sync),
) -> Result<Vec<TypeReport>>
where
    P: DigestSource + ResourceStorage + ?Sized,
{
    let mut out = Vec::new();
    let mut seen = ReconcileProgress::default();
    for tenant in &request.tenants {
        let types = match &request.types {
            Some(t) => t.clone(),
            None => primary.types_of(tenant).await?,
        };
        for rt in types {
            let r = reconcile_type(
                primary,
                secondary,
                name,
                tenant,
                rt,
                request.mode,
                request.max_segments,
            )
            .await?;
            seen.segments_compared += r.segments_examined;
            seen.keys_fetched += r.keys_read_primary + r.keys_read_secondary;
            seen.repaired += r.repaired;
            progress(&seen);
            out.push(r);
        }
    }
    Ok(out)
}
