//! The FHIR R4 search parameter registry, loaded from the official definitions.
//!
//! `fhir-profiles/hl7.fhir.r4.examples-4.0.1/Bundle-searchParams.json` (1,375 SearchParameter
//! resources, unmodified) is embedded at compile time and parsed once, on first use. Each
//! parameter's FHIRPath expression is compiled then, so evaluation per resource is a tree walk.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use serde_json::Value;

use crate::fhirpath::{self, Expr};
use crate::model::ResourceType;

const R4_SEARCH_PARAMETERS: &str =
    include_str!("../../../fhir-profiles/hl7.fhir.r4.examples-4.0.1/Bundle-searchParams.json");

/// `SearchParameter.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SearchParamType {
    /// A number.
    Number,
    /// A date, dateTime, instant, Period or Timing.
    Date,
    /// A string, HumanName or Address.
    String,
    /// A code, Coding, CodeableConcept, Identifier, ContactPoint or boolean.
    Token,
    /// A Reference or canonical.
    Reference,
    /// A combination of other parameters.
    Composite,
    /// A Quantity (or Money, Range, Age…).
    Quantity,
    /// A uri, url or canonical.
    Uri,
    /// Search with special rules (`near`, `_text`…).
    Special,
}

impl SearchParamType {
    /// The R4 code (`SearchParameter.type`), as a CapabilityStatement writes it.
    pub fn code(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Date => "date",
            Self::String => "string",
            Self::Token => "token",
            Self::Reference => "reference",
            Self::Composite => "composite",
            Self::Quantity => "quantity",
            Self::Uri => "uri",
            Self::Special => "special",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "number" => Self::Number,
            "date" => Self::Date,
            "string" => Self::String,
            "token" => Self::Token,
            "reference" => Self::Reference,
            "composite" => Self::Composite,
            "quantity" => Self::Quantity,
            "uri" => Self::Uri,
            "special" => Self::Special,
            _ => return None,
        })
    }
}

/// One component of a composite parameter.
#[derive(Clone, Debug)]
pub struct Component {
    /// The canonical URL of the component's own parameter.
    pub definition: String,
    /// Its expression as written.
    pub expression_text: String,
    /// Its expression, relative to the composite's value.
    pub expression: Result<Expr, fhirpath::ParseError>,
}

/// One search parameter definition.
#[derive(Clone, Debug)]
pub struct SearchParamDef {
    /// Canonical URL.
    pub url: String,
    /// The name used in queries.
    pub code: String,
    /// Resource types it applies to (`Resource` and `DomainResource` mean all).
    pub base: Vec<String>,
    /// Its type.
    pub kind: SearchParamType,
    /// The FHIRPath expression as written.
    pub expression_text: Option<String>,
    /// The compiled expression; an error names what the evaluator does not support.
    pub expression: Option<Result<Expr, fhirpath::ParseError>>,
    /// For references: the types it may point to.
    pub targets: Vec<String>,
    /// For composites: the components.
    pub components: Vec<Component>,
    /// Index rows answering `:text` (tokens), `:of-type` (identifiers) and `:identifier`
    /// (references) live under these derived names, so no extra tables are needed.
    pub text_param: String,
    /// See `text_param`.
    pub of_type_param: String,
    /// See `text_param`.
    pub identifier_param: String,
}

impl SearchParamDef {
    /// Whether values can be extracted for this parameter: it has an expression and every part
    /// of it compiled.
    pub fn is_indexable(&self) -> bool {
        matches!(self.expression, Some(Ok(_)))
            && self.components.iter().all(|c| c.expression.is_ok())
    }
}

/// Search parameters by resource type and code.
///
/// Definitions are `'static`: index entries name their parameter by `&'static str`, so that
/// millions of entries share one copy of each name. The R4 definitions live for the process;
/// a tenant's own definitions are interned (see [`intern`]), once per distinct definition.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    params: Vec<&'static SearchParamDef>,
    by_type: HashMap<String, HashMap<String, &'static SearchParamDef>>,
    by_url: HashMap<String, &'static SearchParamDef>,
}

impl Registry {
    /// The official R4 registry, parsed on first use.
    pub fn r4() -> &'static Registry {
        Self::r4_shared().as_ref()
    }

    /// The official R4 registry behind an `Arc`, for APIs that hand out a tenant's registry.
    pub fn r4_shared() -> &'static Arc<Registry> {
        static R4: OnceLock<Arc<Registry>> = OnceLock::new();
        R4.get_or_init(|| {
            // The embedded file is checked by the tests; a failure here is a build defect.
            serde_json::from_str::<Value>(R4_SEARCH_PARAMETERS)
                .map_err(|e| e.to_string())
                .and_then(|v| Registry::from_bundle(&v))
                .map(Arc::new)
                .unwrap_or_else(|e| panic!("embedded R4 search parameters are invalid: {e}"))
        })
    }

    /// Builds a registry from a Bundle of SearchParameter resources.
    pub fn from_bundle(bundle: &Value) -> Result<Registry, String> {
        let mut reg = Registry::default();
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .ok_or("not a Bundle with entries")?;
        for e in entries {
            let Some(r) = e.get("resource") else { continue };
            if r.get("resourceType").and_then(Value::as_str) != Some("SearchParameter") {
                continue;
            }
            reg.add(parse_def(r)?);
        }
        Ok(reg)
    }

    /// Adds (or replaces) a definition for every type in its base.
    pub fn add(&mut self, def: SearchParamDef) {
        self.insert(intern(def));
    }

    /// Adds (or replaces) an interned definition for every type in its base.
    pub fn insert(&mut self, def: &'static SearchParamDef) {
        for b in &def.base {
            self.by_type
                .entry(b.clone())
                .or_default()
                .insert(def.code.clone(), def);
        }
        self.by_url.insert(def.url.clone(), def);
        self.params.push(def);
    }

    /// This registry plus `defs`.
    pub fn with(&self, defs: impl IntoIterator<Item = &'static SearchParamDef>) -> Registry {
        let mut reg = self.clone();
        for d in defs {
            reg.insert(d);
        }
        reg
    }

    /// The parameter `code` on `resource_type`, including those every resource has.
    pub fn get(&self, resource_type: ResourceType, code: &str) -> Option<&'static SearchParamDef> {
        [resource_type.as_str(), "DomainResource", "Resource"]
            .iter()
            .find_map(|t| self.by_type.get(*t)?.get(code).copied())
    }

    /// A parameter every resource type has (`_id`, `_lastUpdated`, `_tag`…).
    pub fn get_common(&self, code: &str) -> Option<&'static SearchParamDef> {
        ["Resource", "DomainResource"]
            .iter()
            .find_map(|t| self.by_type.get(*t)?.get(code).copied())
    }

    /// A parameter by canonical URL (how composites name their components).
    pub fn by_url(&self, url: &str) -> Option<&'static SearchParamDef> {
        self.by_url.get(url).copied()
    }

    /// Every parameter that applies to `resource_type`.
    pub fn for_type(&self, resource_type: ResourceType) -> Vec<&'static SearchParamDef> {
        [resource_type.as_str(), "DomainResource", "Resource"]
            .iter()
            .filter_map(|t| self.by_type.get(*t))
            .flat_map(|m| m.values().copied())
            .collect()
    }

    /// Every definition, in the order added.
    pub fn all(&self) -> impl Iterator<Item = &'static SearchParamDef> + '_ {
        self.params.iter().copied()
    }
}

/// Index rows one parameter shares with others: on a resource type, a parameter whose rows are
/// exactly the union of other parameters' rows needs none of its own. R4's Observation
/// `combo-*` parameters are the case that matters: `combo-code` is `code | component-code`, and
/// `combo-code-value-quantity` pairs each element's code and value as `code-value-quantity`
/// and `component-code-value-quantity` do together. Storing them again took a fifth of the
/// index rows of an Observation-heavy store; a store writes the parts' rows only and searches
/// the parts for the union.
///
/// Derived from the R4 definitions alone (a tenant's own parameter cannot reuse an R4 code
/// on the same type, so no tenant changes what is shared): a parameter `p` of type `t` shares
/// when the union terms of its expression that apply to `t` are exactly the terms of other
/// parameters of the same kind on `t` (each a proper subset of `p`'s, or the same terms under
/// a code that sorts first), composites needing the same component expressions and kinds.
/// Dates and references never share: their rows drive date ranges, includes and chains,
/// which read one parameter at a time. No part is itself shared.
#[derive(Debug, Default)]
pub struct SharedRows {
    /// By resource type, then by row name (a code, or a derived name such as `combo-code:text`):
    /// the row names holding the rows instead.
    by_type: HashMap<String, HashMap<String, Vec<&'static str>>>,
}

impl SharedRows {
    /// The shared rows of the R4 parameters, derived on first use.
    pub fn r4() -> &'static SharedRows {
        static SHARED: OnceLock<SharedRows> = OnceLock::new();
        SHARED.get_or_init(|| SharedRows::derive(Registry::r4()))
    }

    /// For the rows named `name` on `rt`: the row names that hold them instead, when shared.
    pub fn parts(&self, rt: &str, name: &str) -> Option<&[&'static str]> {
        self.by_type.get(rt)?.get(name).map(Vec::as_slice)
    }

    /// Whether any rows are shared on `rt`.
    pub fn shares_on(&self, rt: &str) -> bool {
        self.by_type.contains_key(rt)
    }

    /// Whether rows named `name` are shared on `rt`, so a store writes none.
    pub fn is_shared(&self, rt: &str, name: &str) -> bool {
        self.parts(rt, name).is_some()
    }

    /// Every shared row name: `(resource type, row name, parts)`, sorted.
    pub fn all(&self) -> Vec<(&str, &str, &[&'static str])> {
        let mut out: Vec<_> = self
            .by_type
            .iter()
            .flat_map(|(t, m)| {
                m.iter()
                    .map(move |(n, p)| (t.as_str(), n.as_str(), p.as_slice()))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The resource types on which rows named `name` are shared, sorted.
    pub fn types_sharing(&self, name: &str) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .by_type
            .iter()
            .filter(|(_, m)| m.contains_key(name))
            .map(|(t, _)| t.as_str())
            .collect();
        out.sort_unstable();
        out
    }

    fn derive(reg: &Registry) -> SharedRows {
        let mut types: Vec<&str> = reg
            .by_type
            .keys()
            .map(String::as_str)
            .filter(|t| ResourceType::new(t).is_ok())
            .collect();
        types.sort_unstable();
        let mut out = SharedRows::default();
        for t in types {
            let Ok(rt) = ResourceType::new(t) else {
                continue;
            };
            let defs: Vec<(&'static SearchParamDef, std::collections::BTreeSet<String>)> = reg
                .for_type(rt)
                .into_iter()
                .filter(|d| {
                    !matches!(
                        d.kind,
                        SearchParamType::Date
                            | SearchParamType::Reference
                            | SearchParamType::Special
                    ) && d.is_indexable()
                })
                .filter_map(|d| Some((d, terms_on(d.expression_text.as_deref()?, t)?)))
                .filter(|(_, terms)| !terms.is_empty())
                .collect();
            let mut shared: HashMap<&'static str, Vec<&'static SearchParamDef>> = HashMap::new();
            for (p, p_terms) in &defs {
                let parts: Vec<_> = defs
                    .iter()
                    .filter(|(q, q_terms)| {
                        q.code != p.code
                            && q.kind == p.kind
                            && q_terms.is_subset(p_terms)
                            && (q_terms != p_terms || q.code < p.code)
                            && same_components(reg, p, q)
                    })
                    .collect();
                let union: std::collections::BTreeSet<&String> = parts
                    .iter()
                    .flat_map(|(_, q_terms)| q_terms.iter())
                    .collect();
                if !parts.is_empty() && union.len() == p_terms.len() {
                    let mut parts: Vec<_> = parts.into_iter().map(|(q, _)| *q).collect();
                    parts.sort_unstable_by(|a, b| a.code.cmp(&b.code));
                    shared.insert(p.code.as_str(), parts);
                }
            }
            // A part that is itself shared has no rows to read; its union keeps its own.
            let names: Vec<&str> = shared.keys().copied().collect();
            shared.retain(|_, parts| parts.iter().all(|q| !names.contains(&q.code.as_str())));
            let mut rows = HashMap::new();
            for (code, parts) in shared {
                let Some(p) = reg.get(rt, code) else { continue };
                let names = |f: fn(&'static SearchParamDef) -> &'static str| {
                    parts.iter().map(|q| f(q)).collect::<Vec<_>>()
                };
                rows.insert(p.code.clone(), names(|d| d.code.as_str()));
                if p.kind == SearchParamType::Token {
                    rows.insert(p.text_param.clone(), names(|d| d.text_param.as_str()));
                    rows.insert(p.of_type_param.clone(), names(|d| d.of_type_param.as_str()));
                }
            }
            if !rows.is_empty() {
                out.by_type.insert(t.to_owned(), rows);
            }
        }
        out
    }
}

/// Whether two composites have the same components (expressions and kinds, in order), so
/// their rows for the same element are the same; true for non-composites.
fn same_components(reg: &Registry, p: &SearchParamDef, q: &SearchParamDef) -> bool {
    p.components.len() == q.components.len()
        && p.components.iter().zip(&q.components).all(|(a, b)| {
            a.expression_text == b.expression_text
                && matches!(
                    (reg.by_url(&a.definition), reg.by_url(&b.definition)),
                    (Some(x), Some(y)) if x.kind == y.kind
                )
        })
}

/// The top-level union terms of `expression` that start at resource type `rt` (outer
/// parentheses removed). `None` when a term starts anywhere else than at a type name, so
/// nothing is concluded about an expression this reading does not cover.
fn terms_on(expression: &str, rt: &str) -> Option<std::collections::BTreeSet<String>> {
    let mut terms = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    for (i, c) in expression.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            '|' if !quoted && depth == 0 => {
                terms.push(&expression[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&expression[start..]);
    let mut out = std::collections::BTreeSet::new();
    for term in terms {
        let mut term = term.trim();
        while let Some(inner) = term.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
            if !balanced(inner) {
                break;
            }
            term = inner.trim();
        }
        let head: String = term
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if ResourceType::new(&head).is_err() && head != "Resource" && head != "DomainResource" {
            return None;
        }
        if head == rt {
            out.insert(term.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    Some(out)
}

/// Whether every `(` in `s` closes within it, so `(s)` was one parenthesised term.
fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

/// The one `'static` copy of a definition. Equal definitions share a copy, so reloading a
/// tenant's parameters never grows memory; only a new or changed definition adds one.
pub fn intern(def: SearchParamDef) -> &'static SearchParamDef {
    static INTERNED: OnceLock<Mutex<HashMap<String, &'static SearchParamDef>>> = OnceLock::new();
    let key = format!(
        "{}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}",
        def.url,
        def.code,
        def.base,
        def.kind,
        def.expression_text,
        def.targets,
        def.components
            .iter()
            .map(|c| (&c.definition, &c.expression_text))
            .collect::<Vec<_>>()
    );
    let mut map = INTERNED.get_or_init(Mutex::default).lock();
    map.entry(key).or_insert_with(|| Box::leak(Box::new(def)))
}

/// Why a SearchParameter resource cannot be registered as a tenant's own parameter.
pub type CustomParamError = String;

/// Checks a SearchParameter resource as a tenant's own parameter, against `reg` (the R4
/// parameters plus the tenant's others). It must name a code that is not already a parameter
/// of any of its base types, and have an expression this evaluator compiles; `special`
/// parameters have no index and cannot be added.
pub fn parse_custom(resource: &Value, reg: &Registry) -> Result<SearchParamDef, CustomParamError> {
    let def = parse_def(resource)?;
    let url = &def.url;
    let code_ok = def
        .code
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && def
            .code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !code_ok {
        return Err(format!(
            "{url}: code {:?} must start with a letter and hold only letters, digits, '-' and '_'",
            def.code
        ));
    }
    if def.base.is_empty() {
        return Err(format!("{url}: no base resource type"));
    }
    let everywhere = def
        .base
        .iter()
        .any(|b| b == "Resource" || b == "DomainResource");
    for b in &def.base {
        if b != "Resource" && b != "DomainResource" && ResourceType::new(b).is_err() {
            return Err(format!("{url}: base {b:?} is not an R4 resource type"));
        }
    }
    let clash = reg.all().find(|d| {
        d.url != def.url
            && d.code == def.code
            && (everywhere
                || d.base
                    .iter()
                    .any(|b| b == "Resource" || b == "DomainResource" || def.base.contains(b)))
    });
    if let Some(other) = clash {
        return Err(format!(
            "{url}: code {:?} is already defined for {} by {}",
            def.code,
            other.base.join(", "),
            other.url
        ));
    }
    match (&def.kind, &def.expression) {
        (SearchParamType::Special, _) => {
            return Err(format!("{url}: special parameters cannot be indexed"))
        }
        (_, None) => return Err(format!("{url}: no expression")),
        (_, Some(Err(e))) => return Err(format!("{url}: expression: {e}")),
        (_, Some(Ok(_))) => {}
    }
    for c in &def.components {
        if let Err(e) = &c.expression {
            return Err(format!("{url}: component {}: {e}", c.definition));
        }
        match reg.by_url(&c.definition) {
            Some(d)
                if !matches!(
                    d.kind,
                    SearchParamType::Composite | SearchParamType::Special
                ) => {}
            _ => {
                return Err(format!(
                    "{url}: component {:?} is not a known non-composite parameter",
                    c.definition
                ))
            }
        }
    }
    if def.kind == SearchParamType::Composite && def.components.len() < 2 {
        return Err(format!("{url}: a composite needs at least two components"));
    }
    if def.kind == SearchParamType::Reference {
        if let Some(t) = def.targets.iter().find(|t| ResourceType::new(t).is_err()) {
            return Err(format!("{url}: target {t:?} is not an R4 resource type"));
        }
    }
    Ok(def)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a SearchParameter resource as a definition, without the checks [`parse_custom`]
/// makes. An expression that does not compile is kept as an error in the definition.
pub fn parse_def(r: &Value) -> Result<SearchParamDef, String> {
    let field = |k: &str| r.get(k).and_then(Value::as_str);
    let url = field("url")
        .ok_or("SearchParameter without url")?
        .to_owned();
    let code = field("code")
        .ok_or_else(|| format!("{url}: no code"))?
        .to_owned();
    let kind = field("type")
        .and_then(SearchParamType::parse)
        .ok_or_else(|| format!("{url}: missing or unknown type"))?;
    let expression_text = field("expression").map(str::to_owned);
    let components = r
        .get("component")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let text = c
                        .get("expression")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    Component {
                        definition: c
                            .get("definition")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        expression: fhirpath::parse(text),
                        expression_text: text.to_owned(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(SearchParamDef {
        text_param: format!("{code}:text"),
        of_type_param: format!("{code}:of-type"),
        identifier_param: format!("{code}:identifier"),
        expression: expression_text.as_deref().map(fhirpath::parse),
        url,
        code,
        base: strings(r.get("base")),
        kind,
        expression_text,
        targets: strings(r.get("target")),
        components,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rt(n: &str) -> ResourceType {
        ResourceType::new(n).expect("known type")
    }

    #[test]
    fn every_r4_parameter_with_an_expression_compiles() {
        let reg = Registry::r4();
        assert_eq!(reg.all().count(), 1375);
        let failures: Vec<String> = reg
            .all()
            .filter(|d| d.expression.is_some() && !d.is_indexable())
            .map(|d| format!("{}: {:?}", d.url, d.expression_text))
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
        let mut without: Vec<&str> = reg
            .all()
            .filter(|d| d.expression.is_none())
            .map(|d| d.code.as_str())
            .collect();
        without.sort_unstable();
        // Full text (`_text`, `_content`) and named queries (`_query`) are not paths.
        assert_eq!(without, vec!["_content", "_query", "_text"]);
    }

    #[test]
    fn lookups_include_the_common_parameters() {
        let reg = Registry::r4();
        let fam = reg.get(rt("Patient"), "family").expect("Patient.family");
        assert_eq!(fam.kind, SearchParamType::String);
        assert_eq!(
            reg.get(rt("Observation"), "_lastUpdated").map(|d| d.kind),
            Some(SearchParamType::Date)
        );
        assert_eq!(
            reg.get(rt("Patient"), "_id").map(|d| d.kind),
            Some(SearchParamType::Token)
        );
        assert!(reg.get(rt("Patient"), "no-such-param").is_none());
        let subject = reg
            .get(rt("Observation"), "subject")
            .expect("Observation.subject");
        assert!(subject.targets.contains(&"Patient".to_string()));
        let combo = reg
            .get(rt("Observation"), "code-value-quantity")
            .expect("a composite");
        assert_eq!(combo.components.len(), 2);
        assert!(reg.by_url(&combo.components[0].definition).is_some());
        assert!(reg.for_type(rt("Patient")).len() > 20);
    }

    #[test]
    fn official_expressions_extract_from_resources() {
        let reg = Registry::r4();
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": "Patient/p1"},
            "effectivePeriod": {"start": "2020-01-01", "end": "2020-01-02"},
            "valueQuantity": {"value": 70, "unit": "kg"}});
        let eval = |rt_name: &str, code: &str, r: &Value| -> Vec<Value> {
            let def = reg.get(rt(rt_name), code).expect("defined");
            match &def.expression {
                Some(Ok(e)) => e
                    .evaluate(r)
                    .into_iter()
                    .map(|n| n.value.into_owned())
                    .collect(),
                other => panic!("{code}: {other:?}"),
            }
        };
        assert_eq!(eval("Observation", "code", &obs), vec![obs["code"].clone()]);
        assert_eq!(
            eval("Observation", "patient", &obs),
            vec![obs["subject"].clone()]
        );
        assert_eq!(
            eval("Observation", "date", &obs),
            vec![obs["effectivePeriod"].clone()]
        );
        assert_eq!(
            eval("Observation", "value-quantity", &obs),
            vec![obs["valueQuantity"].clone()]
        );
        let group_subject =
            json!({"resourceType": "Observation", "subject": {"reference": "Group/g"}});
        assert!(eval("Observation", "patient", &group_subject).is_empty());

        let pat = json!({"resourceType": "Patient", "name": [{"family": "Chalmers"}],
            "telecom": [{"system": "email", "value": "p@x.org"}, {"system": "phone", "value": "1"}]});
        assert_eq!(eval("Patient", "family", &pat), vec![json!("Chalmers")]);
        assert_eq!(
            eval("Patient", "email", &pat),
            vec![pat["telecom"][0].clone()]
        );
    }
}
