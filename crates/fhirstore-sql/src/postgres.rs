//! The PostgreSQL dialect.
//!
//! Writers run concurrently under READ COMMITTED. Each locks the current row of the resource it
//! writes (`FOR UPDATE`), so versions of one resource are strictly sequential; update-as-create
//! races are settled by `ON CONFLICT DO NOTHING` and a retry as an update; conditional writes
//! take a transaction-scoped advisory lock on their criteria.

use fhirstore_core::{Error, Result, SearchQuery, TenantId};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row as _, TypeInfo as _, ValueRef as _};

use crate::dialect::{Cell, Dialect, Row, SearchSlot};
use crate::search::{Bind, Sql};
use crate::store::Store;
use crate::{SqlConfig, Syntax, VersionRow};

/// The PostgreSQL dialect.
#[derive(Clone, Copy, Debug, Default)]
pub struct PostgresDialect;

/// The PostgreSQL store under its public name.
pub type PostgresStore = Store<PostgresDialect>;

fn db_err(e: sqlx::Error) -> Error {
    crate::classify(e, Syntax::Postgres)
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

impl Dialect for PostgresDialect {
    type Db = sqlx::Postgres;
    const SYNTAX: Syntax = Syntax::Postgres;
    const NAME: &'static str = "postgres";
    const SELECT_CURRENT_FOR_WRITE: &'static str = "SELECT version, deleted, e_hi, e_lo \
         FROM resources WHERE tenant = $1 AND resource_type = $2 AND id = $3 AND segment = $4 \
         FOR UPDATE";
    /// Row locks order concurrent writers of the same resources.
    const LOCK_CURRENT_ROWS: &'static str = " FOR UPDATE";
    /// Index tables have no unique key to conflict on.
    const INSERT_INDEX_ROWS: &'static str = "INSERT INTO";
    /// Index rows hold the tenant's name: the schema is distributed by it, and a row must sit
    /// in its resource's shard.
    const ENSURE_TENANT_KEY: Option<&'static str> = None;
    /// `_total=estimate` reads the planner's row estimate for the search's FROM and WHERE.
    const ESTIMATE_PREFIX: Option<&'static str> = Some("EXPLAIN (FORMAT JSON) SELECT 1");
    /// Plain `BEGIN` (READ COMMITTED): row locks taken by the write path order the writers.
    const BEGIN_WRITE: Option<&'static str> = None;
    /// A transaction writing several versions applies its digest changes once at its end, in
    /// (type, segment) order, so concurrent transactions lock digest rows in one global order
    /// and cannot deadlock on them. A single write applies its change inline.
    const ALWAYS_INLINE_DIGEST: bool = false;
    /// Group digests are aggregated where the rows are (`bit_xor`), so 4,096 rows travel
    /// instead of 65,536. The shift is `fhirstore_core::digest::GROUP_SHIFT`.
    const GROUP_DIGESTS: &'static str =
        "SELECT segment >> 4, bit_xor(h_hi), bit_xor(h_lo), sum(count)::bigint FROM digests \
         WHERE tenant = $1 AND resource_type = $2 GROUP BY 1 HAVING sum(count) <> 0 ORDER BY 1";
    /// Group digests are computed, not kept: nothing for the self-check to repair.
    const GROUP_TABLE: bool = false;
    /// The list is an `int4[]`: `= ANY` is an index condition, one primary-key probe per listed
    /// segment, whatever the planner estimates of the type's size.
    const SEGMENTS_LISTED: &'static str = "SELECT segment, h_hi, h_lo, count FROM digests \
         WHERE tenant = $1 AND resource_type = $2 AND segment = ANY($3) AND count <> 0";
    /// Through `resources_segment` (see `SEGMENTS_LISTED`).
    const KEYS_IN_SEGMENTS: &'static str = "SELECT id, version, e_hi, e_lo FROM resources \
         WHERE tenant = $1 AND resource_type = $2 AND segment = ANY($3)";
    /// Under a shared per-tenant lock held to the end of the transaction: a registration takes
    /// it exclusively, so no write can index with the parameters from before a registration yet
    /// commit after it. An advisory lock works even for a tenant with no generation row yet,
    /// where a row lock would lock nothing.
    const SELECT_PARAM_GENERATION: &'static str =
        "SELECT (SELECT generation FROM search_parameter_generation \
         WHERE tenant = $1) FROM pg_advisory_xact_lock_shared(7, hashtext($1))";
    /// Waits for the tenant's writes in flight (see `SELECT_PARAM_GENERATION`).
    const LOCK_PARAMS_EXCLUSIVE: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(7, hashtext($1))");
    /// A reindex batch locks the current rows it rewrites, so a concurrent write of one of them
    /// waits, then indexes the new body itself.
    const LOCK_REINDEX_BATCH: &'static str = " FOR UPDATE OF r";
    /// The log is read in (transaction id, seq) order, below the oldest running transaction
    /// (see `fhirstore_core::changelog`).
    const LOG_MAJOR: &'static str = "txid::text::bigint";
    const LOG_ORDER: &'static str = "txid, seq";
    const LOG_AFTER: &'static str = "(txid, seq) > (($1::bigint)::text::xid8, $2)";
    const LOG_UPTO: &'static str = "(txid, seq) <= (($1::bigint)::text::xid8, $2)";
    const LOG_VISIBLE: &'static str = " AND txid < pg_snapshot_xmin(pg_current_snapshot())";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const LOG_HEAD: &'static str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
         - 1, 9223372036854775807::bigint";
    /// A statement keeps running after its client stops reading; only a cancel request (or
    /// `statement_timeout`) ends it.
    const CANCEL_BACKEND: Option<&'static str> = Some("SELECT pg_cancel_backend($1::int4)");
    const LOCK_DIGESTS: Option<&'static str> =
        Some("LOCK TABLE digests IN SHARE ROW EXCLUSIVE MODE");

    /// Autovacuum analyzes at most once per naptime (a minute by default), which is too late
    /// right after a bulk load; and until a table is vacuumed, its visibility map is empty, so
    /// every index-only scan fetches each row from the heap too. `VACUUM` takes no lock that
    /// writers wait for.
    fn analyze_sql() -> String {
        format!("VACUUM (ANALYZE) {}", crate::analyzed_tables())
    }

    /// The top plan node's row estimate from `EXPLAIN (FORMAT JSON)`'s one row.
    fn plan_rows(row: &mut Row) -> Option<u64> {
        let text: String = row.get(0).ok()?;
        let plan: serde_json::Value = serde_json::from_str(&text).ok()?;
        plan.get(0)?
            .get("Plan")?
            .get("Plan Rows")?
            .as_f64()
            .map(|n| n as u64)
    }

    /// One statement: see `write_sql`. `None` when a concurrent writer created the resource
    /// first.
    async fn write_version(conn: &mut PgConnection, row: &VersionRow<'_>) -> Result<Option<i64>> {
        let mut query =
            crate::bind_version_row!(sqlx::query_as::<_, (i64,)>(write_sql(row.is_new)), row)
                .bind(row.digest_delta.0)
                .bind(row.digest_delta.1)
                .bind(row.digest_count)
                .bind(row.inline_digest);
        for ((_, cols), rows) in crate::INDEX_TABLES.iter().zip(crate::index_rows(row.index)) {
            query = bind_columns(query, cols, &rows);
        }
        let seq = query.fetch_optional(&mut *conn).await.map_err(db_err)?;
        Ok(seq.map(|(seq,)| seq))
    }

    /// All of them in one statement: see `write_many_sql`.
    async fn write_versions(
        conn: &mut PgConnection,
        rows: &[VersionRow<'_>],
    ) -> Result<Vec<Option<i64>>> {
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        fn texts(rows: &[VersionRow<'_>], f: fn(&VersionRow<'_>) -> String) -> Vec<String> {
            rows.iter().map(f).collect()
        }
        let mut query = sqlx::query_as::<_, (i64, i64)>(write_many_sql())
            .bind(first.tenant)
            .bind(first.now)
            .bind(texts(rows, |r| r.resource_type.to_owned()))
            .bind(texts(rows, |r| r.id.to_owned()))
            .bind(rows.iter().map(|r| r.version).collect::<Vec<i64>>())
            .bind(rows.iter().map(|r| r.deleted).collect::<Vec<bool>>())
            .bind(rows.iter().map(|r| r.segment).collect::<Vec<i32>>())
            .bind(rows.iter().map(|r| r.e_hi).collect::<Vec<i64>>())
            .bind(rows.iter().map(|r| r.e_lo).collect::<Vec<i64>>())
            .bind(texts(rows, |r| r.op.to_owned()))
            .bind(
                rows.iter()
                    .map(|r| r.body.map(<[u8]>::to_vec))
                    .collect::<Vec<Option<Vec<u8>>>>(),
            )
            .bind(rows.iter().map(|r| r.was_live).collect::<Vec<bool>>())
            .bind(rows.iter().map(|r| r.is_new).collect::<Vec<bool>>());
        // Each index table: the ordinal of the version owning each row, then a column each.
        let mut tables: Vec<(Vec<i64>, Vec<Vec<serde_json::Value>>)> =
            vec![Default::default(); crate::INDEX_TABLES.len()];
        for (ord, r) in (1i64..).zip(rows) {
            for ((owners, table), index_rows) in tables.iter_mut().zip(crate::index_rows(r.index)) {
                owners.extend(std::iter::repeat_n(ord, index_rows.len()));
                table.extend(index_rows);
            }
        }
        for ((_, cols), (owners, table)) in crate::INDEX_TABLES.iter().zip(tables) {
            query = query.bind(owners);
            query = bind_columns(query, cols, &table);
        }
        let written = query.fetch_all(&mut *conn).await.map_err(db_err)?;
        let mut seqs = vec![None; rows.len()];
        for (ord, seq) in written {
            let slot = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| seqs.get_mut(i))
                .ok_or_else(|| {
                    crate::corrupt(format!("a batch of versions returned ordinal {ord}"))
                })?;
            *slot = Some(seq);
        }
        Ok(seqs)
    }

    /// A transaction-scoped advisory lock on the tenant and the criteria's fingerprint.
    async fn lock_criteria(
        conn: &mut PgConnection,
        tenant: &TenantId,
        q: &SearchQuery,
    ) -> Result<()> {
        let key = xxhash_rust::xxh3::xxh3_64_with_seed(tenant.as_str().as_bytes(), q.fingerprint());
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key as i64)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Records the backend pid, for `CANCEL_BACKEND` when a search is abandoned mid-statement;
    /// the deadline itself is the session's `statement_timeout`.
    async fn arm_search(conn: &mut PgConnection, slot: std::sync::Arc<SearchSlot>) -> Result<()> {
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        slot.set_backend(i64::from(pid));
        Ok(())
    }
}

/// Binds index rows column by column, each as a typed array for `unnest`.
fn bind_columns<'q, O>(
    mut query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    cols: &[(&str, crate::Col)],
    rows: &[Vec<serde_json::Value>],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    for (k, (_, ty)) in cols.iter().enumerate() {
        let column = rows.iter().map(|r| r.get(k));
        query = match ty {
            crate::Col::Text => query.bind(
                column
                    .map(|v| v.and_then(|v| v.as_str()).unwrap_or_default().to_owned())
                    .collect::<Vec<String>>(),
            ),
            crate::Col::Int => query.bind(
                column
                    .map(|v| v.and_then(|v| v.as_i64()).unwrap_or_default())
                    .collect::<Vec<i64>>(),
            ),
            crate::Col::Real => query.bind(
                column
                    .map(|v| v.and_then(|v| v.as_f64()).unwrap_or_default())
                    .collect::<Vec<f64>>(),
            ),
        };
    }
    query
}

/// The pieces of an index table's insert from one typed array per column.
struct Unnest {
    /// The table's columns: `param, system, code`.
    names: String,
    /// The arrays from parameter `first` on, cast: `$18::text[], $19::text[]`.
    arrays: String,
    /// The aliases `unnest` gives them: `c0, c1`.
    aliases: String,
    /// The aliases as selected from `alias`: `x.c0, x.c1`.
    selected: String,
}

impl Unnest {
    fn of(cols: &[(&str, crate::Col)], first: usize, alias: &str) -> Self {
        let join = |f: &dyn Fn(usize, crate::Col) -> String| -> String {
            let parts: Vec<String> = cols.iter().enumerate().map(|(k, c)| f(k, c.1)).collect();
            parts.join(", ")
        };
        Unnest {
            names: join(&|k, _| cols[k].0.to_owned()),
            arrays: join(&|k, ty| {
                let cast = match ty {
                    crate::Col::Text => "text[]",
                    crate::Col::Int => "int8[]",
                    crate::Col::Real => "float8[]",
                };
                format!("${}::{cast}", first + k)
            }),
            aliases: join(&|k, _| format!("c{k}")),
            selected: join(&|k, _| format!("{alias}.c{k}")),
        }
    }
}

/// The statement behind `write_versions`: $1 tenant, $2 now, then one array per version
/// field ($3 types, $4 ids, $5 versions, $6 deleted, $7 segments, $8 e_hi, $9 e_lo, $10 ops,
/// $11 bodies, $12 was_live, $13 is_new), then per index table in `INDEX_TABLES` order the
/// owning version's ordinal (from 1) of each row and an array per column. Returns
/// `(ordinal, seq)` for each version written; a new resource a concurrent writer created
/// first is left out, and nothing of it is written.
fn write_many_sql() -> &'static str {
    use std::fmt::Write as _;
    use std::sync::OnceLock;
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let mut sql = String::from(
            "WITH x AS (SELECT * FROM unnest($3::text[], $4::text[], $5::int8[], $6::bool[], \
      $7::int4[], $8::int8[], $9::int8[], $10::text[], $11::bytea[], $12::bool[], $13::bool[])
      WITH ORDINALITY AS x(rt, id, version, deleted, segment, e_hi, e_lo, op, body, was_live,
      is_new, ord)),
n AS (INSERT INTO resources (tenant, resource_type, id, version, last_updated, deleted, segment,
      e_hi, e_lo)
      SELECT $1, rt, id, version, $2, deleted, segment, e_hi, e_lo FROM x WHERE is_new
      ON CONFLICT (tenant, resource_type, id) DO NOTHING RETURNING resource_type, id),
u AS (UPDATE resources r SET version = x.version, last_updated = $2, deleted = x.deleted,
      segment = x.segment, e_hi = x.e_hi, e_lo = x.e_lo FROM x
      WHERE NOT x.is_new AND r.tenant = $1 AND r.resource_type = x.rt AND r.segment = x.segment
      AND r.id = x.id RETURNING r.resource_type, r.id),
w AS (SELECT x.* FROM x JOIN (SELECT * FROM n UNION ALL SELECT * FROM u) k
      ON k.resource_type = x.rt AND k.id = x.id),
o AS (INSERT INTO outbox (tenant, resource_type, id, version, op, created_at)
      SELECT $1, rt, id, version, op, $2 FROM w ORDER BY ord RETURNING seq, resource_type, id),
s AS (SELECT o.seq, w.* FROM o JOIN w ON w.rt = o.resource_type AND w.id = o.id),
v AS (INSERT INTO resource_versions (tenant, resource_type, id, version, seq, last_updated,
      deleted, body)
      SELECT $1, rt, id, version, seq, $2, deleted, body FROM s)",
        );
        let mut param = 14;
        for (i, (table, cols)) in crate::INDEX_TABLES.iter().enumerate() {
            let owner = param;
            let u = Unnest::of(cols, owner + 1, "y");
            param = owner + 1 + cols.len();
            // Writing to a String cannot fail. The DELETE sees the statement's snapshot, so it
            // never removes the rows inserted beside it.
            let _ = write!(
                sql,
                ",
d{i} AS (DELETE FROM {table} t USING s WHERE s.was_live AND t.tenant = $1
      AND t.resource_type = s.rt AND t.id = s.id),
i{i} AS (INSERT INTO {table} (tenant, resource_type, {}, id)
      SELECT $1, s.rt, {}, s.id FROM unnest(${owner}::int8[], {}) AS y(own, {})
      JOIN s ON s.ord = y.own)",
                u.names, u.selected, u.arrays, u.aliases,
            );
        }
        sql.push_str("\nSELECT ord, seq FROM s");
        sql
    })
}

/// A duration as a PostgreSQL setting in milliseconds; zero would switch the limit off, so the
/// least is one.
fn millis(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// An integer list as PostgreSQL binds it: an `int4[]`.
fn int_array(v: &[i32]) -> &[i32] {
    v
}

/// A text list as PostgreSQL binds it: a `text[]`.
fn text_array(v: &[String]) -> &[String] {
    v
}

/// Decodes a row by each column's type.
fn row_of(row: PgRow) -> Result<Row> {
    let n = row.columns().len();
    let mut cells = Vec::with_capacity(n);
    for i in 0..n {
        let raw = row.try_get_raw(i).map_err(db_err)?;
        let ty = (!raw.is_null()).then(|| raw.type_info());
        let cell = match ty.as_ref().map(|t| t.name()) {
            None => Cell::Null,
            Some("INT8") => Cell::Int(row.try_get(i).map_err(db_err)?),
            Some("INT4") => Cell::Int(i64::from(row.try_get::<i32, _>(i).map_err(db_err)?)),
            Some("INT2") => Cell::Int(i64::from(row.try_get::<i16, _>(i).map_err(db_err)?)),
            Some("BOOL") => Cell::Int(i64::from(row.try_get::<bool, _>(i).map_err(db_err)?)),
            Some("FLOAT8") => Cell::Real(row.try_get(i).map_err(db_err)?),
            Some("FLOAT4") => Cell::Real(f64::from(row.try_get::<f32, _>(i).map_err(db_err)?)),
            Some("TEXT" | "VARCHAR" | "NAME" | "BPCHAR") => {
                Cell::Text(row.try_get(i).map_err(db_err)?)
            }
            // `json` arrives as its text, whichever format the server sends.
            Some("JSON") => Cell::Text(row.try_get_unchecked(i).map_err(db_err)?),
            Some("BYTEA") => Cell::Bytes(row.try_get(i).map_err(db_err)?),
            Some(other) => {
                return Err(crate::corrupt(format!("column {i} of type {other}")));
            }
        };
        cells.push(cell);
    }
    Ok(Row::new(cells))
}

crate::dialect::exec_for!(PgConnection, sqlx::Postgres, int_array, text_array);

impl Store<PostgresDialect> {
    /// Connects to `url` and brings the schema up to date (migrations take an advisory lock, so
    /// several processes may start at once).
    pub async fn connect(url: &str, config: SqlConfig) -> Result<Self> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| Error::Configuration(format!("the PostgreSQL URL does not parse: {e}")))?;
        let options = options.application_name("fhirstore").options([
            (
                "idle_in_transaction_session_timeout",
                millis(config.idle_in_transaction_timeout),
            ),
            // No JIT compilation. A search statement carries branches it never runs (the
            // multi-row date intersection behind its one-time filter, say), whose estimates push
            // its cost past `jit_above_cost` at a million resources: compiling then took 17 ms of
            // a 23 ms one-week date search. No statement of the store runs long enough to win
            // that back.
            ("jit", "off".to_owned()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(2))
            .connect_with(options.clone())
            .await
            .map_err(db_err)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| Error::backend("running PostgreSQL migrations", false, e))?;
        // Opened on first use: a store that never searches holds no search connections.
        let searcher = PgPoolOptions::new()
            .max_connections(config.search_connections.max(1))
            .connect_lazy_with(options.application_name("fhirstore-search").options([
                ("statement_timeout", millis(config.search_timeout)),
                // Search statements are prepared once per connection (parsing and
                // analysing a search's SQL cost a cheap search a third of its time)
                // but planned on every run with its values: a generic plan, which a
                // prepared statement switches to after five runs, is chosen without
                // knowing the tenant, parameter or code (34 ms instead of 7 ms for a
                // 5,000-match token search).
                ("plan_cache_mode", "force_custom_plan".to_owned()),
            ]));
        Ok(Store::new(pool.clone(), pool, searcher, config))
    }
}

/// Parameters: $1 tenant, $2 type, $3 id, $4 version, $5 now, $6 deleted, $7 segment, $8 e_hi,
/// $9 e_lo, $10 op, $11 body, $12 was_live, $13-$15 digest delta high, low and count, $16 whether
/// to apply it here, then one typed array per column of each index table from $17, in
/// `INDEX_TABLES` order. Every later step reads from `o`, so when the current-row insert loses a
/// race (`ON CONFLICT DO NOTHING` returns nothing) the statement writes nothing and returns no
/// row.
fn write_sql(is_new: bool) -> &'static str {
    use std::fmt::Write as _;
    use std::sync::OnceLock;
    static NEW: OnceLock<String> = OnceLock::new();
    static EXISTING: OnceLock<String> = OnceLock::new();
    let build = |head: &str| {
        let mut sql = format!(
            "WITH r AS ({head} RETURNING 1),
o AS (INSERT INTO outbox (tenant, resource_type, id, version, op, created_at)
      SELECT $1, $2, $3, $4, $10, $5 FROM r RETURNING seq),
v AS (INSERT INTO resource_versions (tenant, resource_type, id, version, seq, last_updated, deleted, body)
      SELECT $1, $2, $3, $4, o.seq, $5, $6, $11 FROM o),
g AS (INSERT INTO digests (tenant, resource_type, segment, h_hi, h_lo, count)
      SELECT $1, $2, $7, $13, $14, $15 FROM o WHERE $16
      ON CONFLICT (tenant, resource_type, segment) DO UPDATE SET
      h_hi = (digests.h_hi | excluded.h_hi) - (digests.h_hi & excluded.h_hi),
      h_lo = (digests.h_lo | excluded.h_lo) - (digests.h_lo & excluded.h_lo),
      count = digests.count + excluded.count)"
        );
        let mut param = 17;
        for (i, (table, cols)) in crate::INDEX_TABLES.iter().enumerate() {
            let u = Unnest::of(cols, param, "x");
            param += cols.len();
            // Writing to a String cannot fail. The DELETE sees the statement's snapshot, so it
            // never removes the rows inserted beside it.
            let _ = write!(
                sql,
                ",
d{i} AS (DELETE FROM {table} WHERE $12 AND tenant = $1 AND resource_type = $2 AND id = $3
      AND EXISTS (SELECT 1 FROM o)),
i{i} AS (INSERT INTO {table} (tenant, resource_type, {}, id)
      SELECT $1, $2, {}, $3 FROM o, unnest({}) AS x({}))",
                u.names, u.selected, u.arrays, u.aliases,
            );
        }
        sql.push_str("\nSELECT seq FROM o");
        sql
    };
    if is_new {
        NEW.get_or_init(|| {
            build(
                "INSERT INTO resources (tenant, resource_type, id, version, last_updated, \
                 deleted, segment, e_hi, e_lo) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (tenant, resource_type, id) DO NOTHING",
            )
        })
    } else {
        EXISTING.get_or_init(|| {
            build(
                "UPDATE resources SET version = $4, last_updated = $5, deleted = $6, \
                 segment = $7, e_hi = $8, e_lo = $9 WHERE tenant = $1 AND resource_type = $2 \
                 AND segment = $7 AND id = $3",
            )
        })
    }
}
