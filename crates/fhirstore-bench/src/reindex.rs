//! The reindex bench: how fast a tenant's own SearchParameter is filled in over existing data,
//! against the same run's ingest rate as the baseline (both rewrite index rows; ingest also
//! writes versions, outbox entries and digests, and indexes every parameter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fhirstore_core::{
    Handling, LogicalId, ReindexOptions, ReindexStatus, ResourceType, SearchQuery, TenantContext,
    TenantId,
};
use serde_json::json;

use crate::{open_store, BoxError};

#[derive(clap::Args)]
pub struct ReindexArgs {
    /// Resources to load before registering the parameter.
    #[arg(long, default_value_t = 20_000)]
    size: usize,
    /// Resources per reindex transaction.
    #[arg(long, default_value_t = 500)]
    batch: u32,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Which store to measure.
    #[command(flatten)]
    store: crate::StoreArgs,
}

/// Runs the reindex bench.
pub async fn run(args: ReindexArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let store = open_store(&args.store, &dir).await?;
    let tenant = format!("bench-reindex-{}", std::process::id());
    let ctx = TenantContext::full(TenantId::new(tenant)?);
    let crate::search::Loaded {
        patients,
        resources,
        rate: ingest,
        ..
    } = crate::search::load(store.as_ref(), &ctx, args.size, args.seed).await?;
    println!(
        "reindex: backend={:?} {patients} patients, {resources} resources, ingest {ingest:.0} \
         resources/s (baseline)",
        args.store.backend
    );
    let observations = store
        .count(&ctx, Some(ResourceType::new("Observation")?))
        .await?;
    let param = json!({
        "resourceType": "SearchParameter",
        "id": "quantity-value",
        "url": "http://example.org/fhir/SearchParameter/observation-quantity-value",
        "name": "QuantityValue",
        "status": "active",
        "description": "The numeric value of an Observation's Quantity, unit-free.",
        "code": "quantity-value",
        "base": ["Observation"],
        "type": "number",
        "expression": "(Observation.value as Quantity).value"
    });
    store
        .update(
            &ctx,
            ResourceType::new("SearchParameter")?,
            &LogicalId::new("quantity-value")?,
            param,
            None,
        )
        .await?;
    let batches = AtomicU64::new(0);
    let start = Instant::now();
    let status = store
        .reindex(
            &ctx,
            ReindexOptions {
                batch: args.batch,
                max_batches: None,
            },
            &|_: &ReindexStatus| {
                batches.fetch_add(1, Ordering::Relaxed);
            },
        )
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let processed = status.first().map_or(0, |s| s.processed);
    let rate = processed as f64 / secs;
    println!(
        "reindex: {processed} of {observations} Observations in {} batches of {}, {secs:.2} s, \
         {rate:.0} resources/s, {:.2}x ingest",
        batches.load(Ordering::Relaxed),
        args.batch,
        rate / ingest
    );
    let reg = store.search_parameters(&ctx).await?;
    let mut q = SearchQuery::parse_in(
        &reg,
        Some(ResourceType::new("Observation")?),
        "quantity-value=gt100&_total=accurate&_count=1",
        Handling::Strict,
    )?;
    q.count = Some(1);
    let found = store.search(&ctx, &q).await?.total.unwrap_or(0);
    println!("reindex: quantity-value=gt100 matches {found} Observations");
    crate::purge_tenant(&args.store, ctx.tenant()).await
}
