//! SQL text with its bind values, built without a database connection.

use std::fmt::{Display, Write as _};

use crate::Syntax;
use fhirstore_core::{Error, Result};

/// One bind value. The planner binds only text, integers and numbers; the store's own statements
/// bind the rest. Each driver turns a value into its own parameter type.
#[derive(Clone, Debug, PartialEq)]
pub enum Bind {
    /// Text: tenants, types, ids, codes, strings, sort keys.
    Text(String),
    /// Text or SQL `NULL`.
    OptText(Option<String>),
    /// Integers: instants in microseconds, limits, integer sort keys.
    Int(i64),
    /// A 32-bit integer, for `int4` columns (segments, groups): PostgreSQL compares a parameter
    /// of the column's own type without a cast.
    Int32(i32),
    /// Numbers: number and quantity values.
    Real(f64),
    /// A boolean.
    Bool(bool),
    /// A list of 32-bit integers as one parameter: an `int4[]` on PostgreSQL, JSON text (for
    /// `json_each`) on SQLite.
    IntList(Vec<i32>),
    /// A list of text values as one parameter: a `text[]` on PostgreSQL, JSON text (for
    /// `json_each`) on SQLite. One parameter whatever its length, so an id set of 100,000 ids
    /// stays within the drivers' bind limits.
    TextList(Vec<String>),
}

impl From<Option<String>> for Bind {
    fn from(v: Option<String>) -> Self {
        Bind::OptText(v)
    }
}

impl From<&String> for Bind {
    fn from(v: &String) -> Self {
        Bind::Text(v.clone())
    }
}

impl From<i32> for Bind {
    fn from(v: i32) -> Self {
        Bind::Int32(v)
    }
}

impl From<bool> for Bind {
    fn from(v: bool) -> Self {
        Bind::Bool(v)
    }
}

impl From<Vec<i32>> for Bind {
    fn from(v: Vec<i32>) -> Self {
        Bind::IntList(v)
    }
}

impl From<String> for Bind {
    fn from(v: String) -> Self {
        Bind::Text(v)
    }
}

impl From<&str> for Bind {
    fn from(v: &str) -> Self {
        Bind::Text(v.to_owned())
    }
}

impl From<i64> for Bind {
    fn from(v: i64) -> Self {
        Bind::Int(v)
    }
}

impl From<f64> for Bind {
    fn from(v: f64) -> Self {
        Bind::Real(v)
    }
}

/// A statement being built: text with the dialect's placeholders (`?` on SQLite, `$n` on
/// PostgreSQL, as sqlx's own query builder writes them) and the values they stand for.
#[derive(Clone, Debug)]
pub struct Sql {
    dialect: Syntax,
    text: String,
    binds: Vec<Bind>,
    persistent: bool,
}

impl Sql {
    /// A statement starting with `head`.
    pub fn new(dialect: Syntax, head: impl Display) -> Self {
        Sql {
            dialect,
            text: head.to_string(),
            binds: Vec::new(),
            persistent: true,
        }
    }

    /// Binds the value of the next placeholder already in the text (`$1`, `$2`, … in order),
    /// for statements written out whole.
    pub fn bind(mut self, value: impl Into<Bind>) -> Self {
        self.binds.push(value.into());
        self
    }

    /// Whether the driver may cache the prepared statement (the default). A statement sent
    /// unnamed is planned with its actual values every time.
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// See [`Sql::persistent`].
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// The dialect the text is written in.
    pub fn dialect(&self) -> Syntax {
        self.dialect
    }

    /// Appends literal SQL.
    pub fn push(&mut self, sql: impl Display) -> &mut Self {
        // Writing to a String cannot fail.
        let _ = write!(self.text, "{sql}");
        self
    }

    /// Appends a placeholder for `value`.
    pub fn push_bind(&mut self, value: impl Into<Bind>) -> &mut Self {
        self.binds.push(value.into());
        match self.dialect {
            Syntax::Sqlite => self.text.push('?'),
            Syntax::Postgres => {
                let _ = write!(self.text, "${}", self.binds.len());
            }
        }
        self
    }

    /// Appends what a search-index row's `tenant` column equals for `tenant`: on SQLite the
    /// tenant's short key (`tenant_keys`, migration 0015), looked up in the statement; on
    /// PostgreSQL the name itself, which the schema is distributed by. `beside`, an alias
    /// of a table holding tenant names and pinned to the tenant already, is compared on
    /// PostgreSQL instead of a bind, as a correlated check there reads best.
    pub fn push_index_tenant(&mut self, tenant: &str, beside: Option<&str>) -> &mut Self {
        match (self.dialect, beside) {
            (Syntax::Sqlite, _) => {
                self.text
                    .push_str("(SELECT key FROM tenant_keys WHERE tenant = ");
                self.push_bind(tenant.to_owned());
                self.text.push(')');
            }
            (Syntax::Postgres, Some(alias)) => {
                let _ = write!(self.text, "{alias}.tenant");
            }
            (Syntax::Postgres, None) => {
                self.push_bind(tenant.to_owned());
            }
        }
        self
    }

    /// Appends `v1, v2, …`, one placeholder per value.
    pub fn push_bind_list<T: Into<Bind>>(&mut self, values: impl IntoIterator<Item = T>) {
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.push_bind(v);
        }
    }

    /// Appends `VALUES (…), (…)`, a parenthesised placeholder list per row.
    pub fn push_values(&mut self, rows: impl IntoIterator<Item = Vec<Bind>>) -> &mut Self {
        self.text.push_str("VALUES ");
        for (i, row) in rows.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.text.push('(');
            self.push_bind_list(row);
            self.text.push(')');
        }
        self
    }

    /// An empty statement of the same dialect, to build a part in that [`Sql::append`] adds
    /// later.
    pub fn empty(&self) -> Sql {
        Sql::new(self.dialect, "")
    }

    /// Appends `part`'s text and binds; PostgreSQL placeholders in `part` are renumbered to
    /// follow this statement's.
    pub fn append(&mut self, part: Sql) -> &mut Self {
        match self.dialect {
            Syntax::Sqlite => self.text.push_str(&part.text),
            Syntax::Postgres => {
                let offset = self.binds.len();
                renumber(&part.text, offset, &mut self.text);
            }
        }
        self.binds.extend(part.binds);
        self
    }

    /// The text between `prefix` and `suffix` as a statement with the same binds, when this
    /// statement is exactly `prefix`, a balanced middle, then `suffix`, and every parenthesis
    /// `prefix` opens is closed by `suffix`.
    pub fn inside(&self, prefix: &str, suffix: &str) -> Option<Sql> {
        let middle = self.text.strip_prefix(prefix)?.strip_suffix(suffix)?;
        let opens = prefix.matches('(').count();
        if prefix.contains(')')
            || suffix.contains('(')
            || opens != suffix.len() - suffix.trim_start_matches(')').len()
            || !balanced(middle)
        {
            return None;
        }
        Some(Sql {
            dialect: self.dialect,
            text: middle.to_owned(),
            binds: self.binds.clone(),
            persistent: self.persistent,
        })
    }

    /// The statement's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The values, in placeholder order.
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }

    /// This statement, if the database takes all its values in one statement; otherwise
    /// [`Error::TooCostly`] saying how many it needs. The search limits (criteria, OR values)
    /// allow queries with more values than that, which must be refused, not fail inside the
    /// driver.
    pub fn within_bind_limit(self) -> Result<Self> {
        let max = self.dialect.max_binds();
        if self.binds.len() > max {
            return Err(Error::TooCostly(format!(
                "the search needs {} values in one statement, beyond the database's limit of \
                 {max}; use fewer criteria or OR values, or split the search",
                self.binds.len()
            )));
        }
        Ok(self)
    }
}

/// Writes `text` to `out` with every `$n` placeholder outside quotes moved up by `offset`.
fn renumber(text: &str, offset: usize, out: &mut String) {
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c != '$' || quoted || !chars.peek().is_some_and(char::is_ascii_digit) {
            out.push(c);
            continue;
        }
        let mut n = 0usize;
        while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
            n = n * 10 + d as usize;
            chars.next();
        }
        let _ = write!(out, "${}", n + offset);
    }
}

/// Whether every parenthesis in `text` (outside quotes) closes one opened before it, and all
/// are closed.
fn balanced(text: &str) -> bool {
    let mut depth = 0i64;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}
