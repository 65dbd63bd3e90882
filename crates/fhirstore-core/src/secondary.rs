//! The contract of a secondary store: a projection of the primary that is fed changes, answers
//! the reads and searches it declares, and exposes digests for the reconciler.
//!
//! Two rules make delivery safe to repeat and to reorder:
//! - **Versions only move forward.** `apply` of a change whose version is not newer than what
//!   the secondary holds for that key is a no-op, so duplicates and late arrivals converge on
//!   the state of the newest version per key.
//! - **A delete leaves a tombstone** (key, version, element hash), so an older change arriving
//!   after it cannot bring the resource back, and the digest counts it exactly as the primary
//!   does.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::digest::TOMBSTONE_CONTENT_HASH;
use crate::digest::{canonical_json, content_hash, element_hash, group_of, segment, Digest};
use crate::error::Result;
use crate::index::ReferenceEntry;
use crate::model::{LogicalId, ResourceKey, ResourceType, StoredResource, VersionId};
use crate::search::{ReferenceValue, SearchQuery, TokenValue};
use crate::storage::{Capabilities, SearchPage};
use crate::tenant::{TenantContext, TenantId};

/// One change to project: a resource version, or a tombstone.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The tenant it belongs to.
    pub tenant: TenantId,
    /// Type and id.
    pub key: ResourceKey,
    /// The version this change brings.
    pub version: VersionId,
    /// When the primary wrote it.
    pub last_updated: DateTime<Utc>,
    /// The body as the primary stores it; `None` for a tombstone.
    pub content: Option<Value>,
}

impl Change {
    /// The change a stored version (or tombstone) makes.
    pub fn of(resource: &StoredResource) -> Change {
        Change {
            tenant: resource.tenant.clone(),
            key: resource.key.clone(),
            version: resource.version,
            last_updated: resource.last_updated,
            content: (!resource.deleted).then(|| resource.content.clone()),
        }
    }

    /// The element hash `E` of this version: the same function over the same canonical bytes
    /// as the primary's, so equal states have equal digests.
    pub fn element_hash(&self) -> u128 {
        let hash = self
            .content
            .as_ref()
            .map_or(TOMBSTONE_CONTENT_HASH, |c| content_hash(&canonical_json(c)));
        element_hash(
            &self.tenant,
            self.key.resource_type,
            self.key.id.as_str(),
            self.version,
            &hash,
        )
    }

    /// The digest segment of this key.
    pub fn segment(&self) -> u16 {
        segment(&self.tenant, self.key.resource_type, self.key.id.as_str())
    }
}

/// The exact-match lookup terms of one token, one per form a search can name it by: `code`
/// (`c:`), `system|code` and `|code` (`sc:`, the system's length first so no two pairs share a
/// term) and `system|` (`s:`). Secondaries index these and look up [`token_term`].
pub fn token_terms(system: &str, code: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(3);
    if !code.is_empty() {
        out.push(format!("c:{code}"));
    }
    out.push(format!("sc:{}:{system}{code}", system.len()));
    out.push(format!("s:{system}"));
    out
}

/// The lookup term a searched token finds (see [`token_terms`]); `None` for a value that names
/// neither system nor code.
pub fn token_term(v: &TokenValue) -> Option<String> {
    match (&v.system, &v.code) {
        (None, Some(code)) => Some(format!("c:{code}")),
        (Some(system), Some(code)) => Some(format!("sc:{}:{system}{code}", system.len())),
        (Some(system), None) => Some(format!("s:{system}")),
        (None, None) => None,
    }
}

/// The exact-match lookup terms of one reference: by target id (`i:`), type and id (`ti:`),
/// the URL as written (`u:`) and URL with version (`uv:`).
pub fn reference_terms(r: &ReferenceEntry) -> Vec<String> {
    let mut out = Vec::with_capacity(4);
    if !r.target_id.is_empty() {
        out.push(format!("i:{}", r.target_id));
        out.push(format!("ti:{}/{}", r.target_type, r.target_id));
    }
    out.push(format!("u:{}", r.url));
    if !r.version.is_empty() {
        out.push(format!("uv:{}:{}{}", r.url.len(), r.url, r.version));
    }
    out
}

/// The lookup term a searched reference finds (see [`reference_terms`]).
pub fn reference_term(v: &ReferenceValue) -> String {
    match v {
        ReferenceValue::Local {
            resource_type: None,
            id,
        } => format!("i:{id}"),
        ReferenceValue::Local {
            resource_type: Some(t),
            id,
        } => format!("ti:{t}/{id}"),
        ReferenceValue::Url { url, version: None } => format!("u:{url}"),
        ReferenceValue::Url {
            url,
            version: Some(v),
        } => format!("uv:{}:{url}{v}", url.len()),
    }
}

/// What an `apply` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes that moved a key forward.
    pub applied: u64,
    /// Changes that were not newer than what the secondary held.
    pub skipped: u64,
}

/// One segment's digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentDigest {
    /// Segment number, 0..65535.
    pub segment: u16,
    /// XOR and count of the segment's element hashes.
    pub digest: Digest,
}

/// One group's digest: the XOR and count of its segments' (see [`crate::digest::GROUPS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupDigest {
    /// Group number, 0..4095.
    pub group: u16,
    /// XOR and count of the group's element hashes.
    pub digest: Digest,
}

/// Folds segment digests into their groups' digests, non-empty groups only, in group order.
pub fn fold_groups(segments: &[SegmentDigest]) -> Vec<GroupDigest> {
    let mut by: std::collections::BTreeMap<u16, Digest> = std::collections::BTreeMap::new();
    for s in segments {
        by.entry(group_of(s.segment)).or_default().merge(s.digest);
    }
    by.into_iter()
        .filter(|(_, d)| d.count != 0)
        .map(|(group, digest)| GroupDigest { group, digest })
        .collect()
}

/// The segment digests that lie in `groups`, in segment order.
pub fn in_groups(segments: Vec<SegmentDigest>, groups: &[u16]) -> Vec<SegmentDigest> {
    let wanted: std::collections::BTreeSet<u16> = groups.iter().copied().collect();
    segments
        .into_iter()
        .filter(|s| wanted.contains(&group_of(s.segment)))
        .collect()
}

/// A key as the reconciler compares it: id, version and element hash.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyState {
    /// The resource id.
    pub id: LogicalId,
    /// The version held.
    pub version: VersionId,
    /// Its element hash.
    pub e: u128,
}

/// What a deep scrub found in a secondary's own data (see [`Secondary::scrub`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scrub {
    /// Keys read.
    pub keys_read: u64,
    /// Keys the secondary lists (in a segment) whose document is gone.
    pub lost: Vec<LogicalId>,
    /// Documents whose body no longer hashes to the element hash kept beside it.
    pub corrupted: Vec<LogicalId>,
    /// Documents that cannot be read at all: not a document, or a body, version or hash
    /// that does not parse.
    pub unreadable: Vec<LogicalId>,
    /// Segments whose maintained digest disagreed with what the secondary holds (rewritten
    /// when fixing).
    pub segments_rewritten: u64,
}

/// A secondary's health, as its probe sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Reachable, and holding what it was given.
    Healthy,
    /// Reachable but empty or damaged (a restart that lost its data, a missing index): it
    /// must be rebuilt before it answers anything.
    NeedsRebuild(String),
    /// Not reachable.
    Unavailable(String),
}

/// One store's digests of a (tenant, type), in the three resolutions the reconciler descends
/// through (root, groups, segments), and the keys of a segment. The primary
/// ([`DigestSource`]) and every [`Secondary`] give the same view, so the reconciler compares
/// two of them.
#[async_trait]
pub trait DigestView: Send + Sync {
    /// The (tenant, type) root digest. The default merges [`DigestView::group_digests`].
    async fn root_digest(&self, tenant: &TenantId, resource_type: ResourceType) -> Result<Digest> {
        let mut root = Digest::default();
        for g in self.group_digests(tenant, resource_type).await? {
            root.merge(g.digest);
        }
        Ok(root)
    }

    /// Every non-empty segment's digest, in segment order.
    async fn segment_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<SegmentDigest>>;

    /// Every non-empty group's digest, in group order. The default folds
    /// [`DigestView::segment_digests`]; a backend that can aggregate where the data lives
    /// overrides it.
    async fn group_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<GroupDigest>> {
        Ok(fold_groups(
            &self.segment_digests(tenant, resource_type).await?,
        ))
    }

    /// The non-empty segment digests within `groups`, in segment order.
    async fn segment_digests_in(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        groups: &[u16],
    ) -> Result<Vec<SegmentDigest>> {
        Ok(in_groups(
            self.segment_digests(tenant, resource_type).await?,
            groups,
        ))
    }

    /// The keys in the given segments, tombstones included, in id order.
    async fn segment_keys(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
    ) -> Result<Vec<KeyState>>;
}

/// The primary's side of reconciliation: its [`DigestView`], plus what only the primary
/// knows (which tenants and types exist) and can do (recompute its digests from the
/// resources).
#[async_trait]
pub trait DigestSource: DigestView {
    /// The types the tenant holds any resource of.
    async fn types_of(&self, tenant: &TenantId) -> Result<Vec<ResourceType>>;

    /// Every tenant that holds any resource.
    async fn tenants(&self) -> Result<Vec<TenantId>>;

    /// Recomputes the (tenant, type) segment digests from the resources themselves and
    /// rewrites the stored ones where they disagree (a digest table restored from an old
    /// backup, or damaged); returns how many segments were wrong.
    async fn self_check(&self, tenant: &TenantId, resource_type: ResourceType) -> Result<u64>;
}

/// A projection of the primary; see the module documentation for the rules it keeps.
#[async_trait]
pub trait Secondary: DigestView {
    /// A short name for logs, status and results (`redis`, `tantivy`).
    fn name(&self) -> &str;

    /// The reads and searches it answers.
    fn capabilities(&self) -> Capabilities;

    /// Applies changes, version-guarded and idempotent, in as few round trips as the backend
    /// allows. Changes may belong to several tenants.
    async fn apply(&self, changes: &[Change]) -> Result<Applied>;

    /// Like [`Secondary::apply`], but a change whose version equals the held one replaces it
    /// when the element hashes differ: the repair of a damaged copy, which the version guard
    /// alone would never overwrite. The reconciler uses it with the primary's current
    /// versions only.
    async fn repair(&self, changes: &[Change]) -> Result<Applied>;

    /// The current version of a resource, tombstones included (`deleted` set); `None` when
    /// the key was never applied.
    async fn read(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<StoredResource>>;

    /// Runs a search whose every criterion [`Capabilities::can_search`] accepts; anything else
    /// is [`crate::Error::Unsupported`].
    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage>;

    /// The ids of at most `limit` live resources matching the criteria of `query` (within
    /// [`SearchQuery::among`] when set): most relevant first when `query` sorts by `_score`,
    /// otherwise in id order. When more than `limit` match, which `limit` come back is the
    /// backend's choice, so that it need not hold them all. Paging, includes and summary are
    /// ignored. One side of a split
    /// search (`CompositeStorage`), so a backend that claims criteria the primary lacks should
    /// answer it; the default is [`crate::Error::Unsupported`].
    async fn search_ids(
        &self,
        _ctx: &TenantContext,
        _query: &SearchQuery,
        _limit: usize,
    ) -> Result<Vec<LogicalId>> {
        Err(crate::Error::Unsupported(format!(
            "{} does not list matching ids",
            self.name()
        )))
    }

    /// Deep scrub of `segments`: recomputes each one's digest from the documents the secondary
    /// actually holds (each body hashed again, not the hash kept beside it) and compares it
    /// with the digest it maintains. Drift that bypassed `apply` (a key evicted or deleted out
    /// of band, garbage or a truncated body written over a document) leaves the maintained
    /// digests unchanged, so the ordinary comparison with the primary cannot see it; this can.
    ///
    /// With `fix`, what is lost, corrupted or unreadable is removed and the maintained digests
    /// are rewritten to what is left, so the ordinary comparison then finds those keys missing
    /// and repairs them from the primary through the same version-guarded path. A key written
    /// again meanwhile is left alone.
    ///
    /// The default is [`crate::Error::Unsupported`]: a backend that keeps no digest apart
    /// from its data has nothing to scrub.
    async fn scrub(
        &self,
        _tenant: &TenantId,
        _resource_type: ResourceType,
        _segments: &[u16],
        _fix: bool,
    ) -> Result<Scrub> {
        Err(crate::Error::Unsupported(format!(
            "{} has no deep scrub",
            self.name()
        )))
    }

    /// Removes everything of one tenant, for a rebuild.
    async fn clear(&self, tenant: &TenantId) -> Result<()>;

    /// Records that a rebuild is complete: the secondary holds the primary's snapshot and every
    /// change since. Until then, a secondary that lost its data (or never had any) reports
    /// [`Health::NeedsRebuild`] and refuses reads and searches, so it never answers from a
    /// partial copy.
    async fn mark_built(&self) -> Result<()>;

    /// Probes the backend.
    async fn health(&self) -> Health;

    /// Makes everything applied so far searchable and durable. A backend that batches its
    /// commits holds applied changes in memory until then, so a caller that records its
    /// progress durably (a sync cursor) flushes first.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
