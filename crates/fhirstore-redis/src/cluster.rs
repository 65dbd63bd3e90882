//! Redis Cluster: the URL form, hash slots, and the `built` marker of each slot.
//!
//! A cluster loses data a shard at a time, and a shard is a set of hash slots; keys move
//! between shards only with their slot. So the marker that says "this copy is complete" is
//! kept once per slot, in that slot: `{prefix}:{~N}:built`, where `~N` is a tag that hashes to
//! the slot (the `~` keeps it apart from tenant ids, which are `[A-Za-z0-9-]`). A shard that
//! comes back empty takes its slots' markers with it, and the tenants in those slots read as
//! unbuilt while every other tenant keeps being served. A marker per tenant would need the
//! list of tenants to set it, which a rebuild does not have; one global marker would live on
//! one shard and stay behind when another shard lost its data.

use std::sync::OnceLock;

use fhirstore_core::{Error, Result};
use redis::Value as RValue;

/// The number of hash slots in a Redis Cluster.
pub(crate) const SLOTS: u16 = 16_384;

/// The URL schemes that name a cluster: `redis+cluster://host:port[,host:port…]` (plain) and
/// `rediss+cluster://…` (TLS).
const SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// How a cluster URL is read: its seed nodes, each as a plain `redis://` URL carrying the
/// user and password, and the replicas each write waits for (`?replicas=N`, default 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterUrl {
    pub(crate) nodes: Vec<String>,
    pub(crate) replicas: u32,
}

/// Reads a cluster URL; `Ok(None)` when `url` names a single server.
pub(crate) fn parse_url(url: &str) -> Result<Option<ClusterUrl>> {
    let Some((scheme, rest, plain)) = SCHEMES
        .iter()
        .find_map(|(c, p)| url.strip_prefix(c).map(|rest| (*c, rest, *p)))
    else {
        return Ok(None);
    };
    let bad = |why: &str| {
        // The URL may carry a password: name the scheme only.
        Error::Configuration(format!("a {scheme}… URL {why}"))
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let nodes: Vec<String> = hosts
        .split(',')
        .map(|h| {
            let valid = h
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            valid
                .then(|| format!("{plain}{auth}{h}"))
                .ok_or_else(|| bad("needs host:port for every node, comma-separated"))
        })
        .collect::<Result<_>>()?;
    let mut replicas = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("replicas", n)) => {
                replicas = n
                    .parse()
                    .map_err(|_| bad("has a replicas= that is not a number"))?;
            }
            _ => return Err(bad("takes only the parameter replicas=N")),
        }
    }
    Ok(Some(ClusterUrl { nodes, replicas }))
}

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in bytes {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key: of its hash tag (the text between the first `{` and the next `}`) when
/// the tag is non-empty, else of the whole key.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let tail = &key[open + 1..];
        let close = tail.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &tail[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// A hash tag for every slot: `~N` for the smallest `N` that hashes there.
fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut left = usize::from(SLOTS);
        let mut n: u64 = 0;
        // Every slot is reached within a few hundred thousand candidates (a CRC spreads short
        // strings evenly); the bound only guards the loop.
        while left > 0 && n < 50_000_000 {
            let tag = format!("~{n}");
            let slot = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[slot].is_empty() {
                tags[slot] = tag;
                left -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// The `built` marker of `slot`.
pub(crate) fn marker_key(prefix: &str, slot: u16) -> String {
    format!("{prefix}:{{{}}}:built", slot_tags()[usize::from(slot)])
}

/// One range of slots and the address of the master that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRange {
    pub(crate) first: u16,
    pub(crate) last: u16,
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// Reads a `CLUSTER SLOTS` reply: ranges in slot order.
pub(crate) fn parse_slots(reply: &RValue) -> Result<Vec<SlotRange>> {
    let bad = || Error::backend_msg("redis: malformed CLUSTER SLOTS reply", false);
    let RValue::Array(ranges) = reply else {
        return Err(bad());
    };
    let int = |v: &RValue| match v {
        RValue::Int(i) => Some(*i),
        _ => None,
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let RValue::Array(parts) = r else {
            return Err(bad());
        };
        let [first, last, RValue::Array(master), ..] = parts.as_slice() else {
            return Err(bad());
        };
        let [host, port, ..] = master.as_slice() else {
            return Err(bad());
        };
        let range = (|| {
            Some(SlotRange {
                first: u16::try_from(int(first)?).ok()?,
                last: u16::try_from(int(last)?).ok()?,
                host: super::text(host)?,
                port: u16::try_from(int(port)?).ok()?,
            })
        })()
        .ok_or_else(bad)?;
        out.push(range);
    }
    out.sort_by_key(|r| r.first);
    Ok(out)
}

/// The slots no range covers, as `first-last` spans, for the message of a cluster that does
/// not serve every slot.
pub(crate) fn uncovered(ranges: &[SlotRange]) -> Vec<String> {
    let mut gaps = Vec::new();
    let mut next: u32 = 0;
    for r in ranges {
        if u32::from(r.first) > next {
            gaps.push(format!("{next}-{}", r.first - 1));
        }
        next = next.max(u32::from(r.last) + 1);
    }
    if next < u32::from(SLOTS) {
        gaps.push(format!("{next}-{}", SLOTS - 1));
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_spec() {
        // The examples of the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn every_slot_has_a_marker_in_that_slot() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..SLOTS {
            let key = marker_key("fhirstore", slot);
            assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
            assert!(seen.insert(key));
        }
    }

    #[test]
    fn cluster_urls_name_their_nodes() {
        assert_eq!(parse_url("redis://127.0.0.1:6379").expect("single"), None);
        let u = parse_url("redis+cluster://:secret@a:7000,b:7001/?replicas=1")
            .expect("parse")
            .expect("cluster");
        assert_eq!(
            u.nodes,
            ["redis://:secret@a:7000", "redis://:secret@b:7001"]
        );
        assert_eq!(u.replicas, 1);
        let tls = parse_url("rediss+cluster://h:7000")
            .expect("parse")
            .expect("cluster");
        assert_eq!(tls.nodes, ["rediss://h:7000"]);
        for bad in [
            "redis+cluster://",
            "redis+cluster://a",
            "redis+cluster://a:x",
            "redis+cluster://a:1?replicas=x",
            "redis+cluster://:pw@a:1?other=1",
        ] {
            let e = parse_url(bad).expect_err(bad).to_string();
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn gaps_in_the_slot_map_are_named() {
        let r = |first, last| SlotRange {
            first,
            last,
            host: "h".into(),
            port: 1,
        };
        assert!(uncovered(&[r(0, 8000), r(8001, 16_383)]).is_empty());
        assert_eq!(
            uncovered(&[r(0, 99), r(200, 16_000)]),
            ["100-199", "16001-16383"]
        );
    }
}
