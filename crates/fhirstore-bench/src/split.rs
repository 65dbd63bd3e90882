//! `split`: searches that full text and the primary answer together, beside each part alone,
//! on the same generated data through one `CompositeStorage` (the primary and an
//! asynchronous tantivy index), in one run.
//!
//! Each shape prints p50 and p99 for the combined search, for its full-text part alone
//! (tantivy), and for the rest alone (the primary), with the backends that answered and the
//! size of the id set the index handed over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_core::changelog::Primary;
use fhirstore_core::secondary::Secondary;
use fhirstore_core::{Handling, ResourceType, SearchQuery, TenantContext, TenantId};
use fhirstore_sql::{PostgresStore, SqlConfig, SqliteStore};
use fhirstore_sync::{CompositeStorage, SecondaryConfig, SyncConfig};
use fhirstore_tantivy::{TantivyConfig, TantivySecondary};

use crate::search::percentile;
use crate::{Backend, BoxError};

/// Arguments of `fhirstore-bench split`.
#[derive(clap::Args)]
pub struct SplitArgs {
    /// Resources to load.
    #[arg(long, default_value_t = 100_000)]
    size: usize,
    /// Runs of each search.
    #[arg(long, default_value_t = 50)]
    queries: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The primary (on PostgreSQL, give a database of the bench's own).
    #[command(flatten)]
    store: crate::StoreArgs,
}

/// The query string of run `i`.
type QueryOf<'a> = Box<dyn Fn(usize) -> String + 'a>;

/// One combined search: its full-text part and the rest, each a query string.
struct Shape {
    label: &'static str,
    text: fn(usize) -> String,
    rest: fn(usize, usize) -> String,
}

const WORDS: [&str; 4] = ["glucose", "cholesterol", "heart", "weight"];

const SHAPES: [Shape; 4] = [
    Shape {
        label: "full text + token",
        text: |i| format!("_content={}", WORDS[i % WORDS.len()]),
        rest: |_, _| "status=final&_count=20".to_owned(),
    },
    Shape {
        label: "full text + chain (one patient) + _include",
        text: |i| format!("_content={}", WORDS[i % WORDS.len()]),
        rest: |i, n| {
            format!(
                "subject:Patient.identifier=urn:oid:2.16.840.1.113883.19.5|MRN{:08}\
                 &_include=Observation:subject&_count=20",
                (i * 7919) % n.max(1)
            )
        },
    },
    Shape {
        label: "full text + _sort=-date",
        text: |i| format!("_content={}", WORDS[i % WORDS.len()]),
        rest: |_, _| "_sort=-date&_count=20".to_owned(),
    },
    Shape {
        label: "full text + chain (gender) + _sort=_score",
        text: |i| format!("_content={}", WORDS[i % WORDS.len()]),
        rest: |_, _| "subject:Patient.gender=female&_sort=_score&_count=20".to_owned(),
    },
];

/// p50 and p99 of `runs` searches, with the last answer's backend and route.
async fn measure(
    store: &CompositeStorage,
    ctx: &TenantContext,
    runs: usize,
    query: impl Fn(usize) -> String,
) -> Result<(Duration, Duration, String, String), BoxError> {
    let obs = ResourceType::new("Observation")?;
    let mut times = Vec::with_capacity(runs);
    let (mut backend, mut route) = (String::new(), String::new());
    for i in 0..runs {
        let q = SearchQuery::parse(Some(obs), &query(i), Handling::Strict)?;
        let start = Instant::now();
        let routed = store.search_routed(ctx, &q, None).await?;
        times.push(start.elapsed());
        backend = routed.backend;
        route = routed
            .parts
            .iter()
            .map(|p| format!("{}:{}", p.backend, p.rows))
            .collect::<Vec<_>>()
            .join(" ");
    }
    times.sort();
    Ok((
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        backend,
        route,
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the split bench.
pub async fn run(args: SplitArgs) -> Result<(), BoxError> {
    println!(
        "split: primary={:?} size={} queries={} seed={}",
        args.store.backend, args.size, args.queries, args.seed
    );
    let dir = tempfile::tempdir()?;
    let primary: Arc<dyn Primary> = match args.store.backend {
        Backend::Sqlite => Arc::new(
            SqliteStore::open(dir.path().join("bench.sqlite"), SqlConfig::default()).await?,
        ),
        Backend::Postgres => {
            Arc::new(PostgresStore::connect(&args.store.postgres, SqlConfig::default()).await?)
        }
    };
    let index =
        TantivySecondary::open(&dir.path().join("tantivy"), TantivyConfig::default()).await?;
    let store = CompositeStorage::new(
        primary,
        vec![(
            "tantivy".to_owned(),
            Arc::new(index) as Arc<dyn Secondary>,
            SecondaryConfig::index(),
        )],
        SyncConfig::default(),
    )?;
    let tenant = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let ctx = TenantContext::full(TenantId::new(&tenant[..30])?);
    let start = Instant::now();
    let crate::search::Loaded {
        patients,
        resources,
        rate: ingest,
        ..
    } = crate::search::load(&store, &ctx, args.size, args.seed).await?;
    let caught_up = store.wait_for_sync(Duration::from_secs(3_600)).await?;
    println!(
        "loaded {resources} resources ({patients} patients) at {ingest:.0}/s; the index caught \
         up {:.1} s after the start{}",
        start.elapsed().as_secs_f64(),
        if caught_up { "" } else { " (NOT caught up)" }
    );
    println!(
        "\n{:<44} {:<10} {:>9} {:>9}  {:<16} route (backend:rows)",
        "shape", "part", "p50 ms", "p99 ms", "answered by"
    );
    for shape in &SHAPES {
        let parts: [(&str, QueryOf); 3] = [
            (
                "combined",
                Box::new(|i| format!("{}&{}", (shape.text)(i), (shape.rest)(i, patients))),
            ),
            (
                "full text",
                Box::new(|i| format!("{}&_count=20", (shape.text)(i))),
            ),
            (
                "rest",
                Box::new(|i| (shape.rest)(i, patients).replace("&_sort=_score", "")),
            ),
        ];
        for (part, query) in parts {
            let (p50, p99, backend, route) = measure(&store, &ctx, args.queries, query).await?;
            println!(
                "{:<44} {:<10} {:>9.2} {:>9.2}  {:<16} {route}",
                shape.label,
                part,
                ms(p50),
                ms(p99),
                backend
            );
        }
    }
    Ok(())
}
