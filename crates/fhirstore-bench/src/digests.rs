//! `digests`: what maintaining the XOR digests costs writes. Two stores of the same backend,
//! one with `maintain_digests` off, take the same creates and updates in alternating rounds,
//! so both see the same machine state; the ratio is the overhead.

use std::sync::Arc;
use std::time::Instant;

use fhirstore_core::{LogicalId, ResourceStorage, ResourceType, TenantContext, TenantId, WriteOp};
use fhirstore_sql::{Durability, PostgresStore, SqlConfig, SqliteStore};

use crate::{patient, Backend, BoxError, StoreArgs};

/// The `digests` arguments.
#[derive(clap::Args)]
pub struct DigestArgs {
    /// Which store to measure.
    #[command(flatten)]
    store: StoreArgs,
    /// Resources written per round and store.
    #[arg(long, default_value_t = 2_000)]
    n: usize,
    /// Rounds; the stores alternate within each.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Entries per transaction (1: single writes; more: the batched digest flush).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// SQLite durability: full or normal.
    #[arg(long, default_value = "full")]
    durability: String,
    /// Write to one store only (digests `on` or `off`), for counting one side's instructions
    /// in a process of its own (`valgrind --tool=callgrind`), where timing is too noisy.
    #[arg(long)]
    only: Option<Only>,
}

/// The one store `--only` writes to.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum Only {
    /// Digests maintained.
    On,
    /// Digests off.
    Off,
}

async fn open(
    args: &DigestArgs,
    digests: bool,
    dir: &std::path::Path,
) -> Result<Arc<dyn ResourceStorage>, BoxError> {
    let config = SqlConfig {
        maintain_digests: digests,
        durability: if args.durability == "normal" {
            Durability::Normal
        } else {
            Durability::Full
        },
        ..SqlConfig::default()
    };
    Ok(match args.store.backend {
        Backend::Sqlite => Arc::new(
            SqliteStore::open(dir.join(format!("digests-{digests}.sqlite")), config).await?,
        ),
        Backend::Postgres => Arc::new(PostgresStore::connect(&args.store.postgres, config).await?),
    })
}

/// Writes `n` resources (`update` false: creates with client ids; true: new versions of them)
/// in transactions of `batch`; returns writes per second.
async fn write(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    round: usize,
    n: usize,
    batch: usize,
    update: bool,
) -> Result<f64, BoxError> {
    let pt = ResourceType::new("Patient")?;
    let start = Instant::now();
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(batch.max(1)) {
        let ops = chunk
            .iter()
            .map(|i| {
                let id = format!("r{round}-{i}");
                let mut body = patient(i + usize::from(update));
                body["id"] = serde_json::json!(id);
                Ok(WriteOp::Update {
                    resource_type: pt,
                    id: LogicalId::new(id)?,
                    resource: body,
                    if_match: None,
                })
            })
            .collect::<fhirstore_core::Result<Vec<_>>>()?;
        store.transaction(ctx, ops).await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Runs the benchmark.
pub async fn run(args: DigestArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    if let Some(only) = args.only {
        let store = open(&args, only == Only::On, dir.path()).await?;
        let ctx = TenantContext::full(TenantId::new(format!(
            "digests-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))?);
        for round in 0..args.rounds {
            write(&*store, &ctx, round, args.n, args.batch, false).await?;
            write(&*store, &ctx, round, args.n, args.batch, true).await?;
        }
        println!(
            "digests {only:?}: {} rounds of {} creates and {} updates done",
            args.rounds, args.n, args.n
        );
        return Ok(());
    }
    let on = open(&args, true, dir.path()).await?;
    let off = open(&args, false, dir.path()).await?;
    let tenant = |s: &str| -> Result<TenantContext, BoxError> {
        Ok(TenantContext::full(TenantId::new(format!(
            "digests-{s}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))?))
    };
    let (ctx_on, ctx_off) = (tenant("on")?, tenant("off")?);
    println!(
        "digests: backend={:?} {} rounds of {} writes per store, {} per transaction, durability={}",
        args.store.backend, args.rounds, args.n, args.batch, args.durability
    );
    let mut sums = [[0.0f64; 2]; 2];
    for round in 0..args.rounds {
        // Alternate which store goes first, so neither always meets a warmer machine.
        let order: [(usize, &Arc<dyn ResourceStorage>, &TenantContext); 2] = if round % 2 == 0 {
            [(0, &on, &ctx_on), (1, &off, &ctx_off)]
        } else {
            [(1, &off, &ctx_off), (0, &on, &ctx_on)]
        };
        for (slot, store, ctx) in order {
            sums[0][slot] += write(&**store, ctx, round, args.n, args.batch, false).await?;
            sums[1][slot] += write(&**store, ctx, round, args.n, args.batch, true).await?;
        }
    }
    println!(
        "{:<8} {:>14} {:>14} {:>10}",
        "op", "digests on/s", "digests off/s", "overhead"
    );
    for (name, [with, without]) in ["create", "update"].iter().zip(sums) {
        let (with, without) = (with / args.rounds as f64, without / args.rounds as f64);
        println!(
            "{name:<8} {with:>14.0} {without:>14.0} {:>9.1}%",
            (without / with - 1.0) * 100.0
        );
    }
    Ok(())
}
