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
    by_type:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
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
            let schema: Value = serde_json::from_str(R4_SCHEMA).map_err(|e| e.to_string())?;
            let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
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
        let mut cache = self.by_type.lock().ok()?;
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
        let v = std::sync::Arc::new(jsonschema::validator_for(&schema).ok()?);
        cache.insert(resource_type.to_owned(), v.clone());
        Some(v)
    }
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
