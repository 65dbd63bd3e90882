//! The FHIR R4 REST server on fhirstore.
//!
//! [`router`] serves one base URL per tenant, `/fhir/{tenant}`, with every R4 interaction the
//! storage layer supports (CRUD, vread, history, PATCH, search by GET and POST, conditional
//! writes, batch and transaction Bundles, the CapabilityStatement), plus the admin endpoints
//! (`/admin/status`, `/admin/reconcile`) and `/metrics`. [`serve`] runs it until a shutdown
//! signal, letting requests in flight finish and stopping the sync workers cleanly.
//!
//! With API tokens configured, every request needs a bearer token granting its tenant; the
//! answer to a token that does not is the same 403 whether or not the tenant exists.

pub mod auth;
pub mod bundles;
mod capability;
pub mod config;
pub mod deploy;
mod everything;
pub mod export;
pub mod import;
pub mod jobs;
pub mod metrics;
pub mod outcome;
pub mod rest;
mod route;
pub mod subscriptions;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use fhirstore_core::{ReindexOptions, ReindexState, ResourceType, TenantContext, TenantId};
use serde_json::{json, Value};

use crate::auth::Auth;
use crate::config::ServerSettings;
use crate::deploy::Deployment;
use crate::jobs::{Jobs, ReconcileAsk};
use crate::metrics::Metrics;
use crate::outcome::{ApiError, ApiResult};
use crate::rest::Interaction;

/// The server's shared state.
pub struct App {
    /// The stores.
    pub store: Arc<Deployment>,
    /// Token checks.
    pub auth: Auth,
    /// Request and job metrics.
    pub metrics: Metrics,
    /// The settings it was started with.
    pub settings: ServerSettings,
    /// Reconcile jobs started over HTTP.
    pub jobs: Jobs,
    /// Bulk export jobs this process runs.
    pub exports: export::Exports,
    /// Subscription matching and delivery.
    pub subscriptions: Arc<subscriptions::Engine>,
    /// Tenants with a reindex running, and whether another pass was asked for meanwhile.
    reindexing: Mutex<HashMap<TenantId, bool>>,
    /// Itself, for the background tasks it starts.
    me: std::sync::Weak<App>,
}

impl App {
    /// The state for these stores and settings.
    pub fn new(store: Arc<Deployment>, settings: ServerSettings) -> Arc<App> {
        let base = settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", settings.listen));
        let subscriptions =
            subscriptions::Engine::new(store.clone(), settings.subscriptions.clone(), base);
        Arc::new_cyclic(|me| App {
            subscriptions,
            store,
            auth: Auth::new(&settings.tokens, settings.admin_token.as_deref()),
            metrics: Metrics::default(),
            settings,
            jobs: Jobs::default(),
            exports: export::Exports::default(),
            reindexing: Mutex::default(),
            me: me.clone(),
        })
    }

    /// After a write: a tenant's own SearchParameter changed, so its reindex job runs in the
    /// background until the parameter is searchable (or its rows are gone).
    pub(crate) fn after_write(&self, ctx: &TenantContext, types: &[ResourceType]) {
        self.subscriptions.wake();
        if types.iter().any(|t| t.as_str() == "SearchParameter") {
            self.reindex_in_background(ctx.tenant().clone());
        }
    }

    /// Runs the tenant's pending reindex jobs on a background task; a second call while one
    /// runs makes it go round once more rather than start another.
    pub fn reindex_in_background(&self, tenant: TenantId) {
        {
            let mut running = self.reindexing.lock();
            if let Some(again) = running.get_mut(&tenant) {
                *again = true;
                return;
            }
            running.insert(tenant.clone(), false);
        }
        let Some(app) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let ctx = TenantContext::full(tenant.clone());
            loop {
                let result = app
                    .store
                    .storage()
                    .reindex(&ctx, ReindexOptions::default(), &|_| {})
                    .await;
                if let Err(e) = &result {
                    tracing::warn!(tenant = %tenant, error = %e, "reindex failed; the next SearchParameter write retries it");
                }
                let mut running = app.reindexing.lock();
                if running.get(&tenant) == Some(&true) && result.is_ok() {
                    running.insert(tenant.clone(), false);
                    continue;
                }
                running.remove(&tenant);
                break;
            }
        });
    }

    /// Starts the reindex jobs left pending by an earlier run, for every tenant.
    pub async fn resume_reindexing(&self) -> fhirstore_core::Result<()> {
        for tenant in self.store.composite().primary().tenants().await? {
            let ctx = TenantContext::full(tenant.clone());
            let pending = self
                .store
                .storage()
                .reindex_status(&ctx)
                .await?
                .iter()
                .any(|s| s.state != ReindexState::Active);
            if pending {
                self.reindex_in_background(tenant);
            }
        }
        Ok(())
    }

    /// Records a scheduled reconcile run: its reports join the jobs list and the metrics.
    fn scheduled_run(&self, run: &fhirstore_sync::schedule::ScheduledRun) {
        let mut reports = vec![("recent".to_owned(), run.recent.clone())];
        reports.extend(run.full.clone());
        for (label, report) in reports {
            self.metrics.reconciled(&jobs::totals(&report));
            let (_, job) = self.jobs.start();
            job.finish(Ok((format!("scheduled-{label}"), report)));
        }
        tracing::info!(
            recent = ?jobs::totals(&run.recent),
            full = ?run.full.as_ref().map(|(_, r)| jobs::totals(r)),
            "scheduled reconcile finished"
        );
    }
}

/// The HTTP routes over this state.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/fhir/{tenant}", any(rest::fhir))
        .route("/fhir/{tenant}/", any(rest::fhir))
        .route("/fhir/{tenant}/{*rest}", any(rest::fhir))
        .route("/admin/status", get(admin_status))
        .route(
            "/admin/reconcile",
            get(list_reconcile).post(start_reconcile),
        )
        .route(
            "/admin/reconcile/{id}",
            get(get_reconcile).delete(cancel_reconcile),
        )
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), bounds))
        .layer(axum::middleware::from_fn_with_state(app.clone(), track))
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .with_state(app)
}

async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let resp = next.run(req).await;
    let label = resp
        .extensions()
        .get::<Interaction>()
        .map_or("other", |i| i.0);
    app.metrics
        .observe(label, resp.status().as_u16(), start.elapsed());
    resp
}

fn labelled(label: &'static str, r: ApiResult) -> Response {
    let mut resp = r.unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(Interaction(label));
    resp
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, serde_json::to_vec_pretty(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn not_found() -> Response {
    ApiError::not_found("no such endpoint; the FHIR API is under /fhir/{tenant}").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "this method is not allowed on this endpoint",
    )
    .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let up = app.store.composite().status().await.is_ok();
    labelled(
        "health",
        Ok(json_response(
            if up {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            &json!({"status": if up { "up" } else { "down" }}),
        )),
    )
}

async fn admin_status(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = async {
        app.auth.admin(&headers)?;
        let status = app.store.composite().status().await?;
        let subscriptions = app.subscriptions.report().await?;
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "stores": app.store.describe(),
                "secondaries": status.iter().map(jobs::status_json).collect::<Vec<_>>(),
                "subscriptions": subscriptions.iter().map(subscriptions::state_json).collect::<Vec<_>>(),
            }),
        ))
    }
    .await;
    labelled("admin", r)
}

async fn start_reconcile(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let r = async {
        app.auth.admin(&headers)?;
        let ask: ReconcileAsk = if body.is_empty() {
            ReconcileAsk::default()
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("reconcile request: {e}")))?
        };
        let request = ask.request().map_err(ApiError::bad_request)?;
        let (id, job) = app.jobs.start();
        let task_app = app.clone();
        let task_job = job.clone();
        tokio::spawn(async move {
            let result = task_app
                .store
                .composite()
                .reconciler()
                .run(&request, &|p| task_job.progress(p), &task_job.cancel)
                .await;
            if let Ok((_, report)) = &result {
                task_app.metrics.reconciled(&jobs::totals(report));
            }
            task_job.finish(result.map_err(|e| e.to_string()));
        });
        let mut resp = json_response(StatusCode::ACCEPTED, &job.json(&id));
        if let Ok(v) = HeaderValue::from_str(&format!("/admin/reconcile/{id}")) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Ok(resp)
    }
    .await;
    labelled("admin", r)
}

async fn list_reconcile(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = async {
        app.auth.admin(&headers)?;
        let all: Vec<Value> = app.jobs.all().iter().map(|(id, j)| j.json(id)).collect();
        Ok(json_response(StatusCode::OK, &Value::Array(all)))
    }
    .await;
    labelled("admin", r)
}

fn job_of(app: &App, headers: &HeaderMap, id: &str) -> ApiResult<Arc<jobs::Job>> {
    app.auth.admin(headers)?;
    app.jobs
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no reconcile job {id}")))
}

async fn get_reconcile(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = job_of(&app, &headers, &id).map(|j| json_response(StatusCode::OK, &j.json(&id)));
    labelled("admin", r)
}

async fn cancel_reconcile(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = job_of(&app, &headers, &id).map(|j| {
        j.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        json_response(StatusCode::ACCEPTED, &j.json(&id))
    });
    labelled("admin", r)
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = async {
        app.auth.admin(&headers)?;
        let status = app.store.composite().status().await?;
        let subscriptions = app.subscriptions.report().await?;
        let mut resp = app.metrics.render(&status, &subscriptions).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        Ok(resp)
    }
    .await;
    labelled("metrics", r)
}

/// Serves `app` on `listener` until `shutdown` resolves; requests in flight finish, then the
/// sync workers stop.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Err(e) = app.resume_reindexing().await {
        tracing::warn!(error = %e, "could not look for pending reindex jobs");
    }
    export::recover(&app);
    // Expired export files go even when no client asks about them.
    let sweeper = {
        let weak = Arc::downgrade(&app);
        let every = (app.settings.export_ttl / 4).min(std::time::Duration::from_secs(600));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(app) = weak.upgrade() else { break };
                export::sweep_all(&app);
            }
        })
    };
    let store = app.store.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scheduled = app.settings.reconcile.clone().map(|schedule| {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let record = |run: &fhirstore_sync::schedule::ScheduledRun| app.scheduled_run(run);
            app.store
                .composite()
                .reconciler()
                .run_scheduled(&schedule, &record, &stop)
                .await;
        })
    });
    let engine = app.subscriptions.clone();
    let loops = engine.start().await;
    let limits = &app.settings.limits;
    let buffer = head_buffer(limits.max_uri_bytes + limits.max_header_bytes);
    let served = serve_with(store, router(app), listener, buffer, shutdown).await;
    engine.stop();
    for task in loops {
        let _ = task.await;
    }
    sweeper.abort();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(task) = scheduled {
        let _ = task.await;
    }
    served
}

/// [`serve`] with a router of the caller's (the server's routes with layers added).
pub async fn serve_router(
    store: Arc<Deployment>,
    routes: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = config::Limits::default();
    let buffer = head_buffer(limits.max_uri_bytes + limits.max_header_bytes);
    serve_with(store, routes, listener, buffer, shutdown).await
}

/// How much of a request's head the HTTP parser holds. Well beyond the limits the router
/// checks, so a URL or header over them reaches the router and gets an `OperationOutcome`
/// naming the limit; only a head larger still gets the parser's own bare 414 or 431.
fn head_buffer(limits: usize) -> usize {
    limits.saturating_mul(4).max(4 << 20)
}

/// Accepts connections until `shutdown`, then lets every request in flight finish.
async fn serve_with(
    store: Arc<Deployment>,
    routes: Router,
    listener: tokio::net::TcpListener,
    head_buffer: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, a connection reset before it was accepted:
                    // the listener itself is fine, so keep serving after a breath.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .max_buf_size(head_buffer)
            .serve_connection(TokioIo::new(stream), service);
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    store.composite().shutdown().await;
    Ok(())
}

/// Refuses a URL or a header block beyond the configured limits with an `OperationOutcome`,
/// before any routing or body reading.
async fn bounds(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let limits = &app.settings.limits;
    let uri = req.uri().to_string().len();
    if uri > limits.max_uri_bytes {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "too-long",
            format!(
                "the URL is {uri} bytes, beyond the limit max_uri_bytes = {}; \
                 POST the search to _search instead",
                limits.max_uri_bytes
            ),
        )
        .into_response();
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > limits.max_header_bytes {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too-long",
            format!(
                "the headers are {headers} bytes, beyond the limit max_header_bytes = {}",
                limits.max_header_bytes
            ),
        )
        .into_response();
    }
    next.run(req).await
}
