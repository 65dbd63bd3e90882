//! `clinical`: Bulk Data `$export` and `$everything` through the REST server in process.
//!
//! A fresh SQLite store is loaded with generated patients until it holds `--n` resources.
//! Then, each beside its baseline measured in the same run:
//! - `$export` of the whole tenant (kick-off, polling, every file downloaded and its lines
//!   counted), against paging through the same resources with a plain search of each type
//!   (`_count=1000`): resources/s, and the peak growth of the process's resident memory;
//! - `Patient/[id]/$everything` of one patient with `--record` resources, every page to the
//!   last, against paging through a plain search of that patient's Observations.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fhirstore_core::{LogicalId, ResourceType, TenantContext, TenantId, WriteOp};
use fhirstore_server::config::{ModeArg, ServerSettings};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::{generate, BoxError};

/// Arguments of `fhirstore-bench clinical`.
#[derive(clap::Args)]
pub struct ClinicalArgs {
    /// Resources to load (whole generated patients, until at least this many).
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Resources in the record `$everything` reads.
    #[arg(long, default_value_t = 5_000)]
    record: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// The process's resident memory now, in bytes (Linux), or 0.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples resident memory while a phase runs; `stop` returns its peak growth.
struct PeakRss {
    start: u64,
    peak: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
}

impl PeakRss {
    fn start() -> Self {
        let start = rss();
        let peak = Arc::new(AtomicU64::new(start));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d) = (peak.clone(), done.clone());
        let sampler = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        PeakRss {
            start,
            peak,
            done,
            sampler,
        }
    }

    fn stop(self) -> f64 {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.sampler.join();
        self.peak.load(Ordering::Relaxed).saturating_sub(self.start) as f64 / (1 << 20) as f64
    }
}

/// The in-process server.
struct Client {
    router: axum::Router,
}

impl Client {
    async fn call(
        &self,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<axum::response::Response, BoxError> {
        let mut req = Request::builder().uri(uri).header("host", "bench");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Ok(self
            .router
            .clone()
            .oneshot(req.body(Body::empty())?)
            .await?)
    }

    async fn json(&self, uri: &str) -> Result<(StatusCode, Value), BoxError> {
        let resp = self.call(uri, &[]).await?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
        Ok((status, serde_json::from_slice(&bytes)?))
    }

    /// Follows `next` links from `uri` to the end; returns (pages, match entries).
    async fn pages(&self, uri: &str) -> Result<(usize, usize), BoxError> {
        let (mut pages, mut matches) = (0, 0);
        let mut next = Some(uri.to_owned());
        while let Some(u) = next.take() {
            let (status, b) = self.json(&u).await?;
            if status != StatusCode::OK {
                return Err(format!("{u}: {status} {b}").into());
            }
            pages += 1;
            matches += b["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["search"]["mode"] == "match")
                .count();
            next = b["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(|u| u.trim_start_matches("http://bench").to_owned());
        }
        Ok((pages, matches))
    }
}

/// Writes `resources` in transactions of 1,000.
async fn write(
    storage: &dyn fhirstore_core::ResourceStorage,
    ctx: &TenantContext,
    resources: Vec<Value>,
) -> Result<(), BoxError> {
    for chunk in resources.chunks(1_000) {
        let ops = chunk
            .iter()
            .map(|r| {
                Ok(WriteOp::Update {
                    resource_type: ResourceType::new(r["resourceType"].as_str().unwrap_or(""))?,
                    id: LogicalId::new(r["id"].as_str().unwrap_or(""))?,
                    resource: r.clone(),
                    if_match: None,
                })
            })
            .collect::<fhirstore_core::Result<Vec<_>>>()?;
        storage.transaction(ctx, ops).await?;
    }
    Ok(())
}

/// Runs the benchmark.
pub async fn run(args: ClinicalArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let settings = crate::embedded_settings(dir.path(), ModeArg::Off);
    let store = fhirstore_server::deploy::open(&settings).await?;
    let ctx = TenantContext::full(TenantId::new("bench")?);
    let started = Instant::now();
    let (mut loaded, mut batch, mut types) =
        (0usize, Vec::new(), std::collections::BTreeSet::new());
    for record in generate::records(usize::MAX, args.seed) {
        if loaded >= args.n {
            break;
        }
        loaded += record.len();
        for r in &record {
            types.insert(r["resourceType"].as_str().unwrap_or("").to_owned());
        }
        batch.extend(record);
        if batch.len() >= 1_000 {
            write(store.storage(), &ctx, std::mem::take(&mut batch)).await?;
        }
    }
    write(store.storage(), &ctx, batch).await?;
    let load = started.elapsed();
    println!(
        "clinical: {loaded} resources of {} types loaded into SQLite in {:.1}s ({:.0}/s)",
        types.len(),
        load.as_secs_f64(),
        loaded as f64 / load.as_secs_f64()
    );
    let app = fhirstore_server::App::new(
        store.clone(),
        ServerSettings {
            export_dir: Some(dir.path().join("exports")),
            ..ServerSettings::default()
        },
    );
    let client = Client {
        router: fhirstore_server::router(app),
    };

    // Baseline: every resource through plain paged searches.
    let mem = PeakRss::start();
    let t = Instant::now();
    let mut searched = 0;
    for ty in &types {
        searched += client
            .pages(&format!("/fhir/bench/{ty}?_count=1000"))
            .await?
            .1;
    }
    let search_secs = t.elapsed().as_secs_f64();
    let search_mem = mem.stop();

    // $export: kick-off to the last byte of the last file.
    let mem = PeakRss::start();
    let t = Instant::now();
    let kick = client
        .call("/fhir/bench/$export", &[("prefer", "respond-async")])
        .await?;
    let status_url = kick
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .map(|u| u.trim_start_matches("http://bench").to_owned())
        .ok_or("no Content-Location")?;
    let manifest = loop {
        let (status, body) = match client.json(&status_url).await {
            Ok(r) => r,
            // 202 has no body.
            Err(_) => (StatusCode::ACCEPTED, Value::Null),
        };
        match status {
            StatusCode::OK => break body,
            StatusCode::ACCEPTED => tokio::time::sleep(Duration::from_millis(50)).await,
            other => return Err(format!("export status {other}: {body}").into()),
        }
    };
    let mut exported = 0u64;
    for o in manifest["output"].as_array().into_iter().flatten() {
        let url = o["url"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("http://bench")
            .to_owned();
        let resp = client.call(&url, &[]).await?;
        let mut stream = resp.into_body().into_data_stream();
        while let Some(chunk) = futures_lite_next(&mut stream).await {
            exported += chunk?.iter().filter(|b| **b == b'\n').count() as u64;
        }
    }
    let export_secs = t.elapsed().as_secs_f64();
    let export_mem = mem.stop();
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>14}",
        "", "resources", "seconds", "resources/s", "peak RSS +MiB"
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>12.0} {:>14.1}",
        "paged search (baseline)",
        searched,
        search_secs,
        searched as f64 / search_secs,
        search_mem
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>12.0} {:>14.1}",
        "$export",
        exported,
        export_secs,
        exported as f64 / export_secs,
        export_mem
    );
    println!(
        "ratio $export / search: {:.2}",
        (exported as f64 / export_secs) / (searched as f64 / search_secs)
    );

    // $everything of one large record.
    let mut record =
        vec![json!({"resourceType": "Patient", "id": "everything", "name": [{"family": "Large"}]})];
    record.extend((1..args.record).map(|i| {
        json!({"resourceType": "Observation", "id": format!("ev{i}"), "status": "final",
               "code": {"text": "x"}, "subject": {"reference": "Patient/everything"}})
    }));
    write(store.storage(), &ctx, record).await?;
    let t = Instant::now();
    let (pages, found) = client
        .pages("/fhir/bench/Patient/everything/$everything?_count=100")
        .await?;
    let everything = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (base_pages, base_found) = client
        .pages("/fhir/bench/Observation?subject=Patient/everything&_count=100")
        .await?;
    let baseline = t.elapsed().as_secs_f64();
    println!(
        "$everything of {} resources: {found} in {pages} pages, {:.2}s to the last page; \
         baseline search of its Observations: {base_found} in {base_pages} pages, {:.2}s; ratio {:.2}",
        args.record,
        everything,
        baseline,
        everything / baseline
    );
    store.composite().shutdown().await;
    Ok(())
}

/// The next item of a stream.
async fn futures_lite_next<S: futures::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    use futures::StreamExt as _;
    s.next().await
}
