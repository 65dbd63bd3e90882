//! `http`: the REST server on loopback under `wrk`, beside the same operations called on the
//! library in process with the same concurrency. The ratio is what the HTTP layer costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirstore_core::{
    Handling, LogicalId, ResourceType, SearchQuery, TenantContext, TenantId, WriteOp,
};
use fhirstore_server::config::{ModeArg, ServerSettings};
use fhirstore_server::deploy::{self, Deployment};
use serde_json::json;

use crate::generate::Rng;
use crate::search::percentile;
use crate::BoxError;

/// The `http` arguments.
#[derive(clap::Args)]
pub struct HttpArgs {
    /// Patients loaded before measuring.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent connections (HTTP) and tasks (library).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    connections: Vec<usize>,
    /// Bytes of the server's in-process read cache (`0`: off), as `--memory-cache` sets it.
    #[arg(long, default_value_t = fhirstore_server::config::DEFAULT_MEMORY_CACHE)]
    memory_cache: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Create,
    Search,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read by id",
            Op::Create => "create",
            Op::Search => "token search",
        }
    }

    fn lua(self, n: usize) -> String {
        match self {
            Op::Read => format!(
                "math.randomseed(7)\nrequest = function()\n  return wrk.format('GET', '/fhir/bench/Patient/p' .. math.random(0, {}))\nend\n",
                n - 1
            ),
            Op::Create => "wrk.method = 'POST'\nwrk.path = '/fhir/bench/Patient'\nwrk.headers['Content-Type'] = 'application/fhir+json'\nwrk.body = '{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"Bench\"}]}'\n".to_owned(),
            Op::Search => format!(
                "math.randomseed(7)\nrequest = function()\n  return wrk.format('GET', '/fhir/bench/Patient?identifier=urn:bench%7C' .. math.random(0, {}))\nend\n",
                n - 1
            ),
        }
    }
}

/// Throughput and latency of one run.
struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn wrk(op: Op, n: usize, connections: usize, seconds: u64, port: u16) -> Result<Figures, BoxError> {
    let script = tempfile::Builder::new().suffix(".lua").tempfile()?;
    std::fs::write(script.path(), op.lua(n))?;
    let out = std::process::Command::new("wrk")
        .arg(format!("-t{}", connections.min(2)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script.path())
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .map_err(|e| format!("running wrk (apt install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        return Err(format!("wrk: {text}{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
            .ok_or_else(|| format!("wrk printed no {prefix:?}: {text}"))
    };
    Ok(Figures {
        per_sec: field("Requests/sec:")?.parse()?,
        p50: parse_duration(&field("50%")?).ok_or("bad p50")?,
        p99: parse_duration(&field("99%")?).ok_or("bad p99")?,
    })
}

/// The same operation on the library, from `tasks` tasks for `seconds`.
async fn library(
    store: &Arc<Deployment>,
    op: Op,
    n: usize,
    tasks: usize,
    seconds: u64,
) -> Result<Figures, BoxError> {
    let ctx = TenantContext::full(TenantId::new("bench")?);
    let patient = ResourceType::new("Patient")?;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let ctx = ctx.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = Rng::new(t as u64 + 1);
            let mut lat = Vec::new();
            while Instant::now() < end {
                let i = rng.below(n);
                let began = Instant::now();
                match op {
                    Op::Read => {
                        store
                            .storage()
                            .read(&ctx, patient, &LogicalId::new(format!("p{i}"))?)
                            .await?;
                    }
                    Op::Create => {
                        store
                            .storage()
                            .create(
                                &ctx,
                                patient,
                                json!({"resourceType": "Patient", "name": [{"family": "Bench"}]}),
                            )
                            .await?;
                    }
                    Op::Search => {
                        let q = SearchQuery::parse(
                            Some(patient),
                            &format!("identifier=urn:bench%7C{i}"),
                            Handling::Lenient,
                        )?;
                        store.composite().search_routed(&ctx, &q, None).await?;
                    }
                }
                lat.push(began.elapsed());
            }
            Ok::<_, fhirstore_core::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    let took = start.elapsed().as_secs_f64();
    all.sort();
    Ok(Figures {
        per_sec: all.len() as f64 / took,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
    })
}

/// Runs the benchmark.
pub async fn run(args: HttpArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let settings = fhirstore_server::config::StoreSettings {
        memory_cache: args.memory_cache,
        ..crate::embedded_settings(dir.path(), ModeArg::Async)
    };
    let store = deploy::open(&settings).await?;
    let ctx = TenantContext::full(TenantId::new("bench")?);
    let patient = ResourceType::new("Patient")?;
    for chunk in (0..args.n).collect::<Vec<_>>().chunks(500) {
        let ops = chunk
            .iter()
            .map(|i| {
                Ok(WriteOp::Update {
                    resource_type: patient,
                    id: LogicalId::new(format!("p{i}"))?,
                    resource: json!({"resourceType": "Patient", "id": format!("p{i}"),
                        "identifier": [{"system": "urn:bench", "value": i.to_string()}],
                        "name": [{"family": format!("Family{}", i % 997)}]}),
                    if_match: None,
                })
            })
            .collect::<fhirstore_core::Result<Vec<_>>>()?;
        store.storage().transaction(&ctx, ops).await?;
    }
    store
        .composite()
        .wait_for_sync(Duration::from_secs(300))
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = fhirstore_server::App::new(store.clone(), ServerSettings::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fhirstore_server::serve_router(
        store.clone(),
        fhirstore_server::router(app),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    println!(
        "http: {} patients on SQLite + tantivy, {}s per run, wrk on loopback against the same \
         operations on the library in process",
        args.n, args.seconds
    );
    println!(
        "{:<13} {:>5} | {:>10} {:>9} {:>9} | {:>10} {:>9} {:>9} | {:>6}",
        "operation", "conns", "http req/s", "p50", "p99", "lib ops/s", "p50", "p99", "ratio"
    );
    for op in [Op::Read, Op::Search, Op::Create] {
        for &c in &args.connections {
            let (n, secs) = (args.n, args.seconds);
            let http = tokio::task::spawn_blocking(move || wrk(op, n, c, secs, port)).await??;
            let lib = library(&store, op, args.n, c, args.seconds).await?;
            println!(
                "{:<13} {:>5} | {:>10.0} {:>9.2?} {:>9.2?} | {:>10.0} {:>9.2?} {:>9.2?} | {:>6.2}",
                op.name(),
                c,
                http.per_sec,
                http.p50,
                http.p99,
                lib.per_sec,
                lib.p50,
                lib.p99,
                http.per_sec / lib.per_sec
            );
        }
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
