//! Chaos against real services this binary starts on ports of its own and stops by process id:
//! a PostgreSQL restarted mid-load, a Redis paused and then killed, the tantivy directory
//! deleted and then corrupted, and SQLite on a filesystem that fills up. In each, every write
//! that returned survives, failed writes say why, and the stores recover on their own.
//!
//! The services are started as a developer's machine has them (`redis-server`, PostgreSQL's
//! `initdb` and `pg_ctl` run as the `postgres` user, `mount -t tmpfs` as root); where one is
//! missing the test is skipped, or fails under `FHIRSTORE_REQUIRE_SERVICES=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_core::secondary::{DigestSource, Secondary};
use fhirstore_core::{
    Error, Handling, LogicalId, ResourceStorage, ResourceType, SearchQuery, TenantContext,
};
use fhirstore_sync::{CompositeStorage, SecondaryConfig, SyncConfig};
use fhirstore_testkit::secondary::assert_mirrors;
use serde_json::json;

fn pt() -> ResourceType {
    ResourceType::new("Patient").expect("type")
}

fn patient(id: &str, family: &str) -> serde_json::Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}],
           "text": {"status": "generated",
                    "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{family} chart</div>")}})
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// A scratch directory of this run, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "fhirstore-chaos-{what}-{}",
            fhirstore_testkit::random_tenant().tenant()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `n` updates over `ids` ids, recording each version a write returned; failures are
/// counted, and must be temporary (a retry may help) or a full disk, never anything else.
async fn write_load(
    store: &(dyn ResourceStorage + Sync),
    ctx: &TenantContext,
    prefix: &str,
    n: usize,
    ids: usize,
    acked: &parking_lot::Mutex<BTreeMap<String, u64>>,
    done: &AtomicUsize,
) -> usize {
    let mut failed = 0;
    for i in 0..n {
        let id = format!("{prefix}{}", i % ids);
        let lid = LogicalId::new(&id).expect("id");
        match store
            .update(ctx, pt(), &lid, patient(&id, &format!("Round{i}")), None)
            .await
        {
            Ok(w) => {
                let mut a = acked.lock();
                let v = a.entry(id).or_default();
                *v = (*v).max(w.resource.version.get());
                done.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) if e.is_temporary() || matches!(e, Error::StorageFull(_)) => failed += 1,
            Err(e) => panic!("write {i} failed with a {e:?}"),
        }
    }
    failed
}

/// Every write that returned is there, at its version or later.
async fn assert_acked(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    acked: &BTreeMap<String, u64>,
) {
    for (id, v) in acked {
        let r = store
            .read(ctx, pt(), &LogicalId::new(id).expect("id"))
            .await
            .unwrap_or_else(|e| panic!("{id}, returned at version {v}, is gone: {e}"));
        assert!(
            r.version.get() >= *v,
            "{id}: v{} after v{v} returned",
            r.version
        );
    }
}

/// PostgreSQL restarted (immediate shutdown, as a crash) under two writers: writes meanwhile
/// fail with temporary errors or wait through it, and every one that returned is there after,
/// with the digest table matching the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_load() {
    let Some(bin) = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path().join("bin"))
    else {
        return fhirstore_testkit::service_unavailable("PostgreSQL binaries", "none installed")
            .unwrap_or(());
    };
    let scratch = Scratch::new("pg");
    let data = scratch.0.join("data");
    let as_postgres = |tool: &str| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    };
    if let Err(e) = run(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&scratch.0))
    .and_then(|()| {
        run(as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data))
    }) {
        return fhirstore_testkit::service_unavailable("a PostgreSQL of the test's own", e)
            .unwrap_or(());
    }
    let port = fhirstore_testkit::loopback_port();
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        scratch.0.display()
    );
    let pg_ctl = |action: &[&str]| {
        let mut c = as_postgres("pg_ctl");
        c.arg("-D")
            .arg(&data)
            .args(["-o", &options, "-w"])
            .args(action);
        c.stdout(Stdio::null());
        run(&mut c)
    };
    pg_ctl(&["-l", "/dev/null", "start"]).expect("start PostgreSQL");
    struct Stop<'a>(&'a Path);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            // Stopped by its process id, whatever happened to the test.
            if let Ok(pid) = std::fs::read_to_string(self.0.join("postmaster.pid")) {
                if let Some(pid) = pid.lines().next() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
    }
    let _stop = Stop(&data);

    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let store = fhirstore_sql::PostgresStore::connect(&url, fhirstore_sql::SqlConfig::default())
        .await
        .expect("connect");
    let ctx = fhirstore_testkit::random_tenant();
    let acked = parking_lot::Mutex::new(BTreeMap::new());
    let done = AtomicUsize::new(0);
    let restarted = async {
        // Mid-load: once a fifth of the writes have returned.
        while done.load(Ordering::SeqCst) < 240 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let data = data.clone();
        let options = options.clone();
        let bin = bin.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-m", "immediate", "-l", "/dev/null"])
                .arg("restart")
                .stdout(Stdio::null());
            run(&mut c)
        })
        .await
        .expect("task")?;
        Ok::<_, String>(done.load(Ordering::SeqCst))
    };
    let (a, b, restart) = tokio::join!(
        write_load(&store, &ctx, "a", 600, 30, &acked, &done),
        write_load(&store, &ctx, "b", 600, 30, &acked, &done),
        restarted,
    );
    let at_restart = restart.expect("restart PostgreSQL");
    let total = done.load(Ordering::SeqCst);
    eprintln!(
        "{total} writes returned, {at_restart} by the end of the restart; {} failed",
        a + b
    );
    assert!(
        total > at_restart + 100,
        "writing went on after the restart"
    );
    let acked = acked.into_inner();
    assert!(acked.len() >= 50, "most writes returned: {}", acked.len());
    assert_acked(&store, &ctx, &acked).await;
    assert_eq!(
        store.self_check(ctx.tenant(), pt()).await.expect("check"),
        0,
        "the digest table matches the rows"
    );
    // Writing goes on as before.
    write_load(&store, &ctx, "c", 20, 5, &Default::default(), &done).await;
    store.close().await;
    pg_ctl(&["-m", "immediate", "stop"]).expect("stop PostgreSQL");
}

/// Redis paused (SIGSTOP) under writes, then killed and restarted empty: no read or search
/// ever returns a version older than one a write returned, and after each, Redis catches up
/// to mirror the primary exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_then_killed() {
    let port = fhirstore_testkit::loopback_port();
    let Some(mut server) = fhirstore_testkit::OwnRedis::start(port) else {
        return;
    };
    let scratch = Scratch::new("redis");
    let primary = Arc::new(
        fhirstore_sql::SqliteStore::open(
            scratch.0.join("db.sqlite"),
            fhirstore_sql::SqlConfig::default(),
        )
        .await
        .expect("sqlite"),
    );
    let mut config = fhirstore_redis::RedisConfig::new(server.url());
    config.timeout = Duration::from_millis(300);
    let redis = fhirstore_redis::RedisSecondary::connect(&config)
        .await
        .expect("redis");
    let composite = fhirstore_integration::redis_cache_composite(
        primary.clone(),
        &redis,
        Duration::from_millis(300),
    )
    .await;
    let ctx = fhirstore_testkit::random_tenant();
    let acked = parking_lot::Mutex::new(BTreeMap::new());
    let done = AtomicUsize::new(0);
    write_load(&composite, &ctx, "p", 40, 10, &acked, &done).await;

    // Paused: writes go on (their synchronous apply times out), and reads and searches keep
    // up with what the writes returned.
    signal(server.pid(), "-STOP");
    let paused = Instant::now();
    while paused.elapsed() < Duration::from_millis(1_500) {
        write_load(&composite, &ctx, "p", 10, 10, &acked, &done).await;
        let now = acked.lock().clone();
        for (id, v) in now.iter().take(3) {
            let lid = LogicalId::new(id).expect("id");
            let (r, from) = composite.read_routed(&ctx, pt(), &lid).await.expect("read");
            assert!(r.version.get() >= *v, "{id} v{} from {from}", r.version);
            let q = SearchQuery::parse(Some(pt()), &format!("_id={id}"), Handling::Strict)
                .expect("query");
            let routed = composite
                .search_routed(&ctx, &q, None)
                .await
                .expect("search");
            let found = routed.page.matches.first().map_or(0, |r| r.version.get());
            assert!(found >= *v, "search {id}: v{found} from {}", routed.backend);
        }
    }
    signal(server.pid(), "-CONT");
    caught_up(&composite).await;
    assert_mirrors(&*primary, &redis, std::slice::from_ref(&ctx)).await;

    // Killed and back empty: the secondary is rebuilt while writes go on.
    server.kill();
    write_load(&composite, &ctx, "q", 30, 10, &acked, &done).await;
    let mut server = fhirstore_testkit::OwnRedis::start(port).expect("restart redis");
    write_load(&composite, &ctx, "q", 30, 10, &acked, &done).await;
    caught_up(&composite).await;
    assert_mirrors(&*primary, &redis, std::slice::from_ref(&ctx)).await;
    assert_acked(&composite, &ctx, &acked.into_inner()).await;
    composite.shutdown().await;
    server.kill();
}

/// The tantivy directory deleted under the running index: it starts over empty and is
/// rebuilt while writes go on. Then its files corrupted across a restart: it opens empty,
/// moves the damage aside, and is rebuilt again. Full text answers every write after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tantivy_directory_deleted_then_corrupted() {
    let scratch = Scratch::new("tantivy");
    let dir = scratch.0.join("index");
    let primary = Arc::new(
        fhirstore_sql::SqliteStore::open(
            scratch.0.join("db.sqlite"),
            fhirstore_sql::SqlConfig::default(),
        )
        .await
        .expect("sqlite"),
    );
    let open = || async {
        let index = fhirstore_tantivy::TantivySecondary::open(&dir, Default::default())
            .await
            .expect("index");
        let composite = CompositeStorage::new(
            primary.clone(),
            vec![(
                "tantivy".to_owned(),
                Arc::new(index.clone()) as Arc<dyn Secondary>,
                SecondaryConfig::index(),
            )],
            SyncConfig {
                poll_interval: Duration::from_millis(20),
                ..SyncConfig::default()
            },
        )
        .expect("composite");
        (index, composite)
    };
    let ctx = fhirstore_testkit::random_tenant();
    let acked = parking_lot::Mutex::new(BTreeMap::new());
    let done = AtomicUsize::new(0);
    let (index, composite) = open().await;
    write_load(&composite, &ctx, "t", 60, 30, &acked, &done).await;
    caught_up(&composite).await;
    assert_eq!(full_text_finds_all(&composite, &ctx).await, 30);

    std::fs::remove_dir_all(&dir).expect("delete the index directory");
    write_load(&composite, &ctx, "u", 40, 20, &acked, &done).await;
    caught_up(&composite).await;
    assert_eq!(full_text_finds_all(&composite, &ctx).await, 50);
    assert_mirrors(&*primary, &index, std::slice::from_ref(&ctx)).await;
    assert!(
        dir.join("meta.json").exists(),
        "the index is back on disk, rebuilt"
    );
    composite.shutdown().await;
    drop((index, composite));

    // Garbage over every file the index holds, as a bad disk or a careless copy leaves it.
    for entry in std::fs::read_dir(&dir).expect("index dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::write(&path, b"\x00garbage{").expect("corrupt");
        }
    }
    let (index, composite) = open().await;
    assert!(matches!(
        index.health().await,
        fhirstore_core::secondary::Health::NeedsRebuild(_)
    ));
    write_load(&composite, &ctx, "v", 20, 10, &acked, &done).await;
    caught_up(&composite).await;
    assert_eq!(full_text_finds_all(&composite, &ctx).await, 60);
    assert_mirrors(&*primary, &index, std::slice::from_ref(&ctx)).await;
    assert_acked(&composite, &ctx, &acked.into_inner()).await;
    composite.shutdown().await;
    let aside = std::fs::read_dir(&scratch.0)
        .expect("scratch")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("damaged"));
    assert!(aside, "the damaged index was moved aside, not deleted");
}

type Composite = CompositeStorage;

async fn caught_up(composite: &Composite) {
    fhirstore_integration::caught_up(composite).await;
}

/// How many Patients full text finds, answered by tantivy.
async fn full_text_finds_all(composite: &Composite, ctx: &TenantContext) -> usize {
    let q =
        SearchQuery::parse(Some(pt()), "_text=chart&_count=1000", Handling::Strict).expect("query");
    let routed = composite
        .search_routed(ctx, &q, None)
        .await
        .expect("search");
    assert_eq!(routed.backend, "tantivy");
    routed.page.matches.len()
}

/// SQLite on a filesystem that fills up: writes fail with `StorageFull` (507 at the HTTP
/// edge) and store nothing, everything stored before stays readable and consistent, and
/// writing succeeds again once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_fills_its_disk_then_recovers() {
    let scratch = Scratch::new("full");
    let mnt = scratch.0.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mount point");
    if let Err(e) = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt))
    {
        return fhirstore_testkit::service_unavailable("a tmpfs mount (root)", e).unwrap_or(());
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let store = fhirstore_sql::SqliteStore::open(
        mnt.join("db.sqlite"),
        fhirstore_sql::SqlConfig {
            max_retries: 1,
            ..Default::default()
        },
    )
    .await
    .expect("sqlite");
    let ctx = fhirstore_testkit::random_tenant();
    let mut acked = BTreeMap::new();
    let mut full = None;
    let filler = "x".repeat(4_000);
    let big = |i: usize| {
        json!({"resourceType": "Patient", "id": format!("f{i}"),
            "name": [{"family": format!("Full{i}")}],
            "text": {"status": "generated",
                     "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{filler}</div>")}})
    };
    for i in 0..5_000 {
        let id = format!("f{i}");
        let body = big(i);
        match store
            .update(&ctx, pt(), &LogicalId::new(&id).expect("id"), body, None)
            .await
        {
            Ok(w) => {
                acked.insert(id, w.resource.version.get());
            }
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("the filesystem filled up");
    assert!(
        matches!(&err, Error::StorageFull(m) if m.contains("disk is full")),
        "{err:?}"
    );
    assert!(acked.len() > 20, "{} writes before it filled", acked.len());
    // Still full: the same error again, not a connection left broken by the first.
    let again = store
        .update(
            &ctx,
            pt(),
            &LogicalId::new("f9999").expect("id"),
            big(9_999),
            None,
        )
        .await;
    assert!(matches!(again, Err(Error::StorageFull(_))), "{again:?}");
    assert_acked(&store, &ctx, &acked).await;
    assert_eq!(
        store.count(&ctx, Some(pt())).await.expect("count"),
        acked.len() as u64,
        "a failed write stored nothing"
    );

    run(Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mnt))
    .expect("give the space back");
    for i in 0..20 {
        store
            .create(
                &ctx,
                pt(),
                json!({"resourceType": "Patient", "gender": "other"}),
            )
            .await
            .unwrap_or_else(|e| panic!("write {i} after space returned: {e}"));
    }
    assert_eq!(
        store.count(&ctx, Some(pt())).await.expect("count"),
        acked.len() as u64 + 20
    );
    assert_eq!(
        store.self_check(ctx.tenant(), pt()).await.expect("check"),
        0
    );
    store.close().await;
}
