//! Reconcile jobs started over HTTP, and the JSON both the server and the command print for
//! reports and sync status.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;

use fhirstore_core::{ResourceType, TenantId};
use fhirstore_sync::reconcile::{JobReport, JobRequest, ReconcileMode, ReconcileProgress};
use fhirstore_sync::SecondaryStatus;
use serde::Deserialize;
use serde_json::{json, Value};

/// What a caller may ask of a reconcile job (`POST /admin/reconcile`, `fhirstore reconcile`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcileAsk {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this resource type.
    #[serde(rename = "type")]
    pub resource_type: Option<String>,
    /// Only this secondary.
    pub secondary: Option<String>,
    /// Report without repairing.
    #[serde(default)]
    pub dry_run: bool,
    /// Deep-scrub each secondary first: hash what it holds again, to find keys lost or damaged
    /// out of band.
    #[serde(default)]
    pub deep: bool,
    /// The deep scrub's pace in documents a second (absent or 0: unbounded).
    #[serde(default)]
    pub deep_keys_per_second: Option<u64>,
}

impl ReconcileAsk {
    /// The library's request, or a message naming the bad field.
    pub fn request(&self) -> Result<JobRequest, String> {
        Ok(JobRequest {
            tenants: self
                .tenant
                .as_deref()
                .map(|t| TenantId::new(t).map(|t| vec![t]))
                .transpose()
                .map_err(|e| e.to_string())?,
            types: self
                .resource_type
                .as_deref()
                .map(|t| ResourceType::new(t).map(|t| vec![t]))
                .transpose()
                .map_err(|e| e.to_string())?,
            secondaries: self.secondary.clone().map(|s| vec![s]),
            mode: if self.dry_run {
                ReconcileMode::DryRun
            } else {
                ReconcileMode::Repair
            },
            max_segments: 10_000,
            self_check: false,
            deep: self.deep,
            deep_keys_per_second: self.deep_keys_per_second.unwrap_or(0),
        })
    }
}

/// The totals of a report, named as the reconcile issue names them.
pub fn totals(report: &JobReport) -> [(&'static str, u64); 5] {
    let sum = |f: fn(&fhirstore_sync::reconcile::TypeReport) -> u64| {
        report.entries.iter().map(f).sum::<u64>()
    };
    [
        ("missing", sum(|e| e.missing)),
        ("extra", sum(|e| e.extra)),
        ("stale", sum(|e| e.stale)),
        ("ahead", sum(|e| e.ahead)),
        ("repaired", sum(|e| e.repaired)),
    ]
}

/// A report as JSON: the totals at the top, then every (secondary, tenant, type) entry.
pub fn report_json(id: &str, report: &JobReport) -> Value {
    let mut v = json!({"job": id});
    for (name, n) in totals(report) {
        v[name] = json!(n);
    }
    v["cancelled"] = json!(report.cancelled);
    v["entries"] = serde_json::to_value(&report.entries).unwrap_or(Value::Null);
    v
}

/// One secondary's sync status as JSON.
pub fn status_json(s: &SecondaryStatus) -> Value {
    json!({
        "name": s.name,
        "mode": format!("{:?}", s.mode).to_lowercase(),
        "healthy": s.healthy,
        "health": format!("{:?}", s.health),
        "lagChanges": s.lag_changes,
        "lagMs": s.lag_ms,
        "applied": s.applied,
        "skipped": s.skipped,
        "errors": s.errors,
        "lastError": s.last_error,
        "deadLetters": s.dead_letters,
        "circuit": format!("{:?}", s.circuit).to_lowercase(),
        "backfilling": s.backfilling,
        "stopped": s.stopped,
        "cursor": {"major": s.cursor.major, "minor": s.cursor.minor},
    })
}

/// How many jobs the server remembers.
const KEEP_JOBS: usize = 100;

/// A job run by the server.
pub struct Job {
    state: Mutex<JobState>,
    /// Set to stop the job between steps.
    pub cancel: AtomicBool,
}

#[derive(Default)]
struct JobState {
    progress: ReconcileProgress,
    report: Option<(String, JobReport)>,
    error: Option<String>,
}

impl Job {
    /// Records progress.
    pub fn progress(&self, p: &ReconcileProgress) {
        self.state.lock().progress = p.clone();
    }

    /// Whether it has not ended yet.
    pub fn running(&self) -> bool {
        let s = self.state.lock();
        s.report.is_none() && s.error.is_none()
    }

    /// Records the end.
    pub fn finish(&self, result: Result<(String, JobReport), String>) {
        let mut s = self.state.lock();
        match result {
            Ok(r) => s.report = Some(r),
            Err(e) => s.error = Some(e),
        }
    }

    /// The job as JSON: `running`, `done` with its report, or `failed` with the error.
    pub fn json(&self, id: &str) -> Value {
        let s = self.state.lock();
        let mut v = json!({
            "id": id,
            "progress": serde_json::to_value(&s.progress).unwrap_or(Value::Null),
        });
        match (&s.report, &s.error) {
            (Some((job, report)), _) => {
                v["state"] = json!(if report.cancelled {
                    "cancelled"
                } else {
                    "done"
                });
                v["report"] = report_json(job, report);
            }
            (None, Some(e)) => {
                v["state"] = json!("failed");
                v["error"] = json!(e);
            }
            (None, None) => v["state"] = json!("running"),
        }
        v
    }
}

/// The server's jobs, by id.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
}

impl Jobs {
    /// Registers a new job and returns its id.
    pub fn start(&self) -> (String, Arc<Job>) {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let job = Arc::new(Job {
            state: Mutex::default(),
            cancel: AtomicBool::new(false),
        });
        let mut jobs = self.jobs.lock();
        // Ids are time-ordered: beyond the limit, the oldest finished jobs are forgotten.
        while jobs.len() >= KEEP_JOBS {
            let Some(old) = jobs
                .iter()
                .find(|(_, j)| !j.running())
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            jobs.remove(&old);
        }
        jobs.insert(id.clone(), job.clone());
        (id, job)
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().get(id).cloned()
    }

    /// Every job, oldest first.
    pub fn all(&self) -> Vec<(String, Arc<Job>)> {
        self.jobs
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
