//! SQL text with its bind values, built without a database connection.

use std::fmt::{Display, Write as _};

use crate::Dialect;

/// One bind value. The planner binds only these three kinds; the driver layer turns each into
/// its own parameter type.
#[derive(Clone, Debug, PartialEq)]
pub enum Bind {
    /// Text: tenants, types, ids, codes, strings, sort keys.
    Text(String),
    /// Integers: instants in microseconds, limits, integer sort keys.
    Int(i64),
    /// Numbers: number and quantity values.
    Real(f64),
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
    dialect: Dialect,
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    /// A statement starting with `head`.
    pub fn new(dialect: Dialect, head: impl Display) -> Self {
        Sql {
            dialect,
            text: head.to_string(),
            binds: Vec::new(),
        }
    }

    /// The dialect the text is written in.
    pub fn dialect(&self) -> Dialect {
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
            Dialect::Sqlite => self.text.push('?'),
            Dialect::Postgres => {
                let _ = write!(self.text, "${}", self.binds.len());
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

    /// The statement's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The values, in placeholder order.
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }
}
