//! fhirstore benchmarks. Every scenario prints its throughput beside a baseline measured in the
//! same run, and the ratio between them.
//!
//! `crud`: creates, reads by id and updates through the store, against the same JSON blobs
//! inserted, read and updated by key in a bare two-column table through the same sqlx driver,
//! with the same connection settings.
//!
//! `search`: search latency on generated clinical data at two sizes, the smaller the baseline.
//!
//! `generate`: writes the generated clinical data as NDJSON, for other tools and stores.

mod clinical;
mod digests;
mod generate;
mod http;
mod reconcile;
mod reindex;
mod search;
mod secondary;
mod split;
mod subscriptions;
mod sync;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use fhirstore_core::{LogicalId, ResourceStorage, ResourceType, TenantContext, TenantId};
use fhirstore_sql::{Durability, PostgresStore, SqlConfig, SqliteStore};
use serde_json::{json, Value};

/// The server's stores in `dir` as a user's first run has them: the embedded SQLite file, and
/// the tantivy index as `index_mode` says; no PostgreSQL, no Redis.
pub(crate) fn embedded_settings(
    dir: &std::path::Path,
    index_mode: fhirstore_server::config::ModeArg,
) -> fhirstore_server::config::StoreSettings {
    fhirstore_server::config::StoreSettings {
        data_dir: dir.to_owned(),
        postgres: None,
        redis: None,
        redis_prefix: "fhirstore".to_owned(),
        redis_mode: fhirstore_server::config::ModeArg::Off,
        index_mode,
        search: fhirstore_server::config::SearchBounds::default(),
        memory_cache: fhirstore_server::config::DEFAULT_MEMORY_CACHE,
        body_compression: fhirstore_sql::SqlConfig::default().body_compression,
    }
}

#[derive(Parser)]
#[command(about = "fhirstore benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, read and update throughput against a bare key/blob table.
    Crud(CrudArgs),
    /// The single-task Patient scenario other FHIR stores are measured with: creates, reads by
    /// id, then six search shapes.
    Patients(PatientsArgs),
    /// Search latency (p50, p99) per query shape on generated data at two or more sizes.
    Search(search::SearchArgs),
    /// Write deterministic, realistic clinical data as NDJSON (one resource per line).
    Generate(GenerateArgs),
    /// Reindex throughput for a tenant's own SearchParameter, against the ingest rate.
    Reindex(reindex::ReindexArgs),
    /// Redis and tantivy: apply throughput, search and read latency against the primary.
    Secondaries(secondary::SecondaryArgs),
    /// Full text with what only the primary answers (chains, includes, sorts), split between
    /// tantivy and the primary, beside each part alone.
    Split(split::SplitArgs),
    /// CompositeStorage: writes in each sync mode against the primary alone, asynchronous
    /// lag, catch-up after an outage.
    Sync(sync::SyncArgs),
    /// Subscriptions: notification latency and write throughput with 100 and 1,000 active
    /// rest-hook subscriptions, against the same writes with none.
    Subscriptions(subscriptions::SubscriptionArgs),
    /// Reconciler: detect and repair drift against a naive full comparison.
    Reconcile(reconcile::ReconcileArgs),
    /// The REST server under `wrk` (read, token search, create at several connection counts)
    /// against the same operations on the library in process.
    Http(http::HttpArgs),
    /// What digest maintenance costs writes: the same writes with digests on and off.
    Digests(digests::DigestArgs),
    /// Bulk Data `$export` against paged searches, and `$everything` of one large record.
    Clinical(clinical::ClinicalArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Patients to generate (each with Encounters, Observations, Conditions and
    /// MedicationRequests).
    #[arg(long, default_value_t = 100)]
    patients: usize,
    /// Seed; the same seed and count give the same output.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output file (standard output when absent).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct PatientsArgs {
    /// Patients to create.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Searches of each shape.
    #[arg(long, default_value_t = 1_000)]
    searches: usize,
    /// Which store to measure.
    #[command(flatten)]
    store: crate::StoreArgs,
}

/// The Redis server a bench uses; it works under its own key prefix and deletes it afterwards.
#[derive(clap::Args)]
struct RedisArgs {
    /// Redis URL.
    #[arg(
        long = "redis",
        env = "FHIRSTORE_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    url: String,
}

/// The store a bench runs against.
#[derive(clap::Args)]
struct StoreArgs {
    /// Primary backend to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// PostgreSQL URL (for `--backend postgres`).
    #[arg(
        long,
        env = "FHIRSTORE_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres: String,
    /// How hard stored bodies are deflated, 0 (the JSON text) to 9 (`SqlConfig::body_compression`).
    #[arg(long, default_value_t = SqlConfig::default().body_compression)]
    body_compression: u32,
}

impl StoreArgs {
    /// The store's settings: the defaults, with what these arguments set.
    fn config(&self) -> SqlConfig {
        SqlConfig {
            body_compression: self.body_compression,
            ..SqlConfig::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(clap::Args)]
struct CrudArgs {
    /// Which store to measure.
    #[command(flatten)]
    store: crate::StoreArgs,
    /// Resources per phase.
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// Concurrent tasks issuing requests.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// SQLite durability: full (fsync per commit, the default) or normal.
    #[arg(long, default_value = "full")]
    durability: String,
    /// Schema validation on write: strict (the default) or off.
    #[arg(long, default_value = "strict")]
    validation: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match Cli::parse().command {
        Command::Crud(args) => crud(args).await,
        Command::Patients(args) => patients(args).await,
        Command::Search(args) => search::run(args).await,
        Command::Generate(args) => generate_ndjson(args),
        Command::Reindex(args) => reindex::run(args).await,
        Command::Secondaries(args) => secondary::run(args).await,
        Command::Split(args) => split::run(args).await,
        Command::Sync(args) => sync::run(args).await,
        Command::Subscriptions(args) => subscriptions::run(args).await,
        Command::Reconcile(args) => reconcile::run(args).await,
        Command::Http(args) => http::run(args).await,
        Command::Clinical(args) => clinical::run(args).await,
        Command::Digests(args) => digests::run(args).await,
    }
}

fn generate_ndjson(args: GenerateArgs) -> Result<(), BoxError> {
    use std::io::Write as _;
    let out: Box<dyn std::io::Write> = match &args.out {
        Some(path) => Box::new(std::fs::File::create(path)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = std::io::BufWriter::new(out);
    let mut count = 0usize;
    for record in generate::records(args.patients, args.seed) {
        for r in record {
            serde_json::to_writer(&mut out, &r)?;
            out.write_all(b"\n")?;
            count += 1;
        }
    }
    out.flush()?;
    eprintln!(
        "generated {count} resources for {} patients (seed {})",
        args.patients, args.seed
    );
    Ok(())
}

/// A store for a bench run: a SQLite file in `dir`, or the PostgreSQL database at `postgres`
/// (each run then uses a fresh tenant).
async fn open_store(
    args: &StoreArgs,
    dir: &tempfile::TempDir,
) -> Result<Arc<dyn ResourceStorage>, BoxError> {
    open_store_with(args, dir, args.config()).await
}

/// [`open_store`] with `config`; a second call opens the same database again.
async fn open_store_with(
    args: &StoreArgs,
    dir: &tempfile::TempDir,
    config: SqlConfig,
) -> Result<Arc<dyn ResourceStorage>, BoxError> {
    let postgres = args.postgres.as_str();
    Ok(match args.backend {
        Backend::Sqlite => {
            Arc::new(SqliteStore::open(dir.path().join("bench.sqlite"), config).await?)
        }
        Backend::Postgres => Arc::new(PostgresStore::connect(postgres, config).await?),
    })
}

/// The store of [`open_store_with`] as a primary, for a `CompositeStorage` in front of it; on
/// SQLite a second handle on the same file, as another process would have.
async fn open_primary(
    args: &StoreArgs,
    dir: &tempfile::TempDir,
) -> Result<Arc<dyn fhirstore_core::changelog::Primary>, BoxError> {
    let config = args.config();
    Ok(match args.backend {
        Backend::Sqlite => {
            Arc::new(SqliteStore::open(dir.path().join("bench.sqlite"), config).await?)
        }
        Backend::Postgres => Arc::new(PostgresStore::connect(&args.postgres, config).await?),
    })
}

/// Deletes a bench tenant's rows from a PostgreSQL store, so that runs against a shared
/// database leave nothing behind: one large leftover tenant skews the planner's statistics for
/// every other tenant. A SQLite bench store is a temporary file and goes with its directory.
async fn purge_tenant(args: &StoreArgs, tenant: &TenantId) -> Result<(), BoxError> {
    if args.backend != Backend::Postgres {
        return Ok(());
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.postgres)
        .await?;
    for table in [
        "resources",
        "resource_versions",
        "search_token",
        "search_string",
        "search_date",
        "search_quantity",
        "search_reference",
        "search_uri",
        "search_composite",
        "outbox",
        "digests",
        "search_parameters",
        "search_parameter_generation",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE tenant = $1"))
            .bind(tenant.as_str())
            .execute(&pool)
            .await?;
    }
    sqlx::query("ANALYZE").execute(&pool).await?;
    Ok(())
}

/// A realistic Patient of about 1 KB, deterministic in `i`.
fn patient(i: usize) -> Value {
    let families = [
        "Smith", "Jones", "García", "Nguyen", "Müller", "Okafor", "Rossi", "Kim",
    ];
    let given = ["Ana", "Ben", "Chloé", "Dev", "Eun", "Femi", "Gus", "Hana"];
    json!({
        "resourceType": "Patient",
        "identifier": [
            {"use": "usual", "system": "urn:oid:1.2.36.146.595.217.0.1", "value": format!("MRN{i:08}"),
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": format!("{:09}", i * 7919 % 1_000_000_000)}
        ],
        "active": true,
        "name": [{"use": "official", "family": families[i % families.len()],
                  "given": [given[i % given.len()], given[(i / 8) % given.len()]]}],
        "telecom": [{"system": "phone", "value": format!("+1 555 {:04} {:04}", i % 10_000, (i / 7) % 10_000), "use": "home"},
                    {"system": "email", "value": format!("patient{i}@example.org")}],
        "gender": if i % 2 == 0 { "female" } else { "male" },
        "birthDate": format!("{:04}-{:02}-{:02}", 1930 + i % 90, 1 + i % 12, 1 + i % 28),
        "address": [{"use": "home", "line": [format!("{} Main Street", 1 + i % 999)],
                     "city": "Springfield", "state": "IL", "postalCode": format!("{:05}", 60000 + i % 999),
                     "country": "US"}],
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]},
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en-US"}]}, "preferred": true}]
    })
}

/// Runs `op(i)` for i in 0..n over `concurrency` tasks; returns operations per second.
async fn timed<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<f64, BoxError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                op(i).await?;
                i += concurrency;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / start.elapsed().max(Duration::from_micros(1)).as_secs_f64())
}

/// The bare key/blob table: the cheapest way to store and fetch the same bytes.
enum Baseline {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Baseline {
    async fn insert(&self, key: &str, body: &str) -> Result<(), BoxError> {
        let sql = "INSERT INTO bench_blobs (k, body) VALUES ($1, $2)";
        match self {
            Baseline::Sqlite(p) => sqlx::query(sql).bind(key).bind(body).execute(p).await?,
            Baseline::Postgres(p) => {
                sqlx::query(sql).bind(key).bind(body).execute(p).await?;
                return Ok(());
            }
        };
        Ok(())
    }

    async fn update(&self, key: &str, body: &str) -> Result<(), BoxError> {
        let sql = "UPDATE bench_blobs SET body = $2 WHERE k = $1";
        match self {
            Baseline::Sqlite(p) => {
                sqlx::query(sql).bind(key).bind(body).execute(p).await?;
            }
            Baseline::Postgres(p) => {
                sqlx::query(sql).bind(key).bind(body).execute(p).await?;
            }
        }
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<String, BoxError> {
        let sql = "SELECT body FROM bench_blobs WHERE k = $1";
        Ok(match self {
            Baseline::Sqlite(p) => sqlx::query_scalar(sql).bind(key).fetch_one(p).await?,
            Baseline::Postgres(p) => sqlx::query_scalar(sql).bind(key).fetch_one(p).await?,
        })
    }
}

async fn crud(args: CrudArgs) -> Result<(), BoxError> {
    let durability = match args.durability.as_str() {
        "full" => Durability::Full,
        "normal" => Durability::Normal,
        other => return Err(format!("--durability {other}: expected full or normal").into()),
    };
    let validation = match args.validation.as_str() {
        "strict" => fhirstore_core::validate::Validation::Strict,
        "off" => fhirstore_core::validate::Validation::Off,
        other => return Err(format!("--validation {other}: expected strict or off").into()),
    };
    let config = SqlConfig {
        durability,
        validation,
        max_connections: (args.concurrency as u32).max(4),
        ..SqlConfig::default()
    };
    let dir = tempfile::tempdir()?;
    let (store, baseline): (Arc<dyn ResourceStorage>, Baseline) = match args.store.backend {
        Backend::Sqlite => {
            let store = SqliteStore::open(dir.path().join("store.sqlite"), config.clone()).await?;
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.path().join("baseline.sqlite"))
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(match durability {
                    Durability::Full => sqlx::sqlite::SqliteSynchronous::Full,
                    Durability::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
                });
            // One connection, like the store's writer: the baseline gets the same concurrency.
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(1)
                .connect_with(opts)
                .await?;
            sqlx::query("CREATE TABLE bench_blobs (k TEXT PRIMARY KEY, body TEXT NOT NULL)")
                .execute(&pool)
                .await?;
            (Arc::new(store), Baseline::Sqlite(pool))
        }
        Backend::Postgres => {
            let store = PostgresStore::connect(&args.store.postgres, config.clone()).await?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(config.max_connections)
                .connect(&args.store.postgres)
                .await?;
            sqlx::query("DROP TABLE IF EXISTS bench_blobs")
                .execute(&pool)
                .await?;
            sqlx::query("CREATE TABLE bench_blobs (k TEXT PRIMARY KEY, body TEXT NOT NULL)")
                .execute(&pool)
                .await?;
            (Arc::new(store), Baseline::Postgres(pool))
        }
    };
    let baseline = Arc::new(baseline);
    let n = args.n;
    let c = args.concurrency;
    let bodies: Arc<Vec<Value>> = Arc::new((0..n).map(patient).collect());
    let texts: Arc<Vec<String>> = Arc::new(bodies.iter().map(|b| b.to_string()).collect());
    let avg_bytes = texts.iter().map(String::len).sum::<usize>() / n.max(1);
    let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let ctx = Arc::new(TenantContext::full(TenantId::new(&tenant[..30])?));
    let pt = ResourceType::new("Patient")?;

    println!(
        "crud: backend={:?} n={n} concurrency={c} durability={} validation={} avg body={avg_bytes} B",
        args.store.backend, args.durability, args.validation
    );

    // Baseline first, then the store; each phase over the same n blobs.
    let b = baseline.clone();
    let t = texts.clone();
    let base_insert = timed(n, c, move |i| {
        let (b, t) = (b.clone(), t.clone());
        async move { b.insert(&format!("k{i}"), &t[i]).await }
    })
    .await?;

    let ids: Arc<std::sync::Mutex<Vec<Option<LogicalId>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; n]));
    let (s, bd, ctx2, ids2) = (store.clone(), bodies.clone(), ctx.clone(), ids.clone());
    let create = timed(n, c, move |i| {
        let (s, bd, ctx, ids) = (s.clone(), bd.clone(), ctx2.clone(), ids2.clone());
        async move {
            let w = s.create(&ctx, pt, bd[i].clone()).await?;
            if let Ok(mut g) = ids.lock() {
                g[i] = Some(w.resource.key.id);
            }
            Ok(())
        }
    })
    .await?;
    let ids: Arc<Vec<LogicalId>> = Arc::new(
        ids.lock()
            .map_err(|_| "id list poisoned")?
            .iter()
            .flatten()
            .cloned()
            .collect(),
    );

    let b = baseline.clone();
    let base_read = timed(n, c, move |i| {
        let b = b.clone();
        async move { b.read(&format!("k{i}")).await.map(|_| ()) }
    })
    .await?;
    let (s, ctx2, ids2) = (store.clone(), ctx.clone(), ids.clone());
    let read = timed(n, c, move |i| {
        let (s, ctx, ids) = (s.clone(), ctx2.clone(), ids2.clone());
        async move {
            s.read(&ctx, pt, &ids[i]).await?;
            Ok(())
        }
    })
    .await?;

    let (b, t) = (baseline.clone(), texts.clone());
    let base_update = timed(n, c, move |i| {
        let (b, t) = (b.clone(), t.clone());
        async move { b.update(&format!("k{i}"), &t[(i + 1) % t.len()]).await }
    })
    .await?;
    let (s, bd, ctx2, ids2) = (store.clone(), bodies.clone(), ctx.clone(), ids.clone());
    let update = timed(n, c, move |i| {
        let (s, bd, ctx, ids) = (s.clone(), bd.clone(), ctx2.clone(), ids2.clone());
        async move {
            let mut body = bd[(i + 1) % bd.len()].clone();
            body["id"] = json!(ids[i].as_str());
            s.update(&ctx, pt, &ids[i], body, None).await?;
            Ok(())
        }
    })
    .await?;

    println!(
        "{:<8} {:>14} {:>14} {:>8}",
        "op", "fhirstore/s", "baseline/s", "ratio"
    );
    for (name, ours, base) in [
        ("create", create, base_insert),
        ("read", read, base_read),
        ("update", update, base_update),
    ] {
        println!("{name:<8} {ours:>14.0} {base:>14.0} {:>8.2}", ours / base);
    }
    if let Baseline::Postgres(p) = &*baseline {
        sqlx::query("DROP TABLE IF EXISTS bench_blobs")
            .execute(p)
            .await?;
    }
    Ok(())
}

/// 100 family names, so each is shared by about n/100 patients.
fn family_name(i: usize) -> String {
    const STEMS: [&str; 10] = [
        "Smith", "Jones", "Garcia", "Nguyen", "Muller", "Okafor", "Rossi", "Kim", "Silva", "Novak",
    ];
    format!(
        "{}{}",
        STEMS[i % 10],
        ["", "son", "er", "man", "ski", "ez", "ini", "berg", "ov", "ley"][(i / 10) % 10]
    )
}

fn scenario_patient(i: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:bench:mrn", "value": format!("MRN{i:08}")}],
        "active": true,
        "name": [{"family": family_name(i % 100), "given": [format!("Given{}", i % 997)]}],
        "gender": if i % 2 == 0 { "female" } else { "male" },
        "birthDate": format!("{:04}-{:02}-{:02}", 1930 + (i * 7) % 90, 1 + (i * 5) % 12, 1 + (i * 3) % 28),
    })
}

async fn patients(args: PatientsArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let store = open_store(&args.store, &dir).await?;
    let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let ctx = TenantContext::full(TenantId::new(&tenant[..30])?);
    let pt = ResourceType::new("Patient")?;
    let n = args.n;
    println!(
        "patients: backend={:?} n={n} searches per shape={}",
        args.store.backend, args.searches
    );
    let mut ids = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        ids.push(
            store
                .create(&ctx, pt, scenario_patient(i))
                .await?
                .resource
                .key
                .id,
        );
    }
    let create = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for id in &ids {
        store.read(&ctx, pt, id).await?;
    }
    let read = n as f64 / start.elapsed().as_secs_f64();
    // The same reads through the server's stack with its in-process cache (the default size),
    // once to fill it and once more from it.
    let cached = fhirstore_sync::CompositeStorage::new(
        open_primary(&args.store, &dir).await?,
        Vec::new(),
        fhirstore_sync::SyncConfig {
            memory_cache_bytes: fhirstore_server::config::DEFAULT_MEMORY_CACHE,
            ..Default::default()
        },
    )?;
    let mut cached_rates = Vec::new();
    for _ in 0..2 {
        let start = Instant::now();
        for id in &ids {
            cached.read(&ctx, pt, id).await?;
        }
        cached_rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    let hits = cached.memory_cache_stats().map_or(0, |s| s.hits);
    cached.shutdown().await;
    println!("{:<34} {:>10} {:>10}", "operation", "ops/s", "avg hits");
    println!("{:<34} {create:>10.0} {:>10}", "create (sequential)", "-");
    println!("{:<34} {read:>10.0} {:>10}", "read by id", "-");
    println!(
        "{:<34} {:>10.0} {:>10}",
        "read by id, memory cache (filling)", cached_rates[0], "-"
    );
    println!(
        "{:<34} {:>10.0} {:>10}",
        "read by id, memory cache (warm)",
        cached_rates[1],
        format!("{hits} hit")
    );
    println!(
        "{:<34} {:>10.2}",
        "  warm cache / primary read",
        cached_rates[1] / read
    );
    type Shape = (&'static str, Box<dyn Fn(usize) -> String>);
    let ids2 = ids.clone();
    let shapes: Vec<Shape> = vec![
        (
            "identifier=system|value (1 hit)",
            Box::new(move |i| format!("identifier=urn:bench:mrn|MRN{:08}", (i * 7919) % n)),
        ),
        (
            "_id (1 hit)",
            Box::new(move |i| format!("_id={}", ids2[(i * 7919) % ids2.len()])),
        ),
        (
            "family (~n/100 hits, _count=20)",
            Box::new(|i| format!("family={}&_count=20", family_name(i % 100))),
        ),
        (
            "gender (~n/2 hits, _count=20)",
            Box::new(|i| {
                format!(
                    "gender={}&_count=20",
                    if i % 2 == 0 { "female" } else { "male" }
                )
            }),
        ),
        (
            "birthdate one year (_count=20)",
            Box::new(|i| {
                let y = 1930 + i % 90;
                format!(
                    "birthdate=ge{y}-01-01&birthdate=lt{}-01-01&_count=20",
                    y + 1
                )
            }),
        ),
        (
            "family + gender (_count=20)",
            Box::new(|i| {
                format!(
                    "family={}&gender={}&_count=20",
                    family_name(i % 100),
                    if i % 2 == 0 { "female" } else { "male" }
                )
            }),
        ),
        (
            "_sort=-birthdate (_count=20)",
            Box::new(|_| "_sort=-birthdate&_count=20".to_owned()),
        ),
        (
            "gender, _sort=birthdate (_count=20)",
            Box::new(|i| {
                format!(
                    "gender={}&_sort=birthdate&_count=20",
                    if i % 2 == 0 { "female" } else { "male" }
                )
            }),
        ),
        (
            "family, _sort=-birthdate (_count=20)",
            Box::new(|i| format!("family={}&_sort=-birthdate&_count=20", family_name(i % 100))),
        ),
    ];
    // The same data through the page strategies side by side: the store's choice from the
    // criteria's counts, every page walking its order, and the smallest set always driving
    // (for one criterion, the plan before strategies, plus the count).
    let modes = [
        ("chosen", SqlConfig::default()),
        (
            "walk",
            SqlConfig {
                selective_below: 0,
                ..SqlConfig::default()
            },
        ),
        (
            "drive",
            SqlConfig {
                selective_below: u32::MAX,
                ..SqlConfig::default()
            },
        ),
    ];
    let mut stores = Vec::with_capacity(modes.len());
    for (_, config) in &modes {
        stores.push(open_store_with(&args.store, &dir, config.clone()).await?);
    }
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "search (searches/s)", "chosen", "walk", "drive", "avg hits"
    );
    for (label, make) in shapes {
        let mut rates = Vec::with_capacity(stores.len());
        let mut hits = 0usize;
        for store in &stores {
            hits = 0;
            let start = Instant::now();
            for i in 0..args.searches {
                let q = fhirstore_core::SearchQuery::parse(
                    Some(pt),
                    &make(i),
                    fhirstore_core::Handling::Strict,
                )?;
                hits += store.search(&ctx, &q).await?.matches.len();
            }
            rates.push(args.searches as f64 / start.elapsed().as_secs_f64());
        }
        println!(
            "{label:<34} {:>10.0} {:>10.0} {:>10.0} {:>10.1}",
            rates[0],
            rates[1],
            rates[2],
            hits as f64 / args.searches.max(1) as f64
        );
    }
    Ok(())
}
