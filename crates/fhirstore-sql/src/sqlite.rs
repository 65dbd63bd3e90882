//! The embedded SQLite dialect: one file, WAL, one writer connection.
//!
//! All writes go through a pool of exactly one connection, so concurrent writers queue in the
//! pool instead of failing with "database is locked"; reads use their own pool and, under WAL,
//! never wait for the writer.

use std::path::Path;
use std::sync::Arc;

use fhirstore_core::digest::join_u128;
use fhirstore_core::digest::Digest;
use fhirstore_core::{Error, ResourceType, Result, SearchQuery, TenantId};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row as _, SqliteConnection, SqlitePool, TypeInfo as _, ValueRef as _};

use crate::dialect::{Cell, Dialect, Row, SearchSlot};
use crate::search::{Bind, Sql};
use crate::store::Store;
use crate::{corrupt, Durability, SqlConfig, Syntax, VersionRow};

/// The SQLite dialect.
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteDialect;

/// The SQLite store under its public name.
pub type SqliteStore = Store<SqliteDialect>;

fn db_err(e: sqlx::Error) -> Error {
    crate::classify(e, Syntax::Sqlite)
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

impl Dialect for SqliteDialect {
    type Db = sqlx::Sqlite;
    const SYNTAX: Syntax = Syntax::Sqlite;
    const NAME: &'static str = "sqlite";
    /// The single writer connection already serialises writers, so no row lock is needed.
    const SELECT_CURRENT_FOR_WRITE: &'static str = "SELECT version, deleted, e_hi, e_lo \
         FROM resources WHERE tenant = $1 AND resource_type = $2 AND id = $3 AND segment = $4";
    /// The one writer connection serialises writers.
    const LOCK_CURRENT_ROWS: &'static str = "";
    /// Index tables are keyed by their whole row (see `Dialect::INSERT_INDEX_ROWS`).
    const INSERT_INDEX_ROWS: &'static str = "INSERT OR IGNORE INTO";
    const ENSURE_TENANT_KEY: Option<&'static str> = Some(ENSURE_TENANT_KEY);
    /// SQLite's planner exposes no row estimates: `_total=estimate` counts exactly.
    const ESTIMATE_PREFIX: Option<&'static str> = None;
    /// Write transactions take SQLite's write lock up front, so a second process's writer waits
    /// on the busy timeout. A deferred transaction that read before another connection
    /// committed would fail with SQLITE_BUSY_SNAPSHOT instead; the retry loop recovers from
    /// that, but only after redoing the work.
    const BEGIN_WRITE: Option<&'static str> = Some("BEGIN IMMEDIATE");
    /// The one writer connection serialises writers, so the digest delta can be applied in the
    /// same round trip as the rest of the write without deadlock risk.
    const ALWAYS_INLINE_DIGEST: bool = true;
    /// SQLite has no XOR aggregate to compute group digests at read time: every write keeps
    /// them in `digest_groups` (migration 0008), beside its segment.
    const GROUP_DIGESTS: &'static str = "SELECT grp, h_hi, h_lo, count FROM digest_groups \
         WHERE tenant = $1 AND resource_type = $2 AND count <> 0 ORDER BY grp";
    const GROUP_TABLE: bool = true;
    /// The list is JSON text, which `json_each` turns into rows. `CROSS JOIN` fixes the join
    /// order (the list outside, a primary-key probe per segment inside): the planner, without
    /// statistics for a table that was empty when they were last gathered, would otherwise
    /// scan the type's every segment once per listed one.
    const SEGMENTS_LISTED: &'static str = "SELECT d.segment, d.h_hi, d.h_lo, d.count \
         FROM json_each($3) AS j CROSS JOIN digests AS d \
         WHERE d.tenant = $1 AND d.resource_type = $2 AND d.segment = j.value AND d.count <> 0";
    /// One index range per segment (see `SEGMENTS_LISTED` for the `CROSS JOIN`).
    const KEYS_IN_SEGMENTS: &'static str = "SELECT r.id, r.version, r.e_hi, r.e_lo \
         FROM json_each($3) AS j CROSS JOIN resources AS r \
         WHERE r.tenant = $1 AND r.resource_type = $2 AND r.segment = j.value";
    /// The one writer connection already orders the generation against registrations.
    const SELECT_PARAM_GENERATION: &'static str =
        "SELECT (SELECT generation FROM search_parameter_generation WHERE tenant = $1)";
    /// Registrations need no lock beyond the single writer's.
    const LOCK_PARAMS_EXCLUSIVE: Option<&'static str> = None;
    /// A reindex batch runs on the writer connection, so no write can slip between its read of
    /// a body and its rewrite of that body's rows.
    const LOCK_REINDEX_BATCH: &'static str = "";
    /// One writer hands out `seq` in commit order, so `seq` alone orders the log (both halves
    /// of the cursor).
    const LOG_MAJOR: &'static str = "seq";
    const LOG_ORDER: &'static str = "seq";
    const LOG_AFTER: &'static str = "(seq, seq) > ($1, $2)";
    const LOG_UPTO: &'static str = "(seq, seq) <= ($1, $2)";
    const LOG_VISIBLE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    /// The highest `seq` ever committed, from AUTOINCREMENT's own record: it stays put when
    /// pruning empties the outbox, so a reader that compares it with where it stopped can
    /// tell entries were pruned before it read them.
    const LOG_HEAD: &'static str = "SELECT s, s FROM (SELECT COALESCE((SELECT seq FROM \
         sqlite_sequence WHERE name = 'outbox'), 0) AS s)";
    /// The one writer connection already holds off writers during the self-check.
    const LOCK_DIGESTS: Option<&'static str> = None;
    /// The progress handler stops a statement as soon as its slot closes.
    const CANCEL_BACKEND: Option<&'static str> = None;

    /// Refreshes statistics from a bounded sample of each index, on the writer connection.
    fn analyze_sql() -> String {
        format!(
            "PRAGMA analysis_limit = 1000; ANALYZE {};",
            crate::analyzed_tables().replace(", ", "; ANALYZE ")
        )
    }

    fn plan_rows(_row: &mut Row) -> Option<u64> {
        None
    }

    /// Writes a version, its outbox entry, index rows and digest change in one round trip:
    /// sqlx runs a multi-statement query on its worker thread in one go, binding `$N` by number
    /// in every statement. Statement overhead, not row count, bounds SQLite write throughput.
    async fn write_version(
        conn: &mut SqliteConnection,
        row: &VersionRow<'_>,
    ) -> Result<Option<i64>> {
        let mut tables = Vec::with_capacity(crate::INDEX_TABLES.len());
        for rows in crate::index_rows(row.index) {
            tables.push(
                serde_json::to_string(&rows).map_err(|e| corrupt(format!("index entries: {e}")))?,
            );
        }
        // fetch_all, not fetch_one: the stream must be driven to its end, or the statements
        // after the one returning `seq` never run.
        let mut query = crate::bind_version_row!(sqlx::query_scalar(write_sql(row.is_new)), row)
            .bind(row.digest_delta.0)
            .bind(row.digest_delta.1)
            .bind(row.digest_count)
            .bind(row.inline_digest);
        for t in tables {
            query = query.bind(t);
        }
        let seqs: Vec<i64> = query.fetch_all(&mut *conn).await.map_err(db_err)?;
        match seqs.as_slice() {
            [seq] => Ok(Some(*seq)),
            _ => Err(corrupt(format!(
                "version write returned {} sequence numbers",
                seqs.len()
            ))),
        }
    }

    /// All of them in one multi-statement: see `write_many_sql`.
    async fn write_versions(
        conn: &mut SqliteConnection,
        rows: &[VersionRow<'_>],
    ) -> Result<Vec<Option<i64>>> {
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        let encode = |v: &serde_json::Value| {
            serde_json::to_string(v).map_err(|e| corrupt(format!("version rows: {e}")))
        };
        let versions: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!([
                    r.resource_type,
                    r.id,
                    r.version,
                    r.now,
                    i64::from(r.deleted),
                    r.segment,
                    r.e_hi,
                    r.e_lo,
                    r.op,
                    r.body.map(hex),
                    i64::from(r.was_live),
                ])
            })
            .collect();
        let mut tables = vec![Vec::new(); crate::INDEX_TABLES.len()];
        for r in rows {
            for (table, index_rows) in tables.iter_mut().zip(crate::index_rows(r.index)) {
                for cols in index_rows {
                    let mut row = Vec::with_capacity(cols.len() + 2);
                    row.push(serde_json::Value::from(r.resource_type));
                    row.push(serde_json::Value::from(r.id));
                    row.extend(cols);
                    table.push(serde_json::Value::Array(row));
                }
            }
        }
        let any_live = rows.iter().any(|r| r.was_live);
        let mut query = sqlx::query_scalar(write_many_sql(any_live))
            .bind(first.tenant)
            .bind(encode(&serde_json::Value::Array(versions))?);
        for t in tables {
            query = query.bind(encode(&serde_json::Value::Array(t))?);
        }
        let last: Vec<i64> = query.fetch_all(&mut *conn).await.map_err(db_err)?;
        let (&[last], Ok(n)) = (last.as_slice(), i64::try_from(rows.len())) else {
            return Err(corrupt("a batch of versions returned no sequence number"));
        };
        // One INSERT numbers the outbox rows consecutively, in the order given.
        Ok((0..n).map(|k| Some(last - n + 1 + k)).collect())
    }

    /// Conditional writes need no extra lock: the one writer connection serialises them.
    async fn lock_criteria(
        _conn: &mut SqliteConnection,
        _tenant: &TenantId,
        _q: &SearchQuery,
    ) -> Result<()> {
        Ok(())
    }

    /// A progress handler that interrupts the statement (`SQLITE_INTERRUPT`) once the slot is
    /// due: checked every `PROGRESS_STEPS` virtual-machine steps, a few microseconds apart.
    /// Installed once per connection: setting it is a round trip to sqlx's worker thread,
    /// which would cost a cheap search a third of its time.
    async fn arm_search(conn: &mut SqliteConnection, slot: Arc<SearchSlot>) -> Result<()> {
        let mut handle = conn.lock_handle().await.map_err(db_err)?;
        handle.set_progress_handler(PROGRESS_STEPS, move || !slot.due());
        Ok(())
    }
}

/// Gives tenant `$1` its search-index key if it has none: `.` and the next number, which no
/// tenant name can equal (names are letters, digits and `-`), so a key and a name never
/// collide, in the table or while migration 0015 turns names into keys. Keys are never
/// removed, so the count is the largest. The one writer connection orders the check and
/// the insert.
const ENSURE_TENANT_KEY: &str = "INSERT INTO tenant_keys (tenant, key) \
     SELECT $1, '.' || ((SELECT COUNT(*) FROM tenant_keys) + 1) \
     WHERE NOT EXISTS (SELECT 1 FROM tenant_keys WHERE tenant = $1)";

/// The `tenant` of tenant `$1`'s search-index rows: its key (see `ENSURE_TENANT_KEY`).
const INDEX_TENANT: &str = "(SELECT key FROM tenant_keys WHERE tenant = $1)";

/// Virtual-machine steps between two checks of a search's deadline.
const PROGRESS_STEPS: i32 = 1_000;

/// An integer list as SQLite binds it: JSON text, which `json_each` turns into rows.
fn json_list(v: &[i32]) -> String {
    let items: Vec<String> = v.iter().map(i32::to_string).collect();
    format!("[{}]", items.join(","))
}

/// Bytes as hexadecimal text, which SQLite's `unhex` turns back: JSON carries no bytes.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A text list as SQLite binds it: a JSON array, which `json_each` turns into rows.
fn json_texts(v: &[String]) -> String {
    serde_json::Value::from(v.to_vec()).to_string()
}

/// Decodes a row by each value's storage class: SQLite types values, not columns.
fn row_of(row: SqliteRow) -> Result<Row> {
    let n = row.columns().len();
    let mut cells = Vec::with_capacity(n);
    for i in 0..n {
        let raw = row.try_get_raw(i).map_err(db_err)?;
        let class = (!raw.is_null()).then(|| raw.type_info());
        let cell = match class.as_ref().map(|t| t.name()) {
            None => Cell::Null,
            Some("INTEGER" | "BOOLEAN") => Cell::Int(row.try_get_unchecked(i).map_err(db_err)?),
            Some("REAL") => Cell::Real(row.try_get_unchecked(i).map_err(db_err)?),
            Some("TEXT") => Cell::Text(row.try_get_unchecked(i).map_err(db_err)?),
            Some("BLOB") => Cell::Bytes(row.try_get_unchecked(i).map_err(db_err)?),
            Some(other) => return Err(corrupt(format!("column {i} of type {other}"))),
        };
        cells.push(cell);
    }
    Ok(Row::new(cells))
}

crate::dialect::exec_for!(SqliteConnection, sqlx::Sqlite, json_list, json_texts);

/// Parameters: $1 tenant, $2 type, $3 id, $4 version, $5 now, $6 deleted, $7 segment, $8 e_hi,
/// $9 e_lo, $10 op, $11 body, $12 was_live, $13 digest delta high, $14 digest delta low,
/// $15 count delta, $16 whether to apply it, then one JSON array of rows per index table from $17
/// in `INDEX_TABLES` order.
fn write_sql(is_new: bool) -> &'static str {
    use std::fmt::Write as _;
    use std::sync::OnceLock;
    static NEW: OnceLock<String> = OnceLock::new();
    static EXISTING: OnceLock<String> = OnceLock::new();
    let build = |head: &str| {
        let mut sql = String::from(head);
        sql.push_str(ENSURE_TENANT_KEY);
        sql.push_str(
            ";
INSERT INTO outbox (tenant, resource_type, id, version, op, created_at)
    VALUES ($1, $2, $3, $4, $10, $5);
INSERT INTO resource_versions (tenant, resource_type, id, version, seq, last_updated, deleted, body)
    VALUES ($1, $2, $3, $4, last_insert_rowid(), $5, $6, $11) RETURNING seq;
INSERT INTO digests (tenant, resource_type, segment, h_hi, h_lo, count)
    SELECT $1, $2, $7, $13, $14, $15 WHERE $16
    ON CONFLICT (tenant, resource_type, segment) DO UPDATE SET
    h_hi = (digests.h_hi | excluded.h_hi) - (digests.h_hi & excluded.h_hi),
    h_lo = (digests.h_lo | excluded.h_lo) - (digests.h_lo & excluded.h_lo),
    count = digests.count + excluded.count;
INSERT INTO digest_groups (tenant, resource_type, grp, h_hi, h_lo, count)
    SELECT $1, $2, $7 >> 4, $13, $14, $15 WHERE $16
    ON CONFLICT (tenant, resource_type, grp) DO UPDATE SET
    h_hi = (digest_groups.h_hi | excluded.h_hi) - (digest_groups.h_hi & excluded.h_hi),
    h_lo = (digest_groups.h_lo | excluded.h_lo) - (digest_groups.h_lo & excluded.h_lo),
    count = digest_groups.count + excluded.count;",
        );
        for (i, (table, cols)) in crate::INDEX_TABLES.iter().enumerate() {
            let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
            let values: Vec<String> = (0..cols.len())
                .map(|k| format!("j.value ->> {k}"))
                .collect();
            // Writing to a String cannot fail.
            let _ = write!(
                sql,
                "
DELETE FROM {table} WHERE $12 AND tenant = {INDEX_TENANT} AND resource_type = $2 AND id = $3;
INSERT OR IGNORE INTO {table} (tenant, resource_type, {}, id)
    SELECT {INDEX_TENANT}, $2, {}, $3 FROM json_each(${}) AS j;",
                names.join(", "),
                values.join(", "),
                17 + i
            );
        }
        sql
    };
    if is_new {
        NEW.get_or_init(|| {
            build(
                "INSERT INTO resources (tenant, resource_type, id, version, last_updated, deleted, \
                 segment, e_hi, e_lo) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9);",
            )
        })
    } else {
        EXISTING.get_or_init(|| {
            build(
                "UPDATE resources SET version = $4, last_updated = $5, deleted = $6, segment = $7, \
                 e_hi = $8, e_lo = $9 WHERE tenant = $1 AND resource_type = $2 AND segment = $7 AND id = $3;",
            )
        })
    }
}

/// The statement behind `write_versions`. Parameters: $1 tenant; $2 the versions, a JSON array
/// of `[type, id, version, now, deleted, segment, e_hi, e_lo, op, body (hexadecimal), was_live]`; then one
/// JSON array of `[type, id, columns…]` rows per index table from $3, in `INDEX_TABLES` order.
/// `any_live`: some version replaces a live one, whose index rows go first.
fn write_many_sql(any_live: bool) -> &'static str {
    use std::fmt::Write as _;
    use std::sync::OnceLock;
    static NEW: OnceLock<String> = OnceLock::new();
    static LIVE: OnceLock<String> = OnceLock::new();
    let build = |any_live: bool| {
        let v = |k: usize| format!("j.value ->> {k}");
        let mut sql = format!(
            "{ENSURE_TENANT_KEY};
INSERT INTO outbox (tenant, resource_type, id, version, op, created_at)
    SELECT $1, {}, {}, {}, {}, {} FROM json_each($2) AS j ORDER BY j.key;
SELECT MAX(seq) FROM outbox;
INSERT INTO resource_versions (tenant, resource_type, id, version, seq, last_updated, deleted, body)
    SELECT $1, {}, {}, {}, (SELECT MAX(seq) FROM outbox) - json_array_length($2) + 1 + j.key,
        {}, {}, unhex({}) FROM json_each($2) AS j;
INSERT INTO resources (tenant, resource_type, id, version, last_updated, deleted, segment, e_hi, e_lo)
    SELECT $1, {}, {}, {}, {}, {}, {}, {}, {} FROM json_each($2) AS j WHERE true
    ON CONFLICT (tenant, resource_type, id) DO UPDATE SET version = excluded.version,
        last_updated = excluded.last_updated, deleted = excluded.deleted,
        segment = excluded.segment, e_hi = excluded.e_hi, e_lo = excluded.e_lo;",
            v(0),
            v(1),
            v(2),
            v(8),
            v(3),
            v(0),
            v(1),
            v(2),
            v(3),
            v(4),
            v(9),
            v(0),
            v(1),
            v(2),
            v(3),
            v(4),
            v(5),
            v(6),
            v(7),
        );
        for (i, (table, cols)) in crate::INDEX_TABLES.iter().enumerate() {
            let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
            let values: Vec<String> = (0..cols.len()).map(|k| v(k + 2)).collect();
            // Writing to a String cannot fail.
            if any_live {
                let _ = write!(
                    sql,
                    "
DELETE FROM {table} WHERE tenant = {INDEX_TENANT} AND (resource_type, id) IN
    (SELECT j.value ->> 0, j.value ->> 1 FROM json_each($2) AS j WHERE j.value ->> 10);"
                );
            }
            let _ = write!(
                sql,
                "
INSERT OR IGNORE INTO {table} (tenant, resource_type, {}, id)
    SELECT {INDEX_TENANT}, j.value ->> 0, {}, j.value ->> 1 FROM json_each(${}) AS j;",
                names.join(", "),
                values.join(", "),
                3 + i
            );
        }
        sql
    };
    if any_live {
        LIVE.get_or_init(|| build(true))
    } else {
        NEW.get_or_init(|| build(false))
    }
}

/// Run when a store opens: refresh whatever statistics SQLite judges stale, sampling at most
/// 1,000 rows per index so a large file opens quickly.
const ANALYZE_SAMPLED: &str = "PRAGMA analysis_limit = 1000; PRAGMA optimize = 0x10002;";

impl Store<SqliteDialect> {
    /// Opens (creating if needed) the database file at `path` and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>, config: SqlConfig) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(config.busy_timeout)
            .pragma("temp_store", "memory")
            // Checkpoint every ~40 MB of WAL instead of 4 MB: hot index pages are rewritten by
            // many commits, and a longer interval copies each back once (measured +10% creates).
            .pragma("wal_autocheckpoint", "10000");
        // An embedded connection cannot go stale the way a network one can, and the pool's
        // liveness ping is a round trip to sqlx's worker thread on every checkout.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(db_err)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| Error::backend("running SQLite migrations", false, e))?;
        fill_digest_groups(&writer).await?;
        let read_only = options.read_only(true);
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(config.max_connections.max(1))
            .connect_with(read_only.clone())
            .await
            .map_err(db_err)?;
        let searcher = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(config.search_connections.max(1))
            .connect_lazy_with(read_only);
        // Statistics from an earlier run may be missing or stale; `optimize` refreshes only
        // those that need it, and the limit keeps it to a bounded sample of each index.
        sqlx::query(ANALYZE_SAMPLED)
            .execute(&writer)
            .await
            .map_err(db_err)?;
        let mut store = Store::new(reader, writer, searcher, config);
        let stamp = crate::wal_stamp::WalStamp::new(path.as_ref());
        store.stamp = Some(Arc::new(move || stamp.read()));
        Ok(store)
    }
}

/// Fills `digest_groups` from `digests` in a database written before groups were kept: the table
/// is empty while segments exist. The check and the fill run in one write transaction, so two
/// processes opening the file at once fill it once.
async fn fill_digest_groups(writer: &SqlitePool) -> Result<()> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
    let (needed,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM digests WHERE count <> 0) \
         AND NOT EXISTS (SELECT 1 FROM digest_groups)",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db_err)?;
    if needed {
        let rows: Vec<(String, String, i32, i64, i64, i64)> = sqlx::query_as(
            "SELECT tenant, resource_type, segment, h_hi, h_lo, count FROM digests \
             WHERE count <> 0",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut types: std::collections::BTreeMap<
            (String, String),
            std::collections::BTreeMap<i32, Digest>,
        > = Default::default();
        for (tenant, rt, segment, hi, lo, count) in rows {
            let d = Digest {
                hash: join_u128(hi, lo),
                count,
            };
            types.entry((tenant, rt)).or_default().insert(segment, d);
        }
        tracing::info!(
            types = types.len(),
            "filling digest groups from the segments"
        );
        for ((tenant, rt), segments) in types {
            let tenant = TenantId::new(&tenant).map_err(|e| corrupt(e.to_string()))?;
            let rt = ResourceType::new(&rt).map_err(|_| corrupt(format!("type {rt:?}")))?;
            let groups = crate::store::fold_segment_map(&segments);
            SqliteStore::rewrite_digest_rows(&mut tx, "digest_groups", "grp", &tenant, rt, &groups)
                .await?;
        }
    }
    tx.commit().await.map_err(db_err)
}
