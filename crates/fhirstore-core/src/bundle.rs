//! Transaction support shared by backends: `urn:uuid:` reference resolution.

use std::collections::HashMap;

use serde_json::Value;

/// Rewrites every `reference` string in `body` that names a key of `map` (a Bundle entry's
/// `fullUrl`, such as `urn:uuid:…`) to the map's value (`Type/id`). Returns how many were
/// rewritten.
pub fn rewrite_references(body: &mut Value, map: &HashMap<String, String>) -> usize {
    if map.is_empty() {
        return 0;
    }
    match body {
        Value::Object(obj) => {
            let mut n = 0;
            for (k, v) in obj.iter_mut() {
                match v {
                    Value::String(s) if k == "reference" => {
                        if let Some(target) = map.get(s.as_str()) {
                            *s = target.clone();
                            n += 1;
                        }
                    }
                    other => n += rewrite_references(other, map),
                }
            }
            n
        }
        Value::Array(items) => items.iter_mut().map(|i| rewrite_references(i, map)).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_references_are_rewritten() {
        let mut body = json!({"resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "urn:uuid:2"}, {"reference": "Practitioner/x"}],
            "note": [{"text": "urn:uuid:1"}]});
        let map = HashMap::from([
            ("urn:uuid:1".to_string(), "Patient/p".to_string()),
            ("urn:uuid:2".to_string(), "Practitioner/q".to_string()),
        ]);
        assert_eq!(rewrite_references(&mut body, &map), 2);
        assert_eq!(body["subject"]["reference"], "Patient/p");
        assert_eq!(body["performer"][0]["reference"], "Practitioner/q");
        assert_eq!(body["performer"][1]["reference"], "Practitioner/x");
        assert_eq!(body["note"][0]["text"], "urn:uuid:1");
    }
}
