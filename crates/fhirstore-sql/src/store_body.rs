// The dialect-independent store, compiled into `sqlite.rs` and `postgres.rs` (see lib.rs).
//
// The including module provides: `Db` (the sqlx database type), `DbConn` (its connection type),
// `DIALECT`, `SELECT_CURRENT_FOR_WRITE` (the current-row query, locking the row where the
// dialect needs it), `lock_criteria` (serialises conditional writes that search the same
// criteria), and `Store { reader, writer, config }`.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use fhirstore_core::bundle::rewrite_references;
use fhirstore_core::digest::{
    element_hash, join_u128, segment, split_u128, Digest, SEGMENTS, TOMBSTONE_CONTENT_HASH,
};
use fhirstore_core::index;
use fhirstore_core::resource::{check_body, prepare_body, IdRule};
use fhirstore_core::search::{ParamType, TotalMode};
use fhirstore_core::{
    from_micros, now_micros, Capabilities, Deleted, Error, HistoryPage, HistoryRequest,
    HistoryScope, LogicalId, OpOutcome, Permission, ResourceKey, ResourceStorage, ResourceType,
    Result, SearchPage, SearchQuery, StoredResource, TenantContext, TenantId, VersionId, WriteKind,
    WriteOp, Written,
};
use serde_json::Value;
use sqlx::{Acquire, QueryBuilder, Row};
use tracing::instrument;

use crate::search;
use crate::{
    corrupt, parse_history_cursor, search_cursor, DigestDeltas, OutboxEntry, SegmentDigest,
    VersionRow,
};

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

fn db_err(e: sqlx::Error) -> Error {
    crate::classify(e, DIALECT)
}

/// What the write path needs to know about a resource's current row.
#[derive(Clone, Copy)]
struct Current {
    version: i64,
    deleted: bool,
    e: u128,
}

/// State shared by the writes of one transaction.
struct WriteScope<'a> {
    tenant: &'a TenantId,
    now: i64,
    max_bytes: usize,
    /// Whether each write applies its own digest change (see `ALWAYS_INLINE_DIGEST`); otherwise
    /// `deltas` collects them for one sorted flush at the end.
    inline_digest: bool,
    /// Whether digests are maintained at all (`SqlConfig::maintain_digests`).
    digests: bool,
    deltas: DigestDeltas,
    /// The tenant's search parameters as of this transaction: what its writes index.
    params: std::sync::Arc<crate::TenantParams>,
}

/// One version written by `put_version`.
struct Put {
    resource: StoredResource,
    kind: WriteKind,
    seq: i64,
}

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
    body: Option<String>,
) -> Result<StoredResource> {
    let content = match (deleted, body) {
        (true, _) => Value::Null,
        (false, Some(text)) => {
            serde_json::from_str(&text).map_err(|e| corrupt(format!("body of {key}: {e}")))?
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

/// A planned statement with its values bound, ready to run.
fn bound(sql: &search::Sql) -> sqlx::query::Query<'_, Db, <Db as sqlx::Database>::Arguments<'_>> {
    let mut q = sqlx::query(sql.text());
    for b in sql.binds() {
        q = match b {
            search::Bind::Text(t) => q.bind(t.as_str()),
            search::Bind::Int(n) => q.bind(*n),
            search::Bind::Real(x) => q.bind(*x),
        };
    }
    q
}

/// A sort key's value, column `i` of a page row.
fn read_key(
    kind: search::KeyKind,
    row: &<Db as sqlx::Database>::Row,
    i: usize,
) -> Result<search::KeyValue> {
    use search::{KeyKind, KeyValue};
    Ok(match kind {
        KeyKind::Text => KeyValue::Text(row.try_get(i).map_err(db_err)?),
        KeyKind::Int => KeyValue::Int(row.try_get(i).map_err(db_err)?),
        KeyKind::Real => KeyValue::Real(row.try_get(i).map_err(db_err)?),
    })
}

fn key_from_row(rt: &str, id: String) -> Result<ResourceKey> {
    Ok(ResourceKey::new(
        ResourceType::new(rt).map_err(|_| corrupt(format!("resource type {rt:?}")))?,
        LogicalId::new(id).map_err(|e| corrupt(e.to_string()))?,
    ))
}

/// Keys of live resources matching `query`, at most `limit`, in key order.
async fn find_keys(
    conn: &mut DbConn,
    tenant: &TenantId,
    query: &SearchQuery,
    limit: usize,
) -> Result<Vec<ResourceKey>> {
    let sql = search::keys(DIALECT, tenant, query, limit, now_micros())?;
    let rows = bound(&sql).fetch_all(&mut *conn).await.map_err(db_err)?;
    rows.into_iter()
        .map(|row| {
            let rt: String = row.try_get(0).map_err(db_err)?;
            key_from_row(&rt, row.try_get(1).map_err(db_err)?)
        })
        .collect()
}

async fn select_current(
    conn: &mut DbConn,
    tenant: &TenantId,
    rt: ResourceType,
    id: &LogicalId,
) -> Result<Option<Current>> {
    // The segment is a function of the key; binding it too means both the primary key and the
    // (tenant, type, segment) index find the row directly, whatever PostgreSQL's statistics say
    // about a tenant (with many tenants it estimates one row each and took the segment index to
    // scan a whole tenant: 47 updates/s).
    let row = sqlx::query(SELECT_CURRENT_FOR_WRITE)
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .bind(id.as_str())
        .bind(i32::from(segment(tenant, rt, id.as_str())))
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    row.map(|r| -> Result<Current> {
        Ok(Current {
            version: r.try_get(0).map_err(db_err)?,
            deleted: r.try_get(1).map_err(db_err)?,
            e: join_u128(r.try_get(2).map_err(db_err)?, r.try_get(3).map_err(db_err)?),
        })
    })
    .transpose()
}

/// Writes one new version of `rt/id` (a tombstone when `body` is `None`) and everything that
/// goes with it. Returns `None` for a delete of something not live, which writes nothing.
///
/// `known_new` skips the current-row lookup for server-assigned ids.
async fn put_version(
    conn: &mut DbConn,
    w: &mut WriteScope<'_>,
    rt: ResourceType,
    id: &LogicalId,
    mut body: Option<Value>,
    if_match: Option<VersionId>,
    known_new: bool,
) -> Result<Option<Put>> {
    let tenant = w.tenant;
    let mut current = if known_new {
        None
    } else {
        select_current(conn, tenant, rt, id).await?
    };
    let seg = segment(tenant, rt, id.as_str());
    loop {
        if body.is_none() && current.is_none_or(|c| c.deleted) {
            return Ok(None);
        }
        if let Some(expected) = if_match {
            let have = current.map_or(0, |c| c.version);
            if have != as_i64(expected) {
                return Err(Error::VersionConflict {
                    key: format!("{rt}/{id}"),
                    expected: expected.get(),
                    current: u64::try_from(have).unwrap_or(0),
                });
            }
        }
        let version = match current {
            Some(c) => version_of(c.version)?.next(),
            None => VersionId::FIRST,
        };
        let prepared = match body.take() {
            Some(b) => Some(prepare_body(
                b,
                id,
                version,
                from_micros(w.now),
                w.max_bytes,
            )?),
            None => None,
        };
        let hash = prepared.as_ref().map_or(TOMBSTONE_CONTENT_HASH, |p| p.hash);
        let e = element_hash(tenant, rt, id.as_str(), version, &hash);
        let (e_hi, e_lo) = split_u128(e);
        let deleted = prepared.is_none();
        let was_live = current.is_some_and(|c| !c.deleted);
        let (content, body_text) = match prepared {
            Some(p) => {
                let text = String::from_utf8(p.canonical)
                    .map_err(|e| corrupt(format!("canonical JSON is not UTF-8: {e}")))?;
                (p.content, Some(text))
            }
            None => (Value::Null, None),
        };
        let entries = if deleted {
            index::IndexEntries::default()
        } else {
            index::extract_in(&w.params.index, &content)
        };
        let old_e = current.map_or(0, |c| c.e);
        let delta = (old_e ^ e, i64::from(current.is_none()));
        let row = VersionRow {
            tenant: tenant.as_str(),
            resource_type: rt.as_str(),
            id: id.as_str(),
            version: as_i64(version),
            now: w.now,
            deleted,
            segment: i32::from(seg),
            e_hi,
            e_lo,
            op: match (deleted, was_live) {
                (true, _) => "delete",
                (false, true) => "update",
                (false, false) => "create",
            },
            body: body_text,
            index: &entries,
            is_new: current.is_none(),
            was_live,
            inline_digest: w.inline_digest,
            digest_delta: split_u128(delta.0),
            digest_count: delta.1,
        };
        let Some(seq) = write_version(conn, &row).await? else {
            // A concurrent writer created it first: redo as an update of its version.
            if known_new {
                return Err(Error::AlreadyExists(format!("{rt}/{id}")));
            }
            body = (!deleted).then_some(content);
            current = select_current(conn, tenant, rt, id).await?;
            continue;
        };

        if w.digests && !w.inline_digest {
            w.deltas.apply(rt, seg, delta.0, delta.1);
        }
        if rt.as_str() == "SearchParameter" {
            sync_search_parameter(conn, w, id, (!deleted).then_some(&content)).await?;
        }
        let resource = StoredResource {
            tenant: tenant.clone(),
            key: ResourceKey::new(rt, id.clone()),
            version,
            last_updated: from_micros(w.now),
            deleted,
            content,
        };
        let kind = if was_live {
            WriteKind::Updated
        } else {
            WriteKind::Created
        };
        return Ok(Some(Put {
            resource,
            kind,
            seq,
        }));
    }
}

/// Applies a transaction's digest deltas in (type, segment) order.
async fn flush_digests(conn: &mut DbConn, tenant: &TenantId, deltas: &DigestDeltas) -> Result<()> {
    let rows = deltas.rows();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut qb = QueryBuilder::<Db>::new(
            "INSERT INTO digests (tenant, resource_type, segment, h_hi, h_lo, count) ",
        );
        qb.push_values(chunk, |mut b, (rt, seg, hi, lo, count)| {
            b.push_bind(tenant.as_str())
                .push_bind(*rt)
                .push_bind(*seg)
                .push_bind(*hi)
                .push_bind(*lo)
                .push_bind(*count);
        });
        // XOR spelled portably: (a | b) - (a & b). The exact result always fits in 64 bits,
        // so neither dialect overflows.
        qb.push(
            " ON CONFLICT (tenant, resource_type, segment) DO UPDATE SET \
             h_hi = (digests.h_hi | excluded.h_hi) - (digests.h_hi & excluded.h_hi), \
             h_lo = (digests.h_lo | excluded.h_lo) - (digests.h_lo & excluded.h_lo), \
             count = digests.count + excluded.count",
        );
        qb.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

fn required_permission(op: &WriteOp) -> Permission {
    match op {
        WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => Permission::Delete,
        _ => Permission::Write,
    }
}

/// Checks that can fail before the database is touched: permissions, bodies, and (for
/// multi-entry transactions) that no resource is named twice.
fn precheck(
    ctx: &TenantContext,
    ops: &[WriteOp],
    atomic: bool,
    validation: fhirstore_core::validate::Validation,
) -> Result<()> {
    let schema = match validation {
        fhirstore_core::validate::Validation::Strict => {
            Some(fhirstore_core::validate::SchemaValidator::r4()?)
        }
        fhirstore_core::validate::Validation::Off => None,
    };
    let mut seen = HashSet::new();
    for (i, op) in ops.iter().enumerate() {
        let at = |e: Error| if ops.len() > 1 { e.in_entry(i) } else { e };
        ctx.require(required_permission(op)).map_err(at)?;
        let checked = match op {
            WriteOp::Create {
                resource_type,
                resource,
                ..
            } => check_body(*resource_type, resource, IdRule::Ignore),
            WriteOp::Update {
                resource_type,
                id,
                resource,
                ..
            } => check_body(*resource_type, resource, IdRule::MustEqual(id)),
            WriteOp::ConditionalUpdate {
                resource_type,
                resource,
                ..
            } => check_body(*resource_type, resource, IdRule::Optional),
            WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => Ok(()),
        };
        checked.map_err(at)?;
        if let (Some(schema), Some(body)) = (schema, op_body(op)) {
            schema.validate(body).map_err(at)?;
        }
        if atomic {
            if let WriteOp::Update {
                resource_type, id, ..
            }
            | WriteOp::Delete {
                resource_type, id, ..
            } = op
            {
                if !seen.insert((*resource_type, id.clone())) {
                    return Err(at(Error::InvalidResource(format!(
                        "{resource_type}/{id} appears more than once in the transaction"
                    ))));
                }
            }
        }
    }
    Ok(())
}

fn op_body(op: &WriteOp) -> Option<&Value> {
    match op {
        WriteOp::Create { resource, .. }
        | WriteOp::Update { resource, .. }
        | WriteOp::ConditionalUpdate { resource, .. } => Some(resource),
        WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => None,
    }
}

fn body_id(resource: &Value) -> Result<Option<LogicalId>> {
    resource
        .get("id")
        .and_then(Value::as_str)
        .map(LogicalId::new)
        .transpose()
}

/// Runs `ops` inside the caller's transaction. The caller commits.
async fn apply_ops(
    conn: &mut DbConn,
    ctx: &TenantContext,
    ops: &[WriteOp],
    max_bytes: usize,
    digests: bool,
    params: std::sync::Arc<crate::TenantParams>,
) -> Result<Vec<OpOutcome>> {
    let tenant = ctx.tenant();
    // One digest row alone cannot take part in a lock cycle: transactions writing several
    // versions lock their digest rows last, in sorted order.
    let single_write = matches!(
        ops,
        [WriteOp::Create { .. }
            | WriteOp::Update { .. }
            | WriteOp::ConditionalUpdate { .. }
            | WriteOp::Delete { .. }]
    );
    let mut w = WriteScope {
        tenant,
        now: now_micros(),
        max_bytes,
        inline_digest: digests && (ALWAYS_INLINE_DIGEST || single_write),
        digests,
        deltas: DigestDeltas::default(),
        params,
    };
    let at = |i: usize| move |e: Error| if ops.len() > 1 { e.in_entry(i) } else { e };

    // Creates first get their ids, so `urn:uuid:` references anywhere in the transaction can be
    // resolved before any body is written. A conditional create that matches resolves to the
    // match.
    let mut create_ids: HashMap<usize, (LogicalId, Option<StoredResource>)> = HashMap::new();
    let mut urls: HashMap<String, String> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let WriteOp::Create {
            resource_type,
            if_none_exist,
            full_url,
            ..
        } = op
        {
            let resolved = match if_none_exist {
                None => (LogicalId::generate(), None),
                Some(criteria) => {
                    let q = scoped(criteria, *resource_type);
                    lock_criteria(conn, tenant, &q).await.map_err(at(i))?;
                    let found = find_keys(conn, tenant, &q, 2).await.map_err(at(i))?;
                    match found.as_slice() {
                        [] => (LogicalId::generate(), None),
                        [key] => {
                            let existing = read_current(conn, tenant, key.resource_type, &key.id)
                                .await
                                .map_err(at(i))?;
                            (key.id.clone(), Some(existing))
                        }
                        _ => {
                            return Err(at(i)(Error::PreconditionFailed(format!(
                                "If-None-Exist criteria match more than one {resource_type}"
                            ))))
                        }
                    }
                }
            };
            if let Some(url) = full_url {
                urls.insert(url.clone(), format!("{resource_type}/{}", resolved.0));
            }
            create_ids.insert(i, resolved);
        }
    }

    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|i| ops[*i].processing_rank());
    let mut outcomes: Vec<Option<OpOutcome>> = vec![None; ops.len()];
    let search_params = w.params.search.clone();
    let body = |resource: &Value| {
        let mut b = resource.clone();
        rewrite_references(&mut b, &urls);
        b
    };
    for i in order {
        // Conditional references resolve when their entry is written, so what entries before
        // it wrote in this transaction can match.
        let source = match &ops[i] {
            WriteOp::Create { resource, .. }
                if create_ids
                    .get(&i)
                    .is_some_and(|(_, existing)| existing.is_none()) =>
            {
                Some(resource)
            }
            WriteOp::Update { resource, .. } | WriteOp::ConditionalUpdate { resource, .. } => {
                Some(resource)
            }
            _ => None,
        };
        let mut pre = match source {
            Some(resource) => Some(
                resolved_body(conn, tenant, &search_params, body(resource))
                    .await
                    .map_err(at(i))?,
            ),
            None => None,
        };
        let outcome = match &ops[i] {
            WriteOp::Create {
                resource_type,
                resource,
                ..
            } => {
                let Some((id, existing)) = create_ids.remove(&i) else {
                    return Err(corrupt("create without an assigned id"));
                };
                match existing {
                    Some(resource) => OpOutcome::Written(Written {
                        kind: WriteKind::Unchanged,
                        resource,
                        seq: None,
                    }),
                    None => put_written(
                        conn,
                        &mut w,
                        *resource_type,
                        &id,
                        pre.take().unwrap_or_else(|| body(resource)),
                        None,
                        true,
                    )
                    .await
                    .map_err(at(i))?,
                }
            }
            WriteOp::Update {
                resource_type,
                id,
                resource,
                if_match,
            } => put_written(
                conn,
                &mut w,
                *resource_type,
                id,
                pre.take().unwrap_or_else(|| body(resource)),
                *if_match,
                false,
            )
            .await
            .map_err(at(i))?,
            WriteOp::ConditionalUpdate {
                resource_type,
                criteria,
                resource,
            } => {
                let q = scoped(criteria, *resource_type);
                lock_criteria(conn, tenant, &q).await.map_err(at(i))?;
                let found = find_keys(conn, tenant, &q, 2).await.map_err(at(i))?;
                let claimed = body_id(resource).map_err(at(i))?;
                let (id, known_new) = match (found.as_slice(), claimed) {
                    ([], Some(id)) => (id, false),
                    ([], None) => (LogicalId::generate(), true),
                    ([key], Some(id)) if id != key.id => {
                        return Err(at(i)(Error::InvalidResource(format!(
                            "the body's id {id} differs from the matched resource {key}"
                        ))))
                    }
                    ([key], _) => (key.id.clone(), false),
                    _ => {
                        return Err(at(i)(Error::PreconditionFailed(format!(
                            "conditional update criteria match more than one {resource_type}"
                        ))))
                    }
                };
                put_written(
                    conn,
                    &mut w,
                    *resource_type,
                    &id,
                    pre.take().unwrap_or_else(|| body(resource)),
                    None,
                    known_new,
                )
                .await
                .map_err(at(i))?
            }
            WriteOp::Delete { resource_type, id } => {
                let put = put_version(conn, &mut w, *resource_type, id, None, None, false)
                    .await
                    .map_err(at(i))?;
                OpOutcome::Deleted(deleted(put.into_iter().collect()))
            }
            WriteOp::ConditionalDelete {
                resource_type,
                criteria,
            } => {
                let q = scoped(criteria, *resource_type);
                let found = find_keys(conn, tenant, &q, MAX_CONDITIONAL_DELETE + 1)
                    .await
                    .map_err(at(i))?;
                if found.len() > MAX_CONDITIONAL_DELETE {
                    return Err(at(i)(Error::PreconditionFailed(format!(
                        "conditional delete matches more than {MAX_CONDITIONAL_DELETE} resources"
                    ))));
                }
                let mut puts = Vec::with_capacity(found.len());
                for key in found {
                    let put =
                        put_version(conn, &mut w, key.resource_type, &key.id, None, None, false)
                            .await
                            .map_err(at(i))?;
                    puts.extend(put);
                }
                OpOutcome::Deleted(deleted(puts))
            }
        };
        outcomes[i] = Some(outcome);
    }
    if w.digests && !w.inline_digest {
        flush_digests(conn, tenant, &w.deltas).await?;
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| corrupt("a transaction entry produced no outcome")))
        .collect()
}

/// A create or update: writes the version and wraps it as the op's outcome.
/// `body` with its conditional references (`Patient?identifier=urn:mrn|42`, R4 3.1.0.11.2)
/// replaced by the one resource each matches, searched inside the write's own transaction, so
/// a match written earlier in it counts. None or several matches fail the write with 412.
async fn resolved_body(
    conn: &mut DbConn,
    tenant: &TenantId,
    reg: &fhirstore_core::registry::Registry,
    mut body: Value,
) -> Result<Value> {
    let mut found: Vec<String> = Vec::new();
    collect_conditional_references(&body, &mut found);
    if found.is_empty() {
        return Ok(body);
    }
    let mut resolved = HashMap::new();
    for reference in found {
        if resolved.contains_key(&reference) {
            continue;
        }
        let Some((t, criteria)) = reference.split_once('?') else {
            continue;
        };
        let rt = ResourceType::new(t)?;
        let q = SearchQuery::parse_in(
            reg,
            Some(rt),
            criteria,
            fhirstore_core::search::Handling::Strict,
        )?;
        if q.criteria.is_empty() {
            return Err(Error::InvalidResource(format!(
                "conditional reference {reference:?} has no criteria"
            )));
        }
        let keys = find_keys(conn, tenant, &q, 2).await?;
        let target = match keys.as_slice() {
            [key] => format!("{}/{}", key.resource_type, key.id),
            [] => {
                return Err(Error::PreconditionFailed(format!(
                    "conditional reference {reference:?} matches no resource"
                )))
            }
            _ => {
                return Err(Error::PreconditionFailed(format!(
                    "conditional reference {reference:?} matches more than one resource"
                )))
            }
        };
        resolved.insert(reference, target);
    }
    rewrite_references(&mut body, &resolved);
    Ok(body)
}

/// Every `reference` of `v` of the form `Type?criteria`.
fn collect_conditional_references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match v {
                    Value::String(s) if k == "reference" => {
                        let conditional = s
                            .split_once('?')
                            .is_some_and(|(t, _)| ResourceType::new(t).is_ok());
                        if conditional {
                            out.push(s.clone());
                        }
                    }
                    other => collect_conditional_references(other, out),
                }
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|i| collect_conditional_references(i, out)),
        _ => {}
    }
}

async fn put_written(
    conn: &mut DbConn,
    w: &mut WriteScope<'_>,
    rt: ResourceType,
    id: &LogicalId,
    body: Value,
    if_match: Option<VersionId>,
    known_new: bool,
) -> Result<OpOutcome> {
    let put = put_version(conn, w, rt, id, Some(body), if_match, known_new).await?;
    written(put, rt, id)
}

/// A conditional op's criteria, restricted to the op's type whatever the caller set.
fn scoped(criteria: &SearchQuery, rt: ResourceType) -> SearchQuery {
    let mut q = criteria.clone();
    q.resource_type = Some(rt);
    q
}

fn written(put: Option<Put>, rt: ResourceType, id: &LogicalId) -> Result<OpOutcome> {
    let put = put.ok_or_else(|| corrupt(format!("write of {rt}/{id} wrote nothing")))?;
    Ok(OpOutcome::Written(Written {
        kind: put.kind,
        resource: put.resource,
        seq: Some(put.seq),
    }))
}

fn deleted(puts: Vec<Put>) -> Deleted {
    Deleted {
        seq: puts.iter().map(|p| p.seq).max(),
        deleted: puts
            .into_iter()
            .map(|p| (p.resource.key, p.resource.version))
            .collect(),
    }
}

async fn read_current(
    conn: &mut DbConn,
    tenant: &TenantId,
    rt: ResourceType,
    id: &LogicalId,
) -> Result<StoredResource> {
    let row = sqlx::query(
        "SELECT version, last_updated, deleted, body FROM resource_versions \
         WHERE tenant = $1 AND resource_type = $2 AND id = $3 ORDER BY version DESC LIMIT 1",
    )
    .bind(tenant.as_str())
    .bind(rt.as_str())
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?
    .ok_or_else(|| Error::NotFound(format!("{rt}/{id}")))?;
    let r = stored(
        tenant,
        ResourceKey::new(rt, id.clone()),
        row.try_get(0).map_err(db_err)?,
        row.try_get(1).map_err(db_err)?,
        row.try_get(2).map_err(db_err)?,
        row.try_get(3).map_err(db_err)?,
    )?;
    if r.deleted {
        return Err(Error::Gone(format!(
            "{rt}/{id} was deleted in version {}",
            r.version
        )));
    }
    Ok(r)
}

/// Keys of resources linked to `from` by one include (forward) or revinclude (reverse).
async fn linked_keys(
    conn: &mut DbConn,
    tenant: &TenantId,
    from: &[ResourceKey],
    inc: &fhirstore_core::search::Include,
    reverse: bool,
) -> Result<Vec<ResourceKey>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    // One statement per type among `from`, each with its ids in an IN list.
    let mut by_type: std::collections::BTreeMap<ResourceType, Vec<&str>> = Default::default();
    for k in from {
        by_type
            .entry(k.resource_type)
            .or_default()
            .push(k.id.as_str());
    }
    for (rt, ids) in by_type {
        let Some(sql) = search::linked(DIALECT, tenant, rt, &ids, inc, reverse) else {
            continue;
        };
        for row in bound(&sql).fetch_all(&mut *conn).await.map_err(db_err)? {
            let t: String = row.try_get(0).map_err(db_err)?;
            let id: String = row.try_get(1).map_err(db_err)?;
            // A reference to a type or id that is not valid cannot name a stored resource.
            if let (Ok(t), Ok(id)) = (ResourceType::new(&t), LogicalId::new(id)) {
                let key = ResourceKey::new(t, id);
                if seen.insert(key.clone()) {
                    out.push(key);
                }
            }
        }
    }
    Ok(out)
}

/// The live current versions of `keys`, in key order.
async fn fetch_current(
    conn: &mut DbConn,
    tenant: &TenantId,
    keys: &[ResourceKey],
) -> Result<Vec<StoredResource>> {
    let mut by_type: std::collections::BTreeMap<ResourceType, Vec<&str>> = Default::default();
    for k in keys {
        by_type
            .entry(k.resource_type)
            .or_default()
            .push(k.id.as_str());
    }
    let mut out = Vec::with_capacity(keys.len());
    for (rt, ids) in by_type {
        let sql = search::current(DIALECT, tenant, rt, &ids);
        for row in bound(&sql).fetch_all(&mut *conn).await.map_err(db_err)? {
            let key = key_from_row(rt.as_str(), row.try_get(0).map_err(db_err)?)?;
            out.push(stored(
                tenant,
                key,
                row.try_get(1).map_err(db_err)?,
                row.try_get(2).map_err(db_err)?,
                false,
                row.try_get(3).map_err(db_err)?,
            )?);
        }
    }
    Ok(out)
}

/// Resolves `_include` and `_revinclude` for a page of matches: each round follows the links
/// from the previous round's resources (the matches first; later rounds only for `:iterate`).
async fn resolve_includes(
    conn: &mut DbConn,
    tenant: &TenantId,
    query: &SearchQuery,
    matches: &[StoredResource],
) -> Result<Vec<StoredResource>> {
    if query.includes.is_empty() && query.revincludes.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<ResourceKey> = matches.iter().map(|m| m.key.clone()).collect();
    let mut frontier: Vec<ResourceKey> = matches.iter().map(|m| m.key.clone()).collect();
    let mut included = Vec::new();
    for round in 0..MAX_INCLUDE_ROUNDS {
        let mut found = Vec::new();
        let specs = query
            .includes
            .iter()
            .map(|i| (i, false))
            .chain(query.revincludes.iter().map(|i| (i, true)));
        for (inc, reverse) in specs {
            if round == 0 || inc.iterate {
                found.extend(linked_keys(conn, tenant, &frontier, inc, reverse).await?);
            }
        }
        found.retain(|k| seen.insert(k.clone()));
        if found.is_empty() {
            break;
        }
        found.truncate(MAX_INCLUDED.saturating_sub(included.len()));
        let resources = fetch_current(conn, tenant, &found).await?;
        frontier = resources.iter().map(|r| r.key.clone()).collect();
        included.extend(resources);
        if included.len() >= MAX_INCLUDED {
            break;
        }
    }
    Ok(included)
}

impl Store {
    fn span_tenant(ctx: &TenantContext) -> &str {
        ctx.tenant().as_str()
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Db>> {
        let begin = || async {
            match BEGIN_WRITE {
                Some(sql) => self.writer.begin_with(sql).await,
                None => self.writer.begin().await,
            }
        };
        match begin().await {
            Err(sqlx::Error::InvalidSavePointStatement) => {
                self.drop_stuck_writers().await?;
                begin().await.map_err(db_err)
            }
            other => other.map_err(db_err),
        }
    }

    /// Closes every idle writer connection that sqlx still counts as inside a transaction.
    /// SQLite rolls a transaction back by itself on some errors (a full disk); sqlx's
    /// `ROLLBACK` then fails and it keeps counting the transaction open, so every later
    /// `BEGIN` on that connection would fail. The pool opens a fresh connection instead.
    async fn drop_stuck_writers(&self) -> Result<()> {
        use sqlx::Connection as _;
        let mut held = Vec::new();
        for _ in 0..=self.writer.size() {
            let Ok(Ok(mut conn)) =
                tokio::time::timeout(std::time::Duration::from_millis(100), self.writer.acquire())
                    .await
            else {
                break;
            };
            if conn.is_in_transaction() {
                tracing::warn!("closing a writer connection left inside a failed transaction");
                conn.close_on_drop();
            } else {
                held.push(conn);
            }
        }
        Ok(())
    }

    /// Runs `ops` in one transaction, retrying the whole transaction on temporary failures
    /// (deadlocks, serialization failures, a busy database).
    async fn run_atomic(&self, ctx: &TenantContext, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>> {
        let (store, ctx) = (self.clone(), ctx.clone());
        crate::detached(async move { store.run_atomic_here(&ctx, &ops).await }).await
    }

    async fn run_atomic_here(
        &self,
        ctx: &TenantContext,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>> {
        // What each attempt borrows travels in the state, so its future may hold it.
        let mut state = (self, ctx, ops);
        let outcome = crate::retrying(self.config.max_retries, "transaction", &mut state, |s| {
            let (store, ctx, ops) = *s;
            Box::pin(async move {
                let store = store;
                let mut tx = store.begin_write().await?;
                let params = tenant_params(&mut tx, &store.params, ctx.tenant()).await?;
                let out = apply_ops(
                    &mut tx,
                    ctx,
                    ops,
                    store.config.max_resource_bytes,
                    store.config.maintain_digests,
                    params,
                )
                .await?;
                tx.commit().await.map_err(db_err)?;
                store.note_writes(out.len() as u64);
                Ok(out)
            })
        })
        .await;
        // Still temporary after every retry: the caller should not retry at once either.
        outcome.map_err(|e| {
            if e.is_temporary() {
                e.set_persistent()
            } else {
                e
            }
        })
    }

    /// Runs each op in its own savepoint within one transaction, so a batch shares one commit
    /// while its entries succeed or fail alone.
    async fn run_batch(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<OpOutcome>>> {
        let (store, ctx) = (self.clone(), ctx.clone());
        crate::detached(async move { store.run_batch_here(&ctx, &ops).await }).await
    }

    async fn run_batch_here(
        &self,
        ctx: &TenantContext,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<OpOutcome>>> {
        let mut tx = self.begin_write().await?;
        let params = tenant_params(&mut tx, &self.params, ctx.tenant()).await?;
        let mut results = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            // A failed savepoint (its begin, commit or rollback) fails the whole batch: the
            // transaction around it is no longer usable. The error an attempt returns for it
            // only stops the retries; `fatal` is what the batch fails with.
            let mut fatal = None;
            let mut state = (
                &mut tx,
                &mut fatal,
                self,
                ctx,
                std::slice::from_ref(op),
                &params,
            );
            let result = crate::retrying(self.config.max_retries, "batch entry", &mut state, |s| {
                let (tx, fatal, store, ctx, single, params) = s;
                let (store, ctx, single) = (*store, *ctx, *single);
                Box::pin(async move {
                    precheck(ctx, single, false, store.config.validation)?;
                    let stop = || corrupt("savepoint failed");
                    let mut sp = match tx.begin().await {
                        Ok(sp) => sp,
                        Err(e) => {
                            **fatal = Some(db_err(e));
                            return Err(stop());
                        }
                    };
                    let applied = apply_ops(
                        &mut sp,
                        ctx,
                        single,
                        store.config.max_resource_bytes,
                        store.config.maintain_digests,
                        (*params).clone(),
                    )
                    .await;
                    let ended = match &applied {
                        Ok(_) => sp.commit().await,
                        Err(_) => sp.rollback().await,
                    };
                    if let Err(e) = ended {
                        **fatal = Some(db_err(e));
                        return Err(stop());
                    }
                    applied?
                        .pop()
                        .ok_or_else(|| corrupt("batch entry without outcome"))
                })
            })
            .await;
            if let Some(e) = fatal {
                return Err(e);
            }
            results.push(result.map_err(|e| e.in_entry(i)));
        }
        tx.commit().await.map_err(db_err)?;
        self.note_writes(results.iter().filter(|r| r.is_ok()).count() as u64);
        Ok(results)
    }

    /// The number of live resources matching `query`'s criteria.
    /// Counts committed versions and refreshes the planner's statistics in the background when
    /// they are due (see `StatsUpkeep`), with the dialect's `analyze_sql`.
    fn note_writes(&self, n: u64) {
        if !self.stats.due(n) {
            return;
        }
        let pool = self.writer.clone();
        tokio::spawn(async move {
            if let Err(e) = sqlx::query(&analyze_sql()).execute(&pool).await {
                tracing::warn!(error = %e, "ANALYZE failed; plans may be slower until it succeeds");
            }
        });
    }

    /// The planner's estimate of the number of matches, where the dialect has one.
    async fn estimate_matches(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        now: i64,
    ) -> Result<Option<u64>> {
        let Some(explain) = ESTIMATE_PREFIX else {
            return Ok(None);
        };
        let sql = search::estimate(DIALECT, explain, tenant, query, now)?;
        let row = bound(&sql).fetch_one(&self.reader).await.map_err(db_err)?;
        Ok(plan_rows(&row))
    }

    async fn count_matches(&self, tenant: &TenantId, query: &SearchQuery, now: i64) -> Result<u64> {
        let sql = search::count(DIALECT, tenant, query, now)?;
        let n: i64 = bound(&sql)
            .persistent(PERSISTENT_SEARCH_PLANS)
            .fetch_one(&self.reader)
            .await
            .map_err(db_err)?
            .try_get(0)
            .map_err(db_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Outbox entries after `after_seq`, by `seq`, for inspecting the outbox. Consumers read
    /// through `ChangeLog::changes_after` instead: on PostgreSQL, `seq` order can skip a slow
    /// transaction's entry (see `fhirstore_core::changelog`).
    pub async fn outbox_after(&self, after_seq: i64, limit: u32) -> Result<Vec<OutboxEntry>> {
        let rows = sqlx::query(
            "SELECT seq, tenant, resource_type, id, version, op FROM outbox \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        rows.into_iter()
            .map(|r| {
                Ok(OutboxEntry {
                    seq: r.try_get(0).map_err(db_err)?,
                    tenant: r.try_get(1).map_err(db_err)?,
                    resource_type: r.try_get(2).map_err(db_err)?,
                    id: r.try_get(3).map_err(db_err)?,
                    version: r.try_get(4).map_err(db_err)?,
                    op: r.try_get(5).map_err(db_err)?,
                })
            })
            .collect()
    }

    /// The stored digest segments of one (tenant, type), non-empty ones only, by segment.
    pub async fn digest_segments(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        ctx.require(Permission::Read)?;
        let rows = sqlx::query(
            "SELECT segment, h_hi, h_lo, count FROM digests \
             WHERE tenant = $1 AND resource_type = $2 AND count <> 0 ORDER BY segment",
        )
        .bind(ctx.tenant().as_str())
        .bind(rt.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        rows.into_iter().map(segment_row).collect()
    }

    /// The digest segments of one (tenant, type) recomputed from the current rows' element
    /// hashes, for checking the maintained digest table.
    pub async fn recompute_digest_segments(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        ctx.require(Permission::Read)?;
        let rows = sqlx::query(
            "SELECT segment, e_hi, e_lo FROM resources WHERE tenant = $1 AND resource_type = $2",
        )
        .bind(ctx.tenant().as_str())
        .bind(rt.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        let mut segs: std::collections::BTreeMap<u16, Digest> = Default::default();
        for r in rows {
            let seg: i32 = r.try_get(0).map_err(db_err)?;
            let seg = u16::try_from(seg).map_err(|_| corrupt(format!("segment {seg}")))?;
            let e = join_u128(r.try_get(1).map_err(db_err)?, r.try_get(2).map_err(db_err)?);
            segs.entry(seg).or_default().add(e);
        }
        debug_assert!(segs.len() <= SEGMENTS as usize);
        Ok(segs
            .into_iter()
            .map(|(segment, digest)| SegmentDigest { segment, digest })
            .collect())
    }
}

fn segment_row(r: <Db as sqlx::Database>::Row) -> Result<SegmentDigest> {
    let seg: i32 = r.try_get(0).map_err(db_err)?;
    Ok(SegmentDigest {
        segment: u16::try_from(seg).map_err(|_| corrupt(format!("segment {seg}")))?,
        digest: Digest {
            hash: join_u128(r.try_get(1).map_err(db_err)?, r.try_get(2).map_err(db_err)?),
            count: r.try_get(3).map_err(db_err)?,
        },
    })
}

#[async_trait]
impl ResourceStorage for Store {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.name = BACKEND_NAME;
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
        caps.sort_any = true;
        caps.sort_params = NATIVE_PARAMS.to_vec();
        caps
    }

    #[instrument(name = "storage.sql.transaction", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx), entries = ops.len()))]
    async fn transaction(&self, ctx: &TenantContext, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>> {
        precheck(ctx, &ops, true, self.config.validation)?;
        self.run_atomic(ctx, ops).await
    }

    #[instrument(name = "storage.sql.batch", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx), entries = ops.len()))]
    async fn batch(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<OpOutcome>>> {
        self.run_batch(ctx, ops).await
    }

    #[instrument(name = "storage.sql.read", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx), resource_type = %rt))]
    async fn read(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
        id: &LogicalId,
    ) -> Result<StoredResource> {
        ctx.require(Permission::Read)?;
        let mut conn = self.reader.acquire().await.map_err(db_err)?;
        read_current(&mut conn, ctx.tenant(), rt, id).await
    }

    #[instrument(name = "storage.sql.vread", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx), resource_type = %rt))]
    async fn vread(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
        id: &LogicalId,
        version: VersionId,
    ) -> Result<StoredResource> {
        ctx.require(Permission::Read)?;
        let row = sqlx::query(
            "SELECT last_updated, deleted, body FROM resource_versions \
             WHERE tenant = $1 AND resource_type = $2 AND id = $3 AND version = $4",
        )
        .bind(ctx.tenant().as_str())
        .bind(rt.as_str())
        .bind(id.as_str())
        .bind(as_i64(version))
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err)?
        .ok_or_else(|| Error::NotFound(format!("{rt}/{id}/_history/{version}")))?;
        stored(
            ctx.tenant(),
            ResourceKey::new(rt, id.clone()),
            as_i64(version),
            row.try_get(0).map_err(db_err)?,
            row.try_get(1).map_err(db_err)?,
            row.try_get(2).map_err(db_err)?,
        )
    }

    #[instrument(name = "storage.sql.history", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx)))]
    async fn history(&self, ctx: &TenantContext, request: &HistoryRequest) -> Result<HistoryPage> {
        ctx.require(Permission::Read)?;
        let tenant = ctx.tenant();
        let page = request
            .count
            .unwrap_or(fhirstore_core::search::DEFAULT_PAGE_SIZE)
            .min(fhirstore_core::search::MAX_PAGE_SIZE);
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT resource_type, id, version, seq, last_updated, deleted, body \
             FROM resource_versions WHERE tenant = ",
        );
        qb.push_bind(tenant.as_str().to_owned());
        match &request.scope {
            HistoryScope::System => {}
            HistoryScope::Type(rt) => {
                qb.push(" AND resource_type = ");
                qb.push_bind(rt.as_str());
            }
            HistoryScope::Instance(rt, id) => {
                qb.push(" AND resource_type = ");
                qb.push_bind(rt.as_str());
                qb.push(" AND id = ");
                qb.push_bind(id.as_str().to_owned());
            }
        }
        if let Some(since) = request.since {
            qb.push(" AND last_updated >= ");
            qb.push_bind(fhirstore_core::to_micros(since));
        }
        if let Some(c) = &request.cursor {
            qb.push(" AND seq < ");
            qb.push_bind(parse_history_cursor(c)?);
        }
        qb.push(" ORDER BY seq DESC LIMIT ");
        qb.push_bind(i64::from(page) + 1);
        let rows = qb.build().fetch_all(&self.reader).await.map_err(db_err)?;
        let more = rows.len() > page as usize;
        let mut entries = Vec::with_capacity(rows.len().min(page as usize));
        let mut last_seq = 0i64;
        for row in rows.into_iter().take(page as usize) {
            let rt: String = row.try_get(0).map_err(db_err)?;
            let key = key_from_row(&rt, row.try_get(1).map_err(db_err)?)?;
            last_seq = row.try_get(3).map_err(db_err)?;
            entries.push(stored(
                tenant,
                key,
                row.try_get(2).map_err(db_err)?,
                row.try_get(4).map_err(db_err)?,
                row.try_get(5).map_err(db_err)?,
                row.try_get(6).map_err(db_err)?,
            )?);
        }
        Ok(HistoryPage {
            entries,
            next_cursor: more.then(|| last_seq.to_string()),
        })
    }

    #[instrument(name = "storage.sql.count", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx)))]
    async fn count(&self, ctx: &TenantContext, rt: Option<ResourceType>) -> Result<u64> {
        ctx.require(Permission::Read)?;
        self.count_matches(ctx.tenant(), &SearchQuery::all(rt), now_micros())
            .await
    }

    #[instrument(name = "storage.sql.search", skip_all,
        fields(backend = BACKEND_NAME, tenant = %Self::span_tenant(ctx),
               resource_type = ?query.resource_type.map(|t| t.as_str())))]
    async fn search(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<SearchPage> {
        ctx.require(Permission::Read)?;
        let tenant = ctx.tenant();
        let now = now_micros();
        let page = query.page_size();
        if query.summary == Some(fhirstore_core::search::Summary::Count) {
            return Ok(SearchPage {
                matches: Vec::new(),
                included: Vec::new(),
                total: Some(self.count_matches(tenant, query, now).await?),
                next_cursor: None,
            });
        }
        if query.sort.iter().any(|k| k.param == "_score") {
            return Err(Error::Unsupported(
                "_sort=_score needs a full-text criterion, which the SQL primary does not answer"
                    .to_owned(),
            ));
        }
        let search::PagePlan { sql, keys } = search::page(DIALECT, tenant, query, now)?;
        let rows = bound(&sql)
            .persistent(PERSISTENT_SEARCH_PLANS)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?;
        let more = rows.len() > page as usize;
        let mut matches = Vec::with_capacity(rows.len().min(page as usize));
        let mut last_keys = Vec::new();
        for row in rows.into_iter().take(page as usize) {
            last_keys = keys
                .iter()
                .enumerate()
                .map(|(i, k)| read_key(k.kind, &row, 5 + i))
                .collect::<Result<Vec<_>>>()?;
            let rt: String = row.try_get(0).map_err(db_err)?;
            let key = key_from_row(&rt, row.try_get(1).map_err(db_err)?)?;
            matches.push(stored(
                tenant,
                key,
                row.try_get(2).map_err(db_err)?,
                row.try_get(3).map_err(db_err)?,
                false,
                row.try_get(4).map_err(db_err)?,
            )?);
        }
        let next_cursor = match (more, matches.last()) {
            (true, Some(last)) if keys.is_empty() => Some(search_cursor(
                last.key.resource_type.as_str(),
                last.key.id.as_str(),
            )),
            (true, Some(last)) => Some(search::sorted_cursor(&last_keys, &last.key)),
            _ => None,
        };
        let included = {
            let mut conn = self.reader.acquire().await.map_err(db_err)?;
            resolve_includes(&mut conn, tenant, query, &matches).await?
        };
        let total = match query.total {
            TotalMode::None => None,
            // The first page holds every match: its length is the total, with no second query.
            _ if query.cursor.is_none() && next_cursor.is_none() => Some(matches.len() as u64),
            TotalMode::Estimate => Some(match self.estimate_matches(tenant, query, now).await? {
                Some(n) if n >= ESTIMATE_TRUSTED_FROM => n,
                _ => self.count_matches(tenant, query, now).await?,
            }),
            TotalMode::Accurate => Some(self.count_matches(tenant, query, now).await?),
        };
        Ok(SearchPage {
            matches,
            included,
            total,
            next_cursor,
        })
    }

    async fn search_parameters(
        &self,
        ctx: &TenantContext,
    ) -> Result<std::sync::Arc<fhirstore_core::registry::Registry>> {
        ctx.require(Permission::Read)?;
        let mut conn = self.reader.acquire().await.map_err(db_err)?;
        Ok(tenant_params(&mut conn, &self.params, ctx.tenant())
            .await?
            .search
            .clone())
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
