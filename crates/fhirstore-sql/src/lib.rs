//! fhirstore-sql: the primary store, on sqlx.
//!
//! Two dialects share one implementation: [`SqliteStore`] (embedded, the default) and
//! [`PostgresStore`]. Each write is one SQL transaction that updates the current-resource row,
//! appends the version, rewrites the resource's search-index rows, appends an outbox entry and
//! XORs the digest segment — all or nothing.
//!
//! The store ([`Store`], in `store/`) is written once, generic over a [`Dialect`] (in
//! `dialect.rs`): the trait holds everything the two databases do differently, and each driver
//! module (`sqlite.rs`, `postgres.rs`) implements it. Search SQL is planned by [`search`], with
//! no database at hand.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::Duration;

use fhirstore_core::digest::split_u128;
use fhirstore_core::registry::{intern, Registry, SearchParamDef};
use fhirstore_core::{Error, LogicalId, ResourceType};

mod body;
pub mod dialect;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod search;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod store;
#[cfg(feature = "sqlite")]
mod wal_stamp;

pub use dialect::Dialect;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresDialect, PostgresStore};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteDialect, SqliteStore};
pub use store::Store;

/// How hard SQLite works to make a commit survive power loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: a commit is on disk when it returns. The default: a store must not
    /// lose acknowledged writes.
    #[default]
    Full,
    /// `synchronous=NORMAL`: with WAL, a power loss may roll back the last commits (never
    /// corrupts). Faster; for data that can be re-imported.
    Normal,
}

/// Settings shared by both dialects.
#[derive(Clone, Debug)]
pub struct SqlConfig {
    /// Resources larger than this (canonical JSON bytes) are rejected as invalid.
    pub max_resource_bytes: usize,
    /// Connections for reads (SQLite) or for everything (PostgreSQL).
    pub max_connections: u32,
    /// How long SQLite waits on a lock before failing with a temporary error.
    pub busy_timeout: Duration,
    /// SQLite commit durability.
    pub durability: Durability,
    /// Whether bodies are checked against the R4 JSON schema before they are written.
    pub validation: fhirstore_core::validate::Validation,
    /// How often a transaction that failed with a temporary error (deadlock, serialization
    /// failure, busy database) is retried before the error is returned.
    pub max_retries: u32,
    /// Whether writes keep the XOR digests that reconciliation compares. Turning it off is for
    /// measuring what it costs: the digests of writes made without it are wrong until the
    /// reconciler's self-check rebuilds them.
    pub maintain_digests: bool,
    /// How long one search (its page, includes and total together) may run. Past it, the
    /// running statement is stopped (SQLite: interrupted; PostgreSQL: a cancel request, with
    /// `statement_timeout` on the search connections as the backstop) and the search fails
    /// with [`Error::TooCostly`] naming `search_timeout`. A search whose caller goes away is
    /// stopped the same way, at once.
    pub search_timeout: Duration,
    /// Connections that searches may hold at once, a pool of their own: however heavy the
    /// searches, reads by id, history and writes keep the `max_connections` of theirs.
    pub search_connections: u32,
    /// How long a PostgreSQL session may sit inside a transaction without sending anything
    /// before the server ends it, releasing its locks. No write of the store pauses that long;
    /// the bound keeps a stalled client from holding locks that every writer would wait on.
    pub idle_in_transaction_timeout: Duration,
    /// The least number of index entries below which a criterion counts as selective.
    ///
    /// Before a page, the store counts each criterion's entries up to a threshold (one
    /// statement, index only). A page whose smallest criterion is under it is driven from that
    /// criterion's entries, the others checked per candidate; a page whose every criterion
    /// reaches it walks the page's order (the resources by id, or the sort parameter's index)
    /// and checks each resource until the page is full. A walk checks about
    /// `page × resources / matches` resources and a driven page reads `matches` entries, so
    /// the threshold is `sqrt(4 × (page + 1) × resources of the type)` (about 900 at 10,000
    /// resources, 9,200 at a million), never below this value. `0` always walks where the
    /// order allows; `u32::MAX` always drives.
    pub selective_below: u32,
    /// How hard bodies are deflated before they are stored: 1 (fastest) to 9 (smallest), or 0
    /// to store the JSON text itself. Bodies are primed with a fixed dictionary of FHIR JSON
    /// (generated clinical data: about a third of its text at 6, two fifths at 1). Reads take
    /// every format, so the level can change at any time.
    pub body_compression: u32,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            max_resource_bytes: fhirstore_core::resource::DEFAULT_MAX_RESOURCE_BYTES,
            max_connections: 8,
            busy_timeout: Duration::from_secs(10),
            durability: Durability::Full,
            validation: fhirstore_core::validate::Validation::Strict,
            max_retries: 8,
            maintain_digests: true,
            search_timeout: Duration::from_secs(30),
            search_connections: 6,
            idle_in_transaction_timeout: Duration::from_secs(60),
            selective_below: 200,
            body_compression: 6,
        }
    }
}

/// One outbox entry: a version that secondaries must learn about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox; increases with every write.
    pub seq: i64,
    /// The tenant.
    pub tenant: String,
    /// The resource type.
    pub resource_type: String,
    /// The resource id.
    pub id: String,
    /// The version written.
    pub version: i64,
    /// `create`, `update` or `delete`.
    pub op: String,
}

/// One digest segment, the same type the secondaries report.
pub use fhirstore_core::secondary::SegmentDigest;

/// The SQL syntax a statement is written in: what the planner needs to know of a dialect to
/// write its text (placeholders, collation, id sets). The rest of a dialect is [`Dialect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// SQLite through sqlx's embedded driver.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Syntax {
    /// The most values one statement may bind: SQLite's `SQLITE_MAX_VARIABLE_NUMBER` as the
    /// bundled library is built (32,766), and the 16-bit parameter count of PostgreSQL's
    /// protocol.
    pub(crate) fn max_binds(self) -> usize {
        match self {
            Syntax::Sqlite => 32_766,
            Syntax::Postgres => 65_535,
        }
    }

    /// What makes text sort keys compare bytewise, so ORDER BY and the keyset condition of the
    /// next page agree whatever the database's default collation. SQLite's default BINARY
    /// collation already does.
    pub(crate) fn text_key_collate(self) -> &'static str {
        match self {
            Syntax::Sqlite => "",
            Syntax::Postgres => " COLLATE \"C\"",
        }
    }

    /// Whether the text `column` holds a `:`, as every absolute reference (`http://…`,
    /// `urn:…`) does and no relative one (`Patient/1`) does: the predicate of the partial
    /// `search_reference_url` index (migrations 0013), written the same in each statement that
    /// reads it, as both planners need to see it to use the index.
    pub(crate) fn has_scheme(self, column: &str) -> String {
        match self {
            Syntax::Sqlite => format!("instr({column}, ':') > 0"),
            Syntax::Postgres => format!("strpos({column}, ':') > 0"),
        }
    }

    /// What closes a per-resource check (`[NOT] EXISTS (SELECT 1 FROM … WHERE … = r.id`).
    ///
    /// On PostgreSQL `OFFSET 0` keeps the check a subplan run per resource with its key as the
    /// index condition. Made a semi-join, a new tenant that the statistics put at one row got a
    /// join that read the tenant's whole owner index for every resource and filtered on the id
    /// (a one-year birthdate range over 1,000 Patients: 5.2 ms, and 0.24 ms as a subplan; at
    /// 10k it grew with the square). SQLite always probes per row.
    pub(crate) fn probe_end(self) -> &'static str {
        match self {
            Syntax::Sqlite => ")",
            Syntax::Postgres => " OFFSET 0)",
        }
    }

    /// How a selective criterion's id set is written: `None` for `id [NOT] IN (SELECT …)`, or
    /// the operators of `id = ANY(ARRAY(SELECT …))` and its negation.
    ///
    /// PostgreSQL collects the ids once, as an array, before the outer scan. As `IN (SELECT …)`
    /// it chose a nested loop that rescanned the criterion's rows of the whole tenant for each
    /// resource whenever its statistics put a small tenant at one row (one large tenant beside
    /// many small ones does that): a reference search over 800 Observations ran for minutes.
    /// SQLite plans `IN (SELECT …)` from the subquery's own index either way.
    pub(crate) fn id_set_from_array(self) -> Option<(&'static str, &'static str)> {
        match self {
            Syntax::Sqlite => None,
            Syntax::Postgres => Some(("= ANY", "<> ALL")),
        }
    }

    /// How `r.id` is restricted to the values of one [`Bind::TextList`](search::Bind::TextList)
    /// parameter: the text before and after its placeholder.
    ///
    /// On PostgreSQL the list is a constant array, `= ANY` of which is an index condition or a
    /// hashed filter. As `IN (SELECT unnest(…))` PostgreSQL, not yet knowing a new tenant's
    /// chain rows, put the set inside a nested loop and compared every chained match with
    /// every id (470 million comparisons, 43 s, for 14,144 ids). On SQLite, `json_each` gives
    /// rows that `IN` reads once into an ephemeral index.
    pub(crate) fn text_set(self) -> (&'static str, &'static str) {
        match self {
            Syntax::Sqlite => (" AND r.id IN (SELECT value FROM json_each(", "))"),
            Syntax::Postgres => (" AND r.id = ANY(CAST(", " AS text[]))"),
        }
    }
}

/// Everything one version write stores, handed to the dialect's single-round-trip writer.
pub struct VersionRow<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The resource type.
    pub resource_type: &'static str,
    /// The logical id.
    pub id: &'a str,
    /// The new version number.
    pub version: i64,
    /// The write's instant, in microseconds since the epoch: `meta.lastUpdated`.
    pub now: i64,
    /// Whether the version is a tombstone.
    pub deleted: bool,
    /// The key's digest segment.
    pub segment: i32,
    /// The new version's element hash, high half.
    pub e_hi: i64,
    /// The new version's element hash, low half.
    pub e_lo: i64,
    /// `create`, `update` or `delete`, for the outbox.
    pub op: &'static str,
    /// Canonical JSON as stored (see `body`: deflated, or the text); `None` for a tombstone.
    pub body: Option<&'a [u8]>,
    /// The new version's index entries.
    pub index: &'a fhirstore_core::index::IndexEntries,
    /// No current row exists: insert one (else update it).
    pub is_new: bool,
    /// The previous version was live, so its index rows must go.
    pub was_live: bool,
    /// Apply this write's digest change in the same round trip (else the caller applies the
    /// transaction's changes at its end).
    pub inline_digest: bool,
    /// This write's digest change (high, low) and count change.
    pub digest_delta: (i64, i64),
    /// This write's change of the segment's live count.
    pub digest_count: i64,
}

/// When to refresh the planner's statistics: each time the number of versions this store has
/// written grows fourfold, starting at 2,000.
///
/// Both planners need them. Without statistics, PostgreSQL estimates one row for any
/// `(tenant, type)` prefix and may answer a primary-key lookup by scanning a `(tenant, type, …)`
/// index (8.6 ms instead of 0.05 ms at 20k rows); SQLite ranks indexes by the equality terms
/// they match, so `param = ?` on a lookup index beat `id IN (…)` on the primary key, and an
/// `_include` read every Encounter's subject row (2.9 ms instead of 0.3 ms at 100k resources).
#[derive(Debug)]
pub(crate) struct StatsUpkeep {
    written: std::sync::atomic::AtomicU64,
    next_analyze: std::sync::atomic::AtomicU64,
}

impl StatsUpkeep {
    pub(crate) fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(StatsUpkeep {
            written: 0.into(),
            next_analyze: 2_000.into(),
        })
    }

    /// Counts `n` committed versions; true for exactly one caller when a threshold is crossed.
    pub(crate) fn due(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let total = self.written.fetch_add(n, Relaxed) + n;
        let next = self.next_analyze.load(Relaxed);
        total >= next
            && self
                .next_analyze
                .compare_exchange(next, next.saturating_mul(4), Relaxed, Relaxed)
                .is_ok()
    }
}

/// A tenant's search parameters, as one process last loaded them from `search_parameters`.
#[derive(Debug)]
pub(crate) struct TenantParams {
    /// What writes index: R4 plus the tenant's parameters that are active or being reindexed.
    pub(crate) index: Arc<Registry>,
    /// What searches may use: R4 plus the tenant's active parameters.
    pub(crate) search: Arc<Registry>,
    /// The tenant's own definitions in every state, removing ones included: a new definition
    /// must not clash with any of them, or a removal job would delete the new one's rows.
    pub(crate) own: Vec<&'static SearchParamDef>,
}

impl TenantParams {
    /// A tenant with no parameters of its own.
    pub(crate) fn r4() -> Arc<TenantParams> {
        static R4: OnceLock<Arc<TenantParams>> = OnceLock::new();
        R4.get_or_init(|| {
            Arc::new(TenantParams {
                index: Registry::r4_shared().clone(),
                search: Registry::r4_shared().clone(),
                own: Vec::new(),
            })
        })
        .clone()
    }

    /// Builds the registries from `(body, state)` rows. Bodies were checked when registered; one
    /// that no longer parses (an older build's definition) is skipped with a warning rather than
    /// making every write of the tenant fail.
    pub(crate) fn from_rows(rows: &[(String, String)]) -> TenantParams {
        let mut index = Vec::new();
        let mut search = Vec::new();
        let mut own = Vec::new();
        for (body, state) in rows {
            let def = match serde_json::from_str(body)
                .map_err(|e| e.to_string())
                .and_then(|v| fhirstore_core::registry::parse_def(&v))
            {
                Ok(d) => intern(d),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable custom SearchParameter");
                    continue;
                }
            };
            own.push(def);
            match state.as_str() {
                STATE_ACTIVE => {
                    index.push(def);
                    search.push(def);
                }
                STATE_REINDEXING => index.push(def),
                _ => {}
            }
        }
        let r4 = Registry::r4();
        TenantParams {
            index: Arc::new(r4.with(index)),
            search: Arc::new(r4.with(search)),
            own,
        }
    }
}

/// Recent index-entry counts of search criteria, by tenant and the criterion's statement: what
/// a page's strategy is chosen from (see `search::choose`). Counts only steer the plan (every
/// strategy returns the same page), so one up to [`SizeCache::FRESH`] old serves: a search
/// repeated with the same criterion (a code, a gender, a family name) skips the counting
/// round trip. Keyed by the statement with its values bound, so a different value, tenant or
/// instant is counted afresh.
#[derive(Debug, Default)]
pub(crate) struct CountCache(Mutex<HashMap<(String, String), CachedCount>>);

/// When a count was taken, the cap it was taken with, and the count.
type CachedCount = (std::time::Instant, u32, u64);

impl CountCache {
    /// Entries kept at most; past it the cache starts over rather than grow.
    const ENTRIES: usize = 50_000;

    /// The key of a criterion's counting statement.
    pub(crate) fn key(sql: &search::Sql) -> String {
        format!("{}\u{0}{:?}", sql.text(), sql.binds())
    }

    /// The count for `key`, capped at `cap`, when a fresh one tells it: an exact count (below
    /// the cap it was taken with), or one capped at least as high as `cap`.
    pub(crate) fn get(&self, tenant: &str, key: &str, cap: u32) -> Option<u64> {
        let map = self.0.lock();
        let (at, taken_cap, n) = map.get(&(tenant.to_owned(), key.to_owned()))?;
        if at.elapsed() >= SizeCache::FRESH {
            return None;
        }
        let exact = *n < u64::from(*taken_cap);
        (exact || *taken_cap >= cap).then(|| (*n).min(u64::from(cap)))
    }

    /// Records a count taken with `cap`.
    pub(crate) fn put(&self, tenant: &str, key: String, cap: u32, n: u64) {
        let mut map = self.0.lock();
        if map.len() >= Self::ENTRIES {
            map.clear();
        }
        map.insert(
            (tenant.to_owned(), key),
            (std::time::Instant::now(), cap, n),
        );
    }
}

/// `search_parameters.state` values.
pub(crate) const STATE_REINDEXING: &str = "reindexing";
/// See [`STATE_REINDEXING`].
pub(crate) const STATE_ACTIVE: &str = "active";
/// See [`STATE_REINDEXING`].
pub(crate) const STATE_REMOVING: &str = "removing";

/// How many live resources each (tenant, type) holds, as last counted: what a walked page's
/// cost is weighed against (see `SqlConfig::selective_below`). A count is trusted for
/// [`SizeCache::FRESH`]; sizes change slowly next to how often they are read.
#[derive(Debug, Default)]
pub(crate) struct SizeCache(Mutex<HashMap<(String, String), (std::time::Instant, u64)>>);

impl SizeCache {
    /// How long a count is used before it is counted again.
    pub(crate) const FRESH: Duration = Duration::from_secs(30);
    /// Entries kept at most; past it the cache starts over rather than grow with tenants.
    const ENTRIES: usize = 10_000;

    /// The fresh count for `tenant`'s `rt`, if any.
    pub(crate) fn get(&self, tenant: &str, rt: &str) -> Option<u64> {
        let map = self.0.lock();
        let (at, n) = map.get(&(tenant.to_owned(), rt.to_owned()))?;
        (at.elapsed() < Self::FRESH).then_some(*n)
    }

    /// Records a count.
    pub(crate) fn put(&self, tenant: &str, rt: &str, n: u64) {
        let mut map = self.0.lock();
        if map.len() >= Self::ENTRIES {
            map.clear();
        }
        map.insert(
            (tenant.to_owned(), rt.to_owned()),
            (std::time::Instant::now(), n),
        );
    }
}

/// Each tenant's parameters by the generation they were loaded at. Every transaction that needs
/// them reads the tenant's generation first, so a change made by another process is seen by the
/// next transaction here; the registries are rebuilt only when it moved.
#[derive(Debug, Default)]
pub(crate) struct ParamCache(Mutex<HashMap<String, (i64, Arc<TenantParams>)>>);

impl ParamCache {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, (i64, Arc<TenantParams>)>> {
        self.0.lock()
    }

    pub(crate) fn get(&self, tenant: &str, generation: i64) -> Option<Arc<TenantParams>> {
        self.lock()
            .get(tenant)
            .filter(|(g, _)| *g == generation)
            .map(|(_, p)| p.clone())
    }

    pub(crate) fn put(&self, tenant: &str, generation: i64, params: Arc<TenantParams>) {
        self.lock().insert(tenant.to_owned(), (generation, params));
    }
}

/// The tables whose statistics steer search plans.
pub(crate) fn analyzed_tables() -> String {
    let mut names = vec!["resources", "resource_versions"];
    names.extend(INDEX_TABLES.iter().map(|(t, _)| *t));
    names.join(", ")
}

/// A column type of an index table, as the dialects' bulk-insert forms need it.
#[derive(Clone, Copy)]
pub(crate) enum Col {
    Text,
    Int,
    Real,
}

/// The search-index tables after `(tenant, resource_type)` and before the owning `id`: one
/// description, from which each dialect generates its fixed-text delete and bulk insert.
pub(crate) const INDEX_TABLES: [(&str, &[(&str, Col)]); 7] = [
    (
        "search_token",
        &[
            ("param", Col::Text),
            ("system", Col::Text),
            ("code", Col::Text),
        ],
    ),
    (
        "search_string",
        &[
            ("param", Col::Text),
            ("folded", Col::Text),
            ("exact", Col::Text),
        ],
    ),
    (
        "search_date",
        &[("param", Col::Text), ("low", Col::Int), ("high", Col::Int)],
    ),
    (
        "search_quantity",
        &[
            ("param", Col::Text),
            ("value", Col::Real),
            ("low", Col::Real),
            ("high", Col::Real),
            ("system", Col::Text),
            ("code", Col::Text),
            ("unit", Col::Text),
        ],
    ),
    (
        "search_reference",
        &[
            ("param", Col::Text),
            ("target_type", Col::Text),
            ("target_id", Col::Text),
            ("url", Col::Text),
            ("version", Col::Text),
        ],
    ),
    ("search_uri", &[("param", Col::Text), ("uri", Col::Text)]),
    ("search_composite", COMPOSITE_COLUMNS),
];

/// `search_composite`'s columns: the union of the per-type tables', so component predicates
/// are the same SQL as plain ones.
const COMPOSITE_COLUMNS: &[(&str, Col)] = &[
    ("param", Col::Text),
    ("grp", Col::Int),
    ("comp", Col::Int),
    ("system", Col::Text),
    ("code", Col::Text),
    ("folded", Col::Text),
    ("exact", Col::Text),
    ("low", Col::Int),
    ("high", Col::Int),
    ("value", Col::Real),
    ("unit", Col::Text),
    ("target_type", Col::Text),
    ("target_id", Col::Text),
    ("url", Col::Text),
    ("version", Col::Text),
    ("uri", Col::Text),
];

/// The rows of each index table, in `INDEX_TABLES` order, as JSON values per column.
pub(crate) fn index_rows(
    e: &fhirstore_core::index::IndexEntries,
) -> [Vec<Vec<serde_json::Value>>; 7] {
    use serde_json::json;
    let quantity = |q: &fhirstore_core::index::QuantityEntry| {
        vec![
            json!(q.param),
            json!(q.value),
            json!(q.low),
            json!(q.high),
            json!(q.system),
            json!(q.code),
            json!(q.unit),
        ]
    };
    [
        e.tokens
            .iter()
            .map(|t| vec![json!(t.param), json!(t.system), json!(t.code)])
            .collect(),
        e.strings
            .iter()
            .map(|t| vec![json!(t.param), json!(t.folded), json!(t.exact)])
            .collect(),
        e.dates
            .iter()
            .map(|t| vec![json!(t.param), json!(t.low), json!(t.high)])
            .collect(),
        e.numbers
            .iter()
            .chain(&e.quantities)
            .map(quantity)
            .collect(),
        e.references
            .iter()
            .map(|r| {
                vec![
                    json!(r.param),
                    json!(r.target_type),
                    json!(r.target_id),
                    json!(r.url),
                    json!(r.version),
                ]
            })
            .collect(),
        e.uris
            .iter()
            .map(|u| vec![json!(u.param), json!(u.uri)])
            .collect(),
        e.composites.iter().map(composite_row).collect(),
    ]
}

/// One `search_composite` row, in `COMPOSITE_COLUMNS` order.
fn composite_row(c: &fhirstore_core::index::CompositeEntry) -> Vec<serde_json::Value> {
    use fhirstore_core::index::ComponentValue;
    use serde_json::json;
    let mut row = vec![
        json!(c.param),
        json!(c.group),
        json!(c.component),
        json!(""),
        json!(""),
        json!(""),
        json!(""),
        json!(0),
        json!(0),
        json!(0.0),
        json!(""),
        json!(""),
        json!(""),
        json!(""),
        json!(""),
        json!(""),
    ];
    let mut set = |name: &str, v: serde_json::Value| {
        if let Some(i) = COMPOSITE_COLUMNS.iter().position(|c| c.0 == name) {
            row[i] = v;
        }
    };
    match &c.value {
        ComponentValue::Token(t) => {
            set("system", json!(t.system));
            set("code", json!(t.code));
        }
        ComponentValue::String(t) => {
            set("folded", json!(t.folded));
            set("exact", json!(t.exact));
        }
        ComponentValue::Date(d) => {
            set("low", json!(d.low));
            set("high", json!(d.high));
        }
        ComponentValue::Quantity(q) => {
            set("value", json!(q.value));
            set("system", json!(q.system));
            set("code", json!(q.code));
            set("unit", json!(q.unit));
        }
        ComponentValue::Reference(r) => {
            set("target_type", json!(r.target_type));
            set("target_id", json!(r.target_id));
            set("url", json!(r.url));
            set("version", json!(r.version));
        }
        ComponentValue::Uri(u) => set("uri", json!(u.uri)),
    }
    row
}

/// Binds the parameters both dialects' version writers share, `$1` to `$12`, in order.
macro_rules! bind_version_row {
    ($query:expr, $row:expr) => {
        $query
            .bind($row.tenant)
            .bind($row.resource_type)
            .bind($row.id)
            .bind($row.version)
            .bind($row.now)
            .bind($row.deleted)
            .bind($row.segment)
            .bind($row.e_hi)
            .bind($row.e_lo)
            .bind($row.op)
            .bind($row.body.as_deref())
            .bind($row.was_live)
    };
}
pub(crate) use bind_version_row;

/// Runs `step` (over `state`) until it succeeds or fails for good: a temporary failure
/// (deadlock, serialization failure, busy database) is retried up to `max_retries` times after
/// a growing, jittered pause; the last error is returned as it is. The one retry loop of the
/// transaction, batch-entry and reindex paths.
pub(crate) async fn retrying<S, T>(
    max_retries: u32,
    what: &str,
    state: &mut S,
    mut step: impl for<'a> FnMut(
        &'a mut S,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = fhirstore_core::Result<T>> + Send + 'a>,
    >,
) -> fhirstore_core::Result<T> {
    let mut attempt = 0u32;
    loop {
        match step(state).await {
            Err(e) if e.is_temporary() && attempt < max_retries => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "retrying a {what}");
                tokio::time::sleep(backoff(attempt)).await;
            }
            other => return other,
        }
    }
}

/// The pause before retry `attempt`: exponential from 2 ms, capped, with jitter so retrying
/// writers do not collide again.
fn backoff(attempt: u32) -> std::time::Duration {
    let base = 2u64 << attempt.min(7);
    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % base.max(1);
    std::time::Duration::from_millis(base + jitter)
}

/// Runs a write transaction on its own task, so it always ends in a commit or a rollback on its
/// connection, whatever happens to the caller. sqlx only queues the rollback of a dropped
/// transaction; a caller that goes away mid-write (a client disconnecting) would otherwise hand
/// SQLite's one writer connection to the next `BEGIN` still inside the old transaction.
pub(crate) async fn detached<T, F>(work: F) -> fhirstore_core::Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = fhirstore_core::Result<T>> + Send + 'static,
{
    use tracing::Instrument as _;
    match tokio::spawn(work.in_current_span()).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::backend("the write task was cancelled", true, e)),
    }
}

/// Classifies a database error at the backend edge: temporary when a retry may help.
pub(crate) fn classify(err: sqlx::Error, dialect: Syntax) -> Error {
    let temporary = match &err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if is_cancelled(dialect, &code) {
                return Error::TooCostly(STATEMENT_CANCELLED.to_owned());
            }
            if is_disk_full(dialect, &code) {
                // Not retried here: only an operator freeing space helps.
                return Error::StorageFull(format!(
                    "the database's disk is full; nothing was stored ({err})"
                ));
            }
            is_temporary_code(dialect, &code)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    };
    Error::backend(format!("database: {err}"), temporary, err)
}

/// What a statement stopped by a search's time limit (or its caller's going away) fails with;
/// the search names the limit in its place.
pub const STATEMENT_CANCELLED: &str =
    "search_timeout: the statement ran past its time limit and was cancelled";

/// SQLITE_INTERRUPT, or PostgreSQL's `query_canceled` (`statement_timeout`, a cancel request).
fn is_cancelled(dialect: Syntax, code: &str) -> bool {
    match dialect {
        Syntax::Postgres => code == "57014",
        Syntax::Sqlite => code.parse::<i32>().is_ok_and(|c| c & 0xff == 9),
    }
}

/// SQLITE_FULL (with its extended codes), or PostgreSQL's `disk_full`.
fn is_disk_full(dialect: Syntax, code: &str) -> bool {
    match dialect {
        Syntax::Postgres => code == "53100",
        Syntax::Sqlite => code.parse::<i32>().is_ok_and(|c| c & 0xff == 13),
    }
}

/// SQLSTATE (PostgreSQL) or result code (SQLite) values worth retrying.
fn is_temporary_code(dialect: Syntax, code: &str) -> bool {
    match dialect {
        // Serialization failure, deadlock, lock not available, shutdown, too many connections,
        // and the whole connection-exception class.
        Syntax::Postgres => {
            matches!(
                code,
                "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300"
            ) || code.starts_with("08")
        }
        // BUSY and LOCKED, with their extended codes (primary code in the low byte).
        Syntax::Sqlite => code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)),
    }
}

/// A corrupt row: permanent, since re-reading returns the same bytes.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Backend {
        message: format!("stored data is corrupt: {what}"),
        temporary: false,
        source: None,
    }
}

/// Digest changes made by one transaction, flushed once at its end in (type, segment) order.
/// Sorted flushing means concurrent PostgreSQL transactions lock digest rows in one global order
/// and cannot deadlock on them.
#[derive(Default)]
pub(crate) struct DigestDeltas(BTreeMap<(ResourceType, u16), (u128, i64)>);

impl DigestDeltas {
    pub(crate) fn apply(&mut self, rt: ResourceType, segment: u16, xor: u128, count: i64) {
        let e = self.0.entry((rt, segment)).or_default();
        e.0 ^= xor;
        e.1 += count;
    }

    /// Whether no change was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Non-empty deltas as (type, segment, hi, lo, count).
    pub(crate) fn rows(&self) -> Vec<(&'static str, i32, i64, i64, i64)> {
        self.0
            .iter()
            .filter(|(_, (x, c))| *x != 0 || *c != 0)
            .map(|((rt, seg), (x, c))| {
                let (hi, lo) = split_u128(*x);
                (rt.as_str(), i32::from(*seg), hi, lo, *c)
            })
            .collect()
    }
}

/// Encodes a keyset cursor for search paging: the last (type, id) returned.
pub(crate) fn search_cursor(rt: &str, id: &str) -> String {
    format!("{rt}/{id}")
}

/// Decodes a search cursor; a tampered cursor is a search error, never a query fragment.
pub(crate) fn parse_search_cursor(c: &str) -> Result<(ResourceType, LogicalId), Error> {
    let bad = || Error::InvalidSearch(format!("invalid paging cursor {c:?}"));
    let (rt, id) = c.split_once('/').ok_or_else(bad)?;
    Ok((
        ResourceType::new(rt).map_err(|_| bad())?,
        LogicalId::new(id).map_err(|_| bad())?,
    ))
}

/// Decodes a history cursor: the seq of the last version returned.
pub(crate) fn parse_history_cursor(c: &str) -> Result<i64, Error> {
    c.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::InvalidSearch(format!("invalid history cursor {c:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The migration that drops shared rows names every row name the R4 definitions share, on
    /// its type and in its table, in both dialects: rows an older write stored under a shared
    /// name would otherwise stay on disk, never read.
    #[test]
    fn the_shared_rows_migration_covers_every_shared_name() {
        let reg = fhirstore_core::registry::Registry::r4();
        for sql in [
            include_str!("../../../migrations/sqlite/0012_shared_rows.sql"),
            include_str!("../../../migrations/postgres/0012_shared_rows.sql"),
        ] {
            let statements: Vec<&str> = sql.split(';').collect();
            for (t, name, _) in fhirstore_core::registry::SharedRows::r4().all() {
                let rt = fhirstore_core::ResourceType::new(t).expect("type");
                let code = name.split(':').next().unwrap_or(name);
                let def = reg.get(rt, code).expect("a parameter");
                let table = match (def.kind, name.ends_with(":text")) {
                    (_, true) => "search_string",
                    (fhirstore_core::registry::SearchParamType::Composite, _) => "search_composite",
                    (k, _) => search::index_table(k).expect("an index table"),
                };
                assert!(
                    statements.iter().any(|s| {
                        s.contains(&format!("DELETE FROM {table} "))
                            && s.contains(&format!("'{t}'"))
                            && s.contains(&format!("'{name}'"))
                    }),
                    "{t} {name} in {table}"
                );
            }
        }
    }

    /// A step that fails temporarily `fail` times, then succeeds; counts its calls.
    async fn flaky(max_retries: u32, fail: u32, temporary: bool) -> (Result<u32, Error>, u32) {
        let mut calls = 0u32;
        let out = retrying(max_retries, "test step", &mut calls, |calls| {
            Box::pin(async move {
                *calls += 1;
                if *calls <= fail {
                    Err(Error::backend_msg("busy", temporary))
                } else {
                    Ok(*calls)
                }
            })
        })
        .await;
        (out, calls)
    }

    #[tokio::test]
    async fn retrying_retries_temporary_failures_only_and_only_so_often() {
        // Two temporary failures, then success: three calls, the last one's value.
        let (out, calls) = flaky(3, 2, true).await;
        assert_eq!((out.ok(), calls), (Some(3), 3));
        // Always temporary: the first call and three retries, then the last error as it is.
        let (out, calls) = flaky(3, u32::MAX, true).await;
        assert_eq!(calls, 4);
        assert!(out.is_err_and(|e| e.is_temporary()));
        // A permanent failure is never retried.
        let (out, calls) = flaky(3, u32::MAX, false).await;
        assert_eq!(calls, 1);
        assert!(out.is_err_and(|e| !e.is_temporary()));
        // No retries allowed: one call.
        let (_, calls) = flaky(0, u32::MAX, true).await;
        assert_eq!(calls, 1);
    }

    #[test]
    fn temporary_codes() {
        for c in ["40001", "40P01", "08006"] {
            assert!(is_temporary_code(Syntax::Postgres, c), "{c}");
        }
        for c in ["23505", "42P01", "42501", ""] {
            assert!(!is_temporary_code(Syntax::Postgres, c), "{c}");
        }
        for c in ["5", "517", "6", "262"] {
            assert!(is_temporary_code(Syntax::Sqlite, c), "{c}");
        }
        for c in ["19", "1", "2067", "", "40P01"] {
            assert!(!is_temporary_code(Syntax::Sqlite, c), "{c}");
        }
    }

    #[test]
    fn cursors_reject_tampering() {
        assert!(parse_search_cursor("Patient/a-1").is_ok());
        assert!(parse_search_cursor("Patient/a' OR 1=1").is_err());
        assert!(parse_search_cursor("Nope/a").is_err());
        assert!(parse_search_cursor("x").is_err());
        assert!(parse_history_cursor("12").is_ok());
        assert!(parse_history_cursor("-1").is_err());
        assert!(parse_history_cursor("1;drop").is_err());
    }

    #[test]
    fn digest_deltas_cancel_and_sort() {
        let pt = ResourceType::new("Patient").expect("known");
        let ob = ResourceType::new("Observation").expect("known");
        let mut d = DigestDeltas::default();
        d.apply(pt, 9, 0xff, 1);
        d.apply(ob, 3, 0x0f, 1);
        d.apply(pt, 9, 0xff, -1);
        let rows = d.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, "Observation");
    }

    #[test]
    fn a_cached_count_answers_only_for_caps_it_can_tell() {
        let c = CountCache::default();
        c.put("t", "k".to_owned(), 100, 7);
        c.put("t", "broad".to_owned(), 100, 100);
        // Exact below its cap: good for any cap, capped by it.
        assert_eq!(c.get("t", "k", 1_000), Some(7));
        assert_eq!(c.get("t", "k", 5), Some(5));
        // Capped: good only for a cap no higher.
        assert_eq!(c.get("t", "broad", 50), Some(50));
        assert_eq!(c.get("t", "broad", 100), Some(100));
        assert_eq!(c.get("t", "broad", 101), None);
        // Another tenant's count is not this one's.
        assert_eq!(c.get("u", "k", 100), None);
    }
}
