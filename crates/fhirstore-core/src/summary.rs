//! Which top-level elements `_summary` keeps (R4 search.html#summary), from the `isSummary`
//! flags and minimum cardinalities of the official StructureDefinitions, derived into
//! `fhir-profiles/summary-elements.json` (see `derive_summary_elements.py` beside it).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

const DATA: &str = include_str!("../../../fhir-profiles/summary-elements.json");

#[derive(Debug, Default, Deserialize)]
struct TypeElements {
    summary: Vec<String>,
    mandatory: Vec<String>,
}

/// The summary and mandatory top-level elements of every R4 resource type.
#[derive(Debug, Default)]
pub struct SummaryElements(HashMap<String, TypeElements>);

impl SummaryElements {
    /// The R4 flags, parsed on first use.
    pub fn r4() -> &'static SummaryElements {
        static R4: OnceLock<SummaryElements> = OnceLock::new();
        // Embedded and checked by the tests; an unreadable file would mean summaries keep
        // only what every resource has (resourceType, id, meta).
        R4.get_or_init(|| SummaryElements(serde_json::from_str(DATA).unwrap_or_default()))
    }

    /// Whether `_summary=true` keeps the JSON property `key` of a `resource_type`.
    pub fn in_summary(&self, resource_type: &str, key: &str) -> bool {
        matches!(key, "resourceType" | "id" | "meta")
            || self
                .0
                .get(resource_type)
                .is_some_and(|t| t.summary.iter().any(|e| names(e, key)))
    }

    /// Whether `_summary=text` keeps `key`: text, id, meta and the mandatory elements.
    pub fn in_text_summary(&self, resource_type: &str, key: &str) -> bool {
        matches!(key, "resourceType" | "id" | "meta" | "text")
            || self
                .0
                .get(resource_type)
                .is_some_and(|t| t.mandatory.iter().any(|e| names(e, key)))
    }
}

/// Whether the element `element` (`gender`, or a choice `value[x]`) is the JSON property `key`
/// (`gender`, `valueQuantity`), or its primitive extension (`_gender`).
fn names(element: &str, key: &str) -> bool {
    let key = key.strip_prefix('_').unwrap_or(key);
    match element.strip_suffix("[x]") {
        Some(stem) => key
            .strip_prefix(stem)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| c.is_ascii_uppercase()),
        None => element == key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_flags_come_from_the_definitions() {
        let s = SummaryElements::r4();
        assert!(s.0.len() >= 146);
        for key in [
            "id",
            "meta",
            "name",
            "gender",
            "birthDate",
            "deceasedBoolean",
            "_gender",
        ] {
            assert!(s.in_summary("Patient", key), "{key}");
        }
        for key in ["text", "contact", "photo", "maritalStatus", "deceased"] {
            assert!(!s.in_summary("Patient", key), "{key}");
        }
        assert!(s.in_summary("Observation", "valueQuantity"));
        assert!(s.in_text_summary("Observation", "status"));
        assert!(s.in_text_summary("Observation", "text"));
        assert!(!s.in_text_summary("Observation", "subject"));
    }
}
