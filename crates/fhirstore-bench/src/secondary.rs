//! `secondaries`: the Redis and tantivy secondaries against the primary, on the same generated
//! data, in one run.
//!
//! - **Apply throughput**, in changes/s, for batches of 1, 100 and 1000 (every version the
//!   primary holds, replayed into an emptied secondary; tantivy's time includes its final
//!   commit). The baseline is the primary's own ingest rate in this run.
//! - **Search latency**: the `search` bench's query shapes, each run on the primary and on every
//!   secondary whose capabilities claim it; p50 of each, and secondary/primary.
//! - **Read by id**: p50 from the primary and from each secondary, and the ratio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_core::secondary::{Change, Secondary};
use fhirstore_core::{
    Handling, HistoryRequest, HistoryScope, LogicalId, ResourceStorage, ResourceType, SearchQuery,
    TenantContext, TenantId,
};
use fhirstore_redis::{RedisConfig, RedisSecondary};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};

use crate::search::{percentile, SHAPES};
use crate::{open_store, BoxError};

/// Arguments of `fhirstore-bench secondaries`.
#[derive(clap::Args)]
pub struct SecondaryArgs {
    /// Resources to load into the primary.
    #[arg(long, default_value_t = 20_000)]
    size: usize,
    /// Runs of each query shape, and reads by id.
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// Changes applied one at a time (the batch-of-1 run is slow on purpose; a sample does).
    #[arg(long, default_value_t = 3_000)]
    single: usize,
    /// After the comparison, apply the primary's changes this many times more (under new
    /// ids) into a new full-text index, and print its apply rate and size: what one more
    /// process keeping its own index pays at that many resources. 0 skips it.
    #[arg(long, default_value_t = 0)]
    index_scale: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The Redis server.
    #[command(flatten)]
    redis: crate::RedisArgs,
    /// A Redis Cluster (`redis+cluster://host:port[,…]`) measured beside the single Redis, as
    /// `redis-cluster`.
    #[arg(long)]
    redis_cluster: Option<String>,
    /// The primary.
    #[command(flatten)]
    store: crate::StoreArgs,
}

async fn p50<F, Fut, T>(runs: usize, mut op: F) -> Result<Duration, BoxError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = fhirstore_core::Result<T>>,
{
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = Instant::now();
        op(i).await?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(percentile(&times, 0.5))
}

/// Bytes of the files under `path`, recursively; unreadable entries count as empty.
fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                _ => e.metadata().map_or(0, |m| m.len()),
            })
            .sum()
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the secondaries bench.
pub async fn run(args: SecondaryArgs) -> Result<(), BoxError> {
    println!(
        "secondaries: primary={:?} size={} queries={} seed={}",
        args.store.backend, args.size, args.queries, args.seed
    );
    let dir = tempfile::tempdir()?;
    let primary = open_store(&args.store, &dir).await?;
    let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let ctx = TenantContext::full(TenantId::new(&tenant[..30])?);
    let crate::search::Loaded {
        patients,
        resources,
        rate: ingest,
        ..
    } = crate::search::load(&*primary, &ctx, args.size, args.seed).await?;
    println!("primary: {patients} patients, {resources} resources, ingest {ingest:.0} resources/s");

    let mut changes = Vec::new();
    let mut req = HistoryRequest::new(HistoryScope::System);
    req.count = Some(1000);
    loop {
        let page = primary.history(&ctx, &req).await?;
        changes.extend(page.entries.iter().map(Change::of));
        match page.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => break,
        }
    }

    let prefix = format!("fhirstore-bench-{}", uuid::Uuid::new_v4().simple());
    let connect = |url: &str| {
        let mut config = RedisConfig::new(url);
        config.prefix = prefix.clone();
        async move { RedisSecondary::connect(&config).await }
    };
    let mut redises = vec![("redis", connect(&args.redis.url).await?)];
    if let Some(url) = &args.redis_cluster {
        redises.push(("redis-cluster", connect(url).await?));
    }
    let tantivy_dir = dir.path().join("tantivy");
    let tantivy = TantivySecondary::open(&tantivy_dir, TantivyConfig::default()).await?;
    let mut secondaries: Vec<(&str, Arc<dyn Secondary>)> = redises
        .iter()
        .map(|(name, r)| (*name, Arc::new(r.clone()) as Arc<dyn Secondary>))
        .collect();
    secondaries.push(("tantivy", Arc::new(tantivy)));

    println!(
        "\napply: changes/s by batch size (baseline: primary ingest {ingest:.0}/s)\n{:<14} {:>8} {:>12} {:>8}",
        "secondary", "batch", "changes/s", "ratio"
    );
    for (name, s) in &secondaries {
        for batch in [1usize, 100, 1000] {
            s.clear(ctx.tenant()).await?;
            let sample = if batch == 1 {
                &changes[..args.single.min(changes.len())]
            } else {
                &changes[..]
            };
            let start = Instant::now();
            for chunk in sample.chunks(batch) {
                s.apply(chunk).await?;
            }
            s.flush().await?;
            let rate = sample.len() as f64 / start.elapsed().as_secs_f64();
            println!(
                "{:<14} {:>8} {:>12.0} {:>8.2}",
                name,
                batch,
                rate,
                rate / ingest
            );
        }
        s.mark_built().await?;
    }
    // What each process that keeps its own full-text index pays on disk, beside the primary.
    let index_bytes = dir_bytes(&tantivy_dir);
    let primary_bytes = dir_bytes(dir.path()) - index_bytes;
    println!(
        "tantivy index: {index_bytes} bytes, {:.0} a resource ({:.2}x the primary's {primary_bytes} bytes here)",
        index_bytes as f64 / resources.max(1) as f64,
        index_bytes as f64 / primary_bytes.max(1) as f64
    );

    println!(
        "\nsearch p50 ms: primary, then each secondary that claims the shape (ratio secondary/primary)"
    );
    print!("{:<38} {:>9}", "shape", "primary");
    for (name, _) in &secondaries {
        print!(" {name:>20}");
    }
    println!();
    for shape in &SHAPES {
        let rt = ResourceType::new(shape.resource_type)?;
        let query = |i| SearchQuery::parse(Some(rt), &(shape.query)(i, patients), Handling::Strict);
        let base = p50(args.queries, |i| {
            let q = query(i);
            let primary = primary.clone();
            let ctx = ctx.clone();
            async move { primary.search(&ctx, &q?).await }
        })
        .await?;
        print!("{:<38} {:>9.3}", shape.label, ms(base));
        for (_, s) in &secondaries {
            if !s.capabilities().can_search(&query(0)?) {
                print!(" {:>20}", "not claimed");
                continue;
            }
            let t = p50(args.queries, |i| {
                let q = query(i);
                let s = s.clone();
                let ctx = ctx.clone();
                async move { s.search(&ctx, &q?).await }
            })
            .await?;
            let cell = format!("{:.3} ({:.2}x)", ms(t), ms(t) / ms(base).max(1e-9));
            print!(" {cell:>20}");
        }
        println!();
    }

    let patient = ResourceType::new("Patient")?;
    let id = |i: usize| LogicalId::new(format!("p{}", (i * 7919) % patients.max(1)));
    let base = p50(args.queries, |i| {
        let (primary, ctx, id) = (primary.clone(), ctx.clone(), id(i));
        async move { primary.read(&ctx, patient, &id?).await }
    })
    .await?;
    println!("\nread by id p50 ms: primary {:.3}", ms(base));
    for (name, s) in &secondaries {
        let t = p50(args.queries, |i| {
            let (s, ctx, id) = (s.clone(), ctx.clone(), id(i));
            async move { s.read(&ctx, patient, &id?).await }
        })
        .await?;
        println!(
            "  {:<14} {:.3} ({:.2}x the primary)",
            name,
            ms(t),
            ms(t) / ms(base).max(1e-9)
        );
    }

    for (_, r) in &redises {
        r.purge().await?;
    }
    if args.index_scale > 0 {
        index_at_scale(
            &changes,
            args.index_scale,
            &dir.path().join("tantivy-scaled"),
        )
        .await?;
    }
    crate::purge_tenant(&args.store, ctx.tenant()).await?;
    Ok(())
}

/// Applies `changes` `copies` times, each copy under ids of its own, into a new tantivy index
/// at `path`, in batches of 1,000; prints the rate and the index's size.
async fn index_at_scale(
    changes: &[Change],
    copies: usize,
    path: &std::path::Path,
) -> Result<(), BoxError> {
    let index = TantivySecondary::open(path, TantivyConfig::default()).await?;
    let start = Instant::now();
    let mut applied = 0usize;
    for copy in 0..copies {
        let renamed: Vec<Change> = changes
            .iter()
            .map(|c| {
                let id = LogicalId::new(format!("{}-c{copy}", c.key.id))?;
                let mut content = c.content.clone();
                if let Some(body) = content.as_mut().and_then(|b| b.as_object_mut()) {
                    body.insert("id".to_owned(), serde_json::Value::String(id.to_string()));
                }
                Ok(Change {
                    key: fhirstore_core::ResourceKey::new(c.key.resource_type, id),
                    content,
                    ..c.clone()
                })
            })
            .collect::<fhirstore_core::Result<_>>()?;
        for chunk in renamed.chunks(1000) {
            index.apply(chunk).await?;
        }
        applied += renamed.len();
    }
    index.flush().await?;
    let secs = start.elapsed().as_secs_f64();
    let bytes = dir_bytes(path);
    println!(
        "\nfull-text index of {applied} changes ({copies} copies): {:.0} changes/s ({secs:.0} s), {bytes} bytes, {:.0} a change",
        applied as f64 / secs,
        bytes as f64 / applied.max(1) as f64
    );
    Ok(())
}
