//! `reconcile`: finding and repairing `--drift` drifted resources among `--n`, against a naive
//! baseline measured in the same run (read every key's (id, version, E) from both sides and
//! compare).
//!
//! The primary is loaded with `--n` Patients. Each secondary (Redis, tantivy) is fed the
//! primary's state with drift: a quarter of the drifted keys left out (missing), a quarter
//! given another body under the same version (stale), a quarter pushed ahead, and a quarter of
//! extra keys the primary lacks.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use fhirstore_core::secondary::{Change, DigestSource, Secondary};
use fhirstore_core::{
    LogicalId, ResourceKey, ResourceStorage, ResourceType, TenantContext, TenantId, VersionId,
    WriteOp,
};
use fhirstore_redis::{RedisConfig, RedisSecondary};
use fhirstore_sync::reconcile::{JobRequest, ReconcileMode, Reconciler};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use serde_json::json;

use crate::BoxError;

/// Arguments of `fhirstore-bench reconcile`.
#[derive(clap::Args)]
pub struct ReconcileArgs {
    /// Resources in the primary.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Drifted resources per secondary.
    #[arg(long, default_value_t = 100)]
    drift: usize,
    /// The Redis server.
    #[command(flatten)]
    redis: crate::RedisArgs,
    /// The primary.
    #[command(flatten)]
    store: crate::StoreArgs,
}

/// Runs the reconcile bench.
pub async fn run(args: ReconcileArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let tenant = TenantId::new(&format!("bench-{}", uuid::Uuid::new_v4().simple())[..30])?;
    let result = match args.store.backend {
        crate::Backend::Sqlite => {
            let primary = Arc::new(
                fhirstore_sql::SqliteStore::open(dir.path().join("r.sqlite"), Default::default())
                    .await?,
            );
            measure(&args, primary, &tenant, dir.path()).await
        }
        crate::Backend::Postgres => {
            let primary = Arc::new(
                fhirstore_sql::PostgresStore::connect(&args.store.postgres, Default::default())
                    .await?,
            );
            println!("reconcile: PostgreSQL primary at {}", args.store.postgres);
            measure(&args, primary, &tenant, dir.path()).await
        }
    };
    // A shared PostgreSQL keeps no bench tenant, whether the run succeeded or not.
    crate::purge_tenant(&args.store, &tenant).await?;
    result
}

/// The primary's current state of the tenant's Patients, page by page through search.
async fn tenant_state<P>(primary: &P, ctx: &TenantContext) -> Result<Vec<Change>, BoxError>
where
    P: ResourceStorage + ?Sized,
{
    let mut out = Vec::new();
    let mut query = fhirstore_core::SearchQuery::parse(
        Some(ResourceType::new("Patient")?),
        "_count=1000&_sort=_id",
        fhirstore_core::Handling::Strict,
    )?;
    loop {
        let page = primary.search(ctx, &query).await?;
        out.extend(page.matches.iter().map(Change::of));
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

async fn measure<P>(
    args: &ReconcileArgs,
    primary: Arc<P>,
    tenant: &TenantId,
    dir: &std::path::Path,
) -> Result<(), BoxError>
where
    P: fhirstore_core::changelog::Primary + 'static,
{
    let ctx = TenantContext::full(tenant.clone());
    let pt = ResourceType::new("Patient")?;
    let start = Instant::now();
    for chunk in (0..args.n).collect::<Vec<_>>().chunks(500) {
        let ops = chunk
            .iter()
            .map(|i| {
                Ok(WriteOp::Update {
                    resource_type: pt,
                    id: LogicalId::new(format!("p{i:07}"))?,
                    resource: json!({"resourceType": "Patient", "id": format!("p{i:07}"), "gender": "female"}),
                    if_match: None,
                })
            })
            .collect::<fhirstore_core::Result<Vec<_>>>()?;
        primary.transaction(&ctx, ops).await?;
    }
    println!(
        "reconcile: {} Patients loaded in {:.1} s; {} drifted per secondary",
        args.n,
        start.elapsed().as_secs_f64(),
        args.drift
    );
    let state = tenant_state(&*primary, &ctx).await?;
    if state.len() != args.n {
        return Err(format!("read back {} of {} Patients", state.len(), args.n).into());
    }
    let q = args.drift / 4;
    let step = (args.n / args.drift.max(1)).max(1);
    let mut fed = Vec::with_capacity(state.len());
    for (i, c) in state.iter().enumerate() {
        let mut c = c.clone();
        let k = i / step;
        if i % step == 0 && k < args.drift - q {
            match k % 3 {
                0 => continue,
                1 => {
                    c.content = Some(
                        json!({"resourceType": "Patient", "id": c.key.id.as_str(), "gender": "other"}),
                    )
                }
                _ => c.version = VersionId::new(9).ok_or("version")?,
            }
        }
        fed.push(c);
    }
    for e in 0..q {
        fed.push(Change {
            tenant: ctx.tenant().clone(),
            key: ResourceKey::new(pt, LogicalId::new(format!("x{e}"))?),
            version: VersionId::FIRST,
            last_updated: fhirstore_core::from_micros(1_700_000_000_000_000),
            content: Some(json!({"resourceType": "Patient", "id": format!("x{e}")})),
        });
    }

    let mut rc = RedisConfig::new(&args.redis.url);
    rc.prefix = format!("fhirstore-bench-{}", uuid::Uuid::new_v4().simple());
    let redis = RedisSecondary::connect(&rc).await?;
    let tantivy = TantivySecondary::open(&dir.join("tantivy"), TantivyConfig::default()).await?;
    let secondaries: Vec<(String, Arc<dyn Secondary>)> = vec![
        ("redis".to_owned(), Arc::new(redis.clone())),
        ("tantivy".to_owned(), Arc::new(tantivy)),
    ];
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>8}",
        "target",
        "detect ms",
        "keys read",
        "share %",
        "found",
        "repair ms",
        "naive ms",
        "naive keys",
        "speedup"
    );
    for (name, s) in &secondaries {
        for chunk in fed.chunks(1000) {
            s.apply(chunk).await?;
        }
        s.flush().await?;
        s.mark_built().await?;
        let reconciler = Reconciler::new(primary.clone(), vec![(name.clone(), s.clone())]);
        let request = |mode| JobRequest {
            tenants: Some(vec![ctx.tenant().clone()]),
            types: Some(vec![pt]),
            secondaries: None,
            mode,
            max_segments: 65_536,
            self_check: false,
            deep: false,
            deep_keys_per_second: 0,
        };
        let cancel = AtomicBool::new(false);
        phases(&*primary, &**s, ctx.tenant(), pt).await?;
        let t = Instant::now();
        let dry = reconciler
            .run(&request(ReconcileMode::DryRun), &|_| {}, &cancel)
            .await?;
        let detect = t.elapsed();
        let r = &dry.1.entries[0];
        let read = r.keys_read_primary + r.keys_read_secondary;
        let found = r.missing + r.stale + r.extra + r.ahead;
        let t = Instant::now();
        reconciler
            .run(&request(ReconcileMode::Repair), &|_| {}, &cancel)
            .await?;
        let repair = t.elapsed();

        // The naive baseline: every key of both sides, compared in memory.
        let t = Instant::now();
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let p_keys = primary.segment_keys(ctx.tenant(), pt, &all).await?;
        let s_keys = s.segment_keys(ctx.tenant(), pt, &all).await?;
        let p_map: std::collections::HashMap<_, _> =
            p_keys.iter().map(|k| (&k.id, (k.version, k.e))).collect();
        let naive_found = s_keys
            .iter()
            .filter(|k| p_map.get(&k.id) != Some(&(k.version, k.e)))
            .count()
            + p_keys.len().saturating_sub(s_keys.len());
        let naive = t.elapsed();
        debug_assert!(naive_found >= 1);
        println!(
            "{:<8} {:>10.1} {:>10} {:>10.3} {:>10} {:>11.1} {:>10.1} {:>10} {:>8.1}",
            name,
            detect.as_secs_f64() * 1e3,
            read,
            100.0 * read as f64 / (2 * args.n) as f64,
            found,
            repair.as_secs_f64() * 1e3,
            naive.as_secs_f64() * 1e3,
            p_keys.len() + s_keys.len(),
            naive.as_secs_f64() / detect.as_secs_f64().max(1e-9)
        );
    }
    redis.purge().await?;
    Ok(())
}

/// Times each digest read the descent can make, on both sides, so a slow detection can be
/// traced to its step: roots, all groups, all segments, the segments of 100 groups and their
/// keys.
async fn phases<P>(
    primary: &P,
    s: &dyn Secondary,
    tenant: &TenantId,
    rt: ResourceType,
) -> Result<(), BoxError>
where
    P: DigestSource + ?Sized,
{
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    primary.root_digest(tenant, rt).await?;
    let p_root = ms(t);
    let t = Instant::now();
    let p_segs = primary.segment_digests(tenant, rt).await?.len();
    let p_seg_ms = ms(t);
    let t = Instant::now();
    s.root_digest(tenant, rt).await?;
    let s_root = ms(t);
    let t = Instant::now();
    let s_segs = s.segment_digests(tenant, rt).await?.len();
    let s_seg_ms = ms(t);
    let t = Instant::now();
    let p_groups = primary.group_digests(tenant, rt).await?.len();
    let p_group_ms = ms(t);
    let t = Instant::now();
    let s_groups = s.group_digests(tenant, rt).await?.len();
    let s_group_ms = ms(t);
    let groups: Vec<u16> = (0..100u16).map(|g| g * 40).collect();
    let t = Instant::now();
    let p_in = primary.segment_digests_in(tenant, rt, &groups).await?;
    let p_in_ms = ms(t);
    let t = Instant::now();
    let s_in = s.segment_digests_in(tenant, rt, &groups).await?;
    let s_in_ms = ms(t);
    let segs: Vec<u16> = p_in.iter().map(|x| x.segment).collect();
    let t = Instant::now();
    let p_keys = primary.segment_keys(tenant, rt, &segs).await?.len();
    let p_keys_ms = ms(t);
    let t = Instant::now();
    let s_keys = s.segment_keys(tenant, rt, &segs).await?.len();
    let s_keys_ms = ms(t);
    println!(
        "  100 groups: primary {} segments {p_in_ms:.1} ms, {p_keys} keys {p_keys_ms:.1} ms; \
         secondary {} segments {s_in_ms:.1} ms, {s_keys} keys {s_keys_ms:.1} ms",
        p_in.len(),
        s_in.len()
    );
    println!(
        "  digest reads: primary root {p_root:.1} ms, {p_groups} groups {p_group_ms:.1} ms, \
         {p_segs} segments {p_seg_ms:.1} ms; {} root {s_root:.1} ms, {s_groups} groups \
         {s_group_ms:.1} ms, {s_segs} segments {s_seg_ms:.1} ms",
        s.name()
    );
    Ok(())
}
