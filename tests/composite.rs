//! The whole conformance suite over what users hold: a `CompositeStorage` with a SQLite
//! primary, a Redis secondary and a tantivy index, once with both secondaries applied
//! synchronously (before each write returns) and once asynchronously (by the workers only).
//!
//! Every check then runs through the router: reads and searches go to whichever backend is
//! healthy, caught up and able to answer, so a secondary that answers differently from the
//! primary fails the same check the primary passes.

use std::sync::Arc;
use std::time::Duration;

use fhirstore_core::secondary::Secondary;
use fhirstore_sync::{CompositeStorage, SecondaryConfig, SyncConfig, SyncMode};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};

/// The stack, and the Redis secondary whose keys the teardown removes from the shared server.
type Made = (CompositeStorage, fhirstore_redis::RedisSecondary);

async fn composite(mode: SyncMode) -> Option<Made> {
    let redis = fhirstore_integration::redis_secondary().await?;
    let primary = fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await?;
    let index = TantivySecondary::in_memory(TantivyConfig {
        commit_interval: Duration::from_millis(20),
        ..TantivyConfig::default()
    })
    .await
    .expect("tantivy");
    // Both secondaries cost less than the primary, so each answers every search it can; the
    // cheaper one differs by mode, so each mode puts a different secondary first.
    let (redis_cost, index_cost) = match mode {
        SyncMode::Synchronous => (5, 8),
        SyncMode::Asynchronous => (8, 5),
    };
    let with = |mut c: SecondaryConfig, cost: u32| {
        c.mode = mode;
        c.search_cost = cost;
        c
    };
    let sync = SyncConfig {
        batch_wait: Duration::from_millis(2),
        poll_interval: Duration::from_millis(10),
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(50),
        holder: format!("suite-{mode:?}"),
        ..SyncConfig::default()
    };
    let store = CompositeStorage::new(
        Arc::new(primary),
        vec![
            (
                "redis".to_owned(),
                Arc::new(redis.clone()) as Arc<dyn Secondary>,
                with(SecondaryConfig::cache(), redis_cost),
            ),
            (
                "tantivy".to_owned(),
                Arc::new(index) as Arc<dyn Secondary>,
                with(SecondaryConfig::index(), index_cost),
            ),
        ],
        sync,
    )
    .expect("composite");
    // A new stack starts by building its secondaries from the (empty) primary.
    assert!(store
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("built"));
    Some((store, redis))
}

/// Stops the workers, then checks that both secondaries caught up with everything the check
/// wrote, and removes the Redis keys.
async fn teardown(store: CompositeStorage, redis: fhirstore_redis::RedisSecondary) {
    assert!(
        store
            .wait_for_sync(Duration::from_secs(60))
            .await
            .expect("wait"),
        "the secondaries caught up: {:?}",
        store.status().await
    );
    store.shutdown().await;
    redis.purge().await.expect("purge");
}

/// Both secondaries applied before each write returns.
mod synchronous {
    use super::*;
    fhirstore_testkit::conformance_tests!(composite(SyncMode::Synchronous), teardown = teardown);
}

/// Both secondaries applied by the background workers only.
mod asynchronous {
    use super::*;
    fhirstore_testkit::conformance_tests!(composite(SyncMode::Asynchronous), teardown = teardown);
}
