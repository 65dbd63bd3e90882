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
    let mut scanner = DuplicateKeys::default();
    scanner.feed(bytes);
    scanner.found()
}

/// One open container: for an object, the keys seen so far and whether the next string is a
/// key.
#[derive(Debug)]
enum Open {
    Object {
        keys: std::collections::HashSet<String>,
        expect_key: bool,
    },
    Array,
}

/// [`duplicate_key`] over text that arrives in pieces (a file as it is read), in memory that
/// grows with the nesting and the keys of the open objects only.
#[derive(Debug, Default)]
pub struct DuplicateKeys {
    stack: Vec<Open>,
    /// Inside a string: its bytes so far (kept only for a key), and whether the last byte was
    /// a backslash.
    string: Option<(Vec<u8>, bool)>,
    escaped_key: bool,
    start: usize,
    offset: usize,
    found: Option<(String, usize)>,
}

impl DuplicateKeys {
    /// Scans the next piece of the text.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.found.is_some() {
                return;
            }
            self.step(b);
            self.offset += 1;
        }
    }

    /// The first repeated key and the offset of its second occurrence, once seen.
    pub fn found(&self) -> Option<(String, usize)> {
        self.found.clone()
    }

    fn step(&mut self, b: u8) {
        if let Some((buf, escape)) = &mut self.string {
            let in_key = matches!(
                self.stack.last(),
                Some(Open::Object {
                    expect_key: true,
                    ..
                })
            );
            if *escape {
                *escape = false;
            } else if b == b'\\' {
                *escape = true;
                self.escaped_key |= in_key;
            } else if b == b'"' {
                let raw = std::mem::take(buf);
                self.string = None;
                if in_key {
                    self.end_key(raw);
                }
                return;
            }
            if in_key {
                buf.push(b);
            }
            return;
        }
        match b {
            b'{' => self.stack.push(Open::Object {
                keys: Default::default(),
                expect_key: true,
            }),
            b'[' => self.stack.push(Open::Array),
            b'}' | b']' => {
                self.stack.pop();
            }
            b',' => {
                if let Some(Open::Object { expect_key, .. }) = self.stack.last_mut() {
                    *expect_key = true;
                }
            }
            b'"' => {
                self.start = self.offset;
                self.escaped_key = false;
                self.string = Some((Vec::new(), false));
            }
            _ => {}
        }
    }

    fn end_key(&mut self, raw: Vec<u8>) {
        let escaped = self.escaped_key;
        let start = self.start;
        let Some(Open::Object { keys, expect_key }) = self.stack.last_mut() else {
            return;
        };
        *expect_key = false;
        // Escapes spell one key several ways: compare what they decode to.
        let key = if escaped {
            let mut quoted = Vec::with_capacity(raw.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(&raw);
            quoted.push(b'"');
            match serde_json::from_slice::<String>(&quoted) {
                Ok(k) => k,
                Err(_) => return,
            }
        } else {
            String::from_utf8_lossy(&raw).into_owned()
        };
        if !keys.insert(key.clone()) {
            self.found = Some((key, start));
        }
    }
}

/// A reader that fails with [`std::io::ErrorKind::InvalidData`] as soon as the JSON text
/// through it names a key twice in one object, so a streaming parser stops there.
#[derive(Debug)]
pub struct NoDuplicateKeys<R> {
    inner: R,
    scanner: DuplicateKeys,
}

impl<R> NoDuplicateKeys<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        NoDuplicateKeys {
            inner,
            scanner: DuplicateKeys::default(),
        }
    }
}

impl<R: std::io::Read> std::io::Read for NoDuplicateKeys<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scanner.feed(&buf[..n]);
        if let Some((key, at)) = self.scanner.found() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the key {key:?} appears twice in one object (byte {at})"),
            ));
        }
        Ok(n)
    }
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

    #[test]
    fn pieces_find_what_the_whole_finds() {
        let text = br#"{"a":{"x\u0062":1,"xb":2},"a2":[{"k":1,"k":2}]}"#;
        let whole = duplicate_key(text);
        assert_eq!(whole.as_ref().map(|d| d.0.as_str()), Some("xb"));
        for size in 1..text.len() {
            let mut s = DuplicateKeys::default();
            for piece in text.chunks(size) {
                s.feed(piece);
            }
            assert_eq!(s.found(), whole, "pieces of {size}");
        }
        let mut r = NoDuplicateKeys::new(&br#"{"a":1,"a":2}"#[..]);
        let mut out = Vec::new();
        let e = std::io::Read::read_to_end(&mut r, &mut out).expect_err("duplicate");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
