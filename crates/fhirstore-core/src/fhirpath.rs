//! The subset of FHIRPath that the R4 search parameter definitions use, evaluated over
//! `serde_json::Value`.
//!
//! The 1,375 official expressions use only: paths, `|`, `as` (as a function and as an operator),
//! `is`, `where(…)` with `resolve() is Type` or `field = 'literal'`, `exists()`, `and`, `=` and
//! `!=`. A small evaluator of our own covers all of that, compiles each expression once, and
//! walks JSON without converting it. It also understands FHIR's JSON shape: choice elements
//! (`value[x]` is stored as `valueQuantity`, `valueString`, …) and arrays, which path steps
//! flatten.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

/// A compiled expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// The input collection itself (the start of a relative path such as `code`).
    This,
    /// A resource-type root such as `Patient` or `Resource`: the input if it is of that type.
    TypeRoot(String),
    /// `base.name`: child elements, arrays flattened, choice types resolved.
    Child(Box<Expr>, String),
    /// `a | b`.
    Union(Vec<Expr>),
    /// `base.where(cond)`.
    Where(Box<Expr>, Box<Expr>),
    /// `base as Type` and `base.as(Type)`, also `ofType(Type)`.
    As(Box<Expr>, String),
    /// `base is Type`.
    Is(Box<Expr>, String),
    /// `base.resolve()`: a Reference, seen as the type it points to.
    Resolve(Box<Expr>),
    /// `base.exists()`.
    Exists(Box<Expr>),
    /// `%resource`: the resource being evaluated, wherever the focus is.
    RootResource,
    /// `base[n]`.
    Index(Box<Expr>, usize),
    /// `a and b`.
    And(Box<Expr>, Box<Expr>),
    /// `a = b`, `a != b`.
    Eq(Box<Expr>, Box<Expr>, bool),
    /// A string literal.
    Str(String),
    /// A boolean literal.
    Bool(bool),
}

/// An expression outside the supported subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// One item of a result: a JSON value, and its FHIR type when the path told us (a choice
/// element's suffix, or the type a `resolve()` points to).
#[derive(Clone, Debug, PartialEq)]
pub struct Node<'a> {
    /// The value: borrowed from the resource, or computed (booleans, literals).
    pub value: Cow<'a, Value>,
    /// The FHIR type, when known: `Quantity` from `valueQuantity`, `dateTime` from
    /// `occurrenceDateTime`, the target type after `resolve()`.
    pub type_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Dot,
    Pipe,
    LParen,
    RParen,
    Eq,
    Ne,
    Comma,
    LBracket,
    RBracket,
    Number(usize),
    Env(String),
}

fn tokenize(src: &str) -> Result<Vec<Tok>, ParseError> {
    let mut out = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '.' => {
                out.push(Tok::Dot);
                i += 1;
            }
            '|' => {
                out.push(Tok::Pipe);
                i += 1;
            }
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '[' => {
                out.push(Tok::LBracket);
                i += 1;
            }
            ']' => {
                out.push(Tok::RBracket);
                i += 1;
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let n = text
                    .parse()
                    .map_err(|_| ParseError(format!("number {text} out of range")))?;
                out.push(Tok::Number(n));
            }
            '%' => {
                let start = i + 1;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Env(chars[start..i].iter().collect()));
            }
            '=' => {
                out.push(Tok::Eq);
                i += 1;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::Ne);
                i += 2;
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(ParseError("unterminated string".into())),
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            if let Some(n) = chars.get(i + 1) {
                                s.push(*n);
                            }
                            i += 2;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => return Err(ParseError(format!("unexpected character {other:?} at {i}"))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, want: &Tok) -> Result<(), ParseError> {
        match self.next() {
            Some(ref t) if t == want => Ok(()),
            other => Err(ParseError(format!("expected {want:?}, found {other:?}"))),
        }
    }

    fn peek_ident(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w == word)
    }

    fn union(&mut self) -> Result<Expr, ParseError> {
        let mut parts = vec![self.and()?];
        while self.peek() == Some(&Tok::Pipe) {
            self.pos += 1;
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Expr::Union(parts)
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.equality()?;
        while self.peek_ident("and") {
            self.pos += 1;
            let right = self.equality()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn equality(&mut self) -> Result<Expr, ParseError> {
        let left = self.type_op()?;
        let negate = match self.peek() {
            Some(Tok::Eq) => false,
            Some(Tok::Ne) => true,
            _ => return Ok(left),
        };
        self.pos += 1;
        let right = self.type_op()?;
        Ok(Expr::Eq(Box::new(left), Box::new(right), negate))
    }

    fn type_op(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.postfix()?;
        loop {
            let is = if self.peek_ident("as") {
                false
            } else if self.peek_ident("is") {
                true
            } else {
                return Ok(e);
            };
            self.pos += 1;
            let ty = self.type_name()?;
            e = if is {
                Expr::Is(Box::new(e), ty)
            } else {
                Expr::As(Box::new(e), ty)
            };
        }
    }

    fn type_name(&mut self) -> Result<String, ParseError> {
        match self.next() {
            Some(Tok::Ident(mut t)) => {
                // `FHIR.Quantity` and `System.String` name the same types.
                while self.peek() == Some(&Tok::Dot) {
                    self.pos += 1;
                    match self.next() {
                        Some(Tok::Ident(n)) => t = n,
                        other => {
                            return Err(ParseError(format!("bad type name after {t}: {other:?}")))
                        }
                    }
                }
                Ok(t)
            }
            other => Err(ParseError(format!("expected a type name, found {other:?}"))),
        }
    }

    fn postfix(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.primary()?;
        loop {
            if self.peek() == Some(&Tok::LBracket) {
                self.pos += 1;
                let n = match self.next() {
                    Some(Tok::Number(n)) => n,
                    other => return Err(ParseError(format!("expected an index, found {other:?}"))),
                };
                self.expect(&Tok::RBracket)?;
                e = Expr::Index(Box::new(e), n);
                continue;
            }
            if self.peek() != Some(&Tok::Dot) {
                break;
            }
            self.pos += 1;
            let name = match self.next() {
                Some(Tok::Ident(n)) => n,
                other => {
                    return Err(ParseError(format!(
                        "expected a name after '.', found {other:?}"
                    )))
                }
            };
            e = self.step(e, name)?;
        }
        Ok(e)
    }

    /// A name after a dot, or at the start of a relative path: a child, or a function call.
    fn step(&mut self, base: Expr, name: String) -> Result<Expr, ParseError> {
        if self.peek() != Some(&Tok::LParen) {
            return Ok(Expr::Child(Box::new(base), name));
        }
        self.pos += 1;
        let e = match name.as_str() {
            "where" => {
                let cond = self.union()?;
                Expr::Where(Box::new(base), Box::new(cond))
            }
            "as" | "ofType" => Expr::As(Box::new(base), self.type_name()?),
            "is" => Expr::Is(Box::new(base), self.type_name()?),
            "resolve" => Expr::Resolve(Box::new(base)),
            "exists" => Expr::Exists(Box::new(base)),
            // `extension(url)` is FHIR's shorthand for `extension.where(url = …)`; tenants'
            // own parameters on extensions are written with it.
            "extension" => match self.next() {
                Some(Tok::Str(url)) => Expr::Where(
                    Box::new(Expr::Child(Box::new(base), "extension".into())),
                    Box::new(Expr::Eq(
                        Box::new(Expr::Child(Box::new(Expr::This), "url".into())),
                        Box::new(Expr::Str(url)),
                        false,
                    )),
                ),
                other => {
                    return Err(ParseError(format!(
                        "extension() takes a URL string, found {other:?}"
                    )))
                }
            },
            other => return Err(ParseError(format!("unsupported function {other}()"))),
        };
        self.expect(&Tok::RParen)?;
        Ok(e)
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.union()?;
                self.expect(&Tok::RParen)?;
                Ok(e)
            }
            Some(Tok::Str(s)) => Ok(Expr::Str(s)),
            Some(Tok::Env(name)) if name == "resource" || name == "rootResource" => {
                Ok(Expr::RootResource)
            }
            Some(Tok::Env(name)) => Err(ParseError(format!("unsupported variable %{name}"))),
            Some(Tok::Ident(w)) if w == "true" || w == "false" => Ok(Expr::Bool(w == "true")),
            Some(Tok::Ident(w)) => {
                if w.starts_with(|c: char| c.is_ascii_uppercase())
                    && self.peek() != Some(&Tok::LParen)
                {
                    Ok(Expr::TypeRoot(w))
                } else {
                    self.step(Expr::This, w)
                }
            }
            other => Err(ParseError(format!("unexpected {other:?}"))),
        }
    }
}

/// Compiles an expression, or says which part is outside the supported subset.
pub fn parse(src: &str) -> Result<Expr, ParseError> {
    let mut p = Parser {
        toks: tokenize(src)?,
        pos: 0,
    };
    let e = p.union()?;
    if p.pos < p.toks.len() {
        return Err(ParseError(format!(
            "unexpected {:?} after a complete expression",
            p.toks[p.pos]
        )));
    }
    Ok(e)
}

/// The type a Reference points to, from its `reference` string (`Patient/1`, an absolute URL
/// ending in `Patient/1`, or `Patient/1/_history/2`).
pub fn reference_type(reference: &Value) -> Option<&str> {
    let r = reference.get("reference")?.as_str()?;
    let r = r.split("/_history/").next().unwrap_or(r);
    let mut parts = r.rsplit('/');
    let _id = parts.next()?;
    let ty = parts.next()?;
    ty.starts_with(|c: char| c.is_ascii_uppercase())
        .then_some(ty)
}

fn same_type(a: &str, b: &str) -> bool {
    // Choice suffixes capitalise primitive type names (`dateTime` → `DateTime`).
    a.eq_ignore_ascii_case(b)
}

impl Expr {
    /// Evaluates against a resource, returning the matching nodes.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let root = root_node(resource);
        self.eval(resource, std::slice::from_ref(&root))
    }

    /// Evaluates with `focus` as the input collection, as composite components are evaluated
    /// against each value of their parameter; `%resource` still names `resource`.
    pub fn evaluate_from<'a>(&self, resource: &'a Value, focus: &[Node<'a>]) -> Vec<Node<'a>> {
        self.eval(resource, focus)
    }

    fn eval<'a>(&self, root: &'a Value, input: &[Node<'a>]) -> Vec<Node<'a>> {
        match self {
            Expr::RootResource => vec![root_node(root)],
            Expr::Index(base, n) => base
                .eval(root, input)
                .into_iter()
                .nth(*n)
                .into_iter()
                .collect(),
            Expr::This => input.to_vec(),
            Expr::TypeRoot(t) => input
                .iter()
                .filter(|n| {
                    t == "Resource"
                        || t == "DomainResource"
                        || n.value.get("resourceType").and_then(Value::as_str) == Some(t.as_str())
                })
                .cloned()
                .collect(),
            Expr::Child(base, name) => {
                let mut out = Vec::new();
                for n in base.eval(root, input) {
                    if let Cow::Borrowed(v) = n.value {
                        child(v, name, &mut out);
                    }
                }
                out
            }
            Expr::Union(parts) => {
                let mut out: Vec<Node<'a>> = Vec::new();
                for p in parts {
                    for n in p.eval(root, input) {
                        // FHIRPath union removes duplicates; for nodes of the resource, identity
                        // of the JSON node is enough.
                        let dup = out.iter().any(|o| match (&o.value, &n.value) {
                            (Cow::Borrowed(a), Cow::Borrowed(b)) => std::ptr::eq(*a, *b),
                            (a, b) => a == b,
                        });
                        if !dup {
                            out.push(n);
                        }
                    }
                }
                out
            }
            Expr::Where(base, cond) => base
                .eval(root, input)
                .into_iter()
                .filter(|n| truthy(&cond.eval(root, std::slice::from_ref(n))))
                .collect(),
            Expr::As(base, ty) => base
                .eval(root, input)
                .into_iter()
                .filter(|n| n.type_name.as_deref().is_none_or(|t| same_type(t, ty)))
                .collect(),
            Expr::Is(base, ty) => {
                let items = base.eval(root, input);
                let is = items.len() == 1
                    && items[0]
                        .type_name
                        .as_deref()
                        .is_some_and(|t| same_type(t, ty));
                bool_node(is)
            }
            Expr::Resolve(base) => base
                .eval(root, input)
                .into_iter()
                .filter_map(|n| {
                    let t = reference_type(&n.value)?.to_owned();
                    Some(Node {
                        value: n.value,
                        type_name: Some(t),
                    })
                })
                .collect(),
            Expr::Exists(base) => bool_node(!base.eval(root, input).is_empty()),
            Expr::And(a, b) => {
                bool_node(truthy(&a.eval(root, input)) && truthy(&b.eval(root, input)))
            }
            Expr::Eq(a, b, negate) => {
                let (l, r) = (a.eval(root, input), b.eval(root, input));
                if l.is_empty() || r.is_empty() {
                    // FHIRPath: comparing with an empty collection gives empty, which is false.
                    return Vec::new();
                }
                let equal = l.len() == r.len() && l.iter().zip(&r).all(|(x, y)| x.value == y.value);
                bool_node(equal != *negate)
            }
            Expr::Str(s) => literal(Value::String(s.clone())),
            Expr::Bool(b) => literal(Value::Bool(*b)),
        }
    }
}

fn root_node(resource: &Value) -> Node<'_> {
    Node {
        value: Cow::Borrowed(resource),
        type_name: resource
            .get("resourceType")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

fn bool_node<'a>(b: bool) -> Vec<Node<'a>> {
    vec![Node {
        value: Cow::Owned(Value::Bool(b)),
        type_name: Some("boolean".into()),
    }]
}

fn literal<'a>(v: Value) -> Vec<Node<'a>> {
    vec![Node {
        value: Cow::Owned(v),
        type_name: None,
    }]
}

fn truthy(items: &[Node<'_>]) -> bool {
    match items {
        [] => false,
        [one] => one.value.as_bool().unwrap_or(true),
        _ => true,
    }
}

/// Pushes `obj.name`, flattening arrays. A missing `name` may be a choice element stored as
/// `name` + type suffix; those are returned with the suffix as their type.
fn child<'a>(value: &'a Value, name: &str, out: &mut Vec<Node<'a>>) {
    let Some(obj) = value.as_object() else {
        return;
    };
    let mut push = |v: &'a Value, type_name: Option<String>| match v {
        Value::Array(items) => out.extend(items.iter().map(|i| Node {
            value: Cow::Borrowed(i),
            type_name: type_name.clone(),
        })),
        Value::Null => {}
        other => out.push(Node {
            value: Cow::Borrowed(other),
            type_name,
        }),
    };
    if let Some(v) = obj.get(name) {
        push(v, None);
        return;
    }
    for (k, v) in obj {
        if let Some(suffix) = k.strip_prefix(name) {
            if suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
                push(v, Some(suffix.to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, r: &Value) -> Vec<Value> {
        parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .evaluate(r)
            .into_iter()
            .map(|n| n.value.into_owned())
            .collect()
    }

    #[test]
    fn paths_flatten_arrays_and_check_the_root_type() {
        let p =
            json!({"resourceType": "Patient", "name": [{"given": ["A", "B"]}, {"given": ["C"]}]});
        assert_eq!(
            eval("Patient.name.given", &p),
            vec![json!("A"), json!("B"), json!("C")]
        );
        assert!(eval("Observation.code", &p).is_empty());
        assert_eq!(eval("Resource.name.given", &p).len(), 3);
        assert_eq!(
            eval("Observation.code | Patient.name.given", &p).len(),
            3,
            "a union of per-type paths picks the resource's own"
        );
    }

    #[test]
    fn extension_function_selects_by_url() {
        let p = json!({"resourceType": "Patient", "extension": [
            {"url": "http://a", "valueCode": "x"},
            {"url": "http://b", "valueCoding": {"code": "y"}}
        ]});
        let e = parse("Patient.extension('http://b').value").expect("parses");
        let got: Vec<Value> = e
            .evaluate(&p)
            .into_iter()
            .map(|n| n.value.into_owned())
            .collect();
        assert_eq!(got, vec![json!({"code": "y"})]);
        assert!(parse("Patient.extension(url)").is_err());
    }

    #[test]
    fn choice_types_and_as() {
        let o = json!({"resourceType": "Observation", "valueQuantity": {"value": 5, "unit": "mg"},
                       "effectiveDateTime": "2020-01-01"});
        assert_eq!(
            eval("(Observation.value as Quantity)", &o),
            vec![json!({"value": 5, "unit": "mg"})]
        );
        assert!(eval("(Observation.value as CodeableConcept)", &o).is_empty());
        assert_eq!(
            eval("Observation.value.as(Quantity).unit", &o),
            vec![json!("mg")]
        );
        assert_eq!(
            eval("(Observation.effective as dateTime)", &o),
            vec![json!("2020-01-01")]
        );
        assert_eq!(eval("Observation.effective", &o), vec![json!("2020-01-01")]);
    }

    #[test]
    fn where_resolve_is_filters_references_by_target_type() {
        let o = json!({"resourceType": "Observation", "subject": {"reference": "Patient/1"},
            "performer": [{"reference": "Practitioner/2"}, {"reference": "http://x.org/fhir/Patient/3/_history/1"}]});
        assert_eq!(
            eval("Observation.subject.where(resolve() is Patient)", &o).len(),
            1
        );
        assert!(eval("Observation.subject.where(resolve() is Group)", &o).is_empty());
        assert_eq!(
            eval("Observation.performer.where(resolve() is Patient)", &o),
            vec![json!({"reference": "http://x.org/fhir/Patient/3/_history/1"})]
        );
    }

    #[test]
    fn where_with_equality() {
        let p = json!({"resourceType": "Patient", "telecom": [
            {"system": "phone", "value": "555"}, {"system": "email", "value": "a@b"}]});
        assert_eq!(
            eval("Patient.telecom.where(system='email')", &p),
            vec![json!({"system": "email", "value": "a@b"})]
        );
        assert_eq!(
            eval("Patient.telecom.where(system!='email').value", &p),
            vec![json!("555")]
        );
    }

    #[test]
    fn exists_and_boolean_logic() {
        let alive = json!({"resourceType": "Patient", "deceasedBoolean": false});
        let dead = json!({"resourceType": "Patient", "deceasedDateTime": "2020"});
        let e = "Patient.deceased.exists() and Patient.deceased != false";
        assert_eq!(eval(e, &alive), vec![json!(false)]);
        assert_eq!(eval(e, &dead), vec![json!(true)]);
        assert_eq!(
            eval(e, &json!({"resourceType": "Patient"})),
            vec![json!(false)]
        );
    }

    #[test]
    fn indexer_and_root_variable() {
        let b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Composition", "id": "c"}},
            {"resource": {"resourceType": "Patient", "id": "p"}}]});
        assert_eq!(
            eval("Bundle.entry[0].resource", &b),
            vec![b["entry"][0]["resource"].clone()]
        );
        assert!(eval("Bundle.entry[5].resource", &b).is_empty());
        let m = json!({"resourceType": "MolecularSequence", "referenceSeq": {"chromosome": {"text": "1"}},
            "variant": [{"start": 10, "end": 12}]});
        let comp = parse("%resource.referenceSeq.chromosome").expect("parses");
        let variants = parse("MolecularSequence.variant")
            .expect("parses")
            .evaluate(&m);
        let got: Vec<Value> = comp
            .evaluate_from(&m, &variants)
            .into_iter()
            .map(|n| n.value.into_owned())
            .collect();
        assert_eq!(got, vec![json!({"text": "1"})]);
    }

    #[test]
    fn unsupported_syntax_is_an_error_not_a_guess() {
        for bad in [
            "Patient.name.first()",
            "Patient.name[x]",
            "Patient.name.given +",
            "(Patient.name",
            "1 + 1",
            "%context.x",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }
}
