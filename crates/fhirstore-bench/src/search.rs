//! `search`: FHIR search latency on generated clinical data at two or more sizes.
//!
//! For each size a fresh store is loaded with whole patients from [`crate::generate`] (one
//! transaction per patient) until it holds at least that many resources. Each query shape then
//! runs `--queries` times with varying values; the bench prints p50 and p99 latency per shape
//! and size, and the ratio of p50 at the largest size to p50 at the smallest. The smallest size
//! is the baseline: a search that uses its index well stays near 1 as data grows tenfold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_sql::SqliteStore;

use crate::generate::{self, CONDITIONS, FAMILIES, MEASURES};
use crate::{open_store, Backend, BoxError};
use fhirstore_core::{
    Handling, LogicalId, ResourceStorage, ResourceType, SearchQuery, TenantContext, TenantId,
    WriteOp,
};

/// Arguments of `fhirstore-bench search`.
#[derive(clap::Args)]
pub struct SearchArgs {
    /// Store sizes, in resources (comma-separated); the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Runs of each query shape per size.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Which store to measure.
    #[command(flatten)]
    store: crate::StoreArgs,
    /// Keep each size's SQLite store in this directory (as `search-{size}.sqlite`) instead of a
    /// temporary one, to inspect plans afterwards.
    #[arg(long)]
    keep_in: Option<std::path::PathBuf>,
}

/// A query shape: its label, the type searched, and the query string for run `i` of a store
/// holding `patients` patients.
pub(crate) struct Shape {
    pub(crate) label: &'static str,
    pub(crate) resource_type: &'static str,
    pub(crate) query: fn(i: usize, patients: usize) -> String,
}

fn spread(i: usize, patients: usize) -> usize {
    (i * 7919) % patients.max(1)
}

pub(crate) const SHAPES: [Shape; 14] = [
    Shape {
        label: "token (Condition code, _count=20)",
        resource_type: "Condition",
        query: |i, _| {
            format!(
                "code=http://snomed.info/sct|{}&_count=20",
                CONDITIONS[i % CONDITIONS.len()].0
            )
        },
    },
    Shape {
        label: "string prefix (family, _count=20)",
        resource_type: "Patient",
        query: |i, _| format!("family={}&_count=20", &FAMILIES[i % FAMILIES.len()][..3]),
    },
    Shape {
        label: "date range (one week, _count=20)",
        resource_type: "Observation",
        query: |i, _| {
            let month = 1 + i % 12;
            format!("date=ge2024-{month:02}-01&date=lt2024-{month:02}-08&_count=20")
        },
    },
    Shape {
        label: "chain (subject:Patient.identifier)",
        resource_type: "Observation",
        query: |i, n| {
            format!(
                "subject:Patient.identifier=urn:oid:2.16.840.1.113883.19.5|MRN{:08}&_count=50",
                spread(i, n)
            )
        },
    },
    Shape {
        label: "_include (Encounter + subject)",
        resource_type: "Encounter",
        query: |i, n| {
            format!(
                "subject=Patient/p{}&_include=Encounter:subject",
                spread(i, n)
            )
        },
    },
    Shape {
        label: "_revinclude (Patient + Conditions)",
        resource_type: "Patient",
        query: |i, n| format!("_id=p{}&_revinclude=Condition:subject", spread(i, n)),
    },
    Shape {
        label: "_has (Patient with a Condition)",
        resource_type: "Patient",
        query: |i, _| {
            format!(
                "_has:Condition:subject:code={}&_count=20",
                CONDITIONS[i % CONDITIONS.len()].0
            )
        },
    },
    Shape {
        label: "100-value OR (identifier)",
        resource_type: "Patient",
        query: |i, n| {
            let values: Vec<String> = (0..100)
                .map(|k| {
                    format!(
                        "urn:oid:2.16.840.1.113883.19.5|MRN{:08}",
                        spread(i * 100 + k, n)
                    )
                })
                .collect();
            format!("identifier={}", values.join(","))
        },
    },
    Shape {
        label: "_sort=-date (code, _count=20)",
        resource_type: "Observation",
        query: |i, _| {
            format!(
                "code=http://loinc.org|{}&_sort=-date&_count=20",
                MEASURES[i % MEASURES.len()].0
            )
        },
    },
    Shape {
        label: "_summary=count (common code)",
        resource_type: "Observation",
        query: |_, _| "code=http://loinc.org|8867-4&_summary=count".to_owned(),
    },
    Shape {
        label: "family + gender (_count=20)",
        resource_type: "Patient",
        query: |i, _| {
            format!(
                "family={}&gender={}&_count=20",
                FAMILIES[i % FAMILIES.len()],
                if i % 2 == 0 { "female" } else { "male" }
            )
        },
    },
    Shape {
        label: "gender alone (_count=20)",
        resource_type: "Patient",
        query: |i, _| {
            format!(
                "gender={}&_count=20",
                if i % 2 == 0 { "female" } else { "male" }
            )
        },
    },
    Shape {
        label: "birthdate one year (_count=20)",
        resource_type: "Patient",
        query: |i, _| {
            let y = 1930 + i % 90;
            format!(
                "birthdate=ge{y}-01-01&birthdate=lt{}-01-01&_count=20",
                y + 1
            )
        },
    },
    Shape {
        label: "latest 20 of a code, one patient",
        resource_type: "Observation",
        query: |i, n| {
            format!(
                "subject=Patient/p{}&code=http://loinc.org|{}&_sort=-date&_count=20",
                spread(i, n),
                MEASURES[i % MEASURES.len()].0
            )
        },
    },
];

/// Latencies of one shape at one size.
struct Measured {
    p50: Duration,
    p99: Duration,
    hits: f64,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// What [`load`] wrote.
pub(crate) struct Loaded {
    /// Whole patients written.
    pub(crate) patients: usize,
    /// Resources written.
    pub(crate) resources: usize,
    /// Resources per second.
    pub(crate) rate: f64,
    /// How long the load took.
    pub(crate) took: Duration,
    /// The resources' bytes as NDJSON (one line each): what storage is weighed against.
    pub(crate) input_bytes: u64,
}

/// Loads whole patients until the store holds at least `size` resources.
pub(crate) async fn load(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    size: usize,
    seed: u64,
) -> Result<Loaded, BoxError> {
    let (mut patients, mut resources, mut input_bytes) = (0, 0, 0u64);
    let start = Instant::now();
    for record in generate::records(usize::MAX, seed) {
        if resources >= size {
            break;
        }
        let mut ops = Vec::with_capacity(record.len());
        for r in record {
            input_bytes += serde_json::to_vec(&r)?.len() as u64 + 1;
            let rt = ResourceType::new(r["resourceType"].as_str().unwrap_or_default())?;
            let id = LogicalId::new(r["id"].as_str().unwrap_or_default())?;
            ops.push(WriteOp::Update {
                resource_type: rt,
                id,
                resource: r,
                if_match: None,
            });
        }
        resources += ops.len();
        patients += 1;
        store.transaction(ctx, ops).await?;
    }
    let took = start.elapsed();
    Ok(Loaded {
        patients,
        resources,
        rate: resources as f64 / took.as_secs_f64(),
        took,
        input_bytes,
    })
}

/// Bytes the store takes on disk: the SQLite file with its WAL and shared memory, or the whole
/// PostgreSQL database (so a bench of storage wants a database of its own).
async fn disk_bytes(args: &crate::StoreArgs, sqlite: &std::path::Path) -> Result<u64, BoxError> {
    match args.backend {
        Backend::Sqlite => {
            let mut total = 0;
            for suffix in ["", "-wal", "-shm"] {
                let mut name = sqlite.as_os_str().to_owned();
                name.push(suffix);
                total += std::fs::metadata(&name).map_or(0, |m| m.len());
            }
            Ok(total)
        }
        Backend::Postgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&args.postgres)
                .await?;
            let (n,): (i64,) = sqlx::query_as("SELECT pg_database_size(current_database())")
                .fetch_one(&pool)
                .await?;
            pool.close().await;
            Ok(u64::try_from(n).unwrap_or(0))
        }
    }
}

/// Runs the search bench.
pub async fn run(args: SearchArgs) -> Result<(), BoxError> {
    println!(
        "search: backend={:?} sizes={:?} queries per shape={} seed={} body compression={}",
        args.store.backend, args.sizes, args.queries, args.seed, args.store.body_compression
    );
    let mut results: Vec<Vec<Measured>> = Vec::new();
    // Every size's tenant stays until the end on PostgreSQL, so each size's growth of the
    // database is its own data, not space a purged tenant left for reuse.
    let mut tenants = Vec::new();
    for &size in &args.sizes {
        let dir = tempfile::tempdir()?;
        let file = match &args.keep_in {
            Some(keep) => keep.join(format!("search-{size}.sqlite")),
            None => dir.path().join("bench.sqlite"),
        };
        let store: Arc<dyn ResourceStorage> = match args.store.backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(&file, args.store.config()).await?),
            Backend::Postgres => open_store(&args.store, &dir).await?,
        };
        let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let ctx = TenantContext::full(TenantId::new(&tenant[..30])?);
        tenants.push(ctx.tenant().clone());
        let before = disk_bytes(&args.store, &file).await?;
        let loaded = load(&*store, &ctx, size, args.seed).await?;
        // What `fhirstore import` does after a bulk load.
        let start = Instant::now();
        store.refresh_statistics(&ctx).await?;
        let refreshed = start.elapsed();
        let on_disk = disk_bytes(&args.store, &file).await?.saturating_sub(before);
        println!(
            "\nsize {size}: {} patients, {} resources loaded in {:.1} s, ingest {:.0} resources/s \
             (one transaction per patient); statistics refreshed in {:.1} s",
            loaded.patients,
            loaded.resources,
            loaded.took.as_secs_f64(),
            loaded.rate,
            refreshed.as_secs_f64()
        );
        println!(
            "storage: {:.1} MB on disk for {:.1} MB of NDJSON input, {:.2} bytes per input byte",
            on_disk as f64 / 1e6,
            loaded.input_bytes as f64 / 1e6,
            on_disk as f64 / loaded.input_bytes.max(1) as f64
        );
        let patients = loaded.patients;
        println!(
            "{:<38} {:>10} {:>10} {:>10}",
            "shape", "p50 ms", "p99 ms", "avg hits"
        );
        let mut row = Vec::new();
        for shape in &SHAPES {
            let rt = ResourceType::new(shape.resource_type)?;
            let mut times = Vec::with_capacity(args.queries);
            let mut hits = 0usize;
            for i in 0..args.queries {
                let q =
                    SearchQuery::parse(Some(rt), &(shape.query)(i, patients), Handling::Strict)?;
                let start = Instant::now();
                let page = store.search(&ctx, &q).await?;
                times.push(start.elapsed());
                hits += match page.total {
                    Some(t) if page.matches.is_empty() => t as usize,
                    _ => page.matches.len() + page.included.len(),
                };
            }
            times.sort();
            let m = Measured {
                p50: percentile(&times, 0.5),
                p99: percentile(&times, 0.99),
                hits: hits as f64 / args.queries.max(1) as f64,
            };
            println!(
                "{:<38} {:>10.3} {:>10.3} {:>10.1}",
                shape.label,
                m.p50.as_secs_f64() * 1e3,
                m.p99.as_secs_f64() * 1e3,
                m.hits
            );
            row.push(m);
        }
        results.push(row);
    }
    for tenant in &tenants {
        crate::purge_tenant(&args.store, tenant).await?;
    }
    if let (Some(first), Some(last)) = (results.first(), results.last()) {
        if results.len() > 1 {
            println!(
                "\np50 ratio, size {} to size {} (baseline = the smaller store)",
                args.sizes.last().copied().unwrap_or_default(),
                args.sizes.first().copied().unwrap_or_default()
            );
            for ((shape, a), b) in SHAPES.iter().zip(first).zip(last) {
                println!(
                    "{:<38} {:>10.2}",
                    shape.label,
                    b.p50.as_secs_f64() / a.p50.as_secs_f64().max(1e-9)
                );
            }
        }
    }
    Ok(())
}
