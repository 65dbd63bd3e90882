//! Resource identity, versions and the stored form of a resource.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::resource_types::RESOURCE_TYPES;
use crate::tenant::TenantId;

/// A FHIR R4 resource type name, checked against the official list.
///
/// Holds a `&'static str` from that list, so it is `Copy` and compares cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType(&'static str);

impl ResourceType {
    /// Looks up `name` among the R4 resource types.
    pub fn new(name: &str) -> Result<Self> {
        RESOURCE_TYPES
            .binary_search(&name)
            .map(|i| ResourceType(RESOURCE_TYPES[i]))
            .map_err(|_| Error::InvalidResource(format!("{name:?} is not a FHIR R4 resource type")))
    }

    /// The type name.
    pub fn as_str(&self) -> &'static str {
        self.0
    }

    /// All R4 resource types, sorted by name.
    pub fn all() -> impl Iterator<Item = ResourceType> {
        RESOURCE_TYPES.iter().map(|n| ResourceType(n))
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl FromStr for ResourceType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ResourceType::new(s)
    }
}

/// A logical resource id, valid by the FHIR rule `[A-Za-z0-9\-\.]{1,64}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogicalId(String);

impl LogicalId {
    /// Validates and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if is_valid_id(&id) {
            Ok(LogicalId(id))
        } else {
            Err(Error::InvalidResource(format!(
                "invalid id {id:?}: expected 1-64 characters of [A-Za-z0-9-.]"
            )))
        }
    }

    /// A fresh server-assigned id: a UUIDv7, which is a valid FHIR id.
    ///
    /// Version 7 UUIDs start with a millisecond timestamp, so ids created one after another sort
    /// together. Every B-tree keyed by id (current rows, versions, index rows clustered by
    /// owner) then takes consecutive creates on the same right-edge page instead of a random
    /// one each; random v4 ids made each create dirty dozens of pages.
    pub fn generate() -> Self {
        LogicalId(uuid::Uuid::now_v7().to_string())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `id` satisfies the FHIR id rule.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl fmt::Display for LogicalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LogicalId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        LogicalId::new(s)
    }
}

/// A resource version: 1 for the first write, then 2, 3, … with no gaps. Deletions are versions
/// too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId(u64);

impl VersionId {
    /// The first version of every resource.
    pub const FIRST: VersionId = VersionId(1);

    /// A version from its number; `None` for 0, which is never a version.
    pub fn new(n: u64) -> Option<Self> {
        (n >= 1).then_some(VersionId(n))
    }

    /// The version number.
    pub fn get(&self) -> u64 {
        self.0
    }

    /// The version after this one.
    pub fn next(&self) -> VersionId {
        VersionId(self.0 + 1)
    }

    /// A version from an ETag as FHIR writes it (`W/"3"`), or from `"3"` or `3`.
    pub fn from_etag(tag: &str) -> crate::Result<VersionId> {
        let t = tag.trim();
        let t = t.strip_prefix("W/").unwrap_or(t);
        let t = t
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(t);
        t.parse()
            .ok()
            .and_then(VersionId::new)
            .ok_or_else(|| crate::Error::InvalidResource(format!("{tag:?} is not a version ETag")))
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for VersionId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        s.parse::<u64>()
            .ok()
            .and_then(VersionId::new)
            .ok_or_else(|| Error::InvalidResource(format!("invalid version id {s:?}")))
    }
}

/// A resource's identity within a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// The resource type.
    pub resource_type: ResourceType,
    /// The logical id.
    pub id: LogicalId,
}

impl ResourceKey {
    /// A key from its parts.
    pub fn new(resource_type: ResourceType, id: LogicalId) -> Self {
        ResourceKey { resource_type, id }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.resource_type, self.id)
    }
}

/// One version of a resource as the store holds it.
///
/// `content` is the resource JSON with `id`, `meta.versionId` and `meta.lastUpdated` set by the
/// store; for a deletion it is `Value::Null`.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResource {
    /// The owning tenant.
    pub tenant: TenantId,
    /// Type and id.
    pub key: ResourceKey,
    /// This version's number.
    pub version: VersionId,
    /// When this version was written, in UTC, to the microsecond.
    pub last_updated: DateTime<Utc>,
    /// Whether this version is a deletion (a tombstone).
    pub deleted: bool,
    /// The resource JSON, or `Value::Null` for a tombstone.
    pub content: Value,
}

/// Microseconds since the Unix epoch: the store's clock and column format for instants.
pub fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`]; every `i64` is in chrono's range.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH)
}

/// An RFC 3339 date-time with a zone (FHIR's `instant`), in UTC; `None` for anything else.
pub fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.to_utc())
}

/// The current time truncated to microseconds, which is what the store can keep.
pub fn now_micros() -> i64 {
    to_micros(Utc::now())
}

/// Formats an instant as a FHIR `instant` (UTC, microseconds, `Z`).
pub fn format_instant(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_types_are_checked() {
        assert_eq!(
            ResourceType::new("Patient").map(|t| t.as_str()).ok(),
            Some("Patient")
        );
        assert!(ResourceType::new("patient").is_err());
        assert!(ResourceType::new("Resource").is_err());
        assert!(ResourceType::new("DomainResource").is_err());
    }

    #[test]
    fn resource_type_list_matches_the_official_schema() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fhir-profiles/fhir-json-schema-validator-0.9.8/fhir.schema.json"
        );
        let text = std::fs::read_to_string(path).expect("schema file present");
        let schema: Value = serde_json::from_str(&text).expect("schema is JSON");
        let mapping = schema["discriminator"]["mapping"]
            .as_object()
            .expect("discriminator mapping");
        let mut official: Vec<&str> = mapping.keys().map(String::as_str).collect();
        official.sort_unstable();
        assert_eq!(official, RESOURCE_TYPES.to_vec());
    }

    #[test]
    fn ids_follow_the_fhir_rule() {
        assert!(LogicalId::new("a-b.C9").is_ok());
        assert!(LogicalId::new("x".repeat(64)).is_ok());
        for bad in ["", "a/b", "a b", "a_b", "é", &"x".repeat(65), "1'--"] {
            assert!(LogicalId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(is_valid_id(LogicalId::generate().as_str()));
    }

    #[test]
    fn versions_start_at_one() {
        assert!(VersionId::new(0).is_none());
        assert_eq!(VersionId::FIRST.next().get(), 2);
        assert!("0".parse::<VersionId>().is_err());
        assert!("x".parse::<VersionId>().is_err());
        assert_eq!("7".parse::<VersionId>().map(|v| v.get()).ok(), Some(7));
    }

    #[test]
    fn instants_round_trip_at_microsecond_precision() {
        let us = 1_700_000_000_123_456_i64;
        let t = from_micros(us);
        assert_eq!(to_micros(t), us);
        assert_eq!(format_instant(t), "2023-11-14T22:13:20.123456Z");
    }
}
