//! Digest primitives shared by the primary, every secondary and the reconciler.
//!
//! Each resource's current version has an element hash
//! `E = xxh3_128(tenant|type|id ‖ versionId ‖ blake3(canonical JSON))`, XORed into one of
//! [`SEGMENTS`] segments per (tenant, type). XOR makes the digest order-independent and lets a
//! write update it in O(1): remove the old version's `E`, add the new one. Every backend must
//! compute these with the functions here, or digests cannot be compared.

use serde_json::Value;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::model::VersionId;
use crate::tenant::TenantId;
use crate::ResourceType;

/// Segments per (tenant, type): the top 16 bits of the key hash.
pub const SEGMENTS: u32 = 65_536;

/// Low bits of a segment number dropped to name its group: 16 segments per group.
pub const GROUP_SHIFT: u32 = 4;

/// Groups per (tenant, type). The reconciler compares these coarse digests before any segment,
/// so a few drifted keys among millions cost 4,096 group rows plus 16 segment rows per
/// differing group, instead of all 65,536 segment rows.
pub const GROUPS: u32 = SEGMENTS >> GROUP_SHIFT;

/// The group a segment belongs to.
pub fn group_of(segment: u16) -> u16 {
    segment >> GROUP_SHIFT
}

/// The segments of a group.
pub fn group_segments(group: u16) -> std::ops::RangeInclusive<u16> {
    let first = group << GROUP_SHIFT;
    first..=first | ((1 << GROUP_SHIFT) - 1)
}

/// The content hash of a tombstone: no resource body, so no blake3 output; all zeros cannot
/// collide with a real hash in practice.
pub const TOMBSTONE_CONTENT_HASH: [u8; 32] = [0; 32];

/// Serialises `v` canonically: object keys sorted by their UTF-8 bytes, no insignificant
/// whitespace. Independent of serde_json's map ordering features, which another crate in a
/// build can switch on.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(val, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Writing a scalar Value into a Vec cannot fail: no I/O, and scalars have no map keys.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// blake3 of a canonical JSON body.
pub fn content_hash(canonical: &[u8]) -> [u8; 32] {
    *blake3::hash(canonical).as_bytes()
}

fn key_bytes(tenant: &TenantId, resource_type: ResourceType, id: &str) -> Vec<u8> {
    let mut k =
        Vec::with_capacity(tenant.as_str().len() + resource_type.as_str().len() + id.len() + 2);
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(b'|');
    k.extend_from_slice(resource_type.as_str().as_bytes());
    k.push(b'|');
    k.extend_from_slice(id.as_bytes());
    k
}

/// The segment a key's element hash belongs to: the top 16 bits of `xxh3_64(tenant|type|id)`.
pub fn segment(tenant: &TenantId, resource_type: ResourceType, id: &str) -> u16 {
    (xxh3_64(&key_bytes(tenant, resource_type, id)) >> 48) as u16
}

/// The element hash of one resource version. `content_hash` is [`content_hash`] of the canonical
/// body, or [`TOMBSTONE_CONTENT_HASH`] for a deletion.
///
/// The key comes first and the version and hash have fixed widths, so the concatenation is
/// unambiguous.
pub fn element_hash(
    tenant: &TenantId,
    resource_type: ResourceType,
    id: &str,
    version: VersionId,
    content_hash: &[u8; 32],
) -> u128 {
    let mut buf = key_bytes(tenant, resource_type, id);
    buf.extend_from_slice(&version.get().to_be_bytes());
    buf.extend_from_slice(content_hash);
    xxh3_128(&buf)
}

/// Splits a 128-bit hash into two signed 64-bit halves (high, low) for SQL `BIGINT` columns.
pub fn split_u128(h: u128) -> (i64, i64) {
    ((h >> 64) as u64 as i64, h as u64 as i64)
}

/// The inverse of [`split_u128`].
pub fn join_u128(hi: i64, lo: i64) -> u128 {
    (u128::from(hi as u64) << 64) | u128::from(lo as u64)
}

/// An XOR digest with an element count: of one segment, or of a whole (tenant, type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digest {
    /// XOR of the element hashes.
    pub hash: u128,
    /// Number of elements (current versions, tombstones included).
    pub count: i64,
}

impl Digest {
    /// Adds an element.
    pub fn add(&mut self, e: u128) {
        self.hash ^= e;
        self.count += 1;
    }

    /// Removes an element that was added before.
    pub fn remove(&mut self, e: u128) {
        self.hash ^= e;
        self.count -= 1;
    }

    /// Combines two digests (of disjoint sets).
    pub fn merge(&mut self, other: Digest) {
        self.hash ^= other.hash;
        self.count += other.count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).expect("valid tenant")
    }

    fn pt() -> ResourceType {
        ResourceType::new("Patient").expect("known type")
    }

    #[test]
    fn canonical_json_sorts_keys_and_strips_whitespace() {
        let a: Value =
            serde_json::from_str(r#"{ "b": 1, "a": {"d": [1, 2], "c": "x\"y"} }"#).expect("json");
        let b = json!({"a": {"c": "x\"y", "d": [1, 2]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            String::from_utf8(canonical_json(&a)).expect("utf8"),
            r#"{"a":{"c":"x\"y","d":[1,2]},"b":1}"#
        );
    }

    #[test]
    fn element_hash_depends_on_every_part() {
        let h = content_hash(b"{}");
        let v1 = VersionId::FIRST;
        let base = element_hash(&t("a"), pt(), "1", v1, &h);
        assert_ne!(base, element_hash(&t("b"), pt(), "1", v1, &h));
        assert_ne!(base, element_hash(&t("a"), pt(), "2", v1, &h));
        assert_ne!(base, element_hash(&t("a"), pt(), "1", v1.next(), &h));
        assert_ne!(
            base,
            element_hash(&t("a"), pt(), "1", v1, &content_hash(b"[]"))
        );
        assert_ne!(
            base,
            element_hash(&t("a"), pt(), "1", v1, &TOMBSTONE_CONTENT_HASH)
        );
        assert_eq!(base, element_hash(&t("a"), pt(), "1", v1, &h));
    }

    #[test]
    fn segments_spread_over_the_whole_range() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            seen.insert(segment(&t("a"), pt(), &i.to_string()));
        }
        // 10k keys over 65,536 segments: almost all land in distinct segments.
        assert!(seen.len() > 9_000, "only {} distinct segments", seen.len());
        assert!(seen.iter().any(|s| *s > 60_000));
    }

    #[test]
    fn groups_partition_the_segments() {
        let mut seen = 0u32;
        for g in 0..GROUPS {
            let g = u16::try_from(g).expect("group fits u16");
            for s in group_segments(g) {
                assert_eq!(group_of(s), g);
                assert_eq!(u32::from(s), seen, "segments in order, none skipped");
                seen += 1;
            }
        }
        assert_eq!(seen, SEGMENTS);
    }

    #[test]
    fn xor_digest_is_order_independent_and_reversible() {
        let es: Vec<u128> = (0..100u64)
            .map(|i| element_hash(&t("a"), pt(), &i.to_string(), VersionId::FIRST, &[1; 32]))
            .collect();
        let mut fwd = Digest::default();
        es.iter().for_each(|e| fwd.add(*e));
        let mut rev = Digest::default();
        es.iter().rev().for_each(|e| rev.add(*e));
        assert_eq!(fwd, rev);
        es.iter().for_each(|e| fwd.remove(*e));
        assert_eq!(fwd, Digest::default());
    }

    #[test]
    fn u128_splits_round_trip() {
        for h in [
            0u128,
            1,
            u128::MAX,
            1 << 127,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let (hi, lo) = split_u128(h);
            assert_eq!(join_u128(hi, lo), h);
        }
    }
}
