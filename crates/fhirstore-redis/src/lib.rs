//! The Redis secondary: the current version of every resource (read by id) and index
//! structures for fast lookups: `_id`, tokens (`code`, `system|code`, `|code`, `system|`),
//! references (by id, type/id or URL), uris, string prefixes and `_lastUpdated` ranges.
//!
//! Plain Redis 7 as Debian ships it, no modules. Each change is one Lua script
//! (`lua/apply.lua`) that compares versions, writes the document, swaps the index entries of the
//! old version for the new one's, folds the element hash into the root and segment digests and
//! records the key's segment membership, atomically. A batch of changes is one pipelined round
//! trip.
//!
//! The crate is laid out like every secondary: `config.rs` (settings), `apply.rs` (changes in),
//! `search.rs` (criteria to the backend's queries), `digests.rs` (what reconciliation compares)
//! and `lib.rs` (the type, its lifecycle and the `Secondary` impl).
//!
//! Every key is `{prefix}:{tenant}:…` with the tenant in braces, a Redis Cluster hash tag, so a
//! tenant's keys share one slot and each script touches one slot only:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `d:{type}:{id}` | hash | `v` version, `lu` last updated (µs), `d` deleted, `b` body, `e` element hash, `ix` the index entries written |
//! | `g:{type}` | hash | digests: `r` the root, `{segment}` each non-empty segment, as `x0:x1:x2:x3:count` |
//! | `gg:{type}` | hash | `{group}`: each non-empty group of 16 segments, in the same form |
//! | `m:{type}:{segment}` | set | ids in the segment, tombstones included |
//! | `lu:{type}` | sorted set | live ids by last updated: the type's live set |
//! | `ids:{type}` | sorted set | live ids at score 0, so a lexical range walks them in id order |
//! | `t:{type}:{param}:…` | set | ids by token: `c:{code}`, `sc:{len}:{system}{code}`, `s:{system}` |
//! | `r:{type}:{param}:…` | set | ids by reference: `i:{id}`, `ti:{type}/{id}`, `u:{url}`, `uv:{len}:{url}{version}` |
//! | `u:{type}:{param}:{uri}` | set | ids by uri |
//! | `s:{type}:{param}` | sorted set | `{folded}\0{id}` members, for starts-with as a lexical range |
//! | `types` | set | the types the tenant has |
//!
//! A Redis that restarts empty (or was never built) has no `{prefix}:built` marker. It then
//! reports [`Health::NeedsRebuild`] and refuses reads and searches until a rebuild calls
//! [`Secondary::mark_built`], so it never answers from a partial copy, and never with a version
//! older than one it served before it lost its data.
//!
//! A `redis+cluster://host:port[,host:port…]` URL connects to a Redis Cluster instead. Every
//! command and script then goes to the shard of its tenant's slot, a batch of changes is one
//! pipeline per tenant, and the `built` marker is kept once per slot (see `cluster.rs` for
//! why), so a shard that comes back empty is noticed. With `?replicas=N`, each batch waits
//! (`WAIT`) until `N` replicas of its shard hold it, so a failover does not lose a batch the
//! sync layer was told was applied.
//!
//! Indexes cover R4's search parameters; a tenant's own SearchParameters are answered by the
//! primary.

use std::collections::BTreeSet;

use async_trait::async_trait;
use fhirstore_core::date::InstantPredicate;
use fhirstore_core::digest::{Digest, SEGMENTS};
use fhirstore_core::index::{self, IndexEntries};
use fhirstore_core::search::{CriterionValues, ParamType, Summary, TokenValue, TotalMode};
use fhirstore_core::secondary::{
    reference_term, reference_terms, token_term, token_terms, Applied, Change, DigestView,
    GroupDigest, Health, KeyState, Scrub, Secondary, SegmentDigest,
};
use fhirstore_core::{
    from_micros, now_micros, to_micros, Capabilities, Error, LogicalId, Permission, ResourceKey,
    ResourceType, Result, SearchPage, SearchQuery, StoredResource, TenantContext, TenantId,
    VersionId,
};
use futures::{StreamExt as _, TryStreamExt as _};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Pipeline, Script, Value as RValue};
use serde_json::{json, Value};

mod apply;
mod cluster;
mod config;
mod digests;
mod search;

pub use config::RedisConfig;
use digests::parse_digest;

/// The name this backend reports.
pub const BACKEND_NAME: &str = "redis";

/// A connection to a single server or to a cluster; both reconnect on their own.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, RValue> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<RValue>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis secondary. Cheap to clone: clones share one multiplexed, self-reconnecting
/// connection (one per shard on a cluster).
#[derive(Clone)]
pub struct RedisSecondary {
    conn: Conn,
    /// On a cluster, how many replicas each batch of changes waits for.
    replicas: Option<u32>,
    timeout: std::time::Duration,
    prefix: String,
    apply: Script,
    search: Script,
    regroup: Script,
    scrub_read: Script,
    scrub_fix: Script,
}

impl std::fmt::Debug for RedisSecondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSecondary")
            .field("prefix", &self.prefix)
            .field("cluster", &self.is_cluster())
            .finish_non_exhaustive()
    }
}

/// Maps a Redis error to the store's: temporary when the connection, not the request, failed.
fn redis_err(e: redis::RedisError) -> Error {
    let temporary = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError
                | redis::ErrorKind::TryAgain
                // A cluster in failover or resharding: the client follows redirects itself,
                // and what is left after its retries passes once the cluster settles.
                | redis::ErrorKind::Moved
                | redis::ErrorKind::Ask
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::MasterDown
                | redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::ReadOnly
        );
    Error::backend(format!("redis: {e}"), temporary, e)
}

fn bad_data(what: impl std::fmt::Display) -> Error {
    Error::backend_msg(format!("redis holds malformed data: {what}"), false)
}

fn needs_rebuild() -> Error {
    Error::needs_rebuild(
        BACKEND_NAME,
        "it holds no complete copy (new, or restarted empty)",
    )
}

fn parse_version(text: &str, rt: ResourceType, id: &str) -> Result<VersionId> {
    text.parse::<u64>()
        .ok()
        .and_then(VersionId::new)
        .ok_or_else(|| bad_data(format!("version of {rt}/{id}")))
}

/// The four signed 32-bit words Lua's `bit` library works on.
fn hash_words(e: u128) -> [i32; 4] {
    [
        (e >> 96) as u32 as i32,
        (e >> 64) as u32 as i32,
        (e >> 32) as u32 as i32,
        e as u32 as i32,
    ]
}

fn parse_words(text: &str) -> Option<(u128, Vec<i64>)> {
    let nums: Vec<i64> = text
        .split(':')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let hash = nums
        .iter()
        .take(4)
        .fold(0u128, |acc, w| (acc << 32) | u128::from(*w as i32 as u32));
    (nums.len() >= 4).then_some((hash, nums[4..].to_vec()))
}

impl RedisSecondary {
    /// Connects, with a connection manager that reconnects on its own after an outage.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        if config.prefix.is_empty() || config.prefix.contains(['{', '}', '*', '?', '[', ']']) {
            return Err(Error::Configuration(format!(
                "redis key prefix {:?} must be non-empty, without braces or glob characters",
                config.prefix
            )));
        }
        let (conn, replicas) = match cluster::parse_url(&config.url)? {
            Some(url) => {
                let client = redis::cluster::ClusterClientBuilder::new(url.nodes)
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout)
                    .retries(3)
                    .build()
                    .map_err(redis_err)?;
                let conn = client.get_async_connection().await.map_err(redis_err)?;
                (Conn::Cluster(conn), Some(url.replicas))
            }
            None => {
                let client = redis::Client::open(config.url.as_str()).map_err(redis_err)?;
                let manager = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(config.timeout)
                    .set_response_timeout(config.timeout)
                    .set_number_of_retries(2)
                    .set_max_delay(200);
                let conn = client
                    .get_connection_manager_with_config(manager)
                    .await
                    .map_err(redis_err)?;
                (Conn::Single(conn), None)
            }
        };
        Ok(RedisSecondary {
            conn,
            replicas,
            timeout: config.timeout,
            prefix: config.prefix.clone(),
            apply: Script::new(include_str!("lua/apply.lua")),
            search: Script::new(include_str!("lua/search.lua")),
            regroup: Script::new(include_str!("lua/regroup.lua")),
            scrub_read: Script::new(include_str!("lua/scrub_read.lua")),
            scrub_fix: Script::new(include_str!("lua/scrub_fix.lua")),
        })
    }

    /// The first part of every key this secondary writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key base of one tenant: `{prefix}:{tenant}:`, the braces a Cluster hash tag.
    fn base(&self, tenant: &TenantId) -> String {
        format!("{}:{{{}}}:", self.prefix, tenant.as_str())
    }

    /// Whether this secondary talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The `built` marker that vouches for `tenant`'s keys: the one marker of a single server,
    /// or the marker of the tenant's slot on a cluster.
    fn built_key(&self, tenant: &TenantId) -> String {
        if self.is_cluster() {
            cluster::marker_key(&self.prefix, cluster::key_slot(tenant.as_str().as_bytes()))
        } else {
            format!("{}:built", self.prefix)
        }
    }

    fn doc_key(&self, tenant: &TenantId, rt: ResourceType, id: &str) -> String {
        format!("{}d:{rt}:{id}", self.base(tenant))
    }

    /// Runs a pipeline of script calls, loading the scripts once if the server has lost them
    /// (a restart empties its script cache). Repeating the pipeline is safe: every script is
    /// idempotent or read-only.
    async fn run(&self, pipe: &Pipeline) -> Result<Vec<RValue>> {
        let mut conn = self.conn.clone();
        match pipe.query_async::<Vec<RValue>>(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                for s in [
                    &self.apply,
                    &self.search,
                    &self.regroup,
                    &self.scrub_read,
                    &self.scrub_fix,
                ] {
                    s.prepare_invoke()
                        .load_async(&mut conn)
                        .await
                        .map_err(redis_err)?;
                }
                pipe.query_async(&mut conn).await.map_err(redis_err)
            }
            other => other.map_err(redis_err),
        }
    }

    fn evalsha(pipe: &mut Pipeline, script: &Script, keys: &[&str], args: &[&str]) {
        let cmd = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        for a in args {
            cmd.arg(*a);
        }
    }

    /// Deletes every key under this secondary's prefix, every tenant's and the `built`
    /// marker: the secondary is then new and must be rebuilt.
    pub async fn purge(&self) -> Result<()> {
        self.delete_matching(&format!("{}:*", self.prefix), None)
            .await
    }

    /// Deletes the keys matching `pattern`: on a cluster, on the master of `slot`, or on
    /// every master when `slot` is `None`.
    async fn delete_matching(&self, pattern: &str, slot: Option<u16>) -> Result<()> {
        let nodes = match (&self.conn, slot) {
            (Conn::Single(_), _) => vec![None],
            (Conn::Cluster(_), Some(slot)) => vec![Some(SingleNodeRoutingInfo::SpecificNode(
                Route::new(slot, SlotAddr::Master),
            ))],
            (Conn::Cluster(_), None) => self
                .slot_ranges()
                .await?
                .into_iter()
                .map(|r| {
                    Some(SingleNodeRoutingInfo::ByAddress {
                        host: r.host,
                        port: r.port,
                    })
                })
                .collect(),
        };
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = match (&self.conn, &node) {
                    (Conn::Cluster(c), Some(node)) => {
                        let reply = c
                            .clone()
                            .route_command(&scan, RoutingInfo::SingleNode(node.clone()))
                            .await
                            .map_err(redis_err)?;
                        redis::from_redis_value(&reply).map_err(redis_err)?
                    }
                    _ => scan
                        .query_async(&mut self.conn.clone())
                        .await
                        .map_err(redis_err)?,
                };
                self.unlink(keys).await?;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// Unlinks `keys`: in one command, or on a cluster one command per slot (a command may
    /// not span slots there).
    async fn unlink(&self, keys: Vec<String>) -> Result<()> {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
        for k in keys {
            let slot = if self.is_cluster() {
                cluster::key_slot(k.as_bytes())
            } else {
                0
            };
            by_slot.entry(slot).or_default().push(k);
        }
        for keys in by_slot.into_values() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }

    /// The cluster's slot ranges and their masters (`CLUSTER SLOTS`).
    async fn slot_ranges(&self) -> Result<Vec<cluster::SlotRange>> {
        let reply: RValue = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        cluster::parse_slots(&reply)
    }

    /// Runs one pipeline per tenant group (on a cluster, a pipeline may not span slots), each
    /// followed by a `WAIT` for the configured replicas, and returns the replies in the order
    /// of `groups`' commands. Groups run concurrently.
    async fn run_groups(&self, groups: Vec<Pipeline>) -> Result<Vec<Vec<RValue>>> {
        let wait = self.replicas.filter(|n| *n > 0);
        futures::stream::iter(groups.into_iter().map(|mut pipe| async move {
            if let Some(n) = wait {
                let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
                pipe.cmd("WAIT").arg(n).arg(ms);
            }
            let mut replies = self.run(&pipe).await?;
            if let Some(n) = wait {
                match replies.pop() {
                    Some(RValue::Int(got)) if got >= i64::from(n) => {}
                    Some(RValue::Int(got)) => {
                        return Err(Error::backend_msg(
                            format!(
                                "redis: {got} of the {n} replicas (replicas=) acknowledged a \
                                 batch within {} ms",
                                self.timeout.as_millis()
                            ),
                            true,
                        ))
                    }
                    _ => return Err(bad_data("WAIT reply")),
                }
            }
            Ok(replies)
        }))
        .buffered(16)
        .try_collect()
        .await
    }

    /// Fails unless the `built` marker is there; see the module documentation.
    fn check_built(marker: &RValue) -> Result<()> {
        match marker {
            RValue::Nil => Err(needs_rebuild()),
            _ => Ok(()),
        }
    }

    fn stored(
        tenant: &TenantId,
        rt: ResourceType,
        id: LogicalId,
        version: &str,
        last_updated: &str,
        deleted: bool,
        body: Option<String>,
    ) -> Result<StoredResource> {
        let version = parse_version(version, rt, id.as_str())?;
        let lu = last_updated
            .parse::<i64>()
            .map_err(|_| bad_data(format!("lastUpdated of {rt}/{id}")))?;
        let content = match body {
            Some(b) if !deleted => {
                serde_json::from_str(&b).map_err(|e| bad_data(format!("body of {rt}/{id}: {e}")))?
            }
            _ => Value::Null,
        };
        Ok(StoredResource {
            tenant: tenant.clone(),
            key: ResourceKey {
                resource_type: rt,
                id,
            },
            version,
            last_updated: from_micros(lu),
            deleted,
            content,
        })
    }
}

#[async_trait]
impl Secondary for RedisSecondary {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.name = BACKEND_NAME;
        caps.read = true;
        caps.search_params = vec!["_id", "_lastUpdated"];
        caps.search_types = vec![
            ParamType::Token,
            ParamType::Reference,
            ParamType::Uri,
            ParamType::String,
        ];
        caps
    }

    async fn apply(&self, changes: &[Change]) -> Result<Applied> {
        self.apply_changes(changes, false).await
    }

    async fn repair(&self, changes: &[Change]) -> Result<Applied> {
        self.apply_changes(changes, true).await
    }

    async fn read(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<StoredResource>> {
        ctx.require(Permission::Read)?;
        let mut pipe = redis::pipe();
        // The marker first: a restart between the two commands leaves the document missing,
        // which reads as a miss, never as stale data.
        pipe.cmd("GET").arg(self.built_key(ctx.tenant()));
        pipe.cmd("HMGET")
            .arg(self.doc_key(ctx.tenant(), resource_type, id.as_str()))
            .arg(&["v", "lu", "d", "b"]);
        let replies = self.run(&pipe).await?;
        let [marker, doc] = replies.as_slice() else {
            return Err(bad_data("read reply"));
        };
        Self::check_built(marker)?;
        let RValue::Array(fields) = doc else {
            return Err(bad_data("read reply"));
        };
        let fields: Vec<Option<String>> = fields.iter().map(text).collect();
        let [Some(v), Some(lu), Some(d), body] = fields.as_slice() else {
            return Ok(None);
        };
        Self::stored(
            ctx.tenant(),
            resource_type,
            id.clone(),
            v,
            lu,
            d == "1",
            body.clone(),
        )
        .map(Some)
    }

    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage> {
        self.search_page(ctx, query).await
    }

    async fn scrub(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
        fix: bool,
    ) -> Result<Scrub> {
        let mut out = Scrub::default();
        // A chunk is one script call: small enough not to hold Redis for long.
        for chunk in segments.chunks(32) {
            self.scrub_chunk(tenant, resource_type, chunk, fix, &mut out)
                .await?;
        }
        Ok(out)
    }

    async fn clear(&self, tenant: &TenantId) -> Result<()> {
        // Tenant ids are [A-Za-z0-9-], so the pattern needs no escaping; SCAN's glob takes
        // the braces literally.
        let slot = cluster::key_slot(tenant.as_str().as_bytes());
        self.delete_matching(&format!("{}*", self.base(tenant)), Some(slot))
            .await
    }

    async fn mark_built(&self) -> Result<()> {
        let value = uuid::Uuid::now_v7().to_string();
        let keys: Vec<String> = match self.conn {
            Conn::Single(_) => vec![format!("{}:built", self.prefix)],
            Conn::Cluster(_) => (0..cluster::SLOTS)
                .map(|slot| cluster::marker_key(&self.prefix, slot))
                .collect(),
        };
        futures::stream::iter(keys.into_iter().map(|k| {
            let value = value.clone();
            let mut conn = self.conn.clone();
            async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(value)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_err)
            }
        }))
        .buffer_unordered(256)
        .try_collect()
        .await
    }

    async fn health(&self) -> Health {
        let ranges = match self.conn {
            Conn::Single(_) => None,
            Conn::Cluster(_) => match self.slot_ranges().await {
                Ok(r) => Some(r),
                Err(e) => return Health::Unavailable(e.to_string()),
            },
        };
        let Some(ranges) = ranges else {
            return match redis::cmd("GET")
                .arg(format!("{}:built", self.prefix))
                .query_async::<Option<String>>(&mut self.conn.clone())
                .await
            {
                Ok(Some(_)) => Health::Healthy,
                Ok(None) => Health::NeedsRebuild(
                    "no built marker: new, or restarted without its data".to_owned(),
                ),
                Err(e) => Health::Unavailable(e.to_string()),
            };
        };
        let gaps = cluster::uncovered(&ranges);
        if !gaps.is_empty() {
            return Health::Unavailable(format!(
                "the cluster serves no master for slots {}",
                gaps.join(", ")
            ));
        }
        // A shard loses its slots together: the first slot's marker speaks for the range.
        // Reads check the marker of their own slot besides.
        for r in &ranges {
            match redis::cmd("GET")
                .arg(cluster::marker_key(&self.prefix, r.first))
                .query_async::<Option<String>>(&mut self.conn.clone())
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Health::NeedsRebuild(format!(
                        "slots {}-{} (the shard at {}:{}) have no built marker: that shard \
                         is new or restarted without its data",
                        r.first, r.last, r.host, r.port
                    ))
                }
                Err(e) => return Health::Unavailable(e.to_string()),
            }
        }
        Health::Healthy
    }
}

fn text(v: &RValue) -> Option<String> {
    match v {
        RValue::BulkString(b) => String::from_utf8(b.clone()).ok(),
        RValue::SimpleString(s) => Some(s.clone()),
        RValue::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The numbered digest fields of a hash reply (`HGETALL`), skipping the root `r`, in number
/// order.
fn hash_fields(reply: &RValue) -> Result<Vec<(u16, Digest)>> {
    let fields = match reply {
        RValue::Array(a) => a.iter().map(text).collect::<Vec<_>>(),
        RValue::Map(m) => m
            .iter()
            .flat_map(|(k, v)| [text(k), text(v)])
            .collect::<Vec<_>>(),
        RValue::Nil => Vec::new(),
        _ => return Err(bad_data("digest hash reply")),
    };
    let mut out = Vec::with_capacity(fields.len() / 2);
    for pair in fields.chunks(2) {
        let [Some(field), Some(value)] = pair else {
            return Err(bad_data("digest hash reply"));
        };
        if field == "r" {
            continue;
        }
        let n = field
            .parse::<u16>()
            .map_err(|_| bad_data(format!("digest field {field:?}")))?;
        out.push((n, parse_digest(value)?));
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}
