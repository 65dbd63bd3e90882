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
use redis::aio::ConnectionManager;
use redis::{Pipeline, Script, Value as RValue};
use serde_json::{json, Value};

/// The name this backend reports.
pub const BACKEND_NAME: &str = "redis";

/// How the Redis secondary connects and names its keys.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// A `redis://` URL.
    pub url: String,
    /// The first part of every key, so several deployments (or test runs) can share a server.
    pub prefix: String,
    /// How long a command, or a connection attempt, may take before it fails (temporarily).
    /// Writes in synchronous mode wait at most this long for a Redis that went away.
    pub timeout: std::time::Duration,
}

impl RedisConfig {
    /// A configuration with the default prefix, `fhirstore`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "fhirstore".to_owned(),
            timeout: std::time::Duration::from_secs(2),
        }
    }
}

/// The Redis secondary. Cheap to clone: clones share one multiplexed, self-reconnecting
/// connection.
#[derive(Clone)]
pub struct RedisSecondary {
    conn: ConnectionManager,
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
            redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
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

fn parse_digest(text: &str) -> Result<Digest> {
    match parse_words(text) {
        Some((hash, rest)) if rest.len() == 1 => Ok(Digest {
            hash,
            count: rest[0],
        }),
        _ => Err(bad_data(format!("digest {text:?}"))),
    }
}

/// The index entries one resource body contributes, as the apply script takes them.
fn index_ops(rt: ResourceType, id: &str, content: &Value, last_updated: i64) -> Vec<Value> {
    let mut set_keys = BTreeSet::new();
    let e: IndexEntries = index::extract(content);
    for t in &e.tokens {
        let p = format!("t:{rt}:{}:", t.param);
        set_keys.extend(
            token_terms(&t.system, &t.code)
                .iter()
                .map(|k| format!("{p}{k}")),
        );
    }
    for r in &e.references {
        let p = format!("r:{rt}:{}:", r.param);
        set_keys.extend(reference_terms(r).iter().map(|k| format!("{p}{k}")));
    }
    for u in &e.uris {
        set_keys.insert(format!("u:{rt}:{}:{}", u.param, u.uri));
    }
    let mut ops: Vec<Value> = set_keys.into_iter().map(|k| json!(["s", k])).collect();
    let strings: BTreeSet<(String, String)> = e
        .strings
        .iter()
        .map(|s| (format!("s:{rt}:{}", s.param), format!("{}\0{id}", s.folded)))
        .collect();
    ops.extend(strings.into_iter().map(|(k, m)| json!(["l", k, m])));
    ops.push(json!(["z", format!("lu:{rt}"), last_updated.to_string()]));
    ops.push(json!(["l", format!("ids:{rt}"), id]));
    ops
}

/// What a deep scrub found wrong with one document.
enum Damage {
    Lost,
    Corrupted,
    Unreadable,
}

/// Checks one row of `scrub_read.lua` (`status, v, e, d, b, lu`): the element hash the body
/// hashes to again, or what is wrong with it.
fn scrub_row(
    tenant: &TenantId,
    rt: ResourceType,
    id: &LogicalId,
    row: &[String],
) -> std::result::Result<u128, Damage> {
    let [status, v, e, d, b, lu] = row else {
        return Err(match row.first().map(String::as_str) {
            Some("missing") => Damage::Lost,
            _ => Damage::Unreadable,
        });
    };
    if status != "ok" {
        return Err(Damage::Unreadable);
    }
    let version = parse_version(v, rt, id.as_str()).map_err(|_| Damage::Unreadable)?;
    let kept = parse_words(e)
        .filter(|(_, rest)| rest.is_empty())
        .map(|(hash, _)| hash)
        .ok_or(Damage::Unreadable)?;
    let last_updated = lu.parse::<i64>().map_err(|_| Damage::Unreadable)?;
    let content = match d.as_str() {
        "1" => None,
        "0" => Some(serde_json::from_str::<Value>(b).map_err(|_| Damage::Unreadable)?),
        _ => return Err(Damage::Unreadable),
    };
    let again = Change {
        tenant: tenant.clone(),
        key: ResourceKey {
            resource_type: rt,
            id: id.clone(),
        },
        version,
        last_updated: from_micros(last_updated),
        content,
    }
    .element_hash();
    if again == kept {
        Ok(kept)
    } else {
        Err(Damage::Corrupted)
    }
}

/// One criterion's alternatives, as the search script takes them.
fn alternatives(
    rt: ResourceType,
    param: &str,
    values: &CriterionValues,
    now: i64,
) -> Result<Vec<Value>> {
    let unsupported = || Error::Unsupported(format!("redis cannot answer {param} this way"));
    let alts = match (param, values) {
        ("_id", CriterionValues::Token(tokens)) => tokens
            .iter()
            .map(|t| match (&t.system, &t.code) {
                (None, Some(code)) => Ok(json!({ "id": code })),
                _ => Err(unsupported()),
            })
            .collect::<Result<Vec<_>>>()?,
        ("_lastUpdated", CriterionValues::Date(dates)) => {
            let key = format!("lu:{rt}");
            let mut out = Vec::new();
            for d in dates {
                let InstantPredicate { ge, lt, negated } = d.instant_predicate(now);
                let lo = |v: Option<i64>| v.map_or("-inf".to_owned(), |v| v.to_string());
                let hi = |v: Option<i64>| v.map_or("+inf".to_owned(), |v| format!("({v}"));
                if negated {
                    // Outside [ge, lt): below ge, or at or above lt.
                    if let Some(ge) = ge {
                        out.push(json!({"z": key, "min": "-inf", "max": format!("({ge}")}));
                    }
                    if let Some(lt) = lt {
                        out.push(json!({"z": key, "min": lt.to_string(), "max": "+inf"}));
                    }
                } else {
                    out.push(json!({"z": key, "min": lo(ge), "max": hi(lt)}));
                }
            }
            out
        }
        (_, CriterionValues::Token(tokens)) => tokens
            .iter()
            .map(|t| token_key(rt, param, t).map(|k| json!({ "s": k })))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(unsupported)?,
        (_, CriterionValues::Reference(refs)) => refs
            .iter()
            .map(|r| json!({ "s": format!("r:{rt}:{param}:{}", reference_term(r)) }))
            .collect(),
        (_, CriterionValues::Uri(uris)) => uris
            .iter()
            .map(|u| json!({ "s": format!("u:{rt}:{param}:{u}") }))
            .collect(),
        (_, CriterionValues::String(strings)) => strings
            .iter()
            .map(|s| {
                let folded = index::fold(s);
                json!({
                    "l": format!("s:{rt}:{param}"),
                    "min": format!("[{folded}"),
                    "max": format!("({folded}\u{10FFFF}"),
                })
            })
            .collect(),
        _ => return Err(unsupported()),
    };
    Ok(alts)
}

fn token_key(rt: ResourceType, param: &str, t: &TokenValue) -> Option<String> {
    token_term(t).map(|term| format!("t:{rt}:{param}:{term}"))
}

/// This backend's cursor: the last id of the page, marked so another backend's cursor is not
/// mistaken for one.
const CURSOR_PREFIX: &str = "redis:";

fn text(v: &RValue) -> Option<String> {
    match v {
        RValue::BulkString(b) => String::from_utf8(b.clone()).ok(),
        RValue::SimpleString(s) => Some(s.clone()),
        RValue::Int(i) => Some(i.to_string()),
        _ => None,
    }
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
        Ok(RedisSecondary {
            conn,
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

    fn built_key(&self) -> String {
        format!("{}:built", self.prefix)
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

    /// The (tenant, type) root and group digests, read atomically so no apply falls between.
    async fn root_and_groups(
        &self,
        digests: &str,
        groups: &str,
    ) -> Result<(Digest, Vec<GroupDigest>)> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HGET").arg(digests).arg("r");
        pipe.cmd("HGETALL").arg(groups);
        let replies = self.run(&pipe).await?;
        let root = match replies.first().and_then(text) {
            None => Digest::default(),
            Some(t) => parse_digest(&t)?,
        };
        let fields = replies
            .get(1)
            .ok_or_else(|| bad_data("group digests reply"))?;
        let groups = hash_fields(fields)?
            .into_iter()
            .map(|(group, digest)| GroupDigest { group, digest })
            .collect();
        Ok((root, groups))
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
        self.delete_matching(&format!("{}:*", self.prefix)).await
    }

    async fn delete_matching(&self, pattern: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_err)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn apply_changes(&self, changes: &[Change], repair: bool) -> Result<Applied> {
        if changes.is_empty() {
            return Ok(Applied::default());
        }
        let mut pipe = redis::pipe();
        for c in changes {
            let rt = c.key.resource_type;
            let id = c.key.id.as_str();
            let lu = to_micros(c.last_updated);
            let (body, ops) = match &c.content {
                Some(v) => (
                    serde_json::to_string(v).map_err(|e| bad_data(e.to_string()))?,
                    index_ops(rt, id, v, lu),
                ),
                None => (String::new(), Vec::new()),
            };
            let ops = Value::Array(ops).to_string();
            let e = hash_words(c.element_hash()).map(|w| w.to_string());
            let args = [
                self.base(&c.tenant),
                rt.to_string(),
                id.to_owned(),
                c.version.get().to_string(),
                lu.to_string(),
                if c.content.is_some() { "0" } else { "1" }.to_owned(),
                body,
                e[0].clone(),
                e[1].clone(),
                e[2].clone(),
                e[3].clone(),
                c.segment().to_string(),
                ops,
                if repair { "1" } else { "0" }.to_owned(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let doc = self.doc_key(&c.tenant, rt, id);
            Self::evalsha(&mut pipe, &self.apply, &[&doc], &args);
        }
        let replies = self.run(&pipe).await?;
        let mut out = Applied::default();
        for r in replies {
            match r {
                RValue::Int(1) => out.applied += 1,
                RValue::Int(0) => out.skipped += 1,
                other => return Err(bad_data(format!("apply reply {other:?}"))),
            }
        }
        tracing::debug!(applied = out.applied, skipped = out.skipped, "redis apply");
        Ok(out)
    }

    /// Scrubs one chunk of segments; see [`Secondary::scrub`].
    async fn scrub_chunk(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: &[u16],
        fix: bool,
        out: &mut Scrub,
    ) -> Result<()> {
        let base = self.base(tenant);
        let digests = format!("{base}g:{rt}");
        let mut args = vec![base.clone(), rt.to_string()];
        args.extend(segments.iter().map(u16::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut pipe = redis::pipe();
        Self::evalsha(&mut pipe, &self.scrub_read, &[&digests], &args);
        let replies = self.run(&pipe).await?;
        let [RValue::Array(segs)] = replies.as_slice() else {
            return Err(bad_data("scrub reply"));
        };
        let mut fixes = redis::pipe();
        let mut pending = 0;
        for seg in segs {
            let RValue::Array(parts) = seg else {
                return Err(bad_data("scrub segment"));
            };
            let [number, maintained, RValue::Array(rows)] = parts.as_slice() else {
                return Err(bad_data("scrub segment"));
            };
            let number = text(number).ok_or_else(|| bad_data("scrub segment number"))?;
            let maintained = match text(maintained).as_deref() {
                None | Some("") => Digest::default(),
                // A maintained digest that does not parse is wrong by definition.
                Some(t) => parse_digest(t).unwrap_or(Digest { hash: 1, count: -1 }),
            };
            let mut held = Digest::default();
            let mut evict: Vec<String> = Vec::new();
            for row in rows {
                let RValue::Array(f) = row else {
                    return Err(bad_data("scrub row"));
                };
                let f: Vec<String> = f.iter().map(|v| text(v).unwrap_or_default()).collect();
                let Some(id) = f.first().and_then(|i| LogicalId::new(i.as_str()).ok()) else {
                    continue;
                };
                out.keys_read += 1;
                match scrub_row(tenant, rt, &id, &f[1..]) {
                    Ok(e) => held.merge(Digest { hash: e, count: 1 }),
                    Err(kind) => {
                        let seen = match kind {
                            Damage::Lost => {
                                out.lost.push(id.clone());
                                String::new()
                            }
                            Damage::Corrupted => {
                                out.corrupted.push(id.clone());
                                f.get(2).cloned().unwrap_or_default()
                            }
                            Damage::Unreadable => {
                                out.unreadable.push(id.clone());
                                f.get(2).cloned().unwrap_or_default()
                            }
                        };
                        evict.push(id.to_string());
                        evict.push(seen);
                    }
                }
            }
            if held == maintained && evict.is_empty() {
                continue;
            }
            out.segments_rewritten += 1;
            if fix {
                pending += 1;
                let mut args = vec![base.clone(), rt.to_string(), number];
                args.append(&mut evict);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Self::evalsha(&mut fixes, &self.scrub_fix, &[&digests], &args);
            }
        }
        if pending > 0 {
            self.run(&fixes).await?;
        }
        Ok(())
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
        pipe.cmd("GET").arg(self.built_key());
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
        ctx.require(Permission::Read)?;
        if !self.capabilities().can_search(query) {
            return Err(Error::Unsupported(
                "redis cannot answer this search (see its capabilities)".to_owned(),
            ));
        }
        let Some(rt) = query.resource_type else {
            return Err(Error::Unsupported("redis searches one type".to_owned()));
        };
        let now = now_micros();
        let criteria = query
            .criteria
            .iter()
            .map(|c| alternatives(rt, &c.param, &c.values, now).map(Value::Array))
            .collect::<Result<Vec<_>>>()?;
        let after = match &query.cursor {
            None => String::new(),
            Some(c) => c
                .strip_prefix(CURSOR_PREFIX)
                .filter(|id| LogicalId::new(*id).is_ok())
                .ok_or_else(|| Error::InvalidSearch(format!("not a redis cursor: {c}")))?
                .to_owned(),
        };
        let count_only = query.summary == Some(Summary::Count);
        let page = if count_only { 0 } else { query.page_size() };
        let plan = json!({
            "rt": rt.as_str(),
            "criteria": criteria,
            "after": after,
            // One more than the page, to know whether another page follows.
            "limit": if count_only { 0 } else { page + 1 },
        });
        let base = self.base(ctx.tenant());
        let live = format!("{base}lu:{rt}");
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.built_key());
        Self::evalsha(
            &mut pipe,
            &self.search,
            &[&live],
            &[&base, &plan.to_string()],
        );
        let replies = self.run(&pipe).await?;
        let [marker, RValue::Array(reply)] = replies.as_slice() else {
            return Err(bad_data("search reply"));
        };
        Self::check_built(marker)?;
        let total = match reply.first() {
            Some(RValue::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => return Err(bad_data("search total")),
        };
        let mut matches = Vec::new();
        for row in reply[1..].chunks(4) {
            let fields: Vec<Option<String>> = row.iter().map(text).collect();
            let [Some(id), Some(v), Some(lu), body] = fields.as_slice() else {
                return Err(bad_data("search row"));
            };
            let id = LogicalId::new(id.as_str()).map_err(|_| bad_data("search id"))?;
            matches.push(Self::stored(
                ctx.tenant(),
                rt,
                id,
                v,
                lu,
                false,
                body.clone(),
            )?);
        }
        let next_cursor = if matches.len() > page as usize {
            matches.truncate(page as usize);
            matches
                .last()
                .map(|r| format!("{CURSOR_PREFIX}{}", r.key.id))
        } else {
            None
        };
        Ok(SearchPage {
            matches,
            included: Vec::new(),
            total: (count_only || query.total != TotalMode::None).then_some(total),
            next_cursor,
        })
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
        self.delete_matching(&format!("{}*", self.base(tenant)))
            .await
    }

    async fn mark_built(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.built_key())
            .arg(uuid::Uuid::now_v7().to_string())
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn health(&self) -> Health {
        let mut conn = self.conn.clone();
        match redis::cmd("GET")
            .arg(self.built_key())
            .query_async::<Option<String>>(&mut conn)
            .await
        {
            Ok(Some(_)) => Health::Healthy,
            Ok(None) => Health::NeedsRebuild(
                "no built marker: new, or restarted without its data".to_owned(),
            ),
            Err(e) => Health::Unavailable(e.to_string()),
        }
    }
}

#[async_trait]
impl DigestView for RedisSecondary {
    async fn root_digest(&self, tenant: &TenantId, resource_type: ResourceType) -> Result<Digest> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET")
            .arg(format!("{}g:{resource_type}", self.base(tenant)))
            .arg("r");
        let replies = self.run(&pipe).await?;
        match replies.first().and_then(text) {
            None => Ok(Digest::default()),
            Some(t) => parse_digest(&t),
        }
    }

    async fn segment_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(format!("{}g:{resource_type}", self.base(tenant)));
        let replies = self.run(&pipe).await?;
        let reply = replies
            .first()
            .ok_or_else(|| bad_data("segment digests reply"))?;
        Ok(hash_fields(reply)?
            .into_iter()
            .map(|(segment, digest)| SegmentDigest { segment, digest })
            .collect())
    }

    async fn group_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> Result<Vec<GroupDigest>> {
        let base = self.base(tenant);
        let digests = format!("{base}g:{resource_type}");
        let groups = format!("{base}gg:{resource_type}");
        let (root, found) = self.root_and_groups(&digests, &groups).await?;
        let mut folded = Digest::default();
        found.iter().for_each(|g| folded.merge(g.digest));
        if folded == root {
            return Ok(found);
        }
        // Groups that disagree with the root were written before groups existed, or damaged:
        // rebuild them from the segments, atomically, and read them again.
        tracing::info!(%tenant, %resource_type, "redis group digests disagree with the root; rebuilding them");
        let mut pipe = redis::pipe();
        Self::evalsha(&mut pipe, &self.regroup, &[&digests, &groups], &[]);
        self.run(&pipe).await?;
        Ok(self.root_and_groups(&digests, &groups).await?.1)
    }

    async fn segment_digests_in(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        groups: &[u16],
    ) -> Result<Vec<SegmentDigest>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let fields: Vec<u16> = groups
            .iter()
            .flat_map(|g| fhirstore_core::digest::group_segments(*g))
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(format!("{}g:{resource_type}", self.base(tenant)))
            .arg(&fields);
        let replies = self.run(&pipe).await?;
        let Some(RValue::Array(values)) = replies.first() else {
            return Err(bad_data("segment digests reply"));
        };
        let mut out = Vec::new();
        for (segment, v) in fields.iter().zip(values) {
            if let Some(t) = text(v) {
                out.push(SegmentDigest {
                    segment: *segment,
                    digest: parse_digest(&t)?,
                });
            }
        }
        out.sort_by_key(|s| s.segment);
        Ok(out)
    }

    async fn segment_keys(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
    ) -> Result<Vec<KeyState>> {
        debug_assert!(segments.iter().all(|s| u32::from(*s) < SEGMENTS));
        let base = self.base(tenant);
        let mut pipe = redis::pipe();
        for s in segments {
            pipe.cmd("SMEMBERS")
                .arg(format!("{base}m:{resource_type}:{s}"));
        }
        let mut ids = BTreeSet::new();
        for r in self.run(&pipe).await? {
            let RValue::Array(members) = r else {
                return Err(bad_data("segment members"));
            };
            ids.extend(members.iter().filter_map(text));
        }
        let ids: Vec<String> = ids.into_iter().collect();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(format!("{base}d:{resource_type}:{id}"))
                    .arg(&["v", "e"]);
            }
            for (id, r) in chunk.iter().zip(self.run(&pipe).await?) {
                let RValue::Array(f) = r else {
                    return Err(bad_data("segment key"));
                };
                let f: Vec<Option<String>> = f.iter().map(text).collect();
                let [Some(v), Some(e)] = f.as_slice() else {
                    return Err(bad_data(format!("{resource_type}/{id} without version")));
                };
                let version = parse_version(v, resource_type, id)?;
                let e = parse_words(e)
                    .filter(|(_, rest)| rest.is_empty())
                    .ok_or_else(|| bad_data(format!("hash of {resource_type}/{id}")))?
                    .0;
                let id = LogicalId::new(id.as_str()).map_err(|_| bad_data("segment id"))?;
                out.push(KeyState { id, version, e });
            }
        }
        Ok(out)
    }
}
