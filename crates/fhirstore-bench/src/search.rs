//! `search`: FHIR search latency on generated clinical data at two or more sizes.
//!
//! For each size a fresh store is loaded with whole patients from [`crate::generate`] (one
//! transaction per patient) until it holds at least that many resources. Each query shape then
//! runs `--queries` times with varying values; the bench prints p50 and p99 latency per shape
//! and size, and the ratio of p50 at the largest size to p50 at the smallest. The smallest size
//! is the baseline: a search that uses its index well stays near 1 as data grows tenfold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_sql::{SqlConfig, SqliteStore};

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

pub(crate) const SHAPES: [Shape; 10] = [
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

/// Loads whole patients until the store holds at least `size` resources; returns the patient
/// count, the resource count and the ingest rate.
pub(crate) async fn load(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    size: usize,
    seed: u64,
) -> Result<(usize, usize, f64), BoxError> {
    let (mut patients, mut resources) = (0, 0);
    let start = Instant::now();
    for record in generate::records(usize::MAX, seed) {
        if resources >= size {
            break;
        }
        let mut ops = Vec::with_capacity(record.len());
        for r in record {
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
    let rate = resources as f64 / start.elapsed().as_secs_f64();
    Ok((patients, resources, rate))
}

/// Runs the search bench.
pub async fn run(args: SearchArgs) -> Result<(), BoxError> {
    println!(
        "search: backend={:?} sizes={:?} queries per shape={} seed={}",
        args.store.backend, args.sizes, args.queries, args.seed
    );
    let mut results: Vec<Vec<Measured>> = Vec::new();
    for &size in &args.sizes {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn ResourceStorage> = match (&args.keep_in, args.store.backend) {
            (Some(keep), Backend::Sqlite) => Arc::new(
                SqliteStore::open(
                    keep.join(format!("search-{size}.sqlite")),
                    SqlConfig::default(),
                )
                .await?,
            ),
            _ => open_store(&args.store, &dir).await?,
        };
        let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let ctx = TenantContext::full(TenantId::new(&tenant[..30])?);
        let (patients, resources, rate) = load(&*store, &ctx, size, args.seed).await?;
        println!(
            "\nsize {size}: {patients} patients, {resources} resources, ingest {rate:.0} resources/s \
             (one transaction per patient)"
        );
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
        crate::purge_tenant(&args.store, ctx.tenant()).await?;
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
