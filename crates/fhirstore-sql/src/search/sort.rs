//! `_sort` keys as SQL expressions, the keyset condition that resumes after a page, and the
//! cursor that carries a page's last key values.

use fhirstore_core::search::ParamType;
use fhirstore_core::{Error, LogicalId, ResourceKey, ResourceType, Result};
use serde_json::Value;

use super::Sql;
use crate::Syntax;

/// How a sort key's values are stored and compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// Text, compared bytewise.
    Text,
    /// An integer (instants in microseconds).
    Int,
    /// A number.
    Real,
}

/// One `_sort` key as SQL: the per-resource value (the lowest for ascending, the highest for
/// descending), with resources lacking a value sorted last in either direction.
pub(crate) struct SortColumn {
    param: String,
    /// The searched type, which decides whether the key's rows are shared (see
    /// `criteria::push_param`).
    rt: Option<ResourceType>,
    /// How its values are read and compared.
    pub kind: KeyKind,
    /// Descending order.
    pub descending: bool,
    /// `(table, column)` for index-table keys; `None` for the resources table's own columns.
    source: Option<(&'static str, &'static str)>,
    /// The dialect's bytewise collation for text keys.
    text_collate: &'static str,
}

/// A sort key's value in a cursor.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KeyValue {
    /// A text key.
    Text(String),
    /// An integer key.
    Int(i64),
    /// A number key.
    Real(f64),
}

impl SortColumn {
    /// The column for one `_sort` key of a search of `rt`, in `dialect`.
    pub(crate) fn of(
        k: &fhirstore_core::search::SortKey,
        rt: Option<ResourceType>,
        dialect: Syntax,
    ) -> Self {
        let (kind, source) = match (k.param.as_str(), k.kind) {
            ("_id", _) => (KeyKind::Text, None),
            ("_lastUpdated", _) => (KeyKind::Int, None),
            (_, ParamType::String) => (KeyKind::Text, Some(("search_string", "folded"))),
            (_, ParamType::Date) => (
                KeyKind::Int,
                Some(("search_date", if k.descending { "high" } else { "low" })),
            ),
            (_, ParamType::Number | ParamType::Quantity) => {
                (KeyKind::Real, Some(("search_quantity", "value")))
            }
            (_, ParamType::Uri) => (KeyKind::Text, Some(("search_uri", "uri"))),
            (_, ParamType::Reference) => (KeyKind::Text, Some(("search_reference", "target_id"))),
            _ => (KeyKind::Text, Some(("search_token", "code"))),
        };
        SortColumn {
            param: k.param.clone(),
            rt,
            kind,
            descending: k.descending,
            source,
            text_collate: dialect.text_key_collate(),
        }
    }

    /// Text keys compare bytewise in both dialects, so the order and the keyset condition agree.
    pub(crate) fn collate(&self) -> &'static str {
        if self.kind == KeyKind::Text {
            self.text_collate
        } else {
            ""
        }
    }

    /// The per-resource key value, over the resource aliased `r` (of `tenant`).
    pub(super) fn push_expr(&self, qb: &mut Sql, tenant: &str) {
        match (self.param.as_str(), self.source) {
            ("_id", _) | (_, None) if self.kind == KeyKind::Text => {
                qb.push(format_args!("r.id{}", self.text_collate));
            }
            (_, None) => {
                qb.push("r.last_updated");
            }
            (_, Some((table, column))) => {
                let agg = if self.descending { "MAX" } else { "MIN" };
                qb.push(format_args!(
                    "COALESCE((SELECT {agg}(t.{column}) FROM {table} t WHERE t.tenant = "
                ));
                qb.push_index_tenant(tenant, Some("r"));
                qb.push(" AND t.resource_type = r.resource_type AND t.id = r.id AND ");
                super::criteria::push_param(qb, "t", self.rt, &self.param);
                qb.push("), ");
                self.push_missing(qb);
                qb.push(format_args!("){}", self.collate()));
            }
        }
    }
}

impl SortColumn {
    /// The value a resource without one sorts by: last in either direction, the largest
    /// sentinel ascending, the smallest descending.
    pub(super) fn push_missing(&self, qb: &mut Sql) {
        match (self.kind, self.descending) {
            (KeyKind::Text, false) => qb.push_bind("\u{10FFFF}".to_owned()),
            (KeyKind::Text, true) => qb.push_bind(String::new()),
            (KeyKind::Int, false) => qb.push_bind(i64::MAX),
            (KeyKind::Int, true) => qb.push_bind(i64::MIN),
            (KeyKind::Real, false) => qb.push_bind(f64::MAX),
            (KeyKind::Real, true) => qb.push_bind(f64::MIN),
        };
    }

    /// Whether `v` is the missing-value sentinel: a cursor there has left every resource with
    /// a value behind.
    pub(super) fn is_missing(&self, v: &KeyValue) -> bool {
        match (v, self.descending) {
            (KeyValue::Text(t), false) => t == "\u{10FFFF}",
            (KeyValue::Text(t), true) => t.is_empty(),
            (KeyValue::Int(n), false) => *n == i64::MAX,
            (KeyValue::Int(n), true) => *n == i64::MIN,
            (KeyValue::Real(x), false) => *x == f64::MAX,
            (KeyValue::Real(x), true) => *x == f64::MIN,
        }
    }

    /// `(table, column, param)` when an index lists the key's rows in the key's own order with
    /// ties by id ascending, so a walk can stop when the page is full: dates both ways
    /// (`search_date_lookup` by lowest, `search_date_high` by highest descending), and
    /// numbers, strings and uris ascending (their lookup indexes; strings and uris compare
    /// bytewise as the columns are ordered). Token codes and reference ids compare bytewise
    /// against columns ordered by the database's collation.
    pub(super) fn walkable(&self) -> Option<(&'static str, &'static str, &str)> {
        let (table, column) = self.source?;
        // Shared rows are read from several parameters, whose index ranges are not one order.
        let shared = fhirstore_core::registry::SharedRows::r4();
        let own = match self.rt {
            Some(rt) => !shared.is_shared(rt.as_str(), &self.param),
            None => shared.types_sharing(&self.param).is_empty(),
        };
        let ordered = own
            && match table {
                "search_date" => true,
                "search_string" | "search_uri" | "search_quantity" => !self.descending,
                _ => false,
            };
        ordered.then_some((table, column, self.param.as_str()))
    }
}

pub(super) fn push_key_value(qb: &mut Sql, v: &KeyValue) {
    match v {
        KeyValue::Text(t) => qb.push_bind(t.as_str()),
        KeyValue::Int(n) => qb.push_bind(*n),
        KeyValue::Real(x) => qb.push_bind(*x),
    };
}

/// Rows after the cursor in (k0, k1, …, type, id) order: `k0 after c0 OR (k0 = c0 AND (…))`.
pub(crate) fn push_keyset(
    qb: &mut Sql,
    keys: &[SortColumn],
    values: &[KeyValue],
    rt: ResourceType,
    id: &LogicalId,
) {
    qb.push("(");
    for (i, (k, v)) in keys.iter().zip(values).enumerate() {
        let op = if k.descending { "<" } else { ">" };
        qb.push(format_args!("s.k{i}{} {op} ", k.collate()));
        push_key_value(qb, v);
        qb.push(format_args!(" OR (s.k{i}{} = ", k.collate()));
        push_key_value(qb, v);
        qb.push(" AND (");
    }
    qb.push("(s.rt, s.id) > (");
    qb.push_bind(rt.as_str());
    qb.push(", ");
    qb.push_bind(id.as_str().to_owned());
    qb.push(")");
    for _ in keys {
        // One for `OR (`, one for `AND (`.
        qb.push("))");
    }
    qb.push(")");
}

/// A sorted search's cursor: the last row's key values, type and id, as JSON.
pub(crate) fn sorted_cursor(values: &[KeyValue], key: &ResourceKey) -> String {
    let vals: Vec<Value> = values
        .iter()
        .map(|v| match v {
            KeyValue::Text(t) => Value::from(t.clone()),
            KeyValue::Int(n) => Value::from(*n),
            KeyValue::Real(x) => Value::from(*x),
        })
        .collect();
    serde_json::json!({"k": vals, "t": key.resource_type.as_str(), "i": key.id.as_str()})
        .to_string()
}

/// Decodes a sorted cursor, checking every value against its key's type: a tampered cursor is
/// a search error, never a query fragment.
pub(crate) fn parse_sorted_cursor(
    c: &str,
    keys: &[SortColumn],
) -> Result<(Vec<KeyValue>, ResourceType, LogicalId)> {
    let bad = || Error::InvalidSearch("invalid paging cursor for this _sort".into());
    let v: Value = serde_json::from_str(c).map_err(|_| bad())?;
    let vals = v.get("k").and_then(Value::as_array).ok_or_else(bad)?;
    if vals.len() != keys.len() {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(keys.len());
    for (k, val) in keys.iter().zip(vals) {
        out.push(match k.kind {
            KeyKind::Text => KeyValue::Text(val.as_str().ok_or_else(bad)?.to_owned()),
            KeyKind::Int => KeyValue::Int(val.as_i64().ok_or_else(bad)?),
            KeyKind::Real => KeyValue::Real(val.as_f64().ok_or_else(bad)?),
        });
    }
    let rt = v
        .get("t")
        .and_then(Value::as_str)
        .and_then(|t| ResourceType::new(t).ok())
        .ok_or_else(bad)?;
    let id = v
        .get("i")
        .and_then(Value::as_str)
        .and_then(|i| LogicalId::new(i).ok())
        .ok_or_else(bad)?;
    Ok((out, rt, id))
}
