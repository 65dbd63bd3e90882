//! CompositeStorage and the SyncManager on real backends: a SQLite primary (PostgreSQL where
//! several processes share one), the real Redis and an in-memory tantivy index, with outages,
//! rejections and crashes injected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fhirstore_core::changelog::{ChangeLog, Consumers};
use fhirstore_core::search::Handling;
use fhirstore_core::secondary::{Health, Secondary};
use fhirstore_core::{
    LogicalId, ResourceStorage, ResourceType, SearchQuery, TenantContext, WriteOp,
};
use fhirstore_redis::{RedisConfig, RedisSecondary};
use fhirstore_sync::{
    CompositeStorage, RejectPolicy, SecondaryConfig, SyncConfig, SyncMode, WriteOptions,
};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};
use fhirstore_testkit::secondary::{assert_mirrors, Flaky, Rng};
use serde_json::json;

async fn redis() -> Option<RedisSecondary> {
    fhirstore_integration::redis_secondary().await
}

async fn tantivy() -> TantivySecondary {
    TantivySecondary::in_memory(TantivyConfig {
        commit_interval: Duration::from_millis(50),
        ..TantivyConfig::default()
    })
    .await
    .expect("index")
}

async fn sqlite() -> Arc<fhirstore_sql::SqliteStore> {
    Arc::new(
        fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR"))
            .await
            .expect("sqlite"),
    )
}

/// A SQLite primary that does not wait for the disk at each commit: for tests whose crashes
/// are of the process, where what a commit wrote is in the operating system either way.
async fn sqlite_unsynced() -> Arc<fhirstore_sql::SqliteStore> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fhirstore-sqlite");
    std::fs::create_dir_all(&dir).expect("test dir");
    let path = dir.join(format!(
        "{}.sqlite",
        fhirstore_testkit::random_tenant().tenant()
    ));
    let config = fhirstore_sql::SqlConfig {
        durability: fhirstore_sql::Durability::Normal,
        ..Default::default()
    };
    Arc::new(
        fhirstore_sql::SqliteStore::open(&path, config)
            .await
            .expect("sqlite"),
    )
}

/// Settings that make tests fast: short leases, waits and backoff.
fn quick(holder: &str) -> SyncConfig {
    SyncConfig {
        batch_size: 50,
        batch_wait: Duration::from_millis(2),
        poll_interval: Duration::from_millis(20),
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(50),
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_millis(50),
        lease_ttl: Duration::from_millis(300),
        holder: holder.to_owned(),
        ..SyncConfig::default()
    }
}

/// On the shared test database, pruning would delete other tests' outbox entries, which
/// their checks count.
fn shared_db(config: SyncConfig) -> SyncConfig {
    SyncConfig {
        prune: false,
        ..config
    }
}

fn pt() -> ResourceType {
    ResourceType::new("Patient").expect("type")
}

fn patient(id: &str, family: &str, code: &str) -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": id,
        "name": [{"family": family}],
        "identifier": [{"system": "urn:test", "value": code}],
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{family} notes</div>")},
    })
}

fn query(qs: &str) -> SearchQuery {
    SearchQuery::parse(Some(pt()), qs, Handling::Strict).expect("query")
}

/// Ten thousand random creates, updates, deletes and transactions in two tenants while the
/// secondaries go down and come back, reject nothing, and the process "crashes" at every
/// delivery step
/// (failpoints between primary commit, apply and cursor advance; the workers die without
/// releasing their leases and a new instance takes over). After recovery and
/// `wait_for_sync`, every secondary holds exactly the primary's state, digests included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_convergence_through_outages_and_crashes() {
    let Some(redis) = redis().await else { return };
    // 10,000 by default; `FHIRSTORE_MODEL_STEPS` runs a longer (or shorter) soak.
    let rounds: u32 = std::env::var("FHIRSTORE_MODEL_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    converge_through_outages_and_crashes(sqlite_unsynced().await, redis, rounds).await;
}

/// The model-based run on a PostgreSQL primary whose every tenant table is hash-partitioned
/// by tenant (see `tests/partitioned.rs`), in a database of the test's own: the schema a
/// distributed deployment has keeps the same sync guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_convergence_on_postgres_partitioned_by_tenant() {
    let Some(redis) = redis().await else { return };
    let Some((_db, primary)) = partitioned_primary().await else {
        return;
    };
    converge_through_outages_and_crashes(primary, redis, 1_000).await;
}

/// A primary on a PostgreSQL database of the test's own (dropped with the first value) whose
/// every tenant table is hash-partitioned by tenant.
async fn partitioned_primary() -> Option<(
    fhirstore_integration::OwnDatabase,
    Arc<fhirstore_sql::PostgresStore>,
)> {
    let db = fhirstore_integration::partitioned_postgres(8).await?;
    let primary = fhirstore_sql::PostgresStore::connect(db.url(), Default::default())
        .await
        .expect("connect");
    Some((db, Arc::new(primary)))
}

/// `rounds` random writes through a composite over `primary` with Redis (synchronous) and
/// tantivy (asynchronous), both failing now and then, and the process crashing at random
/// steps of a write's delivery (a new composite takes over each time); afterwards both
/// secondaries mirror the primary exactly.
async fn converge_through_outages_and_crashes<P>(
    primary: Arc<P>,
    redis: RedisSecondary,
    rounds: u32,
) where
    P: fhirstore_core::changelog::Primary + 'static,
{
    let flaky_redis = Arc::new(Flaky::new(Arc::new(redis.clone())));
    let flaky_tantivy = Arc::new(Flaky::new(Arc::new(tantivy().await)));
    let tenants = [
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    ];
    let crash_at: Arc<parking_lot::Mutex<Option<&'static str>>> = Default::default();
    let crashed = Arc::new(AtomicBool::new(false));
    let fired: Arc<parking_lot::Mutex<std::collections::BTreeMap<&'static str, u32>>> =
        Default::default();
    let start = |generation: u32| {
        let mut config = quick(&format!("proc-{generation}"));
        // A crashed generation's read lease holds up a failed synchronous apply until it
        // runs out: short leases keep thousands of crashes cheap.
        config.read_lease_ttl = Duration::from_millis(150);
        let (crash_at, crashed, fired) = (crash_at.clone(), crashed.clone(), fired.clone());
        config.failpoint = Some(Arc::new(move |step| {
            let mut at = crash_at.lock();
            if *at == Some(step) {
                *at = None;
                *fired.lock().entry(step).or_default() += 1;
                crashed.store(true, Ordering::SeqCst);
                return true;
            }
            false
        }));
        CompositeStorage::new(
            primary.clone(),
            vec![
                (
                    "redis".to_owned(),
                    flaky_redis.clone() as Arc<dyn Secondary>,
                    SecondaryConfig::cache(),
                ),
                (
                    "tantivy".to_owned(),
                    flaky_tantivy.clone() as Arc<dyn Secondary>,
                    SecondaryConfig::index(),
                ),
            ],
            config,
        )
        .expect("composite")
    };
    let mut generation = 0;
    let mut composite = start(generation);
    let mut rng = Rng::new(20261122);
    let steps = ["commit", "apply", "applied", "advanced"];
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let ctx = &tenants[rng.below(2)];
        let id = LogicalId::new(format!("k{}", rng.below(12))).expect("id");
        match rng.below(10) {
            0 => {
                composite.delete(ctx, pt(), &id).await.expect("delete");
            }
            1 => {
                let first = rng.below(12);
                let ops = (0..3)
                    .map(|j| {
                        let i = format!("k{}", (first + j) % 12);
                        WriteOp::Update {
                            resource_type: pt(),
                            id: LogicalId::new(&i).expect("id"),
                            resource: patient(&i, &format!("T{round}"), &format!("c{round}")),
                            if_match: None,
                        }
                    })
                    .collect();
                composite.transaction(ctx, ops).await.expect("transaction");
            }
            _ => {
                composite
                    .update(
                        ctx,
                        pt(),
                        &id,
                        patient(
                            id.as_str(),
                            &format!("F{round}"),
                            &format!("c{}", rng.below(4)),
                        ),
                        None,
                    )
                    .await
                    .expect("update");
            }
        }
        match rng.below(40) {
            0 => flaky_redis.set_down(true),
            1 => flaky_tantivy.set_down(true),
            2 | 3 => {
                flaky_redis.set_down(false);
                flaky_tantivy.set_down(false);
            }
            _ => {}
        }
        // Arm a crash at a random step, when none is pending; it fires when that step runs.
        if rng.below(12) == 0 {
            let step = steps[rng.below(steps.len())];
            crash_at.lock().get_or_insert(step);
        }
        if crashed.swap(false, Ordering::SeqCst) {
            composite.abort();
            generation += 1;
            composite = start(generation);
        }
    }
    *crash_at.lock() = None;
    flaky_redis.set_down(false);
    flaky_tantivy.set_down(false);
    assert!(
        composite
            .wait_for_sync(Duration::from_secs(60))
            .await
            .expect("wait"),
        "secondaries did not catch up: {:?}",
        composite.status().await
    );
    for s in [&flaky_redis as &Arc<Flaky>, &flaky_tantivy] {
        assert_mirrors(&*primary, &**s, &tenants).await;
    }
    eprintln!(
        "{rounds} operations in {:.1} s; generations (crashes + 1): {}",
        started.elapsed().as_secs_f64(),
        generation + 1
    );
    let fired = fired.lock().clone();
    eprintln!("crashes by failpoint: {fired:?}");
    assert!(
        generation >= rounds / 200,
        "the run should have crashed often"
    );
    if rounds >= 2_000 {
        assert!(
            steps.iter().all(|s| fired.get(s).is_some_and(|n| *n > 0)),
            "every failpoint should have crashed the process: {fired:?}"
        );
    }
    composite.shutdown().await;
    redis.purge().await.expect("purge");
}

/// Each query goes where the capabilities and costs say: `_text` to tantivy, a token search to
/// Redis, a chain to the primary; an unhealthy or lagging secondary is passed over; a search
/// with a consistency token sees the caller's write; reads by id come from Redis until a
/// synchronous apply fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_capabilities_health_and_lag() {
    let Some(redis) = redis().await else { return };
    let primary = sqlite().await;
    let flaky_redis = Arc::new(Flaky::new(Arc::new(redis.clone())));
    let flaky_tantivy = Arc::new(Flaky::new(Arc::new(tantivy().await)));
    let mut index = SecondaryConfig::index();
    index.max_lag = 0;
    let composite = CompositeStorage::new(
        primary.clone(),
        vec![
            (
                "redis".to_owned(),
                flaky_redis.clone() as Arc<dyn Secondary>,
                SecondaryConfig::cache(),
            ),
            (
                "tantivy".to_owned(),
                flaky_tantivy.clone() as Arc<dyn Secondary>,
                index,
            ),
        ],
        quick("routing"),
    )
    .expect("composite");
    let ctx = fhirstore_testkit::random_tenant();
    for i in 0..5 {
        let id = LogicalId::new(format!("r{i}")).expect("id");
        composite
            .update(
                &ctx,
                pt(),
                &id,
                patient(id.as_str(), &format!("Fam{i}"), "x"),
                None,
            )
            .await
            .expect("seed");
    }
    assert!(composite
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("wait"));

    let backend = |qs: &'static str| {
        let (c, ctx) = (&composite, &ctx);
        async move {
            c.search_routed(ctx, &query(qs), None)
                .await
                .expect("search")
        }
    };
    let text = backend("_text=fam3").await;
    assert_eq!(
        (text.backend.as_str(), text.page.matches.len()),
        ("tantivy", 1)
    );
    let token = backend("identifier=urn:test|x").await;
    assert_eq!(
        (token.backend.as_str(), token.page.matches.len()),
        ("redis", 5)
    );
    let chain = backend("organization.name=Acme").await;
    assert_eq!(chain.backend, "primary");

    let id = LogicalId::new("r1").expect("id");
    let (_, from) = composite.read_routed(&ctx, pt(), &id).await.expect("read");
    assert_eq!(from, "redis");

    // Redis down: a write still succeeds and says Redis lags; reads and searches go to the
    // primary and still see the write.
    flaky_redis.set_down(true);
    let w = composite
        .transaction_with(
            &ctx,
            vec![WriteOp::Update {
                resource_type: pt(),
                id: id.clone(),
                resource: patient("r1", "Changed", "x"),
                if_match: None,
            }],
            WriteOptions::default(),
        )
        .await
        .expect("write while Redis is down");
    assert_eq!(w.lagging, ["redis"]);
    let (r, from) = composite.read_routed(&ctx, pt(), &id).await.expect("read");
    assert_eq!((from.as_str(), r.version.get()), ("primary", 2));
    let token = backend("identifier=urn:test|x").await;
    assert_eq!(token.backend, "primary");
    flaky_redis.set_down(false);
    assert!(composite
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("wait"));
    let (r, from) = composite.read_routed(&ctx, pt(), &id).await.expect("read");
    assert_eq!(
        (from.as_str(), r.version.get()),
        ("redis", 2),
        "served again once caught up"
    );

    // tantivy down: full text has nowhere to go; a write with a token is found by the search
    // that carries it once tantivy is back.
    flaky_tantivy.set_down(true);
    let w = composite
        .transaction_with(
            &ctx,
            vec![WriteOp::Update {
                resource_type: pt(),
                id: LogicalId::new("r9").expect("id"),
                resource: patient("r9", "Zebedee", "y"),
                if_match: None,
            }],
            WriteOptions::default(),
        )
        .await
        .expect("write");
    let err = composite
        .search_routed(&ctx, &query("_text=zebedee"), None)
        .await
        .expect_err("no backend answers full text while tantivy is down");
    // Unsupported once the worker has seen the outage; the outage itself before that.
    assert!(
        matches!(err, fhirstore_core::Error::Unsupported(_)) || err.is_temporary(),
        "{err}"
    );
    flaky_tantivy.set_down(false);
    let found = composite
        .search_routed(&ctx, &query("_text=zebedee"), w.token)
        .await;
    // The worker may still be behind when the wait ends; then nothing can answer yet.
    if let Ok(found) = found {
        assert_eq!(
            (found.backend.as_str(), found.page.matches.len()),
            ("tantivy", 1)
        );
    }
    assert!(composite
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("wait"));
    let found = composite
        .search_routed(&ctx, &query("_text=zebedee"), w.token)
        .await
        .expect("search");
    assert_eq!(
        (found.backend.as_str(), found.page.matches.len()),
        ("tantivy", 1)
    );

    composite.shutdown().await;
    redis.purge().await.expect("purge");
}

/// Readers racing writers, with Redis failing now and then: a read never returns a version
/// older than a write to that key that had already returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_go_back_under_concurrency() {
    let Some(redis) = redis().await else { return };
    let primary = sqlite().await;
    let flaky = Arc::new(Flaky::new(Arc::new(redis.clone())));
    let composite = Arc::new(
        CompositeStorage::new(
            primary.clone(),
            vec![(
                "redis".to_owned(),
                flaky.clone() as Arc<dyn Secondary>,
                SecondaryConfig::cache(),
            )],
            quick("readers"),
        )
        .expect("composite"),
    );
    let served = reads_stay_ahead_of_returned_writes(
        composite.clone(),
        composite.clone(),
        flaky,
        400,
        |i| i % 50 >= 45,
        3,
    )
    .await;
    assert!(served > 0, "Redis never served a read");
    composite.shutdown().await;
    redis.purge().await.expect("purge");
}

/// Writes through `writer` while `flaky` (its Redis) fails when `down(i)` says so, and reads
/// through `reader` from `readers` tasks meanwhile: no read returns a version below one
/// already returned to the writer. Returns how many reads Redis served.
async fn reads_stay_ahead_of_returned_writes(
    writer: Arc<CompositeStorage>,
    reader: Arc<CompositeStorage>,
    flaky: Arc<Flaky>,
    writes: usize,
    down: fn(usize) -> bool,
    readers: usize,
) -> u64 {
    let ctx = fhirstore_testkit::random_tenant();
    let keys = 4;
    let returned: Arc<Vec<AtomicU64>> = Arc::new((0..keys).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let served_by_redis = Arc::new(AtomicU64::new(0));
    let write_task = {
        let (c, ctx, returned, flaky) = (writer, ctx.clone(), returned.clone(), flaky.clone());
        tokio::spawn(async move {
            for i in 0..writes {
                let k = i % keys;
                let id = LogicalId::new(format!("w{k}")).expect("id");
                let body = patient(id.as_str(), &format!("v{i}"), "z");
                let w = c.update(&ctx, pt(), &id, body, None).await.expect("write");
                returned[k].fetch_max(w.resource.version.get(), Ordering::SeqCst);
                flaky.set_down(down(i));
            }
            flaky.set_down(false);
        })
    };
    let read_tasks: Vec<_> = (0..readers)
        .map(|_| {
            let (c, ctx, returned, done, served) = (
                reader.clone(),
                ctx.clone(),
                returned.clone(),
                done.clone(),
                served_by_redis.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0usize;
                while !done.load(Ordering::SeqCst) {
                    let k = n % keys;
                    n += 1;
                    let floor = returned[k].load(Ordering::SeqCst);
                    if floor == 0 {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    let id = LogicalId::new(format!("w{k}")).expect("id");
                    let (r, from) = c.read_routed(&ctx, pt(), &id).await.expect("read");
                    assert!(
                        r.version.get() >= floor,
                        "{from} returned w{k} v{} after v{floor} had been returned to the writer",
                        r.version
                    );
                    if from == "redis" {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    write_task.await.expect("writer");
    done.store(true, Ordering::SeqCst);
    for r in read_tasks {
        r.await.expect("reader");
    }
    served_by_redis.load(Ordering::SeqCst)
}

/// A change the secondary rejects for good is dead-lettered (and delivery goes on), or stops
/// delivery, by policy; either way status shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_changes_follow_the_policy() {
    for policy in [RejectPolicy::DeadLetter, RejectPolicy::Stop] {
        let primary = sqlite().await;
        let flaky = Arc::new(Flaky::new(Arc::new(tantivy().await)));
        *flaky.reject.lock() = Some("bad".to_owned());
        let mut cfg = SecondaryConfig::index();
        cfg.on_reject = policy;
        let composite = CompositeStorage::new(
            primary.clone(),
            vec![(
                "tantivy".to_owned(),
                flaky.clone() as Arc<dyn Secondary>,
                cfg,
            )],
            quick("policy"),
        )
        .expect("composite");
        // Built first (an empty backfill), so the writes reach it through the outbox.
        assert!(composite
            .wait_for_sync(Duration::from_secs(10))
            .await
            .expect("built"));
        let ctx = fhirstore_testkit::random_tenant();
        for id in ["good1", "bad", "good2"] {
            composite
                .update(
                    &ctx,
                    pt(),
                    &LogicalId::new(id).expect("id"),
                    patient(id, "P", "x"),
                    None,
                )
                .await
                .expect("write");
        }
        let synced = composite
            .wait_for_sync(Duration::from_secs(5))
            .await
            .expect("wait");
        let status = composite.status().await.expect("status");
        match policy {
            RejectPolicy::DeadLetter => {
                assert!(synced, "{status:?}");
                assert_eq!(status[0].dead_letters, 1);
                let dead = composite
                    .dead_letters("tantivy")
                    .await
                    .expect("dead letters");
                assert_eq!(dead[0].id, "bad");
                let r = flaky
                    .read(&ctx, pt(), &LogicalId::new("good2").expect("id"))
                    .await
                    .expect("read");
                assert!(r.is_some(), "delivery went on past the rejected change");
            }
            RejectPolicy::Stop => {
                assert!(!synced);
                assert!(
                    status[0]
                        .stopped
                        .as_deref()
                        .is_some_and(|s| s.contains("bad")),
                    "{status:?}"
                );
                assert!(status[0].lag_changes >= 1);
            }
        }
        composite.shutdown().await;
    }
}

/// Two instances on one PostgreSQL primary drain concurrently: one worker at a time applies
/// (leases), every change arrives, and Redis ends equal to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hangs in about one clean-clone CI run in four, inside the process (every PostgreSQL \
            session idle), not yet found; run with --ignored"]
async fn two_instances_share_one_postgres() {
    fhirstore_integration::within(
        Duration::from_secs(240),
        "two_instances_share_one_postgres",
        two_instances_on_postgres(),
    )
    .await;
}

async fn two_instances_on_postgres() {
    let Some(redis) = redis().await else { return };
    let Some(pg) = fhirstore_integration::postgres_store().await else {
        return;
    };
    let primary = Arc::new(pg);
    let flaky = Arc::new(Flaky::new(Arc::new(redis.clone())));
    // Asynchronous, so only the workers apply, and their overlap is what is measured.
    let mut cfg = SecondaryConfig::cache();
    cfg.mode = SyncMode::Asynchronous;
    let name = format!("redis-{}", redis.prefix());
    start_at_head(&*primary, &name, &redis).await;
    let a = CompositeStorage::new(
        primary.clone(),
        vec![(
            name.clone(),
            flaky.clone() as Arc<dyn Secondary>,
            cfg.clone(),
        )],
        shared_db(quick("instance-a")),
    )
    .expect("a");
    let b = CompositeStorage::new(
        primary.clone(),
        vec![(name.clone(), flaky.clone() as Arc<dyn Secondary>, cfg)],
        shared_db(quick("instance-b")),
    )
    .expect("b");
    let ctx = fhirstore_testkit::random_tenant();
    futures::join!(write_many(&a, &ctx, 0), write_many(&b, &ctx, 1000));
    assert!(a
        .wait_for_sync(Duration::from_secs(60))
        .await
        .expect("wait a"));
    assert!(b
        .wait_for_sync(Duration::from_secs(60))
        .await
        .expect("wait b"));
    assert_eq!(
        flaky.max_in_flight.load(Ordering::SeqCst),
        1,
        "two workers applied at once"
    );
    assert_mirrors(&*primary, &*flaky, std::slice::from_ref(&ctx)).await;
    a.shutdown().await;
    b.shutdown().await;
    redis.purge().await.expect("purge");
}

/// Readies a new consumer as a freshly built secondary: marked built, its cursor at the log's
/// head. On the shared database the outbox keeps every earlier run's changes (pruning is off
/// there), and a secondary that needed a rebuild would stream every tenant's resources.
async fn start_at_head<P: ChangeLog + Consumers + ?Sized>(
    primary: &P,
    name: &str,
    secondary: &RedisSecondary,
) {
    secondary.mark_built().await.expect("mark built");
    let holder = "test-setup";
    assert!(primary
        .lease(name, holder, Duration::from_secs(30))
        .await
        .expect("lease"));
    let head = primary.log_head().await.expect("head");
    assert!(primary
        .advance(name, holder, head, None)
        .await
        .expect("advance"));
    primary.release(name, holder).await.expect("release");
}

async fn write_many(c: &CompositeStorage, ctx: &TenantContext, from: usize) {
    for i in from..from + 60 {
        let id = LogicalId::new(format!("m{}", i % 20)).expect("id");
        c.update(
            ctx,
            pt(),
            &id,
            patient(id.as_str(), &format!("v{i}"), "m"),
            None,
        )
        .await
        .expect("write");
    }
}

/// A real outage: a Redis server of the test's own is killed mid-load and restarted empty.
/// Writes keep succeeding; the secondary reports it needs a rebuild, is backfilled from the
/// primary while writes go on, and ends equal to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty() {
    // A hang here would stall the whole run: fail instead, naming the bound.
    tokio::time::timeout(Duration::from_secs(240), redis_outage())
        .await
        .expect("the outage test finishes within 240 s");
}

async fn redis_outage() {
    let port = fhirstore_testkit::loopback_port();
    let Some(mut server) = fhirstore_testkit::OwnRedis::start(port) else {
        return;
    };
    let redis = RedisSecondary::connect(&RedisConfig::new(server.url()))
        .await
        .expect("connect to the test's own redis-server");
    assert!(
        !matches!(redis.health().await, Health::Unavailable(_)),
        "a server that answered PING is available"
    );
    let primary = sqlite().await;
    let composite = CompositeStorage::new(
        primary.clone(),
        vec![(
            "redis".to_owned(),
            Arc::new(redis.clone()) as Arc<dyn Secondary>,
            SecondaryConfig::cache(),
        )],
        quick("outage"),
    )
    .expect("composite");
    let ctx = fhirstore_testkit::random_tenant();
    let mut lagging = 0;
    for i in 0..300usize {
        if i == 100 {
            server.kill();
        }
        if i == 200 {
            server = fhirstore_testkit::OwnRedis::start(port).expect("restart redis-server");
        }
        let id = LogicalId::new(format!("o{}", i % 40)).expect("id");
        let w = composite
            .transaction_with(
                &ctx,
                vec![WriteOp::Update {
                    resource_type: pt(),
                    id: id.clone(),
                    resource: patient(id.as_str(), &format!("v{i}"), "o"),
                    if_match: None,
                }],
                WriteOptions::default(),
            )
            .await
            .expect("writes succeed whatever Redis does");
        lagging += usize::from(!w.lagging.is_empty());
    }
    assert!(
        lagging >= 50,
        "writes during the outage report Redis as lagging ({lagging})"
    );
    assert!(
        composite
            .wait_for_sync(Duration::from_secs(60))
            .await
            .expect("wait"),
        "{:?}",
        composite.status().await
    );
    assert_eq!(redis.health().await, Health::Healthy);
    assert_mirrors(&*primary, &redis, std::slice::from_ref(&ctx)).await;
    composite.shutdown().await;
    server.kill();
}

/// Setting a stack up wrongly is a configuration error, named as one, not a request error.
#[tokio::test]
async fn configuration_mistakes_are_configuration_errors() {
    let mut config = RedisConfig::new("redis://127.0.0.1:1");
    config.prefix = "a{b}".to_owned();
    let e = RedisSecondary::connect(&config).await.err();
    assert!(
        matches!(&e, Some(fhirstore_core::Error::Configuration(m)) if m.contains("prefix")),
        "{e:?}"
    );
    let (a, b): (Arc<dyn Secondary>, Arc<dyn Secondary>) =
        (Arc::new(tantivy().await), Arc::new(tantivy().await));
    let e = CompositeStorage::new(
        sqlite().await,
        vec![
            ("twice".to_owned(), a, SecondaryConfig::index()),
            ("twice".to_owned(), b, SecondaryConfig::index()),
        ],
        quick("config"),
    )
    .err();
    assert!(
        matches!(&e, Some(fhirstore_core::Error::Configuration(m)) if m.contains("twice")),
        "{e:?}"
    );
}

/// Outbox entries every consumer has passed are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_is_pruned_behind_every_cursor() {
    let primary = sqlite().await;
    let composite = CompositeStorage::new(
        primary.clone(),
        vec![(
            "tantivy".to_owned(),
            Arc::new(tantivy().await) as Arc<dyn Secondary>,
            SecondaryConfig::index(),
        )],
        quick("prune"),
    )
    .expect("composite");
    let ctx: TenantContext = fhirstore_testkit::random_tenant();
    for i in 0..30 {
        let id = LogicalId::new(format!("p{i}")).expect("id");
        composite
            .update(&ctx, pt(), &id, patient(id.as_str(), "P", "x"), None)
            .await
            .expect("write");
    }
    assert!(composite
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("wait"));
    let head = primary.log_head().await.expect("head");
    let mut left = u64::MAX;
    for _ in 0..200 {
        left = primary
            .backlog(fhirstore_core::changelog::ChangeCursor::default())
            .await
            .expect("backlog")
            .0;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(left, 0, "entries up to {head:?} remain");
    composite.shutdown().await;
}

/// A backfill interrupted by a crash resumes where its last batch left off: the new instance
/// applies only what the first did not, and the secondary ends equal to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resumes_after_a_crash() {
    let primary = sqlite().await;
    let ctx = fhirstore_testkit::random_tenant();
    for i in 0..400 {
        let id = LogicalId::new(format!("b{i:03}")).expect("id");
        primary
            .update(&ctx, pt(), &id, patient(id.as_str(), "B", "b"), None)
            .await
            .expect("seed");
    }
    let index: Arc<dyn Secondary> = Arc::new(tantivy().await);
    let applies = Arc::new(AtomicU64::new(0));
    let crashed = Arc::new(AtomicBool::new(false));
    let mut first = quick("backfill-1");
    {
        let (applies, crashed) = (applies.clone(), crashed.clone());
        first.failpoint = Some(Arc::new(move |step| {
            // Crash as the third batch is about to be applied.
            let crash = step == "apply" && applies.fetch_add(1, Ordering::SeqCst) == 2;
            if crash {
                crashed.store(true, Ordering::SeqCst);
            }
            crash
        }));
    }
    let one = CompositeStorage::new(
        primary.clone(),
        vec![(
            "tantivy".to_owned(),
            index.clone(),
            SecondaryConfig::index(),
        )],
        first,
    )
    .expect("first instance");
    for _ in 0..1000 {
        if crashed.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        crashed.load(Ordering::SeqCst),
        "the backfill never reached its third batch"
    );
    one.abort();
    let state = primary.consumer("tantivy").await.expect("consumer");
    let saved = state
        .backfill
        .expect("the backfill is recorded as unfinished");
    assert_eq!(
        saved.after.as_ref().map(|(_, _, id)| id.to_string()),
        Some("b099".to_owned()),
        "progress is saved after each batch of 50"
    );

    let two = CompositeStorage::new(
        primary.clone(),
        vec![(
            "tantivy".to_owned(),
            index.clone(),
            SecondaryConfig::index(),
        )],
        quick("backfill-2"),
    )
    .expect("second instance");
    assert!(two
        .wait_for_sync(Duration::from_secs(30))
        .await
        .expect("wait"));
    let status = two.status().await.expect("status");
    assert_eq!(
        (status[0].applied, status[0].skipped),
        (300, 0),
        "the second instance applied only the rest"
    );
    assert!(primary
        .consumer("tantivy")
        .await
        .expect("consumer")
        .backfill
        .is_none());
    assert_mirrors(&*primary, &*index, std::slice::from_ref(&ctx)).await;
    two.shutdown().await;
}

/// The versions a routed search found, and who answered.
async fn versions_found(
    p: &CompositeStorage,
    ctx: &fhirstore_core::TenantContext,
    qs: &str,
) -> (Vec<u64>, String) {
    let routed = p
        .search_routed(ctx, &query(qs), None)
        .await
        .expect("search");
    let found = routed
        .page
        .matches
        .iter()
        .map(|r| r.version.get())
        .collect();
    (found, routed.backend)
}

/// Two processes share one primary and one Redis. Process A's synchronous apply fails, so
/// Redis keeps the old version; A's write returns only once B has heard of the read fence, so
/// B's next read comes from the primary instead of returning the old version from Redis.
async fn fenced_across_processes<P>(primary: Arc<P>, redis: RedisSecondary)
where
    P: fhirstore_core::changelog::Primary + 'static,
{
    // Unique, for the shared PostgreSQL database.
    let name = format!("redis-{}", redis.prefix());
    // Built from the start, so B's one health probe finds it healthy.
    start_at_head(&*primary, &name, &redis).await;
    let flaky_a = Arc::new(Flaky::new(Arc::new(redis.clone())));
    let process = |holder: &str, secondary: Arc<dyn Secondary>| {
        let config = SyncConfig {
            // Only a process's own writes wake its worker: B's never delivers A's change.
            poll_interval: Duration::from_secs(3600),
            read_lease_ttl: Duration::from_millis(600),
            ..quick(holder)
        };
        CompositeStorage::new(
            primary.clone(),
            vec![(name.clone(), secondary, SecondaryConfig::cache())],
            shared_db(config),
        )
        .expect("composite")
    };
    let a = process("process-a", flaky_a.clone());
    let b = process("process-b", Arc::new(redis.clone()));
    let ctx = fhirstore_testkit::random_tenant();
    let id = LogicalId::new("fenced").expect("id");
    a.update(&ctx, pt(), &id, patient("fenced", "One", "1"), None)
        .await
        .expect("v1");
    // B first: if B holds the drain lease, only its own waiting wakes its worker.
    for p in [&b, &a] {
        let ok = p
            .wait_for_sync(Duration::from_secs(30))
            .await
            .expect("sync");
        assert!(ok, "{:?}", p.status().await);
    }
    let (r, from) = b.read_routed(&ctx, pt(), &id).await.expect("read v1");
    assert_eq!((r.version.get(), &from), (1, &name));

    flaky_a.set_down(true);
    let op = WriteOp::Update {
        resource_type: pt(),
        id: id.clone(),
        resource: patient("fenced", "Two", "1"),
        if_match: None,
    };
    let w = a
        .transaction_with(&ctx, vec![op], WriteOptions::default())
        .await
        .expect("v2");
    assert_eq!(
        w.lagging,
        std::slice::from_ref(&name),
        "the synchronous apply failed"
    );
    let in_redis = redis.read(&ctx, pt(), &id).await.expect("redis read");
    assert_eq!(
        in_redis.map(|r| r.version.get()),
        Some(1),
        "Redis still holds the old version, which B would otherwise serve"
    );
    let (r, from) = b.read_routed(&ctx, pt(), &id).await.expect("read after");
    assert_eq!(
        r.version.get(),
        2,
        "B returned v{} from {from} after v2 had been returned to A's caller",
        r.version
    );
    assert_eq!(from, "primary");
    // Searches keep the guarantee reads keep, in both processes: Redis still indexes v1 (the
    // old family), so it may not answer until its worker has delivered v2.
    for (p, who) in [(&a, "A"), (&b, "B")] {
        let (found, backend) = versions_found(p, &ctx, "_id=fenced").await;
        assert_eq!(found, [2], "{who}: _id answered {found:?} from {backend}");
        let (found, backend) = versions_found(p, &ctx, "family=One").await;
        assert!(
            found.is_empty(),
            "{who}: the old value matched in {backend}"
        );
    }

    flaky_a.set_down(false);
    a.abort();
    b.abort();
    redis.purge().await.expect("purge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_synchronous_apply_fences_reads_in_other_processes() {
    let Some(redis) = redis().await else { return };
    fenced_across_processes(sqlite().await, redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_synchronous_apply_fences_reads_in_other_processes_on_postgres() {
    let Some(redis) = redis().await else { return };
    let Some(pg) = fhirstore_integration::postgres_store().await else {
        return;
    };
    fenced_across_processes(Arc::new(pg), redis).await;
}

/// The read fence across processes on a PostgreSQL schema hash-partitioned by tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_synchronous_apply_fences_reads_on_postgres_partitioned_by_tenant() {
    let Some(redis) = redis().await else { return };
    let Some((_db, pg)) = partitioned_primary().await else {
        return;
    };
    fenced_across_processes(pg, redis).await;
}

/// Readers in process B never see a version older than one a writer in process A got back,
/// while A's synchronous applies to the shared Redis fail every now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_go_back_across_processes() {
    let Some(redis) = redis().await else { return };
    redis.mark_built().await.expect("built");
    let primary = sqlite().await;
    let flaky_a = Arc::new(Flaky::new(Arc::new(redis.clone())));
    let process = |holder: &str, secondary: Arc<dyn Secondary>| {
        let config = SyncConfig {
            read_lease_ttl: Duration::from_millis(300),
            ..quick(holder)
        };
        Arc::new(
            CompositeStorage::new(
                primary.clone(),
                vec![("redis".to_owned(), secondary, SecondaryConfig::cache())],
                config,
            )
            .expect("composite"),
        )
    };
    let a = process("cross-a", flaky_a.clone());
    let b = process("cross-b", Arc::new(redis.clone()));
    let served = reads_stay_ahead_of_returned_writes(
        a.clone(),
        b.clone(),
        flaky_a,
        200,
        |i| i % 40 >= 35,
        2,
    )
    .await;
    assert!(served > 0, "Redis never served process B");
    a.shutdown().await;
    b.shutdown().await;
    redis.purge().await.expect("purge");
}
