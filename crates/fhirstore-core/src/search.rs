//! The FHIR search model: a typed query parsed from a FHIR query string.
//!
//! Parsing knows each parameter's type from [`param_type`]. The parameters known so far are the
//! ones every resource has (`_id`, `_lastUpdated`) and `identifier`, which conditional operations
//! need; the full R4 registry plugs in behind the same function.

use crate::date::{parse_fhir_date, DateValue, Prefix};
use crate::error::{Error, Result};
use crate::model::{is_valid_id, ResourceType};

/// The most results one page may hold, whatever `_count` asks for.
pub const MAX_PAGE_SIZE: u32 = 1_000;
/// The page size when `_count` is not given.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

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

/// The type of a search parameter, as in R4 `SearchParameter.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    /// `token`: system|code pairs.
    Token,
    /// `date`: ranges with prefixes.
    Date,
}

/// One token value: `[system]|[code]`, `|[code]`, `[code]` or `[system]|`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenValue {
    /// `None`: any system. `Some("")`: no system. `Some(s)`: exactly `s`.
    pub system: Option<String>,
    /// `None`: any code in the system. `Some(c)`: exactly `c`.
    pub code: Option<String>,
}

/// The values of one criterion, OR-ed together.
#[derive(Clone, Debug, PartialEq)]
pub enum CriterionValues {
    /// Token values.
    Token(Vec<TokenValue>),
    /// Date values.
    Date(Vec<DateValue>),
}

/// One search parameter with its values. Criteria in a query are AND-ed.
#[derive(Clone, Debug, PartialEq)]
pub struct Criterion {
    /// The parameter name, e.g. `identifier`, `_id`.
    pub param: String,
    /// The values, any of which may match.
    pub values: CriterionValues,
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
    /// Parameters that were ignored under [`Handling::Lenient`], as written.
    pub ignored: Vec<String>,
}

/// The type of a known parameter, or `None` when it is not known for `resource_type`.
pub fn param_type(_resource_type: Option<ResourceType>, name: &str) -> Option<ParamType> {
    match name {
        "_id" | "identifier" => Some(ParamType::Token),
        "_lastUpdated" => Some(ParamType::Date),
        _ => None,
    }
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

    /// Parses a FHIR query string (`a=b&c=d`, percent-encoded, no leading `?`).
    pub fn parse(
        resource_type: Option<ResourceType>,
        query: &str,
        handling: Handling,
    ) -> Result<Self> {
        let mut q = SearchQuery::all(resource_type);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            q.add_param(&name, &value, handling)?;
        }
        Ok(q)
    }

    /// Adds one `name=value` pair, with `name` possibly carrying a `:modifier`.
    pub fn add_param(&mut self, name: &str, value: &str, handling: Handling) -> Result<()> {
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
            // Result-shaping parameters the store does not act on; the HTTP layer reads them.
            "_format" | "_pretty" | "_summary" | "_elements" => return Ok(()),
            _ => {}
        }
        let Some(kind) = param_type(self.resource_type, base) else {
            return self.ignore(name, value, handling, "unknown search parameter");
        };
        if let Some(m) = modifier {
            return match handling {
                Handling::Strict => Err(Error::Unsupported(format!(
                    "modifier :{m} on {base} is not supported"
                ))),
                Handling::Lenient => self.ignore(name, value, handling, "unsupported modifier"),
            };
        }
        let parts = split_unescaped(value, b',');
        let values = match kind {
            ParamType::Token => {
                let mut tokens = Vec::with_capacity(parts.len());
                for p in &parts {
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
                for p in &parts {
                    let (prefix, rest) = Prefix::split(p);
                    let range = parse_fhir_date(rest).ok_or_else(|| {
                        Error::InvalidSearch(format!("{base}={p:?} is not a FHIR date"))
                    })?;
                    dates.push(DateValue { prefix, range });
                }
                CriterionValues::Date(dates)
            }
        };
        self.criteria.push(Criterion {
            param: base.to_owned(),
            values,
        });
        Ok(())
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

/// Splits on `sep` where it is not preceded by a backslash, and removes the escapes
/// (`\,` `\|` `\$` `\\`), as R4 search §3.1.1.4.5 requires.
pub fn split_unescaped(value: &str, sep: u8) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ (',' | '|' | '$' | '\\')) => cur.push(n),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            }
        } else if c as u32 == u32::from(sep) {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
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
    fn unknown_parameters_depend_on_handling() {
        let q = SearchQuery::parse(pt(), "foo=bar&_id=x", Handling::Lenient).expect("lenient");
        assert_eq!(q.ignored, vec!["foo".to_string()]);
        assert_eq!(q.criteria.len(), 1);
        let e = SearchQuery::parse(pt(), "foo=bar", Handling::Strict).expect_err("strict");
        assert!(matches!(e, Error::InvalidSearch(m) if m.contains("foo")));
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
    }

    #[test]
    fn count_is_capped() {
        let q = SearchQuery::parse(pt(), "_count=100000", Handling::Strict).expect("parses");
        assert_eq!(q.page_size(), MAX_PAGE_SIZE);
        assert_eq!(SearchQuery::all(pt()).page_size(), DEFAULT_PAGE_SIZE);
    }
}
