//! The reconciler against both secondaries: drift of every kind, made through the
//! secondaries' own apply (so each side's digests are consistent with its contents), is found
//! by reading only the differing segments' keys, classified, and repaired.

use std::sync::Arc;

use fhirstore_core::secondary::{
    fold_groups, in_groups, Change, DigestSource, DigestView, Secondary,
};
use fhirstore_core::{from_micros, LogicalId, ResourceStorage, ResourceType, VersionId};
use fhirstore_sync::reconcile::{JobRequest, ReconcileMode, Reconciler, TypeReport};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use serde_json::json;
use std::collections::BTreeSet;

fn pt() -> ResourceType {
    ResourceType::new("Patient").expect("type")
}

/// An in-memory tantivy index and, when the test Redis is there, a Redis secondary under its own
/// prefix (also returned, for purging).
async fn both_secondaries() -> (
    Vec<(String, Arc<dyn Secondary>)>,
    Option<fhirstore_redis::RedisSecondary>,
) {
    let tantivy = TantivySecondary::in_memory(TantivyConfig::default())
        .await
        .expect("index");
    let mut secondaries: Vec<(String, Arc<dyn Secondary>)> =
        vec![("tantivy".to_owned(), Arc::new(tantivy))];
    let redis = fhirstore_integration::redis_secondary().await;
    if let Some(r) = &redis {
        secondaries.push(("redis".to_owned(), Arc::new(r.clone())));
    }
    (secondaries, redis)
}

/// A Patient the primary never had, for feeding a secondary an extra key.
fn stray(tenant: &fhirstore_core::TenantId) -> Change {
    Change {
        tenant: tenant.clone(),
        key: fhirstore_core::ResourceKey {
            resource_type: pt(),
            id: LogicalId::new("stray").expect("id"),
        },
        version: VersionId::FIRST,
        last_updated: from_micros(1_700_000_000_000_000),
        content: Some(json!({"resourceType": "Patient", "id": "stray"})),
    }
}

/// Runs a reconcile job to its end over these tenants (every type of theirs when `types` is
/// `None`), and returns its report.
async fn job(
    reconciler: &Reconciler,
    tenants: Vec<fhirstore_core::TenantId>,
    types: Option<Vec<ResourceType>>,
    mode: ReconcileMode,
    self_check: bool,
    deep: bool,
) -> fhirstore_sync::reconcile::JobReport {
    let request = JobRequest {
        tenants: Some(tenants),
        types,
        secondaries: None,
        mode,
        max_segments: 10_000,
        self_check,
        deep,
        deep_keys_per_second: 0,
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    reconciler
        .run(&request, &|_| {}, &cancel)
        .await
        .expect("reconcile")
        .1
}

async fn check(secondary: Arc<dyn Secondary>) {
    let primary = Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    );
    let (ctx, other) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    let n = 1000;
    for c in [&ctx, &other] {
        for i in 0..n {
            let id = LogicalId::new(format!("d{i:04}")).expect("id");
            let body = json!({"resourceType": "Patient", "id": id.as_str(), "gender": "female"});
            primary
                .update(c, pt(), &id, body, None)
                .await
                .expect("seed");
        }
    }
    // Versions 2 of d0000-d0009, and d0010 deleted (version 2, a tombstone).
    for i in 0..10 {
        let id = LogicalId::new(format!("d{i:04}")).expect("id");
        let body = json!({"resourceType": "Patient", "id": id.as_str(), "gender": "male"});
        primary
            .update(&ctx, pt(), &id, body, None)
            .await
            .expect("v2");
    }
    primary
        .delete(&ctx, pt(), &LogicalId::new("d0010").expect("id"))
        .await
        .expect("delete");

    // Feed the secondary the primary's state, with drift: d0001 and d0002 missing; d0003 and
    // d0004 at version 1 (stale); d0005 at version 2 with another body (stale by hash);
    // d0010 still live at version 1 (stale: the delete never arrived); an extra key; d0006
    // ahead at version 7.
    let changes: Vec<Change> = fhirstore_testkit::secondary::primary_state(&*primary)
        .await
        .iter()
        .map(Change::of)
        .collect();
    let drift = |c: &mut Change| -> bool {
        if c.tenant != *ctx.tenant() {
            return true;
        }
        match c.key.id.as_str() {
            "d0001" | "d0002" => false,
            "d0003" | "d0004" | "d0010" => {
                c.version = VersionId::FIRST;
                c.content = Some(
                    json!({"resourceType": "Patient", "id": c.key.id.as_str(), "gender": "female"}),
                );
                true
            }
            "d0005" => {
                c.content =
                    Some(json!({"resourceType": "Patient", "id": "d0005", "gender": "other"}));
                true
            }
            "d0006" => {
                c.version = VersionId::new(7).expect("v");
                true
            }
            _ => true,
        }
    };
    let mut fed: Vec<Change> = changes
        .into_iter()
        .filter_map(|mut c| drift(&mut c).then_some(c))
        .collect();
    fed.push(stray(ctx.tenant()));
    secondary.apply(&fed).await.expect("feed");
    secondary.flush().await.expect("flush");

    let reconciler = Reconciler::new(primary.clone(), vec![("s".to_owned(), secondary.clone())]);
    let run = |mode| {
        let reconciler = &reconciler;
        let tenants = vec![ctx.tenant().clone(), other.tenant().clone()];
        async move {
            let report = job(reconciler, tenants, None, mode, true, false).await;
            assert_eq!(
                report.primary_segments_repaired, 0,
                "the primary's digests are right"
            );
            report.entries
        }
    };
    // A type this small is compared segment by segment, without groups (the primary's groups
    // are read once, for its root).
    let p_segs = primary
        .segment_digests(ctx.tenant(), pt())
        .await
        .expect("segments");
    let segment_rows = fold_groups(&p_segs).len()
        + p_segs.len()
        + secondary
            .segment_digests(ctx.tenant(), pt())
            .await
            .expect("segments")
            .len();

    let dry: Vec<TypeReport> = run(ReconcileMode::DryRun).await;
    let [a, b] = dry.as_slice() else {
        panic!("one report per tenant: {dry:?}")
    };
    assert_eq!(a.groups_differing, 0, "{a:?}");
    assert_eq!(a.digest_rows_read, segment_rows as u64, "{a:?}");
    assert!(b.roots_equal, "the other tenant has no drift: {b:?}");
    assert_eq!(
        (a.missing, a.stale, a.extra, a.ahead, a.repaired),
        (2, 4, 1, 1, 0),
        "{a:?}"
    );
    assert!(a.segments_differing <= 8, "{a:?}");
    assert!(
        a.keys_read_primary < 30 && a.keys_read_secondary < 30,
        "only the differing segments' keys are read: {a:?}"
    );
    let json = serde_json::to_value(a).expect("serialisable");
    assert_eq!(json["missing"], 2);

    // A job cancelled after its first step is recorded in the primary and resumes there.
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let request = JobRequest {
        tenants: Some(vec![ctx.tenant().clone(), other.tenant().clone()]),
        types: None,
        secondaries: None,
        mode: ReconcileMode::DryRun,
        max_segments: 10_000,
        self_check: false,
        deep: false,
        deep_keys_per_second: 0,
    };
    let stop = |_: &fhirstore_sync::reconcile::ReconcileProgress| {
        cancel.store(true, std::sync::atomic::Ordering::SeqCst)
    };
    let (id, first) = reconciler.run(&request, &stop, &cancel).await.expect("run");
    assert!(first.cancelled);
    assert_eq!(first.entries.len(), 1);
    cancel.store(false, std::sync::atomic::Ordering::SeqCst);
    let resumed = reconciler
        .resume(&id, &|_| {}, &cancel)
        .await
        .expect("resume");
    assert!(!resumed.cancelled);
    let strip = |v: &[TypeReport]| {
        v.iter()
            .map(|r| TypeReport {
                duration_ms: 0,
                ..r.clone()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&resumed.entries),
        strip(&dry),
        "the resumed job's report equals an uninterrupted one's"
    );

    let fixed = run(ReconcileMode::Repair).await;
    assert_eq!(fixed[0].repaired, 6, "{:?}", fixed[0]);
    // The extra and the ahead key cannot be repaired; their segments still differ.
    assert_eq!(fixed[0].still_differing, 2, "{:?}", fixed[0]);
    let again = run(ReconcileMode::DryRun).await;
    assert_eq!(
        (
            again[0].missing,
            again[0].stale,
            again[0].extra,
            again[0].ahead
        ),
        (0, 0, 1, 1),
        "{:?}",
        again[0]
    );
    let r = secondary
        .read(&ctx, pt(), &LogicalId::new("d0010").expect("id"))
        .await
        .expect("read")
        .expect("held");
    assert!(r.deleted, "the missed delete was repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_tantivy() {
    let s = TantivySecondary::in_memory(TantivyConfig::default())
        .await
        .expect("index");
    s.mark_built().await.expect("built");
    check(Arc::new(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_redis() {
    let Some(s) = fhirstore_integration::redis_secondary().await else {
        return;
    };
    s.mark_built().await.expect("built");
    check(Arc::new(s.clone())).await;
    s.purge().await.expect("purge");
}

/// The self-check finds a damaged primary digest table (a segment altered, one lost, as a
/// restore from an old backup leaves it) on PostgreSQL, rewrites it from the rows, and a second
/// check finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_check_repairs_the_primary_digests() {
    let Some(pg) = fhirstore_integration::postgres_store().await else {
        return;
    };
    let ctx = fhirstore_testkit::random_tenant();
    for i in 0..40 {
        let id = LogicalId::new(format!("s{i}")).expect("id");
        let body = json!({"resourceType": "Patient", "id": id.as_str()});
        pg.update(&ctx, pt(), &id, body, None).await.expect("seed");
    }
    let before = pg.root_digest(ctx.tenant(), pt()).await.expect("root");
    let pool = sqlx::PgPool::connect(&fhirstore_integration::postgres_url())
        .await
        .expect("connect");
    let segs: Vec<(i32,)> = sqlx::query_as(
        "SELECT segment FROM digests WHERE tenant = $1 AND resource_type = 'Patient' \
         ORDER BY segment LIMIT 2",
    )
    .bind(ctx.tenant().as_str())
    .fetch_all(&pool)
    .await
    .expect("segments");
    sqlx::query("UPDATE digests SET h_lo = h_lo + 1 WHERE tenant = $1 AND segment = $2")
        .bind(ctx.tenant().as_str())
        .bind(segs[0].0)
        .execute(&pool)
        .await
        .expect("damage");
    sqlx::query("DELETE FROM digests WHERE tenant = $1 AND segment = $2")
        .bind(ctx.tenant().as_str())
        .bind(segs[1].0)
        .execute(&pool)
        .await
        .expect("lose");
    assert_ne!(
        pg.root_digest(ctx.tenant(), pt()).await.expect("root"),
        before
    );
    assert_eq!(pg.self_check(ctx.tenant(), pt()).await.expect("check"), 2);
    assert_eq!(
        pg.root_digest(ctx.tenant(), pt()).await.expect("root"),
        before
    );
    assert_eq!(pg.self_check(ctx.tenant(), pt()).await.expect("check"), 0);
}

/// Writes keep flowing (asynchronous tantivy) while dry runs go on: changes still on their
/// way are not reported as drift; a repair run during the load repairs nothing backwards, and
/// once synced the secondary mirrors the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_flight_are_not_drift() {
    use fhirstore_sync::{CompositeStorage, SecondaryConfig, SyncConfig};
    let primary = Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    );
    let index: Arc<dyn Secondary> = Arc::new(
        TantivySecondary::in_memory(TantivyConfig {
            commit_interval: std::time::Duration::from_millis(20),
            ..TantivyConfig::default()
        })
        .await
        .expect("index"),
    );
    let composite = Arc::new(
        CompositeStorage::new(
            primary.clone(),
            vec![(
                "tantivy".to_owned(),
                index.clone(),
                SecondaryConfig::index(),
            )],
            SyncConfig {
                batch_wait: std::time::Duration::from_millis(20),
                poll_interval: std::time::Duration::from_millis(10),
                ..SyncConfig::default()
            },
        )
        .expect("composite"),
    );
    assert!(composite
        .wait_for_sync(std::time::Duration::from_secs(10))
        .await
        .expect("built"));
    let ctx = fhirstore_testkit::random_tenant();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, ctx, done) = (composite.clone(), ctx.clone(), done.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let id = LogicalId::new(format!("f{}", i % 50)).expect("id");
                let body = json!({"resourceType": "Patient", "id": id.as_str(), "gender": "male"});
                c.update(&ctx, pt(), &id, body, None).await.expect("write");
                i += 1;
            }
            i
        })
    };
    let reconciler = composite.reconciler();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    for mode in [
        ReconcileMode::DryRun,
        ReconcileMode::DryRun,
        ReconcileMode::Repair,
    ] {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let request = JobRequest {
            tenants: Some(vec![ctx.tenant().clone()]),
            types: Some(vec![pt()]),
            secondaries: None,
            mode,
            max_segments: 10_000,
            self_check: false,
            deep: false,
            deep_keys_per_second: 0,
        };
        let (_, report) = reconciler
            .run(&request, &|_| {}, &cancel)
            .await
            .expect("run");
        let r = &report.entries[0];
        assert_eq!(
            (r.missing, r.stale, r.extra, r.ahead),
            (0, 0, 0, 0),
            "changes on their way reported as drift: {r:?}"
        );
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer.await.expect("writer");
    assert!(writes > 20, "writes kept flowing ({writes})");
    assert!(composite
        .wait_for_sync(std::time::Duration::from_secs(30))
        .await
        .expect("sync"));
    fhirstore_testkit::secondary::assert_mirrors(&*primary, &*index, std::slice::from_ref(&ctx))
        .await;
    composite.shutdown().await;
}

/// The kinds of drift the property test injects into a secondary.
#[derive(Clone, Copy, Debug)]
enum Drift {
    /// Never applied.
    Missing,
    /// An older version (or, for version 1, another body under the same version).
    Stale,
    /// A version the primary never wrote.
    Ahead,
}

/// Random data (updates and deletes), random drift of every kind in both secondaries and, in
/// some rounds, a damaged segment in the primary's own digest table. A dry run counts exactly
/// the injected drift by class, and the self-check finds the damaged segment; a repair leaves
/// only what must not be repaired (extra and ahead keys); a second run finds nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_drift_is_found_and_classified_exactly() {
    use fhirstore_testkit::secondary::{primary_state, Rng};
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("reconcile-property");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(format!(
        "{}.sqlite",
        fhirstore_testkit::random_tenant().tenant()
    ));
    let primary = Arc::new(
        fhirstore_sql::SqliteStore::open(&path, fhirstore_sql::SqlConfig::default())
            .await
            .expect("sqlite"),
    );
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw connection");
    let (secondaries, redis) = both_secondaries().await;
    for (_, s) in &secondaries {
        s.mark_built().await.expect("built");
    }
    let reconciler = Reconciler::new(primary.clone(), secondaries.clone());
    let mut rng = Rng::new(20261122);
    for round in 0..4 {
        let ctx = fhirstore_testkit::random_tenant();
        let n = 150 + rng.below(250);
        for i in 0..n {
            let id = LogicalId::new(format!("r{i}")).expect("id");
            let gender = ["female", "male", "other"][rng.below(3)];
            let body = json!({"resourceType": "Patient", "id": id.as_str(), "gender": gender});
            primary
                .update(&ctx, pt(), &id, body, None)
                .await
                .expect("seed");
        }
        for i in 0..n {
            let id = LogicalId::new(format!("r{i}")).expect("id");
            match rng.below(10) {
                0 | 1 => {
                    let body =
                        json!({"resourceType": "Patient", "id": id.as_str(), "active": true});
                    primary
                        .update(&ctx, pt(), &id, body, None)
                        .await
                        .expect("v2");
                }
                2 => {
                    primary.delete(&ctx, pt(), &id).await.expect("delete");
                }
                _ => {}
            }
        }
        let state: Vec<_> = primary_state(&*primary)
            .await
            .into_iter()
            .filter(|r| r.tenant == *ctx.tenant())
            .collect();
        let mut drift: std::collections::BTreeMap<usize, Drift> = Default::default();
        for _ in 0..1 + rng.below(12) {
            let kind = [Drift::Missing, Drift::Stale, Drift::Ahead][rng.below(3)];
            drift.insert(rng.below(state.len()), kind);
        }
        let extras = rng.below(4);
        let mut fed = Vec::new();
        let (mut missing, mut stale, mut ahead) = (0u64, 0u64, 0u64);
        for (i, r) in state.iter().enumerate() {
            let mut c = Change::of(r);
            match drift.get(&i) {
                None => {}
                Some(Drift::Missing) => {
                    missing += 1;
                    continue;
                }
                Some(Drift::Stale) => {
                    stale += 1;
                    if r.version.get() > 1 {
                        let old = primary
                            .vread(&ctx, pt(), &r.key.id, VersionId::FIRST)
                            .await
                            .expect("v1");
                        c = Change::of(&old);
                    } else {
                        c.content = Some(json!({"resourceType": "Patient",
                            "id": r.key.id.as_str(), "gender": "unknown", "active": false}));
                    }
                }
                Some(Drift::Ahead) => {
                    ahead += 1;
                    c.version = VersionId::new(r.version.get() + 5).expect("v");
                }
            }
            fed.push(c);
        }
        for j in 0..extras {
            fed.push(Change {
                tenant: ctx.tenant().clone(),
                key: fhirstore_core::ResourceKey {
                    resource_type: pt(),
                    id: LogicalId::new(format!("x{round}-{j}")).expect("id"),
                },
                version: VersionId::FIRST,
                last_updated: from_micros(1_700_000_000_000_000),
                content: Some(json!({"resourceType": "Patient", "id": format!("x{round}-{j}")})),
            });
        }
        for (_, s) in &secondaries {
            s.apply(&fed).await.expect("feed");
            s.flush().await.expect("flush");
        }
        // Some rounds also damage one segment of the primary's digest table.
        let damaged = round % 2 == 1;
        if damaged {
            let done = sqlx::query(
                "UPDATE digests SET h_lo = h_lo + 1 WHERE tenant = ?1 AND segment = \
                 (SELECT min(segment) FROM digests WHERE tenant = ?1)",
            )
            .bind(ctx.tenant().as_str())
            .execute(&raw)
            .await
            .expect("damage");
            assert_eq!(done.rows_affected(), 1);
        }
        let run = |mode, self_check| {
            let request = JobRequest {
                tenants: Some(vec![ctx.tenant().clone()]),
                types: None,
                secondaries: None,
                mode,
                max_segments: 10_000,
                self_check,
                deep: false,
                deep_keys_per_second: 0,
            };
            let reconciler = &reconciler;
            async move {
                let cancel = std::sync::atomic::AtomicBool::new(false);
                reconciler
                    .run(&request, &|_| {}, &cancel)
                    .await
                    .expect("reconcile")
                    .1
            }
        };
        let dry = run(ReconcileMode::DryRun, true).await;
        assert_eq!(
            dry.primary_segments_repaired,
            u64::from(damaged),
            "round {round}"
        );
        assert_eq!(dry.entries.len(), secondaries.len());
        let want = (missing, stale, extras as u64, ahead);
        for e in &dry.entries {
            assert_eq!(
                (e.missing, e.stale, e.extra, e.ahead),
                want,
                "round {round}, {}: injected {drift:?} and {extras} extra: {e:?}",
                e.secondary
            );
        }
        let fixed = run(ReconcileMode::Repair, false).await;
        for e in &fixed.entries {
            assert_eq!(e.repaired, missing + stale, "{e:?}");
        }
        let again = run(ReconcileMode::DryRun, false).await;
        for e in &again.entries {
            assert_eq!(
                (e.missing, e.stale, e.extra, e.ahead),
                (0, 0, extras as u64, ahead),
                "{e:?}"
            );
            assert_eq!(e.roots_equal, extras == 0 && ahead == 0, "{e:?}");
        }
    }
    if let Some(r) = redis {
        r.purge().await.expect("purge");
    }
}

/// The recent pass reads only the keys written since its start and finds their drift, not the
/// drift of older keys. A scheduled run (recent pass, then the full job) repairs everything,
/// and its full job then finds nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_runs_check_recent_writes_then_everything() {
    use fhirstore_sync::schedule::{Schedule, ScheduledRun};
    use fhirstore_testkit::secondary::primary_state;
    let primary = Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    );
    let index = Arc::new(
        TantivySecondary::in_memory(TantivyConfig::default())
            .await
            .expect("index"),
    );
    index.mark_built().await.expect("built");
    let ctx = fhirstore_testkit::random_tenant();
    let write = |prefix: &'static str, n: usize| {
        let (primary, ctx) = (primary.clone(), ctx.clone());
        async move {
            for i in 0..n {
                let id = LogicalId::new(format!("{prefix}{i}")).expect("id");
                let body = json!({"resourceType": "Patient", "id": id.as_str()});
                primary
                    .update(&ctx, pt(), &id, body, None)
                    .await
                    .expect("write");
            }
        }
    };
    // Feeds the index the primary's state, leaving out and altering the keys named.
    let feed = |skip: &'static [&'static str], alter: &'static [&'static str]| {
        let (primary, index) = (primary.clone(), index.clone());
        async move {
            let changes: Vec<Change> = primary_state(&*primary)
                .await
                .iter()
                .filter(|r| !skip.contains(&r.key.id.as_str()))
                .map(|r| {
                    let mut c = Change::of(r);
                    if alter.contains(&r.key.id.as_str()) {
                        c.content = Some(json!({"resourceType": "Patient",
                            "id": r.key.id.as_str(), "active": false}));
                    }
                    c
                })
                .collect();
            index.apply(&changes).await.expect("feed");
            index.flush().await.expect("flush");
        }
    };
    write("old", 300).await;
    feed(&["old5"], &[]).await;
    let since = chrono::Utc::now();
    write("new", 20).await;
    feed(&["old5", "new3", "new4"], &["new7"]).await;

    let reconciler = Reconciler::new(
        primary.clone(),
        vec![("tantivy".to_owned(), index.clone() as Arc<dyn Secondary>)],
    );
    let recent = reconciler
        .run_recent(Some(&[ctx.tenant().clone()]), since, ReconcileMode::DryRun)
        .await
        .expect("recent");
    let [r] = recent.entries.as_slice() else {
        panic!("one type: {recent:?}")
    };
    assert_eq!((r.missing, r.stale, r.ahead), (2, 1, 0), "{r:?}");
    assert!(
        r.keys_read_primary <= 23,
        "only the window's keys (and the drifted ones again) are read: {r:?}"
    );

    let runs = parking_lot::Mutex::new(Vec::<ScheduledRun>::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let schedule = Schedule {
        interval: std::time::Duration::from_millis(50),
        window: std::time::Duration::from_secs(3_600),
        mode: ReconcileMode::Repair,
        deep: None,
    };
    let record = |run: &ScheduledRun| {
        runs.lock().push(run.clone());
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    reconciler.run_scheduled(&schedule, &record, &stop).await;
    let runs = runs.into_inner();
    let [run] = runs.as_slice() else {
        panic!("one run: {runs:?}")
    };
    let repaired = |report: &fhirstore_sync::reconcile::JobReport| {
        report.entries.iter().map(|e| e.repaired).sum::<u64>()
    };
    // The window (an hour) holds every key: the recent pass repairs all four.
    assert_eq!(repaired(&run.recent), 4, "{run:?}");
    let (_, full) = run.full.as_ref().expect("the full job ran");
    assert_eq!(repaired(full), 0, "{full:?}");
    assert!(full.entries.iter().all(|e| e.roots_equal), "{full:?}");
}

/// With digest maintenance off (only for measuring its cost), writes still work and leave the
/// digest table untouched; the self-check then rebuilds it from the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_left_off_are_rebuilt_by_the_self_check() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("digests-off");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(format!(
        "{}.sqlite",
        fhirstore_testkit::random_tenant().tenant()
    ));
    let ctx = fhirstore_testkit::random_tenant();
    let off = fhirstore_sql::SqliteStore::open(
        &path,
        fhirstore_sql::SqlConfig {
            maintain_digests: false,
            ..fhirstore_sql::SqlConfig::default()
        },
    )
    .await
    .expect("open");
    let body = |i: usize| json!({"resourceType": "Patient", "id": format!("o{i}")});
    for i in 0..20 {
        let id = LogicalId::new(format!("o{i}")).expect("id");
        off.update(&ctx, pt(), &id, body(i), None)
            .await
            .expect("single write");
    }
    let ops = (20..30)
        .map(|i| fhirstore_core::WriteOp::Update {
            resource_type: pt(),
            id: LogicalId::new(format!("o{i}")).expect("id"),
            resource: body(i),
            if_match: None,
        })
        .collect();
    off.transaction(&ctx, ops).await.expect("transaction");
    assert!(off
        .digest_segments(&ctx, pt())
        .await
        .expect("digests")
        .is_empty());
    off.close().await;

    let on = fhirstore_sql::SqliteStore::open(&path, fhirstore_sql::SqlConfig::default())
        .await
        .expect("reopen");
    let want = on
        .recompute_digest_segments(&ctx, pt())
        .await
        .expect("recompute");
    assert!(!want.is_empty());
    assert!(on.self_check(ctx.tenant(), pt()).await.expect("self-check") > 0);
    assert_eq!(on.digest_segments(&ctx, pt()).await.expect("digests"), want);
}

/// A type larger than `COARSE_ABOVE` is compared by group digests first: the descent reads every
/// non-empty group of both sides, then the segments of the groups that differ and no others,
/// and still finds and repairs exactly the drift, on both secondaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_types_are_compared_by_group_first() {
    use fhirstore_core::WriteOp;
    use fhirstore_sync::reconcile::COARSE_ABOVE;
    let primary = Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    );
    let ctx = fhirstore_testkit::random_tenant();
    let n = COARSE_ABOVE as usize + 2_000;
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(500) {
        let ops = chunk
            .iter()
            .map(|i| WriteOp::Update {
                resource_type: pt(),
                id: LogicalId::new(format!("b{i}")).expect("id"),
                resource: json!({"resourceType": "Patient", "id": format!("b{i}"), "gender": "female"}),
                if_match: None,
            })
            .collect();
        primary.transaction(&ctx, ops).await.expect("seed");
    }
    let state: Vec<Change> = fhirstore_testkit::secondary::primary_state(&*primary)
        .await
        .iter()
        .map(Change::of)
        .collect();
    // b7 missing, b1234 with another body under the same version, and one extra key.
    let mut fed: Vec<Change> = state
        .into_iter()
        .filter(|c| c.key.id.as_str() != "b7")
        .map(|mut c| {
            if c.key.id.as_str() == "b1234" {
                c.content =
                    Some(json!({"resourceType": "Patient", "id": "b1234", "gender": "other"}));
            }
            c
        })
        .collect();
    fed.push(stray(ctx.tenant()));

    let (secondaries, redis) = both_secondaries().await;
    for (name, s) in &secondaries {
        for chunk in fed.chunks(1000) {
            s.apply(chunk).await.expect("feed");
        }
        s.flush().await.expect("flush");
        s.mark_built().await.expect("built");

        let p_segs = primary
            .segment_digests(ctx.tenant(), pt())
            .await
            .expect("segments");
        let s_segs = s
            .segment_digests(ctx.tenant(), pt())
            .await
            .expect("segments");
        let (p_groups, s_groups) = (fold_groups(&p_segs), fold_groups(&s_segs));
        let diff_groups: Vec<u16> = {
            let p: BTreeSet<_> = p_groups
                .iter()
                .map(|g| (g.group, g.digest.hash, g.digest.count))
                .collect();
            let s: BTreeSet<_> = s_groups
                .iter()
                .map(|g| (g.group, g.digest.hash, g.digest.count))
                .collect();
            let groups: BTreeSet<u16> = p.symmetric_difference(&s).map(|(g, _, _)| *g).collect();
            groups.into_iter().collect()
        };
        assert!(!diff_groups.is_empty() && diff_groups.len() <= 3);
        let expected_rows = p_groups.len()
            + s_groups.len()
            + in_groups(p_segs.clone(), &diff_groups).len()
            + in_groups(s_segs.clone(), &diff_groups).len();
        assert!(
            expected_rows * 2 < p_segs.len() + s_segs.len(),
            "{name}: groups save reads here: {expected_rows} rows against {} segments",
            p_segs.len() + s_segs.len()
        );

        let reconciler = Reconciler::new(primary.clone(), vec![(name.clone(), s.clone())]);
        let run = |mode| {
            let reconciler = &reconciler;
            let tenants = vec![ctx.tenant().clone()];
            async move {
                job(reconciler, tenants, Some(vec![pt()]), mode, false, false)
                    .await
                    .entries
                    .into_iter()
                    .next()
                    .expect("one entry")
            }
        };
        let dry = run(ReconcileMode::DryRun).await;
        assert_eq!(
            (dry.missing, dry.stale, dry.extra, dry.ahead),
            (1, 1, 1, 0),
            "{name}: {dry:?}"
        );
        assert_eq!(
            dry.groups_differing,
            diff_groups.len() as u64,
            "{name}: {dry:?}"
        );
        assert_eq!(
            dry.digest_rows_read, expected_rows as u64,
            "{name}: {dry:?}"
        );
        assert!(dry.keys_read_primary < 50, "{name}: {dry:?}");

        let fixed = run(ReconcileMode::Repair).await;
        assert_eq!(fixed.repaired, 2, "{name}: {fixed:?}");
        let again = run(ReconcileMode::DryRun).await;
        assert_eq!(
            (again.missing, again.stale, again.extra),
            (0, 0, 1),
            "{name}: only the extra key remains: {again:?}"
        );
    }
    if let Some(r) = redis {
        r.purge().await.expect("purge");
    }
}

/// SQLite keeps group digests in a table: a database written before the table existed gets it
/// filled when it opens, and the self-check repairs a damaged group as it does a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_digest_groups_are_filled_on_open_and_repaired_by_the_self_check() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("digest-groups");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(format!(
        "{}.sqlite",
        fhirstore_testkit::random_tenant().tenant()
    ));
    let open = || fhirstore_sql::SqliteStore::open(&path, fhirstore_sql::SqlConfig::default());
    let store = open().await.expect("open");
    let (a, b) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    for ctx in [&a, &b] {
        for i in 0..200 {
            let id = LogicalId::new(format!("g{i}")).expect("id");
            let body = json!({"resourceType": "Patient", "id": id.as_str()});
            store
                .update(ctx, pt(), &id, body, None)
                .await
                .expect("write");
        }
    }
    let folded = |segs: &[fhirstore_core::secondary::SegmentDigest]| fold_groups(segs);
    let want_a = folded(
        &store
            .segment_digests(a.tenant(), pt())
            .await
            .expect("segments"),
    );
    let want_b = folded(
        &store
            .segment_digests(b.tenant(), pt())
            .await
            .expect("segments"),
    );
    assert_eq!(
        store.group_digests(a.tenant(), pt()).await.expect("groups"),
        want_a
    );
    store.close().await;

    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw connection");
    sqlx::query("DELETE FROM digest_groups")
        .execute(&raw)
        .await
        .expect("empty the groups, as before migration 0008");
    let store = open().await.expect("reopen");
    assert_eq!(
        store.group_digests(a.tenant(), pt()).await.expect("groups"),
        want_a
    );
    assert_eq!(
        store.group_digests(b.tenant(), pt()).await.expect("groups"),
        want_b
    );

    let first = want_b.first().expect("a group").group;
    sqlx::query("UPDATE digest_groups SET h_lo = h_lo + 1 WHERE tenant = ? AND grp = ?")
        .bind(b.tenant().as_str())
        .bind(i32::from(first))
        .execute(&raw)
        .await
        .expect("damage one group");
    assert_ne!(
        store.group_digests(b.tenant(), pt()).await.expect("groups"),
        want_b
    );
    assert_eq!(store.self_check(a.tenant(), pt()).await.expect("check"), 0);
    assert_eq!(store.self_check(b.tenant(), pt()).await.expect("check"), 1);
    assert_eq!(
        store.group_digests(b.tenant(), pt()).await.expect("groups"),
        want_b
    );
}

/// Redis keys lost or damaged out of band (an eviction, an operator's `DEL`, garbage or a
/// truncated body written over a document) leave Redis's maintained digests unchanged, so the
/// ordinary comparison sees nothing. The deep scrub hashes what Redis holds again, reports
/// lost, unreadable and corrupted keys apart, and with repair removes them and rewrites the
/// digests, so the comparison that follows restores each one from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_scrub_finds_and_repairs_what_redis_lost_out_of_band() {
    let Some(redis) = fhirstore_integration::redis_secondary().await else {
        return;
    };
    let primary = Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    );
    let ctx = fhirstore_testkit::random_tenant();
    let mut changes = Vec::new();
    for i in 0..60 {
        let id = LogicalId::new(format!("s{i:02}")).expect("id");
        let body = json!({"resourceType": "Patient", "id": id.as_str(), "gender": "female"});
        let w = primary
            .update(&ctx, pt(), &id, body, None)
            .await
            .expect("seed");
        changes.push(Change::of(&w.resource));
    }
    redis.apply(&changes).await.expect("apply");
    redis.mark_built().await.expect("built");
    let reconciler = Reconciler::new(
        primary.clone(),
        vec![(
            "redis".to_owned(),
            Arc::new(redis.clone()) as Arc<dyn Secondary>,
        )],
    );

    let client = redis::Client::open(fhirstore_integration::redis_url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let doc = |i: usize| format!("{}:{{{}}}:d:Patient:s{i:02}", redis.prefix(), ctx.tenant());
    for i in 0..10 {
        let _: () = redis::cmd("DEL")
            .arg(doc(i))
            .query_async(&mut conn)
            .await
            .expect("del");
    }
    for i in [10, 11] {
        let _: () = redis::cmd("SET")
            .arg(doc(i))
            .arg("\u{1}garbage")
            .query_async(&mut conn)
            .await
            .expect("set");
    }
    let damage = [
        (12, r#"{"resourceType":"Pat"#.to_owned()),
        (
            13,
            r#"{"gender":"other","id":"s13","resourceType":"Patient"}"#.to_owned(),
        ),
        (
            14,
            r#"{"gender":"other","id":"s14","resourceType":"Patient"}"#.to_owned(),
        ),
    ];
    for (i, body) in &damage {
        let _: () = redis::cmd("HSET")
            .arg(doc(*i))
            .arg("b")
            .arg(body)
            .query_async(&mut conn)
            .await
            .expect("hset");
    }

    let tenants = vec![ctx.tenant().clone()];
    let run = |mode, deep| {
        let (reconciler, tenants) = (&reconciler, tenants.clone());
        async move {
            let report = job(reconciler, tenants, Some(vec![pt()]), mode, false, deep).await;
            report.entries.into_iter().next().expect("one entry")
        }
    };
    let plain = run(ReconcileMode::Repair, false).await;
    assert!(plain.roots_equal, "the ordinary comparison cannot see it");

    let dry = run(ReconcileMode::DryRun, true).await;
    let scrub = dry.scrub.clone().expect("scrubbed");
    assert!(scrub.supported);
    assert_eq!(
        (scrub.lost, scrub.unreadable, scrub.corrupted),
        (10, 3, 2),
        "{scrub:?}"
    );
    assert_eq!(scrub.keys_read, 60);
    assert!(scrub.examples.iter().any(|e| e == "lost Patient/s00"));
    assert!(scrub.examples.iter().any(|e| e == "corrupted Patient/s13"));
    assert!(scrub.examples.iter().any(|e| e == "unreadable Patient/s12"));
    assert_eq!(dry.repaired, 0, "a dry run changes nothing");
    let again = run(ReconcileMode::DryRun, true).await;
    assert_eq!(again.scrub.map(|s| s.lost), Some(10));

    let fixed = run(ReconcileMode::Repair, true).await;
    let scrub = fixed.scrub.clone().expect("scrubbed");
    assert_eq!((scrub.lost, scrub.unreadable, scrub.corrupted), (10, 3, 2));
    assert_eq!((fixed.missing, fixed.repaired), (15, 15), "{fixed:?}");
    assert_eq!(fixed.still_differing, 0);

    let after = run(ReconcileMode::DryRun, true).await;
    let scrub = after.scrub.clone().expect("scrubbed");
    assert_eq!(
        (
            scrub.lost,
            scrub.unreadable,
            scrub.corrupted,
            scrub.segments_rewritten
        ),
        (0, 0, 0, 0)
    );
    assert!(after.roots_equal);
    for i in 0..15 {
        let id = LogicalId::new(format!("s{i:02}")).expect("id");
        let held = redis
            .read(&ctx, pt(), &id)
            .await
            .expect("read")
            .expect("restored");
        let truth = primary.read(&ctx, pt(), &id).await.expect("primary");
        assert_eq!(held.content, truth.content, "s{i:02}");
    }
    // Searches through Redis see the restored keys, and not the damaged bodies' values.
    let q = fhirstore_core::SearchQuery::parse(
        Some(pt()),
        "gender=female&_count=100",
        fhirstore_core::Handling::Strict,
    )
    .expect("query");
    assert_eq!(
        redis.search(&ctx, &q).await.expect("search").matches.len(),
        60
    );
    let q = fhirstore_core::SearchQuery::parse(
        Some(pt()),
        "gender=other",
        fhirstore_core::Handling::Strict,
    )
    .expect("query");
    assert!(redis
        .search(&ctx, &q)
        .await
        .expect("search")
        .matches
        .is_empty());
    redis.purge().await.expect("purge");
}

/// A secondary that keeps no digest apart from its data says the scrub does not apply to it,
/// and the comparison runs as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_scrub_is_reported_unsupported_where_it_cannot_run() {
    let primary = Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    );
    let tantivy = TantivySecondary::in_memory(TantivyConfig::default())
        .await
        .expect("index");
    tantivy.mark_built().await.expect("built");
    let ctx = fhirstore_testkit::random_tenant();
    let id = LogicalId::new("t1").expect("id");
    primary
        .update(
            &ctx,
            pt(),
            &id,
            json!({"resourceType": "Patient", "id": "t1"}),
            None,
        )
        .await
        .expect("seed");
    let reconciler = Reconciler::new(
        primary.clone(),
        vec![(
            "tantivy".to_owned(),
            Arc::new(tantivy) as Arc<dyn Secondary>,
        )],
    );
    let report = job(
        &reconciler,
        vec![ctx.tenant().clone()],
        Some(vec![pt()]),
        ReconcileMode::Repair,
        false,
        true,
    )
    .await;
    let entry = &report.entries[0];
    assert_eq!(entry.scrub.as_ref().map(|s| s.supported), Some(false));
    assert_eq!((entry.missing, entry.repaired), (1, 1));
}
