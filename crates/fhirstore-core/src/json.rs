//! Reading JSON as FHIR requires it: an object may not name the same key twice.
//!
//! serde_json keeps the last of two equal keys without a word, so `{"gender":"male",
//! "gender":"female"}` would be stored as one of two meanings the client sent. RFC 8259 leaves
//! duplicate names undefined, and FHIR's JSON format forbids them. The check is a second pass
//! over text that has already parsed, so it only has to follow strings and nesting.

use serde_json::Value;

/// Parses `bytes` as JSON, refusing an object that names a key twice. The error is for people:
/// it says what is wrong and where.
pub fn from_slice_strict(bytes: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match duplicate_key(bytes) {
        Some((key, at)) => Err(format!(
            "the key {key:?} appears twice in one object (byte {at}); FHIR JSON names each \
             property once"
        )),
        None => Ok(value),
    }
}

/// The first key that repeats within one object of well-formed JSON text, with the byte offset
/// of its second occurrence.
pub fn duplicate_key(bytes: &[u8]) -> Option<(String, usize)> {
    /// One open container: for an object, the keys seen so far and whether the next string is
    /// a key.
    enum Open {
        Object {
            keys: std::collections::HashSet<String>,
            expect_key: bool,
        },
        Array,
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => stack.push(Open::Object {
                keys: Default::default(),
                expect_key: true,
            }),
            b'[' => stack.push(Open::Array),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => {
                if let Some(Open::Object { expect_key, .. }) = stack.last_mut() {
                    *expect_key = true;
                }
            }
            b'"' => {
                let start = i;
                i += 1;
                let mut escaped = false;
                while i < bytes.len() && bytes[i] != b'"' {
                    escaped |= bytes[i] == b'\\';
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(Open::Object { keys, expect_key }) = stack.last_mut() {
                    if *expect_key {
                        *expect_key = false;
                        let raw = bytes.get(start..=i)?;
                        // Escapes spell one key several ways: compare what they decode to.
                        let key = if escaped {
                            serde_json::from_slice::<String>(raw).ok()?
                        } else {
                            String::from_utf8_lossy(&raw[1..raw.len() - 1]).into_owned()
                        };
                        if !keys.insert(key.clone()) {
                            return Some((key, start));
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_at_any_depth_and_however_spelled() {
        for (text, key) in [
            (r#"{"a":1,"a":2}"#, "a"),
            (r#"{"x":{"b":[{"c":1,"c":1}]}}"#, "c"),
            (r#"{"gender":"male","gend\u0065r":"female"}"#, "gender"),
            (r#"{"a":{"k":1},"b":{"k":1},"a":3}"#, "a"),
        ] {
            assert_eq!(
                duplicate_key(text.as_bytes()).map(|d| d.0),
                Some(key.into()),
                "{text}"
            );
            let e = from_slice_strict(text.as_bytes()).expect_err(text);
            assert!(e.contains("twice"), "{e}");
        }
    }

    #[test]
    fn equal_keys_in_different_objects_and_key_like_values_are_fine() {
        for text in [
            r#"{"a":{"k":1},"b":{"k":1}}"#,
            r#"[{"a":1},{"a":1}]"#,
            r#"{"a":"a","b":["a","a"],"c":"x\"a\\"}"#,
            r#"{"s":"{\"a\":1,\"a\":2}"}"#,
        ] {
            assert_eq!(duplicate_key(text.as_bytes()), None, "{text}");
            assert!(from_slice_strict(text.as_bytes()).is_ok(), "{text}");
        }
        assert!(from_slice_strict(b"{").is_err());
    }

    #[test]
    fn decimals_keep_their_written_precision() {
        let text =
            r#"{"big":1606938044258990275541962092341162602522202993782792835301376,"v":1.50}"#;
        let v = from_slice_strict(text.as_bytes()).expect("parses");
        assert_eq!(serde_json::to_string(&v).expect("serialises"), text);
        assert_eq!(crate::digest::canonical_json(&v), text.as_bytes());
    }
}
