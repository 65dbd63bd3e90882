//! The `ResourceStorage` trait: tenant-scoped FHIR persistence.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{LogicalId, ResourceKey, ResourceType, StoredResource, VersionId};
use crate::registry::Registry;
use crate::search::SearchQuery;
use crate::tenant::TenantContext;

/// What a backend can do. A plain struct of public fields, so a router or a test suite can read
/// it without calling anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Name of the backend, for logs and results (`sqlite`, `postgres`, `redis`, …).
    pub name: &'static str,
    /// Reads by id and version.
    pub read: bool,
    /// Keeps every version (vread, history).
    pub history: bool,
    /// Writes, including conditional writes.
    pub write: bool,
    /// Atomic multi-entry transactions.
    pub transaction: bool,
    /// Search parameters answered by name, whatever their type (`_id`, `_text`, …).
    pub search_params: Vec<&'static str>,
    /// Parameter types answered for every registered parameter of that type.
    pub search_types: Vec<crate::search::ParamType>,
    /// Modifiers answered, by their FHIR code (`exact`, `not`, `missing`, …, and `type` for
    /// `:[type]`); a criterion without a modifier needs none.
    pub modifiers: Vec<&'static str>,
    /// Chained parameters and `_has`.
    pub chaining: bool,
    /// `_include` and `_revinclude`.
    pub includes: bool,
    /// Searches across every type (no resource type).
    pub system_search: bool,
    /// `_sort` by any parameter of the answered types.
    pub sort_any: bool,
    /// Parameters `_sort` may name beyond that (`_score` where there is relevance).
    pub sort_params: Vec<&'static str>,
    /// Searches restricted to a compartment ([`SearchQuery::compartment`]).
    pub compartments: bool,
    /// Searches restricted to an id set ([`SearchQuery::among`]).
    pub id_sets: bool,
}

impl Capabilities {
    /// Whether this backend answers all of `query` with R4's parameters.
    pub fn can_search(&self, query: &SearchQuery) -> bool {
        self.can_search_in(Registry::r4(), query)
    }

    /// Whether this backend answers all of `query`, with the parameters of `reg` (R4 plus a
    /// tenant's own): every criterion, modifier, sort key, include and chain.
    pub fn can_search_in(&self, reg: &Registry, query: &SearchQuery) -> bool {
        use crate::search::CriterionValues;
        if query.resource_type.is_none() && !self.system_search {
            return false;
        }
        if query.compartment.is_some() && !self.compartments {
            return false;
        }
        if query.among.is_some() && !self.id_sets {
            return false;
        }
        let includes = !(query.includes.is_empty() && query.revincludes.is_empty());
        if includes && !self.includes {
            return false;
        }
        let known_in = |rt: Option<crate::ResourceType>, name: &str| {
            self.search_params.contains(&name)
                || crate::search::param_type_in(reg, rt, name)
                    .is_some_and(|t| self.search_types.contains(&t))
        };
        let known = |name: &str| known_in(query.resource_type, name);
        let criteria = query.criteria.iter().all(|c| {
            let modifier = match (&c.values, c.modifier) {
                (CriterionValues::Missing(..), _) => Some("missing"),
                (_, m) => m.map(|m| m.code()),
            };
            // A chained criterion's parameter belongs to the type at the chain's end.
            let owner = match c.chain.last() {
                None => query.resource_type,
                Some(crate::search::ChainLink::Forward { target, .. }) => Some(*target),
                Some(crate::search::ChainLink::Reverse { source, .. }) => Some(*source),
            };
            known_in(owner, &c.param)
                && (c.chain.is_empty() || self.chaining)
                && modifier.is_none_or(|m| self.modifiers.contains(&m))
        });
        let sorts = query.sort.iter().all(|k| {
            self.sort_params.contains(&k.param.as_str()) || (self.sort_any && known(&k.param))
        });
        criteria && sorts
    }
}

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// No live version existed before (absent, or deleted): HTTP 201.
    Created,
    /// A new version of a live resource: HTTP 200.
    Updated,
    /// A conditional create matched an existing resource: nothing was written.
    Unchanged,
}

/// The result of a create or update.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    /// What happened.
    pub kind: WriteKind,
    /// The version now current (for `Unchanged`, the existing one).
    pub resource: StoredResource,
    /// The outbox sequence number of this write: a consistency token for read-your-writes.
    /// `None` when nothing was written.
    pub seq: Option<i64>,
}

/// The result of a delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// The resources deleted, with their tombstone versions. Empty when nothing was live: FHIR
    /// deletes of absent or deleted resources succeed without writing a version.
    pub deleted: Vec<(ResourceKey, VersionId)>,
    /// The highest outbox sequence number written, if any.
    pub seq: Option<i64>,
}

/// One write in a transaction or batch.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOp {
    /// Create with a server-assigned id; conditional when `if_none_exist` is set.
    Create {
        /// Type to create.
        resource_type: ResourceType,
        /// The body; any `id` in it is ignored.
        resource: Value,
        /// `If-None-Exist`: create only if nothing matches.
        if_none_exist: Option<SearchQuery>,
        /// The entry's `fullUrl`; `urn:uuid:` values are resolved to the assigned id in every
        /// other entry of the same transaction.
        full_url: Option<String>,
    },
    /// Update (or update-as-create) by id.
    Update {
        /// Type to update.
        resource_type: ResourceType,
        /// The id; the body must carry the same.
        id: LogicalId,
        /// The new body.
        resource: Value,
        /// `If-Match`: fail with `VersionConflict` unless this is the current version.
        if_match: Option<VersionId>,
    },
    /// Conditional update: update the single match, or create when nothing matches.
    ConditionalUpdate {
        /// Type to update.
        resource_type: ResourceType,
        /// The search that finds the resource.
        criteria: SearchQuery,
        /// The new body.
        resource: Value,
    },
    /// Delete by id.
    Delete {
        /// Type to delete.
        resource_type: ResourceType,
        /// The id.
        id: LogicalId,
    },
    /// Conditional delete: delete every match.
    ConditionalDelete {
        /// Type to delete.
        resource_type: ResourceType,
        /// The search that finds the resources.
        criteria: SearchQuery,
    },
}

impl WriteOp {
    /// The order FHIR R4 prescribes for processing transaction entries: deletes, then creates,
    /// then updates (§3.1.0.11.2).
    pub fn processing_rank(&self) -> u8 {
        match self {
            WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => 0,
            WriteOp::Create { .. } => 1,
            WriteOp::Update { .. } | WriteOp::ConditionalUpdate { .. } => 2,
        }
    }
}

/// The result of one [`WriteOp`].
#[derive(Clone, Debug, PartialEq)]
pub enum OpOutcome {
    /// From a create or update.
    Written(Written),
    /// From a delete.
    Deleted(Deleted),
}

/// Which versions a history call covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryScope {
    /// Every resource of the tenant.
    System,
    /// Every resource of one type.
    Type(ResourceType),
    /// One resource.
    Instance(ResourceType, LogicalId),
}

/// A history request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRequest {
    /// The scope.
    pub scope: HistoryScope,
    /// `_since`: only versions written at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// `_count`: page size (defaults and caps as for search).
    pub count: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl HistoryRequest {
    /// The first page of a scope's history.
    pub fn new(scope: HistoryScope) -> Self {
        HistoryRequest {
            scope,
            since: None,
            count: None,
            cursor: None,
        }
    }
}

/// One page of history, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryPage {
    /// Versions, newest first; deletions are included as tombstones.
    pub entries: Vec<StoredResource>,
    /// Pass as `cursor` to get the next (older) page; `None` on the last page. Stays valid while
    /// writes continue: new versions never shift what later pages hold.
    pub next_cursor: Option<String>,
}

/// One page of search results.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchPage {
    /// Matches, in the query's order.
    pub matches: Vec<StoredResource>,
    /// Resources added by `_include` and `_revinclude` (FHIR search mode `include`), each once,
    /// none of them also a match.
    pub included: Vec<StoredResource>,
    /// The total number of matches, when `_total` asked for it.
    pub total: Option<u64>,
    /// Pass as the query's `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Tenant-scoped FHIR resource storage.
///
/// Every method takes a [`TenantContext`]; a backend reads and writes only that tenant's data and
/// checks the context's permissions. Object safe: users hold `Arc<dyn ResourceStorage>`.
///
/// The required methods are the primitives; create, update, delete and their conditional forms
/// are provided on top of [`ResourceStorage::transaction`], so a backend has one write path.
#[async_trait]
pub trait ResourceStorage: Send + Sync {
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Applies every op atomically: all commit, or none do and the first failure is returned
    /// (its message names the entry). Outcomes come back in the order of `ops`.
    async fn transaction(&self, ctx: &TenantContext, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>>;

    /// Applies each op on its own: one failing does not undo the others. Results come back in
    /// the order of `ops`.
    async fn batch(&self, ctx: &TenantContext, ops: Vec<WriteOp>)
        -> Result<Vec<Result<OpOutcome>>>;

    /// The current version. [`Error::Gone`] if it is deleted, [`Error::NotFound`] if it never
    /// existed in this tenant.
    async fn read(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<StoredResource>;

    /// One version, which may be a tombstone (`deleted` set, `content` null).
    async fn vread(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
        version: VersionId,
    ) -> Result<StoredResource>;

    /// A page of history, newest first.
    async fn history(&self, ctx: &TenantContext, request: &HistoryRequest) -> Result<HistoryPage>;

    /// The number of live (not deleted) resources of one type, or of all types.
    async fn count(&self, ctx: &TenantContext, resource_type: Option<ResourceType>) -> Result<u64>;

    /// A page of search results.
    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage>;

    /// The ids of at most `limit` resources matching the criteria of `query` (of its one
    /// resource type, within [`SearchQuery::among`] when set), in id order. Sort, paging,
    /// includes and summary are ignored. One side of a split search; a caller that asks for
    /// one id more than its bound learns whether the bound was passed.
    ///
    /// The default pages through [`ResourceStorage::search`]; a backend with a cheaper way
    /// (an index-only statement) overrides it.
    async fn search_ids(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        limit: usize,
    ) -> Result<Vec<LogicalId>> {
        let mut q = SearchQuery {
            resource_type: query.resource_type,
            criteria: query.criteria.clone(),
            compartment: query.compartment.clone(),
            types: query.types.clone(),
            among: query.among.clone(),
            count: Some(crate::search::MAX_PAGE_SIZE),
            ..SearchQuery::default()
        };
        let mut ids = Vec::new();
        while ids.len() < limit {
            let page = self.search(ctx, &q).await?;
            ids.extend(page.matches.into_iter().map(|m| m.key.id));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        ids.truncate(limit);
        Ok(ids)
    }

    /// Creates a resource with a server-assigned id.
    async fn create(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        resource: Value,
    ) -> Result<Written> {
        let op = WriteOp::Create {
            resource_type,
            resource,
            if_none_exist: None,
            full_url: None,
        };
        written(self.transaction(ctx, vec![op]).await?)
    }

    /// Updates by id, creating the resource when it does not exist (update-as-create). With
    /// `if_match`, fails with [`Error::VersionConflict`] unless that is the current version.
    async fn update(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
        resource: Value,
        if_match: Option<VersionId>,
    ) -> Result<Written> {
        let op = WriteOp::Update {
            resource_type,
            id: id.clone(),
            resource,
            if_match,
        };
        written(self.transaction(ctx, vec![op]).await?)
    }

    /// Deletes by id, writing a tombstone version. Deleting an absent or deleted resource
    /// succeeds and writes nothing.
    async fn delete(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Deleted> {
        let op = WriteOp::Delete {
            resource_type,
            id: id.clone(),
        };
        deleted(self.transaction(ctx, vec![op]).await?)
    }

    /// Creates unless `criteria` match: one match returns it unchanged
    /// ([`WriteKind::Unchanged`]), several fail with [`Error::PreconditionFailed`].
    async fn conditional_create(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        criteria: &SearchQuery,
        resource: Value,
    ) -> Result<Written> {
        let op = WriteOp::Create {
            resource_type,
            resource,
            if_none_exist: Some(criteria.clone()),
            full_url: None,
        };
        written(self.transaction(ctx, vec![op]).await?)
    }

    /// Updates the one resource `criteria` match; creates when none match; fails with
    /// [`Error::PreconditionFailed`] when several do.
    async fn conditional_update(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        criteria: &SearchQuery,
        resource: Value,
    ) -> Result<Written> {
        let op = WriteOp::ConditionalUpdate {
            resource_type,
            criteria: criteria.clone(),
            resource,
        };
        written(self.transaction(ctx, vec![op]).await?)
    }

    /// Deletes every resource `criteria` match.
    async fn conditional_delete(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        criteria: &SearchQuery,
    ) -> Result<Deleted> {
        let op = WriteOp::ConditionalDelete {
            resource_type,
            criteria: criteria.clone(),
        };
        deleted(self.transaction(ctx, vec![op]).await?)
    }

    /// The parameters this tenant's searches may use: the R4 ones plus the tenant's own
    /// SearchParameters that have finished reindexing. Parse queries with
    /// [`SearchQuery::parse_in`] against it. Backends without custom parameters have R4 only.
    async fn search_parameters(&self, ctx: &TenantContext) -> Result<Arc<Registry>> {
        ctx.require(crate::Permission::Read)?;
        Ok(Registry::r4_shared().clone())
    }

    /// Brings the backend's planner statistics up to date, after a bulk load, without blocking
    /// writers: what `fhirstore import` does at its end (and a finished reindex job by itself).
    /// Statistics are the whole store's, so this needs [`crate::Permission::Admin`]. Backends
    /// without a planner do nothing.
    async fn refresh_statistics(&self, ctx: &TenantContext) -> Result<()> {
        ctx.require(crate::Permission::Admin)
    }

    /// Each of the tenant's own search parameters, with its reindex progress.
    async fn reindex_status(&self, ctx: &TenantContext) -> Result<Vec<ReindexStatus>> {
        ctx.require(crate::Permission::Read)?;
        Ok(Vec::new())
    }

    /// Runs the tenant's pending reindex jobs, `options.batch` resources per short
    /// transaction, calling `progress` after each batch. The position is saved with every
    /// batch, so a job stopped for any reason (an error, a crash, a dropped future, or
    /// `options.max_batches`) resumes where it was on the next call; other requests are never
    /// held for longer than one batch. Returns every parameter's status at the end.
    async fn reindex(
        &self,
        ctx: &TenantContext,
        options: ReindexOptions,
        progress: &(dyn for<'r> Fn(&'r ReindexStatus) + Send + Sync),
    ) -> Result<Vec<ReindexStatus>> {
        let _ = (options, progress);
        ctx.require(crate::Permission::Admin)?;
        Ok(Vec::new())
    }
}

/// How a [`ResourceStorage::reindex`] call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReindexOptions {
    /// Resources rewritten per transaction.
    pub batch: u32,
    /// Stop after this many batches (the jobs stay pending); `None` runs them to the end.
    pub max_batches: Option<u32>,
}

impl Default for ReindexOptions {
    fn default() -> Self {
        ReindexOptions {
            batch: 500,
            max_batches: None,
        }
    }
}

/// Where a tenant's own search parameter stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReindexState {
    /// Writes index it, a reindex job is filling in the existing resources; not yet searchable.
    Reindexing,
    /// Every resource is indexed; searches may use it.
    Active,
    /// Retired or deleted: a job is removing its index rows.
    Removing,
}

/// A tenant's own search parameter and its reindex job's progress.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReindexStatus {
    /// The SearchParameter's canonical URL.
    pub url: String,
    /// Its code, as used in queries.
    pub code: String,
    /// Where it stands.
    pub state: ReindexState,
    /// Resources the job has rewritten so far.
    pub processed: u64,
    /// Live resources of its base types when the job started: the denominator of progress.
    pub total: u64,
}

fn single(mut outcomes: Vec<OpOutcome>) -> Result<OpOutcome> {
    match (outcomes.pop(), outcomes.is_empty()) {
        (Some(o), true) => Ok(o),
        _ => Err(Error::Backend {
            message: "a single-entry transaction returned a different number of outcomes".into(),
            temporary: false,
            source: None,
        }),
    }
}

fn written(outcomes: Vec<OpOutcome>) -> Result<Written> {
    match single(outcomes)? {
        OpOutcome::Written(w) => Ok(w),
        OpOutcome::Deleted(_) => Err(Error::Backend {
            message: "a write returned a delete outcome".into(),
            temporary: false,
            source: None,
        }),
    }
}

fn deleted(outcomes: Vec<OpOutcome>) -> Result<Deleted> {
    match single(outcomes)? {
        OpOutcome::Deleted(d) => Ok(d),
        OpOutcome::Written(_) => Err(Error::Backend {
            message: "a delete returned a write outcome".into(),
            temporary: false,
            source: None,
        }),
    }
}

/// Forwards every method, provided ones included, so a wrapper's overrides are never bypassed
/// when it is held behind a smart pointer.
macro_rules! forward_storage {
    ($ptr:ident) => {
        #[async_trait]
        impl<T: ResourceStorage + ?Sized> ResourceStorage for $ptr<T> {
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            async fn transaction(
                &self,
                ctx: &TenantContext,
                ops: Vec<WriteOp>,
            ) -> Result<Vec<OpOutcome>> {
                (**self).transaction(ctx, ops).await
            }
            async fn batch(
                &self,
                ctx: &TenantContext,
                ops: Vec<WriteOp>,
            ) -> Result<Vec<Result<OpOutcome>>> {
                (**self).batch(ctx, ops).await
            }
            async fn read(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                id: &LogicalId,
            ) -> Result<StoredResource> {
                (**self).read(ctx, rt, id).await
            }
            async fn vread(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                id: &LogicalId,
                v: VersionId,
            ) -> Result<StoredResource> {
                (**self).vread(ctx, rt, id, v).await
            }
            async fn history(
                &self,
                ctx: &TenantContext,
                request: &HistoryRequest,
            ) -> Result<HistoryPage> {
                (**self).history(ctx, request).await
            }
            async fn count(&self, ctx: &TenantContext, rt: Option<ResourceType>) -> Result<u64> {
                (**self).count(ctx, rt).await
            }
            async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage> {
                (**self).search(ctx, query).await
            }
            async fn search_ids(
                &self,
                ctx: &TenantContext,
                query: &SearchQuery,
                limit: usize,
            ) -> Result<Vec<LogicalId>> {
                (**self).search_ids(ctx, query, limit).await
            }
            async fn create(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                resource: Value,
            ) -> Result<Written> {
                (**self).create(ctx, rt, resource).await
            }
            async fn update(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                id: &LogicalId,
                resource: Value,
                if_match: Option<VersionId>,
            ) -> Result<Written> {
                (**self).update(ctx, rt, id, resource, if_match).await
            }
            async fn delete(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                id: &LogicalId,
            ) -> Result<Deleted> {
                (**self).delete(ctx, rt, id).await
            }
            async fn conditional_create(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                criteria: &SearchQuery,
                resource: Value,
            ) -> Result<Written> {
                (**self)
                    .conditional_create(ctx, rt, criteria, resource)
                    .await
            }
            async fn conditional_update(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                criteria: &SearchQuery,
                resource: Value,
            ) -> Result<Written> {
                (**self)
                    .conditional_update(ctx, rt, criteria, resource)
                    .await
            }
            async fn conditional_delete(
                &self,
                ctx: &TenantContext,
                rt: ResourceType,
                criteria: &SearchQuery,
            ) -> Result<Deleted> {
                (**self).conditional_delete(ctx, rt, criteria).await
            }
            async fn search_parameters(&self, ctx: &TenantContext) -> Result<Arc<Registry>> {
                (**self).search_parameters(ctx).await
            }
            async fn reindex_status(&self, ctx: &TenantContext) -> Result<Vec<ReindexStatus>> {
                (**self).reindex_status(ctx).await
            }
            async fn refresh_statistics(&self, ctx: &TenantContext) -> Result<()> {
                (**self).refresh_statistics(ctx).await
            }
            async fn reindex(
                &self,
                ctx: &TenantContext,
                options: ReindexOptions,
                progress: &(dyn for<'r> Fn(&'r ReindexStatus) + Send + Sync),
            ) -> Result<Vec<ReindexStatus>> {
                (**self).reindex(ctx, options, progress).await
            }
        }
    };
}

forward_storage!(Arc);
forward_storage!(Box);
