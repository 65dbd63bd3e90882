//! Store factories and SQL-specific checks for the integration tests.
//!
//! The conformance suite itself lives in `fhirstore-testkit`; these tests stamp it into each
//! backend and add what only the SQL primary has: the outbox and the digest table.

use std::collections::BTreeMap;

use fhirstore_core::digest::Digest;
use fhirstore_core::{
    HistoryRequest, HistoryScope, LogicalId, ResourceStorage, ResourceType, SearchQuery,
    TenantContext,
};
use fhirstore_sql::{PostgresStore, SegmentDigest, SqlConfig, SqliteStore};

pub use fhirstore_testkit::postgres::{postgres_url, OwnDatabase};

/// A fresh SQLite database file under `tmp` (tests pass cargo's `CARGO_TARGET_TMPDIR`, so the
/// files live under `target/` and go with `cargo clean`).
pub async fn sqlite_store(tmp: &str) -> Option<SqliteStore> {
    sqlite_store_with(tmp, SqlConfig::default()).await
}

/// [`sqlite_store`] with `config`.
pub async fn sqlite_store_with(tmp: &str, config: SqlConfig) -> Option<SqliteStore> {
    let dir = std::path::Path::new(tmp).join("fhirstore-sqlite");
    std::fs::create_dir_all(&dir).expect("create test dir");
    let path = dir.join(format!("{}.sqlite", uuid_like()));
    Some(
        SqliteStore::open(&path, config)
            .await
            .expect("open SQLite store"),
    )
}

/// A store on the test PostgreSQL server, or `None` (skip) when it is down and not required.
pub async fn postgres_store() -> Option<PostgresStore> {
    postgres_store_with(SqlConfig::default()).await
}

/// [`postgres_store`] with `config`.
pub async fn postgres_store_with(config: SqlConfig) -> Option<PostgresStore> {
    match PostgresStore::connect(&postgres_url(), config).await {
        Ok(s) => Some(s),
        Err(e) => fhirstore_testkit::service_unavailable("PostgreSQL", e),
    }
}

/// A store on a PostgreSQL database of the test's own (dropped with the first value), for tests
/// whose work would otherwise grow with what other tests left in the shared database.
pub async fn postgres_own_store() -> Option<(OwnDatabase, PostgresStore)> {
    let db = OwnDatabase::create().await?;
    match PostgresStore::connect(db.url(), SqlConfig::default()).await {
        Ok(s) => Some((db, s)),
        Err(e) => fhirstore_testkit::service_unavailable("PostgreSQL", e),
    }
}

fn uuid_like() -> String {
    fhirstore_testkit::random_tenant()
        .tenant()
        .as_str()
        .to_owned()
}

/// Recomputes a (tenant, type) digest from scratch, from the resources' stored versions, using
/// only the core digest functions: the model the maintained digest table must equal.
pub async fn model_digest(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    rt: ResourceType,
) -> Vec<SegmentDigest> {
    // The newest entry per id in type history is the current version. Its element hash comes
    // from `Change`, as every secondary computes it: the digest test then also checks that a
    // secondary fed these changes would agree with the primary.
    let mut current: BTreeMap<LogicalId, fhirstore_core::secondary::Change> = BTreeMap::new();
    let mut req = HistoryRequest::new(HistoryScope::Type(rt));
    req.count = Some(1000);
    loop {
        let page = store.history(ctx, &req).await.expect("history");
        for r in page.entries {
            current
                .entry(r.key.id.clone())
                .or_insert_with(|| fhirstore_core::secondary::Change::of(&r));
        }
        match page.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => break,
        }
    }
    let mut segs: BTreeMap<u16, Digest> = BTreeMap::new();
    for change in current.values() {
        segs.entry(change.segment())
            .or_default()
            .add(change.element_hash());
    }
    segs.into_iter()
        .map(|(segment, digest)| SegmentDigest { segment, digest })
        .collect()
}

/// Stamps the SQL-only checks (outbox and digests) for a store factory.
#[macro_export]
macro_rules! sql_primary_tests {
    ($factory:expr) => {
        use fhirstore_core::{OpOutcome, ResourceStorage as _, WriteOp};

        fn rt(n: &str) -> fhirstore_core::ResourceType {
            fhirstore_core::ResourceType::new(n).expect("known type")
        }

        /// After a mix of creates, updates, deletes, a transaction and a failed transaction, the
        /// maintained digest equals the digest recomputed from current rows, which equals the
        /// model computed from the stored bodies.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn digest_table_matches_model() {
            let Some(store) = $factory.await else { return };
            let ctx = fhirstore_testkit::random_tenant();
            let pt = rt("Patient");
            let mut ids = Vec::new();
            for i in 0..40 {
                let w = store
                    .create(&ctx, pt, serde_json::json!({"resourceType": "Patient", "gender": if i % 2 == 0 {"male"} else {"female"}}))
                    .await
                    .expect("create");
                ids.push(w.resource.key.id);
            }
            for id in ids.iter().step_by(3) {
                store
                    .update(&ctx, pt, id, serde_json::json!({"resourceType": "Patient", "id": id.as_str(), "active": true}), None)
                    .await
                    .expect("update");
            }
            for id in ids.iter().step_by(5) {
                store.delete(&ctx, pt, id).await.expect("delete");
            }
            let ops = vec![
                WriteOp::Delete { resource_type: pt, id: ids[1].clone() },
                WriteOp::Create { resource_type: rt("Observation"), resource: serde_json::json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}), if_none_exist: None, full_url: None },
            ];
            store.transaction(&ctx, ops).await.expect("transaction");
            let failing = vec![
                WriteOp::Delete { resource_type: pt, id: ids[2].clone() },
                WriteOp::Update { resource_type: pt, id: ids[4].clone(), resource: serde_json::json!({"resourceType": "Patient", "id": ids[4].as_str()}), if_match: fhirstore_core::VersionId::new(99) },
            ];
            assert!(store.transaction(&ctx, failing).await.is_err());

            for t in [pt, rt("Observation")] {
                let stored = store.digest_segments(&ctx, t).await.expect("digest");
                let recomputed = store.recompute_digest_segments(&ctx, t).await.expect("recompute");
                let model = $crate::model_digest(&store, &ctx, t).await;
                assert!(!model.is_empty());
                assert_eq!(stored, recomputed, "{t}: maintained vs current rows");
                assert_eq!(stored, model, "{t}: maintained vs model");
                // The coarse views agree with the segments: groups fold them, a read by groups
                // returns exactly their segments, and the root folds everything.
                use fhirstore_core::secondary::{fold_groups, in_groups, DigestView};
                let groups = store.group_digests(ctx.tenant(), t).await.expect("groups");
                assert!(!groups.is_empty());
                assert_eq!(groups, fold_groups(&stored), "{t}: groups fold the segments");
                let some: Vec<u16> = groups.iter().step_by(2).map(|g| g.group).collect();
                assert_eq!(
                    store.segment_digests_in(ctx.tenant(), t, &some).await.expect("by group"),
                    in_groups(stored.clone(), &some),
                    "{t}: segments by group"
                );
                let mut root = fhirstore_core::digest::Digest::default();
                stored.iter().for_each(|s| root.merge(s.digest));
                assert_eq!(store.root_digest(ctx.tenant(), t).await.expect("root"), root);
            }
            let other = fhirstore_testkit::random_tenant();
            assert!(store.digest_segments(&other, pt).await.expect("digest").is_empty(), "digests are per tenant");
        }

        /// A transaction of plain creates and updates, which the store writes together, stores
        /// what the same writes made one by one store: versions, kinds, index rows (old ones
        /// gone), outbox positions and digests.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_bulk_transaction_writes_what_single_writes_do() {
            let Some(store) = $factory.await else { return };
            let pt = rt("Patient");
            let ob = rt("Observation");
            let id = |s: &str| fhirstore_core::LogicalId::new(s).expect("id");
            let patient = |i: usize, family: &str| serde_json::json!({
                "resourceType": "Patient", "id": format!("p{i}"),
                "name": [{"family": format!("{family}{i}")}],
                "gender": if i % 2 == 0 { "female" } else { "male" },
                "birthDate": format!("19{}0-0{}-1{i}", 5 + i % 4, 1 + i % 8),
            });
            let observation = |i: usize| serde_json::json!({
                "resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": format!("c{}", i % 2)}]},
                "subject": {"reference": format!("Patient/p{}", i % 3)},
                "effectiveDateTime": format!("2020-0{}-01", 1 + i),
            });
            let bulk = fhirstore_testkit::random_tenant();
            let single = fhirstore_testkit::random_tenant();
            for ctx in [&bulk, &single] {
                for i in 0..6 {
                    store.update(ctx, pt, &id(&format!("p{i}")), patient(i, "Before"), None).await.expect("setup");
                }
                store.delete(ctx, pt, &id("p5")).await.expect("delete");
            }
            // Updates of live resources, of a deleted one, updates that create, and creates.
            let mut ops: Vec<WriteOp> = [0, 1, 2, 5, 6, 7]
                .into_iter()
                .map(|i| WriteOp::Update {
                    resource_type: pt,
                    id: id(&format!("p{i}")),
                    resource: patient(i, "After"),
                    if_match: None,
                })
                .collect();
            ops.extend((0..4).map(|i| WriteOp::Create {
                resource_type: ob,
                resource: observation(i),
                if_none_exist: None,
                full_url: None,
            }));
            let before = store.outbox_after(0, u32::MAX).await.expect("outbox").last().map_or(0, |e| e.seq);
            let together = store.transaction(&bulk, ops.clone()).await.expect("bulk transaction");
            let mut apart = Vec::new();
            for op in ops {
                apart.extend(store.transaction(&single, vec![op]).await.expect("single write"));
            }
            let entries = store.outbox_after(before, u32::MAX).await.expect("outbox");
            let mut seqs = std::collections::HashSet::new();
            for (t, a) in together.iter().zip(&apart) {
                let (OpOutcome::Written(t), OpOutcome::Written(a)) = (t, a) else { panic!("{t:?}") };
                assert_eq!((t.kind, t.resource.version), (a.kind, a.resource.version), "{}", t.resource.key);
                if t.resource.key.resource_type == pt {
                    assert_eq!(t.resource.key, a.resource.key);
                    assert_eq!(t.resource.content["name"], a.resource.content["name"]);
                }
                // The position a write returns is its own outbox entry's.
                let seq = t.seq.expect("seq");
                assert!(seqs.insert(seq), "seq {seq} returned twice");
                let entry = entries.iter().find(|e| e.seq == seq).expect("an outbox entry at the returned seq");
                assert_eq!(
                    (entry.tenant.as_str(), entry.resource_type.as_str(), entry.id.as_str(), entry.version),
                    (bulk.tenant().as_str(), t.resource.key.resource_type.as_str(), t.resource.key.id.as_str(), t.resource.version.get() as i64),
                );
            }
            assert_eq!(entries.iter().filter(|e| e.tenant == bulk.tenant().as_str()).count(), together.len());
            for criteria in [
                "family=After1", "family=Before1", "family=Before3", "gender=female",
                "birthdate=ge1960-01-01&birthdate=lt1980-01-01", "_id=p5",
            ] {
                let ids = |ctx| {
                    let store = &store;
                    async move {
                        let q = fhirstore_core::SearchQuery::parse(Some(pt), criteria, fhirstore_core::search::Handling::Strict).expect("query");
                        let mut ids: Vec<String> = store.search(ctx, &q).await.expect("search")
                            .matches.into_iter().map(|r| r.key.id.to_string()).collect();
                        ids.sort();
                        ids
                    }
                };
                assert_eq!(ids(&bulk).await, ids(&single).await, "Patient?{criteria}");
            }
            let q = fhirstore_core::SearchQuery::parse(Some(ob), "subject=Patient/p0&code=c0&_summary=count", fhirstore_core::search::Handling::Strict).expect("query");
            // Observations 0 and 3 are of p0, and 0 and 2 of code c0.
            assert_eq!(store.search(&bulk, &q).await.expect("search").total, Some(1));
            let q = fhirstore_core::SearchQuery::parse(Some(pt), "family=Before1", fhirstore_core::search::Handling::Strict).expect("query");
            assert!(store.search(&bulk, &q).await.expect("search").matches.is_empty(), "a replaced version's index rows are gone");
            for t in [pt, ob] {
                let stored = store.digest_segments(&bulk, t).await.expect("digest");
                assert_eq!(stored, store.recompute_digest_segments(&bulk, t).await.expect("recompute"), "{t}");
                assert_eq!(stored, $crate::model_digest(&store, &bulk, t).await, "{t}: model");
                use fhirstore_core::secondary::{fold_groups, DigestView};
                let groups = store.group_digests(bulk.tenant(), t).await.expect("groups");
                assert_eq!(groups, fold_groups(&stored), "{t}: groups fold the segments");
            }
        }

        /// Two transactions creating the same resources by update at once both succeed, one
        /// version each, whichever inserts first: the other's writes become updates.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn racing_bulk_creates_become_updates() {
            let Some(store) = $factory.await else { return };
            let store = std::sync::Arc::new(store);
            let ctx = fhirstore_testkit::random_tenant();
            let pt = rt("Patient");
            let ops: Vec<WriteOp> = (0..40)
                .map(|i| WriteOp::Update {
                    resource_type: pt,
                    id: fhirstore_core::LogicalId::new(&format!("q{i}")).expect("id"),
                    resource: serde_json::json!({"resourceType": "Patient", "id": format!("q{i}"), "gender": "other"}),
                    if_match: None,
                })
                .collect();
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (store, ctx, ops) = (store.clone(), ctx.clone(), ops.clone());
                    tokio::spawn(async move { store.transaction(&ctx, ops).await })
                })
                .collect();
            for r in racers {
                r.await.expect("join").expect("both transactions commit");
            }
            for i in 0..40 {
                let r = store.read(&ctx, pt, &fhirstore_core::LogicalId::new(&format!("q{i}")).expect("id")).await.expect("read");
                assert_eq!(r.version.get(), 2, "q{i}");
            }
            let stored = store.digest_segments(&ctx, pt).await.expect("digest");
            assert_eq!(stored, $crate::model_digest(&*store, &ctx, pt).await);
            let q = fhirstore_core::SearchQuery::parse(Some(pt), "gender=other&_summary=count", fhirstore_core::search::Handling::Strict).expect("query");
            assert_eq!(store.search(&ctx, &q).await.expect("search").total, Some(40), "one set of index rows each");
        }

        /// Every committed version has exactly one outbox entry, in write order; failed
        /// transactions leave none.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn outbox_records_every_version() {
            let Some(store) = $factory.await else { return };
            let ctx = fhirstore_testkit::random_tenant();
            let pt = rt("Patient");
            let start = store.outbox_after(0, 1).await.expect("outbox").len();
            let _ = start;
            let body = |id: &str| serde_json::json!({"resourceType": "Patient", "id": id});
            let a = fhirstore_core::LogicalId::new("a").expect("id");
            let mut seqs = Vec::new();
            seqs.push(store.update(&ctx, pt, &a, body("a"), None).await.expect("v1").seq);
            seqs.push(store.update(&ctx, pt, &a, body("a"), None).await.expect("v2").seq);
            assert!(store.update(&ctx, pt, &a, body("a"), fhirstore_core::VersionId::new(1)).await.is_err());
            seqs.push(store.delete(&ctx, pt, &a).await.expect("delete").seq);
            let out = store
                .transaction(&ctx, vec![WriteOp::Update { resource_type: pt, id: a.clone(), resource: body("a"), if_match: None }])
                .await
                .expect("recreate");
            if let OpOutcome::Written(w) = &out[0] { seqs.push(w.seq) }
            let first = seqs[0].expect("seq") - 1;
            let entries: Vec<_> = store
                .outbox_after(first, 10_000)
                .await
                .expect("outbox")
                .into_iter()
                .filter(|e| e.tenant == ctx.tenant().as_str())
                .collect();
            let got: Vec<(i64, &str, i64)> = entries.iter().map(|e| (e.seq, e.op.as_str(), e.version)).collect();
            let want: Vec<(i64, &str, i64)> = seqs
                .iter()
                .map(|s| s.expect("seq"))
                .zip([("create", 1), ("update", 2), ("delete", 3), ("create", 4)])
                .map(|(s, (op, v))| (s, op, v))
                .collect();
            assert_eq!(got, want);
        }
    };
}

/// The test Redis server's URL.
pub fn redis_url() -> String {
    std::env::var("FHIRSTORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A Redis secondary on the test server under a fresh key prefix, so tests share the server
/// without seeing each other; `None` (skip) when Redis is down and not required.
pub async fn redis_secondary() -> Option<fhirstore_redis::RedisSecondary> {
    use fhirstore_core::secondary::{Health, Secondary};
    let mut config = fhirstore_redis::RedisConfig::new(redis_url());
    config.prefix = format!("fhirstore-test-{}", uuid_like());
    match fhirstore_redis::RedisSecondary::connect(&config).await {
        Ok(s) => match s.health().await {
            Health::Unavailable(e) => fhirstore_testkit::service_unavailable("Redis", e),
            _ => Some(s),
        },
        Err(e) => fhirstore_testkit::service_unavailable("Redis", e),
    }
}

/// The settings [`heavy_searches_are_bounded`] needs: a short search limit and fewer search
/// connections than heavy searches, beside as few connections for everything else.
pub fn bounded_search_config() -> SqlConfig {
    SqlConfig {
        search_timeout: std::time::Duration::from_millis(1_500),
        search_connections: 2,
        max_connections: 2,
        ..SqlConfig::default()
    }
}

/// A search far too heavy to finish in [`bounded_search_config`]'s limit, yet within every
/// parse limit: 80 `name:contains` criteria of 250 values each.
pub fn heavy_query() -> fhirstore_core::SearchQuery {
    heavy_query_of(80, 250)
}

/// `criteria` `name:contains` criteria of `values` values each, the last value of each
/// matching every stored name, so no criterion can be skipped, and an accurate total, so no
/// match can be either.
pub fn heavy_query_of(criteria: usize, values: usize) -> fhirstore_core::SearchQuery {
    let values: Vec<String> = (1..values)
        .map(|i| format!("zq{i}"))
        .chain(["a".into()])
        .collect();
    let one = format!("name:contains={}", values.join(","));
    let text = format!("{}&_total=accurate", vec![one; criteria].join("&"));
    fhirstore_core::SearchQuery::parse(
        Some(ResourceType::new("Patient").expect("type")),
        &text,
        fhirstore_core::search::Handling::Strict,
    )
    .expect("within the parse limits")
}

/// Creates `n` Patients named `Anna Baker…`, in transactions of 250.
pub async fn load_named_patients(store: &dyn ResourceStorage, ctx: &TenantContext, n: usize) {
    use fhirstore_core::WriteOp;
    let pt = ResourceType::new("Patient").expect("type");
    for chunk in 0..n.div_ceil(250) {
        let ops = (0..250.min(n - chunk * 250))
            .map(|i| WriteOp::Create {
                resource_type: pt,
                resource: serde_json::json!({"resourceType": "Patient",
                    "name": [{"family": format!("Baker{chunk}x{i}"), "given": ["Anna"]}]}),
                if_none_exist: None,
                full_url: None,
            })
            .collect();
        store.transaction(ctx, ops).await.expect("load");
    }
}

/// Heavy searches are cancelled at `search_timeout` with a 400-kind error naming the limit,
/// and free their connections; while they run, reads by id and writes on the same store keep
/// answering, each well within the limit, since searches hold a pool of their own.
pub async fn heavy_searches_are_bounded<D: fhirstore_sql::Dialect>(
    store: std::sync::Arc<fhirstore_sql::Store<D>>,
) {
    use fhirstore_core::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let limit = bounded_search_config().search_timeout;
    let ctx = fhirstore_testkit::random_tenant();
    let pt = ResourceType::new("Patient").expect("type");
    load_named_patients(&*store, &ctx, 1_000).await;
    let probe = store
        .create(
            &ctx,
            pt,
            serde_json::json!({"resourceType": "Patient", "gender": "male"}),
        )
        .await
        .expect("create")
        .resource
        .key
        .id;
    let heavy = heavy_query();
    let started = Instant::now();
    let done = std::sync::Arc::new(AtomicUsize::new(0));
    let searches: Vec<_> = (0..4)
        .map(|_| {
            let (store, ctx, heavy, done) =
                (store.clone(), ctx.clone(), heavy.clone(), done.clone());
            tokio::spawn(async move {
                let r = store.search(&ctx, &heavy).await;
                done.fetch_add(1, Ordering::SeqCst);
                (r, started.elapsed())
            })
        })
        .collect();
    // Reads and writes while the searches hold every search connection: each is timed, and
    // the loop runs until the searches end, so it measures the whole window.
    let (mut answered, mut slowest) = (0u32, Duration::ZERO);
    while done.load(Ordering::SeqCst) < searches.len() {
        let t = Instant::now();
        store
            .read(&ctx, pt, &probe)
            .await
            .expect("read while searching");
        store
            .update(
                &ctx,
                pt,
                &probe,
                serde_json::json!({"resourceType": "Patient",
                "id": probe.as_str(), "gender": if answered % 2 == 0 { "female" } else { "male" }}),
                None,
            )
            .await
            .expect("write while searching");
        slowest = slowest.max(t.elapsed());
        answered += 1;
        tokio::task::yield_now().await;
    }
    for s in searches {
        let (result, took) = s.await.expect("search task");
        match result {
            Err(Error::TooCostly(m)) => assert!(m.contains("search_timeout"), "{m}"),
            Ok(page) => panic!(
                "a heavy search finished in {took:?} with {} matches: make it heavier",
                page.matches.len()
            ),
            Err(e) => panic!("expected the search_timeout, got {e}"),
        }
        assert!(took < limit * 4, "cancelled at {took:?}, limit {limit:?}");
    }
    assert!(
        answered >= 3,
        "only {answered} reads and writes ran beside the searches"
    );
    assert!(
        slowest < limit / 2,
        "a read and write beside heavy searches took {slowest:?} (limit {limit:?})"
    );
    // The cancelled statements let their connections go: a light search answers at once.
    let light = fhirstore_core::SearchQuery::parse(
        Some(pt),
        "gender=male,female",
        fhirstore_core::search::Handling::Strict,
    )
    .expect("query");
    let t = Instant::now();
    let page = store
        .search(&ctx, &light)
        .await
        .expect("a light search after");
    assert_eq!(page.matches.len(), 1);
    assert!(t.elapsed() < limit / 2, "took {:?}", t.elapsed());
}

/// Runs `work`, failing the test if it takes longer than `limit`. A hang then fails with its
/// name instead of holding the run, and prints what the test PostgreSQL server's sessions were
/// doing (the usual cause of a hang there is a lock wait), without credentials.
pub async fn within<F: std::future::Future>(
    limit: std::time::Duration,
    what: &str,
    work: F,
) -> F::Output {
    match tokio::time::timeout(limit, work).await {
        Ok(out) => out,
        Err(_) => panic!(
            "{what} did not finish within {limit:?}; PostgreSQL sessions at the time:\n{}",
            postgres_sessions().await
        ),
    }
}

/// A session as listed: pid, state, wait event, the pids blocking it, and its query.
type Session = (i32, String, String, String, String);

async fn postgres_sessions() -> String {
    use sqlx::Connection as _;
    let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_url()).await else {
        return "(PostgreSQL not reachable)".to_owned();
    };
    let rows: Result<Vec<Session>, _> = sqlx::query_as(
        "SELECT pid, coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, ''), \
         coalesce(pg_blocking_pids(pid)::text, ''), left(coalesce(query, ''), 200) \
         FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut conn)
    .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|(pid, state, wait, blockers, query)| {
                format!("  {pid} {state} wait={wait} blocked_by={blockers} {query}")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(could not list sessions: {e})"),
    }
}

/// Configurations that force each page strategy of the SQL primary: every criterion counted as
/// selective (the smallest set drives, the rest are checked per candidate), and none (every
/// page walks its order, by id or by the sort parameter's index, where the order allows).
pub fn strategy_configs() -> [(&'static str, SqlConfig); 2] {
    [
        (
            "drive",
            SqlConfig {
                selective_below: u32::MAX,
                ..SqlConfig::default()
            },
        ),
        (
            "walk",
            SqlConfig {
                selective_below: 0,
                ..SqlConfig::default()
            },
        ),
    ]
}

/// The search checks of the conformance suite, for a store configured to one page strategy.
pub async fn search_checks(store: &dyn ResourceStorage) {
    use fhirstore_testkit::checks;
    checks::search_by_id_and_last_updated(store).await;
    checks::search_by_identifier(store).await;
    checks::search_paging_covers_every_match_once(store).await;
    checks::search_parameter_types(store).await;
    checks::search_includes(store).await;
    checks::search_sorting(store).await;
    checks::search_modifiers_and_meta(store).await;
    checks::search_composites(store).await;
    checks::counts_agree_with_the_matches(store).await;
    checks::compartments_equal_the_equivalent_searches(store).await;
    sorted_pages_follow_the_model(store).await;
}

/// One generated Patient of [`sorted_pages_follow_the_model`]: id, gender, family names and
/// birth date.
struct Person {
    id: String,
    gender: &'static str,
    families: Vec<&'static str>,
    born: Option<String>,
}

/// Sorted paging over generated Patients (none, one or several family names, some folding to
/// the same value, birth dates sometimes missing) equals the order worked out here from the
/// definitions: the lowest value ascending, the highest descending, resources without one last,
/// ties by id; every page size, every cursor.
pub async fn sorted_pages_follow_the_model(store: &dyn ResourceStorage) {
    use fhirstore_core::search::Handling;
    const FAMILIES: [&str; 6] = ["Smith", "SMITH", "Brown", "Chen", "Diaz", "Evans"];
    const GENDERS: [&str; 3] = ["female", "male", "other"];
    let ctx = fhirstore_testkit::random_tenant();
    let pt = ResourceType::new("Patient").expect("type");
    let mut rng = fhirstore_testkit::secondary::Rng::new(0x5eed);
    let mut people = Vec::new();
    for i in 0..90 {
        let families: Vec<&str> = (0..rng.below(4))
            .map(|_| FAMILIES[rng.below(FAMILIES.len())])
            .collect();
        let born = (rng.below(5) > 0).then(|| {
            format!(
                "19{:02}-{:02}-{:02}",
                rng.below(100),
                1 + rng.below(12),
                1 + rng.below(28)
            )
        });
        people.push(Person {
            id: format!("s{i:03}"),
            gender: GENDERS[rng.below(GENDERS.len())],
            families,
            born,
        });
    }
    for p in &people {
        let mut body =
            serde_json::json!({"resourceType": "Patient", "id": p.id, "gender": p.gender});
        if !p.families.is_empty() {
            body["name"] = p
                .families
                .iter()
                .map(|f| serde_json::json!({"family": f}))
                .collect();
        }
        if let Some(b) = &p.born {
            body["birthDate"] = serde_json::json!(b);
        }
        let id = fhirstore_core::LogicalId::new(p.id.clone()).expect("id");
        store
            .update(&ctx, pt, &id, body, None)
            .await
            .expect("write");
    }
    let folded =
        |p: &Person| -> Vec<String> { p.families.iter().map(|f| f.to_lowercase()).collect() };
    for criteria in [
        "",
        "gender=female",
        "gender=female&family=s",
        "family=smith",
    ] {
        for sort in ["family", "-family", "birthdate", "-birthdate"] {
            let descending = sort.starts_with('-');
            let matching = people.iter().filter(|p| {
                criteria
                    .split('&')
                    .filter(|c| !c.is_empty())
                    .all(|c| match c.split_once('=') {
                        Some(("gender", g)) => p.gender == g,
                        Some(("family", f)) => folded(p).iter().any(|n| n.starts_with(f)),
                        _ => unreachable!("{c}"),
                    })
            });
            let mut keyed: Vec<(Option<String>, &str)> = matching
                .map(|p| {
                    let values = if sort.ends_with("family") {
                        folded(p)
                    } else {
                        p.born.iter().cloned().collect()
                    };
                    let key = if descending {
                        values.into_iter().max()
                    } else {
                        values.into_iter().min()
                    };
                    (key, p.id.as_str())
                })
                .collect();
            keyed.sort_by(|(ka, ia), (kb, ib)| {
                let by_key = match (ka, kb) {
                    (Some(a), Some(b)) if descending => b.cmp(a),
                    (Some(a), Some(b)) => a.cmp(b),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                };
                by_key.then(ia.cmp(ib))
            });
            let want: Vec<&str> = keyed.iter().map(|(_, id)| *id).collect();
            for count in [7, 100] {
                let qs = format!("{criteria}&_sort={sort}&_count={count}");
                let mut q = SearchQuery::parse(Some(pt), &qs, Handling::Strict).expect("query");
                let mut got = Vec::new();
                loop {
                    let page = store.search(&ctx, &q).await.expect("search");
                    got.extend(page.matches.iter().map(|r| r.key.id.to_string()));
                    match page.next_cursor {
                        Some(c) if got.len() <= want.len() => q.cursor = Some(c),
                        _ => break,
                    }
                }
                assert_eq!(got, want, "Patient?{qs}");
            }
        }
    }
}

/// A version of Patient `id` in `tenant` with an identifier (`{id}-{v}`), a family name and an
/// organization reference: one change that writes every kind of Redis index entry.
pub fn indexed_patient_change(
    tenant: &fhirstore_core::TenantId,
    id: &str,
    v: u64,
) -> fhirstore_core::secondary::Change {
    fhirstore_core::secondary::Change {
        tenant: tenant.clone(),
        key: fhirstore_core::ResourceKey {
            resource_type: ResourceType::new("Patient").expect("type"),
            id: LogicalId::new(id).expect("id"),
        },
        version: fhirstore_core::VersionId::new(v).expect("version"),
        last_updated: fhirstore_core::from_micros(1_700_000_000_000_000 + v as i64),
        content: Some(serde_json::json!({
            "resourceType": "Patient", "id": id,
            "identifier": [{"system": "urn:mrn", "value": format!("{id}-{v}")}],
            "name": [{"family": "Ünal"}],
            "managingOrganization": {"reference": "Organization/o1"},
        })),
    }
}

/// `primary` with `redis` as its synchronous cache, on short timeouts (`timeout` for a
/// synchronous apply and a read lease, a third of it at most between retries) so outage tests
/// move quickly; returned once the cache is built.
pub async fn redis_cache_composite(
    primary: std::sync::Arc<dyn fhirstore_core::changelog::Primary>,
    redis: &fhirstore_redis::RedisSecondary,
    timeout: std::time::Duration,
) -> fhirstore_sync::CompositeStorage {
    let composite = fhirstore_sync::CompositeStorage::new(
        primary,
        vec![(
            "redis".to_owned(),
            std::sync::Arc::new(redis.clone())
                as std::sync::Arc<dyn fhirstore_core::secondary::Secondary>,
            fhirstore_sync::SecondaryConfig::cache(),
        )],
        fhirstore_sync::SyncConfig {
            sync_timeout: timeout,
            read_lease_ttl: timeout,
            poll_interval: std::time::Duration::from_millis(20),
            retry_max: timeout / 3,
            breaker_cooldown: timeout / 3,
            ..fhirstore_sync::SyncConfig::default()
        },
    )
    .expect("composite");
    assert!(composite
        .wait_for_sync(std::time::Duration::from_secs(60))
        .await
        .expect("built"));
    composite
}

/// Waits up to 60 s until every secondary of `composite` has applied everything; fails with
/// the sync status otherwise.
pub async fn caught_up(composite: &fhirstore_sync::CompositeStorage) {
    assert!(
        composite
            .wait_for_sync(std::time::Duration::from_secs(60))
            .await
            .expect("wait"),
        "{:?}",
        composite.status().await
    );
}

/// Two stores on one new database file under `tmp`, as two processes would have; each waits up
/// to 30 s for the other's write lock.
pub async fn two_sqlite_stores_on_one_file(tmp: &str, prefix: &str) -> (SqliteStore, SqliteStore) {
    let path = fresh_sqlite_file(tmp, prefix);
    let config = SqlConfig {
        busy_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    };
    let a = SqliteStore::open(&path, config.clone())
        .await
        .expect("open a");
    let b = SqliteStore::open(&path, config).await.expect("open b");
    (a, b)
}

/// A path for a new database file under `tmp`, for tests that open it twice.
pub fn fresh_sqlite_file(tmp: &str, prefix: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(tmp).join("fhirstore-sqlite");
    std::fs::create_dir_all(&dir).expect("test dir");
    dir.join(format!("{prefix}-{}.sqlite", uuid_like()))
}

/// Replaces every table with a `tenant` column by a table of the same definition
/// (`LIKE … INCLUDING ALL`: columns, defaults, identity, constraints, indexes) hash-partitioned
/// by tenant into `PARTS` partitions named `{table}_p{remainder}`, and moves its rows over.
pub const PARTITION_BY_TENANT: &str = r#"
DO $$
DECLARE
    t text;
    i int;
BEGIN
    FOR t IN
        SELECT c.relname FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant' AND NOT a.attisdropped
        WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace AND NOT c.relispartition
        ORDER BY 1
    LOOP
        EXECUTE format('ALTER TABLE %I RENAME TO %I', t, t || '_flat');
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING ALL) PARTITION BY HASH (tenant)',
                       t, t || '_flat');
        FOR i IN 0 .. PARTS - 1 LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS PARTS, REMAINDER %s)',
                           t || '_p' || i, t, i);
        END LOOP;
        EXECUTE format('INSERT INTO %I OVERRIDING SYSTEM VALUE SELECT * FROM %I', t, t || '_flat');
        EXECUTE format('DROP TABLE %I', t || '_flat');
    END LOOP;
END $$;
"#;

/// The tables the migrations create with a tenant column: each must come out partitioned.
pub const TENANT_TABLES: usize = 17;

/// A database of the test's own with the migrated schema partitioned into `modulus` parts per
/// tenant table; `None` (skip) when PostgreSQL is not there and not required.
pub async fn partitioned_postgres(modulus: u32) -> Option<OwnDatabase> {
    use sqlx::Connection as _;
    let db = OwnDatabase::create().await?;
    let store = PostgresStore::connect(db.url(), SqlConfig::default())
        .await
        .expect("migrate");
    store.close().await;
    let mut c = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    sqlx::raw_sql(&PARTITION_BY_TENANT.replace("PARTS", &modulus.to_string()))
        .execute(&mut c)
        .await
        .expect("partition every tenant table; a unique key without the tenant fails here");
    let (partitioned,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid WHERE c.relnamespace = 'public'::regnamespace")
            .fetch_one(&mut c)
            .await
            .expect("count");
    assert_eq!(
        partitioned as usize, TENANT_TABLES,
        "every tenant table is partitioned"
    );
    Some(db)
}

/// Date criteria combined on one parameter equal the rules evaluated here, row by row: on
/// `Encounter.period` (one row each; some periods long, some open) and on
/// `Encounter.location.period` (several rows, so two criteria may hold of different rows).
/// A date range drives the page whenever it is the smallest set; paging collects every match.
pub async fn date_ranges_follow_the_model(store: &dyn ResourceStorage) {
    use fhirstore_core::date::{parse_fhir_date, DateRange};
    use fhirstore_core::search::{CriterionValues, Handling};
    let ctx = fhirstore_testkit::random_tenant();
    let et = ResourceType::new("Encounter").expect("type");
    let mut rng = fhirstore_testkit::secondary::Rng::new(0xda7e);
    let mut day = || {
        format!(
            "20{:02}-{:02}-{:02}",
            18 + rng.below(6),
            1 + rng.below(12),
            1 + rng.below(28)
        )
    };
    // A period as JSON and as the row the index holds.
    let period = |start: Option<String>, end: Option<String>| {
        let low = start
            .as_deref()
            .and_then(parse_fhir_date)
            .map_or(i64::MIN, |r| r.low);
        let high = end
            .as_deref()
            .and_then(parse_fhir_date)
            .map_or(i64::MAX, |r| r.high);
        let mut json = serde_json::json!({});
        if let Some(s) = start {
            json["start"] = serde_json::json!(s);
        }
        if let Some(e) = end {
            json["end"] = serde_json::json!(e);
        }
        (json, DateRange { low, high })
    };
    let mut rows: Vec<(String, Vec<DateRange>, Vec<DateRange>)> = Vec::new();
    let mut pick = fhirstore_testkit::secondary::Rng::new(0x5ba9);
    // First every span is bounded, so the longest one bounds where a range starts; then some
    // periods are open, and every start qualifies.
    for (start, end, open) in [(0, 80, false), (80, 90, true)] {
        for i in start..end {
            let id = format!("e{i:03}");
            let mut body = serde_json::json!({"resourceType": "Encounter", "id": id,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}});
            let mut own = Vec::new();
            let (a, b) = (day(), day());
            let (a, b) = if a <= b { (a, b) } else { (b, a) };
            let p = match pick.below(8) {
                0 => None,
                1 if open => Some(period(Some(a), None)),
                2 if open => Some(period(None, Some(b))),
                1 | 2 => Some(period(Some("2015-06-01".into()), Some(b))),
                3 => Some(period(Some("1990-01-01".into()), Some("2030-12-31".into()))),
                _ => Some(period(
                    Some(a.clone()),
                    Some(if pick.below(2) == 0 { a } else { b }),
                )),
            };
            if let Some((json, range)) = p {
                body["period"] = json;
                own.push(range);
            }
            let mut located = Vec::new();
            let mut locations = Vec::new();
            for _ in 0..pick.below(4) {
                let (a, b) = (day(), day());
                let (a, b) = if a <= b { (a, b) } else { (b, a) };
                let (json, range) = period(Some(a), Some(b));
                locations.push(
                    serde_json::json!({"location": {"reference": "Location/l1"}, "period": json}),
                );
                located.push(range);
            }
            if !locations.is_empty() {
                body["location"] = serde_json::json!(locations);
            }
            let logical = fhirstore_core::LogicalId::new(id.clone()).expect("id");
            store
                .update(&ctx, et, &logical, body, None)
                .await
                .expect("write");
            rows.push((id, own, located));
        }
        let mut queries = Vec::new();
        for i in 0..40 {
            let (a, b) = (day(), day());
            let (a, b) = if a <= b { (a, b) } else { (b, a) };
            let param = if i % 2 == 0 {
                "date"
            } else {
                "location-period"
            };
            queries.push(match i % 5 {
                0 | 1 => format!("{param}=ge{a}&{param}=lt{b}"),
                2 => format!("{param}=gt{a}&{param}=le{b}"),
                3 => format!("{param}={}", &a[..7]),
                _ => format!("{param}=ge{a}&{param}=lt{b}&{param}=ne{}", &b[..4]),
            });
        }
        let now = fhirstore_core::to_micros(chrono::Utc::now());
        for qs in queries {
            let query = SearchQuery::parse(
                Some(et),
                &format!("{qs}&_count=7&_total=accurate"),
                Handling::Strict,
            )
            .expect(&qs);
            let mut expected: Vec<&str> = rows
                .iter()
                .filter(|(_, own, located)| {
                    query.criteria.iter().all(|c| {
                        let CriterionValues::Date(values) = &c.values else {
                            unreachable!("{qs}")
                        };
                        let held = if c.param == "date" { own } else { located };
                        held.iter()
                            .any(|r| values.iter().any(|v| v.matches(*r, now)))
                    })
                })
                .map(|(id, _, _)| id.as_str())
                .collect();
            expected.sort_unstable();
            let mut found = Vec::new();
            let mut q = query.clone();
            loop {
                let page = store.search(&ctx, &q).await.expect(&qs);
                if q.cursor.is_none() {
                    assert_eq!(page.total, Some(expected.len() as u64), "{qs}: the total");
                }
                found.extend(page.matches.iter().map(|m| m.key.id.as_str().to_owned()));
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(found, expected, "{qs}");
        }
    }
}

/// Writes an Observation whose combo-* parameters share the rows of its plain and component
/// parameters (see `SharedRows`), then checks through `count` (which runs a `SELECT COUNT(*)`
/// on the store's database) that the parts' rows are stored and the shared names' are not, and
/// that searches for the shared parameters find it through the parts.
pub async fn shared_rows_are_stored_once(
    store: &dyn fhirstore_core::ResourceStorage,
    mut count: impl AsyncFnMut(String) -> i64,
    index_tenant: impl Fn(&str) -> String,
) {
    use fhirstore_core::{LogicalId, ResourceType, SearchQuery};
    let component = |code: &str, v: u32| {
        serde_json::json!({"code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueQuantity": {"value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}})
    };
    let body = serde_json::json!({"resourceType": "Observation", "id": "bp", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "Blood pressure"},
        "component": [component("8480-6", 120), component("8462-4", 80)]});
    let ctx = fhirstore_testkit::random_tenant();
    let ob = ResourceType::new("Observation").expect("type");
    let id = LogicalId::new("bp").expect("id");
    store
        .update(&ctx, ob, &id, body, None)
        .await
        .expect("write");
    let names = [
        ("code", true),
        ("component-code", true),
        ("code:text", true),
        ("component-code-value-quantity", true),
        ("combo-code", false),
        ("combo-code:text", false),
        ("combo-value-quantity", false),
        ("combo-code-value-quantity", false),
    ];
    for (name, stored) in names {
        let mut rows = 0;
        for table in [
            "search_token",
            "search_string",
            "search_quantity",
            "search_composite",
        ] {
            rows += count(format!(
                "SELECT COUNT(*) FROM {table} WHERE tenant = {} AND param = '{name}'",
                index_tenant(ctx.tenant().as_str())
            ))
            .await;
        }
        assert_eq!(rows > 0, stored, "{name}: {rows} rows");
    }
    for qs in [
        "combo-code=8480-6",
        "combo-code:text=blood",
        "combo-value-quantity=120",
        "combo-code-value-quantity=8462-4$80",
    ] {
        let q = SearchQuery::parse(Some(ob), qs, fhirstore_core::Handling::Strict).expect(qs);
        let page = store.search(&ctx, &q).await.expect(qs);
        assert_eq!(page.matches.len(), 1, "{qs}");
    }
}

/// Bodies are stored deflated by default (`SqlConfig::body_compression`), as the JSON text at
/// level 0, and a body stored as text before bodies were bytes still reads back. `deflated`
/// and `plain` are stores on one database at the default level and at 0; `scalar` runs a
/// statement returning one integer; `legacy` is the dialect's expression for the body of
/// the JSON text as an old database held it.
pub async fn bodies_are_stored_deflated(
    deflated: &dyn fhirstore_core::ResourceStorage,
    plain: &dyn fhirstore_core::ResourceStorage,
    mut scalar: impl AsyncFnMut(String) -> i64,
    legacy: impl Fn(&str) -> String,
) {
    use fhirstore_core::{LogicalId, ResourceType};
    let ctx = fhirstore_testkit::random_tenant();
    let tenant = ctx.tenant().as_str().to_owned();
    let ob = ResourceType::new("Observation").expect("type");
    let body = |id: &str, v: u32| {
        serde_json::json!({"resourceType": "Observation", "id": id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": "Patient/p-1"}, "effectiveDateTime": "2026-11-30T08:15:00Z",
            "valueQuantity": {"value": v, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}})
    };
    let length = |id: &str| {
        format!(
            "SELECT length(body) FROM resource_versions WHERE tenant = '{tenant}' \
             AND resource_type = 'Observation' AND id = '{id}' AND version = 1"
        )
    };
    for (store, id) in [(deflated, "hr-deflated"), (plain, "hr-plain")] {
        let id = LogicalId::new(id).expect("id");
        store
            .update(&ctx, ob, &id, body(id.as_str(), 72), None)
            .await
            .expect("write");
    }
    // Each store reads what the other wrote.
    let a = plain
        .read(&ctx, ob, &LogicalId::new("hr-deflated").expect("id"))
        .await
        .expect("read the deflated body");
    let b = deflated
        .read(&ctx, ob, &LogicalId::new("hr-plain").expect("id"))
        .await
        .expect("read the plain body");
    assert_eq!(a.content["valueQuantity"]["value"], 72);
    assert_eq!(b.content["code"]["coding"][0]["code"], "8867-4");
    let text = serde_json::to_string(&b.content).expect("json").len();
    let stored = i64::try_from(text).expect("length");
    let plain_len = scalar(length("hr-plain")).await;
    let deflated_len = scalar(length("hr-deflated")).await;
    assert_eq!(plain_len, stored, "level 0 stores the text");
    assert!(
        deflated_len * 2 < stored,
        "deflated {deflated_len} bytes of {stored}"
    );

    // A body as an old database stored it: its text.
    let id = LogicalId::new("hr-legacy").expect("id");
    deflated
        .update(&ctx, ob, &id, body("hr-legacy", 1), None)
        .await
        .expect("write");
    let mut old = body("hr-legacy", 64);
    old["meta"] = serde_json::json!({"versionId": "1", "lastUpdated": "2026-01-02T03:04:05Z"});
    let updated = scalar(format!(
        "UPDATE resource_versions SET body = {} WHERE tenant = '{tenant}' \
         AND resource_type = 'Observation' AND id = 'hr-legacy' AND version = 1 RETURNING 1",
        legacy(&old.to_string())
    ))
    .await;
    assert_eq!(updated, 1);
    let read = deflated
        .read(&ctx, ob, &id)
        .await
        .expect("read the text body");
    assert_eq!(read.content["valueQuantity"]["value"], 64);
    let request = fhirstore_core::HistoryRequest {
        scope: fhirstore_core::HistoryScope::Instance(ob, id.clone()),
        since: None,
        count: None,
        cursor: None,
    };
    let history = plain.history(&ctx, &request).await.expect("history");
    assert_eq!(history.entries.len(), 1);
    assert_eq!(history.entries[0].content["valueQuantity"]["value"], 64);
}
