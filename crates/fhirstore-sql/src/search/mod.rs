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

#[cfg(test)]
pub(crate) use criteria::index_table;
pub(crate) use criteria::{chain_sets, index_sets, range_sets};
pub(crate) use include::{current, linked};
pub(crate) use sort::{KeyKind, KeyValue, SortColumn};
pub use sql::{Bind, Sql};

use crate::{parse_search_cursor, Syntax};

/// How a page's criteria meet the resources. The store picks one from how many index entries
/// each criterion has (see [`selectivity`]); every strategy returns the same page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Every criterion an id set, the sets intersected, the matches sorted: for criteria
    /// nothing is known of.
    Gather,
    /// The id set of criterion `i` (the most selective) drives; every other index criterion
    /// is checked per candidate by its index, so the cost follows the smallest set.
    Drive(usize),
    /// Every index criterion is checked per resource while the page's order is walked: the
    /// resources by id, or the sort parameter's index. The walk stops when the page is full,
    /// so broad criteria cost the page, not their matches.
    Walk,
    /// The id set a split search handed over ([`SearchQuery::among`]) drives, being smaller
    /// than any criterion's; every criterion is checked per candidate.
    Among,
    /// Date range `k` of [`range_sets`] (a superset of what several date criteria on one
    /// parameter match, read from one index range) drives; every criterion is checked per
    /// candidate.
    Range(usize),
}

/// A page of a search: the statements, and the sort columns whose values follow the five fixed
/// columns (`rt`, `id`, `version`, `last_updated`, `body`) of each row.
pub(crate) struct PagePlan {
    /// The statement; it returns one row more than the page, to tell whether another follows.
    /// `None` when a walked page's cursor is already past every resource with a value.
    pub sql: Option<Sql>,
    /// The `_sort` keys, in order.
    pub keys: Vec<SortColumn>,
    /// For a walk of the sort parameter's index: the resources without a value come after
    /// those the walk finds, from [`missing_page`] with this cursor id.
    pub then_missing: Option<Option<fhirstore_core::LogicalId>>,
}

/// One statement counting each index criterion's entries up to `cap` (index only, each
/// stopping at the cap), with the positions in `query.criteria` of the criteria counted;
/// `None` when no criterion is an index set.
#[cfg(test)]
pub(crate) fn selectivity(
    dialect: Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
    cap: u32,
) -> Result<Option<(Sql, Vec<usize>)>> {
    count_sets(
        dialect,
        criteria::index_sets(dialect, tenant, query, now)?,
        cap,
    )
}

/// One statement counting each of `sets` up to `cap` (see [`selectivity`]); `None` for none.
pub(crate) fn count_sets(
    dialect: Syntax,
    sets: Vec<(usize, Sql)>,
    cap: u32,
) -> Result<Option<(Sql, Vec<usize>)>> {
    if sets.is_empty() {
        return Ok(None);
    }
    let mut qb = Sql::new(dialect, "SELECT ");
    let mut which = Vec::with_capacity(sets.len());
    for (n, (i, select)) in sets.into_iter().enumerate() {
        if n > 0 {
            qb.push(", ");
        }
        qb.push("(SELECT COUNT(*) FROM (");
        qb.append(select);
        qb.push(" LIMIT ");
        qb.push_bind(i64::from(cap));
        qb.push(format_args!(") x{n})"));
        which.push(i);
    }
    Ok(Some((qb.within_bind_limit()?, which)))
}

/// The strategy for a page of `query`, from the entries counted per index criterion
/// (`counts`, by position in `query.criteria`, each at most `cap`) and per date range of
/// [`range_sets`] (`ranges`, by position in that list).
pub(crate) fn choose(
    query: &SearchQuery,
    counts: &[(usize, u64)],
    ranges: &[(usize, u64)],
    cap: u32,
) -> Strategy {
    let range = ranges.iter().min_by_key(|(_, n)| *n);
    if let Some(&(k, n)) = range {
        let smallest = counts.iter().map(|(_, n)| *n).min().unwrap_or(u64::MAX);
        let among = query
            .among
            .as_ref()
            .map_or(u64::MAX, |ids| ids.len() as u64);
        if n < u64::from(cap) && n < smallest && n < among {
            return Strategy::Range(k);
        }
    }
    let walkable = query.resource_type.is_some()
        && match query.sort.as_slice() {
            [] => true,
            [k] => SortColumn::of(k, query.resource_type, Syntax::Sqlite)
                .walkable()
                .is_some(),
            _ => false,
        };
    if let Some(ids) = &query.among {
        let n = ids.len() as u64;
        if n < u64::from(cap) && counts.iter().all(|&(_, c)| n <= c) {
            return Strategy::Among;
        }
    }
    match counts.iter().min_by_key(|(_, n)| *n) {
        Some(&(i, n)) if n < u64::from(cap) => Strategy::Drive(i),
        Some(_) if walkable => Strategy::Walk,
        // No index criterion: with none at all, a sort by an indexed parameter walks its index.
        None if walkable && query.criteria.is_empty() && !query.sort.is_empty() => Strategy::Walk,
        _ => Strategy::Gather,
    }
}

/// The statement for one page of `query` (its cursor, sort and page size included).
///
/// Three layers. Innermost: matching keys with their sort keys. Middle: the keyset condition,
/// the order and the page limit, computed once (`MATERIALIZED`: with a new tenant's rows not
/// yet in the statistics, PostgreSQL put the versions table outside and ran the page once per
/// version row, 300 ms for an empty page). Outer: bodies for that page only. A join below the LIMIT made
/// PostgreSQL fetch and sort every match's body (18 gender searches/s at 10k Patients); neither
/// dialect pushes a join below a LIMIT subquery.
pub(crate) fn page(
    dialect: Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
    strategy: Strategy,
) -> Result<PagePlan> {
    let page = query.page_size();
    let keys: Vec<SortColumn> = query
        .sort
        .iter()
        .map(|k| SortColumn::of(k, query.resource_type, dialect))
        .collect();
    if let (Strategy::Walk, [key], Some(rt)) = (strategy, keys.as_slice(), query.resource_type) {
        if key.walkable().is_some() {
            return walk_page(dialect, tenant, rt, query, now, keys);
        }
    }
    let mut key_cols = String::new();
    for i in 0..keys.len() {
        key_cols.push_str(&format!(", p.k{i}"));
    }
    let mut qb = Sql::new(
        dialect,
        format_args!(
            "WITH p AS MATERIALIZED (\
             SELECT s.rt, s.id, s.version, s.last_updated{} FROM (\
             SELECT r.resource_type AS rt, r.id AS id, r.version AS version, \
             r.last_updated AS last_updated",
            key_cols.replace("p.", "s.")
        ),
    );
    for (i, k) in keys.iter().enumerate() {
        qb.push(", ");
        k.push_expr(&mut qb, tenant.as_str());
        qb.push(format_args!(" AS k{i}"));
    }
    qb.push(" FROM resources r");
    criteria::push_search_where(&mut qb, tenant, query, now, strategy)?;
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
    qb.push(format_args!(
        ") SELECT p.rt, p.id, p.version, p.last_updated, v.body{key_cols} FROM p \
         JOIN resource_versions v ON v.tenant = "
    ));
    qb.push_bind(tenant.as_str());
    qb.push(" AND v.resource_type = p.rt AND v.id = p.id AND v.version = p.version");
    qb.push(order_by("p"));
    Ok(PagePlan {
        sql: Some(qb.within_bind_limit()?),
        keys,
        then_missing: None,
    })
}

/// A page sorted by one indexed parameter, by walking that parameter's index in the key's
/// order: each resource is met at its key row (the lowest value ascending, the highest
/// descending, the rows beyond it skipped), checked against the criteria, and the walk stops
/// once the page is full. The resources without a value follow from [`missing_page`].
fn walk_page(
    dialect: Syntax,
    tenant: &TenantId,
    rt: fhirstore_core::ResourceType,
    query: &SearchQuery,
    now: i64,
    keys: Vec<SortColumn>,
) -> Result<PagePlan> {
    let key = &keys[0];
    let Some((table, column, param)) = key.walkable() else {
        return Err(fhirstore_core::Error::InvalidSearch(
            "this _sort cannot walk an index".into(),
        ));
    };
    let mut after = None;
    if let Some(c) = &query.cursor {
        let (values, _, id) = sort::parse_sorted_cursor(c, &keys)?;
        match values.into_iter().next() {
            Some(v) if key.is_missing(&v) => {
                return Ok(PagePlan {
                    sql: None,
                    keys,
                    then_missing: Some(Some(id)),
                })
            }
            Some(v) => after = Some((v, id)),
            None => {}
        }
    }
    let (dir, beyond, past) = if key.descending {
        ("DESC", ">", "<")
    } else {
        ("ASC", "<", ">")
    };
    let collate = key.collate();
    let mut qb = Sql::new(
        dialect,
        format_args!(
            "WITH w AS MATERIALIZED (\
             SELECT DISTINCT t.{column}{collate} AS k, t.id AS id FROM {table} t \
             JOIN resources r ON r.tenant = "
        ),
    );
    // The index row's tenant column holds a key on SQLite (see `Sql::push_index_tenant`).
    match dialect {
        crate::Syntax::Sqlite => qb.push_bind(tenant.as_str().to_owned()),
        crate::Syntax::Postgres => qb.push("t.tenant"),
    };
    qb.push(" AND r.resource_type = t.resource_type AND r.id = t.id");
    criteria::push_search_where(&mut qb, tenant, query, now, Strategy::Walk)?;
    qb.push(" AND t.tenant = ");
    qb.push_index_tenant(tenant.as_str(), None);
    qb.push(" AND t.resource_type = ");
    qb.push_bind(rt.as_str());
    qb.push(" AND ");
    criteria::push_param(&mut qb, "t", Some(rt), param);
    qb.push(format_args!(
        " AND NOT EXISTS (SELECT 1 FROM {table} u WHERE u.tenant = t.tenant \
         AND u.resource_type = t.resource_type AND u.id = t.id AND u.param = t.param \
         AND u.{column}{collate} {beyond} t.{column}{collate}{}",
        dialect.probe_end()
    ));
    if let Some((v, id)) = &after {
        qb.push(format_args!(" AND (t.{column}{collate} {past} "));
        sort::push_key_value(&mut qb, v);
        qb.push(format_args!(" OR (t.{column}{collate} = "));
        sort::push_key_value(&mut qb, v);
        qb.push(" AND t.id > ");
        qb.push_bind(id.as_str().to_owned());
        qb.push("))");
    }
    qb.push(format_args!(" ORDER BY k {dir}, id LIMIT "));
    qb.push_bind(i64::from(query.page_size()) + 1);
    qb.push(
        ") SELECT r.resource_type, r.id, r.version, r.last_updated, v.body, w.k FROM w \
         JOIN resources r ON r.tenant = ",
    );
    qb.push_bind(tenant.as_str().to_owned());
    qb.push(" AND r.resource_type = ");
    qb.push_bind(rt.as_str());
    qb.push(
        " AND r.id = w.id JOIN resource_versions v ON v.tenant = r.tenant \
         AND v.resource_type = r.resource_type AND v.id = r.id AND v.version = r.version",
    );
    qb.push(format_args!(" ORDER BY w.k {dir}, r.id"));
    Ok(PagePlan {
        sql: Some(qb.within_bind_limit()?),
        keys,
        then_missing: Some(None),
    })
}

/// The matches of `query` (sorted by one indexed parameter) that have no value for it, after
/// the id `after`, in id order, at most `limit`: what follows a walk of the parameter's index.
/// Each row carries the missing-value sentinel as its key, as a gathered page's would.
pub(crate) fn missing_page(
    dialect: Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
    after: Option<&fhirstore_core::LogicalId>,
    limit: usize,
) -> Result<Sql> {
    let key = query
        .sort
        .first()
        .map(|k| SortColumn::of(k, query.resource_type, dialect));
    let Some((key, (table, _, param))) = key.as_ref().and_then(|k| Some((k, k.walkable()?))) else {
        return Err(fhirstore_core::Error::InvalidSearch(
            "this _sort cannot walk an index".into(),
        ));
    };
    let mut qb = Sql::new(
        dialect,
        "SELECT r.resource_type, r.id, r.version, r.last_updated, v.body, ",
    );
    key.push_missing(&mut qb);
    qb.push(
        " FROM resources r JOIN resource_versions v ON v.tenant = r.tenant \
         AND v.resource_type = r.resource_type AND v.id = r.id AND v.version = r.version",
    );
    criteria::push_search_where(&mut qb, tenant, query, now, Strategy::Gather)?;
    qb.push(format_args!(
        " AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.tenant = "
    ));
    qb.push_index_tenant(tenant.as_str(), Some("r"));
    qb.push(" AND t.resource_type = r.resource_type AND t.id = r.id AND ");
    criteria::push_param(&mut qb, "t", query.resource_type, param);
    qb.push(dialect.probe_end());
    if let Some(id) = after {
        qb.push(" AND r.id > ");
        qb.push_bind(id.as_str().to_owned());
    }
    qb.push(" ORDER BY r.id LIMIT ");
    qb.push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
    qb.within_bind_limit()
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
