//! `fhirstore import`: JSON files holding a resource or a Bundle, NDJSON files, and folders of
//! them.
//!
//! A transaction Bundle is one transaction, and a batch Bundle one batch (their read entries
//! are skipped: there is no one to answer them to); any other Bundle
//! (collection, searchset, …) is imported entry by entry. Files are streamed: NDJSON line by
//! line, and a Bundle entry by entry as it is parsed, so a file of any size needs memory for
//! one chunk of resources only. Resources with an id keep it (an update, or update-as-create),
//! so references between imported files hold; those without get a new one.
//!
//! Resources from single-resource files, NDJSON lines and Bundles imported entry by entry are
//! written in chunks of [`CHUNK`] per transaction, across file boundaries, so a folder of
//! small files costs one commit per chunk, not per file.
//!
//! On bad input the import stops with the file and entry (or line) named, having stored
//! everything before it: a chunk that fails is retried entry by entry up to the bad one. With
//! [`ImportOptions::keep_going`] it records what it could not take instead ([`Rejection`]:
//! file, entry or line, HTTP-style status and `OperationOutcome`) and imports the rest.

use std::path::{Path, PathBuf};

use fhirstore_core::bundle::write_ops;
use fhirstore_core::{Error, LogicalId, ResourceStorage, ResourceType, TenantContext, WriteOp};
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// Resources written per transaction when importing entry by entry.
pub const CHUNK: usize = 500;

/// Bad input or a failed write, with where it was.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), at.as_deref().map(|a| format!(", {a}")).unwrap_or_default())]
pub struct ImportError {
    /// The file.
    pub file: PathBuf,
    /// `entry N` or `line N`, when the fault is in one.
    pub at: Option<String>,
    /// What was wrong.
    pub message: String,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Files read.
    pub files: u64,
    /// Resources written (created, updated or deleted).
    pub resources: u64,
    /// Transactions and batches committed.
    pub commits: u64,
    /// Resources, lines, entries or files not taken (with [`ImportOptions::keep_going`]).
    pub rejected: u64,
}

/// How an import treats bad input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// Record what cannot be imported and go on, instead of stopping at it.
    pub keep_going: bool,
}

/// Something the import could not take, as a server would have answered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The file.
    pub file: PathBuf,
    /// `entry N`, `line N` or `the transaction`; `None` for the whole file.
    pub at: Option<String>,
    /// The HTTP status a server would have answered (400, 412, 422, …).
    pub status: u16,
    /// The `OperationOutcome` it would have answered with.
    pub outcome: Value,
}

impl Rejection {
    /// One line of the report.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "file": self.file.display().to_string(),
            "at": self.at,
            "status": self.status,
            "outcome": self.outcome,
        })
    }
}

/// What went wrong with one item: a store error, or input that is not what it should be.
enum Fault {
    Store(Error),
    Input(String),
}

impl Fault {
    fn message(&self) -> String {
        match self {
            Fault::Store(e) => e.to_string(),
            Fault::Input(m) => m.clone(),
        }
    }
}

/// The result of an import: its counts and what it did not take.
#[derive(Clone, Debug, Default)]
pub struct ImportReport {
    /// The counts.
    pub stats: ImportStats,
    /// Each rejection, in the order met.
    pub rejections: Vec<Rejection>,
}

/// The JSON and NDJSON files under `paths`, in name order.
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ImportError> {
    let mut out = Vec::new();
    for p in paths {
        collect(p, &mut out)?;
    }
    Ok(out)
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), ImportError> {
    let err = |e: std::io::Error| ImportError {
        file: p.to_owned(),
        at: None,
        message: e.to_string(),
    };
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        entries.sort();
        for e in entries {
            if e.is_dir() || is_data(&e) {
                collect(&e, out)?;
            }
        }
    } else if p.exists() {
        out.push(p.to_owned());
    } else {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file or directory",
        )));
    }
    Ok(())
}

fn is_data(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("json" | "ndjson" | "jsonl")
    )
}

/// Writes resources in chunks, remembering where each came from.
struct Writer<'a> {
    store: &'a dyn ResourceStorage,
    ctx: &'a TenantContext,
    /// Each pending write with its file and place, across files.
    pending: Vec<(WriteOp, PathBuf, String)>,
    /// The resources `pending` updates, each at most once per transaction.
    pending_keys: std::collections::HashSet<(ResourceType, LogicalId)>,
    file: PathBuf,
    stats: ImportStats,
    options: ImportOptions,
    rejections: Vec<Rejection>,
    progress: &'a (dyn Fn(&ImportStats) + Send + Sync),
}

impl Writer<'_> {
    fn fail(&self, at: Option<String>, message: impl Into<String>) -> ImportError {
        ImportError {
            file: self.file.clone(),
            at,
            message: message.into(),
        }
    }

    /// Something in `file` at `at` could not be taken: recorded when the import keeps going,
    /// else the error that stops it.
    fn reject(
        &mut self,
        file: PathBuf,
        at: Option<String>,
        fault: Fault,
    ) -> Result<(), ImportError> {
        if !self.options.keep_going {
            return Err(ImportError {
                file,
                at,
                message: fault.message(),
            });
        }
        let api = match fault {
            Fault::Store(e) => crate::outcome::ApiError::from(e),
            Fault::Input(m) => crate::outcome::ApiError::bad_request(m),
        };
        self.rejections.push(Rejection {
            file,
            at,
            status: api.status.as_u16(),
            outcome: api.outcome(),
        });
        self.stats.rejected += 1;
        (self.progress)(&self.stats);
        Ok(())
    }

    async fn push(&mut self, resource: Value, at: String) -> Result<(), ImportError> {
        match resource_op(resource) {
            Ok(op) => {
                // One transaction writes a resource once: a second version of it (the same
                // example in two files) starts the next chunk.
                if let WriteOp::Update {
                    resource_type, id, ..
                } = &op
                {
                    if !self.pending_keys.insert((*resource_type, id.clone())) {
                        self.flush().await?;
                        self.pending_keys.insert((*resource_type, id.clone()));
                    }
                }
                self.pending.push((op, self.file.clone(), at));
            }
            Err(e) => self.reject(self.file.clone(), Some(at), Fault::Store(e))?,
        }
        if self.pending.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// Commits the pending chunk; if it fails, commits its entries one by one, and reports
    /// (or, keeping going, records) each one that fails.
    async fn flush(&mut self) -> Result<(), ImportError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.pending);
        self.pending_keys.clear();
        self.commit(chunk).await?;
        (self.progress)(&self.stats);
        Ok(())
    }

    /// Commits `chunk` as one transaction; one that fails is split in halves, so a bad
    /// entry among hundreds costs a few commits, not one per entry. Without keep-going, the
    /// entries before the first bad one are committed, and it stops there.
    fn commit(
        &mut self,
        chunk: Vec<(WriteOp, PathBuf, String)>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ImportError>> + Send + '_>>
    {
        Box::pin(async move {
            if chunk.is_empty() {
                return Ok(());
            }
            let ops: Vec<WriteOp> = chunk.iter().map(|(op, _, _)| op.clone()).collect();
            match self.store.transaction(self.ctx, ops).await {
                Ok(outcomes) => {
                    self.stats.resources += outcomes.len() as u64;
                    self.stats.commits += 1;
                    Ok(())
                }
                Err(e) if e.is_temporary() => {
                    let (_, file, at) = &chunk[0];
                    Err(ImportError {
                        file: file.clone(),
                        at: Some(at.clone()),
                        message: e.to_string(),
                    })
                }
                Err(e) if chunk.len() == 1 => {
                    let Some((_, file, at)) = chunk.into_iter().next() else {
                        return Ok(());
                    };
                    self.reject(file, Some(at), Fault::Store(e))
                }
                Err(_) => {
                    let mut first = chunk;
                    let second = first.split_off(first.len() / 2);
                    self.commit(first).await?;
                    self.commit(second).await
                }
            }
        })
    }

    /// A transaction or batch Bundle, as one call.
    async fn bundle(&mut self, mut bundle: Value, transaction: bool) -> Result<(), ImportError> {
        self.flush().await?;
        // Reads change nothing; an import has no one to answer them to.
        if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
            entries.retain(|e| {
                !matches!(
                    e.pointer("/request/method").and_then(Value::as_str),
                    Some("GET" | "HEAD")
                )
            });
        }
        let ops = match write_ops(&bundle) {
            Ok(ops) => ops,
            Err(e) => return self.reject(self.file.clone(), None, Fault::Store(e)),
        };
        let n = ops.len() as u64;
        if transaction {
            match self.store.transaction(self.ctx, ops).await {
                Ok(_) => self.stats.resources += n,
                Err(e) if e.is_temporary() => {
                    return Err(self.fail(None, format!("the transaction failed: {e}")))
                }
                Err(e) => {
                    let file = self.file.clone();
                    return self.reject(file, Some("the transaction".into()), Fault::Store(e));
                }
            }
        } else {
            let results = self
                .store
                .batch(self.ctx, ops)
                .await
                .map_err(|e| self.fail(None, e.to_string()))?;
            for (i, r) in results.into_iter().enumerate() {
                match r {
                    Ok(_) => self.stats.resources += 1,
                    Err(e) => {
                        let file = self.file.clone();
                        self.reject(file, Some(format!("entry {i}")), Fault::Store(e))?;
                    }
                }
            }
        }
        self.stats.commits += 1;
        (self.progress)(&self.stats);
        Ok(())
    }
}

/// How one resource is written: as an update when it carries an id, so the id is kept.
fn resource_op(resource: Value) -> fhirstore_core::Result<WriteOp> {
    let rt = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidResource("no resourceType".into()))?;
    let resource_type = ResourceType::new(rt)?;
    Ok(match resource.get("id").and_then(Value::as_str) {
        Some(id) => WriteOp::Update {
            resource_type,
            id: LogicalId::new(id)?,
            resource,
            if_match: None,
        },
        None => WriteOp::Create {
            resource_type,
            resource,
            if_none_exist: None,
            full_url: None,
        },
    })
}

/// What the parser hands the writer.
enum Item {
    /// An entry of a Bundle imported entry by entry.
    Entry(usize, Value),
    /// A whole resource, or a whole transaction or batch Bundle.
    Whole(Value),
    /// The file could not be parsed.
    Bad(String),
}

/// Imports every file under `paths` into the tenant. `progress` is called after each commit
/// and each rejection.
pub async fn import(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    paths: &[PathBuf],
    options: ImportOptions,
    progress: &(dyn Fn(&ImportStats) + Send + Sync),
) -> Result<ImportReport, ImportError> {
    let files = files(paths)?;
    let mut w = Writer {
        store,
        ctx,
        pending: Vec::new(),
        pending_keys: Default::default(),
        file: PathBuf::new(),
        stats: ImportStats::default(),
        options,
        rejections: Vec::new(),
        progress,
    };
    for file in files {
        w.file = file.clone();
        let ndjson = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("ndjson" | "jsonl")
        );
        if ndjson {
            ndjson_file(&mut w, &file).await?;
        } else {
            json_file(&mut w, &file).await?;
        }
        w.stats.files += 1;
        progress(&w.stats);
    }
    w.flush().await?;
    progress(&w.stats);
    // A bulk load leaves the planner's statistics behind the data. The import itself stands
    // whatever happens here.
    if let Err(e) = store.refresh_statistics(ctx).await {
        tracing::warn!(error = %e, "refreshing statistics after the import failed");
    }
    Ok(ImportReport {
        stats: w.stats,
        rejections: w.rejections,
    })
}

async fn ndjson_file(w: &mut Writer<'_>, file: &Path) -> Result<(), ImportError> {
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|e| w.fail(None, e.to_string()))?;
    let mut lines = tokio::io::BufReader::new(f).lines();
    let mut n = 0usize;
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| w.fail(Some(format!("line {}", n + 1)), e.to_string()))?
    {
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {n}");
        match fhirstore_core::json::from_slice_strict(line.as_bytes()) {
            Ok(v) => w.push(v, at).await?,
            Err(e) => {
                // Keep what came before the bad line.
                w.flush().await?;
                let file = w.file.clone();
                w.reject(file, Some(at), Fault::Input(format!("not JSON: {e}")))?;
            }
        }
    }
    Ok(())
}

async fn json_file(w: &mut Writer<'_>, file: &Path) -> Result<(), ImportError> {
    let f = std::fs::File::open(file).map_err(|e| w.fail(None, e.to_string()))?;
    let (tx, mut rx) = mpsc::channel::<Item>(256);
    let parser = tokio::task::spawn_blocking(move || {
        // Duplicate keys stop the parse where they are, as any other malformed JSON does.
        let reader = fhirstore_core::json::NoDuplicateKeys::new(std::io::BufReader::new(f));
        let mut de = serde_json::Deserializer::from_reader(reader);
        let result = FileSeed { tx: &tx }
            .deserialize(&mut de)
            .and_then(|()| de.end());
        if let Err(e) = result {
            let _ = tx.blocking_send(Item::Bad(e.to_string()));
        }
    });
    let mut outcome = Ok(());
    while let Some(item) = rx.recv().await {
        let step = match item {
            Item::Entry(i, entry) => match entry.get("resource").cloned() {
                Some(r) => w.push(r, format!("entry {i}")).await,
                None => Ok(()),
            },
            Item::Whole(v) => {
                let kind = v.get("type").and_then(Value::as_str);
                match (v.get("resourceType").and_then(Value::as_str), kind) {
                    (Some("Bundle"), Some("transaction")) => w.bundle(v, true).await,
                    (Some("Bundle"), Some("batch")) => w.bundle(v, false).await,
                    _ => w.push(v, "the resource".to_owned()).await,
                }
            }
            Item::Bad(e) => {
                w.flush().await?;
                let file = w.file.clone();
                w.reject(file, None, Fault::Input(format!("not valid JSON: {e}")))
            }
        };
        if let Err(e) = step {
            outcome = Err(e);
            break;
        }
    }
    // Dropping the receiver stops the parser at its next entry.
    drop(rx);
    let _ = parser.await;
    outcome
}

struct FileSeed<'a> {
    tx: &'a mpsc::Sender<Item>,
}

impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a FHIR resource or Bundle")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut obj = Map::new();
        let mut streamed = false;
        while let Some(key) = map.next_key::<String>()? {
            // Stream the entries of a Bundle whose type says it is imported entry by entry;
            // R4 JSON puts `type` before `entry`, and anything else is read whole.
            let stream = key == "entry"
                && obj.get("resourceType").and_then(Value::as_str) == Some("Bundle")
                && obj
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t != "transaction" && t != "batch");
            if stream {
                map.next_value_seed(Entries { tx: self.tx })?;
                streamed = true;
            } else {
                let v: Value = map.next_value()?;
                obj.insert(key, v);
            }
        }
        if streamed {
            return Ok(());
        }
        let send = |item| {
            self.tx
                .blocking_send(item)
                .map_err(|_| A::Error::custom("the import stopped"))
        };
        let whole = Value::Object(obj);
        let entry_by_entry = whole.get("resourceType").and_then(Value::as_str) == Some("Bundle")
            && !matches!(
                whole.get("type").and_then(Value::as_str),
                Some("transaction" | "batch")
            );
        if entry_by_entry {
            if let Some(Value::Array(entries)) = whole.get("entry") {
                for (i, e) in entries.iter().enumerate() {
                    send(Item::Entry(i, e.clone()))?;
                }
            }
            return Ok(());
        }
        send(Item::Whole(whole))
    }
}

struct Entries<'a> {
    tx: &'a mpsc::Sender<Item>,
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of Bundle entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(e) = seq.next_element::<Value>()? {
            self.tx
                .blocking_send(Item::Entry(i, e))
                .map_err(|_| A::Error::custom("the import stopped"))?;
            i += 1;
        }
        Ok(())
    }
}
