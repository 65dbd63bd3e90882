//! The store, written once over a [`Dialect`]: everything but the dialect's own items.
//!
//! By concern: [`write`] (the write path: transactions, batches, conditional operations),
//! [`read`] (reads, history, search pages and counts), [`include`] (`_include` and
//! `_revinclude`), [`params`] (a tenant's own SearchParameters and their reindex jobs),
//! [`changelog`] (the change log and its consumers), [`subscriptions`] (subscription state and
//! events) and [`digests`] (the digests the reconciler compares, and its job log). The search
//! SQL itself is planned in [`crate::search`].

mod changelog;
mod digests;
mod include;
mod params;
mod read;
mod search_pool;
mod subscriptions;
mod write;

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use fhirstore_core::digest::{join_u128, split_u128, Digest};
use fhirstore_core::search::ParamType;
use fhirstore_core::{
    from_micros, now_micros, Capabilities, Error, HistoryPage, HistoryRequest, LogicalId,
    OpOutcome, Permission, ResourceKey, ResourceStorage, ResourceType, Result, SearchPage,
    SearchQuery, StoredResource, TenantContext, TenantId, VersionId, WriteOp,
};
use serde_json::Value;
use tracing::instrument;

use crate::dialect::{db_err, Conn, Dialect, Row};
use crate::search;
use crate::{corrupt, SegmentDigest, SqlConfig};

pub(crate) use digests::fold_segment_map;
use write::precheck;

/// Parameters answered from the resources table's own columns.
const NATIVE_PARAMS: [&str; 2] = ["_id", "_lastUpdated"];
/// Parameter types answered from the index tables.
const SEARCH_TYPES: [ParamType; 7] = [
    ParamType::Token,
    ParamType::String,
    ParamType::Date,
    ParamType::Number,
    ParamType::Quantity,
    ParamType::Reference,
    ParamType::Uri,
];
/// `_include`/`_revinclude` rounds, and resources they may add to one page: `:iterate` over a
/// densely linked graph must not pull in a whole tenant.
/// `_total=estimate` takes the planner's estimate only from this size up; below it an exact
/// count is cheap, and a small estimate may come from missing statistics.
const ESTIMATE_TRUSTED_FROM: u64 = 10_000;
const MAX_INCLUDE_ROUNDS: usize = 4;
const MAX_INCLUDED: usize = 1_000;
/// A conditional delete matching more than this fails rather than deleting without bound.
const MAX_CONDITIONAL_DELETE: usize = 1_000;
/// Rows per multi-row INSERT; well under SQLite's bound-parameter limit.
const ROWS_PER_INSERT: usize = 500;

fn version_of(n: i64) -> Result<VersionId> {
    u64::try_from(n)
        .ok()
        .and_then(VersionId::new)
        .ok_or_else(|| corrupt(format!("version {n}")))
}

fn as_i64(v: VersionId) -> i64 {
    i64::try_from(v.get()).unwrap_or(i64::MAX)
}

/// Builds a resource from a `resource_versions` row's columns.
fn stored(
    tenant: &TenantId,
    key: ResourceKey,
    version: i64,
    last_updated: i64,
    deleted: bool,
    body: Option<Vec<u8>>,
) -> Result<StoredResource> {
    let content = match (deleted, body) {
        (true, _) => Value::Null,
        (false, Some(stored)) => {
            let text = crate::body::decode(stored)
                .map_err(|e| corrupt(format!("body of {key}: {}", e.0)))?;
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("body of {key}: {e}")))?
        }
        (false, None) => return Err(corrupt(format!("live version of {key} has no body"))),
    };
    Ok(StoredResource {
        tenant: tenant.clone(),
        key,
        version: version_of(version)?,
        last_updated: from_micros(last_updated),
        deleted,
        content,
    })
}

/// A sort key's value, column `i` of a page row.
fn read_key(kind: search::KeyKind, row: &mut Row, i: usize) -> Result<search::KeyValue> {
    use search::{KeyKind, KeyValue};
    Ok(match kind {
        KeyKind::Text => KeyValue::Text(row.get(i)?),
        KeyKind::Int => KeyValue::Int(row.get(i)?),
        KeyKind::Real => KeyValue::Real(row.get(i)?),
    })
}

fn key_from_row(rt: &str, id: String) -> Result<ResourceKey> {
    Ok(ResourceKey::new(
        ResourceType::new(rt).map_err(|_| corrupt(format!("resource type {rt:?}")))?,
        LogicalId::new(id).map_err(|e| corrupt(e.to_string()))?,
    ))
}

/// The primary store over dialect `D`: [`crate::SqliteStore`] or [`crate::PostgresStore`].
pub struct Store<D: Dialect> {
    /// Reads (SQLite: its own pool; PostgreSQL: the one pool).
    reader: sqlx::Pool<D::Db>,
    /// Writes (SQLite: exactly one connection).
    writer: sqlx::Pool<D::Db>,
    /// Searches, a pool of their own (see `SqlConfig::search_connections`).
    searcher: Arc<search_pool::SearchPool<D>>,
    config: SqlConfig,
    stats: Arc<crate::StatsUpkeep>,
    params: Arc<crate::ParamCache>,
    sizes: Arc<crate::SizeCache>,
    counts: Arc<crate::CountCache>,
    /// The change stamp (see `ChangeLog::change_stamp`), where the dialect has one.
    pub(crate) stamp: Option<Arc<dyn Fn() -> Option<u128> + Send + Sync>>,
    dialect: PhantomData<D>,
}

impl<D: Dialect> Clone for Store<D> {
    fn clone(&self) -> Self {
        Store {
            reader: self.reader.clone(),
            writer: self.writer.clone(),
            searcher: self.searcher.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
            params: self.params.clone(),
            sizes: self.sizes.clone(),
            counts: self.counts.clone(),
            stamp: self.stamp.clone(),
            dialect: PhantomData,
        }
    }
}

impl<D: Dialect> std::fmt::Debug for Store<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &D::NAME)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> Store<D> {
    /// A store over opened pools whose schema is up to date.
    pub(crate) fn new(
        reader: sqlx::Pool<D::Db>,
        writer: sqlx::Pool<D::Db>,
        searcher: sqlx::Pool<D::Db>,
        config: SqlConfig,
    ) -> Self {
        let searcher = Arc::new(search_pool::SearchPool::new(
            searcher,
            reader.clone(),
            config.search_connections,
        ));
        Store {
            reader,
            writer,
            searcher,
            config,
            stats: crate::StatsUpkeep::new(),
            params: Arc::default(),
            sizes: Arc::default(),
            counts: Arc::default(),
            stamp: None,
            dialect: PhantomData,
        }
    }

    /// Closes the pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
        self.searcher.close().await;
    }

    /// Connections of the search pool now held by searches: a gauge of search load, and how a
    /// caller sees that a search it gave up on has let its connection go.
    pub fn searches_in_flight(&self) -> u32 {
        self.searcher.in_use()
    }

    fn span_tenant(ctx: &TenantContext) -> &str {
        ctx.tenant().as_str()
    }

    /// A connection for reads.
    async fn read_conn(&self) -> Result<sqlx::pool::PoolConnection<D::Db>> {
        self.reader.acquire().await.map_err(db_err::<D>)
    }

    /// A connection for writes outside a transaction.
    async fn write_conn(&self) -> Result<sqlx::pool::PoolConnection<D::Db>> {
        self.writer.acquire().await.map_err(db_err::<D>)
    }
}

#[async_trait]
impl<D: Dialect> ResourceStorage for Store<D> {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.name = D::NAME;
        caps.read = true;
        caps.history = true;
        caps.write = true;
        caps.transaction = true;
        caps.search_params = NATIVE_PARAMS.to_vec();
        caps.search_types = SEARCH_TYPES.to_vec();
        caps.modifiers = vec![
            "exact",
            "contains",
            "not",
            "missing",
            "below",
            "above",
            "type",
            "text",
            "of-type",
            "identifier",
        ];
        caps.chaining = true;
        caps.includes = true;
        caps.system_search = true;
        caps.compartments = true;
        caps.id_sets = true;
        caps.sort_any = true;
        caps.sort_params = NATIVE_PARAMS.to_vec();
        caps
    }

    #[instrument(name = "storage.sql.transaction", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx), entries = ops.len()))]
    async fn transaction(&self, ctx: &TenantContext, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>> {
        precheck(ctx, &ops, true, self.config.validation)?;
        self.run_atomic(ctx, ops).await
    }

    #[instrument(name = "storage.sql.batch", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx), entries = ops.len()))]
    async fn batch(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<OpOutcome>>> {
        self.run_batch(ctx, ops).await
    }

    #[instrument(name = "storage.sql.read", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx), resource_type = %rt))]
    async fn read(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
        id: &LogicalId,
    ) -> Result<StoredResource> {
        ctx.require(Permission::Read)?;
        let mut conn = self.reader.acquire().await.map_err(db_err::<D>)?;
        Self::read_current(&mut conn, ctx.tenant(), rt, id).await
    }

    #[instrument(name = "storage.sql.vread", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx), resource_type = %rt))]
    async fn vread(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
        id: &LogicalId,
        version: VersionId,
    ) -> Result<StoredResource> {
        ctx.require(Permission::Read)?;
        self.read_version(ctx.tenant(), rt, id, version).await
    }

    #[instrument(name = "storage.sql.history", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx)))]
    async fn history(&self, ctx: &TenantContext, request: &HistoryRequest) -> Result<HistoryPage> {
        ctx.require(Permission::Read)?;
        self.history_page(ctx.tenant(), request).await
    }

    #[instrument(name = "storage.sql.search", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx),
               resource_type = ?query.resource_type.map(|t| t.as_str())))]
    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage> {
        ctx.require(Permission::Read)?;
        self.search_page(ctx.tenant(), query).await
    }

    /// One index-backed statement of keys, bounded like a search; no bodies are read.
    async fn search_ids(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        limit: usize,
    ) -> Result<Vec<LogicalId>> {
        ctx.require(Permission::Read)?;
        let tenant = ctx.tenant();
        let keys = self
            .bounded_search(async |conn| Self::find_keys(conn, tenant, query, limit).await)
            .await?;
        Ok(keys.into_iter().map(|k| k.id).collect())
    }

    #[instrument(name = "storage.sql.count", skip_all,
        fields(backend = D::NAME, tenant = %Self::span_tenant(ctx)))]
    async fn count(&self, ctx: &TenantContext, rt: Option<ResourceType>) -> Result<u64> {
        ctx.require(Permission::Read)?;
        self.count_bounded(ctx.tenant(), &SearchQuery::all(rt))
            .await
    }

    async fn search_parameters(
        &self,
        ctx: &TenantContext,
    ) -> Result<std::sync::Arc<fhirstore_core::registry::Registry>> {
        ctx.require(Permission::Read)?;
        let mut conn = self.reader.acquire().await.map_err(db_err::<D>)?;
        Ok(Self::tenant_params(&mut conn, &self.params, ctx.tenant())
            .await?
            .search
            .clone())
    }

    async fn refresh_statistics(&self, ctx: &TenantContext) -> Result<()> {
        ctx.require(Permission::Admin)?;
        self.refresh_stats().await
    }

    async fn reindex_status(
        &self,
        ctx: &TenantContext,
    ) -> Result<Vec<fhirstore_core::ReindexStatus>> {
        ctx.require(Permission::Read)?;
        self.param_statuses(ctx.tenant()).await
    }

    async fn reindex(
        &self,
        ctx: &TenantContext,
        options: fhirstore_core::ReindexOptions,
        progress: &(dyn for<'r> Fn(&'r fhirstore_core::ReindexStatus) + Send + Sync),
    ) -> Result<Vec<fhirstore_core::ReindexStatus>> {
        ctx.require(Permission::Admin)?;
        self.run_reindex(ctx.tenant(), options, progress).await
    }
}
