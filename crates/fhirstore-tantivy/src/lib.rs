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
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, RangeQuery, TermQuery};
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

/// Commit batching and memory.
#[derive(Clone, Debug)]
pub struct TantivyConfig {
    /// Commit once this many changes are waiting.
    pub commit_every: usize,
    /// And at least this often while any are waiting.
    pub commit_interval: Duration,
    /// The index writer's memory budget.
    pub writer_memory: usize,
}

impl Default for TantivyConfig {
    fn default() -> Self {
        TantivyConfig {
            commit_every: 10_000,
            commit_interval: Duration::from_secs(1),
            writer_memory: 64 << 20,
        }
    }
}

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

/// A range over one parameter's terms in a raw field; an open end stays within the parameter.
fn term_range(field: Field, param: &str, lo: Bound<String>, hi: Bound<String>) -> Box<dyn Query> {
    let at = |v: String| term(field, param, &v);
    let lo = match lo {
        Bound::Included(v) => Bound::Included(at(v)),
        Bound::Excluded(v) => Bound::Excluded(at(v)),
        Bound::Unbounded => Bound::Included(at(String::new())),
    };
    let hi = match hi {
        Bound::Included(v) => Bound::Included(at(v)),
        Bound::Excluded(v) => Bound::Excluded(at(v)),
        Bound::Unbounded => Bound::Included(at("~".to_owned())),
    };
    Box::new(RangeQuery::new(lo, hi))
}

fn any_of(mut qs: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    if qs.len() == 1 {
        return qs.remove(0);
    }
    Box::new(BooleanQuery::new(
        qs.into_iter().map(|q| (Occur::Should, q)).collect(),
    ))
}

fn all_of(qs: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(
        qs.into_iter().map(|q| (Occur::Must, q)).collect(),
    ))
}

fn term_query(t: Term) -> Box<dyn Query> {
    Box::new(TermQuery::new(t, IndexRecordOption::Basic))
}

/// The narrative's text: tags dropped, the common entities decoded.
fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// Every string value of the resource, the narrative as text, for `_content`.
fn all_strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| all_strings(x, out)),
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("div", Value::String(html)) => {
                        out.push_str(&strip_html(html));
                        out.push(' ');
                    }
                    _ => all_strings(x, out),
                }
            }
        }
        _ => {}
    }
}

/// Whether a stored range matches any of a criterion's date values, by the core's rule.
fn dates_match(e: &IndexEntries, param: &str, values: &[DateValue], now: i64) -> bool {
    e.dates.iter().filter(|d| d.param == param).any(|d| {
        let stored = DateRange {
            low: d.low,
            high: d.high,
        };
        values.iter().any(|v| v.matches(stored, now))
    })
}

/// The documents whose date values could match: a necessary condition on the stored range's
/// low or high end for each prefix (exact for the one-sided prefixes), verified afterwards.
fn date_candidates(f: &Fields, param: &str, d: &DateValue, now: i64) -> Box<dyn Query> {
    let q = d.range;
    let lo =
        |b: Bound<i64>, c: Bound<i64>| term_range(f.dlo, param, b.map(ord_i64), c.map(ord_i64));
    let hi =
        |b: Bound<i64>, c: Bound<i64>| term_range(f.dhi, param, b.map(ord_i64), c.map(ord_i64));
    use Bound::{Excluded as Ex, Included as In, Unbounded as Un};
    match d.prefix {
        Prefix::Eq => all_of(vec![lo(In(q.low), Un), hi(Un, In(q.high))]),
        Prefix::Ne => any_of(vec![lo(Un, Ex(q.low)), hi(Ex(q.high), Un)]),
        Prefix::Gt => hi(Ex(q.high), Un),
        Prefix::Lt => lo(Un, Ex(q.low)),
        Prefix::Ge => any_of(vec![hi(Ex(q.high), Un), lo(In(q.low), Un)]),
        Prefix::Le => any_of(vec![lo(Un, Ex(q.low)), hi(Un, In(q.high))]),
        Prefix::Sa => lo(In(q.high), Un),
        Prefix::Eb => hi(Un, In(q.low)),
        Prefix::Ap => {
            let a = d.approximate_bounds(now);
            all_of(vec![lo(Un, Ex(a.high)), hi(Ex(a.low), Un)])
        }
    }
}

/// A number criterion, exactly as the primary evaluates it against the stored value.
fn number_query(f: &Fields, param: &str, n: &NumberValue) -> Box<dyn Query> {
    use Bound::{Excluded as Ex, Included as In, Unbounded as Un};
    let r = |a: Bound<f64>, b: Bound<f64>| term_range(f.nv, param, a.map(ord_f64), b.map(ord_f64));
    match n.prefix {
        Prefix::Eq => r(In(n.low), Ex(n.high)),
        Prefix::Ne => any_of(vec![r(Un, Ex(n.low)), r(In(n.high), Un)]),
        Prefix::Ap => {
            let pad = (n.value.abs() * 0.1).max(n.high - n.low);
            r(In(n.value - pad), In(n.value + pad))
        }
        Prefix::Gt | Prefix::Sa => r(Ex(n.value), Un),
        Prefix::Lt | Prefix::Eb => r(Un, Ex(n.value)),
        Prefix::Ge => r(In(n.value), Un),
        Prefix::Le => r(Un, In(n.value)),
    }
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

/// Folds the matching documents' element hashes into digest segments from the three digest fast
/// fields alone: the cold computation of a type's digests reads no ids and no bodies. The fruit
/// is one digest per digest segment (all 65,536) and the number of documents lacking a field.
struct DigestCollector;

/// [`DigestCollector`] over one index segment.
struct DigestSegmentCollector {
    segment: tantivy::columnar::Column<u64>,
    e_hi: tantivy::columnar::Column<u64>,
    e_lo: tantivy::columnar::Column<u64>,
    by: Vec<Digest>,
    missing: u64,
}

impl tantivy::collector::Collector for DigestCollector {
    type Fruit = (Vec<Digest>, u64);
    type Child = DigestSegmentCollector;

    fn for_segment(
        &self,
        _ord: tantivy::SegmentOrdinal,
        reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<DigestSegmentCollector> {
        let ff = reader.fast_fields();
        Ok(DigestSegmentCollector {
            segment: ff.u64("segment")?,
            e_hi: ff.u64("e_hi")?,
            e_lo: ff.u64("e_lo")?,
            by: vec![Digest::default(); fhirstore_core::digest::SEGMENTS as usize],
            missing: 0,
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<(Vec<Digest>, u64)>) -> tantivy::Result<(Vec<Digest>, u64)> {
        let mut out = vec![Digest::default(); fhirstore_core::digest::SEGMENTS as usize];
        let mut missing = 0;
        for (by, m) in fruits {
            missing += m;
            for (o, d) in out.iter_mut().zip(by) {
                o.merge(d);
            }
        }
        Ok((out, missing))
    }
}

impl tantivy::collector::SegmentCollector for DigestSegmentCollector {
    type Fruit = (Vec<Digest>, u64);

    fn collect(&mut self, doc: tantivy::DocId, _score: tantivy::Score) {
        let (Some(s), Some(hi), Some(lo)) = (
            self.segment.first(doc),
            self.e_hi.first(doc),
            self.e_lo.first(doc),
        ) else {
            self.missing += 1;
            return;
        };
        match self.by.get_mut(s as usize) {
            Some(d) => d.add((u128::from(hi) << 64) | u128::from(lo)),
            None => self.missing += 1,
        }
    }

    fn harvest(self) -> (Vec<Digest>, u64) {
        (self.by, self.missing)
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

    fn held_version(
        &self,
        searcher: &Searcher,
        cols: &[Columns],
        key: &str,
    ) -> Result<Option<(u64, u128)>> {
        let q = TermQuery::new(
            Term::from_field_text(self.f.key, key),
            IndexRecordOption::Basic,
        );
        let hits = searcher.search(&q, &DocSetCollector).map_err(index_err)?;
        let mut best: Option<(u64, u128)> = None;
        for a in hits {
            let m = meta(cols, a)?;
            if best.is_none_or(|(v, _)| m.version > v) {
                best = Some((m.version, m.e));
            }
        }
        Ok(best)
    }

    fn document(&self, c: &Change) -> Result<TantivyDocument> {
        let f = &self.f;
        let rt = c.key.resource_type;
        let id = c.key.id.as_str();
        let mut doc = TantivyDocument::default();
        doc.add_text(f.key, key_of(&c.tenant, rt, id));
        doc.add_text(f.tenant, c.tenant.as_str());
        doc.add_text(f.rt, rt.as_str());
        doc.add_text(f.id, id);
        doc.add_u64(f.version, c.version.get());
        doc.add_i64(f.lu, to_micros(c.last_updated));
        doc.add_u64(f.segment, u64::from(c.segment()));
        let e = c.element_hash();
        doc.add_u64(f.e_hi, (e >> 64) as u64);
        doc.add_u64(f.e_lo, e as u64);
        let Some(body) = &c.content else {
            doc.add_u64(f.deleted, 1);
            return Ok(doc);
        };
        doc.add_u64(f.deleted, 0);
        doc.add_text(f.body, serde_json::to_string(body).map_err(index_err)?);
        if let Some(div) = body.pointer("/text/div").and_then(Value::as_str) {
            doc.add_text(f.text, strip_html(div));
        }
        let mut content = String::new();
        all_strings(body, &mut content);
        doc.add_text(f.content, content);

        let e = index::extract(body);
        let mut add = |field: Field, param: &str, value: &str| {
            let t = format!("{param}{SEP}{value}");
            if t.len() <= MAX_TERM_BYTES {
                doc.add_text(field, t);
            }
        };
        // Every resource has an id and a lastUpdated, for `:missing`.
        let mut present: HashSet<&str> = HashSet::from(["_id", "_lastUpdated"]);
        for t in &e.tokens {
            present.insert(t.param);
            for term in token_terms(&t.system, &t.code) {
                add(f.tok, t.param, &term);
            }
        }
        for r in &e.references {
            present.insert(r.param);
            for term in reference_terms(r) {
                add(f.rf, r.param, &term);
            }
        }
        for u in &e.uris {
            present.insert(u.param);
            add(f.uri, u.param, &u.uri);
        }
        for s in &e.strings {
            present.insert(s.param);
            add(f.st, s.param, &s.folded);
            add(f.sx, s.param, &s.exact);
        }
        for d in &e.dates {
            present.insert(d.param);
            add(f.dlo, d.param, &ord_i64(d.low));
            add(f.dhi, d.param, &ord_i64(d.high));
        }
        for n in &e.numbers {
            present.insert(n.param);
            add(f.nv, n.param, &ord_f64(n.value));
        }
        for q in &e.quantities {
            present.insert(q.param);
        }
        for p in present {
            doc.add_text(f.has, p);
        }
        Ok(doc)
    }

    fn apply(&self, changes: &[Change], repair: bool) -> Result<Applied> {
        let mut w = self.writer.lock();
        let searcher = self.searcher();
        let cols = columns(&searcher)?;
        let mut out = Applied::default();
        for c in changes {
            let key = key_of(&c.tenant, c.key.resource_type, c.key.id.as_str());
            let held = match w.pending.get(&key) {
                Some(v) => Some(*v),
                None => self.held_version(&searcher, &cols, &key)?,
            };
            let (version, e) = (c.version.get(), c.element_hash());
            let keep = held.is_some_and(|(v, held_e)| {
                v > version || (v == version && (!repair || held_e == e))
            });
            if keep {
                out.skipped += 1;
                continue;
            }
            if let Some(segs) = self
                .digests
                .lock()
                .get_mut(&(c.tenant.clone(), c.key.resource_type))
            {
                let d = segs.entry(c.segment()).or_default();
                if let Some((_, old)) = held {
                    d.remove(old);
                }
                d.add(e);
                if d.count == 0 {
                    segs.remove(&c.segment());
                }
            }
            // The delete takes effect on documents added before it only, so the new version
            // survives it.
            w.writer
                .delete_term(Term::from_field_text(self.f.key, &key));
            w.writer
                .add_document(self.document(c)?)
                .map_err(index_err)?;
            w.pending.insert(key, (version, e));
            out.applied += 1;
        }
        if w.pending.len() >= self.config.commit_every {
            self.commit(&mut w)?;
        }
        Ok(out)
    }

    fn criterion_query(
        &self,
        c: &Criterion,
        now: i64,
        verify: &mut Vec<(String, Vec<DateValue>)>,
    ) -> Result<(Occur, Box<dyn Query>)> {
        let f = &self.f;
        let p = c.param.as_str();
        let unsupported = || Error::Unsupported(format!("tantivy cannot answer {p} this way"));
        let must = |q| Ok((Occur::Must, q));
        match (p, c.modifier, &c.values) {
            ("_text" | "_content", None, CriterionValues::String(texts)) => {
                let field = if p == "_text" { f.text } else { f.content };
                let mut analyzer = self
                    .engine()
                    .index
                    .tokenizer_for_field(field)
                    .map_err(index_err)?;
                let alts = texts
                    .iter()
                    .map(|text| {
                        let mut words: Vec<Box<dyn Query>> = Vec::new();
                        let mut stream = analyzer.token_stream(text);
                        while let Some(tok) = stream.next() {
                            words.push(Box::new(TermQuery::new(
                                Term::from_field_text(field, &tok.text),
                                IndexRecordOption::WithFreqs,
                            )));
                        }
                        if words.is_empty() {
                            Box::new(BooleanQuery::new(Vec::new())) as Box<dyn Query>
                        } else {
                            all_of(words)
                        }
                    })
                    .collect();
                must(any_of(alts))
            }
            ("_id", None, CriterionValues::Token(tokens)) => {
                let alts = tokens
                    .iter()
                    .map(|t| match (&t.system, &t.code) {
                        (None, Some(id)) => Ok(term_query(Term::from_field_text(f.id, id))),
                        _ => Err(unsupported()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                must(any_of(alts))
            }
            ("_lastUpdated", None, CriterionValues::Date(dates)) => {
                let alts = dates
                    .iter()
                    .map(|d| {
                        let ip = d.instant_predicate(now);
                        let b = |v: Option<i64>, incl: bool| match v {
                            None => Bound::Unbounded,
                            Some(v) if incl => Bound::Included(Term::from_field_i64(f.lu, v)),
                            Some(v) => Bound::Excluded(Term::from_field_i64(f.lu, v)),
                        };
                        let range = |lo, hi| -> Box<dyn Query> {
                            match (&lo, &hi) {
                                (Bound::Unbounded, Bound::Unbounded) => Box::new(AllQuery),
                                _ => Box::new(RangeQuery::new(lo, hi)),
                            }
                        };
                        if ip.negated {
                            let mut parts = Vec::new();
                            if ip.ge.is_some() {
                                parts.push(range(Bound::Unbounded, b(ip.ge, false)));
                            }
                            if ip.lt.is_some() {
                                parts.push(range(b(ip.lt, true), Bound::Unbounded));
                            }
                            any_of(parts)
                        } else {
                            range(b(ip.ge, true), b(ip.lt, false))
                        }
                    })
                    .collect();
                must(any_of(alts))
            }
            (_, None, CriterionValues::Token(tokens)) => {
                let alts = tokens
                    .iter()
                    .map(|t| token_term(t).map(|x| term_query(term(f.tok, p, &x))))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(unsupported)?;
                must(any_of(alts))
            }
            (_, Some(Modifier::Not), CriterionValues::Token(tokens)) => {
                let alts = tokens
                    .iter()
                    .map(|t| token_term(t).map(|x| term_query(term(f.tok, p, &x))))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(unsupported)?;
                Ok((Occur::MustNot, any_of(alts)))
            }
            (_, None, CriterionValues::Reference(refs)) => must(any_of(
                refs.iter()
                    .map(|r| term_query(term(f.rf, p, &reference_term(r))))
                    .collect(),
            )),
            (_, None, CriterionValues::Uri(uris)) => must(any_of(
                uris.iter().map(|u| term_query(term(f.uri, p, u))).collect(),
            )),
            (_, None, CriterionValues::String(strings)) => must(any_of(
                strings
                    .iter()
                    .map(|s| {
                        let folded = index::fold(s);
                        term_range(
                            f.st,
                            p,
                            Bound::Included(folded.clone()),
                            Bound::Excluded(format!("{folded}\u{10FFFF}")),
                        )
                    })
                    .collect(),
            )),
            (_, Some(Modifier::Exact), CriterionValues::String(strings)) => must(any_of(
                strings
                    .iter()
                    .map(|s| term_query(term(f.sx, p, s)))
                    .collect(),
            )),
            (_, None, CriterionValues::Date(dates)) => {
                verify.push((p.to_owned(), dates.clone()));
                must(any_of(
                    dates
                        .iter()
                        .map(|d| date_candidates(f, p, d, now))
                        .collect(),
                ))
            }
            (_, None, CriterionValues::Number(numbers)) => must(any_of(
                numbers.iter().map(|n| number_query(f, p, n)).collect(),
            )),
            (_, _, CriterionValues::Missing(missing, _)) => {
                let has = term_query(Term::from_field_text(f.has, p));
                Ok((
                    if *missing {
                        Occur::MustNot
                    } else {
                        Occur::Must
                    },
                    has,
                ))
            }
            _ => Err(unsupported()),
        }
    }

    fn search(&self, tenant: &TenantId, query: &SearchQuery) -> Result<SearchPage> {
        let Some(rt) = query.resource_type else {
            return Err(Error::Unsupported("tantivy searches one type".to_owned()));
        };
        let now = now_micros();
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = self
            .scope(tenant, rt)
            .into_iter()
            .map(|q| (Occur::Must, q))
            .collect();
        clauses.push((
            Occur::Must,
            term_query(Term::from_field_u64(self.f.deleted, 0)),
        ));
        let mut verify = Vec::new();
        for c in &query.criteria {
            if !c.chain.is_empty() {
                return Err(Error::Unsupported("tantivy does not chain".to_owned()));
            }
            clauses.push(self.criterion_query(c, now, &mut verify)?);
        }
        let q = BooleanQuery::new(clauses);
        let searcher = self.searcher();
        let cols = columns(&searcher)?;
        let count_only = query.summary == Some(Summary::Count);
        if count_only && verify.is_empty() {
            let total = searcher
                .search(&q, &tantivy::collector::Count)
                .map_err(index_err)?;
            return Ok(SearchPage {
                matches: Vec::new(),
                included: Vec::new(),
                total: Some(total as u64),
                next_cursor: None,
            });
        }
        let by_score = query.sort.first().is_some_and(|k| k.param == "_score");
        let mut hits: Vec<(f32, DocAddress)> = if by_score {
            let n = searcher
                .search(&q, &tantivy::collector::Count)
                .map_err(index_err)?;
            if n == 0 {
                Vec::new()
            } else {
                searcher
                    .search(&q, &TopDocs::with_limit(n))
                    .map_err(index_err)?
            }
        } else {
            searcher
                .search(&q, &DocSetCollector)
                .map_err(index_err)?
                .into_iter()
                .map(|a| (0.0, a))
                .collect()
        };
        if !verify.is_empty() {
            let mut kept = Vec::with_capacity(hits.len());
            for (score, a) in hits {
                let doc: TantivyDocument = searcher.doc(a).map_err(index_err)?;
                let body: Value = doc
                    .get_first(self.f.body)
                    .and_then(|v| v.as_str())
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(Value::Null);
                let e = index::extract(&body);
                if verify.iter().all(|(p, ds)| dates_match(&e, p, ds, now)) {
                    kept.push((score, a));
                }
            }
            hits = kept;
        }
        let mut rows: Vec<(f32, Meta, DocAddress)> = hits
            .into_iter()
            .map(|(s, a)| meta(&cols, a).map(|m| (s, m, a)))
            .collect::<Result<_>>()?;
        rows.sort_by(|x, y| {
            for k in &query.sort {
                let o = match k.param.as_str() {
                    "_score" => y.0.total_cmp(&x.0),
                    "_lastUpdated" => x.1.lu.cmp(&y.1.lu),
                    _ => x.1.id.cmp(&y.1.id),
                };
                let o = if k.descending && k.param != "_score" {
                    o.reverse()
                } else {
                    o
                };
                if o.is_ne() {
                    return o;
                }
            }
            x.1.id.cmp(&y.1.id)
        });
        let total = rows.len() as u64;
        let page = if count_only {
            0
        } else {
            query.page_size() as usize
        };
        let offset = match &query.cursor {
            None => 0,
            Some(c) => c
                .strip_prefix(CURSOR_PREFIX)
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::InvalidSearch(format!("not a tantivy cursor: {c}")))?,
        };
        let mut matches = Vec::new();
        for (_, m, a) in rows.iter().skip(offset).take(page) {
            let doc: TantivyDocument = searcher.doc(*a).map_err(index_err)?;
            let body = doc
                .get_first(self.f.body)
                .and_then(|v| v.as_str())
                .ok_or_else(|| index_err("a live document without a body"))?;
            matches.push(StoredResource {
                tenant: tenant.clone(),
                key: ResourceKey {
                    resource_type: rt,
                    id: LogicalId::new(m.id.as_str()).map_err(index_err)?,
                },
                version: VersionId::new(m.version).ok_or_else(|| index_err("version 0"))?,
                last_updated: from_micros(m.lu),
                deleted: false,
                content: serde_json::from_str(body).map_err(index_err)?,
            });
        }
        // An offset from a client's cursor can be anything up to usize::MAX.
        let next = offset.saturating_add(page);
        Ok(SearchPage {
            matches,
            included: Vec::new(),
            total: (count_only || query.total != TotalMode::None).then_some(total),
            next_cursor: (!count_only && next < rows.len())
                .then(|| format!("{CURSOR_PREFIX}{next}")),
        })
    }

    /// Every document of a tenant's type, tombstones included.
    fn all_of_type(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: Option<&[u16]>,
    ) -> Result<Vec<Meta>> {
        self.commit_if_pending()?;
        self.scan_type(tenant, rt, segments)
    }

    /// The (tenant, type) segment digests: kept, or computed by one scan and kept.
    fn type_digests(&self, tenant: &TenantId, rt: ResourceType) -> Result<BTreeMap<u16, Digest>> {
        let mut w = self.writer.lock();
        let key = (tenant.clone(), rt);
        if let Some(d) = self.digests.lock().get(&key) {
            return Ok(d.clone());
        }
        if !w.pending.is_empty() {
            self.commit(&mut w)?;
        }
        let scope: Vec<(Occur, Box<dyn Query>)> = self
            .scope(tenant, rt)
            .into_iter()
            .map(|q| (Occur::Must, q))
            .collect();
        let (segments, missing) = self
            .searcher()
            .search(&BooleanQuery::new(scope), &DigestCollector)
            .map_err(index_err)?;
        if missing > 0 {
            return Err(index_err(format!(
                "{missing} documents of {tenant}/{rt} lack their digest fast fields"
            )));
        }
        let by: BTreeMap<u16, Digest> = segments
            .into_iter()
            .enumerate()
            .filter(|(_, d)| d.count != 0)
            .filter_map(|(s, d)| Some((u16::try_from(s).ok()?, d)))
            .collect();
        self.digests.lock().insert(key, by.clone());
        Ok(by)
    }

    /// [`Self::all_of_type`] over what is committed.
    fn scan_type(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: Option<&[u16]>,
    ) -> Result<Vec<Meta>> {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = self
            .scope(tenant, rt)
            .into_iter()
            .map(|q| (Occur::Must, q))
            .collect();
        if let Some(segs) = segments {
            clauses.push((
                Occur::Must,
                any_of(
                    segs.iter()
                        .map(|s| term_query(Term::from_field_u64(self.f.segment, u64::from(*s))))
                        .collect(),
                ),
            ));
        }
        let searcher = self.searcher();
        let cols = columns(&searcher)?;
        if segments.is_some_and(<[u16]>::is_empty) {
            return Ok(Vec::new());
        }
        searcher
            .search(&BooleanQuery::new(clauses), &DocSetCollector)
            .map_err(index_err)?
            .into_iter()
            .map(|a| meta(&cols, a))
            .collect()
    }
}

/// This backend's cursor: an offset into the ordered matches.
const CURSOR_PREFIX: &str = "tantivy:";

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

#[async_trait]
impl DigestView for TantivySecondary {
    async fn root_digest(&self, tenant: &TenantId, resource_type: ResourceType) -> Result<Digest> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let mut d = Digest::default();
            for s in inner.type_digests(&tenant, resource_type)?.into_values() {
                d.merge(s);
            }
            Ok(d)
        })
        .await
    }

    async fn segment_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            Ok(inner
                .type_digests(&tenant, resource_type)?
                .into_iter()
                .map(|(segment, digest)| SegmentDigest { segment, digest })
                .collect())
        })
        .await
    }

    async fn segment_keys(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
    ) -> Result<Vec<KeyState>> {
        let tenant = tenant.clone();
        let segments = segments.to_vec();
        self.blocking(move |inner| {
            let mut out = inner
                .all_of_type(&tenant, resource_type, Some(&segments))?
                .into_iter()
                .map(|m| {
                    Ok(KeyState {
                        id: LogicalId::new(m.id.as_str()).map_err(index_err)?,
                        version: VersionId::new(m.version).ok_or_else(|| index_err("version 0"))?,
                        e: m.e,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.sort();
            Ok(out)
        })
        .await
    }
}
