//! Structural validation of resources against the official FHIR R4 JSON schema.
//!
//! The schema (`fhir-profiles/fhir-json-schema-validator-0.9.8/fhir.schema.json`, draft-06,
//! 146 resource types) is embedded and compiled once, on first use. It checks element names,
//! JSON types, required elements and value formats: what a store must refuse before it keeps
//! anything. Profiles, invariants and terminology bindings are not checked.

use std::sync::OnceLock;

use serde_json::Value;

use crate::error::{Error, Result};

const R4_SCHEMA: &str =
    include_str!("../../../fhir-profiles/fhir-json-schema-validator-0.9.8/fhir.schema.json");

/// How many problems an error message lists.
const MAX_REPORTED: usize = 5;

/// Whether a store validates bodies before writing them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Validation {
    /// Reject resources the R4 schema rejects.
    #[default]
    Strict,
    /// Store whatever passes the basic checks (object, resourceType, id).
    Off,
}

/// The compiled R4 schema.
pub struct SchemaValidator {
    /// The whole schema: one `oneOf` over every resource type. Fast to ask "valid?", but its
    /// errors only say that no alternative matched.
    validator: jsonschema::Validator,
    schema: Value,
    /// Per-type validators, compiled on the first invalid body of each type to name the
    /// failing paths; valid bodies never need them.
    by_type: parking_lot::Mutex<
        std::collections::HashMap<String, std::sync::Arc<jsonschema::Validator>>,
    >,
}

impl std::fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchemaValidator(R4)")
    }
}

impl SchemaValidator {
    /// The R4 schema, compiled on first use (about 50–80 ms).
    pub fn r4() -> Result<&'static SchemaValidator> {
        static R4: OnceLock<std::result::Result<SchemaValidator, String>> = OnceLock::new();
        R4.get_or_init(|| {
            let mut schema: Value = serde_json::from_str(R4_SCHEMA).map_err(|e| e.to_string())?;
            tighten(&mut schema);
            let validator = build(&schema)?;
            Ok(SchemaValidator {
                validator,
                schema,
                by_type: Default::default(),
            })
        })
        .as_ref()
        .map_err(|e| Error::Backend {
            message: format!("the embedded R4 schema does not compile: {e}"),
            temporary: false,
            source: None,
        })
    }

    /// Checks a body; the error lists the first problems with their JSON paths.
    pub fn validate(&self, body: &Value) -> Result<()> {
        if self.validator.is_valid(body) {
            return Ok(());
        }
        let type_validator = body
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(|t| self.for_type(t));
        let validator = type_validator.as_deref().unwrap_or(&self.validator);
        let problems: Vec<String> = validator
            .iter_errors(body)
            .take(MAX_REPORTED)
            .map(|e| {
                let path = e.instance_path().to_string();
                let at = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                format!("{at}: {e}")
            })
            .collect();
        Err(Error::InvalidResource(format!(
            "the resource does not conform to the FHIR R4 schema: {}",
            problems.join("; ")
        )))
    }
}

impl SchemaValidator {
    /// The schema of one resource type: the whole schema with its root `oneOf` replaced by a
    /// reference to that type's definition.
    fn for_type(&self, resource_type: &str) -> Option<std::sync::Arc<jsonschema::Validator>> {
        let mut cache = self.by_type.lock();
        if let Some(v) = cache.get(resource_type) {
            return Some(v.clone());
        }
        let definitions = self.schema.get("definitions")?;
        definitions.get(resource_type)?;
        let schema = serde_json::json!({
            "$schema": self.schema.get("$schema").cloned().unwrap_or(Value::Null),
            "definitions": definitions,
            "$ref": format!("#/definitions/{resource_type}"),
        });
        let v = std::sync::Arc::new(build(&schema).ok()?);
        cache.insert(resource_type.to_owned(), v.clone());
        Some(v)
    }
}

/// The `format` that [`tighten`] gives the date primitives.
const CALENDAR_DATE: &str = "fhir-calendar-date";

/// Closes two gaps of the published schema, which checks shapes a FHIR server must refuse:
/// - its complex types (`Extension`, `HumanName`, every resource) list `properties` without
///   `"type": "object"`, and JSON Schema applies `properties` to objects only, so
///   `"extension": [1]` or `"name": [[…]]` passed;
/// - its `date`, `dateTime` and `instant` patterns accept any day 01–31 in any month, so
///   `2021-02-30` passed, and was then indexed as a range no search could find.
fn tighten(schema: &mut Value) {
    let Some(defs) = schema.get_mut("definitions").and_then(Value::as_object_mut) else {
        return;
    };
    // Choice elements (`effectiveDateTime`) repeat the date patterns inline instead of naming
    // the primitive, so the patterns are what identifies a date.
    let date_patterns: Vec<Value> = ["date", "dateTime", "instant"]
        .iter()
        .filter_map(|t| defs.get(*t)?.get("pattern").cloned())
        .collect();
    for def in defs.values_mut() {
        if let Some(def) = def.as_object_mut() {
            if def.contains_key("properties") && !def.contains_key("type") {
                def.insert("type".into(), Value::String("object".into()));
            }
        }
    }
    mark_dates(schema, &date_patterns);
}

/// Gives every schema whose `pattern` is a date pattern the calendar check.
fn mark_dates(v: &mut Value, patterns: &[Value]) {
    match v {
        Value::Object(o) => {
            if o.get("pattern").is_some_and(|p| patterns.contains(p)) {
                o.insert("format".into(), Value::String(CALENDAR_DATE.into()));
            }
            o.values_mut().for_each(|c| mark_dates(c, patterns));
        }
        Value::Array(items) => items.iter_mut().for_each(|c| mark_dates(c, patterns)),
        _ => {}
    }
}

fn build(schema: &Value) -> std::result::Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_format(CALENDAR_DATE, is_calendar_date)
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())
}

/// Whether the `YYYY-MM-DD` prefix of a FHIR date, dateTime or instant names a real day (the
/// schema's pattern has already checked the digits); a value with only a year or a month is.
fn is_calendar_date(s: &str) -> bool {
    let field = |range: std::ops::Range<usize>| s.get(range).and_then(|d| d.parse::<u32>().ok());
    let (Some(year), Some(month), Some(day)) = (field(0..4), field(5..7), field(8..10)) else {
        return true;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    (1..=days).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_resources_pass_and_invalid_ones_name_the_path() {
        let v = SchemaValidator::r4().expect("schema compiles");
        v.validate(
            &json!({"resourceType": "Patient", "gender": "female", "birthDate": "1974-12-25"}),
        )
        .expect("valid");
        for d in ["2024-02-29", "2000-02-29", "1974-12", "1974", "2021-04-30"] {
            v.validate(&json!({"resourceType": "Patient", "birthDate": d}))
                .unwrap_or_else(|e| panic!("{d}: {e}"));
        }
        let cases = [
            (json!({"resourceType": "Patient", "gender": 5}), "/gender"),
            (
                json!({"resourceType": "Patient", "birthDate": "25/12/1974"}),
                "/birthDate",
            ),
            (
                json!({"resourceType": "Patient", "nickname": "x"}),
                "nickname",
            ),
            (
                json!({"resourceType": "Observation", "status": "final"}),
                "code",
            ),
            (
                json!({"resourceType": "Patient", "extension": [1]}),
                "/extension/0",
            ),
            (
                json!({"resourceType": "Patient", "extension": ["x"]}),
                "/extension/0",
            ),
            (
                json!({"resourceType": "Patient", "name": [[{"family": 5}]]}),
                "/name/0",
            ),
            (
                json!({"resourceType": "Patient", "birthDate": "2021-02-30"}),
                "/birthDate",
            ),
            (
                json!({"resourceType": "Patient", "birthDate": "2023-02-29"}),
                "/birthDate",
            ),
            (
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                       "effectiveDateTime": "2021-04-31T10:00:00Z"}),
                "/effectiveDateTime",
            ),
        ];
        for (body, want) in cases {
            match v.validate(&body) {
                Err(Error::InvalidResource(m)) => assert!(m.contains(want), "{m} lacks {want}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn official_examples_conform() {
        let v = SchemaValidator::r4().expect("schema compiles");
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/r4-examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            let body: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            if let Err(e) = v.validate(&body) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
        assert!(checked > 600);
    }
}
