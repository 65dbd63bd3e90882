//! The FHIR search model: a typed query parsed from a FHIR query string.
//!
//! Parsing knows each parameter's type from a registry ([`crate::registry`]): the official R4
//! one ([`SearchQuery::parse`], [`param_type`]) or a tenant's, which adds its own parameters
//! ([`SearchQuery::parse_in`], [`param_type_in`]). Every string, token, date, number,
//! quantity, reference, uri and composite parameter with an expression can be searched.

pub use crate::date::Prefix;
use crate::date::{parse_fhir_date, DateValue};
use crate::error::{Error, Result};
use crate::model::{is_valid_id, ResourceType};
use crate::registry::Registry;

/// The most results one page may hold, whatever `_count` asks for.
pub const MAX_PAGE_SIZE: u32 = 1_000;
/// The page size when `_count` is not given.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// Bounds on what one search may ask for, so that no query costs without limit. A query beyond
/// one fails with [`Error::TooCostly`] naming the limit and its value; the HTTP layer answers
/// 400 `too-costly`. Every field is configurable; the defaults are far above what clinical
/// queries use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchLimits {
    /// Criteria (parameters that filter) in one query, chained ones included.
    pub max_criteria: usize,
    /// Links in one chain (`a.b.c=` has two; each `_has:` is one).
    pub max_chain_depth: usize,
    /// `_sort` keys.
    pub max_sort_keys: usize,
    /// Values OR-ed in one criterion (`code=a,b,c` has three).
    pub max_or_values: usize,
    /// `_include` and `_revinclude` parameters together.
    pub max_includes: usize,
    /// Bytes of one parameter value.
    pub max_value_bytes: usize,
}

impl Default for SearchLimits {
    fn default() -> Self {
        SearchLimits {
            max_criteria: 100,
            max_chain_depth: 4,
            max_sort_keys: 8,
            max_or_values: 1_000,
            max_includes: 32,
            max_value_bytes: 8_192,
        }
    }
}

fn exceeded(limit: &str, value: usize, what: String) -> Error {
    Error::TooCostly(format!(
        "{what}, beyond the limit {limit} = {value}; narrow the search or split it"
    ))
}

/// How unknown or unsupported parameters are treated (`Prefer: handling=…`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Handling {
    /// Ignore them and report them in [`SearchQuery::ignored`] (the R4 default).
    #[default]
    Lenient,
    /// Fail with [`Error::InvalidSearch`].
    Strict,
}

/// `_total`: how much effort to spend on counting all matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TotalMode {
    /// No total.
    #[default]
    None,
    /// A cheap estimate is enough.
    Estimate,
    /// The exact number of matches.
    Accurate,
}

pub use crate::registry::SearchParamType as ParamType;

/// One token value: `[system]|[code]`, `|[code]`, `[code]` or `[system]|`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenValue {
    /// `None`: any system. `Some("")`: no system. `Some(s)`: exactly `s`.
    pub system: Option<String>,
    /// `None`: any code in the system. `Some(c)`: exactly `c`.
    pub code: Option<String>,
}

/// A number searched with a prefix, with the precision range the written value implies.
#[derive(Clone, Debug, PartialEq)]
pub struct NumberValue {
    /// How the stored value must relate.
    pub prefix: Prefix,
    /// The value as written.
    pub value: f64,
    /// Lower bound of its implicit precision range (`100` → 99.5).
    pub low: f64,
    /// Upper bound (`100` → 100.5).
    pub high: f64,
}

/// A quantity searched as `[prefix][number]|[system]|[code]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantityValue {
    /// The number part.
    pub number: NumberValue,
    /// The unit system, if given.
    pub system: Option<String>,
    /// The unit code (or unit text, when no system is given), if given.
    pub code: Option<String>,
}

/// A reference value: `[id]`, `[Type]/[id]`, an absolute URL, or a canonical `url|version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceValue {
    /// A logical id, with the type when one was given (`Patient/1` or `:Patient` + `1`).
    Local {
        /// The target type, if known.
        resource_type: Option<ResourceType>,
        /// The target id.
        id: String,
    },
    /// An absolute or canonical URL, with a version for `url|version`.
    Url {
        /// The URL without version.
        url: String,
        /// The version, if given.
        version: Option<String>,
    },
}

/// The values of one criterion, OR-ed together.
#[derive(Clone, Debug, PartialEq)]
pub enum CriterionValues {
    /// Token values.
    Token(Vec<TokenValue>),
    /// Date values.
    Date(Vec<DateValue>),
    /// String values, as written (matched on their folded form unless `:exact`).
    String(Vec<String>),
    /// Number values.
    Number(Vec<NumberValue>),
    /// Quantity values.
    Quantity(Vec<QuantityValue>),
    /// Reference values.
    Reference(Vec<ReferenceValue>),
    /// Uri values.
    Uri(Vec<String>),
    /// `:missing=true` (the resource has no value for the parameter) or `false`, with the
    /// parameter's type (which says where its values are kept).
    Missing(bool, ParamType),
    /// Composite values: for each value, one single-valued entry per component, in the
    /// definition's order, all of which must hold for the same element.
    Composite(Vec<Vec<CriterionValues>>),
}

impl CriterionValues {
    /// How many values are OR-ed (a `:missing` criterion has one).
    pub fn len(&self) -> usize {
        match self {
            CriterionValues::Token(v) => v.len(),
            CriterionValues::Date(v) => v.len(),
            CriterionValues::String(v) | CriterionValues::Uri(v) => v.len(),
            CriterionValues::Number(v) => v.len(),
            CriterionValues::Quantity(v) => v.len(),
            CriterionValues::Reference(v) => v.len(),
            CriterionValues::Missing(..) => 1,
            CriterionValues::Composite(v) => v.len(),
        }
    }

    /// Whether there is no value at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A search modifier the stores understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modifier {
    /// string: the whole value, case- and accent-sensitive.
    Exact,
    /// string: the value anywhere, case- and accent-insensitive.
    Contains,
    /// token: resources that do not have the token (including those with no value at all).
    Not,
    /// uri: the value and everything under it.
    Below,
    /// uri: the value and everything above it.
    Above,
    /// reference: the target must be of this type.
    Type(ResourceType),
    /// token: match the text of a CodeableConcept or the display of a Coding (starts-with,
    /// case- and accent-insensitive).
    Text,
    /// token on an Identifier: `[type system]|[type code]|[value]`.
    OfType,
    /// reference: match the Reference's logical identifier (`[system]|[value]`).
    Identifier,
}

impl Modifier {
    /// The modifier's FHIR code, as written after the colon; `type` for `:[type]`.
    pub fn code(self) -> &'static str {
        match self {
            Modifier::Exact => "exact",
            Modifier::Contains => "contains",
            Modifier::Not => "not",
            Modifier::Below => "below",
            Modifier::Above => "above",
            Modifier::Type(_) => "type",
            Modifier::Text => "text",
            Modifier::OfType => "of-type",
            Modifier::Identifier => "identifier",
        }
    }
}

/// One step from the searched type to the type a chained criterion applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainLink {
    /// `param[:Type].` — follow the reference parameter `param` to resources of `target`.
    Forward {
        /// A reference parameter of the current type.
        param: String,
        /// The type referenced.
        target: ResourceType,
    },
    /// `_has:Source:param:` — resources of `source` whose reference parameter `param` points
    /// at the current resource.
    Reverse {
        /// The type that holds the reference.
        source: ResourceType,
        /// Its reference parameter.
        param: String,
    },
}

/// One search parameter with its values. Criteria in a query are AND-ed.
#[derive(Clone, Debug, PartialEq)]
pub struct Criterion {
    /// The parameter name, e.g. `identifier`, `_id`; for a chain, the parameter at its end.
    pub param: String,
    /// The modifier, if any.
    pub modifier: Option<Modifier>,
    /// The chain from the searched type to the type `param` belongs to; empty when `param` is
    /// the searched type's own.
    pub chain: Vec<ChainLink>,
    /// The values, any of which may match.
    pub values: CriterionValues,
}

impl Criterion {
    /// A plain criterion on the searched type's own parameter.
    pub fn new(param: impl Into<String>, values: CriterionValues) -> Self {
        Criterion {
            param: param.into(),
            modifier: None,
            chain: Vec::new(),
            values,
        }
    }
}

/// An `_include` or `_revinclude`: `Source:param[:Target]`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Include {
    /// The type holding the reference; `None` for `*`.
    pub source: Option<ResourceType>,
    /// The reference parameter; `None` for `*` (every reference parameter).
    pub param: Option<String>,
    /// Only references to this type.
    pub target: Option<ResourceType>,
    /// `:iterate`: apply to included resources too, not only to matches.
    pub iterate: bool,
}

/// `_summary`: how much of each resource to return. The store acts on `Count` (no resources,
/// only the total); the others shape the representation at the HTTP layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summary {
    /// The summary elements only.
    True,
    /// Text, id, meta and mandatory elements.
    Text,
    /// Everything but the narrative.
    Data,
    /// Just the total.
    Count,
    /// The whole resource.
    False,
}

/// One `_sort` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortKey {
    /// The parameter sorted by (`_id`, `_lastUpdated`, or a registered parameter).
    pub param: String,
    /// Its type.
    pub kind: ParamType,
    /// `-param`: highest first.
    pub descending: bool,
}

/// A parsed search.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchQuery {
    /// The type searched; `None` searches every type (system-level search).
    pub resource_type: Option<ResourceType>,
    /// Conditions, all of which must hold.
    pub criteria: Vec<Criterion>,
    /// Page size (`_count`), capped at [`MAX_PAGE_SIZE`].
    pub count: Option<u32>,
    /// Where the previous page ended, as returned in [`crate::SearchPage::next_cursor`].
    pub cursor: Option<String>,
    /// `_total`.
    pub total: TotalMode,
    /// `_sort`, in priority order; ties are always broken by type and id.
    pub sort: Vec<SortKey>,
    /// `_summary`.
    pub summary: Option<Summary>,
    /// `_elements`: the top-level elements to return (applied by the HTTP layer).
    pub elements: Vec<String>,
    /// `_include`: resources the matches reference.
    pub includes: Vec<Include>,
    /// `_revinclude`: resources that reference the matches.
    pub revincludes: Vec<Include>,
    /// Parameters that were ignored under [`Handling::Lenient`], as written.
    pub ignored: Vec<String>,
    /// Only resources in this compartment (`GET Patient/p1/Observation`); with no resource
    /// type, every member type of the scope.
    pub compartment: Option<crate::compartment::CompartmentScope>,
    /// `_type` of a system-level search: only these types (empty: every type).
    pub types: Vec<ResourceType>,
    /// Only resources with these ids (of [`SearchQuery::resource_type`]): the id set one part
    /// of a split search hands the other (see `CompositeStorage`). Never parsed from a URL;
    /// unlike `_id`, it is one bound value however many ids it holds.
    pub among: Option<std::sync::Arc<[crate::LogicalId]>>,
}

/// The type of a parameter from the R4 registry, or `None` when it is not defined for
/// `resource_type` (for a system-level search: not defined for every resource).
pub fn param_type(resource_type: Option<ResourceType>, name: &str) -> Option<ParamType> {
    param_type_in(Registry::r4(), resource_type, name)
}

/// The type of a parameter in `reg` (the R4 parameters plus a tenant's own); see [`param_type`].
pub fn param_type_in(
    reg: &Registry,
    resource_type: Option<ResourceType>,
    name: &str,
) -> Option<ParamType> {
    let def = match resource_type {
        Some(rt) => reg.get(rt, name),
        None => reg.get_common(name),
    }?;
    // Full-text and named-query parameters have no index behind them in the SQL stores; the
    // full-text secondary claims them by name.
    def.expression.as_ref()?;
    Some(def.kind)
}

/// Parses a number as written, with its implicit precision range.
pub fn parse_number(prefix: Prefix, text: &str) -> Option<NumberValue> {
    let value: f64 = text.parse().ok().filter(|v: &f64| v.is_finite())?;
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (text, 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len());
    let half = 0.5 * 10f64.powi(exponent - i32::try_from(decimals).ok()?);
    Some(NumberValue {
        prefix,
        value,
        low: value - half,
        high: value + half,
    })
}

impl SearchQuery {
    /// A query matching every resource of a type (or of every type).
    pub fn all(resource_type: Option<ResourceType>) -> Self {
        SearchQuery {
            resource_type,
            ..SearchQuery::default()
        }
    }

    /// Adds a criterion; a builder convenience for callers that construct queries in code.
    pub fn with(mut self, criterion: Criterion) -> Self {
        self.criteria.push(criterion);
        self
    }

    /// A stable hash of the criteria, for locking conditional writes that use the same search.
    pub fn fingerprint(&self) -> u64 {
        let text = format!("{:?}|{:?}", self.resource_type, self.criteria);
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    }

    /// The page size to use.
    pub fn page_size(&self) -> u32 {
        self.count.unwrap_or(DEFAULT_PAGE_SIZE).min(MAX_PAGE_SIZE)
    }

    /// Parses a FHIR query string (`a=b&c=d`, percent-encoded, no leading `?`) against the R4
    /// parameters.
    pub fn parse(
        resource_type: Option<ResourceType>,
        query: &str,
        handling: Handling,
    ) -> Result<Self> {
        Self::parse_in(Registry::r4(), resource_type, query, handling)
    }

    /// Parses a FHIR query string against `reg`: a tenant's searchable parameters, from
    /// [`crate::ResourceStorage::search_parameters`].
    pub fn parse_in(
        reg: &Registry,
        resource_type: Option<ResourceType>,
        query: &str,
        handling: Handling,
    ) -> Result<Self> {
        Self::parse_limited(
            reg,
            resource_type,
            query,
            handling,
            &SearchLimits::default(),
        )
    }

    /// [`SearchQuery::parse_in`] within `limits` instead of the default ones.
    pub fn parse_limited(
        reg: &Registry,
        resource_type: Option<ResourceType>,
        query: &str,
        handling: Handling,
        limits: &SearchLimits,
    ) -> Result<Self> {
        let mut q = SearchQuery::all(resource_type);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if value.len() > limits.max_value_bytes {
                return Err(exceeded(
                    "max_value_bytes",
                    limits.max_value_bytes,
                    format!("{name}: a value of {} bytes", value.len()),
                ));
            }
            q.add_param_in(reg, &name, &value, handling)?;
            // Checked as the query grows, so a huge query fails before it is all parsed.
            q.check_limits(limits)?;
        }
        Ok(q)
    }

    /// Fails with [`Error::TooCostly`] when the query is beyond one of `limits`.
    pub fn check_limits(&self, limits: &SearchLimits) -> Result<()> {
        if self.criteria.len() > limits.max_criteria {
            return Err(exceeded(
                "max_criteria",
                limits.max_criteria,
                format!("{} criteria", self.criteria.len()),
            ));
        }
        if self.sort.len() > limits.max_sort_keys {
            return Err(exceeded(
                "max_sort_keys",
                limits.max_sort_keys,
                format!("{} _sort keys", self.sort.len()),
            ));
        }
        let includes = self.includes.len() + self.revincludes.len();
        if includes > limits.max_includes {
            return Err(exceeded(
                "max_includes",
                limits.max_includes,
                format!("{includes} _include and _revinclude parameters"),
            ));
        }
        for c in &self.criteria {
            if c.chain.len() > limits.max_chain_depth {
                return Err(exceeded(
                    "max_chain_depth",
                    limits.max_chain_depth,
                    format!("{}: a chain of {} links", c.param, c.chain.len()),
                ));
            }
            let n = c.values.len();
            if n > limits.max_or_values {
                return Err(exceeded(
                    "max_or_values",
                    limits.max_or_values,
                    format!("{}: {n} values", c.param),
                ));
            }
        }
        Ok(())
    }

    /// Adds one `name=value` pair, with `name` possibly carrying a `:modifier`, parsed against
    /// the R4 parameters.
    pub fn add_param(&mut self, name: &str, value: &str, handling: Handling) -> Result<()> {
        self.add_param_in(Registry::r4(), name, value, handling)
    }

    /// Adds one `name=value` pair, parsed against `reg`.
    pub fn add_param_in(
        &mut self,
        reg: &Registry,
        name: &str,
        value: &str,
        handling: Handling,
    ) -> Result<()> {
        if name.contains('\0') || value.contains('\0') {
            // No FHIR string holds NUL; on SQLite `:contains` of it would match every value.
            return Err(Error::InvalidSearch(format!(
                "{}: a NUL character cannot be searched for",
                name.escape_debug()
            )));
        }
        let (base, modifier) = match name.split_once(':') {
            Some((b, m)) => (b, Some(m)),
            None => (name, None),
        };
        match base {
            "_count" => {
                let n: u32 = value.parse().map_err(|_| {
                    Error::InvalidSearch(format!("_count={value:?} is not a non-negative integer"))
                })?;
                self.count = Some(n.min(MAX_PAGE_SIZE));
                return Ok(());
            }
            "_total" => {
                self.total = match value {
                    "none" => TotalMode::None,
                    "estimate" => TotalMode::Estimate,
                    "accurate" => TotalMode::Accurate,
                    _ => {
                        return Err(Error::InvalidSearch(format!(
                            "_total={value:?}: expected none, estimate or accurate"
                        )))
                    }
                };
                return Ok(());
            }
            "_cursor" => {
                self.cursor = Some(value.to_owned());
                return Ok(());
            }
            "_type" => {
                for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    let t = ResourceType::new(t)
                        .map_err(|_| Error::InvalidSearch(format!("_type: unknown type {t:?}")))?;
                    match self.resource_type {
                        // A type-level search (or a system search of one `_type`, parsed as
                        // that type's) already is of it.
                        Some(rt) if rt == t => {}
                        Some(rt) => {
                            return Err(Error::InvalidSearch(format!(
                                "_type={t} in a search of {rt}"
                            )))
                        }
                        None if self.types.contains(&t) => {}
                        None => self.types.push(t),
                    }
                }
                return Ok(());
            }
            "_sort" => {
                for key in value.split(',').filter(|k| !k.is_empty()) {
                    let (descending, param) = match key.strip_prefix('-') {
                        Some(p) => (true, p),
                        None => (false, key),
                    };
                    let kind = match param {
                        "_id" => ParamType::Token,
                        "_lastUpdated" => ParamType::Date,
                        // Relevance, from a full-text criterion; only a full-text backend
                        // answers it.
                        "_score" => ParamType::Special,
                        _ => param_type_in(reg, self.resource_type, param)
                            .filter(|k| !matches!(k, ParamType::Composite | ParamType::Special))
                            .ok_or_else(|| {
                                Error::InvalidSearch(format!("_sort: cannot sort by {param:?}"))
                            })?,
                    };
                    self.sort.push(SortKey {
                        param: param.to_owned(),
                        kind,
                        descending,
                    });
                }
                return Ok(());
            }
            "_include" | "_revinclude" => {
                let iterate = match modifier {
                    None => false,
                    // `recurse` is the R3 spelling of `iterate`.
                    Some("iterate" | "recurse") => true,
                    Some(m) => {
                        return Err(Error::InvalidSearch(format!(
                            "{base}:{m}: the only modifier is :iterate"
                        )))
                    }
                };
                let inc = parse_include(reg, value, iterate).ok_or_else(|| {
                    Error::InvalidSearch(format!(
                        "{name}={value:?}: expected Type:param[:Target] or *"
                    ))
                })?;
                if base == "_include" {
                    self.includes.push(inc);
                } else {
                    self.revincludes.push(inc);
                }
                return Ok(());
            }
            "_summary" => {
                self.summary = match value {
                    "true" => Some(Summary::True),
                    "text" => Some(Summary::Text),
                    "data" => Some(Summary::Data),
                    "count" => Some(Summary::Count),
                    "false" => Some(Summary::False),
                    _ => {
                        return Err(Error::InvalidSearch(format!(
                            "_summary={value:?}: expected true, text, data, count or false"
                        )))
                    }
                };
                return Ok(());
            }
            "_elements" => {
                self.elements.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(str::to_owned),
                );
                return Ok(());
            }
            // Formatting is the HTTP layer's business.
            "_format" | "_pretty" => return Ok(()),
            _ => {}
        }
        if name.starts_with("_has:") || name.contains('.') {
            return self.add_chained(reg, name, value, handling);
        }
        let parsed = parse_criterion(reg, self.resource_type, base, modifier, value, handling)?;
        self.push_or_ignore(
            parsed,
            name,
            value,
            handling,
            "unknown or unsupported parameter",
        )
    }

    /// `a:Type.b.c=v` and `_has:Type:param:…=v`: resolves each link against the registry and
    /// parses the final parameter against the type the chain ends at.
    fn add_chained(
        &mut self,
        reg: &Registry,
        name: &str,
        value: &str,
        handling: Handling,
    ) -> Result<()> {
        let bad = |why: String| Error::InvalidSearch(format!("{name}: {why}"));
        let mut current = self
            .resource_type
            .ok_or_else(|| bad("chained parameters need a resource type".into()))?;
        let mut chain = Vec::new();
        let mut rest = name;
        loop {
            if let Some(after) = rest.strip_prefix("_has:") {
                let mut parts = after.splitn(3, ':');
                let (Some(source), Some(param), Some(tail)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad("expected _has:Type:param:parameter".into()));
                };
                let source =
                    ResourceType::new(source).map_err(|_| bad(format!("unknown type {source}")))?;
                let def = reg
                    .get(source, param)
                    .filter(|d| d.kind == ParamType::Reference)
                    .ok_or_else(|| bad(format!("{source} has no reference parameter {param}")))?;
                if !def.targets.is_empty() && !def.targets.iter().any(|t| t == current.as_str()) {
                    return Err(bad(format!("{source}.{param} cannot point at {current}")));
                }
                chain.push(ChainLink::Reverse {
                    source,
                    param: param.to_owned(),
                });
                current = source;
                rest = tail;
                continue;
            }
            let Some((link, tail)) = rest.split_once('.') else {
                break;
            };
            let (param, typed) = match link.split_once(':') {
                Some((p, t)) => (p, Some(t)),
                None => (link, None),
            };
            let def = reg
                .get(current, param)
                .filter(|d| d.kind == ParamType::Reference)
                .ok_or_else(|| bad(format!("{current} has no reference parameter {param}")))?;
            let target = match typed {
                Some(t) => ResourceType::new(t).map_err(|_| bad(format!("unknown type {t}")))?,
                None => {
                    // Of the declared targets, only those that define the next parameter can
                    // continue the chain (`patient.family`: Group has no `family`).
                    let next = tail.split(['.', ':']).next().unwrap_or("");
                    let fits: Vec<ResourceType> = def
                        .targets
                        .iter()
                        .filter_map(|t| ResourceType::new(t).ok())
                        .filter(|t| next == "_has" || reg.get(*t, next).is_some())
                        .collect();
                    match fits.as_slice() {
                        [only] => *only,
                        [] => {
                            return Err(bad(format!(
                                "no type {current}.{param} points at has a parameter {next}"
                            )))
                        }
                        _ => {
                            return Err(bad(format!(
                                "{current}.{param} can point at several types with {next}; \
                                 name one, as {param}:Type"
                            )))
                        }
                    }
                }
            };
            chain.push(ChainLink::Forward {
                param: param.to_owned(),
                target,
            });
            current = target;
            rest = tail;
        }
        let (base, modifier) = match rest.split_once(':') {
            Some((b, m)) => (b, Some(m)),
            None => (rest, None),
        };
        let parsed = parse_criterion(reg, Some(current), base, modifier, value, Handling::Strict)?
            .map(|c| Criterion { chain, ..c });
        self.push_or_ignore(
            parsed,
            name,
            value,
            handling,
            "unknown parameter at a chain's end",
        )
    }

    fn push_or_ignore(
        &mut self,
        parsed: Option<Criterion>,
        name: &str,
        value: &str,
        handling: Handling,
        why: &str,
    ) -> Result<()> {
        match parsed {
            Some(c) => {
                self.criteria.push(c);
                Ok(())
            }
            None => self.ignore(name, value, handling, why),
        }
    }

    fn ignore(&mut self, name: &str, value: &str, handling: Handling, why: &str) -> Result<()> {
        match handling {
            Handling::Strict => Err(Error::InvalidSearch(format!("{why}: {name}={value}"))),
            Handling::Lenient => {
                self.ignored.push(name.to_owned());
                Ok(())
            }
        }
    }
}

/// Parses one parameter's value by its registry type. `Ok(None)`: the parameter is unknown, or
/// of a type that cannot be searched yet, and may be ignored under lenient handling.
fn parse_criterion(
    reg: &Registry,
    resource_type: Option<ResourceType>,
    base: &str,
    modifier: Option<&str>,
    value: &str,
    handling: Handling,
) -> Result<Option<Criterion>> {
    if matches!(base, "_text" | "_content") {
        // FHIR's full-text parameters: each comma-separated value is a text query.
        if let Some(m) = modifier {
            return Err(Error::Unsupported(format!(
                "modifier :{m} on {base} is not supported"
            )));
        }
        let texts: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if texts.is_empty() {
            return Err(Error::InvalidSearch(format!("{base}: empty text")));
        }
        return Ok(Some(Criterion::new(base, CriterionValues::String(texts))));
    }
    let Some(kind) = param_type_in(reg, resource_type, base) else {
        return Ok(None);
    };
    let name = match modifier {
        Some(m) => format!("{base}:{m}"),
        None => base.to_owned(),
    };
    let bad = |what: &str| Error::InvalidSearch(format!("{name}={value:?}: {what}"));
    // R4: a server SHALL reject a modifier it does not support, whatever the handling.
    let modifier = match (modifier, kind) {
        (None, _) => None,
        (Some("missing"), _) => {
            let missing = match value {
                "true" => true,
                "false" => false,
                _ => return Err(bad(":missing takes true or false")),
            };
            return Ok(Some(Criterion::new(
                base,
                CriterionValues::Missing(missing, kind),
            )));
        }
        (Some("exact"), ParamType::String) => Some(Modifier::Exact),
        (Some("contains"), ParamType::String) => Some(Modifier::Contains),
        (Some("not"), ParamType::Token) if base != "_id" => Some(Modifier::Not),
        (Some("text"), ParamType::Token) if base != "_id" => Some(Modifier::Text),
        (Some("of-type"), ParamType::Token) if base != "_id" => Some(Modifier::OfType),
        (Some("identifier"), ParamType::Reference) => Some(Modifier::Identifier),
        (Some(m @ ("in" | "not-in" | "above" | "below")), ParamType::Token) => {
            return Err(Error::Unsupported(format!(
                "{base}:{m} needs a terminology service, which this server does not have"
            )))
        }
        (Some("below"), ParamType::Uri) => Some(Modifier::Below),
        (Some("above"), ParamType::Uri) => Some(Modifier::Above),
        (Some(m), ParamType::Reference) if ResourceType::new(m).is_ok() => {
            Some(Modifier::Type(ResourceType::new(m)?))
        }
        (Some(m), _) => {
            return Err(Error::Unsupported(format!(
                "modifier :{m} on {base} is not supported"
            )))
        }
    };
    let parts = split_raw(value, b',');
    match modifier {
        Some(Modifier::Text) => {
            let strings = parts.iter().map(|p| unescape(p)).collect();
            let mut c = Criterion::new(base, CriterionValues::String(strings));
            c.modifier = modifier;
            return Ok(Some(c));
        }
        Some(Modifier::OfType) => {
            let mut tokens = Vec::with_capacity(parts.len());
            for p in &parts {
                let pieces = split_unescaped(p, b'|');
                let [system, code, value] = pieces.as_slice() else {
                    return Err(bad(":of-type takes system|code|value"));
                };
                tokens.push(TokenValue {
                    system: Some(system.clone()),
                    code: Some(format!("{code}|{value}")),
                });
            }
            let mut c = Criterion::new(base, CriterionValues::Token(tokens));
            c.modifier = modifier;
            return Ok(Some(c));
        }
        Some(Modifier::Identifier) => {
            let tokens = parts.iter().map(|p| parse_token(p)).collect();
            let mut c = Criterion::new(base, CriterionValues::Token(tokens));
            c.modifier = modifier;
            return Ok(Some(c));
        }
        _ => {}
    }
    let values = parse_values(reg, resource_type, kind, base, modifier, &parts, &bad)?;
    let Some(values) = values else {
        return match handling {
            Handling::Strict => Err(Error::Unsupported(format!(
                "{base}: {kind:?} parameters are not supported"
            ))),
            Handling::Lenient => Ok(None),
        };
    };
    let mut c = Criterion::new(base, values);
    c.modifier = modifier;
    Ok(Some(c))
}

/// Parses the comma-separated values of one parameter of type `kind`, still escaped. `Ok(None)`:
/// parameters of this type cannot be searched.
fn parse_values(
    reg: &Registry,
    resource_type: Option<ResourceType>,
    kind: ParamType,
    base: &str,
    modifier: Option<Modifier>,
    parts: &[&str],
    bad: &dyn Fn(&str) -> Error,
) -> Result<Option<CriterionValues>> {
    Ok(Some(match kind {
        ParamType::Token => {
            let mut tokens = Vec::with_capacity(parts.len());
            for &p in parts {
                let t = parse_token(p);
                if base == "_id" {
                    match &t.code {
                        Some(c) if t.system.is_none() && is_valid_id(c) => {}
                        _ => {
                            return Err(Error::InvalidSearch(format!(
                                "_id={p:?} is not a valid resource id"
                            )))
                        }
                    }
                }
                tokens.push(t);
            }
            CriterionValues::Token(tokens)
        }
        ParamType::Date => {
            let mut dates = Vec::with_capacity(parts.len());
            for &p in parts {
                let p = unescape(p);
                let (prefix, rest) = Prefix::split(&p);
                let range = parse_fhir_date(rest).ok_or_else(|| {
                    Error::InvalidSearch(format!("{base}={p:?} is not a FHIR date"))
                })?;
                dates.push(DateValue { prefix, range });
            }
            CriterionValues::Date(dates)
        }
        ParamType::String => CriterionValues::String(parts.iter().map(|p| unescape(p)).collect()),
        ParamType::Uri => CriterionValues::Uri(parts.iter().map(|p| unescape(p)).collect()),
        ParamType::Number => {
            let mut numbers = Vec::with_capacity(parts.len());
            for &p in parts {
                let p = unescape(p);
                let (prefix, rest) = Prefix::split(&p);
                numbers.push(parse_number(prefix, rest).ok_or_else(|| bad("not a number"))?);
            }
            CriterionValues::Number(numbers)
        }
        ParamType::Quantity => {
            let mut quantities = Vec::with_capacity(parts.len());
            for &p in parts {
                let pieces = split_unescaped(p, b'|');
                let (prefix, rest) = Prefix::split(&pieces[0]);
                let number = parse_number(prefix, rest).ok_or_else(|| bad("not a quantity"))?;
                let non_empty = |i: usize| pieces.get(i).filter(|s| !s.is_empty()).cloned();
                quantities.push(QuantityValue {
                    number,
                    system: non_empty(1),
                    code: non_empty(2),
                });
            }
            CriterionValues::Quantity(quantities)
        }
        ParamType::Reference => {
            let mut refs = Vec::with_capacity(parts.len());
            for &p in parts {
                refs.push(
                    parse_reference(&unescape(p), modifier)
                        .ok_or_else(|| bad("not a reference"))?,
                );
            }
            CriterionValues::Reference(refs)
        }
        ParamType::Composite => {
            let def = resource_type
                .and_then(|rt| reg.get(rt, base))
                .ok_or_else(|| bad("composite parameters need a resource type"))?;
            let kinds = def
                .components
                .iter()
                .map(|c| reg.by_url(&c.definition).map(|d| d.kind))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("the composite's definition names an unknown component"))?;
            let mut values = Vec::with_capacity(parts.len());
            for p in parts {
                let pieces = split_raw(p, b'$');
                if pieces.len() != kinds.len() {
                    return Err(bad(&format!(
                        "expected {} components separated by '$'",
                        kinds.len()
                    )));
                }
                let mut components = Vec::with_capacity(kinds.len());
                for (kind, piece) in kinds.iter().zip(pieces) {
                    if matches!(kind, ParamType::Composite | ParamType::Special) {
                        return Ok(None);
                    }
                    match parse_values(reg, resource_type, *kind, base, None, &[piece], bad)? {
                        Some(v) => components.push(v),
                        None => return Ok(None),
                    }
                }
                values.push(components);
            }
            CriterionValues::Composite(values)
        }
        ParamType::Special => return Ok(None),
    }))
}

fn parse_reference(value: &str, modifier: Option<Modifier>) -> Option<ReferenceValue> {
    if value.is_empty() {
        return None;
    }
    let typed = match modifier {
        Some(Modifier::Type(t)) => Some(t),
        _ => None,
    };
    if value.contains("://") || value.starts_with("urn:") {
        let (url, version) = match value.split_once('|') {
            Some((u, v)) => (u.to_owned(), Some(v.to_owned())),
            None => (value.to_owned(), None),
        };
        return Some(ReferenceValue::Url { url, version });
    }
    match value.split_once('/') {
        Some((t, id)) => {
            let t = ResourceType::new(t).ok()?;
            if typed.is_some_and(|m| m != t) || !is_valid_id(id) {
                return None;
            }
            Some(ReferenceValue::Local {
                resource_type: Some(t),
                id: id.to_owned(),
            })
        }
        None => is_valid_id(value).then(|| ReferenceValue::Local {
            resource_type: typed,
            id: value.to_owned(),
        }),
    }
}

fn parse_include(reg: &Registry, value: &str, iterate: bool) -> Option<Include> {
    if value == "*" {
        return Some(Include {
            source: None,
            param: None,
            target: None,
            iterate,
        });
    }
    let mut parts = value.split(':');
    let source = ResourceType::new(parts.next()?).ok()?;
    let param = parts.next()?;
    let target = match parts.next() {
        Some(t) => Some(ResourceType::new(t).ok()?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    let param = if param == "*" {
        None
    } else {
        let def = reg.get(source, param)?;
        (def.kind == ParamType::Reference)
            .then(|| param.to_owned())?
            .into()
    };
    Some(Include {
        source: Some(source),
        param,
        target,
        iterate,
    })
}

/// Parses a token value, honouring `\|` escapes.
pub fn parse_token(value: &str) -> TokenValue {
    let parts = split_unescaped(value, b'|');
    match parts.as_slice() {
        [code] => TokenValue {
            system: None,
            code: Some(code.clone()),
        },
        [system, code] => TokenValue {
            system: Some(system.clone()),
            code: (!code.is_empty()).then(|| code.clone()),
        },
        // More than one unescaped bar: the first splits, the rest belong to the code.
        [system, rest @ ..] => TokenValue {
            system: Some(system.clone()),
            code: Some(rest.join("|")),
        },
        [] => TokenValue {
            system: None,
            code: Some(String::new()),
        },
    }
}

/// Splits on `sep` where it is not escaped by a backslash, keeping the escapes, so that each
/// piece can be split again on another separator (`,` then `$` then `|`) before [`unescape`].
pub fn split_raw(value: &str, sep: u8) -> Vec<&str> {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == sep {
            out.push(&value[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    out.push(&value[start..]);
    out
}

/// Removes the escapes `\,` `\|` `\$` `\\`; any other backslash stays as written.
pub fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ (',' | '|' | '$' | '\\')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits on `sep` where it is not preceded by a backslash, and removes the escapes
/// (`\,` `\|` `\$` `\\`), as R4 search §3.1.1.4.5 requires.
pub fn split_unescaped(value: &str, sep: u8) -> Vec<String> {
    split_raw(value, sep).into_iter().map(unescape).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt() -> Option<ResourceType> {
        ResourceType::new("Patient").ok()
    }

    #[test]
    fn parses_known_parameters() {
        let q = SearchQuery::parse(
            pt(),
            "_id=a,b&identifier=http%3A%2F%2Fx%7C123&_lastUpdated=ge2020-01&_count=5&_total=accurate",
            Handling::Strict,
        )
        .expect("parses");
        assert_eq!(q.count, Some(5));
        assert_eq!(q.total, TotalMode::Accurate);
        assert_eq!(q.criteria.len(), 3);
        assert_eq!(
            q.criteria[1].values,
            CriterionValues::Token(vec![TokenValue {
                system: Some("http://x".into()),
                code: Some("123".into())
            }])
        );
        match &q.criteria[2].values {
            CriterionValues::Date(d) => assert_eq!(d[0].prefix, Prefix::Ge),
            other => panic!("not a date: {other:?}"),
        }
    }

    #[test]
    fn parses_every_type_with_the_registry() {
        let obs = ResourceType::new("Observation").ok();
        let q = SearchQuery::parse(
            obs,
            "value-quantity=gt5.4|http://unitsofmeasure.org|mg&subject:Patient=p1&date=ge2020&code:not=x|y",
            Handling::Strict,
        )
        .expect("parses");
        match &q.criteria[0].values {
            CriterionValues::Quantity(v) => {
                assert_eq!(v[0].number.prefix, Prefix::Gt);
                assert!((v[0].number.low - 5.35).abs() < 1e-9);
                assert_eq!(v[0].code.as_deref(), Some("mg"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            q.criteria[1].values,
            CriterionValues::Reference(vec![ReferenceValue::Local {
                resource_type: ResourceType::new("Patient").ok(),
                id: "p1".into()
            }])
        );
        assert_eq!(q.criteria[3].modifier, Some(Modifier::Not));
        let p = SearchQuery::parse(
            pt(),
            "family:exact=Chalmers&birthdate:missing=true",
            Handling::Strict,
        )
        .expect("parses");
        assert_eq!(p.criteria[0].modifier, Some(Modifier::Exact));
        assert_eq!(
            p.criteria[1].values,
            CriterionValues::Missing(true, ParamType::Date)
        );
        for (rt, bad) in [
            (pt(), "family:below=x"),
            (pt(), "gender:exact=x"),
            (pt(), "birthdate:missing=maybe"),
            (obs, "subject:Nope=1"),
            (obs, "value-quantity=abc"),
        ] {
            assert!(
                SearchQuery::parse(rt, bad, Handling::Lenient).is_err(),
                "{bad}"
            );
        }
        assert!(SearchQuery::parse(
            pt(),
            "general-practitioner=Observation/x/y",
            Handling::Lenient
        )
        .is_err());
    }

    #[test]
    fn unknown_parameters_depend_on_handling() {
        let q = SearchQuery::parse(pt(), "foo=bar&_id=x", Handling::Lenient).expect("lenient");
        assert_eq!(q.ignored, vec!["foo".to_string()]);
        assert_eq!(q.criteria.len(), 1);
        let e = SearchQuery::parse(pt(), "foo=bar", Handling::Strict).expect_err("strict");
        assert!(matches!(e, Error::InvalidSearch(m) if m.contains("foo")));
        let e = SearchQuery::parse(pt(), "family:sounds-like=x", Handling::Lenient);
        assert!(
            matches!(e, Err(Error::Unsupported(_))),
            "modifiers are never ignored: {e:?}"
        );
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (qs, want) in [
            ("_lastUpdated=yesterday", "_lastUpdated"),
            ("_id=a%20b", "_id"),
            ("_count=-1", "_count"),
            ("_total=lots", "_total"),
        ] {
            let e = SearchQuery::parse(pt(), qs, Handling::Lenient).expect_err(qs);
            assert!(
                matches!(&e, Error::InvalidSearch(m) if m.contains(want)),
                "{qs}: {e}"
            );
        }
    }

    #[test]
    fn tokens_and_escapes() {
        assert_eq!(
            parse_token("a"),
            TokenValue {
                system: None,
                code: Some("a".into())
            }
        );
        assert_eq!(
            parse_token("|a"),
            TokenValue {
                system: Some(String::new()),
                code: Some("a".into())
            }
        );
        assert_eq!(
            parse_token("s|"),
            TokenValue {
                system: Some("s".into()),
                code: None
            }
        );
        assert_eq!(
            parse_token(r"s|a\|b"),
            TokenValue {
                system: Some("s".into()),
                code: Some("a|b".into())
            }
        );
        assert_eq!(split_unescaped(r"a\,b,c", b','), vec!["a,b", "c"]);
        assert_eq!(split_unescaped(r"x\$y\\", b','), vec![r"x$y\"]);
        // An escaped bar survives the split on commas and stays inside the code.
        let q =
            SearchQuery::parse(pt(), r"identifier=s|a\|b,t|c", Handling::Strict).expect("parses");
        assert_eq!(
            q.criteria[0].values,
            CriterionValues::Token(vec![
                TokenValue {
                    system: Some("s".into()),
                    code: Some("a|b".into())
                },
                TokenValue {
                    system: Some("t".into()),
                    code: Some("c".into())
                }
            ])
        );
    }

    #[test]
    fn composites_parse_each_component_by_its_type() {
        let obs = ResourceType::new("Observation").ok();
        let q = SearchQuery::parse(
            obs,
            "code-value-quantity=http://loinc.org|8480-6$gt100|http://unitsofmeasure.org|mm[Hg],x$5",
            Handling::Strict,
        )
        .expect("parses");
        let CriterionValues::Composite(values) = &q.criteria[0].values else {
            panic!("{:?}", q.criteria[0].values)
        };
        assert_eq!(values.len(), 2);
        assert_eq!(
            values[0][0],
            CriterionValues::Token(vec![TokenValue {
                system: Some("http://loinc.org".into()),
                code: Some("8480-6".into())
            }])
        );
        match &values[0][1] {
            CriterionValues::Quantity(q) => {
                assert_eq!(q[0].number.prefix, Prefix::Gt);
                assert_eq!(q[0].code.as_deref(), Some("mm[Hg]"));
            }
            other => panic!("{other:?}"),
        }
        // An escaped dollar belongs to the component.
        let q =
            SearchQuery::parse(obs, r"code-value-string=a\$b$c", Handling::Strict).expect("parses");
        let CriterionValues::Composite(values) = &q.criteria[0].values else {
            panic!("{:?}", q.criteria[0].values)
        };
        assert_eq!(values[0][1], CriterionValues::String(vec!["c".into()]));
        for bad in [
            "code-value-quantity=8480-6",
            "code-value-quantity=a$b$c",
            "code-value-quantity=8480-6$lots",
            "code-value-date=x$notadate",
            "code-value-quantity:exact=a$1",
        ] {
            let e = SearchQuery::parse(obs, bad, Handling::Lenient).expect_err(bad);
            assert!(
                matches!(&e, Error::InvalidSearch(m) | Error::Unsupported(m) if m.contains("code-value")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn sort_keys_parse_in_order() {
        let q = SearchQuery::parse(pt(), "_sort=-birthdate,family,_id", Handling::Strict)
            .expect("parses");
        let keys: Vec<(&str, bool)> = q
            .sort
            .iter()
            .map(|k| (k.param.as_str(), k.descending))
            .collect();
        assert_eq!(
            keys,
            vec![("birthdate", true), ("family", false), ("_id", false)]
        );
        assert_eq!(q.sort[0].kind, ParamType::Date);
        assert!(SearchQuery::parse(pt(), "_sort=nope", Handling::Lenient).is_err());
    }

    #[test]
    fn count_is_capped() {
        let q = SearchQuery::parse(pt(), "_count=100000", Handling::Strict).expect("parses");
        assert_eq!(q.page_size(), MAX_PAGE_SIZE);
        assert_eq!(SearchQuery::all(pt()).page_size(), DEFAULT_PAGE_SIZE);
    }

    #[test]
    fn limits_name_what_was_exceeded() {
        let too_costly =
            |query: String, limit: &str| match SearchQuery::parse(pt(), &query, Handling::Strict) {
                Err(Error::TooCostly(m)) => assert!(m.contains(limit), "{m} lacks {limit}"),
                other => panic!("{limit}: {other:?}"),
            };
        let d = SearchLimits::default();
        let many = |n: usize, each: &dyn Fn(usize) -> String| {
            (0..n).map(each).collect::<Vec<_>>().join("&")
        };
        too_costly(
            many(d.max_criteria + 1, &|i| format!("family=f{i}")),
            "max_criteria",
        );
        too_costly(
            format!("_sort={}", vec!["family"; d.max_sort_keys + 1].join(",")),
            "max_sort_keys",
        );
        too_costly(
            format!(
                "gender={}",
                (0..=d.max_or_values)
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            "max_or_values",
        );
        too_costly(
            many(d.max_includes + 1, &|_| {
                "_include=Patient:organization".into()
            }),
            "max_includes",
        );
        too_costly(
            concat!(
                "general-practitioner:Practitioner._has:PractitionerRole:practitioner:",
                "practitioner._has:PractitionerRole:practitioner:practitioner.active=true"
            )
            .to_owned(),
            "max_chain_depth",
        );
        too_costly(
            format!("family={}", "x".repeat(d.max_value_bytes + 1)),
            "max_value_bytes",
        );
        // At the limit is fine, and a caller may raise a limit.
        let at = many(d.max_criteria, &|i| format!("family=f{i}"));
        assert!(SearchQuery::parse(pt(), &at, Handling::Strict).is_ok());
        let raised = SearchLimits {
            max_criteria: 500,
            ..SearchLimits::default()
        };
        let q = many(400, &|i| format!("family=f{i}"));
        assert!(
            SearchQuery::parse_limited(Registry::r4(), pt(), &q, Handling::Strict, &raised).is_ok()
        );
    }

    #[test]
    fn nul_is_refused_in_names_and_values() {
        for q in ["family=a%00b", "name:contains=%00", "fam%00ily=x"] {
            let e = SearchQuery::parse(pt(), q, Handling::Lenient).expect_err(q);
            assert!(
                matches!(e, Error::InvalidSearch(ref m) if m.contains("NUL")),
                "{q}: {e}"
            );
        }
    }

    #[test]
    fn type_lists_a_system_search_s_types() {
        let q = SearchQuery::parse(
            None,
            "_type=Patient,Observation&_type=Patient",
            Handling::Strict,
        )
        .expect("parses");
        assert_eq!(
            q.types.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["Patient", "Observation"]
        );
        assert!(SearchQuery::parse(None, "_type=Nope", Handling::Lenient).is_err());
        assert!(SearchQuery::parse(pt(), "_type=Patient", Handling::Strict).is_ok());
        assert!(SearchQuery::parse(pt(), "_type=Observation", Handling::Lenient).is_err());
    }
}
