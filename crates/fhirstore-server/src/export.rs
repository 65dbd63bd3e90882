//! Bulk Data `$export` (FHIR Bulk Data Access 2.0): system level (`[base]/$export`),
//! `Patient/$export` and `Group/[id]/$export`, with the asynchronous request pattern.
//!
//! - **Kick-off** (`Prefer: respond-async`) answers 202 with `Content-Location`, the job's
//!   status URL under the tenant's base, so the tenant's token is what opens it.
//! - **Status**: 202 with `X-Progress` and `Retry-After` while it runs, then 200 with the
//!   manifest; a failed job answers 500 with an `OperationOutcome`. `DELETE` cancels the job
//!   and removes its files.
//! - **Files**: one NDJSON file per type under `{export_dir}/{tenant}/{job}/`, written a page
//!   at a time and streamed back from disk, so memory does not grow with the export.
//! - **One snapshot**: the job exports, for each resource, its newest version written at or
//!   before `transactionTime` (the kick-off instant), skipping deletions. Resources untouched
//!   since then come from one search (`_lastUpdated=le…`); those written since, from their
//!   history, so a write during the export neither appears nor removes what was there.
//! - **Restarts**: the job record is a file; a job found in progress by a server that starts
//!   is reported as failed (start it again), never left "in progress".
//! - **Expiry**: a job's files are removed `export_ttl` after its kick-off.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use fhirstore_core::compartment::{CompartmentScope, Compartments};
use fhirstore_core::search::Handling;
use fhirstore_core::{
    format_instant, Error, HistoryRequest, HistoryScope, LogicalId, ResourceStorage, ResourceType,
    SearchQuery, StoredResource, TenantContext, TenantId,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::outcome::{ApiError, ApiResult};
use crate::rest::Req;
use crate::App;

/// The NDJSON media type of the files, and the `_outputFormat` values that name it.
const NDJSON: &str = "application/fhir+ndjson";
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Resources read per search page while exporting.
const PAGE: u32 = 1_000;

/// What an export covers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Level {
    /// Every resource of the tenant.
    System,
    /// Every resource in some Patient's compartment.
    Patient,
    /// The compartments of the Patients a Group lists.
    Group(String),
}

/// A job as its record file keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobRecord {
    id: String,
    tenant: String,
    /// The kick-off URL, as the manifest repeats it.
    request: String,
    level: Level,
    /// The snapshot instant, microseconds.
    transaction_time: i64,
    since: Option<i64>,
    types: Vec<String>,
    /// `Type` → R4 search strings (`_typeFilter`), OR-ed.
    type_filters: Vec<(String, String)>,
    state: State,
    error: Option<String>,
    output: Vec<Output>,
    /// Types finished, for `X-Progress`.
    done: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    InProgress,
    Complete,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Output {
    #[serde(rename = "type")]
    resource_type: String,
    file: String,
    count: u64,
}

/// One job this process runs.
#[derive(Default)]
struct Running {
    cancel: AtomicBool,
    /// Signalled once the job has stopped and left the map.
    finished: tokio::sync::Notify,
}

/// The export jobs this process runs.
#[derive(Default)]
pub struct Exports {
    running: Mutex<HashMap<(String, String), Arc<Running>>>,
}

impl Exports {
    fn running(&self) -> parking_lot::MutexGuard<'_, HashMap<(String, String), Arc<Running>>> {
        self.running.lock()
    }
}

fn io(what: &str, e: std::io::Error) -> ApiError {
    ApiError::from(Error::backend(format!("export {what}"), false, e))
}

fn dir_of(app: &App, tenant: &TenantId) -> ApiResult<PathBuf> {
    let root = app.settings.export_dir.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "not-supported",
            "bulk export is not configured on this server (no export directory)",
        )
    })?;
    Ok(root.join(tenant.as_str()))
}

/// A job id names a directory: only what this server hands out is accepted.
fn job_dir(app: &App, tenant: &TenantId, id: &str) -> ApiResult<PathBuf> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(ApiError::not_found(format!("no export job {id:?}")));
    }
    Ok(dir_of(app, tenant)?.join(id))
}

fn read_record(dir: &Path) -> Option<JobRecord> {
    let text = std::fs::read_to_string(dir.join("job.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_record(dir: &Path, job: &JobRecord) -> std::io::Result<()> {
    let text = serde_json::to_vec(job).map_err(std::io::Error::other)?;
    // Written aside and renamed, so a reader or a crash never sees half a record.
    let part = dir.join("job.json.part");
    std::fs::write(&part, text)?;
    std::fs::rename(part, dir.join("job.json"))
}

/// `[base]/$export`, `[base]/Patient/$export`, `[base]/Group/[id]/$export`: the kick-off.
pub(crate) async fn kick_off(req: &Req<'_>, level: Level, query: &str) -> ApiResult {
    if !req.prefers("respond-async") {
        return Err(ApiError::bad_request(
            "$export runs asynchronously: send Prefer: respond-async",
        ));
    }
    let mut since = None;
    let mut types: Option<Vec<ResourceType>> = None;
    let mut type_filters = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "_outputFormat" if OUTPUT_FORMATS.contains(&v.as_ref()) => {}
            "_outputFormat" => {
                return Err(ApiError::bad_request(format!(
                    "_outputFormat={v:?}: this server writes {NDJSON}"
                )))
            }
            "_since" => {
                since = Some(fhirstore_core::parse_instant(&v).ok_or_else(|| {
                    ApiError::bad_request(format!("_since={v:?} is not an instant"))
                })?)
            }
            "_type" => {
                let list = types.get_or_insert_with(Vec::new);
                for t in v.split(',').filter(|t| !t.is_empty()) {
                    list.push(crate::rest::resource_type(t)?);
                }
            }
            "_typeFilter" => {
                for f in v.split(',').filter(|f| !f.is_empty()) {
                    let (t, q) = f.split_once('?').ok_or_else(|| {
                        ApiError::bad_request(format!("_typeFilter {f:?}: expected Type?search"))
                    })?;
                    let rt = crate::rest::resource_type(t)?;
                    let reg = req.app.store.storage().search_parameters(&req.ctx).await?;
                    // Checked now, so a bad filter is the kick-off's 400, not a failed job.
                    SearchQuery::parse_in(&reg, Some(rt), q, Handling::Strict)?;
                    type_filters.push((rt.to_string(), q.to_owned()));
                }
            }
            other if req.handling() == Handling::Strict => {
                return Err(ApiError::bad_request(format!(
                    "$export does not take the parameter {other:?}"
                )))
            }
            _ => {}
        }
    }
    let all: Vec<ResourceType> = match &level {
        Level::System => ResourceType::all().collect(),
        Level::Patient | Level::Group(_) => {
            let c = Compartments::r4()
                .get(ResourceType::new("Patient")?)
                .ok_or_else(|| ApiError::not_found("no Patient compartment"))?;
            c.members.keys().copied().collect()
        }
    };
    let types = match types {
        None => all,
        Some(asked) => {
            if let Some(t) = asked.iter().find(|t| !all.contains(t)) {
                return Err(ApiError::bad_request(format!(
                    "_type {t}: not part of this export (not in a Patient compartment)"
                )));
            }
            asked
        }
    };
    if let Level::Group(id) = &level {
        // The group must exist now; its members are read when the job runs.
        req.app
            .store
            .storage()
            .read(
                &req.ctx,
                ResourceType::new("Group")?,
                &crate::rest::logical_id(id)?,
            )
            .await?;
    }
    let tenant = req.ctx.tenant().clone();
    let root = dir_of(req.app, &tenant)?;
    sweep(req.app, &root);
    let id = uuid::Uuid::now_v7().simple().to_string();
    let dir = root.join(&id);
    std::fs::create_dir_all(&dir).map_err(|e| io("directory", e))?;
    let job = JobRecord {
        id: id.clone(),
        tenant: tenant.to_string(),
        request: if query.is_empty() {
            req.url()
        } else {
            format!("{}?{query}", req.url())
        },
        level,
        transaction_time: fhirstore_core::now_micros(),
        since: since.map(fhirstore_core::to_micros),
        types: types.iter().map(ToString::to_string).collect(),
        type_filters,
        state: State::InProgress,
        error: None,
        output: Vec::new(),
        done: 0,
    };
    write_record(&dir, &job).map_err(|e| io("record", e))?;
    let running = Arc::new(Running::default());
    req.app
        .exports
        .running()
        .insert((job.tenant.clone(), id.clone()), running.clone());
    if let Some(app) = req.app.me.upgrade() {
        let ctx = TenantContext::full(tenant);
        tokio::spawn(async move {
            let key = (job.tenant.clone(), job.id.clone());
            run(&app, &ctx, &dir, job, &running.cancel).await;
            app.exports.running().remove(&key);
            running.finished.notify_waiters();
        });
    }
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("{}/$export-status/{id}", req.base)) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    Ok(resp)
}

/// Runs a job to its end, recording each step; a failure is recorded, never lost.
async fn run(app: &App, ctx: &TenantContext, dir: &Path, mut job: JobRecord, cancel: &AtomicBool) {
    let outcome = export(app, ctx, dir, &mut job, cancel).await;
    if cancel.load(Ordering::SeqCst) {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    match outcome {
        Ok(()) => job.state = State::Complete,
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "export failed");
            job.state = State::Failed;
            job.error = Some(e.to_string());
        }
    }
    if let Err(e) = write_record(dir, &job) {
        tracing::warn!(job = %job.id, error = %e, "could not record the export's end");
    }
}

async fn export(
    app: &App,
    ctx: &TenantContext,
    dir: &Path,
    job: &mut JobRecord,
    cancel: &AtomicBool,
) -> fhirstore_core::Result<()> {
    let storage = app.store.storage();
    let t = fhirstore_core::from_micros(job.transaction_time);
    let since = job.since.map(fhirstore_core::from_micros);
    let patient = ResourceType::new("Patient")?;
    let owners: Option<Vec<Option<LogicalId>>> = match &job.level {
        Level::System => None,
        Level::Patient => Some(vec![None]),
        Level::Group(id) => Some(group_members(storage, ctx, id).await?),
    };
    let reg = storage.search_parameters(ctx).await?;
    for (i, name) in job.types.clone().iter().enumerate() {
        let rt = ResourceType::new(name)?;
        let filters: Vec<SearchQuery> = job
            .type_filters
            .iter()
            .filter(|(ft, _)| ft == name)
            .map(|(_, q)| SearchQuery::parse_in(&reg, Some(rt), q, Handling::Strict))
            .collect::<fhirstore_core::Result<_>>()?;
        let scopes: Vec<Option<CompartmentScope>> = match &owners {
            None => vec![None],
            Some(owners) => owners
                .iter()
                .map(|o| CompartmentScope::new(patient, o.clone(), Some(&[rt])).map(Some))
                .collect::<fhirstore_core::Result<_>>()?,
        };
        let file = format!("{name}.ndjson");
        let count = write_type(
            storage,
            ctx,
            rt,
            &scopes,
            &filters,
            since,
            t,
            &dir.join(&file),
            cancel,
        )
        .await?;
        if cancel.load(Ordering::SeqCst) {
            return Ok(());
        }
        if count > 0 {
            job.output.push(Output {
                resource_type: name.clone(),
                file,
                count,
            });
        }
        job.done = i + 1;
        write_record(dir, job).map_err(|e| Error::backend("export record", false, e))?;
    }
    Ok(())
}

/// The Patients a Group lists (`Group.member.entity`).
async fn group_members(
    storage: &dyn ResourceStorage,
    ctx: &TenantContext,
    id: &str,
) -> fhirstore_core::Result<Vec<Option<LogicalId>>> {
    let group = storage
        .read(ctx, ResourceType::new("Group")?, &LogicalId::new(id)?)
        .await?;
    let mut out = BTreeSet::new();
    for m in group.content["member"].as_array().into_iter().flatten() {
        if let Some(r) = m["entity"]["reference"].as_str() {
            if let Some(pid) = r.strip_prefix("Patient/") {
                if let Ok(pid) = LogicalId::new(pid) {
                    out.insert(pid);
                }
            }
        }
    }
    Ok(out.into_iter().map(Some).collect())
}

/// Writes one type's NDJSON file: every resource in the snapshot at `t` (within `scopes` and
/// `filters`, changed at or after `since`), once. Returns how many were written; no file is
/// left when none were.
#[allow(clippy::too_many_arguments)]
async fn write_type(
    storage: &dyn ResourceStorage,
    ctx: &TenantContext,
    rt: ResourceType,
    scopes: &[Option<CompartmentScope>],
    filters: &[SearchQuery],
    since: Option<DateTime<Utc>>,
    t: DateTime<Utc>,
    path: &Path,
    cancel: &AtomicBool,
) -> fhirstore_core::Result<u64> {
    let io_err =
        |e: std::io::Error| Error::backend(format!("writing {}", path.display()), false, e);
    let part = path.with_extension("ndjson.part");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&part).map_err(io_err)?);
    let mut written = 0u64;
    // Several scopes (a Group's patients) can share a resource: each is written once.
    let mut seen: HashSet<LogicalId> = HashSet::new();
    let several = scopes.len() > 1;
    let mut write = |r: &StoredResource, out: &mut std::io::BufWriter<std::fs::File>| {
        if several && !seen.insert(r.key.id.clone()) {
            return Ok(());
        }
        let line = serde_json::to_string(&r.content)
            .map_err(|e| Error::backend_msg(format!("serialising {}: {e}", r.key.id), false))?;
        writeln!(out, "{line}").map_err(io_err)?;
        written += 1;
        Ok::<_, Error>(())
    };
    let filter_sets: Vec<Option<&SearchQuery>> = if filters.is_empty() {
        vec![None]
    } else {
        filters.iter().map(Some).collect()
    };
    // 1. Untouched since the snapshot: the current version is the snapshot's.
    for scope in scopes {
        for filter in &filter_sets {
            let mut q = SearchQuery::all(Some(rt));
            if let Some(f) = filter {
                q.criteria = f.criteria.clone();
            }
            q.count = Some(PAGE);
            q.compartment = scope.clone();
            q.add_param(
                "_lastUpdated",
                &format!("le{}", format_instant(t)),
                Handling::Strict,
            )?;
            if let Some(s) = since {
                q.add_param(
                    "_lastUpdated",
                    &format!("ge{}", format_instant(s)),
                    Handling::Strict,
                )?;
            }
            loop {
                if cancel.load(Ordering::SeqCst) {
                    return Ok(0);
                }
                let page = storage.search(ctx, &q).await?;
                for r in &page.matches {
                    write(r, &mut out)?;
                }
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => break,
                }
            }
        }
    }
    // 2. Written since: each key's newest version at or before the snapshot, if it was live.
    let mut changed = BTreeSet::new();
    let mut h = HistoryRequest::new(HistoryScope::Type(rt));
    h.since = Some(t + chrono::TimeDelta::microseconds(1));
    h.count = Some(PAGE);
    loop {
        let page = storage.history(ctx, &h).await?;
        changed.extend(page.entries.iter().map(|r| r.key.id.clone()));
        match page.next_cursor {
            Some(c) => h.cursor = Some(c),
            None => break,
        }
    }
    for id in changed {
        if cancel.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let Some(then) = as_of(storage, ctx, rt, &id, t).await? else {
            continue;
        };
        if since.is_some_and(|s| then.last_updated < s) {
            continue;
        }
        if !scopes
            .iter()
            .any(|s| s.as_ref().is_none_or(|s| in_scope(&then, s)))
        {
            continue;
        }
        if !filters.is_empty() && !matches_now(storage, ctx, &id, filters).await? {
            continue;
        }
        write(&then, &mut out)?;
    }
    out.flush().map_err(io_err)?;
    drop(out);
    if written == 0 {
        let _ = std::fs::remove_file(&part);
    } else {
        std::fs::rename(&part, path).map_err(io_err)?;
    }
    Ok(written)
}

/// A resource's newest version written at or before `t`, when that version is not a deletion.
async fn as_of(
    storage: &dyn ResourceStorage,
    ctx: &TenantContext,
    rt: ResourceType,
    id: &LogicalId,
    t: DateTime<Utc>,
) -> fhirstore_core::Result<Option<StoredResource>> {
    let mut h = HistoryRequest::new(HistoryScope::Instance(rt, id.clone()));
    h.count = Some(PAGE);
    loop {
        let page = storage.history(ctx, &h).await?;
        // Newest first: the first at or before `t` is the snapshot's.
        if let Some(r) = page.entries.into_iter().find(|r| r.last_updated <= t) {
            return Ok((!r.deleted).then_some(r));
        }
        match page.next_cursor {
            Some(c) => h.cursor = Some(c),
            None => return Ok(None),
        }
    }
}

/// Whether a version is in a compartment scope: the same rule the stores apply to current
/// versions, read from the version's own references.
fn in_scope(r: &StoredResource, scope: &CompartmentScope) -> bool {
    let rt = r.key.resource_type;
    if rt == scope.owner_type && scope.owner_id.as_ref().is_none_or(|o| *o == r.key.id) {
        return true;
    }
    let Some((_, params)) = scope.members.iter().find(|(t, _)| *t == rt) else {
        return false;
    };
    fhirstore_core::index::extract(&r.content)
        .references
        .iter()
        .any(|e| {
            params.iter().any(|p| p == e.param)
                && e.target_type == scope.owner_type.as_str()
                && scope
                    .owner_id
                    .as_ref()
                    .is_none_or(|o| o.as_str() == e.target_id)
        })
}

/// Whether the resource's current version matches one of the `_typeFilter` searches: how a
/// resource written since the snapshot is judged, since a search sees current versions only.
async fn matches_now(
    storage: &dyn ResourceStorage,
    ctx: &TenantContext,
    id: &LogicalId,
    filters: &[SearchQuery],
) -> fhirstore_core::Result<bool> {
    for f in filters {
        let mut q = f.clone();
        q.add_param("_id", id.as_str(), Handling::Strict)?;
        q.count = Some(1);
        if !storage.search(ctx, &q).await?.matches.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `GET [base]/$export-status/[id]`: 202 with progress while the job runs, the manifest when
/// it is complete, 500 with the reason when it failed.
pub(crate) async fn status(req: &Req<'_>, id: &str) -> ApiResult {
    let root = dir_of(req.app, req.ctx.tenant())?;
    sweep(req.app, &root);
    let dir = job_dir(req.app, req.ctx.tenant(), id)?;
    let job =
        read_record(&dir).ok_or_else(|| ApiError::not_found(format!("no export job {id}")))?;
    match job.state {
        State::InProgress => {
            let mut resp = StatusCode::ACCEPTED.into_response();
            let h = resp.headers_mut();
            let progress = format!("{} of {} types exported", job.done, job.types.len());
            if let Ok(v) = HeaderValue::from_str(&progress) {
                h.insert("x-progress", v);
            }
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(resp)
        }
        State::Failed => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            format!(
                "the export failed: {}",
                job.error.as_deref().unwrap_or("no reason was recorded")
            ),
        )),
        State::Complete => {
            let output: Vec<Value> = job
                .output
                .iter()
                .map(|o| {
                    json!({
                        "type": o.resource_type,
                        "url": format!("{}/$export-file/{}/{}", req.base, job.id, o.file),
                        "count": o.count,
                    })
                })
                .collect();
            let manifest = json!({
                "transactionTime": format_instant(fhirstore_core::from_micros(job.transaction_time)),
                "request": job.request,
                "requiresAccessToken": req.app.auth.enabled(),
                "output": output,
                "error": [],
            });
            let mut resp = (
                StatusCode::OK,
                serde_json::to_vec(&manifest).unwrap_or_default(),
            )
                .into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
    }
}

/// `DELETE [base]/$export-status/[id]`: cancels the job and removes its files.
pub(crate) async fn cancel(req: &Req<'_>, id: &str) -> ApiResult {
    let dir = job_dir(req.app, req.ctx.tenant(), id)?;
    if read_record(&dir).is_none() {
        return Err(ApiError::not_found(format!("no export job {id}")));
    }
    let key = (req.ctx.tenant().to_string(), id.to_owned());
    let running = req.app.exports.running().get(&key).cloned();
    if let Some(job) = running {
        // The job stops at its next page and removes its directory itself; wait for it, so
        // nothing it writes outlives the answer.
        let finished = job.finished.notified();
        job.cancel.store(true, Ordering::SeqCst);
        if req.app.exports.running().contains_key(&key) {
            let _ = tokio::time::timeout(Duration::from_secs(30), finished).await;
        }
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removal", e)),
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `GET [base]/$export-file/[id]/[file]`: one output file, streamed from disk.
pub(crate) async fn file(req: &Req<'_>, id: &str, name: &str) -> ApiResult {
    let dir = job_dir(req.app, req.ctx.tenant(), id)?;
    let job =
        read_record(&dir).ok_or_else(|| ApiError::not_found(format!("no export job {id}")))?;
    // Only a file the manifest lists: never a path a client made up.
    let listed = job.state == State::Complete && job.output.iter().any(|o| o.file == name);
    if !listed {
        return Err(ApiError::not_found(format!(
            "job {id} has no file {name:?}"
        )));
    }
    let f = tokio::fs::File::open(dir.join(name))
        .await
        .map_err(|e| io("file", e))?;
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(f)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(resp)
}

/// Removes the jobs of `root` (one tenant's) older than the configured time to live.
fn sweep(app: &App, root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let ttl = app.settings.export_ttl;
    let now = fhirstore_core::now_micros();
    for e in entries.flatten() {
        let dir = e.path();
        let Some(job) = read_record(&dir) else {
            continue;
        };
        let age = Duration::from_micros(u64::try_from(now - job.transaction_time).unwrap_or(0));
        if age > ttl {
            let key = (job.tenant.clone(), job.id.clone());
            if let Some(job) = app.exports.running().get(&key) {
                job.cancel.store(true, Ordering::SeqCst);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Removes every tenant's expired jobs.
pub fn sweep_all(app: &App) {
    let Some(root) = &app.settings.export_dir else {
        return;
    };
    for t in std::fs::read_dir(root).into_iter().flatten().flatten() {
        sweep(app, &t.path());
    }
}

/// At start-up: every job a previous run left in progress is recorded as failed (this
/// process runs none of them), and expired jobs are removed.
pub fn recover(app: &App) {
    sweep_all(app);
    let Some(root) = &app.settings.export_dir else {
        return;
    };
    let Ok(tenants) = std::fs::read_dir(root) else {
        return;
    };
    for t in tenants.flatten() {
        let Ok(jobs) = std::fs::read_dir(t.path()) else {
            continue;
        };
        for j in jobs.flatten() {
            let dir = j.path();
            let Some(mut job) = read_record(&dir) else {
                continue;
            };
            let key = (job.tenant.clone(), job.id.clone());
            if job.state == State::InProgress && !app.exports.running().contains_key(&key) {
                job.state = State::Failed;
                job.error = Some("the server stopped while this export ran; start it again".into());
                if let Err(e) = write_record(&dir, &job) {
                    tracing::warn!(job = %job.id, error = %e, "could not record an interrupted export");
                }
            }
        }
    }
}

/// The levels a kick-off path names.
pub(crate) fn level(segs: &[&str]) -> Option<Level> {
    match segs {
        ["$export"] => Some(Level::System),
        ["Patient", "$export"] => Some(Level::Patient),
        ["Group", id, "$export"] => Some(Level::Group((*id).to_owned())),
        _ => None,
    }
}
