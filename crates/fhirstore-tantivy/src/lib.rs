//! The tantivy secondary: FHIR's full-text parameters (`_text` over the narrative, `_content`
//! over every string of the resource, with `_sort=_score` for relevance) and field search on
//! tokens, references, uris, strings, dates, numbers, `_id` and `_lastUpdated`.
//!
//! One index and one schema hold every tenant and type. A resource is one document: its key,
//! version, `lastUpdated`, digest inputs (segment and element hash, as fast fields), stored body,
//! the two text fields, and one raw field per parameter kind whose terms are
//! `{param}\u{1f}{value}`, with the index entries coming from the primary's own extraction
//! (`fhirstore_core::index::extract`). Every query is scoped by tenant and type terms.
//!
//! Apply is version-guarded: a change replaces the key's document (delete-by-term, then add)
//! only when it is newer than the version held, counting changes applied but not yet committed.
//! Commits are batched, by count and by a timer; [`Secondary::flush`] commits at once. Searches
//! see what was committed (near-real-time); reads by id and digests flush first.
//!
//! The crate is laid out like every secondary: `config.rs` (settings), `apply.rs` (changes in),
//! `search.rs` (criteria to the backend's queries), `digests.rs` (what reconciliation compares)
//! and `lib.rs` (the type, its lifecycle and the `Secondary` impl).
//!
//! An index directory that is missing, unreadable, or was never marked built starts (or stays)
//! empty and reports [`Health::NeedsRebuild`]; reads and searches are refused until a rebuild
//! calls [`Secondary::mark_built`], so a damaged index never answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use fhirstore_core::date::{DateRange, DateValue, Prefix};
use fhirstore_core::digest::Digest;
use fhirstore_core::index::{self, IndexEntries};
use fhirstore_core::search::{
    Criterion, CriterionValues, Modifier, NumberValue, ParamType, Summary, TotalMode,
};
use fhirstore_core::secondary::{
    reference_term, reference_terms, token_term, token_terms, Applied, Change, DigestView, Health,
    KeyState, Secondary, SegmentDigest,
};
use fhirstore_core::{
    from_micros, now_micros, to_micros, Capabilities, Error, LogicalId, Permission, ResourceKey,
    ResourceType, Result, SearchPage, SearchQuery, StoredResource, TenantContext, TenantId,
    VersionId,
};
use serde_json::Value;
use tantivy::collector::{DocSetCollector, TopDocs};
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, RangeQuery, TermQuery, TermSetQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value as _, FAST, INDEXED,
    STORED, STRING,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer,
};
use tantivy::{
    DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term,
};

mod apply;
mod config;
mod digests;
mod search;

pub use config::TantivyConfig;
use search::{any_of, term_query};

/// The name this backend reports.
pub const BACKEND_NAME: &str = "tantivy";

/// The file whose presence says a rebuild completed into this directory.
const BUILT_MARKER: &str = "fhirstore-built";
/// Separates a parameter name from its value in a term.
const SEP: char = '\u{1f}';
/// The analyzer of the two full-text fields.
const TEXT_ANALYZER: &str = "fhir_text";
/// Terms longer than this are not indexed: tantivy cannot hold them, and no search names them.
const MAX_TERM_BYTES: usize = 4_000;

#[derive(Clone, Copy)]
struct Fields {
    key: Field,
    tenant: Field,
    rt: Field,
    id: Field,
    version: Field,
    lu: Field,
    deleted: Field,
    segment: Field,
    e_hi: Field,
    e_lo: Field,
    body: Field,
    text: Field,
    content: Field,
    tok: Field,
    rf: Field,
    uri: Field,
    st: Field,
    sx: Field,
    has: Field,
    dlo: Field,
    dhi: Field,
    nv: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let full_text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TEXT_ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqs),
    );
    let f = Fields {
        key: b.add_text_field("key", STRING),
        tenant: b.add_text_field("tenant", STRING),
        rt: b.add_text_field("rt", STRING),
        id: b.add_text_field("id", STRING | STORED | FAST),
        version: b.add_u64_field("version", STORED | FAST),
        lu: b.add_i64_field("lu", INDEXED | STORED | FAST),
        deleted: b.add_u64_field("deleted", INDEXED | FAST),
        segment: b.add_u64_field("segment", INDEXED | FAST),
        e_hi: b.add_u64_field("e_hi", FAST),
        e_lo: b.add_u64_field("e_lo", FAST),
        body: b.add_text_field("body", STORED),
        text: b.add_text_field("_text", full_text.clone()),
        content: b.add_text_field("_content", full_text),
        tok: b.add_text_field("tok", STRING),
        rf: b.add_text_field("ref", STRING),
        uri: b.add_text_field("uri", STRING),
        st: b.add_text_field("str", STRING),
        sx: b.add_text_field("str_exact", STRING),
        has: b.add_text_field("has", STRING),
        dlo: b.add_text_field("date_low", STRING),
        dhi: b.add_text_field("date_high", STRING),
        nv: b.add_text_field("number", STRING),
    };
    (b.build(), f)
}

fn index_err(e: impl std::fmt::Display) -> Error {
    Error::backend_msg(format!("tantivy: {e}"), false)
}

fn needs_rebuild_err() -> Error {
    Error::needs_rebuild(BACKEND_NAME, "the index is new, missing or damaged")
}

fn key_of(tenant: &TenantId, rt: ResourceType, id: &str) -> String {
    format!("{}{SEP}{rt}{SEP}{id}", tenant.as_str())
}

fn term(field: Field, param: &str, value: &str) -> Term {
    Term::from_field_text(field, &format!("{param}{SEP}{value}"))
}

/// An `i64` as 16 hex digits that sort as the numbers do.
fn ord_i64(v: i64) -> String {
    format!("{:016x}", (v as u64) ^ (1 << 63))
}

/// An `f64` as 16 hex digits that sort as the numbers do (-0 and 0 alike).
fn ord_f64(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v };
    let bits = v.to_bits();
    let key = if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    };
    format!("{key:016x}")
}

/// The pending (applied, uncommitted) versions, and the writer.
struct Writer {
    writer: IndexWriter,
    /// Key → (version, element hash) of each change applied since the last commit.
    pending: HashMap<String, (u64, u128)>,
}

/// The index and its reader: replaced whole when the index starts over (see
/// [`Inner::start_over`]).
struct Engine {
    index: Index,
    reader: IndexReader,
}

impl Engine {
    /// An engine over `index`, with the writer that goes with it.
    fn new(index: Index, config: &TantivyConfig) -> Result<(Engine, IndexWriter)> {
        let analyzer = TextAnalyzer::builder(SimpleTokenizer::default())
            .filter(RemoveLongFilter::limit(64))
            .filter(LowerCaser)
            .filter(AsciiFoldingFilter)
            .build();
        index.tokenizers().register(TEXT_ANALYZER, analyzer);
        let writer = TantivySecondary::writer(&index, config)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(index_err)?;
        Ok((Engine { index, reader }, writer))
    }
}

struct Inner {
    engine: parking_lot::RwLock<Engine>,
    writer: Mutex<Writer>,
    f: Fields,
    config: TantivyConfig,
    dir: Option<PathBuf>,
    built: AtomicBool,
    why_unbuilt: Mutex<String>,
    /// Segment digests per (tenant, type), computed by one scan on first use and kept up to
    /// date by `apply` from then on (under the writer lock, like the scan).
    digests: Mutex<HashMap<(TenantId, ResourceType), BTreeMap<u16, Digest>>>,
}

/// The tantivy secondary. Cheap to clone.
#[derive(Clone)]
pub struct TantivySecondary {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TantivySecondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TantivySecondary")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl TantivySecondary {
    /// Changes applied but not committed yet: they wait for the batch to fill, the commit
    /// timer, or the next read, search or digest, which commits them first.
    pub fn pending(&self) -> usize {
        self.inner.writer.lock().pending.len()
    }

    /// An index in memory, for tests: new, so it needs a rebuild until marked built.
    pub async fn in_memory(config: TantivyConfig) -> Result<Self> {
        let (schema, _) = schema();
        Self::start(
            Index::create_in_ram(schema),
            None,
            config,
            "new in-memory index",
        )
    }

    /// Opens the index in `dir`, creating it when missing. A directory that cannot be opened
    /// as our index is moved aside (`{dir}.damaged-{time}`) and replaced by an empty one; both
    /// cases, and an index never marked built, report [`Health::NeedsRebuild`].
    pub async fn open(dir: &Path, config: TantivyConfig) -> Result<Self> {
        let dir = dir.to_owned();
        // Opening reads the directory and may wait for a lock: off the async threads.
        tokio::task::spawn_blocking(move || {
            let (index, why) = Self::open_dir(&dir)?;
            Self::start(index, Some(dir), config, &why)
        })
        .await
        .map_err(index_err)?
    }

    fn open_dir(dir: &Path) -> Result<(Index, String)> {
        let (schema, _) = schema();
        let fresh = |why: String| -> Result<(Index, String)> {
            std::fs::create_dir_all(dir).map_err(index_err)?;
            Ok((
                Index::create_in_dir(dir, schema.clone()).map_err(index_err)?,
                why,
            ))
        };
        if !dir.join("meta.json").exists() {
            return fresh(format!("no index at {}", dir.display()));
        }
        match Index::open_in_dir(dir) {
            Ok(index) if index.schema() == schema => {
                let why = if dir.join(BUILT_MARKER).exists() {
                    String::new()
                } else {
                    "the index was never marked built".to_owned()
                };
                Ok((index, why))
            }
            outcome => {
                let why = match outcome {
                    Ok(_) => "the index has another schema".to_owned(),
                    Err(e) => format!("the index could not be opened: {e}"),
                };
                let aside = dir.with_extension(format!("damaged-{}", now_micros()));
                tracing::warn!(dir = %dir.display(), aside = %aside.display(), %why,
                    "moving a damaged tantivy index aside; it starts empty and needs a rebuild");
                std::fs::rename(dir, &aside).map_err(index_err)?;
                fresh(why)
            }
        }
    }

    fn start(index: Index, dir: Option<PathBuf>, config: TantivyConfig, why: &str) -> Result<Self> {
        let (_, f) = schema();
        let (engine, writer) = Engine::new(index, &config)?;
        let inner = Arc::new(Inner {
            engine: parking_lot::RwLock::new(engine),
            writer: Mutex::new(Writer {
                writer,
                pending: HashMap::new(),
            }),
            f,
            config,
            dir,
            built: AtomicBool::new(why.is_empty()),
            why_unbuilt: Mutex::new(why.to_owned()),
            digests: Mutex::new(HashMap::new()),
        });
        Self::spawn_committer(Arc::downgrade(&inner));
        Ok(TantivySecondary { inner })
    }

    /// The index writer. A previous instance on the same directory that is still shutting
    /// down (its last background commit finishing) holds the lock for a moment: wait for it,
    /// up to two seconds, rather than fail the open.
    fn writer(index: &Index, config: &TantivyConfig) -> Result<IndexWriter> {
        let mut waited = Duration::ZERO;
        loop {
            match index.writer(config.writer_memory.max(15_000_000)) {
                Ok(w) => return Ok(w),
                Err(tantivy::TantivyError::LockFailure(..)) if waited < Duration::from_secs(2) => {
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                }
                Err(e) => return Err(index_err(e)),
            }
        }
    }

    /// Commits waiting changes every `commit_interval`, until the secondary is dropped.
    fn spawn_committer(weak: Weak<Inner>) {
        let Some(interval) = weak.upgrade().map(|i| i.config.commit_interval) else {
            return;
        };
        tokio::spawn(async move {
            // The first commit is one interval away: `interval` alone ticks at once, which
            // would commit whatever the first applies left, whenever it happened to run.
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let result = tokio::task::spawn_blocking(move || inner.commit_if_pending()).await;
                if let Ok(Err(e)) = result {
                    tracing::warn!(error = %e, "tantivy background commit failed; will retry");
                }
            }
        });
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(index_err)?
    }

    fn require_built(&self) -> Result<()> {
        if self.inner.built.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(needs_rebuild_err())
        }
    }
}

/// Per-segment fast-field readers, opened once per search.
struct Columns {
    id: Option<tantivy::columnar::StrColumn>,
    version: tantivy::columnar::Column<u64>,
    lu: tantivy::columnar::Column<i64>,
    e_hi: tantivy::columnar::Column<u64>,
    e_lo: tantivy::columnar::Column<u64>,
}

/// What the fast fields say about one document.
struct Meta {
    id: String,
    version: u64,
    lu: i64,
    e: u128,
}

fn columns(searcher: &Searcher) -> Result<Vec<Columns>> {
    searcher
        .segment_readers()
        .iter()
        .map(|r| {
            let ff = r.fast_fields();
            Ok(Columns {
                id: ff.str("id").map_err(index_err)?,
                version: ff.u64("version").map_err(index_err)?,
                lu: ff.i64("lu").map_err(index_err)?,
                e_hi: ff.u64("e_hi").map_err(index_err)?,
                e_lo: ff.u64("e_lo").map_err(index_err)?,
            })
        })
        .collect()
}

fn meta(cols: &[Columns], a: DocAddress) -> Result<Meta> {
    let c = cols
        .get(a.segment_ord as usize)
        .ok_or_else(|| index_err("segment out of range"))?;
    let d = a.doc_id;
    let mut id = String::new();
    if let Some(ids) = &c.id {
        if let Some(ord) = ids.term_ords(d).next() {
            ids.ord_to_str(ord, &mut id).map_err(index_err)?;
        }
    }
    let missing = || index_err(format!("document {a:?} lacks a fast field"));
    Ok(Meta {
        id,
        version: c.version.first(d).ok_or_else(missing)?,
        lu: c.lu.first(d).ok_or_else(missing)?,
        e: (u128::from(c.e_hi.first(d).ok_or_else(missing)?) << 64)
            | u128::from(c.e_lo.first(d).ok_or_else(missing)?),
    })
}

impl Inner {
    fn scope(&self, tenant: &TenantId, rt: ResourceType) -> Vec<Box<dyn Query>> {
        vec![
            term_query(Term::from_field_text(self.f.tenant, tenant.as_str())),
            term_query(Term::from_field_text(self.f.rt, rt.as_str())),
        ]
    }

    fn commit_if_pending(&self) -> Result<()> {
        let mut w = self.writer.lock();
        if w.pending.is_empty() {
            return Ok(());
        }
        self.commit(&mut w)
    }

    fn commit(&self, w: &mut Writer) -> Result<()> {
        w.writer.commit().map_err(index_err)?;
        self.engine().reader.reload().map_err(index_err)?;
        w.pending.clear();
        Ok(())
    }

    fn engine(&self) -> parking_lot::RwLockReadGuard<'_, Engine> {
        self.engine.read()
    }

    fn searcher(&self) -> tantivy::Searcher {
        self.engine().reader.searcher()
    }

    /// Starts over empty in `dir`, which lost the index (deleted, or its volume replaced)
    /// while the process ran: whatever the index still answers from its open files would not
    /// survive a restart, so it is emptied, unmarked and rebuilt like a new one. The writer
    /// lock is held throughout, so no apply interleaves.
    fn start_over(&self, dir: &Path, why: &str) -> Result<()> {
        let mut w = self.writer.lock();
        if !self.built.load(Ordering::Acquire) {
            // Another probe got here first.
            return Ok(());
        }
        tracing::warn!(dir = %dir.display(), %why, "the tantivy index starts over empty and needs a rebuild");
        self.built.store(false, Ordering::Release);
        *self.why_unbuilt.lock() = why.to_owned();
        // Whatever is left of the old files is not to be trusted: a new index in their place.
        // The old writer's lock file went with the directory, so the new writer can lock.
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(index_err)?;
        let (schema, _) = schema();
        let index = Index::create_in_dir(dir, schema).map_err(index_err)?;
        let (engine, writer) = Engine::new(index, &self.config)?;
        let old = std::mem::replace(&mut w.writer, writer);
        w.pending.clear();
        *self.engine.write() = engine;
        self.digests.lock().clear();
        drop(old);
        Ok(())
    }
}

#[async_trait]
impl Secondary for TantivySecondary {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.name = BACKEND_NAME;
        caps.read = true;
        caps.search_params = vec!["_id", "_lastUpdated", "_text", "_content"];
        caps.search_types = vec![
            ParamType::Token,
            ParamType::Reference,
            ParamType::Uri,
            ParamType::String,
            ParamType::Date,
            ParamType::Number,
        ];
        caps.modifiers = vec!["not", "exact", "missing"];
        caps.sort_params = vec!["_score", "_id", "_lastUpdated"];
        caps.id_sets = true;
        caps
    }

    async fn apply(&self, changes: &[Change]) -> Result<Applied> {
        if changes.is_empty() {
            return Ok(Applied::default());
        }
        let changes = changes.to_vec();
        self.blocking(move |inner| inner.apply(&changes, false))
            .await
    }

    async fn repair(&self, changes: &[Change]) -> Result<Applied> {
        let changes = changes.to_vec();
        self.blocking(move |inner| inner.apply(&changes, true))
            .await
    }

    async fn read(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<StoredResource>> {
        ctx.require(Permission::Read)?;
        self.require_built()?;
        let tenant = ctx.tenant().clone();
        let id = id.clone();
        self.blocking(move |inner| {
            inner.commit_if_pending()?;
            let searcher = inner.searcher();
            let key = key_of(&tenant, resource_type, id.as_str());
            let q = TermQuery::new(
                Term::from_field_text(inner.f.key, &key),
                IndexRecordOption::Basic,
            );
            let Some(a) = searcher
                .search(&q, &DocSetCollector)
                .map_err(index_err)?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            let cols = columns(&searcher)?;
            let m = meta(&cols, a)?;
            let doc: TantivyDocument = searcher.doc(a).map_err(index_err)?;
            let body = doc.get_first(inner.f.body).and_then(|v| v.as_str());
            Ok(Some(StoredResource {
                tenant,
                key: ResourceKey { resource_type, id },
                version: VersionId::new(m.version).ok_or_else(|| index_err("version 0"))?,
                last_updated: from_micros(m.lu),
                deleted: body.is_none(),
                content: match body {
                    Some(b) => serde_json::from_str(b).map_err(index_err)?,
                    None => Value::Null,
                },
            }))
        })
        .await
    }

    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage> {
        ctx.require(Permission::Read)?;
        if !self.capabilities().can_search(query) {
            return Err(Error::Unsupported(
                "tantivy cannot answer this search (see its capabilities)".to_owned(),
            ));
        }
        self.require_built()?;
        let tenant = ctx.tenant().clone();
        let query = query.clone();
        // Applied means searchable: a synchronous apply returns before the batch commits, and
        // a search routed here right after the write must see it, as a read by id does.
        self.blocking(move |inner| {
            inner.commit_if_pending()?;
            inner.search(&tenant, &query)
        })
        .await
    }

    async fn search_ids(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        limit: usize,
    ) -> Result<Vec<LogicalId>> {
        ctx.require(Permission::Read)?;
        let criteria_only = SearchQuery {
            resource_type: query.resource_type,
            criteria: query.criteria.clone(),
            sort: query.sort.clone(),
            among: query.among.clone(),
            ..SearchQuery::default()
        };
        if !self.capabilities().can_search(&criteria_only) {
            return Err(Error::Unsupported(
                "tantivy cannot answer this search (see its capabilities)".to_owned(),
            ));
        }
        self.require_built()?;
        let tenant = ctx.tenant().clone();
        self.blocking(move |inner| {
            inner.commit_if_pending()?;
            inner.search_ids(&tenant, &criteria_only, limit)
        })
        .await
    }

    async fn clear(&self, tenant: &TenantId) -> Result<()> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let mut w = inner.writer.lock();
            w.writer
                .delete_term(Term::from_field_text(inner.f.tenant, tenant.as_str()));
            let prefix = format!("{}{SEP}", tenant.as_str());
            w.pending.retain(|k, _| !k.starts_with(&prefix));
            inner.digests.lock().retain(|(t, _), _| *t != tenant);
            inner.commit(&mut w)
        })
        .await
    }

    async fn mark_built(&self) -> Result<()> {
        self.flush().await?;
        if let Some(dir) = &self.inner.dir {
            let marker = dir.join(BUILT_MARKER);
            let stamp = now_micros().to_string();
            tokio::task::spawn_blocking(move || std::fs::write(&marker, stamp))
                .await
                .map_err(index_err)?
                .map_err(index_err)?;
        }
        self.inner.why_unbuilt.lock().clear();
        self.inner.built.store(true, Ordering::Release);
        Ok(())
    }

    async fn health(&self) -> Health {
        if let Some(dir) = self.inner.dir.clone() {
            // The marker is written when a build completes and removed with the directory: a
            // built index without it lost its files under the running process.
            if self.inner.built.load(Ordering::Acquire) && !dir.join(BUILT_MARKER).exists() {
                let why = if dir.join("meta.json").exists() {
                    "the index's built marker was removed"
                } else {
                    "the index directory was deleted"
                };
                let reset = self
                    .blocking(move |inner| inner.start_over(&dir, why))
                    .await;
                if let Err(e) = reset {
                    return Health::Unavailable(format!("the index cannot start over: {e}"));
                }
            }
        }
        if self.inner.built.load(Ordering::Acquire) {
            Health::Healthy
        } else {
            Health::NeedsRebuild(self.inner.why_unbuilt.lock().clone())
        }
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|inner| inner.commit_if_pending()).await
    }
}
