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
    let primary = match args.store.backend {
        crate::Backend::Sqlite => Arc::new(
            fhirstore_sql::SqliteStore::open(dir.path().join("r.sqlite"), Default::default())
                .await?,
        ),
        crate::Backend::Postgres => {
            return Err("the reconcile bench runs on SQLite for now".into());
        }
    };
    let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let ctx = TenantContext::full(TenantId::new(&tenant[..30])?);
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
    let state = {
        let mut out: Vec<Change> = Vec::new();
        let mut after = None;
        loop {
            let rows =
                fhirstore_core::changelog::ChangeLog::snapshot(&*primary, after.as_ref(), 5000)
                    .await?;
            let Some(last) = rows.last() else { break };
            after = Some((
                last.tenant.clone(),
                last.key.resource_type,
                last.key.id.clone(),
            ));
            out.extend(rows.iter().map(Change::of));
        }
        out
    };
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
    let tantivy =
        TantivySecondary::open(&dir.path().join("tantivy"), TantivyConfig::default()).await?;
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
        };
        let cancel = AtomicBool::new(false);
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
        let p_keys = primary.segment_keys_of(ctx.tenant(), pt, &all).await?;
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
