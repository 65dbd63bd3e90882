//! `sync`: CompositeStorage against the primary alone, in one run.
//!
//! - **Write throughput and latency** (single task, updates of generated Patients): the
//!   primary alone (the baseline), then through a CompositeStorage with Redis and tantivy in
//!   each mode: all synchronous, hybrid (Redis synchronous, tantivy asynchronous; the
//!   default), all asynchronous. Ratio = composite rate / primary rate.
//! - **Asynchronous lag** under sustained writes: for every tenth write, the time from the
//!   write returning to the new version being readable from Redis and searchable in tantivy.
//! - **Catch-up**: changes written while no worker ran (an outage), then the rate at which
//!   the workers deliver them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_core::secondary::Secondary;
use fhirstore_core::{
    Handling, LogicalId, ResourceStorage, ResourceType, SearchQuery, TenantContext, TenantId,
};
use fhirstore_redis::{RedisConfig, RedisSecondary};
use fhirstore_sql::{SqlConfig, SqliteStore};
use fhirstore_sync::{CompositeStorage, SecondaryConfig, SyncConfig, SyncMode};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use serde_json::json;

use crate::search::percentile;
use crate::BoxError;

/// Arguments of `fhirstore-bench sync`.
#[derive(clap::Args)]
pub struct SyncArgs {
    /// Writes per measurement.
    #[arg(long, default_value_t = 3_000)]
    n: usize,
    /// The Redis server.
    #[command(flatten)]
    redis: crate::RedisArgs,
}

fn body(i: usize, round: usize) -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": format!("p{i}"),
        "name": [{"family": format!("Family{round}"), "given": ["Ann"]}],
        "identifier": [{"system": "urn:bench", "value": format!("{i}-{round}")}],
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">round {round}</div>")},
    })
}

/// `n` updates, one at a time; returns writes/s and the p50/p99 latency.
async fn writes(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    n: usize,
    round: usize,
) -> Result<(f64, Duration, Duration), BoxError> {
    let pt = ResourceType::new("Patient")?;
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        store
            .update(
                ctx,
                pt,
                &LogicalId::new(format!("p{}", i % 500))?,
                body(i % 500, round),
                None,
            )
            .await?;
        times.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    times.sort();
    Ok((rate, percentile(&times, 0.5), percentile(&times, 0.99)))
}

struct Setup {
    _dir: tempfile::TempDir,
    primary: Arc<SqliteStore>,
    redis: RedisSecondary,
    tantivy: TantivySecondary,
}

async fn setup(url: &str) -> Result<Setup, BoxError> {
    let dir = tempfile::tempdir()?;
    let primary =
        Arc::new(SqliteStore::open(dir.path().join("sync.sqlite"), SqlConfig::default()).await?);
    let mut rc = RedisConfig::new(url);
    rc.prefix = format!("fhirstore-bench-{}", uuid::Uuid::new_v4().simple());
    let redis = RedisSecondary::connect(&rc).await?;
    let tantivy = TantivySecondary::open(
        &dir.path().join("tantivy"),
        TantivyConfig {
            commit_interval: Duration::from_millis(100),
            ..TantivyConfig::default()
        },
    )
    .await?;
    Ok(Setup {
        _dir: dir,
        primary,
        redis,
        tantivy,
    })
}

fn composite(
    s: &Setup,
    redis_mode: SyncMode,
    tantivy_mode: SyncMode,
) -> Result<CompositeStorage, BoxError> {
    let mut cache = SecondaryConfig::cache();
    cache.mode = redis_mode;
    let mut index = SecondaryConfig::index();
    index.mode = tantivy_mode;
    Ok(CompositeStorage::new(
        s.primary.clone(),
        vec![
            (
                "redis".to_owned(),
                Arc::new(s.redis.clone()) as Arc<dyn Secondary>,
                cache,
            ),
            (
                "tantivy".to_owned(),
                Arc::new(s.tantivy.clone()) as Arc<dyn Secondary>,
                index,
            ),
        ],
        SyncConfig {
            batch_wait: Duration::from_millis(5),
            poll_interval: Duration::from_millis(20),
            ..SyncConfig::default()
        },
    )?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the sync bench.
pub async fn run(args: SyncArgs) -> Result<(), BoxError> {
    let s = setup(&args.redis.url).await?;
    let ctx = TenantContext::full(TenantId::new("bench-sync")?);
    println!(
        "sync: {} single-task updates per row (500 Patients, SQLite primary)",
        args.n
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>7}",
        "mode", "writes/s", "p50 ms", "p99 ms", "ratio"
    );
    let (base, p50, p99) = writes(&*s.primary, &ctx, args.n, 0).await?;
    println!(
        "{:<44} {:>10.0} {:>9.3} {:>9.3} {:>7.2}",
        "primary alone (baseline)",
        base,
        ms(p50),
        ms(p99),
        1.0
    );
    let modes = [
        (
            "synchronous (Redis sync, tantivy sync)",
            SyncMode::Synchronous,
            SyncMode::Synchronous,
        ),
        (
            "hybrid (Redis sync, tantivy async)",
            SyncMode::Synchronous,
            SyncMode::Asynchronous,
        ),
        (
            "asynchronous (Redis async, tantivy async)",
            SyncMode::Asynchronous,
            SyncMode::Asynchronous,
        ),
    ];
    for (round, (label, r, t)) in modes.iter().enumerate() {
        let c = composite(&s, *r, *t)?;
        c.wait_for_sync(Duration::from_secs(120)).await?;
        let (rate, p50, p99) = writes(&c, &ctx, args.n, round + 1).await?;
        println!(
            "{label:<44} {rate:>10.0} {:>9.3} {:>9.3} {:>7.2}",
            ms(p50),
            ms(p99),
            rate / base
        );
        c.wait_for_sync(Duration::from_secs(120)).await?;
        c.shutdown().await;
    }

    // Lag: all asynchronous, sustained single-task writes; every tenth write is watched until
    // Redis serves it and tantivy finds it.
    let c = Arc::new(composite(
        &s,
        SyncMode::Asynchronous,
        SyncMode::Asynchronous,
    )?);
    c.wait_for_sync(Duration::from_secs(120)).await?;
    let pt = ResourceType::new("Patient")?;
    let mut watchers = Vec::new();
    let round = 10;
    for i in 0..args.n {
        let id = LogicalId::new(format!("p{}", i % 500))?;
        let w = c
            .update(&ctx, pt, &id, body(i % 500, round + i), None)
            .await?;
        if i % 10 == 0 {
            let (redis, tantivy, ctx, id) =
                (s.redis.clone(), s.tantivy.clone(), ctx.clone(), id.clone());
            let version = w.resource.version;
            let written = Instant::now();
            watchers.push(tokio::spawn(async move {
                let mut lag = (None, None);
                let q = SearchQuery::parse(
                    Some(pt),
                    &format!("_id={id}&identifier=urn:bench|{}-{}", i % 500, round + i),
                    Handling::Strict,
                )?;
                while lag.0.is_none() || lag.1.is_none() {
                    if lag.0.is_none()
                        && redis
                            .read(&ctx, pt, &id)
                            .await
                            .ok()
                            .flatten()
                            .is_some_and(|r| r.version >= version)
                    {
                        lag.0 = Some(written.elapsed());
                    }
                    if lag.1.is_none()
                        && tantivy
                            .search(&ctx, &q)
                            .await
                            .is_ok_and(|p| !p.matches.is_empty())
                    {
                        lag.1 = Some(written.elapsed());
                    }
                    if written.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok::<_, BoxError>(lag)
            }));
        }
    }
    let (mut redis_lag, mut tantivy_lag) = (Vec::new(), Vec::new());
    for w in watchers {
        let (r, t) = w.await??;
        redis_lag.extend(r);
        tantivy_lag.extend(t);
    }
    redis_lag.sort();
    tantivy_lag.sort();
    println!(
        "\nasynchronous lag, write returned -> visible ({} samples)",
        redis_lag.len()
    );
    for (name, lags) in [
        ("redis (read by id)", &redis_lag),
        ("tantivy (searchable)", &tantivy_lag),
    ] {
        println!(
            "  {name:<22} p50 {:>8.1} ms   p99 {:>8.1} ms",
            ms(percentile(lags, 0.5)),
            ms(percentile(lags, 0.99))
        );
    }
    c.wait_for_sync(Duration::from_secs(120)).await?;
    c.shutdown().await;

    // Catch-up: writes straight to the primary (no worker running), then workers start.
    let backlog = args.n * 3;
    for i in 0..backlog {
        s.primary
            .update(
                &ctx,
                pt,
                &LogicalId::new(format!("p{}", i % 500))?,
                body(i % 500, 100_000 + i),
                None,
            )
            .await?;
    }
    let start = Instant::now();
    let c = composite(&s, SyncMode::Asynchronous, SyncMode::Asynchronous)?;
    let caught = c.wait_for_sync(Duration::from_secs(600)).await?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "\ncatch-up after an outage: {backlog} changes to both secondaries in {secs:.2} s: {:.0} changes/s{}",
        backlog as f64 / secs,
        if caught { "" } else { " (timed out)" }
    );
    c.shutdown().await;
    s.redis.purge().await?;
    Ok(())
}
