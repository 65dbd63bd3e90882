//! Resource intake: JSON text → duplicate-key check → body checks → schema validation → index
//! extraction → the canonical form that is stored and hashed. Never a panic, and the canonical
//! form reads back to itself.
#![no_main]

use fhirstore_core::digest::canonical_json;
use fhirstore_core::resource::{check_body, prepare_body, IdRule};
use fhirstore_core::validate::SchemaValidator;
use fhirstore_core::{from_micros, index, LogicalId, ResourceType, VersionId};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = fhirstore_core::json::from_slice_strict(data) else {
        return;
    };
    let Some(rt) = body
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|t| ResourceType::new(t).ok())
    else {
        return;
    };
    if check_body(rt, &body, IdRule::Ignore).is_err() {
        return;
    }
    let validator = SchemaValidator::r4().expect("the embedded schema compiles");
    let _ = validator.validate(&body);
    let _ = index::extract(&body);
    let id = LogicalId::new("fuzz").expect("a constant id");
    if let Ok(p) = prepare_body(body, &id, VersionId::FIRST, from_micros(0), 1 << 20) {
        let again: Value = serde_json::from_slice(&p.canonical).expect("canonical JSON parses");
        assert_eq!(
            canonical_json(&again),
            p.canonical,
            "canonical form is stable"
        );
    }
});
