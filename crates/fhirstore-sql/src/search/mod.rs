//! The search planner: a [`SearchQuery`] becomes SQL text and its bind values for one
//! [`Syntax`], purely and synchronously, with no database at hand.
//!
//! The store executes what this module plans; nothing here touches a connection, so every
//! statement shape is checked by the snapshot tests in `tests.rs` without a database. Layout:
//! - `criteria`: each criterion (every parameter type and modifier, chains, `_has`,
//!   compartments) as a predicate over the current resources;
//! - `sort`: `_sort` keys, the keyset condition after a cursor, and sorted cursors;
//! - `include`: the statements that follow `_include` and `_revinclude`;
//! - this file: the statements the store runs (a page, a count, an estimate, conditional keys).

mod criteria;
mod include;
mod sort;
mod sql;
#[cfg(test)]
mod tests;

use fhirstore_core::{Result, SearchQuery, TenantId};

pub(crate) use include::{current, linked};
pub(crate) use sort::{KeyKind, KeyValue, SortColumn};
pub use sql::{Bind, Sql};

use crate::{parse_search_cursor, Syntax};

/// A page of a search: the statement, and the sort columns whose values follow the five fixed
/// columns (`rt`, `id`, `version`, `last_updated`, `body`) of each row.
pub(crate) struct PagePlan {
    /// The statement; it returns one row more than the page, to tell whether another follows.
    pub sql: Sql,
    /// The `_sort` keys, in order.
    pub keys: Vec<SortColumn>,
}

/// The statement for one page of `query` (its cursor, sort and page size included).
///
/// Three layers. Innermost: matching keys with their sort keys. Middle: the keyset condition,
/// the order and the page limit. Outer: bodies for that page only. A join below the LIMIT made
/// PostgreSQL fetch and sort every match's body (18 gender searches/s at 10k Patients); neither
/// dialect pushes a join below a LIMIT subquery.
pub(crate) fn page(
    dialect: Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<PagePlan> {
    let page = query.page_size();
    let keys: Vec<SortColumn> = query
        .sort
        .iter()
        .map(|k| SortColumn::of(k, dialect))
        .collect();
    let mut key_cols = String::new();
    for i in 0..keys.len() {
        key_cols.push_str(&format!(", p.k{i}"));
    }
    let mut qb = Sql::new(
        dialect,
        format_args!(
            "SELECT p.rt, p.id, p.version, p.last_updated, v.body{key_cols} FROM (\
             SELECT s.rt, s.id, s.version, s.last_updated{} FROM (\
             SELECT r.resource_type AS rt, r.id AS id, r.version AS version, \
             r.last_updated AS last_updated",
            key_cols.replace("p.", "s.")
        ),
    );
    for (i, k) in keys.iter().enumerate() {
        qb.push(", ");
        k.push_expr(&mut qb);
        qb.push(format_args!(" AS k{i}"));
    }
    criteria::push_search_from(&mut qb, tenant, query, now)?;
    qb.push(") s WHERE 1 = 1");
    if let Some(c) = &query.cursor {
        if keys.is_empty() {
            let (rt, id) = parse_search_cursor(c)?;
            qb.push(" AND (s.rt, s.id) > (");
            qb.push_bind(rt.as_str());
            qb.push(", ");
            qb.push_bind(id.as_str());
            qb.push(")");
        } else {
            let (values, rt, id) = sort::parse_sorted_cursor(c, &keys)?;
            qb.push(" AND ");
            sort::push_keyset(&mut qb, &keys, &values, rt, &id);
        }
    }
    let order_by = |alias: &str| {
        let mut o = String::from(" ORDER BY ");
        for (i, k) in keys.iter().enumerate() {
            o.push_str(&format!(
                "{alias}.k{i}{} {}, ",
                k.collate(),
                if k.descending { "DESC" } else { "ASC" }
            ));
        }
        o.push_str(&format!("{alias}.rt, {alias}.id"));
        o
    };
    qb.push(order_by("s"));
    qb.push(" LIMIT ");
    qb.push_bind(i64::from(page) + 1);
    qb.push(") p JOIN resource_versions v ON v.tenant = ");
    qb.push_bind(tenant.as_str());
    qb.push(" AND v.resource_type = p.rt AND v.id = p.id AND v.version = p.version");
    qb.push(order_by("p"));
    Ok(PagePlan {
        sql: qb.within_bind_limit()?,
        keys,
    })
}

/// `SELECT COUNT(*)` of the live resources matching `query`: from the index tables alone where
/// they suffice (see `criteria::index_count`).
pub(crate) fn count(
    dialect: Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<Sql> {
    if let Some(sql) = criteria::index_count(dialect, tenant, query, now)? {
        return sql.within_bind_limit();
    }
    let mut qb = Sql::new(dialect, "SELECT COUNT(*)");
    criteria::push_search_from(&mut qb, tenant, query, now)?;
    qb.within_bind_limit()
}

/// The matching statement behind `explain` (the dialect's plan-estimate prefix, such as
/// `EXPLAIN (FORMAT JSON) SELECT 1`), whose plan carries the row estimate.
pub(crate) fn estimate(
    dialect: Syntax,
    explain: &str,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<Sql> {
    let mut qb = Sql::new(dialect, explain);
    criteria::push_search_from(&mut qb, tenant, query, now)?;
    qb.within_bind_limit()
}

/// Keys (`resource_type`, `id`) of at most `limit` live resources matching `query`, in key
/// order: what conditional writes act on.
pub(crate) fn keys(
    dialect: Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    limit: usize,
    now: i64,
) -> Result<Sql> {
    let mut qb = Sql::new(dialect, "SELECT r.resource_type, r.id");
    criteria::push_search_from(&mut qb, tenant, query, now)?;
    qb.push(" ORDER BY r.resource_type, r.id LIMIT ");
    qb.push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
    qb.within_bind_limit()
}

pub(crate) use sort::sorted_cursor;
