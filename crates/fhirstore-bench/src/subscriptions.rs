//! `subscriptions`: notification latency and the write cost of active subscriptions.
//!
//! For each count of active rest-hook subscriptions (0 is the baseline): a fresh store, the
//! server's subscription engine running in process, a receiver on loopback, and `--writes`
//! Observations created one at a time as fast as the primary takes them. Each write matches
//! exactly one subscription (its code picks one). Printed: write throughput beside the
//! baseline's, and the latency from a write returning to its notification arriving (p50, p99).
//!
//! On PostgreSQL (`--backend postgres`), each count runs in a database of its own, created and
//! dropped by the bench.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use fhirstore_core::{ResourceType, TenantContext, TenantId};
use fhirstore_server::config::ServerSettings;
use fhirstore_server::subscriptions::Settings;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::search::percentile;
use crate::{Backend, BoxError, StoreArgs};

/// Arguments of `fhirstore-bench subscriptions`.
#[derive(clap::Args)]
pub struct SubscriptionArgs {
    /// Writes per measurement.
    #[arg(long, default_value_t = 2_000)]
    writes: usize,
    /// Counts of active subscriptions to measure (0, the baseline, is always measured first).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    subscriptions: Vec<usize>,
    /// The store.
    #[command(flatten)]
    store: StoreArgs,
}

/// Arrival times by the focus's Observation id.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn hook(State(arrivals): State<Arrivals>, body: axum::body::Bytes) -> &'static str {
    let at = Instant::now();
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        let focus = v["entry"][1]["fullUrl"].as_str().unwrap_or("");
        if let Some(id) = focus.rsplit('/').next() {
            arrivals.lock().await.insert(id.to_owned(), at);
        }
    }
    "ok"
}

/// A database of the bench's own on the server `admin` names, dropped by [`drop_database`].
async fn own_database(admin: &str) -> Result<(String, String), BoxError> {
    use sqlx::Connection as _;
    let name = format!("fhirstore_bench_subs_{}", uuid::Uuid::now_v7().simple());
    let mut c = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await?;
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    Ok((format!("{base}/{name}"), name))
}

async fn drop_database(admin: &str, name: &str) -> Result<(), BoxError> {
    use sqlx::Connection as _;
    let mut c = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut c)
        .await?;
    Ok(())
}

struct Run {
    writes_per_sec: f64,
    latency: Option<(Duration, Duration)>,
}

async fn measure(args: &SubscriptionArgs, subs: usize) -> Result<Run, BoxError> {
    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let receiver = tokio::spawn({
        let app = axum::Router::new()
            .route("/hook/{n}", post(hook))
            .with_state(arrivals.clone());
        async move {
            let _ = axum::serve(listener, app).await;
        }
    });
    let dir = tempfile::tempdir()?;
    let mut stores = crate::embedded_settings(dir.path(), fhirstore_server::config::ModeArg::Async);
    let db = match args.store.backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let (url, name) = own_database(&args.store.postgres).await?;
            stores.postgres = Some(url);
            Some(name)
        }
    };
    let result = async {
        let store = fhirstore_server::deploy::open(&stores).await?;
        let settings = ServerSettings {
            subscriptions: Settings {
                endpoints: vec![format!("http://127.0.0.1:{port}/")],
                concurrency: 32,
                poll: Duration::from_millis(20),
                ..Settings::default()
            },
            ..ServerSettings::default()
        };
        let app = fhirstore_server::App::new(store.clone(), settings);
        let ctx = TenantContext::full(TenantId::new("bench")?);
        let storage = store.storage();
        let sub_rt = ResourceType::new("Subscription")?;
        for k in 0..subs {
            storage
                .create(
                    &ctx,
                    sub_rt,
                    json!({"resourceType": "Subscription", "status": "active", "reason": "bench",
                        "criteria": format!("Observation?code=urn:bench|c{k}"),
                        "channel": {"type": "rest-hook",
                            "endpoint": format!("http://127.0.0.1:{port}/hook/{k}"),
                            "payload": "application/fhir+json",
                            "_payload": {"extension": [{
                                "url": fhirstore_core::subscription::PAYLOAD_CONTENT_URL,
                                "valueCode": "id-only"}]}}}),
                )
                .await?;
        }
        let engine = app.subscriptions.clone();
        let loops = engine.start().await;
        // `start` has recorded the stored subscriptions before it returns: every write from
        // here on is matched against them.
        let obs = ResourceType::new("Observation")?;
        let mut written: HashMap<String, Instant> = HashMap::with_capacity(args.writes);
        let start = Instant::now();
        for i in 0..args.writes {
            let code = format!("c{}", i % subs.max(1));
            let w = storage
                .create(
                    &ctx,
                    obs,
                    json!({"resourceType": "Observation", "status": "final",
                        "code": {"coding": [{"system": "urn:bench", "code": code}]},
                        "valueQuantity": {"value": i}}),
                )
                .await?;
            engine.wake();
            written.insert(w.resource.key.id.as_str().to_owned(), Instant::now());
        }
        let writes_per_sec = args.writes as f64 / start.elapsed().as_secs_f64();
        let latency = if subs == 0 {
            None
        } else {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                if arrivals.lock().await.len() >= args.writes {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("not every notification arrived within 10 minutes".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let got = arrivals.lock().await;
            let mut lat: Vec<Duration> = written
                .iter()
                .filter_map(|(id, w)| got.get(id).map(|a| a.saturating_duration_since(*w)))
                .collect();
            lat.sort();
            Some((percentile(&lat, 0.50), percentile(&lat, 0.99)))
        };
        engine.stop();
        for t in loops {
            let _ = t.await;
        }
        store.composite().shutdown().await;
        Ok::<_, BoxError>(Run {
            writes_per_sec,
            latency,
        })
    }
    .await;
    receiver.abort();
    if let Some(name) = db {
        drop_database(&args.store.postgres, &name).await?;
    }
    result
}

/// Runs the bench and prints one line per subscription count.
pub async fn run(args: SubscriptionArgs) -> Result<(), BoxError> {
    println!(
        "subscriptions on {:?}: {} single-task creates per run, each matching one subscription",
        args.store.backend, args.writes
    );
    let base = measure(&args, 0).await?;
    println!(
        "  {:>5} subscriptions: {:>8.0} writes/s (baseline)",
        0, base.writes_per_sec
    );
    for &k in &args.subscriptions {
        let r = measure(&args, k).await?;
        let (p50, p99) = r.latency.unwrap_or_default();
        println!(
            "  {:>5} subscriptions: {:>8.0} writes/s ({:.2}x baseline); notification latency \
             p50 {:.1} ms, p99 {:.1} ms",
            k,
            r.writes_per_sec,
            r.writes_per_sec / base.writes_per_sec,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
