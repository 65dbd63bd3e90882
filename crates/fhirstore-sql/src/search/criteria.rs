//! Criteria as SQL predicates over the current resources (`resources r`).
//!
//! Each criterion becomes an `AND …` over the resource aliased `r`: selective ones an id set
//! from one index table, ranges a correlated `EXISTS`, chains and `_has` nested id sets through
//! `search_reference`, compartments an id set over the references that put a resource there.

use fhirstore_core::date::InstantPredicate;
use fhirstore_core::index;
use fhirstore_core::registry::SharedRows;
use fhirstore_core::search::{
    CriterionValues, Modifier, NumberValue, ParamType, Prefix, ReferenceValue,
};
use fhirstore_core::{Error, ResourceType, Result, SearchQuery, TenantId};

use super::{Bind, Sql, Strategy};

/// The index table holding a parameter type's rows.
pub(crate) fn index_table(kind: ParamType) -> Option<&'static str> {
    Some(match kind {
        ParamType::Token => "search_token",
        ParamType::String => "search_string",
        ParamType::Date => "search_date",
        ParamType::Number | ParamType::Quantity => "search_quantity",
        ParamType::Reference => "search_reference",
        ParamType::Uri => "search_uri",
        ParamType::Composite => "search_composite",
        ParamType::Special => return None,
    })
}

/// Opens the subquery that restricts the resources aliased `r` to those with a matching row in
/// `table` for `param`; the caller adds the value predicates and closes it with `)`.
///
/// Selective criteria (tokens, strings, references, uris, exact numbers) become
/// `r.id [NOT] IN (SELECT t.id … WHERE t.tenant = ? AND t.resource_type = ? AND t.param = ?`:
/// tenant and type are bound, not correlated, so the planner starts from the lookup index and
/// fetches matches by key. A correlated EXISTS made SQLite probe the index once per resource of
/// the type: 38 identifier searches/s at 10k Patients, 14,600/s this way.
///
/// Range criteria (`correlated`) stay a correlated EXISTS: one bound of a range usually matches
/// most resources, and materialising that set cost a one-year birthdate window 5× (506 → 101
/// searches/s); probing per resource stops at the page limit, and beside a selective criterion
/// the planner drives from that one.
///
/// Returns what closes the subquery once the caller has pushed its value predicates.
fn push_in(
    qb: &mut Sql,
    scope: &Scope<'_>,
    table: &str,
    param: &str,
    negate: bool,
    correlated: bool,
) -> &'static str {
    let mut close = ")";
    let not = if negate { " NOT" } else { "" };
    let r = scope.alias;
    if correlated || scope.correlate {
        close = qb.dialect().probe_end();
        qb.push(format_args!(
            " AND{not} EXISTS (SELECT 1 FROM {table} t WHERE t.tenant = "
        ));
        qb.push_index_tenant(scope.tenant.as_str(), Some(r));
        qb.push(format_args!(
            " AND t.resource_type = {r}.resource_type AND t.id = {r}.id"
        ));
    } else {
        match scope.rt {
            Some(rt) => {
                match qb.dialect().id_set_from_array() {
                    Some((any, all)) => {
                        let op = if negate { all } else { any };
                        qb.push(format_args!(
                            " AND {r}.id {op}(ARRAY(SELECT t.id FROM {table} t WHERE t.tenant = "
                        ));
                        close = "))";
                    }
                    None => {
                        qb.push(format_args!(
                            " AND {r}.id{not} IN (SELECT t.id FROM {table} t WHERE t.tenant = "
                        ));
                    }
                }
                qb.push_index_tenant(scope.tenant.as_str(), None);
                qb.push(" AND t.resource_type = ");
                qb.push_bind(rt.as_str());
            }
            None => {
                qb.push(format_args!(
                    " AND ({r}.resource_type, {r}.id){not} IN (SELECT t.resource_type, t.id \
                     FROM {table} t WHERE t.tenant = "
                ));
                qb.push_index_tenant(scope.tenant.as_str(), None);
            }
        }
    }
    qb.push(" AND ");
    push_param(qb, "t", scope.rt, param);
    close
}

/// `{t}.param = ?` for the index rows named `name`, or, where a resource type shares those rows
/// (see [`SharedRows`]), the rows of its parts: `{t}.param IN (?, ?)` for a known type, and
/// for a search across types the parts only on the types that share.
pub(crate) fn push_param(qb: &mut Sql, t: &str, rt: Option<ResourceType>, name: &str) {
    let shared = SharedRows::r4();
    let in_list = |qb: &mut Sql, parts: &[&'static str]| {
        qb.push(format_args!("{t}.param IN ("));
        qb.push_bind_list(parts.iter().map(|p| (*p).to_owned()));
        qb.push(")");
    };
    match rt {
        Some(rt) => match shared.parts(rt.as_str(), name) {
            Some(parts) => in_list(qb, parts),
            None => {
                qb.push(format_args!("{t}.param = "));
                qb.push_bind(name.to_owned());
            }
        },
        None => {
            let types = shared.types_sharing(name);
            if !types.is_empty() {
                qb.push("(");
            }
            qb.push(format_args!("{t}.param = "));
            qb.push_bind(name.to_owned());
            for ty in &types {
                if let Some(parts) = shared.parts(ty, name) {
                    qb.push(format_args!(" OR ({t}.resource_type = "));
                    qb.push_bind((*ty).to_owned());
                    qb.push(" AND ");
                    in_list(qb, parts);
                    qb.push(")");
                }
            }
            if !types.is_empty() {
                qb.push(")");
            }
        }
    }
}

/// Where a criterion applies: the tenant, the type of the resources aliased `alias` (when
/// known), that alias, and whether an index-set criterion is checked per resource instead
/// (see [`Strategy`]).
struct Scope<'a> {
    tenant: &'a TenantId,
    rt: Option<ResourceType>,
    alias: &'a str,
    correlate: bool,
}

/// Pushes `(p1 OR p2 …)`, one alternative per value.
fn push_any<T>(qb: &mut Sql, values: &[T], mut each: impl FnMut(&mut Sql, &T)) {
    qb.push(" AND (");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push("(");
        each(qb, v);
        qb.push(")");
    }
    qb.push(")");
}

/// Escapes `%`, `_` and `\` for a LIKE pattern with `ESCAPE '\'`.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A stored range `[{t}.low, {t}.high)` against a searched range, by prefix (R4 search
/// §3.1.1.4.3; the same rules as `DateValue::matches`).
fn push_range_predicate(qb: &mut Sql, t: &str, d: &fhirstore_core::date::DateValue, now: i64) {
    use fhirstore_core::date::Prefix;
    let (ql, qh) = (d.range.low, d.range.high);
    let within = |qb: &mut Sql| {
        qb.push(format_args!("({t}.low >= "));
        qb.push_bind(ql);
        qb.push(format_args!(" AND {t}.high <= "));
        qb.push_bind(qh);
        qb.push(")");
    };
    let bound = |qb: &mut Sql, column: &str, op: &str, v: i64| {
        qb.push(format_args!("{t}.{column} {op} "));
        qb.push_bind(v);
    };
    match d.prefix {
        Prefix::Eq => within(qb),
        Prefix::Ne => {
            qb.push("NOT ");
            within(qb);
        }
        Prefix::Gt => bound(qb, "high", ">", qh),
        Prefix::Lt => bound(qb, "low", "<", ql),
        Prefix::Ge => {
            bound(qb, "high", ">", qh);
            qb.push(" OR ");
            within(qb);
        }
        Prefix::Le => {
            bound(qb, "low", "<", ql);
            qb.push(" OR ");
            within(qb);
        }
        Prefix::Sa => bound(qb, "low", ">=", qh),
        Prefix::Eb => bound(qb, "high", "<=", ql),
        Prefix::Ap => {
            let a = d.approximate_bounds(now);
            bound(qb, "low", "<", a.high);
            qb.push(" AND ");
            bound(qb, "high", ">", a.low);
        }
    }
}

/// A stored number `{t}.value` against a searched number: `eq` uses the searched value's
/// implicit precision range, the ordering prefixes its exact value, `ap` ±10%.
fn push_number_predicate(qb: &mut Sql, t: &str, n: &NumberValue) {
    let op = match n.prefix {
        Prefix::Eq | Prefix::Ne => {
            qb.push(if n.prefix == Prefix::Ne { "NOT " } else { "" });
            qb.push(format_args!("({t}.value >= "));
            qb.push_bind(n.low);
            qb.push(format_args!(" AND {t}.value < "));
            qb.push_bind(n.high);
            qb.push(")");
            return;
        }
        Prefix::Ap => {
            let pad = (n.value.abs() * 0.1).max(n.high - n.low);
            qb.push(format_args!("{t}.value >= "));
            qb.push_bind(n.value - pad);
            qb.push(format_args!(" AND {t}.value <= "));
            qb.push_bind(n.value + pad);
            return;
        }
        Prefix::Gt | Prefix::Sa => " > ",
        Prefix::Lt | Prefix::Eb => " < ",
        Prefix::Ge => " >= ",
        Prefix::Le => " <= ",
    };
    qb.push(format_args!("{t}.value"));
    qb.push(op);
    qb.push_bind(n.value);
}

/// Pushes ` AND (v1 OR v2 …)` over the index row aliased `t`, one alternative per value, with
/// the predicate of the values' type. `Missing` and `Composite` values have no row predicate.
fn push_values(
    qb: &mut Sql,
    t: &str,
    modifier: Option<Modifier>,
    values: &CriterionValues,
    now: i64,
) {
    match values {
        CriterionValues::Token(tokens) => {
            // With many alternatives SQLite reads every row of the parameter and tests each
            // against the OR list (100 identifiers at 100k resources: 23 ms); a leading IN on
            // the code lets the lookup index probe each value instead (3 ms).
            let codes: Option<Vec<&String>> = tokens.iter().map(|v| v.code.as_ref()).collect();
            if let Some(codes) = codes.filter(|c| c.len() > 1) {
                qb.push(format_args!(" AND {t}.code IN ("));
                qb.push_bind_list(codes.iter().map(|c| c.as_str()));
                qb.push(")");
            }
            push_tokens(qb, t, tokens);
        }
        CriterionValues::String(strings) => push_any(qb, strings, |qb, v| match modifier {
            Some(Modifier::Exact) => {
                qb.push(format_args!("{t}.exact = "));
                qb.push_bind(v.clone());
            }
            Some(Modifier::Contains) => {
                qb.push(format_args!("{t}.folded LIKE "));
                qb.push_bind(format!("%{}%", like_escape(&index::fold(v))));
                qb.push(" ESCAPE '\\'");
            }
            _ => {
                // Starts-with as a range, so the (param, folded) index serves it. The columns
                // compare bytewise (SQLite BINARY, PostgreSQL COLLATE "C").
                let folded = index::fold(v);
                qb.push(format_args!("{t}.folded >= "));
                qb.push_bind(folded.clone());
                qb.push(format_args!(" AND {t}.folded < "));
                qb.push_bind(format!("{folded}\u{10FFFF}"));
            }
        }),
        CriterionValues::Date(dates) => {
            push_any(qb, dates, |qb, d| push_range_predicate(qb, t, d, now));
        }
        CriterionValues::Number(numbers) => {
            push_any(qb, numbers, |qb, n| push_number_predicate(qb, t, n));
        }
        CriterionValues::Quantity(quantities) => push_any(qb, quantities, |qb, q| {
            push_number_predicate(qb, t, &q.number);
            match (&q.system, &q.code) {
                (Some(system), Some(code)) => {
                    qb.push(format_args!(" AND {t}.system = "));
                    qb.push_bind(system.clone());
                    qb.push(format_args!(" AND {t}.code = "));
                    qb.push_bind(code.clone());
                }
                (None, Some(code)) => {
                    qb.push(format_args!(" AND ({t}.code = "));
                    qb.push_bind(code.clone());
                    qb.push(format_args!(" OR {t}.unit = "));
                    qb.push_bind(code.clone());
                    qb.push(")");
                }
                (Some(system), None) => {
                    qb.push(format_args!(" AND {t}.system = "));
                    qb.push_bind(system.clone());
                }
                (None, None) => {}
            }
        }),
        CriterionValues::Reference(refs) => push_any(qb, refs, |qb, v| match v {
            ReferenceValue::Local { resource_type, id } => {
                qb.push(format_args!("{t}.target_id = "));
                qb.push_bind(id.clone());
                if let Some(rt) = resource_type {
                    qb.push(format_args!(" AND {t}.target_type = "));
                    qb.push_bind(rt.as_str());
                }
            }
            ReferenceValue::Url { url, version } => {
                qb.push(format_args!("{t}.url = "));
                qb.push_bind(url.clone());
                if url.contains(':') {
                    // Implied by the equality; it lets the planner use the url index, which
                    // holds only absolute references (relative ones are searched by id).
                    qb.push(" AND ");
                    qb.push(qb.dialect().has_scheme(&format!("{t}.url")));
                }
                if let Some(v) = version {
                    qb.push(format_args!(" AND {t}.version = "));
                    qb.push_bind(v.clone());
                }
            }
        }),
        CriterionValues::Uri(uris) => push_any(qb, uris, |qb, u| match modifier {
            Some(Modifier::Below) => {
                qb.push(format_args!("{t}.uri LIKE "));
                qb.push_bind(format!("{}%", like_escape(u)));
                qb.push(" ESCAPE '\\'");
            }
            Some(Modifier::Above) => {
                qb.push("substr(");
                qb.push_bind(u.clone());
                qb.push(format_args!(", 1, length({t}.uri)) = {t}.uri"));
            }
            _ => {
                qb.push(format_args!("{t}.uri = "));
                qb.push_bind(u.clone());
            }
        }),
        CriterionValues::Missing(..) | CriterionValues::Composite(_) => {}
    }
}

/// Pushes ` AND (v1 OR v2 …)` for token values over the index row aliased `t`.
fn push_tokens(qb: &mut Sql, t: &str, tokens: &[fhirstore_core::search::TokenValue]) {
    push_any(qb, tokens, |qb, v| {
        qb.push("1 = 1");
        if let Some(code) = &v.code {
            qb.push(format_args!(" AND {t}.code = "));
            qb.push_bind(code.clone());
        }
        if let Some(system) = &v.system {
            qb.push(format_args!(" AND {t}.system = "));
            qb.push_bind(system.clone());
        }
    });
}

/// Pushes ` AND (r.id IN (…) OR …)`, one alternative per composite value: rows of the same
/// element (`grp`) must match every component, each by its own type's predicate.
fn push_composite(
    qb: &mut Sql,
    scope: &Scope<'_>,
    param: &str,
    values: &[Vec<CriterionValues>],
    now: i64,
) -> Result<()> {
    let Some(rt) = scope.rt else {
        return Err(Error::InvalidSearch(format!(
            "{param}: composite parameters need a resource type"
        )));
    };
    let r = scope.alias;
    qb.push(" AND (");
    for (i, components) in values.iter().enumerate() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push(format_args!(
            "{r}.id IN (SELECT c0.id FROM search_composite c0"
        ));
        for k in 1..components.len() {
            qb.push(format_args!(
                " JOIN search_composite c{k} ON c{k}.tenant = c0.tenant \
                 AND c{k}.resource_type = c0.resource_type AND c{k}.id = c0.id \
                 AND c{k}.param = c0.param AND c{k}.grp = c0.grp AND c{k}.comp = {k}"
            ));
        }
        qb.push(" WHERE c0.tenant = ");
        qb.push_index_tenant(scope.tenant.as_str(), None);
        qb.push(" AND c0.resource_type = ");
        qb.push_bind(rt.as_str());
        qb.push(" AND ");
        push_param(qb, "c0", Some(rt), param);
        qb.push(" AND c0.comp = 0");
        for (k, v) in components.iter().enumerate() {
            push_values(qb, &format!("c{k}"), None, v, now);
        }
        qb.push(")");
    }
    qb.push(")");
    Ok(())
}

/// How [`push_in`] opens and closes a positive id set over `resources r` on PostgreSQL.
const ID_SET_OPEN: &str = " AND r.id = ANY(ARRAY(";
/// See [`ID_SET_OPEN`].
const ID_SET_CLOSE: &str = "))";

/// How [`push_in`] opens and closes a positive id set over `resources r` on SQLite.
const IN_SET_OPEN: &str = " AND r.id IN (";
/// See [`IN_SET_OPEN`].
const IN_SET_CLOSE: &str = ")";

/// `SELECT COUNT(*)` of the live resources matching `query`, from the index tables alone, when
/// every criterion is a positive id set over one index table or is covered by a date range of
/// [`range_sets`]: index rows exist only for the
/// live current version of a resource, so the intersection of the sets is the match set and
/// nothing joins back to `resources` (a count then costs the index entries it reads, not a
/// resource lookup per match). `None` for any other query.
pub(crate) fn index_count(
    dialect: crate::Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<Option<Sql>> {
    if query.resource_type.is_none()
        || query.compartment.is_some()
        || query.among.is_some()
        || query.criteria.is_empty()
    {
        return Ok(None);
    }
    let sets = index_sets(dialect, tenant, query, now)?;
    let ranges = range_sets(dialect, tenant, query, now)?;
    let covered = sets.len() + ranges.iter().map(|(covers, _)| covers.len()).sum::<usize>();
    if covered != query.criteria.len() {
        return Ok(None);
    }
    let sets: Vec<Sql> = sets
        .into_iter()
        .map(|(_, s)| s)
        .chain(ranges.into_iter().map(|(_, s)| s))
        .collect();
    let mut qb = Sql::new(dialect, "SELECT COUNT(");
    // One set may hold several rows of a resource (two names, two codes); INTERSECT keeps one.
    qb.push(if sets.len() == 1 {
        "DISTINCT x.id"
    } else {
        "*"
    });
    qb.push(") FROM (");
    for (i, select) in sets.into_iter().enumerate() {
        if i > 0 {
            qb.push(" INTERSECT ");
        }
        qb.append(select);
    }
    qb.push(") x");
    Ok(Some(qb))
}

/// The criteria of `query` that are a positive id set read from one index table, each with
/// its `SELECT t.id FROM search_…` (by position in `query.criteria`). Chains and `_has` go
/// through other resources, whose liveness only `resources` knows; negations and `:missing`
/// are complements.
pub(crate) fn index_sets(
    dialect: crate::Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<Vec<(usize, Sql)>> {
    let (open, close) = match dialect.id_set_from_array() {
        Some(_) => (ID_SET_OPEN, ID_SET_CLOSE),
        None => (IN_SET_OPEN, IN_SET_CLOSE),
    };
    criterion_sets(
        dialect,
        tenant,
        query,
        now,
        |_| true,
        |part| {
            part.inside(open, close)
                .filter(|s| s.text().starts_with("SELECT t.id FROM search_"))
        },
    )
}

/// Each criterion of `query` that `wanted` admits, planned as an uncorrelated predicate over
/// `resources r`, and the id set `select` finds in it (by position in `query.criteria`). None
/// for a search over several types or within a compartment.
fn criterion_sets(
    dialect: crate::Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
    wanted: impl Fn(&fhirstore_core::search::Criterion) -> bool,
    select: impl Fn(&Sql) -> Option<Sql>,
) -> Result<Vec<(usize, Sql)>> {
    if query.resource_type.is_none() || query.compartment.is_some() {
        return Ok(Vec::new());
    }
    let scope = Scope {
        tenant,
        rt: query.resource_type,
        alias: "r",
        correlate: false,
    };
    let mut sets = Vec::new();
    for (i, c) in query.criteria.iter().enumerate() {
        if !wanted(c) {
            continue;
        }
        let mut part = Sql::new(dialect, "");
        push_criterion(&mut part, &scope, c, &c.chain, now)?;
        if let Some(set) = select(&part) {
            sets.push((i, set));
        }
    }
    Ok(sets)
}

/// Where a date criterion's matching rows can start: at or after an instant, or after an
/// instant less the longest span any row of the parameter has (a row must end after it).
#[derive(Clone, Copy)]
enum Lower {
    At(i64),
    Span(i64),
}

/// The bounds on `low` of the rows that can match one date criterion: a lower bound and an
/// (exclusive) upper bound, each absent when the criterion leaves that side open. With
/// several values, the loosest of each side (any value may match).
fn date_bounds(
    values: &[fhirstore_core::date::DateValue],
    now: i64,
) -> (Option<Lower>, Option<i64>) {
    use fhirstore_core::date::Prefix as P;
    let mut lower: Option<Lower> = None;
    let mut upper: Option<i64> = None;
    for (i, d) in values.iter().enumerate() {
        let (ql, qh) = (d.range.low, d.range.high);
        let (lo, hi) = match d.prefix {
            // A stored range within [ql, qh) starts there; one that ends after qh (or after
            // ql) started at most a span before.
            P::Eq => (Some(Lower::At(ql)), Some(qh)),
            P::Ne => (None, None),
            P::Gt => (Some(Lower::Span(qh)), None),
            P::Ge => (Some(Lower::Span(ql)), None),
            P::Lt | P::Eb => (None, Some(ql)),
            P::Le => (None, Some(qh)),
            P::Sa => (Some(Lower::At(qh)), None),
            P::Ap => {
                let a = d.approximate_bounds(now);
                (Some(Lower::Span(a.low)), Some(a.high))
            }
        };
        if i == 0 {
            (lower, upper) = (lo, hi);
            continue;
        }
        lower = match (lower, lo) {
            (Some(Lower::At(a)), Some(Lower::At(b))) => Some(Lower::At(a.min(b))),
            (Some(Lower::At(a) | Lower::Span(a)), Some(Lower::At(b) | Lower::Span(b))) => {
                Some(Lower::Span(a.min(b)))
            }
            _ => None,
        };
        upper = upper.zip(hi).map(|(a, b)| a.max(b));
    }
    (lower, upper)
}

/// The date criteria on one parameter: the parameter, the criteria's positions, and the
/// bounds on `low` of a row matching them all.
type RangeGroup<'a> = (&'a str, Vec<usize>, Option<Lower>, Option<i64>);

/// For each date parameter whose criteria together bound where a matching row starts on both
/// sides (`birthdate=ge1980-01-01&birthdate=lt1981-01-01`, `date=2024-03`), a superset of
/// the resources matching those criteria, from one range of `search_date_lookup`: each with
/// the positions of the criteria it covers. Alone, each side of such a pair matches most
/// resources; together they are often selective, and this set lets a page start from them.
///
/// A row's start is bounded below by the searched instant less the longest span of any row
/// of the parameter (`search_date_span`, read in the statement). Several criteria are taken
/// as one row's range only while no resource has more than one row for the parameter
/// (`search_date_multi`); otherwise the set is the intersection of each criterion's rows.
/// Either way the set is exactly the live resources matching the criteria it covers (index
/// rows are those of live current versions), so they need no other check, and it counts.
pub(crate) fn range_sets(
    dialect: crate::Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<Vec<(Vec<usize>, Sql)>> {
    let Some(rt) = query.resource_type else {
        return Ok(Vec::new());
    };
    if query.compartment.is_some() {
        return Ok(Vec::new());
    }
    // In the order parameters first appear.
    let mut groups: Vec<RangeGroup<'_>> = Vec::new();
    for (i, c) in query.criteria.iter().enumerate() {
        let CriterionValues::Date(values) = &c.values else {
            continue;
        };
        if !c.chain.is_empty() || c.modifier.is_some() || c.param.starts_with('_') {
            continue;
        }
        let (lo, hi) = date_bounds(values, now);
        match groups.iter_mut().find(|g| g.0 == c.param) {
            Some(g) => {
                g.1.push(i);
                // Every criterion holds of the one row: the tightest bound of each side.
                g.2 = match (g.2, lo) {
                    (Some(Lower::At(a)), Some(Lower::At(b))) => Some(Lower::At(a.max(b))),
                    (Some(Lower::At(a)), _) | (_, Some(Lower::At(a))) => Some(Lower::At(a)),
                    (Some(Lower::Span(a)), Some(Lower::Span(b))) => Some(Lower::Span(a.max(b))),
                    (a, b) => a.or(b),
                };
                g.3 = match (g.3, hi) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => groups.push((c.param.as_str(), vec![i], lo, hi)),
        }
    }
    let mut sets = Vec::new();
    for (param, covers, lower, upper) in groups {
        let (Some(lower), Some(upper)) = (lower, upper) else {
            continue;
        };
        // Several criteria: the one-row range, or (some resource having several rows) the
        // intersection of each criterion's own rows; wrapped, so the set reads as one SELECT.
        let many = covers.len() > 1;
        let mut qb = Sql::new(dialect, if many { "SELECT z.id FROM (" } else { "" });
        let owner = |qb: &mut Sql, alias: &str| {
            qb.push(format_args!(
                " FROM search_date {alias} WHERE {alias}.tenant = "
            ));
            qb.push_index_tenant(tenant.as_str(), None);
            qb.push(format_args!(" AND {alias}.resource_type = "));
            qb.push_bind(rt.as_str());
            qb.push(format_args!(" AND {alias}.param = "));
            qb.push_bind(param.to_owned());
        };
        let multi = |qb: &mut Sql| {
            qb.push("(SELECT 1 FROM search_date_multi m WHERE m.tenant = ");
            qb.push_bind(tenant.as_str().to_owned());
            qb.push(" AND m.resource_type = ");
            qb.push_bind(rt.as_str());
            qb.push(" AND m.param = ");
            qb.push_bind(param.to_owned());
            qb.push(")");
        };
        qb.push("SELECT t.id");
        owner(&mut qb, "t");
        qb.push(" AND t.low >= ");
        match lower {
            Lower::At(v) => {
                qb.push_bind(v);
            }
            Lower::Span(v) => {
                // The longest span is at most 2m + 2, where m = max(high / 2 - low / 2); past
                // `limit` the bound would fall below i64::MIN, and every start qualifies.
                let limit = (i128::from(v) - i128::from(i64::MIN) - 2) / 2;
                let limit = i64::try_from(limit.max(0)).unwrap_or(i64::MAX);
                // The largest first, one row: both dialects read it from the end of
                // `search_date_span` (SQLite's MAX() aggregated every entry: 0.8 ms at 73k).
                qb.push("(SELECT CASE WHEN x.m > ");
                qb.push_bind(limit);
                qb.push(" THEN ");
                qb.push_bind(i64::MIN);
                qb.push(" ELSE ");
                qb.push_bind(v);
                // Subtracted one step at a time: 2 * m alone can pass i64::MAX.
                qb.push(" - x.m - x.m - 2 END FROM (SELECT u.high / 2 - u.low / 2 AS m");
                owner(&mut qb, "u");
                // Without rows, no row and a NULL bound: nothing can match anyway.
                qb.push(" ORDER BY m DESC LIMIT 1) x)");
            }
        }
        qb.push(" AND t.low < ");
        qb.push_bind(upper);
        for &i in &covers {
            push_values(&mut qb, "t", None, &query.criteria[i].values, now);
        }
        if many {
            qb.push(" AND NOT EXISTS ");
            multi(&mut qb);
            qb.push(" UNION ALL SELECT y.id FROM (");
            for (n, &i) in covers.iter().enumerate() {
                if n > 0 {
                    qb.push(" INTERSECT ");
                }
                // Each part starts from the flag's row, so without it the part reads nothing
                // (SQLite checks a constant EXISTS per row: 141 ms for two parts at 73k rows).
                qb.push("SELECT t.id FROM search_date_multi m JOIN search_date t ON t.tenant = ");
                qb.push_index_tenant(tenant.as_str(), Some("m"));
                qb.push(
                    " AND t.resource_type = m.resource_type AND t.param = m.param \
                     WHERE m.tenant = ",
                );
                qb.push_bind(tenant.as_str().to_owned());
                qb.push(" AND m.resource_type = ");
                qb.push_bind(rt.as_str());
                qb.push(" AND m.param = ");
                qb.push_bind(param.to_owned());
                push_values(&mut qb, "t", None, &query.criteria[i].values, now);
            }
            qb.push(") y) z");
        }
        sets.push((covers, qb));
    }
    Ok(sets)
}

/// The chained criteria of `query` (chains and `_has`), each with its id set, by position in
/// `query.criteria`: counted beside the index criteria to choose a page's strategy, never to
/// count matches (the set is read through other resources).
pub(crate) fn chain_sets(
    dialect: crate::Syntax,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<Vec<(usize, Sql)>> {
    criterion_sets(
        dialect,
        tenant,
        query,
        now,
        |c| !c.chain.is_empty(),
        |part| part.inside(IN_SET_OPEN, IN_SET_CLOSE),
    )
}

/// Appends `AND (...)` for every criterion of `query` to a statement over `resources r`, each
/// an id set or a per-resource check as `strategy` says.
fn push_criteria(
    qb: &mut Sql,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
    strategy: Strategy,
) -> Result<()> {
    let scope = Scope {
        tenant,
        rt: query.resource_type,
        alias: "r",
        correlate: false,
    };
    // PostgreSQL: the positive id sets of several criteria are intersected in one set (a
    // hashed set operation, linear in the sets' sizes) instead of each being an
    // `= ANY(array)` filter of its own, which PostgreSQL checks by scanning the array for
    // every candidate row: quadratic, 11 searches/s for `family` with `gender` at 10k
    // Patients.
    let intersect = scope.rt.is_some() && qb.dialect().id_set_from_array().is_some();
    let mut sets: Vec<Sql> = Vec::new();
    // A date range that drives is exactly what its criteria match (see `range_sets`).
    let range = match strategy {
        Strategy::Range(k) => Some(
            range_sets(qb.dialect(), tenant, query, now)?
                .into_iter()
                .nth(k)
                .ok_or_else(|| Error::InvalidSearch("no such date range".into()))?,
        ),
        _ => None,
    };
    for (i, c) in query.criteria.iter().enumerate() {
        if range
            .as_ref()
            .is_some_and(|(covers, _)| covers.contains(&i))
        {
            continue;
        }
        let scope = Scope {
            correlate: match strategy {
                Strategy::Gather => false,
                Strategy::Drive(d) => i != d,
                Strategy::Walk | Strategy::Among | Strategy::Range(_) => true,
            },
            ..scope
        };
        if !intersect {
            push_criterion(qb, &scope, c, &c.chain, now)?;
            continue;
        }
        let mut part = qb.empty();
        push_criterion(&mut part, &scope, c, &c.chain, now)?;
        match part.inside(ID_SET_OPEN, ID_SET_CLOSE) {
            Some(select) => sets.push(select),
            None => {
                qb.append(part);
            }
        }
    }
    if !sets.is_empty() {
        qb.push(ID_SET_OPEN);
        for (i, select) in sets.into_iter().enumerate() {
            if i > 0 {
                qb.push(" INTERSECT ");
            }
            qb.append(select);
        }
        qb.push(ID_SET_CLOSE);
    }
    if let Some(c) = &query.compartment {
        push_compartment(qb, &scope, c);
    }
    if let Some(set) = range {
        let (open, close) = match qb.dialect().id_set_from_array() {
            Some(_) => (ID_SET_OPEN, ID_SET_CLOSE),
            None => (IN_SET_OPEN, IN_SET_CLOSE),
        };
        qb.push(open);
        qb.append(set.1);
        qb.push(close);
    }
    if let Some(ids) = &query.among {
        let (open, close) = qb.dialect().text_set();
        qb.push(open);
        qb.push_bind(Bind::TextList(
            ids.iter().map(|id| id.as_str().to_owned()).collect(),
        ));
        qb.push(close);
    }
    Ok(())
}

/// Appends `AND (...)`: the resource is in the compartment. Membership is read from the
/// reference index, where the write put it: one uncorrelated subquery over the rows that point
/// at the focal resource (`search_reference_target`), or, for a search of one type, over that
/// type's compartment parameters (`search_reference_lookup`); the focal resource itself is a
/// member by identity.
fn push_compartment(
    qb: &mut Sql,
    scope: &Scope<'_>,
    c: &fhirstore_core::compartment::CompartmentScope,
) {
    let r = scope.alias;
    let members: Vec<&(ResourceType, Vec<String>)> = c
        .members
        .iter()
        .filter(|(t, _)| scope.rt.is_none_or(|rt| *t == rt))
        .collect();
    if members.is_empty() {
        qb.push(" AND 1 = 0");
        return;
    }
    if scope.rt.is_none() {
        qb.push(format_args!(" AND {r}.resource_type IN ("));
        qb.push_bind_list(members.iter().map(|(t, _)| t.as_str()));
        qb.push(")");
    }
    qb.push(" AND (");
    let mut or = "";
    if members.iter().any(|(t, _)| *t == c.owner_type) {
        qb.push(format_args!("({r}.resource_type = "));
        qb.push_bind(c.owner_type.as_str());
        if let Some(id) = &c.owner_id {
            qb.push(format_args!(" AND {r}.id = "));
            qb.push_bind(id.as_str().to_owned());
        }
        qb.push(")");
        or = " OR ";
    }
    let by_param: Vec<&&(ResourceType, Vec<String>)> =
        members.iter().filter(|(_, p)| !p.is_empty()).collect();
    if !by_param.is_empty() {
        // One type: the same single-column `IN` a reference criterion uses, which the planners
        // drive from the (small) membership set; several: pairs of type and id.
        if scope.rt.is_some() {
            qb.push(format_args!(
                "{or}{r}.id IN (SELECT m.id FROM search_reference m WHERE m.tenant = "
            ));
        } else {
            qb.push(format_args!(
                "{or}({r}.resource_type, {r}.id) IN (SELECT m.resource_type, m.id \
                 FROM search_reference m WHERE m.tenant = "
            ));
        }
        qb.push_index_tenant(scope.tenant.as_str(), None);
        qb.push(" AND m.target_type = ");
        qb.push_bind(c.owner_type.as_str());
        if let Some(id) = &c.owner_id {
            qb.push(" AND m.target_id = ");
            qb.push_bind(id.as_str().to_owned());
        }
        qb.push(" AND (");
        for (i, (t, params)) in by_param.iter().enumerate() {
            if i > 0 {
                qb.push(" OR ");
            }
            qb.push("(m.resource_type = ");
            qb.push_bind(t.as_str());
            qb.push(" AND m.param IN (");
            qb.push_bind_list(params.iter().map(String::as_str));
            qb.push("))");
        }
        qb.push("))");
    } else if or.is_empty() {
        qb.push("1 = 0");
    }
    qb.push(")");
}

/// Appends `AND (...)` for one criterion over the resource aliased `r` (of type `rt`), first
/// walking `chain`: each link nests an `EXISTS` through `search_reference` to the next resource,
/// forward along a reference parameter or (for `_has`) backward from resources pointing here.
fn push_criterion(
    qb: &mut Sql,
    scope: &Scope<'_>,
    c: &fhirstore_core::search::Criterion,
    chain: &[fhirstore_core::search::ChainLink],
    now: i64,
) -> Result<()> {
    use fhirstore_core::search::ChainLink;
    let r = scope.alias;
    let rt = scope.rt;
    if let Some((link, rest)) = chain.split_first() {
        let Some(here) = rt else {
            return Err(Error::InvalidSearch(
                "chained parameters need a resource type".into(),
            ));
        };
        // Aliases get deeper with each link, so an inner query never shadows an outer one.
        let depth = r.len();
        let (h, next) = (format!("h{depth}"), format!("{r}n"));
        // A link is a `search_reference` row. Forward: `r` holds the reference and the next
        // resource is its target. Reverse: `r` is the target and the next resource holds it.
        let (own, next_type, next_id, holder, target, param, next_rt) = match link {
            ChainLink::Forward { param, target } => (
                "id",
                "target_type",
                "target_id",
                here,
                *target,
                param,
                *target,
            ),
            ChainLink::Reverse { source, param } => (
                "target_id",
                "resource_type",
                "id",
                *source,
                here,
                param,
                *source,
            ),
        };
        // The next resource is of the tenant: on PostgreSQL as the link's own tenant; on
        // SQLite, whose index rows hold the tenant's key, by name.
        let join = |qb: &mut Sql| {
            qb.push(format_args!(
                "search_reference {h} JOIN resources {next} ON {next}.tenant = "
            ));
            match qb.dialect() {
                crate::Syntax::Sqlite => {
                    qb.push_bind(scope.tenant.as_str().to_owned());
                }
                crate::Syntax::Postgres => {
                    qb.push(format_args!("{h}.tenant"));
                }
            }
            qb.push(format_args!(
                " AND NOT {next}.deleted \
                 AND {next}.resource_type = {h}.{next_type} AND {next}.id = {h}.{next_id}"
            ));
        };
        if scope.correlate {
            // Checked per resource: its own references (forward) or those pointing at it
            // (reverse, through `search_reference_target`), then each one's next resource,
            // so a walk pays for the resources it visits, not for every match of the chain.
            let (own_type, own_id) = match link {
                ChainLink::Forward { .. } => ("resource_type", "id"),
                ChainLink::Reverse { .. } => ("target_type", "target_id"),
            };
            qb.push(" AND EXISTS (SELECT 1 FROM ");
            join(qb);
            qb.push(format_args!(" WHERE {h}.tenant = "));
            qb.push_index_tenant(scope.tenant.as_str(), Some(r));
            qb.push(format_args!(
                " AND {h}.{own_type} = {r}.resource_type AND {h}.{own_id} = {r}.id"
            ));
        } else {
            qb.push(format_args!(" AND {r}.id IN (SELECT {h}.{own} FROM "));
            join(qb);
            qb.push(format_args!(" WHERE {h}.tenant = "));
            qb.push_index_tenant(scope.tenant.as_str(), None);
        }
        qb.push(format_args!(" AND {h}.resource_type = "));
        qb.push_bind(holder.as_str());
        qb.push(format_args!(" AND {h}.param = "));
        qb.push_bind(param.clone());
        qb.push(format_args!(" AND {h}.target_type = "));
        qb.push_bind(target.as_str());
        let inner = Scope {
            tenant: scope.tenant,
            rt: Some(next_rt),
            alias: &next,
            correlate: scope.correlate,
        };
        push_criterion(qb, &inner, c, rest, now)?;
        qb.push(if scope.correlate {
            qb.dialect().probe_end()
        } else {
            ")"
        });
        return Ok(());
    }
    if matches!(c.param.as_str(), "_text" | "_content") {
        return Err(Error::Unsupported(format!(
            "{}: full-text search is answered by the full-text secondary, not the SQL primary",
            c.param
        )));
    }
    {
        let modifier = c.modifier;
        // :text, :of-type and :identifier rows live under derived parameter names.
        let derived = match modifier {
            Some(Modifier::Text) => Some(format!("{}:text", c.param)),
            Some(Modifier::OfType) => Some(format!("{}:of-type", c.param)),
            Some(Modifier::Identifier) => Some(format!("{}:identifier", c.param)),
            _ => None,
        };
        let param = derived.as_deref().unwrap_or(c.param.as_str());
        match (param, &c.values) {
            ("_id", CriterionValues::Token(tokens)) => {
                qb.push(format_args!(" AND {r}.id IN ("));
                qb.push_bind_list(tokens.iter().map(|t| t.code.clone().unwrap_or_default()));
                qb.push(")");
            }
            ("_lastUpdated", CriterionValues::Date(dates)) => {
                qb.push(" AND (");
                for (i, d) in dates.iter().enumerate() {
                    if i > 0 {
                        qb.push(" OR ");
                    }
                    push_instant_predicate(
                        qb,
                        &format!("{r}.last_updated"),
                        d.instant_predicate(now),
                    );
                }
                qb.push(")");
            }
            ("_id" | "_lastUpdated", CriterionValues::Missing(missing, _)) => {
                // Every resource has both.
                qb.push(if *missing { " AND 1 = 0" } else { "" });
            }
            (_, CriterionValues::Missing(missing, kind)) => {
                let table = index_table(*kind)
                    .ok_or_else(|| Error::Unsupported(format!("{param}:missing")))?;
                let close = push_in(qb, scope, table, param, *missing, false);
                qb.push(close);
            }
            (_, CriterionValues::Composite(values)) => {
                push_composite(qb, scope, param, values, now)?;
            }
            (_, values) => {
                // Range criteria stay correlated (see `push_in`).
                let (table, correlated) = match values {
                    CriterionValues::Token(_) => ("search_token", false),
                    CriterionValues::String(_) => ("search_string", false),
                    CriterionValues::Date(_) => ("search_date", true),
                    CriterionValues::Number(ns) => {
                        ("search_quantity", ns.iter().any(|n| n.prefix != Prefix::Eq))
                    }
                    CriterionValues::Quantity(qs) => (
                        "search_quantity",
                        qs.iter().any(|q| q.number.prefix != Prefix::Eq),
                    ),
                    CriterionValues::Reference(_) => ("search_reference", false),
                    CriterionValues::Uri(_) => ("search_uri", false),
                    CriterionValues::Missing(..) | CriterionValues::Composite(_) => {
                        return Err(Error::InvalidSearch(format!("{param}: no value")))
                    }
                };
                let negate = modifier == Some(Modifier::Not);
                let close = push_in(qb, scope, table, param, negate, correlated);
                push_values(qb, "t", modifier, values, now);
                qb.push(close);
            }
        }
    }
    Ok(())
}

/// `(column >= ge AND column < lt)`, negated where the predicate says.
fn push_instant_predicate(qb: &mut Sql, column: &str, p: InstantPredicate) {
    qb.push(if p.negated { "NOT (" } else { "(" });
    qb.push("1 = 1");
    if let Some(ge) = p.ge {
        qb.push(format_args!(" AND {column} >= "));
        qb.push_bind(ge);
    }
    if let Some(lt) = p.lt {
        qb.push(format_args!(" AND {column} < "));
        qb.push_bind(lt);
    }
    qb.push(")");
}

/// `FROM resources r WHERE` the tenant, type, liveness and criteria hold.
pub(crate) fn push_search_from(
    qb: &mut Sql,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
) -> Result<()> {
    qb.push(" FROM resources r");
    push_search_where(qb, tenant, query, now, Strategy::Gather)
}

/// ` WHERE` the resource aliased `r` is of the tenant and type, live, and matches the criteria
/// (as `strategy` says).
pub(crate) fn push_search_where(
    qb: &mut Sql,
    tenant: &TenantId,
    query: &SearchQuery,
    now: i64,
    strategy: Strategy,
) -> Result<()> {
    qb.push(" WHERE r.tenant = ");
    qb.push_bind(tenant.as_str().to_owned());
    if let Some(rt) = query.resource_type {
        qb.push(" AND r.resource_type = ");
        qb.push_bind(rt.as_str());
    } else if !query.types.is_empty() {
        qb.push(" AND r.resource_type IN (");
        qb.push_bind_list(query.types.iter().map(|t| t.as_str()));
        qb.push(")");
    }
    // A literal, not a bind: the planner can then use indexes restricted to live rows.
    qb.push(" AND NOT r.deleted");
    push_criteria(qb, tenant, query, now, strategy)
}
