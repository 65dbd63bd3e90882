//! The in-process read cache (`SyncConfig::memory_cache_bytes`): it answers repeated reads by
//! id, and never returns a version older than one a write returned to any caller, here a
//! second store on the same SQLite file standing in for another process. Writes there, a log
//! pruned before the cache read it, tenants, permissions and the byte bound are each tried;
//! on PostgreSQL, which has no change stamp, nothing is ever served from memory.

use std::sync::Arc;

use fhirstore_core::changelog::{ChangeLog, Primary};
use fhirstore_core::{Error, LogicalId, Permissions, ResourceStorage, ResourceType, TenantContext};
use fhirstore_sync::{CompositeStorage, SyncConfig, MEMORY};
use serde_json::json;

fn pt() -> ResourceType {
    ResourceType::new("Patient").expect("type")
}

fn patient(id: &str, family: &str) -> serde_json::Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

/// A composite with only the cache in front of `primary`.
fn cached(primary: Arc<dyn Primary>, bytes: usize) -> CompositeStorage {
    CompositeStorage::new(
        primary,
        Vec::new(),
        SyncConfig {
            memory_cache_bytes: bytes,
            ..SyncConfig::default()
        },
    )
    .expect("composite")
}

/// Two stores on one new SQLite file, as two processes have it.
async fn two_processes() -> (
    Arc<fhirstore_sql::SqliteStore>,
    Arc<fhirstore_sql::SqliteStore>,
) {
    let (a, b) =
        fhirstore_integration::two_sqlite_stores_on_one_file(env!("CARGO_TARGET_TMPDIR"), "memory")
            .await;
    (Arc::new(a), Arc::new(b))
}

async fn read(c: &CompositeStorage, ctx: &TenantContext, id: &str) -> (u64, String) {
    let (r, from) = c
        .read_routed(ctx, pt(), &LogicalId::new(id).expect("id"))
        .await
        .expect("read");
    (r.version.get(), from)
}

/// Repeated reads come from memory; a write in the other process is seen by the next read,
/// which then comes from the primary, and the one after from memory again; a delete there is
/// a 410 here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_from_memory_until_another_process_writes() {
    let (a, b) = two_processes().await;
    let here = cached(a.clone(), 1 << 20);
    let ctx = fhirstore_testkit::random_tenant();
    let x = LogicalId::new("x").expect("id");
    b.update(&ctx, pt(), &x, patient("x", "One"), None)
        .await
        .expect("v1 there");
    assert_eq!(read(&here, &ctx, "x").await, (1, "primary".to_owned()));
    assert_eq!(read(&here, &ctx, "x").await, (1, MEMORY.to_owned()));

    b.update(&ctx, pt(), &x, patient("x", "Two"), None)
        .await
        .expect("v2 there");
    assert_eq!(read(&here, &ctx, "x").await, (2, "primary".to_owned()));
    assert_eq!(read(&here, &ctx, "x").await, (2, MEMORY.to_owned()));

    // This process's own write is seen too.
    here.update(&ctx, pt(), &x, patient("x", "Three"), None)
        .await
        .expect("v3 here");
    assert_eq!(read(&here, &ctx, "x").await.0, 3);

    b.delete(&ctx, pt(), &x).await.expect("delete there");
    assert!(matches!(
        here.read(&ctx, pt(), &x).await,
        Err(Error::Gone(_))
    ));
    let stats = here.memory_cache_stats().expect("on");
    assert!(stats.hits >= 2 && stats.misses >= 3, "{stats:?}");
}

/// The other process writes and reads here interleave at random over a few ids: every read
/// returns at least the version the last write of that id returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_goes_back_behind_another_process() {
    let (a, b) = two_processes().await;
    let here = cached(a, 1 << 20);
    let ctx = fhirstore_testkit::random_tenant();
    let mut rng = fhirstore_testkit::secondary::Rng::new(7);
    let mut returned = [0u64; 5];
    let mut from_memory = 0;
    for step in 0..400 {
        let k = rng.below(returned.len());
        let id = format!("p{k}");
        if rng.below(3) == 0 || returned[k] == 0 {
            let lid = LogicalId::new(&id).expect("id");
            let w = b
                .update(&ctx, pt(), &lid, patient(&id, &format!("S{step}")), None)
                .await
                .expect("write there");
            returned[k] = w.resource.version.get();
        } else {
            let (v, from) = read(&here, &ctx, &id).await;
            assert!(
                v >= returned[k],
                "step {step}: {id} v{v} from {from} after v{} returned",
                returned[k]
            );
            from_memory += usize::from(from == MEMORY);
        }
    }
    assert!(from_memory > 50, "the cache answered {from_memory} reads");
}

/// Entries pruned from the log before the cache read them (every consumer had passed them)
/// empty the cache instead of slipping past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pruned_before_the_cache_read_it_empties_the_cache() {
    let (a, b) = two_processes().await;
    let here = cached(a, 1 << 20);
    let ctx = fhirstore_testkit::random_tenant();
    let x = LogicalId::new("x").expect("id");
    b.update(&ctx, pt(), &x, patient("x", "One"), None)
        .await
        .expect("v1");
    read(&here, &ctx, "x").await;
    assert_eq!(read(&here, &ctx, "x").await, (1, MEMORY.to_owned()));
    for family in ["Two", "Three"] {
        b.update(&ctx, pt(), &x, patient("x", family), None)
            .await
            .expect("write there");
    }
    let head = b.log_head().await.expect("head");
    assert!(b.prune(head).await.expect("prune") > 0);
    assert_eq!(read(&here, &ctx, "x").await, (3, "primary".to_owned()));
}

/// A key is its tenant's: another tenant's read of the same type and id is not served from
/// the first tenant's entry, and a context without read permission is refused before the
/// cache is consulted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_per_tenant_and_need_read_permission() {
    let (a, _) = two_processes().await;
    let here = cached(a, 1 << 20);
    let (t1, t2) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    let x = LogicalId::new("x").expect("id");
    here.update(&t1, pt(), &x, patient("x", "Mine"), None)
        .await
        .expect("write");
    read(&here, &t1, "x").await;
    assert_eq!(read(&here, &t1, "x").await, (1, MEMORY.to_owned()));
    assert!(matches!(
        here.read(&t2, pt(), &x).await,
        Err(Error::NotFound(_))
    ));
    let blind = TenantContext::new(
        t1.tenant().clone(),
        Permissions {
            read: false,
            ..Permissions::ALL
        },
    );
    assert!(matches!(
        here.read(&blind, pt(), &x).await,
        Err(Error::TenantDenied(_))
    ));
}

/// The cache holds at most its bound in bytes, evicting the least recently read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_to_its_byte_bound() {
    let (a, _) = two_processes().await;
    let bound = 4_000;
    let here = cached(a, bound);
    let ctx = fhirstore_testkit::random_tenant();
    for i in 0..60 {
        let id = format!("p{i}");
        here.update(
            &ctx,
            pt(),
            &LogicalId::new(&id).expect("id"),
            patient(&id, "Bound"),
            None,
        )
        .await
        .expect("write");
    }
    for i in 0..60 {
        read(&here, &ctx, &format!("p{i}")).await;
    }
    let stats = here.memory_cache_stats().expect("on");
    assert!(stats.bytes <= bound as u64, "{stats:?}");
    assert!(stats.entries > 5 && stats.entries < 60, "{stats:?}");
    // The most recently read is held, the first evicted.
    assert_eq!(read(&here, &ctx, "p59").await.1, MEMORY);
    assert_eq!(read(&here, &ctx, "p0").await.1, "primary");
}

/// PostgreSQL gives no change stamp, and its log lags commits: nothing comes from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_never_come_from_memory() {
    let Some(pg) = fhirstore_integration::postgres_store().await else {
        return;
    };
    assert_eq!(pg.change_stamp(), None);
    let here = cached(Arc::new(pg), 1 << 20);
    let ctx = fhirstore_testkit::random_tenant();
    let x = LogicalId::new("x").expect("id");
    here.update(&ctx, pt(), &x, patient("x", "Pg"), None)
        .await
        .expect("write");
    for _ in 0..3 {
        assert_eq!(read(&here, &ctx, "x").await, (1, "primary".to_owned()));
    }
    assert_eq!(here.memory_cache_stats().expect("on").hits, 0);
}
