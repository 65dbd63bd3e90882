//! Extracting search-index values from a resource body.
//!
//! Every backend indexes through these functions, so the primary and its secondaries agree on
//! what a resource matches.

use serde_json::Value;

/// One token index entry: a (system, code) pair under a parameter name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenEntry {
    /// The search parameter, e.g. `identifier`.
    pub param: &'static str,
    /// The code system; empty when the value has none.
    pub system: String,
    /// The code.
    pub code: String,
}

/// All index entries for one resource version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexEntries {
    /// Token entries, sorted and without duplicates.
    pub tokens: Vec<TokenEntry>,
}

/// Extracts the index entries of a resource body. Tombstones have none.
pub fn extract(content: &Value) -> IndexEntries {
    let mut tokens = Vec::new();
    // `identifier` is an Identifier or a list of them at the top of every resource that has one.
    let identifiers = match content.get("identifier") {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        _ => Vec::new(),
    };
    for ident in identifiers {
        if let Some(code) = ident.get("value").and_then(Value::as_str) {
            let system = ident.get("system").and_then(Value::as_str).unwrap_or("");
            tokens.push(TokenEntry {
                param: "identifier",
                system: system.to_owned(),
                code: code.to_owned(),
            });
        }
    }
    tokens.sort_unstable();
    tokens.dedup();
    IndexEntries { tokens }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_become_tokens() {
        let r = json!({"resourceType": "Patient", "identifier": [
            {"system": "urn:s", "value": "1"}, {"value": "2"}, {"system": "urn:s"},
            {"system": "urn:s", "value": "1"}]});
        let e = extract(&r);
        assert_eq!(e.tokens.len(), 2);
        assert_eq!(
            (e.tokens[0].system.as_str(), e.tokens[0].code.as_str()),
            ("", "2")
        );
        assert_eq!(
            (e.tokens[1].system.as_str(), e.tokens[1].code.as_str()),
            ("urn:s", "1")
        );
        let single = json!({"resourceType": "Bundle", "identifier": {"system": "s", "value": "v"}});
        assert_eq!(extract(&single).tokens.len(), 1);
        assert!(extract(&Value::Null).tokens.is_empty());
    }
}
