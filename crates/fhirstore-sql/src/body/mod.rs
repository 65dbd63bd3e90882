//! How a resource body is stored: JSON text, or deflated against a fixed dictionary of FHIR
//! JSON behind a format byte.
//!
//! A stored FHIR resource is small (most are under 2 kB) and repeats its element names, code
//! systems and references: plain deflate takes a generated clinical body to about 54% of its
//! size, deflate primed with FHIR JSON to about 34%. Neither dialect does this for us:
//! PostgreSQL compresses only values past about 2 kB, SQLite not at all.
//!
//! The first byte says the format, so every body written before stays readable:
//! - `{` (or JSON whitespace): the JSON text itself;
//! - [`DEFLATE_V1`]: raw deflate (RFC 1951) primed with `dictionary-v1.txt`.
//!
//! The dictionary is part of the format: data written with it can only be read with it, so
//! it never changes (a test pins its hash). A better one would be a new format byte.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The format byte of a body deflated against [`DICTIONARY_V1`].
pub(crate) const DEFLATE_V1: u8 = 0x01;

/// Compact JSON of the R4 examples of twenty common clinical and administrative types (the
/// `fhir.r4.examples` package, CC0), least common first, their narratives dropped, then the
/// element and code-system fragments generated clinical data repeats most, so the commonest
/// sit nearest the data and cost the shortest distances.
pub(crate) const DICTIONARY_V1: &[u8] = include_bytes!("dictionary-v1.txt");

thread_local! {
    /// A compressor per thread: deflate's state is a few hundred kilobytes, which a fresh
    /// allocation per body would spend more time clearing than compressing.
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// The bytes to store for the JSON `text`: deflated at `level` (1 to 9) behind
/// [`DEFLATE_V1`], or the text itself when `level` is 0 or deflating would not make it
/// smaller.
pub(crate) fn encode(text: &str, level: u32) -> Vec<u8> {
    if level == 0 {
        return text.as_bytes().to_vec();
    }
    let level = level.min(9);
    let deflated = DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compress = match slot.as_mut() {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            _ => {
                &mut slot
                    .insert((level, Compress::new(Compression::new(level), false)))
                    .1
            }
        };
        deflate(compress, text.as_bytes())
    });
    match deflated {
        Some(out) if out.len() < text.len() => out,
        _ => text.as_bytes().to_vec(),
    }
}

/// `[DEFLATE_V1, deflate(input)]`, or `None` if the compressor refused (it does not, for a
/// primed stream and enough room; the caller then stores the text).
fn deflate(compress: &mut Compress, input: &[u8]) -> Option<Vec<u8>> {
    compress.set_dictionary(DICTIONARY_V1).ok()?;
    // Deflate's worst case: the input in stored blocks, 5 bytes of framing per 16 kB block.
    let mut out = Vec::with_capacity(input.len() + input.len() / 16_000 * 5 + 64);
    out.push(DEFLATE_V1);
    loop {
        let consumed = usize::try_from(compress.total_in()).ok()?;
        let rest = input.get(consumed..)?;
        if out.len() == out.capacity() {
            out.reserve(input.len() / 2 + 64);
        }
        match compress
            .compress_vec(rest, &mut out, FlushCompress::Finish)
            .ok()?
        {
            Status::StreamEnd => return Some(out),
            Status::Ok | Status::BufError => {}
        }
    }
}

/// Why a stored body could not be read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Undecodable(pub(crate) String);

/// The JSON text of a stored body, whichever format it was stored in.
pub(crate) fn decode(stored: Vec<u8>) -> Result<Vec<u8>, Undecodable> {
    match stored.first() {
        Some(&DEFLATE_V1) => INFLATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let inflate = match slot.as_mut() {
                Some(d) => {
                    d.reset(false);
                    d
                }
                None => slot.insert(Decompress::new(false)),
            };
            inflate_v1(inflate, &stored[1..])
        }),
        Some(b'{' | b' ' | b'\t' | b'\n' | b'\r') => Ok(stored),
        Some(other) => Err(Undecodable(format!(
            "unknown body format byte {other:#04x}"
        ))),
        None => Err(Undecodable("an empty body".into())),
    }
}

/// Inflates a [`DEFLATE_V1`] body (after its format byte).
fn inflate_v1(inflate: &mut Decompress, input: &[u8]) -> Result<Vec<u8>, Undecodable> {
    let bad = |what: &str| Undecodable(format!("a deflated body {what}"));
    inflate
        .set_dictionary(DICTIONARY_V1)
        .map_err(|e| bad(&format!("rejected its dictionary: {e}")))?;
    // FHIR JSON deflates to about a third; start there and grow.
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    loop {
        let consumed = usize::try_from(inflate.total_in()).map_err(|_| bad("is too long"))?;
        let rest = input
            .get(consumed..)
            .ok_or_else(|| bad("overran its input"))?;
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(256));
        }
        let before = (inflate.total_in(), inflate.total_out());
        let status = inflate
            .decompress_vec(rest, &mut out, FlushDecompress::Finish)
            .map_err(|e| bad(&format!("is corrupt: {e}")))?;
        match status {
            Status::StreamEnd => return Ok(out),
            // No progress with room to spare: the stream ends before its end marker.
            _ if before == (inflate.total_in(), inflate.total_out())
                && out.len() < out.capacity() =>
            {
                return Err(bad("is truncated"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        serde_json::json!({
            "resourceType": "Observation",
            "id": "bp-1",
            "meta": {"versionId": "3", "lastUpdated": "2026-12-01T10:00:00Z"},
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6",
                                  "display": "Systolic blood pressure"}]},
            "subject": {"reference": "Patient/p-1"},
            "effectiveDateTime": "2026-11-30T08:15:00Z",
            "valueQuantity": {"value": 128, "unit": "mmHg",
                              "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
        })
        .to_string()
    }

    #[test]
    fn bodies_round_trip_at_every_level() {
        let text = sample();
        for level in 0..=9 {
            let stored = encode(&text, level);
            assert_eq!(
                stored.first() == Some(&DEFLATE_V1),
                level > 0,
                "level {level}"
            );
            let back = decode(stored).expect("decodes");
            assert_eq!(back, text.as_bytes(), "level {level}");
        }
    }

    #[test]
    fn the_dictionary_shrinks_fhir_json_beyond_plain_deflate() {
        let text = sample();
        let primed = encode(&text, 6).len();
        let mut plain = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(text.len() + 64);
        let status = plain
            .compress_vec(text.as_bytes(), &mut out, FlushCompress::Finish)
            .expect("deflates");
        assert_eq!(status, Status::StreamEnd);
        assert!(
            primed * 3 < out.len() * 2,
            "primed {primed} bytes, plain {} of {}",
            out.len(),
            text.len()
        );
    }

    #[test]
    fn large_and_incompressible_bodies_round_trip() {
        let big: String = serde_json::json!({
            "resourceType": "Binary",
            "data": (0..200_000u32)
                .map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
                .collect::<String>()
        })
        .to_string();
        let stored = encode(&big, 9);
        assert_eq!(decode(stored).expect("decodes"), big.as_bytes());
        // Too short to gain: stored as it is.
        assert_eq!(encode("{}", 6), b"{}");
    }

    #[test]
    fn damaged_bodies_are_errors_not_panics() {
        let mut stored = encode(&sample(), 6);
        let cut = stored.len() / 2;
        assert!(decode(stored[..cut].to_vec()).is_err());
        stored[3] ^= 0xff;
        stored[4] ^= 0x55;
        // A flipped byte may still inflate to something; it must not panic.
        let _ = decode(stored);
        assert!(decode(vec![0x7f, 1, 2]).is_err());
        assert!(decode(Vec::new()).is_err());
        assert!(decode(vec![DEFLATE_V1]).is_err());
    }

    /// Bodies written with the dictionary can only be read with it: it must never change.
    #[test]
    fn the_dictionary_is_frozen() {
        assert_eq!(DICTIONARY_V1.len(), 24_634);
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(DICTIONARY_V1),
            FROZEN_DICTIONARY_HASH,
            "dictionary-v1.txt changed: stored bodies would no longer inflate"
        );
    }

    /// xxh3 of `dictionary-v1.txt` as first committed.
    const FROZEN_DICTIONARY_HASH: u64 = 4_281_981_606_677_780_410;
}
