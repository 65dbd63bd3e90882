//! Extracting search-index values from a resource body.
//!
//! Every backend indexes through [`extract`], so the primary and its secondaries agree on what
//! a resource matches. Values come from evaluating each R4 search parameter's expression
//! ([`crate::registry`]) and converting the resulting elements by the parameter's type, as R4
//! search §3.1.1.4 describes for each data type.

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::date::{parse_fhir_date, DateRange};
use crate::fhirpath::{reference_type, Node};
use crate::model::ResourceType;
use crate::registry::{Registry, SearchParamDef, SearchParamType, SharedRows};

/// Parameters the stores answer from their own columns, never from index rows.
const NATIVE_PARAMS: [&str; 2] = ["_id", "_lastUpdated"];

/// One token: a (system, code) pair under a parameter name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenEntry {
    /// The search parameter, e.g. `identifier`.
    pub param: &'static str,
    /// The code system; empty when the value has none.
    pub system: String,
    /// The code.
    pub code: String,
}

/// One string value, folded for the default (starts-with, case- and accent-insensitive) match
/// and kept exact for `:exact`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StringEntry {
    /// The search parameter.
    pub param: &'static str,
    /// Lower-cased, accents removed, whitespace collapsed.
    pub folded: String,
    /// As written.
    pub exact: String,
}

/// One date value as the range it denotes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateEntry {
    /// The search parameter.
    pub param: &'static str,
    /// First microsecond in the range.
    pub low: i64,
    /// First microsecond after the range.
    pub high: i64,
}

/// One number or quantity with its implicit precision range (R4: `100` means [99.5, 100.5)).
#[derive(Clone, Debug, PartialEq, PartialOrd)]
pub struct QuantityEntry {
    /// The search parameter.
    pub param: &'static str,
    /// The value as written.
    pub value: f64,
    /// Lower bound of the precision range.
    pub low: f64,
    /// Upper bound of the precision range.
    pub high: f64,
    /// Unit system (UCUM, a currency system…); empty for plain numbers.
    pub system: String,
    /// Coded unit; empty when none.
    pub code: String,
    /// Human unit text; empty when none.
    pub unit: String,
}

/// One reference.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReferenceEntry {
    /// The search parameter.
    pub param: &'static str,
    /// Target type when the reference names one (`Patient/1` → `Patient`); empty otherwise.
    pub target_type: String,
    /// Target id for relative and absolute literal references; empty otherwise.
    pub target_id: String,
    /// The reference string as written, without a version (`…|1.0` or `/_history/n`).
    pub url: String,
    /// The version, for canonicals (`url|version`) and versioned references; empty otherwise.
    pub version: String,
}

/// One uri value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UriEntry {
    /// The search parameter.
    pub param: &'static str,
    /// The uri.
    pub uri: String,
}

/// All index entries for one resource version, each list sorted and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexEntries {
    /// Token entries.
    pub tokens: Vec<TokenEntry>,
    /// String entries.
    pub strings: Vec<StringEntry>,
    /// Date entries.
    pub dates: Vec<DateEntry>,
    /// Number entries (no unit).
    pub numbers: Vec<QuantityEntry>,
    /// Quantity entries.
    pub quantities: Vec<QuantityEntry>,
    /// Reference entries.
    pub references: Vec<ReferenceEntry>,
    /// Uri entries.
    pub uris: Vec<UriEntry>,
    /// Composite entries: one per component value, grouped by the element they came from.
    pub composites: Vec<CompositeEntry>,
}

/// One value of one component of a composite parameter (R4 search §3.1.1.4.9). Values of the
/// same `group` come from the same element (one Observation, or one of its components), which
/// is what lets `code-value-quantity=…$gt5` require the code and the value to belong together.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
pub struct CompositeEntry {
    /// The composite parameter, e.g. `code-value-quantity`.
    pub param: &'static str,
    /// Which element of the composite's expression the value belongs to.
    pub group: u32,
    /// The component's position in the definition.
    pub component: u32,
    /// The value, converted by the component's own parameter type.
    pub value: ComponentValue,
}

/// A composite component's value; each variant's entry carries the composite's name as `param`.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
pub enum ComponentValue {
    /// A token component.
    Token(TokenEntry),
    /// A string component.
    String(StringEntry),
    /// A date component.
    Date(DateEntry),
    /// A number or quantity component.
    Quantity(QuantityEntry),
    /// A reference component.
    Reference(ReferenceEntry),
    /// A uri component.
    Uri(UriEntry),
}

impl ComponentValue {
    fn all(e: IndexEntries) -> Vec<ComponentValue> {
        let mut out = Vec::new();
        out.extend(e.tokens.into_iter().map(Self::Token));
        out.extend(e.strings.into_iter().map(Self::String));
        out.extend(e.dates.into_iter().map(Self::Date));
        out.extend(e.numbers.into_iter().map(Self::Quantity));
        out.extend(e.quantities.into_iter().map(Self::Quantity));
        out.extend(e.references.into_iter().map(Self::Reference));
        out.extend(e.uris.into_iter().map(Self::Uri));
        out
    }
}

/// Extracts the index entries of a resource body for every R4 search parameter of its type.
/// Tombstones and bodies without a known `resourceType` have none.
pub fn extract(content: &Value) -> IndexEntries {
    extract_in(Registry::r4(), content)
}

/// Extracts the index entries of a resource body for every parameter of its type in `reg`
/// (the R4 parameters plus a tenant's own).
pub fn extract_in(reg: &Registry, content: &Value) -> IndexEntries {
    let Some(rt) = resource_type_of(content) else {
        return IndexEntries::default();
    };
    extract_params(reg, &reg.for_type(rt), content)
}

/// [`extract_in`] without the rows the resource's type shares (see [`SharedRows`]): what a
/// store that searches shared rows through their parts writes. The shared parameters are not
/// evaluated at all.
pub fn extract_own(reg: &Registry, content: &Value) -> IndexEntries {
    let Some(rt) = resource_type_of(content) else {
        return IndexEntries::default();
    };
    let shared = SharedRows::r4();
    let mut defs = reg.for_type(rt);
    if shared.shares_on(rt.as_str()) {
        defs.retain(|d| !shared.is_shared(rt.as_str(), &d.code));
    }
    extract_params(reg, &defs, content)
}

/// Extracts the index entries of `content` for `defs` only (those that apply to its type),
/// resolving composite components in `reg`. A reindex rewrites one parameter's rows this way.
pub fn extract_params(
    reg: &Registry,
    defs: &[&'static SearchParamDef],
    content: &Value,
) -> IndexEntries {
    let Some(rt) = resource_type_of(content) else {
        return IndexEntries::default();
    };
    let mut out = IndexEntries::default();
    for def in defs {
        let applies = def
            .base
            .iter()
            .any(|b| b == rt.as_str() || b == "Resource" || b == "DomainResource");
        if applies && !NATIVE_PARAMS.contains(&def.code.as_str()) {
            extract_param(reg, def, content, &mut out);
        }
    }
    out.tokens.sort_unstable();
    out.tokens.dedup();
    out.strings.sort_unstable();
    out.strings.dedup();
    out.dates.sort_unstable();
    out.dates.dedup();
    out.references.sort_unstable();
    out.references.dedup();
    out.uris.sort_unstable();
    out.uris.dedup();
    for q in [&mut out.numbers, &mut out.quantities] {
        q.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        q.dedup();
    }
    out.composites
        .sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    out.composites.dedup();
    out
}

fn resource_type_of(content: &Value) -> Option<ResourceType> {
    content
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|t| ResourceType::new(t).ok())
}

fn extract_param(
    reg: &Registry,
    def: &'static SearchParamDef,
    content: &Value,
    out: &mut IndexEntries,
) {
    let Some(Ok(expr)) = &def.expression else {
        return;
    };
    let param = def.code.as_str();
    let nodes = expr.evaluate(content);
    if def.kind == SearchParamType::Composite {
        composites(reg, def, content, &nodes, out);
        return;
    }
    for node in nodes {
        push_value(def.kind, param, &node, out);
        match def.kind {
            SearchParamType::Token => token_extras(def, &node, out),
            SearchParamType::Reference => {
                // Reference.identifier answers `:identifier`.
                if let Some(ident) = node.value.get("identifier") {
                    if let Some(value) = ident.get("value").and_then(Value::as_str) {
                        out.tokens.push(TokenEntry {
                            param: def.identifier_param.as_str(),
                            system: str_field(ident, "system").to_owned(),
                            code: value.to_owned(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
}

/// Converts one element to index entries of `kind` under `param`.
fn push_value(kind: SearchParamType, param: &'static str, node: &Node<'_>, out: &mut IndexEntries) {
    match kind {
        SearchParamType::Token => tokens(param, node, &mut out.tokens),
        SearchParamType::String => strings(param, node, &mut out.strings),
        SearchParamType::Date => {
            if let Some(r) = date_range(node) {
                out.dates.push(DateEntry {
                    param,
                    low: r.low,
                    high: r.high,
                });
            }
        }
        SearchParamType::Number => {
            if let Some(n) = number(&node.value) {
                out.numbers.push(QuantityEntry {
                    param,
                    value: n.0,
                    low: n.1,
                    high: n.2,
                    system: String::new(),
                    code: String::new(),
                    unit: String::new(),
                });
            }
        }
        SearchParamType::Quantity => quantities(param, &node.value, &mut out.quantities),
        SearchParamType::Reference => {
            if let Some(r) = reference(param, &node.value) {
                out.references.push(r);
            }
        }
        SearchParamType::Uri => {
            if let Some(u) = node.value.as_str() {
                out.uris.push(UriEntry {
                    param,
                    uri: u.to_owned(),
                });
            }
        }
        // Special parameters are answered by dedicated code paths; composites by `composites`.
        SearchParamType::Composite | SearchParamType::Special => {}
    }
}

/// Composite entries: for each element the composite's expression selects, every component's
/// values, evaluated from that element. An element lacking a value for some component matches
/// no composite search, so it gets no entries at all.
fn composites(
    reg: &Registry,
    def: &'static SearchParamDef,
    content: &Value,
    nodes: &[Node<'_>],
    out: &mut IndexEntries,
) {
    let Some(components) = def
        .components
        .iter()
        .map(|c| Some((reg.by_url(&c.definition)?.kind, c.expression.as_ref().ok()?)))
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let param = def.code.as_str();
    'elements: for (group, node) in (0u32..).zip(nodes) {
        let mut values = Vec::with_capacity(components.len());
        for (kind, expr) in &components {
            let mut e = IndexEntries::default();
            for v in expr.evaluate_from(content, std::slice::from_ref(node)) {
                push_value(*kind, param, &v, &mut e);
            }
            let vs = ComponentValue::all(e);
            if vs.is_empty() {
                continue 'elements;
            }
            values.push(vs);
        }
        for (component, vs) in (0u32..).zip(values) {
            out.composites
                .extend(vs.into_iter().map(|value| CompositeEntry {
                    param,
                    group,
                    component,
                    value,
                }));
        }
    }
}

fn str_field<'v>(v: &'v Value, k: &str) -> &'v str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn tokens(param: &'static str, node: &Node<'_>, out: &mut Vec<TokenEntry>) {
    let mut push = |system: &str, code: &str| {
        if !code.is_empty() {
            out.push(TokenEntry {
                param,
                system: system.to_owned(),
                code: code.to_owned(),
            });
        }
    };
    match &*node.value {
        Value::String(code) => push("", code),
        Value::Bool(b) => push("", if *b { "true" } else { "false" }),
        Value::Object(o) => {
            if let Some(codings) = o.get("coding").and_then(Value::as_array) {
                // CodeableConcept
                for c in codings {
                    push(str_field(c, "system"), str_field(c, "code"));
                }
            } else if o.contains_key("code") {
                // Coding
                push(
                    str_field(&node.value, "system"),
                    str_field(&node.value, "code"),
                );
            } else if let Some(value) = o.get("value").and_then(Value::as_str) {
                // An Identifier is searched as system|value, and so is a ContactPoint, whose
                // system is one of seven codes (`phone|555-2003`, `email|a@b.org`), as the
                // servers clients compare us with (HAPI, Helios) index it. A bare value still
                // matches whatever the system.
                push(str_field(&node.value, "system"), value);
            }
        }
        _ => {}
    }
}

/// Rows for token modifiers: `:text` (CodeableConcept.text and Coding.display, as strings) and
/// `:of-type` (Identifier.type coding with the value, as `system` | `code|value`).
fn token_extras(def: &'static SearchParamDef, node: &Node<'_>, out: &mut IndexEntries) {
    let v = &*node.value;
    let mut text = |s: &str| {
        if !s.trim().is_empty() {
            out.strings.push(StringEntry {
                param: def.text_param.as_str(),
                folded: fold(s),
                exact: s.to_owned(),
            });
        }
    };
    if let Some(t) = v.get("text").and_then(Value::as_str) {
        text(t);
    }
    if let Some(d) = v.get("display").and_then(Value::as_str) {
        text(d);
    }
    for c in v
        .get("coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(d) = c.get("display").and_then(Value::as_str) {
            text(d);
        }
    }
    if let (Some(ty), Some(value)) = (v.get("type"), v.get("value").and_then(Value::as_str)) {
        for c in ty
            .get("coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.tokens.push(TokenEntry {
                param: def.of_type_param.as_str(),
                system: str_field(c, "system").to_owned(),
                code: format!("{}|{value}", str_field(c, "code")),
            });
        }
    }
}

/// Folds a string for FHIR's default string match: case- and accent-insensitive, whitespace
/// collapsed.
pub fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.nfd().filter(|c| !('\u{300}'..='\u{36f}').contains(c)) {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn strings(param: &'static str, node: &Node<'_>, out: &mut Vec<StringEntry>) {
    let mut push = |s: &str| {
        if !s.trim().is_empty() {
            out.push(StringEntry {
                param,
                folded: fold(s),
                exact: s.to_owned(),
            });
        }
    };
    match &*node.value {
        Value::String(s) => push(s),
        Value::Object(o) => {
            // HumanName, Address and similar: every string part, and each list item.
            for key in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                match o.get(key) {
                    Some(Value::String(s)) => push(s),
                    Some(Value::Array(items)) => {
                        items.iter().filter_map(Value::as_str).for_each(&mut push)
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn date_range(node: &Node<'_>) -> Option<DateRange> {
    match &*node.value {
        Value::String(s) => parse_fhir_date(s),
        Value::Object(o) if o.contains_key("start") || o.contains_key("end") => {
            // Period: an open end extends to the end of time.
            let low = o
                .get("start")
                .and_then(Value::as_str)
                .and_then(parse_fhir_date)
                .map_or(i64::MIN, |r| r.low);
            let high = o
                .get("end")
                .and_then(Value::as_str)
                .and_then(parse_fhir_date)
                .map_or(i64::MAX, |r| r.high);
            Some(DateRange { low, high })
        }
        Value::Object(o) => {
            // Timing: the span of its events, else of its repeat bounds.
            let events: Vec<DateRange> = o
                .get("event")
                .and_then(Value::as_array)
                .map(|es| {
                    es.iter()
                        .filter_map(Value::as_str)
                        .filter_map(parse_fhir_date)
                        .collect()
                })
                .unwrap_or_default();
            if !events.is_empty() {
                return Some(DateRange {
                    low: events.iter().map(|r| r.low).min()?,
                    high: events.iter().map(|r| r.high).max()?,
                });
            }
            let bounds = o.get("repeat")?.get("boundsPeriod")?;
            date_range(&Node {
                value: std::borrow::Cow::Borrowed(bounds),
                type_name: Some("Period".into()),
            })
        }
        _ => None,
    }
}

/// A number with its implicit precision range: half a unit in its last written decimal place.
/// serde_json keeps numbers as f64, so trailing zeros are gone by now (`70.50` reads as `70.5`);
/// the range is then that of the shortest form, which is wider, never narrower.
fn number(v: &Value) -> Option<(f64, f64, f64)> {
    let Value::Number(n) = v else {
        return None;
    };
    let text = n.to_string();
    let value = n.as_f64()?;
    let decimals = match text.split_once('.') {
        Some((_, frac)) => frac.trim_end_matches(|c: char| !c.is_ascii_digit()).len(),
        None => 0,
    };
    let exponent = text
        .split_once(['e', 'E'])
        .and_then(|(_, e)| e.parse::<i32>().ok())
        .unwrap_or(0);
    let half = 0.5 * 10f64.powi(exponent - i32::try_from(decimals).unwrap_or(0));
    let (low, high) = (value - half, value + half);
    // Bounds that overflow cannot be stored or compared; such a value is not indexed.
    (low.is_finite() && high.is_finite()).then_some((value, low, high))
}

fn quantities(param: &'static str, v: &Value, out: &mut Vec<QuantityEntry>) {
    if let Some(o) = v.as_object() {
        if o.contains_key("low") || o.contains_key("high") {
            // Range: index its bounds.
            for bound in ["low", "high"] {
                if let Some(b) = o.get(bound) {
                    quantities(param, b, out);
                }
            }
            return;
        }
        if let Some((value, low, high)) = o.get("value").and_then(number) {
            // Money carries its currency as the code.
            let code = o
                .get("code")
                .or_else(|| o.get("currency"))
                .and_then(Value::as_str)
                .unwrap_or("");
            out.push(QuantityEntry {
                param,
                value,
                low,
                high,
                system: str_field(v, "system").to_owned(),
                code: code.to_owned(),
                unit: str_field(v, "unit").to_owned(),
            });
        }
    }
}

fn reference(param: &'static str, v: &Value) -> Option<ReferenceEntry> {
    let (raw, type_hint) = match v {
        // canonical and uri elements searched as references
        Value::String(s) => (s.as_str(), None),
        Value::Object(_) => (v.get("reference")?.as_str()?, reference_type(v)),
        _ => return None,
    };
    let (url, version) = match raw.split_once('|') {
        Some((u, ver)) => (u, ver),
        None => match raw.split_once("/_history/") {
            Some((u, ver)) => (u, ver),
            None => (raw, ""),
        },
    };
    let mut segs = url.rsplit('/');
    let last = segs.next().unwrap_or("");
    let before = segs.next().unwrap_or("");
    let literal = before.starts_with(|c: char| c.is_ascii_uppercase())
        && ResourceType::new(before).is_ok()
        && crate::model::is_valid_id(last);
    let (target_type, target_id) = if literal {
        (type_hint.unwrap_or(before), last)
    } else {
        ("", "")
    };
    Some(ReferenceEntry {
        param,
        target_type: target_type.to_owned(),
        target_id: target_id.to_owned(),
        url: url.to_owned(),
        version: version.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn has_token(e: &IndexEntries, param: &str, system: &str, code: &str) -> bool {
        e.tokens
            .iter()
            .any(|t| t.param == param && t.system == system && t.code == code)
    }

    /// Each entry kind as comparable text under a given row name, for set comparisons.
    fn rows_named(e: &IndexEntries, name: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let keep = |p: &str| p == name;
        out.extend(
            e.tokens
                .iter()
                .filter(|x| keep(x.param))
                .map(|x| format!("t {}|{}", x.system, x.code)),
        );
        out.extend(
            e.strings
                .iter()
                .filter(|x| keep(x.param))
                .map(|x| format!("s {}|{}", x.folded, x.exact)),
        );
        out.extend(
            e.numbers
                .iter()
                .chain(&e.quantities)
                .filter(|x| keep(x.param))
                .map(|x| format!("q {x:?}").replace(&format!("{:?}", x.param), "")),
        );
        out.extend(
            e.uris
                .iter()
                .filter(|x| keep(x.param))
                .map(|x| format!("u {}", x.uri)),
        );
        // Composites: each element's components, whatever its group number.
        let mut groups: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        for c in e.composites.iter().filter(|x| keep(x.param)) {
            let v = format!("{} {:?}", c.component, c.value).replace(&format!("{:?}", c.param), "");
            groups.entry(c.group).or_default().push(v);
        }
        out.extend(groups.into_values().map(|mut g| {
            g.sort();
            format!("c {g:?}")
        }));
        out
    }

    #[test]
    fn shared_rows_are_the_union_of_their_parts() {
        let shared = SharedRows::r4();
        assert_eq!(
            shared.parts("Observation", "combo-code"),
            Some(&["code", "component-code"][..])
        );
        assert_eq!(
            shared.parts("Observation", "combo-code:text"),
            Some(&["code:text", "component-code:text"][..])
        );
        assert_eq!(
            shared.parts("Observation", "combo-code-value-quantity"),
            Some(&["code-value-quantity", "component-code-value-quantity"][..])
        );
        assert_eq!(shared.parts("Observation", "code"), None);
        assert_eq!(shared.parts("Condition", "combo-code"), None);
        assert_eq!(shared.types_sharing("combo-code"), vec!["Observation"]);
        let reg = Registry::r4();
        for (t, name, _) in shared.all() {
            let rt = ResourceType::new(t).expect("type");
            let code = name.split(':').next().unwrap_or(name);
            let def = reg
                .get(rt, code)
                .expect("shared rows belong to a parameter");
            assert!(
                !matches!(def.kind, SearchParamType::Date | SearchParamType::Reference),
                "{t} {name}"
            );
        }
        let quantity = |code: &str, v: f64| {
            json!({"code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": format!("{code} text")},
                   "valueQuantity": {"value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}})
        };
        let docs = [
            json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "BP"},
                "component": [quantity("8480-6", 120.0), quantity("8462-4", 80.0),
                    {"code": {"coding": [{"code": "x"}]}, "dataAbsentReason": {"coding": [{"code": "unknown"}]}},
                    {"code": {"coding": [{"code": "y"}]}, "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "10828004"}]}}]}),
            json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}, {"code": "weight"}]},
                "valueQuantity": {"value": 70, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}),
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "only text"},
                "valueCodeableConcept": {"coding": [{"code": "pos"}]}, "dataAbsentReason": {"text": "n/a"}}),
            json!({"resourceType": "Patient", "name": [{"family": "Chalmers", "given": ["Peter"]}, {"text": "Jim Élan"}]}),
        ];
        let mut compared = 0;
        for doc in &docs {
            let e = extract(doc);
            let t = doc["resourceType"].as_str().expect("type");
            for (st, name, parts) in shared.all() {
                if st != t {
                    continue;
                }
                let union: std::collections::BTreeSet<String> =
                    parts.iter().flat_map(|p| rows_named(&e, p)).collect();
                assert_eq!(rows_named(&e, name), union, "{t} {name} = {parts:?}");
                compared += usize::from(!union.is_empty());
            }
            let own = extract_own(Registry::r4(), doc);
            for (st, name, parts) in shared.all() {
                if st == t {
                    assert!(rows_named(&own, name).is_empty(), "{name} kept");
                    for p in parts {
                        assert_eq!(rows_named(&own, p), rows_named(&e, p), "{p} lost");
                    }
                }
            }
        }
        // The documents exercise the combo parameters, not only empty sets.
        assert!(compared >= 10, "{compared}");
    }

    #[test]
    fn patient_values_by_type() {
        let p = json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
            "birthDate": "1974-12-25",
            "identifier": [{"system": "urn:mrn", "value": "12345"}, {"value": "x"}],
            "name": [{"family": "Chalmers", "given": ["Peter", "James"]}, {"text": "Jim Élan"}],
            "telecom": [{"system": "phone", "value": "(03) 5555 6473"}, {"system": "email", "value": "p@x.org"}],
            "address": [{"line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999"}],
            "generalPractitioner": [{"reference": "Practitioner/gp1"}],
            "managingOrganization": {"reference": "http://other.org/fhir/Organization/1/_history/2"}});
        let e = extract(&p);
        assert!(has_token(&e, "identifier", "urn:mrn", "12345"));
        assert!(has_token(&e, "identifier", "", "x"));
        assert!(has_token(&e, "gender", "", "female"));
        assert!(has_token(&e, "active", "", "true"));
        assert!(has_token(&e, "email", "email", "p@x.org"));
        assert!(has_token(&e, "phone", "phone", "(03) 5555 6473"));
        assert!(has_token(&e, "telecom", "email", "p@x.org"));
        assert!(
            !e.tokens.iter().any(|t| t.param == "_id"),
            "_id is answered natively"
        );
        let folded: Vec<(&str, &str)> = e
            .strings
            .iter()
            .map(|s| (s.param, s.folded.as_str()))
            .collect();
        assert!(folded.contains(&("family", "chalmers")));
        assert!(folded.contains(&("given", "james")));
        assert!(
            folded.contains(&("name", "jim elan")),
            "accents and case folded: {folded:?}"
        );
        assert!(folded.contains(&("address-city", "pleasantville")));
        assert!(folded.contains(&("address", "534 erewhon st")));
        let birth = e
            .dates
            .iter()
            .find(|d| d.param == "birthdate")
            .expect("birthdate");
        assert_eq!(
            birth.high - birth.low,
            86_400_000_000,
            "a date is a whole day"
        );
        let gp = e
            .references
            .iter()
            .find(|r| r.param == "general-practitioner")
            .expect("gp");
        assert_eq!(
            (gp.target_type.as_str(), gp.target_id.as_str()),
            ("Practitioner", "gp1")
        );
        let org = e
            .references
            .iter()
            .find(|r| r.param == "organization")
            .expect("org");
        assert_eq!(
            (
                org.target_type.as_str(),
                org.target_id.as_str(),
                org.version.as_str()
            ),
            ("Organization", "1", "2")
        );
    }

    #[test]
    fn observation_values_by_type() {
        let o = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"}], "text": "weight"},
            "subject": {"reference": "Patient/p1"},
            "effectivePeriod": {"start": "2020-01-01T10:00:00Z"},
            "valueQuantity": {"value": 70.50, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}});
        let e = extract(&o);
        assert!(has_token(&e, "code", "http://loinc.org", "29463-7"));
        assert!(has_token(&e, "status", "", "final"));
        let q = e
            .quantities
            .iter()
            .find(|q| q.param == "value-quantity")
            .expect("quantity");
        assert_eq!(
            (q.code.as_str(), q.system.as_str()),
            ("kg", "http://unitsofmeasure.org")
        );
        assert!(
            (q.low - 70.45).abs() < 1e-9 && (q.high - 70.55).abs() < 1e-9,
            "{q:?}"
        );
        let d = e.dates.iter().find(|d| d.param == "date").expect("date");
        assert_eq!(d.high, i64::MAX, "an open period runs to the end of time");
        for param in ["subject", "patient"] {
            assert!(
                e.references
                    .iter()
                    .any(|r| r.param == param && r.target_id == "p1"),
                "{param}"
            );
        }
    }

    #[test]
    fn composite_values_stay_with_their_element() {
        let o = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
             "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
             "valueQuantity": {"value": 80, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
        ]});
        let e = extract(&o);
        let of = |param: &str| -> Vec<(u32, u32, String)> {
            e.composites
                .iter()
                .filter(|c| c.param == param)
                .map(|c| {
                    let v = match &c.value {
                        ComponentValue::Token(t) => t.code.clone(),
                        ComponentValue::Quantity(q) => q.value.to_string(),
                        other => format!("{other:?}"),
                    };
                    (c.group, c.component, v)
                })
                .collect()
        };
        let groups = of("component-code-value-quantity");
        assert_eq!(groups.len(), 4, "{groups:?}");
        let group_of = |code: &str| groups.iter().find(|g| g.2 == code).map(|g| g.0);
        let systolic = group_of("8480-6").expect("systolic code");
        assert!(groups.contains(&(systolic, 1, "120".into())), "{groups:?}");
        assert_ne!(group_of("8462-4"), Some(systolic));
        // The panel itself has no value, so it has no code-value-quantity entry.
        assert!(of("code-value-quantity").is_empty());
        // combo- covers the components (the panel again has no value).
        assert_eq!(of("combo-code-value-quantity").len(), 4);
    }

    #[test]
    fn canonical_references_keep_their_version() {
        let q = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
            "questionnaire": "http://example.org/Questionnaire/q|2.0"});
        let e = extract(&q);
        let r = e
            .references
            .iter()
            .find(|r| r.param == "questionnaire")
            .expect("canonical");
        assert_eq!(
            (r.url.as_str(), r.version.as_str()),
            ("http://example.org/Questionnaire/q", "2.0")
        );
    }

    #[test]
    fn numbers_carry_implicit_precision() {
        assert_eq!(number(&json!(100)), Some((100.0, 99.5, 100.5)));
        let (v, lo, hi) = number(&json!(1.50)).expect("number");
        assert!((v - 1.5).abs() < 1e-12 && (lo - 1.45).abs() < 1e-12 && (hi - 1.55).abs() < 1e-12);
        assert_eq!(number(&json!("7")), None);
    }

    #[test]
    fn folding_is_case_accent_and_space_insensitive() {
        assert_eq!(fold("  Ëve   MÜLLER "), "eve muller");
        assert_eq!(fold("García"), "garcia");
        assert_eq!(fold(""), "");
    }

    #[test]
    fn unknown_or_tombstone_bodies_have_no_entries() {
        assert_eq!(extract(&Value::Null), IndexEntries::default());
        assert_eq!(
            extract(&json!({"resourceType": "Nope"})),
            IndexEntries::default()
        );
    }
}
