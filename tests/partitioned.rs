//! The PostgreSQL schema distributed by tenant: every table that has a `tenant` column is
//! hash-partitioned on it, as Citus (or PostgreSQL's own partitioning) would distribute it,
//! in a database of the test's own. Both require every primary key and unique constraint to
//! contain the distribution column, so converting the migrated schema at all proves the rule
//! holds; then the whole conformance suite, sync to Redis and the reconciler run on it, and a
//! single-tenant workload is shown to touch only its tenants' partitions.
//!
//! The tables without a tenant (`sync_consumers`, `sync_readers`, `sync_read_fences`,
//! `reconcile_jobs`, sqlx's migration table) stay plain: a distributed deployment keeps them on
//! the coordinator (Citus: local or reference tables). ARCHITECTURE.md says what it does with
//! the outbox, whose readers cross tenants.

use std::sync::Arc;
use std::time::Duration;

use fhirstore_core::secondary::Secondary;
use fhirstore_core::{LogicalId, ResourceStorage, ResourceType, TenantContext, WriteOp};
use fhirstore_integration::OwnDatabase;
use fhirstore_sql::{PostgresStore, SqlConfig};
use fhirstore_sync::reconcile::{JobRequest, ReconcileMode};
use fhirstore_testkit::secondary::assert_mirrors;
use serde_json::json;
use sqlx::Connection as _;

async fn store_on(db: &OwnDatabase) -> PostgresStore {
    PostgresStore::connect(db.url(), SqlConfig::default())
        .await
        .expect("connect")
}

async fn partitioned_store() -> Option<(PostgresStore, OwnDatabase)> {
    let db = fhirstore_integration::partitioned_postgres(8).await?;
    Some((store_on(&db).await, db))
}

fhirstore_testkit::conformance_tests!(sequential partitioned_store());

fn pt() -> ResourceType {
    ResourceType::new("Patient").expect("type")
}

/// A Redis secondary kept in sync from the partitioned primary mirrors it; a tenant's keys
/// wiped from Redis are found and repaired by the reconciler, whose self-check recomputes the
/// primary's digests from the partitioned rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_the_reconciler_run_on_a_partitioned_schema() {
    let Some(db) = fhirstore_integration::partitioned_postgres(8).await else {
        return;
    };
    let Some(redis) = fhirstore_integration::redis_secondary().await else {
        return;
    };
    let primary = Arc::new(store_on(&db).await);
    let composite = fhirstore_integration::redis_cache_composite(
        primary.clone(),
        &redis,
        Duration::from_secs(2),
    )
    .await;
    let tenants: Vec<TenantContext> = (0..3).map(|_| fhirstore_testkit::random_tenant()).collect();
    for t in &tenants {
        for i in 0..30 {
            let id = format!("p{i}");
            let body = json!({"resourceType": "Patient", "id": id, "gender": "female",
                              "identifier": [{"system": "urn:mrn", "value": id}]});
            composite
                .update(t, pt(), &LogicalId::new(&id).expect("id"), body, None)
                .await
                .expect("write");
        }
        let ops = (0..5)
            .map(|i| WriteOp::Update {
                resource_type: pt(),
                id: LogicalId::new(format!("p{i}")).expect("id"),
                resource: json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "male"}),
                if_match: None,
            })
            .collect();
        composite.transaction(t, ops).await.expect("transaction");
        composite
            .delete(t, pt(), &LogicalId::new("p29").expect("id"))
            .await
            .expect("delete");
    }
    fhirstore_integration::caught_up(&composite).await;
    assert_mirrors(&*primary, &redis, &tenants).await;

    redis
        .clear(tenants[0].tenant())
        .await
        .expect("wipe one tenant");
    let request = JobRequest {
        tenants: Some(tenants.iter().map(|t| t.tenant().clone()).collect()),
        types: None,
        secondaries: None,
        mode: ReconcileMode::Repair,
        max_segments: 10_000,
        self_check: true,
        deep: true,
        deep_keys_per_second: 0,
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let (_, report) = composite
        .reconciler()
        .run(&request, &|_| {}, &cancel)
        .await
        .expect("reconcile");
    let missing: u64 = report.entries.iter().map(|e| e.missing).sum();
    assert!(
        missing >= 29,
        "the wiped tenant's keys were found missing: {report:?}"
    );
    assert_eq!(report.primary_segments_repaired, 0);
    assert_mirrors(&*primary, &redis, &tenants).await;
    composite.shutdown().await;
    redis.purge().await.expect("purge");
}

/// Reads, writes, searches of every kind, history and transactions, each for one tenant at a
/// time, on a schema split 16 ways: afterwards no partition that holds none of the tenants'
/// rows has been scanned (`pg_stat_user_tables`), so every statement was pruned to its
/// tenant's partition. A statement that reads across tenants scans every partition, empty or
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_tenant_work_touches_only_its_partitions() {
    let Some(db) = fhirstore_integration::partitioned_postgres(16).await else {
        return;
    };
    let store = store_on(&db).await;
    // Building each partition's indexes counted as a scan of it; what is measured starts
    // after.
    let mut c = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    sqlx::query("SELECT pg_stat_reset()")
        .execute(&mut c)
        .await
        .expect("reset statistics");
    fhirstore_testkit::checks::search_parameter_types(&store).await;
    fhirstore_testkit::checks::search_includes(&store).await;
    fhirstore_testkit::checks::search_sorting(&store).await;
    fhirstore_testkit::checks::search_composites(&store).await;
    fhirstore_testkit::checks::history_all_scopes(&store).await;
    fhirstore_testkit::checks::conditional_update(&store).await;
    fhirstore_testkit::checks::transaction_is_atomic(&store).await;
    fhirstore_testkit::checks::counts_agree_with_the_matches(&store).await;
    store.close().await;
    // A backend writes its table statistics when it exits: end any the pool left behind, and
    // wait until all have exited.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut c)
    .await
    .expect("end the store's sessions");
    let name = db.url().rsplit('/').next().unwrap_or_default().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (others,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .fetch_one(&mut c)
        .await
        .expect("activity");
        if others == 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let open: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT application_name, state, query FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&name)
            .fetch_all(&mut c)
            .await
            .expect("activity");
            panic!("the store's connections did not close: {open:?}");
        }
        tokio::task::yield_now().await;
    }
    let partitions: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT c.relname, s.seq_scan + COALESCE(s.idx_scan, 0), s.n_tup_ins \
         FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.relispartition",
    )
    .fetch_all(&mut c)
    .await
    .expect("partition statistics");
    let remainder = |name: &str| name.rsplit("_p").next().unwrap_or_default().to_owned();
    let mut held = std::collections::BTreeSet::new();
    // A partition some tenant of the workload wrote to (rows since deleted count too).
    for (name, _, inserted) in &partitions {
        if *inserted > 0 {
            held.insert(remainder(name));
        }
    }
    assert!(
        held.len() < 16 && !held.is_empty(),
        "the workload's tenants fill some partitions, not all: {held:?}"
    );
    let stray: Vec<&String> = partitions
        .iter()
        .filter(|(name, scans, _)| *scans > 0 && !held.contains(&remainder(name)))
        .map(|(name, _, _)| name)
        .collect();
    assert!(
        stray.is_empty(),
        "scanned though no tenant of the workload is there: {stray:?}"
    );

    // The same seen in plans: a read by key and a token search for one tenant each name
    // one partition of every table they read.
    for statement in [
        "SELECT v.body FROM resources r JOIN resource_versions v ON v.tenant = r.tenant \
         AND v.resource_type = r.resource_type AND v.id = r.id AND v.version = r.version \
         WHERE r.tenant = 't-one' AND r.resource_type = 'Patient' AND r.id = 'x'",
        "SELECT r.id FROM search_token t JOIN resources r ON r.tenant = t.tenant \
         AND r.resource_type = t.resource_type AND r.id = t.id WHERE t.tenant = 't-one' \
         AND t.resource_type = 'Patient' AND t.param = 'gender' AND t.code = 'female' \
         ORDER BY r.id LIMIT 20",
    ] {
        let (plan,): (serde_json::Value,) =
            sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) {statement}"))
                .fetch_one(&mut c)
                .await
                .expect("explain");
        let mut relations = std::collections::BTreeSet::new();
        collect_relations(&plan, &mut relations);
        let tables: std::collections::BTreeSet<&str> = relations
            .iter()
            .filter_map(|r| r.rsplit_once("_p").map(|(t, _)| t))
            .collect();
        assert!(!tables.is_empty(), "{plan}");
        for t in tables {
            let parts = relations
                .iter()
                .filter(|r| r.rsplit_once("_p").is_some_and(|(x, _)| x == t))
                .count();
            assert_eq!(parts, 1, "{t}: {relations:?}");
        }
    }
}

/// Every `Relation Name` in an `EXPLAIN (FORMAT JSON)` plan.
fn collect_relations(plan: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match plan {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::String(r)) = o.get("Relation Name") {
                out.insert(r.clone());
            }
            o.values().for_each(|v| collect_relations(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_relations(v, out)),
        _ => {}
    }
}
