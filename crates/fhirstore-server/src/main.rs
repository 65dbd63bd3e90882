//! The `fhirstore` command: `serve`, `import`, `reconcile`, `search` and `status`, all on the
//! stores the storage flags name.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fhirstore_core::{Handling, ResourceType, SearchQuery, TenantContext, TenantId};
use fhirstore_server::config::{self, ServeArgs, StorageArgs};
use fhirstore_server::jobs::{self, ReconcileAsk};
use fhirstore_server::{deploy, import, App};
use indicatif::{ProgressBar, ProgressStyle};

/// A FHIR R4 server and tools on fhirstore.
#[derive(Parser, Debug)]
#[command(name = "fhirstore", version, about)]
struct Cli {
    #[command(flatten)]
    storage: StorageArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the FHIR REST API (by default on 127.0.0.1:8080, SQLite + tantivy under ./data).
    Serve(Box<ServeArgs>),
    /// Import JSON (a resource or a Bundle) and NDJSON files, or folders of them.
    Import {
        /// The tenant to import into.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Import everything that can be imported, and write what could not to the report
        /// (the exit status is then non-zero).
        #[arg(long)]
        keep_going: bool,
        /// Where `--keep-going` writes its report: NDJSON, one line per rejection (file, entry
        /// or line, HTTP-style status, OperationOutcome).
        #[arg(long, default_value = "fhirstore-import-report.ndjson")]
        report: PathBuf,
    },
    /// Compare every secondary with the primary, and repair what drifted.
    Reconcile {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this resource type.
        #[arg(long = "type")]
        resource_type: Option<String>,
        /// Report without repairing.
        #[arg(long)]
        dry_run: bool,
        /// Deep scrub first: hash what each secondary holds again, to find keys lost or
        /// damaged out of band, which leave its digests unchanged.
        #[arg(long)]
        deep: bool,
        /// The deep scrub's pace, in documents a second [default: unbounded].
        #[arg(long)]
        deep_rate: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Search, and print the searchset Bundle: `fhirstore search TENANT 'Patient?name=…'`.
    Search {
        /// The tenant.
        tenant: String,
        /// `Type?query`, or `?query` for every type.
        query: String,
    },
    /// Print each secondary's sync status.
    Status,
}

/// A failure to report and exit with.
type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fhirstore: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirstore: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => serve(&cli.storage, &args).await,
        Command::Import {
            tenant,
            paths,
            keep_going,
            report,
        } => {
            let options = import::ImportOptions { keep_going };
            import_cmd(&cli.storage, &tenant, &paths, options, &report).await
        }
        Command::Reconcile {
            tenant,
            resource_type,
            dry_run,
            json,
            deep,
            deep_rate,
        } => {
            let ask = ReconcileAsk {
                deep,
                deep_keys_per_second: deep_rate,
                tenant,
                resource_type,
                secondary: None,
                dry_run,
            };
            reconcile(&cli.storage, &ask, json).await
        }
        Command::Search { tenant, query } => search(&cli.storage, &tenant, &query).await,
        Command::Status => status(&cli.storage).await,
    }
}

async fn serve(storage: &StorageArgs, args: &ServeArgs) -> Result<(), Failure> {
    let (store_settings, server) = config::serve_settings(storage, args)?;
    server.check_exposure()?;
    let store = deploy::open(&store_settings).await?;
    let listener = tokio::net::TcpListener::bind(server.listen).await?;
    tracing::info!(
        address = %listener.local_addr()?,
        stores = store.describe(),
        tokens = server.has_tokens(),
        "fhirstore serving FHIR R4 under /fhir/{{tenant}}"
    );
    let app = App::new(store, server);
    fhirstore_server::serve(app, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

fn spinner(template: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Opens the stores, runs `f`, then lets the secondaries catch up and stops the workers.
async fn with_store<T>(
    storage: &StorageArgs,
    f: impl AsyncFnOnce(&Arc<deploy::Deployment>) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let settings = config::store_settings(storage)?;
    let store = deploy::open(&settings).await?;
    let result = f(&store).await;
    if !store
        .composite()
        .wait_for_sync(Duration::from_secs(60))
        .await?
    {
        eprintln!("fhirstore: some secondaries are still behind; their workers catch up on the next start");
    }
    store.composite().shutdown().await;
    result
}

async fn import_cmd(
    storage: &StorageArgs,
    tenant: &str,
    paths: &[PathBuf],
    options: import::ImportOptions,
    report_path: &std::path::Path,
) -> Result<(), Failure> {
    let ctx = TenantContext::full(TenantId::new(tenant)?);
    let bar = spinner("{spinner} {pos} resources imported ({per_sec}), {msg} [{elapsed}]");
    let started = std::time::Instant::now();
    let report = with_store(storage, async |store| {
        let bar2 = bar.clone();
        let progress = move |s: &import::ImportStats| {
            bar2.set_position(s.resources);
            bar2.set_message(format!("{} files, {} rejected", s.files, s.rejected));
        };
        let r = import::import(store.storage(), &ctx, paths, options, &progress).await;
        bar.finish_and_clear();
        Ok(r?)
    })
    .await?;
    let stats = &report.stats;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} resources from {} files in {} commits, {:.1}s ({:.0} resources/s)",
        stats.resources,
        stats.files,
        stats.commits,
        secs,
        stats.resources as f64 / secs.max(1e-9)
    );
    if !report.rejections.is_empty() {
        let mut text = String::new();
        for r in &report.rejections {
            text.push_str(&r.to_json().to_string());
            text.push('\n');
        }
        std::fs::write(report_path, text)?;
        return Err(format!(
            "{} rejected; the report is {}",
            report.rejections.len(),
            report_path.display()
        )
        .into());
    }
    Ok(())
}

async fn reconcile(
    storage: &StorageArgs,
    ask: &ReconcileAsk,
    as_json: bool,
) -> Result<(), Failure> {
    let request = ask.request()?;
    let bar = spinner("{spinner} reconciling: {msg} [{elapsed}]");
    let (id, report) = with_store(storage, async |store| {
        let bar2 = bar.clone();
        let progress = move |p: &fhirstore_sync::reconcile::ReconcileProgress| {
            bar2.set_message(format!(
                "{} segments compared, {} keys fetched, {} repaired",
                p.segments_compared, p.keys_fetched, p.repaired
            ));
        };
        let cancel = AtomicBool::new(false);
        let r = store
            .composite()
            .reconciler()
            .run(&request, &progress, &cancel)
            .await;
        bar.finish_and_clear();
        Ok(r?)
    })
    .await?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&jobs::report_json(&id, &report))?
        );
        return Ok(());
    }
    println!("reconcile job {id}");
    for e in &report.entries {
        if let Some(scrub) = e.scrub.as_ref().filter(|s| s.supported) {
            if scrub.lost + scrub.corrupted + scrub.unreadable > 0 {
                println!(
                    "  {} {}/{}: deep scrub of {} keys: lost {}, corrupted {}, unreadable {}",
                    e.secondary,
                    e.tenant,
                    e.resource_type,
                    scrub.keys_read,
                    scrub.lost,
                    scrub.corrupted,
                    scrub.unreadable
                );
            }
        }
        if e.roots_equal {
            continue;
        }
        println!(
            "  {} {}/{}: missing {}, extra {}, stale {}, ahead {}, repaired {} ({} of {} differing segments examined)",
            e.secondary, e.tenant, e.resource_type, e.missing, e.extra, e.stale, e.ahead,
            e.repaired, e.segments_examined, e.segments_differing
        );
    }
    let t = jobs::totals(&report);
    println!(
        "{} (secondary, tenant, type) compared; {}",
        report.entries.len(),
        t.iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn search(storage: &StorageArgs, tenant: &str, query: &str) -> Result<(), Failure> {
    let ctx = TenantContext::full(TenantId::new(tenant)?);
    let (path, q) = query.split_once('?').unwrap_or((query, ""));
    let rt = match path.trim_matches('/') {
        "" => None,
        t => Some(ResourceType::new(t)?),
    };
    let body = with_store(storage, async |store| {
        let reg = store.storage().search_parameters(&ctx).await?;
        let parsed = SearchQuery::parse_in(&reg, rt, q, Handling::Lenient)?;
        let routed = store.composite().search_routed(&ctx, &parsed, None).await?;
        eprintln!("answered by {}", routed.backend);
        Ok(fhirstore_server::bundles::searchset(
            &format!("http://127.0.0.1:8080/fhir/{tenant}"),
            path.trim_matches('/'),
            q,
            &parsed,
            &routed,
        ))
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

async fn status(storage: &StorageArgs) -> Result<(), Failure> {
    let settings = config::store_settings(storage)?;
    let store = deploy::open(&settings).await?;
    let status = store.composite().status().await;
    store.composite().shutdown().await;
    let v: Vec<_> = status?.iter().map(jobs::status_json).collect();
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({"stores": store.describe(), "secondaries": v})
        )?
    );
    Ok(())
}
