//! The dialect contract: everything SQLite and PostgreSQL do differently, as one trait the
//! compiler checks at each impl.
//!
//! The store ([`crate::Store`]) is written once, generic over a [`Dialect`]. It never names a
//! sqlx driver type: statements are dialect-neutral [`Sql`] values, run through the connection's
//! [`Exec`] methods, and come back as neutral [`Row`]s. Only the execution itself, the one-round
//! trip version write and a few locks are per driver, because sqlx's executor traits need
//! higher-ranked bounds that generic code cannot carry into `Send` futures (the same reason
//! sqlx's own `Migrate` is implemented per driver).

use std::fmt::Display;
use std::future::Future;

use fhirstore_core::{Error, Result, SearchQuery, TenantId};

use crate::search::Sql;
use crate::{corrupt, Syntax, VersionRow};

/// A connection of dialect `D`: pooled, or inside a transaction (both dereference to it).
pub type Conn<D> = <<D as Dialect>::Db as sqlx::Database>::Connection;

/// What a dialect provides. A missing item is a compile error at the impl.
pub trait Dialect: Send + Sync + Copy + Default + std::fmt::Debug + 'static {
    /// sqlx's database type; its connection runs neutral statements.
    type Db: sqlx::Database<Connection: Exec>;

    /// How the planner writes this dialect's SQL.
    const SYNTAX: Syntax;
    /// The backend name in capabilities, spans and metrics.
    const NAME: &'static str;
    /// The current row of `$1/$2/$3` in segment `$4`, locked where the dialect's writers run
    /// concurrently: `version, deleted, e_hi, e_lo`.
    const SELECT_CURRENT_FOR_WRITE: &'static str;
    /// Appended to a select of current rows a write transaction goes on to write: locks them
    /// where the dialect's writers run concurrently.
    const LOCK_CURRENT_ROWS: &'static str;
    /// How index rows are inserted: SQLite's `search_composite` is keyed by the whole row, and
    /// two component values that differ only in their precision range store the same row.
    const INSERT_INDEX_ROWS: &'static str;
    /// Gives tenant `$1` the key its search-index rows hold instead of its name, if it has
    /// none yet; `None` where index rows hold the name (see `Sql::push_index_tenant`).
    const ENSURE_TENANT_KEY: Option<&'static str>;
    /// What `_total=estimate` prefixes a search's FROM with to read the planner's estimate;
    /// `None` when the dialect has no estimate and counts exactly.
    const ESTIMATE_PREFIX: Option<&'static str>;
    /// The statement that opens a write transaction; `None` for the driver's plain `BEGIN`.
    const BEGIN_WRITE: Option<&'static str>;
    /// Whether every write applies its digest change inline, even inside a transaction of
    /// several writes (safe only where writers cannot deadlock on digest rows).
    const ALWAYS_INLINE_DIGEST: bool;
    /// The non-empty group digests of `$1/$2`: `group, h_hi, h_lo, count`, by group.
    const GROUP_DIGESTS: &'static str;
    /// Whether group digests are a maintained table, which the self-check must also repair.
    const GROUP_TABLE: bool;
    /// The non-empty segment digests of `$1/$2` among the segments listed in `$3`.
    const SEGMENTS_LISTED: &'static str;
    /// `id, version, e_hi, e_lo` of the current rows of `$1/$2` in the segments listed in `$3`.
    const KEYS_IN_SEGMENTS: &'static str;
    /// The tenant `$1`'s parameter generation (`NULL` for none), under whatever lock orders it
    /// against registrations.
    const SELECT_PARAM_GENERATION: &'static str;
    /// Taken by a SearchParameter registration for tenant `$1`, where the dialect needs it.
    const LOCK_PARAMS_EXCLUSIVE: Option<&'static str>;
    /// Appended to a reindex batch's select.
    const LOCK_REINDEX_BATCH: &'static str;
    /// The change log's major order key, over the outbox's columns.
    const LOG_MAJOR: &'static str;
    /// The change log's `ORDER BY`.
    const LOG_ORDER: &'static str;
    /// Outbox rows after the cursor (`$1` major, `$2` minor).
    const LOG_AFTER: &'static str;
    /// Outbox rows up to and including the cursor (`$1` major, `$2` minor).
    const LOG_UPTO: &'static str;
    /// A further condition on rows the log may hand out yet (`""` for none).
    const LOG_VISIBLE: &'static str;
    /// The log's head: `major, minor`.
    const LOG_HEAD: &'static str;
    /// Appended to a `SELECT` of rows to claim, so concurrent claimers take different rows
    /// rather than wait on each other's (`""` where one writer claims at a time).
    const SKIP_LOCKED: &'static str;
    /// Holds off writers' digest updates while the self-check recomputes, where needed.
    const LOCK_DIGESTS: Option<&'static str>;
    /// Stops what a search connection runs, sent on another connection with the backend id
    /// its `arm_search` recorded in the slot: where closing the slot alone does not stop it.
    const CANCEL_BACKEND: Option<&'static str>;

    /// Refreshes the planner's statistics of the search tables (on PostgreSQL, with a
    /// `VACUUM`), run outside any transaction.
    fn analyze_sql() -> String;

    /// The row estimate in the one row an `ESTIMATE_PREFIX` statement returns.
    fn plan_rows(row: &mut Row) -> Option<u64>;

    /// Writes a version, its current row, outbox entry, index rows and (when asked) digest
    /// change in one round trip; the outbox `seq`, or `None` when a concurrent writer created
    /// the resource first.
    fn write_version<'c>(
        conn: &'c mut Conn<Self>,
        row: &'c VersionRow<'c>,
    ) -> impl Future<Output = Result<Option<i64>>> + Send + 'c;

    /// Writes the versions of several different resources of one transaction, whose digest
    /// changes the caller applies: the outbox `seq` of each, in order, or `None` for one a
    /// concurrent writer created first (nothing of it is written). By default one
    /// [`Dialect::write_version`] each; a dialect may write them all in one round trip.
    fn write_versions<'c>(
        conn: &'c mut Conn<Self>,
        rows: &'c [VersionRow<'c>],
    ) -> impl Future<Output = Result<Vec<Option<i64>>>> + Send + 'c {
        async move {
            let mut seqs = Vec::with_capacity(rows.len());
            for row in rows {
                seqs.push(Self::write_version(&mut *conn, row).await?);
            }
            Ok(seqs)
        }
    }

    /// Serialises conditional writes with the same tenant and criteria, so two of them cannot
    /// both find nothing and both create.
    fn lock_criteria<'c>(
        conn: &'c mut Conn<Self>,
        tenant: &'c TenantId,
        query: &'c SearchQuery,
    ) -> impl Future<Output = Result<()>> + Send + 'c;

    /// Readies a new connection of the search pool, once: from then on its statements stop
    /// with [`crate::STATEMENT_CANCELLED`] whenever `slot` is due. PostgreSQL needs nothing:
    /// its search connections carry `statement_timeout`.
    fn arm_search(
        conn: &mut Conn<Self>,
        slot: std::sync::Arc<SearchSlot>,
    ) -> impl Future<Output = Result<()>> + Send + '_;

    /// A statement of this dialect, written out whole or to be built on.
    fn sql(text: impl Display) -> Sql {
        Sql::new(Self::SYNTAX, text)
    }
}

/// The deadline of the search that holds a connection of the search pool, shared with the
/// check that connection was armed with once ([`Dialect::arm_search`]). It is set when a search
/// takes the connection and cleared (zero: due at once) when the search ends, however it ends,
/// so a statement a finished or abandoned search left running is stopped too.
#[derive(Debug, Default)]
pub struct SearchSlot {
    /// Nanoseconds after [`SearchSlot::base`] at which statements must stop.
    until: std::sync::atomic::AtomicU64,
    /// The server's id of the connection (PostgreSQL's backend pid), where it has one.
    backend: std::sync::atomic::AtomicI64,
}

impl SearchSlot {
    /// The instant deadlines count from, fixed at first use.
    fn base() -> std::time::Instant {
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(std::time::Instant::now)
    }

    fn nanos(t: std::time::Instant) -> u64 {
        let since = t.saturating_duration_since(Self::base()).as_nanos();
        u64::try_from(since).unwrap_or(u64::MAX)
    }

    /// A search holds the connection until `deadline`.
    pub fn open_until(&self, deadline: std::time::Instant) {
        self.until.store(
            Self::nanos(deadline).max(1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// No search holds the connection: anything still running on it must stop.
    pub fn close(&self) {
        self.until.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records the server's id of the connection.
    pub fn set_backend(&self, id: i64) {
        self.backend.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    /// The server's id of the connection, if recorded.
    pub fn backend(&self) -> Option<i64> {
        Some(self.backend.load(std::sync::atomic::Ordering::Relaxed)).filter(|&id| id != 0)
    }

    /// Whether statements on the connection must stop now.
    pub fn due(&self) -> bool {
        Self::nanos(std::time::Instant::now())
            >= self.until.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Classifies a driver error of dialect `D` (see [`crate::classify`]).
pub(crate) fn db_err<D: Dialect>(e: sqlx::Error) -> Error {
    crate::classify(e, D::SYNTAX)
}

/// Running a neutral statement on a connection: implemented per driver.
pub trait Exec: Send {
    /// Every row.
    fn fetch_all<'c>(
        &'c mut self,
        sql: &'c Sql,
    ) -> impl Future<Output = Result<Vec<Row>>> + Send + 'c;
    /// The first row, if any.
    fn fetch_optional<'c>(
        &'c mut self,
        sql: &'c Sql,
    ) -> impl Future<Output = Result<Option<Row>>> + Send + 'c;
    /// Runs the statement; the number of rows it changed.
    fn execute<'c>(&'c mut self, sql: &'c Sql) -> impl Future<Output = Result<u64>> + Send + 'c;
}

/// Implements [`Exec`] for a driver's connection type `$conn` of database `$db`, given how
/// that driver binds an integer list (`$list`: `&[i32]` to a bindable value) and a text list
/// (`$texts`: `&[String]` to a bindable value), its `row_of`
/// (a row, decoded) and `db_err` (its errors, classified). A macro, not generic code: sqlx's
/// `Executor` is implemented for `&mut` of each concrete connection, a bound generic code could
/// only state for every lifetime at once.
macro_rules! exec_for {
    ($conn:ty, $db:ty, $list:path, $texts:path) => {
        /// The statement with its values bound.
        fn query_of(
            sql: &Sql,
        ) -> sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments<'_>> {
            let mut q = sqlx::query(sql.text()).persistent(sql.is_persistent());
            for b in sql.binds() {
                q = match b {
                    Bind::Text(t) => q.bind(t.as_str()),
                    Bind::OptText(t) => q.bind(t.as_deref()),
                    Bind::Int(n) => q.bind(*n),
                    Bind::Int32(n) => q.bind(*n),
                    Bind::Real(x) => q.bind(*x),
                    Bind::Bool(b) => q.bind(*b),
                    Bind::IntList(v) => q.bind($list(v)),
                    Bind::TextList(v) => q.bind($texts(v)),
                };
            }
            q
        }

        impl $crate::dialect::Exec for $conn {
            async fn fetch_all(&mut self, sql: &Sql) -> Result<Vec<Row>> {
                let rows = query_of(sql).fetch_all(self).await.map_err(db_err)?;
                rows.into_iter().map(row_of).collect()
            }

            async fn fetch_optional(&mut self, sql: &Sql) -> Result<Option<Row>> {
                let row = query_of(sql).fetch_optional(self).await.map_err(db_err)?;
                row.map(row_of).transpose()
            }

            async fn execute(&mut self, sql: &Sql) -> Result<u64> {
                let done = query_of(sql).execute(self).await.map_err(db_err)?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(crate) use exec_for;

impl Sql {
    /// Every row, on `conn`.
    pub(crate) async fn fetch_all(&self, conn: &mut impl Exec) -> Result<Vec<Row>> {
        conn.fetch_all(self).await
    }

    /// The first row, if any, on `conn`.
    pub(crate) async fn fetch_optional(&self, conn: &mut impl Exec) -> Result<Option<Row>> {
        conn.fetch_optional(self).await
    }

    /// The one row a statement always returns (an aggregate, a `RETURNING`).
    pub(crate) async fn fetch_one(&self, conn: &mut impl Exec) -> Result<Row> {
        conn.fetch_optional(self)
            .await?
            .ok_or_else(|| corrupt("a statement that always returns a row returned none"))
    }

    /// Every row as a tuple of column types.
    pub(crate) async fn fetch_all_as<T: FromRow>(&self, conn: &mut impl Exec) -> Result<Vec<T>> {
        conn.fetch_all(self)
            .await?
            .into_iter()
            .map(Row::into_tuple)
            .collect()
    }

    /// The first row, if any, as a tuple of column types.
    pub(crate) async fn fetch_optional_as<T: FromRow>(
        &self,
        conn: &mut impl Exec,
    ) -> Result<Option<T>> {
        conn.fetch_optional(self)
            .await?
            .map(Row::into_tuple)
            .transpose()
    }

    /// Runs the statement on `conn`; the number of rows it changed.
    pub(crate) async fn execute(&self, conn: &mut impl Exec) -> Result<u64> {
        conn.execute(self).await
    }
}

/// One column value, as the drivers decode it.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// Any integer column, booleans included (0 or 1).
    Int(i64),
    /// A floating-point column.
    Real(f64),
    /// A text column (JSON included).
    Text(String),
    /// A binary column (`BLOB`, `bytea`): stored bodies.
    Bytes(Vec<u8>),
}

/// A result row, decoded: the store reads columns by position and type, whatever the driver.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row(Vec<Cell>);

impl Row {
    /// A row of these values, in column order.
    pub fn new(cells: Vec<Cell>) -> Self {
        Row(cells)
    }

    /// Takes column `i` as a `T`, leaving `NULL` in its place (bodies move out, not copied).
    pub fn get<T: FromCell>(&mut self, i: usize) -> Result<T> {
        let cell = self
            .0
            .get_mut(i)
            .map(|c| std::mem::replace(c, Cell::Null))
            .ok_or_else(|| corrupt(format!("a row has no column {i}")))?;
        let kind = match &cell {
            Cell::Null => "NULL",
            Cell::Int(_) => "an integer",
            Cell::Real(_) => "a number",
            Cell::Text(_) => "text",
            Cell::Bytes(_) => "bytes",
        };
        T::from_cell(cell)
            .ok_or_else(|| corrupt(format!("column {i} holds {kind}, not {}", T::WHAT)))
    }

    /// The whole row as a tuple of column types.
    pub fn into_tuple<T: FromRow>(mut self) -> Result<T> {
        T::from_row(&mut self)
    }
}

/// A Rust value one column decodes to.
pub trait FromCell: Sized {
    /// What the column should hold, for errors.
    const WHAT: &'static str;
    /// The value, or `None` when the cell holds something else.
    fn from_cell(cell: Cell) -> Option<Self>;
}

impl FromCell for i64 {
    const WHAT: &'static str = "an integer";
    fn from_cell(cell: Cell) -> Option<Self> {
        match cell {
            Cell::Int(n) => Some(n),
            _ => None,
        }
    }
}

impl FromCell for i32 {
    const WHAT: &'static str = "a 32-bit integer";
    fn from_cell(cell: Cell) -> Option<Self> {
        i64::from_cell(cell).and_then(|n| i32::try_from(n).ok())
    }
}

impl FromCell for bool {
    const WHAT: &'static str = "a boolean";
    fn from_cell(cell: Cell) -> Option<Self> {
        i64::from_cell(cell).map(|n| n != 0)
    }
}

impl FromCell for f64 {
    const WHAT: &'static str = "a number";
    fn from_cell(cell: Cell) -> Option<Self> {
        match cell {
            Cell::Real(x) => Some(x),
            // SQLite stores a whole number given to an untyped expression as an integer.
            Cell::Int(n) => Some(n as f64),
            _ => None,
        }
    }
}

impl FromCell for String {
    const WHAT: &'static str = "text";
    fn from_cell(cell: Cell) -> Option<Self> {
        match cell {
            Cell::Text(t) => Some(t),
            _ => None,
        }
    }
}

/// A stored body: bytes (see `crate::body`), or text from before bodies were bytes.
impl FromCell for Vec<u8> {
    const WHAT: &'static str = "bytes";
    fn from_cell(cell: Cell) -> Option<Self> {
        match cell {
            Cell::Bytes(b) => Some(b),
            Cell::Text(t) => Some(t.into_bytes()),
            _ => None,
        }
    }
}

impl<T: FromCell> FromCell for Option<T> {
    const WHAT: &'static str = T::WHAT;
    fn from_cell(cell: Cell) -> Option<Self> {
        match cell {
            Cell::Null => Some(None),
            other => T::from_cell(other).map(Some),
        }
    }
}

/// A tuple a whole row decodes to, column by column.
pub trait FromRow: Sized {
    /// Decodes the row's leading columns.
    fn from_row(row: &mut Row) -> Result<Self>;
}

macro_rules! tuple_from_row {
    ($($t:ident $i:tt),+) => {
        impl<$($t: FromCell),+> FromRow for ($($t,)+) {
            fn from_row(row: &mut Row) -> Result<Self> {
                Ok(($(row.get::<$t>($i)?,)+))
            }
        }
    };
}
tuple_from_row!(A 0);
tuple_from_row!(A 0, B 1);
tuple_from_row!(A 0, B 1, C 2);
tuple_from_row!(A 0, B 1, C 2, D 3);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_decode_by_type_and_refuse_the_wrong_one() {
        let mut row = Row::new(vec![
            Cell::Int(7),
            Cell::Text("x".into()),
            Cell::Null,
            Cell::Int(1),
            Cell::Real(2.5),
        ]);
        assert_eq!(row.get::<i64>(0).ok(), Some(7));
        assert_eq!(row.get::<String>(1).ok().as_deref(), Some("x"));
        // Taken once: the column is NULL afterwards.
        assert_eq!(row.get::<Option<String>>(1).ok(), Some(None));
        assert_eq!(row.get::<Option<i64>>(2).ok(), Some(None));
        assert!(row.get::<i64>(2).is_err());
        assert_eq!(row.get::<bool>(3).ok(), Some(true));
        assert!(row.get::<i64>(4).is_err());
        assert!(row.get::<f64>(9).is_err());
        let t: Result<(i64, f64)> = Row::new(vec![Cell::Int(i64::MAX), Cell::Int(3)]).into_tuple();
        assert_eq!(t.ok(), Some((i64::MAX, 3.0)));
        assert!(Row::new(vec![Cell::Int(i64::MAX)]).get::<i32>(0).is_err());
    }
}
