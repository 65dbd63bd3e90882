//! The write path: one SQL transaction per FHIR transaction (or one per batch, with a
//! savepoint per entry), conditional operations, and the version write itself.

use super::*;
use crate::{DigestDeltas, VersionRow};
use fhirstore_core::bundle::rewrite_references;
use fhirstore_core::digest::{element_hash, segment, TOMBSTONE_CONTENT_HASH};
use fhirstore_core::index;
use fhirstore_core::resource::{check_body, prepare_body, IdRule};
use fhirstore_core::{Deleted, WriteKind, Written};

/// What the write path needs to know about a resource's current row.
#[derive(Clone, Copy)]
pub(super) struct Current {
    pub(super) version: i64,
    pub(super) deleted: bool,
    pub(super) e: u128,
}

/// State shared by the writes of one transaction.
pub(super) struct WriteScope<'a> {
    pub(super) tenant: &'a TenantId,
    pub(super) now: i64,
    pub(super) max_bytes: usize,
    /// `SqlConfig::body_compression`.
    pub(super) body_compression: u32,
    /// Whether each write applies its own digest change (see `D::ALWAYS_INLINE_DIGEST`); otherwise
    /// `deltas` collects them for one sorted flush at the end.
    pub(super) inline_digest: bool,
    /// Whether digests are maintained at all (`SqlConfig::maintain_digests`).
    pub(super) digests: bool,
    pub(super) deltas: DigestDeltas,
    /// The tenant's search parameters as of this transaction: what its writes index.
    pub(super) params: std::sync::Arc<crate::TenantParams>,
}

/// One version written by `put_version`.
pub(super) struct Put {
    pub(super) resource: StoredResource,
    pub(super) kind: WriteKind,
    pub(super) seq: i64,
}

/// The parameters among `rows` (parameter, low, high) with more than one distinct row.
pub(super) fn dates_with_many_rows<'a>(
    rows: impl IntoIterator<Item = (&'a str, i64, i64)>,
) -> Vec<&'a str> {
    let mut seen: Vec<(&str, i64, i64)> = Vec::new();
    let mut many = Vec::new();
    for (param, low, high) in rows {
        if seen
            .iter()
            .any(|&(p, l, h)| p == param && (l, h) != (low, high))
            && !many.contains(&param)
        {
            many.push(param);
        }
        seen.push((param, low, high));
    }
    many
}

pub(super) fn required_permission(op: &WriteOp) -> Permission {
    match op {
        WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => Permission::Delete,
        _ => Permission::Write,
    }
}

/// Checks that can fail before the database is touched: permissions, bodies, and (for
/// multi-entry transactions) that no resource is named twice.
pub(super) fn precheck(
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

pub(super) fn op_body(op: &WriteOp) -> Option<&Value> {
    match op {
        WriteOp::Create { resource, .. }
        | WriteOp::Update { resource, .. }
        | WriteOp::ConditionalUpdate { resource, .. } => Some(resource),
        WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => None,
    }
}

pub(super) fn body_id(resource: &Value) -> Result<Option<LogicalId>> {
    resource
        .get("id")
        .and_then(Value::as_str)
        .map(LogicalId::new)
        .transpose()
}

/// Every `reference` of `v` of the form `Type?criteria`.
pub(super) fn collect_conditional_references(v: &Value, out: &mut Vec<String>) {
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

/// A create without conditions or an update, of anything but a SearchParameter, with no
/// conditional reference: what `Store::put_many` writes together.
fn is_plain(op: &WriteOp) -> bool {
    let (rt, resource) = match op {
        WriteOp::Create {
            resource_type,
            resource,
            if_none_exist: None,
            ..
        }
        | WriteOp::Update {
            resource_type,
            resource,
            ..
        } => (resource_type, resource),
        _ => return false,
    };
    let mut conditional = Vec::new();
    collect_conditional_references(resource, &mut conditional);
    rt.as_str() != "SearchParameter" && conditional.is_empty()
}

/// A conditional op's criteria, restricted to the op's type whatever the caller set.
pub(super) fn scoped(criteria: &SearchQuery, rt: ResourceType) -> SearchQuery {
    let mut q = criteria.clone();
    q.resource_type = Some(rt);
    q
}

pub(super) fn written(put: Option<Put>, rt: ResourceType, id: &LogicalId) -> Result<OpOutcome> {
    let put = put.ok_or_else(|| corrupt(format!("write of {rt}/{id} wrote nothing")))?;
    Ok(OpOutcome::Written(Written {
        kind: put.kind,
        resource: put.resource,
        seq: Some(put.seq),
    }))
}

pub(super) fn deleted(puts: Vec<Put>) -> Deleted {
    Deleted {
        seq: puts.iter().map(|p| p.seq).max(),
        deleted: puts
            .into_iter()
            .map(|p| (p.resource.key, p.resource.version))
            .collect(),
    }
}

/// Ids looked up per statement by a batch of writes: well within both drivers' limits on one
/// bound list, and small enough that a failed statement is cheap to retry.
const CURRENT_PER_STATEMENT: usize = 1_000;

/// One plain create or update handed to `put_many`.
pub(super) struct PlainWrite {
    /// The transaction entry it came from.
    pub(super) entry: usize,
    pub(super) rt: ResourceType,
    pub(super) id: LogicalId,
    pub(super) body: Value,
    pub(super) if_match: Option<VersionId>,
    /// A server-assigned id: no current row to look up.
    pub(super) known_new: bool,
}

/// A version computed and ready to write: everything decided before its statement, so the
/// writes of a transaction can go to the database together.
pub(super) struct Staged {
    pub(super) rt: ResourceType,
    pub(super) id: LogicalId,
    version: VersionId,
    pub(super) seg: u16,
    e: u128,
    /// The segment digest's change: the XOR of old and new element hashes, and the live count.
    pub(super) delta: (u128, i64),
    pub(super) deleted: bool,
    was_live: bool,
    is_new: bool,
    /// The body as stored (see `crate::body`).
    stored_body: Option<Vec<u8>>,
    pub(super) entries: index::IndexEntries,
    /// The stored body (`Null` for a tombstone).
    pub(super) content: Value,
}

/// The next version of `rt/id` over `current`: a tombstone when `body` is `None`, and `None`
/// for a delete of something not live. Fails on a version conflict with `if_match` and on a
/// body that cannot be stored.
pub(super) fn stage(
    w: &WriteScope<'_>,
    rt: ResourceType,
    id: &LogicalId,
    body: Option<Value>,
    if_match: Option<VersionId>,
    current: Option<Current>,
) -> Result<Option<Staged>> {
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
    let prepared = match body {
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
    let e = element_hash(w.tenant, rt, id.as_str(), version, &hash);
    let deleted = prepared.is_none();
    let (content, stored_body) = match prepared {
        Some(p) => {
            let text = std::str::from_utf8(&p.canonical)
                .map_err(|e| corrupt(format!("canonical JSON is not UTF-8: {e}")))?;
            (
                p.content,
                Some(crate::body::encode(text, w.body_compression)),
            )
        }
        None => (Value::Null, None),
    };
    let entries = if deleted {
        index::IndexEntries::default()
    } else {
        index::extract_own(&w.params.index, &content)
    };
    let old_e = current.map_or(0, |c| c.e);
    Ok(Some(Staged {
        rt,
        id: id.clone(),
        version,
        seg: segment(w.tenant, rt, id.as_str()),
        e,
        delta: (old_e ^ e, i64::from(current.is_none())),
        deleted,
        was_live: current.is_some_and(|c| !c.deleted),
        is_new: current.is_none(),
        stored_body,
        entries,
        content,
    }))
}

impl Staged {
    /// The statement's view of this version; `inline_digest` applies its digest change in
    /// the same statement.
    pub(super) fn row<'a>(&'a self, w: &'a WriteScope<'_>, inline_digest: bool) -> VersionRow<'a> {
        let (e_hi, e_lo) = split_u128(self.e);
        VersionRow {
            tenant: w.tenant.as_str(),
            resource_type: self.rt.as_str(),
            id: self.id.as_str(),
            version: as_i64(self.version),
            now: w.now,
            deleted: self.deleted,
            segment: i32::from(self.seg),
            e_hi,
            e_lo,
            op: match (self.deleted, self.was_live) {
                (true, _) => "delete",
                (false, true) => "update",
                (false, false) => "create",
            },
            body: self.stored_body.as_deref(),
            index: &self.entries,
            is_new: self.is_new,
            was_live: self.was_live,
            inline_digest,
            digest_delta: split_u128(self.delta.0),
            digest_count: self.delta.1,
        }
    }

    /// The written version, as the write path answers it.
    pub(super) fn finish(self, w: &WriteScope<'_>, seq: i64) -> Put {
        Put {
            resource: StoredResource {
                tenant: w.tenant.clone(),
                key: ResourceKey::new(self.rt, self.id),
                version: self.version,
                last_updated: from_micros(w.now),
                deleted: self.deleted,
                content: self.content,
            },
            kind: if self.was_live {
                WriteKind::Updated
            } else {
                WriteKind::Created
            },
            seq,
        }
    }
}

impl<D: Dialect> Store<D> {
    pub(super) async fn select_current(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        rt: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<Current>> {
        // The segment is a function of the key; binding it too means both the primary key and the
        // (tenant, type, segment) index find the row directly, whatever PostgreSQL's statistics say
        // about a tenant (with many tenants it estimates one row each and took the segment index to
        // scan a whole tenant: 47 updates/s).
        let row = D::sql(D::SELECT_CURRENT_FOR_WRITE)
            .bind(tenant.as_str())
            .bind(rt.as_str())
            .bind(id.as_str())
            .bind(i32::from(segment(tenant, rt, id.as_str())))
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|mut r| -> Result<Current> {
            Ok(Current {
                version: r.get(0)?,
                deleted: r.get(1)?,
                e: join_u128(r.get(2)?, r.get(3)?),
            })
        })
        .transpose()
    }

    /// Writes one new version of `rt/id` (a tombstone when `body` is `None`) and everything that
    /// goes with it. Returns `None` for a delete of something not live, which writes nothing.
    ///
    /// `known_new` skips the current-row lookup for server-assigned ids.
    pub(super) async fn put_version(
        conn: &mut Conn<D>,
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
            Self::select_current(conn, tenant, rt, id).await?
        };
        loop {
            let Some(staged) = stage(w, rt, id, body.take(), if_match, current)? else {
                return Ok(None);
            };
            let row = staged.row(w, w.inline_digest);
            let Some(seq) = D::write_version(conn, &row).await? else {
                // A concurrent writer created it first: redo as an update of its version.
                if known_new {
                    return Err(Error::AlreadyExists(format!("{rt}/{id}")));
                }
                body = (!staged.deleted).then_some(staged.content);
                current = Self::select_current(conn, tenant, rt, id).await?;
                continue;
            };
            Self::written_version(conn, w, &staged, !w.inline_digest).await?;
            if rt.as_str() == "SearchParameter" {
                let content = (!staged.deleted).then_some(&staged.content);
                Self::sync_search_parameter(conn, w, id, content).await?;
            }
            return Ok(Some(staged.finish(w, seq)));
        }
    }

    /// What follows a version's write in its transaction: the flag of date parameters with
    /// several rows, and the digest change when the caller applies them at the end.
    async fn written_version(
        conn: &mut Conn<D>,
        w: &mut WriteScope<'_>,
        staged: &Staged,
        collect_digest: bool,
    ) -> Result<()> {
        let many = dates_with_many_rows(
            staged
                .entries
                .dates
                .iter()
                .map(|d| (d.param, d.low, d.high)),
        );
        Self::flag_multi_dates(conn, w.tenant, staged.rt.as_str(), &many).await?;
        if w.digests && collect_digest {
            w.deltas
                .apply(staged.rt, staged.seg, staged.delta.0, staged.delta.1);
        }
        Ok(())
    }

    /// The current rows of `keys` (type, id), read (and on PostgreSQL locked) a type at a time,
    /// with one statement per [`CURRENT_PER_STATEMENT`] ids.
    async fn select_currents(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        keys: &[(ResourceType, &LogicalId)],
    ) -> Result<HashMap<(ResourceType, String), Current>> {
        let mut by_type: std::collections::BTreeMap<ResourceType, Vec<String>> = Default::default();
        for (rt, id) in keys {
            by_type.entry(*rt).or_default().push(id.as_str().to_owned());
        }
        let mut out = HashMap::with_capacity(keys.len());
        for (rt, mut ids) in by_type {
            // Locks are taken in key order, as every writer of several rows takes them.
            ids.sort_unstable();
            for chunk in ids.chunks(CURRENT_PER_STATEMENT) {
                // Every placeholder pushed: sqlx binds SQLite's bare `?` by its own count of bare
                // ones, so after a written-out `$1, $2` it would take the first value.
                let mut sql = D::sql(
                    "SELECT r.id, r.version, r.deleted, r.e_hi, r.e_lo FROM resources r \
                     WHERE r.tenant = ",
                );
                sql.push_bind(tenant.as_str());
                sql.push(" AND r.resource_type = ");
                sql.push_bind(rt.as_str());
                let (open, close) = sql.dialect().text_set();
                sql.push(open);
                sql.push_bind(search::Bind::TextList(chunk.to_vec()));
                sql.push(close);
                sql.push(D::LOCK_CURRENT_ROWS);
                for mut row in sql.fetch_all(&mut *conn).await? {
                    let id: String = row.get(0)?;
                    let current = Current {
                        version: row.get(1)?,
                        deleted: row.get(2)?,
                        e: join_u128(row.get(3)?, row.get(4)?),
                    };
                    out.insert((rt, id), current);
                }
            }
        }
        Ok(out)
    }

    /// Writes plain creates and updates of distinct resources, none a SearchParameter: their
    /// current rows in a statement per type, and their versions in one round trip where the
    /// dialect can ([`Dialect::write_versions`]), so a bulk import's chunk costs a few round
    /// trips rather than two per resource. Returns each item's entry with its version; an
    /// error names its entry when the transaction has more than one (`entries`).
    pub(super) async fn put_many(
        conn: &mut Conn<D>,
        w: &mut WriteScope<'_>,
        items: Vec<PlainWrite>,
        entries: usize,
    ) -> Result<Vec<(usize, Put)>> {
        let at = |i: usize| move |e: Error| if entries > 1 { e.in_entry(i) } else { e };
        let lookups: Vec<(ResourceType, &LogicalId)> = items
            .iter()
            .filter(|p| !p.known_new)
            .map(|p| (p.rt, &p.id))
            .collect();
        let currents = Self::select_currents(conn, w.tenant, &lookups).await?;
        let mut staged = Vec::with_capacity(items.len());
        for p in items {
            let current = currents.get(&(p.rt, p.id.as_str().to_owned())).copied();
            let s = stage(w, p.rt, &p.id, Some(p.body), p.if_match, current)
                .map_err(at(p.entry))?
                .ok_or_else(|| corrupt(format!("write of {}/{} staged nothing", p.rt, p.id)))?;
            staged.push((p.entry, p.if_match, p.known_new, s));
        }
        let rows: Vec<VersionRow<'_>> = staged.iter().map(|(_, _, _, s)| s.row(w, false)).collect();
        let seqs = D::write_versions(conn, &rows).await?;
        drop(rows);
        if seqs.len() != staged.len() {
            return Err(corrupt(format!(
                "{} versions written, {} sequence numbers returned",
                staged.len(),
                seqs.len()
            )));
        }
        let mut puts = Vec::with_capacity(staged.len());
        for ((entry, if_match, known_new, s), seq) in staged.into_iter().zip(seqs) {
            match seq {
                Some(seq) => {
                    Self::written_version(conn, w, &s, true).await?;
                    puts.push((entry, s.finish(w, seq)));
                }
                None if known_new => {
                    return Err(at(entry)(Error::AlreadyExists(format!(
                        "{}/{}",
                        s.rt, s.id
                    ))))
                }
                None => {
                    // A concurrent writer created it first: this one alone goes the long way.
                    let (rt, id) = (s.rt, s.id.clone());
                    let put = Self::put_version(conn, w, rt, &id, Some(s.content), if_match, false)
                        .await
                        .map_err(at(entry))?;
                    puts.push((
                        entry,
                        put.ok_or_else(|| corrupt("an update wrote nothing"))?,
                    ));
                }
            }
        }
        Ok(puts)
    }

    /// Records that `params` of `rt` now have a resource with more than one date row, so
    /// search no longer takes several criteria on one of them as one row's range (see
    /// `search_date_multi`). Nothing to do, and no statement, in the usual case of none.
    pub(super) async fn flag_multi_dates(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        rt: &str,
        params: &[&str],
    ) -> Result<()> {
        for param in params {
            D::sql(
                "INSERT INTO search_date_multi (tenant, resource_type, param) \
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(rt)
            .bind(*param)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Applies a transaction's digest deltas in (type, segment) order.
    pub(super) async fn flush_digests(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        deltas: &DigestDeltas,
    ) -> Result<()> {
        let rows = deltas.rows();
        Self::merge_digest_rows(conn, tenant, "digests", "segment", &rows).await?;
        if D::GROUP_TABLE {
            // A group digest is the XOR of its sixteen segments' digests, so it takes the XOR of
            // their changes.
            let mut groups: std::collections::BTreeMap<(&str, i32), (i64, i64, i64)> =
                Default::default();
            for (rt, seg, hi, lo, count) in &rows {
                let g = groups.entry((*rt, seg >> 4)).or_default();
                g.0 ^= hi;
                g.1 ^= lo;
                g.2 += count;
            }
            let groups: Vec<_> = groups
                .into_iter()
                .map(|((rt, grp), (hi, lo, count))| (rt, grp, hi, lo, count))
                .collect();
            Self::merge_digest_rows(conn, tenant, "digest_groups", "grp", &groups).await?;
        }
        Ok(())
    }

    /// XORs `(type, key, hi, lo, count)` changes into `table`, whose rows are keyed by
    /// `(tenant, resource_type, key_column)`.
    async fn merge_digest_rows(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        table: &str,
        key_column: &str,
        rows: &[(&'static str, i32, i64, i64, i64)],
    ) -> Result<()> {
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut qb = D::sql(format!(
                "INSERT INTO {table} (tenant, resource_type, {key_column}, h_hi, h_lo, count) "
            ));
            qb.push_values(chunk.iter().map(|(rt, key, hi, lo, count)| {
                vec![
                    tenant.as_str().into(),
                    (*rt).into(),
                    (*key).into(),
                    (*hi).into(),
                    (*lo).into(),
                    (*count).into(),
                ]
            }));
            // XOR spelled portably: (a | b) - (a & b). The exact result always fits in 64 bits,
            // so neither dialect overflows.
            qb.push(format!(
                " ON CONFLICT (tenant, resource_type, {key_column}) DO UPDATE SET \
                 h_hi = ({table}.h_hi | excluded.h_hi) - ({table}.h_hi & excluded.h_hi), \
                 h_lo = ({table}.h_lo | excluded.h_lo) - ({table}.h_lo & excluded.h_lo), \
                 count = {table}.count + excluded.count"
            ));
            qb.execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Runs `ops` inside the caller's transaction. The caller commits.
    pub(super) async fn apply_ops(
        conn: &mut Conn<D>,
        ctx: &TenantContext,
        ops: &[WriteOp],
        config: &crate::SqlConfig,
        params: std::sync::Arc<crate::TenantParams>,
    ) -> Result<Vec<OpOutcome>> {
        let tenant = ctx.tenant();
        let digests = config.maintain_digests;
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
            max_bytes: config.max_resource_bytes,
            body_compression: config.body_compression,
            inline_digest: digests && (D::ALWAYS_INLINE_DIGEST || single_write),
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
                        D::lock_criteria(conn, tenant, &q).await.map_err(at(i))?;
                        let found = Self::find_keys(conn, tenant, &q, 2).await.map_err(at(i))?;
                        match found.as_slice() {
                            [] => (LogicalId::generate(), None),
                            [key] => {
                                let existing =
                                    Self::read_current(conn, tenant, key.resource_type, &key.id)
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

        let mut outcomes: Vec<Option<OpOutcome>> = vec![None; ops.len()];
        let search_params = w.params.search.clone();
        let body = |resource: &Value| {
            let mut b = resource.clone();
            rewrite_references(&mut b, &urls);
            b
        };
        // Plain creates and updates, a bulk import's chunk, go to the database together; the
        // entries of any other transaction are written one by one, in processing order.
        let plain = ops.len() > 1 && ops.iter().all(is_plain);
        let mut order: Vec<usize> = if plain {
            Vec::new()
        } else {
            (0..ops.len()).collect()
        };
        order.sort_by_key(|i| ops[*i].processing_rank());
        if plain {
            let mut items = Vec::with_capacity(ops.len());
            for (i, op) in ops.iter().enumerate() {
                items.push(match op {
                    WriteOp::Create {
                        resource_type,
                        resource,
                        ..
                    } => {
                        let (id, _) = create_ids
                            .remove(&i)
                            .ok_or_else(|| corrupt("create without an assigned id"))?;
                        PlainWrite {
                            entry: i,
                            rt: *resource_type,
                            id,
                            body: body(resource),
                            if_match: None,
                            known_new: true,
                        }
                    }
                    WriteOp::Update {
                        resource_type,
                        id,
                        resource,
                        if_match,
                    } => PlainWrite {
                        entry: i,
                        rt: *resource_type,
                        id: id.clone(),
                        body: body(resource),
                        if_match: *if_match,
                        known_new: false,
                    },
                    _ => return Err(corrupt("a plain write neither creates nor updates")),
                });
            }
            for (i, put) in Self::put_many(conn, &mut w, items, ops.len()).await? {
                outcomes[i] = Some(OpOutcome::Written(Written {
                    kind: put.kind,
                    resource: put.resource,
                    seq: Some(put.seq),
                }));
            }
        }
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
                    Self::resolved_body(conn, tenant, &search_params, body(resource))
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
                        None => Self::put_written(
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
                } => Self::put_written(
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
                    D::lock_criteria(conn, tenant, &q).await.map_err(at(i))?;
                    let found = Self::find_keys(conn, tenant, &q, 2).await.map_err(at(i))?;
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
                    Self::put_written(
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
                    let put =
                        Self::put_version(conn, &mut w, *resource_type, id, None, None, false)
                            .await
                            .map_err(at(i))?;
                    OpOutcome::Deleted(deleted(put.into_iter().collect()))
                }
                WriteOp::ConditionalDelete {
                    resource_type,
                    criteria,
                } => {
                    let q = scoped(criteria, *resource_type);
                    let found = Self::find_keys(conn, tenant, &q, MAX_CONDITIONAL_DELETE + 1)
                        .await
                        .map_err(at(i))?;
                    if found.len() > MAX_CONDITIONAL_DELETE {
                        return Err(at(i)(Error::PreconditionFailed(format!(
                        "conditional delete matches more than {MAX_CONDITIONAL_DELETE} resources"
                    ))));
                    }
                    let mut puts = Vec::with_capacity(found.len());
                    for key in found {
                        let put = Self::put_version(
                            conn,
                            &mut w,
                            key.resource_type,
                            &key.id,
                            None,
                            None,
                            false,
                        )
                        .await
                        .map_err(at(i))?;
                        puts.extend(put);
                    }
                    OpOutcome::Deleted(deleted(puts))
                }
            };
            outcomes[i] = Some(outcome);
        }
        if w.digests && !w.deltas.is_empty() {
            Self::flush_digests(conn, tenant, &w.deltas).await?;
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
    pub(super) async fn resolved_body(
        conn: &mut Conn<D>,
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
            let keys = Self::find_keys(conn, tenant, &q, 2).await?;
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

    pub(super) async fn put_written(
        conn: &mut Conn<D>,
        w: &mut WriteScope<'_>,
        rt: ResourceType,
        id: &LogicalId,
        body: Value,
        if_match: Option<VersionId>,
        known_new: bool,
    ) -> Result<OpOutcome> {
        let put = Self::put_version(conn, w, rt, id, Some(body), if_match, known_new).await?;
        written(put, rt, id)
    }
}
impl<D: Dialect> Store<D> {
    pub(super) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, D::Db>> {
        let begin = || async {
            match D::BEGIN_WRITE {
                Some(sql) => self.writer.begin_with(sql).await,
                None => self.writer.begin().await,
            }
        };
        match begin().await {
            Err(sqlx::Error::InvalidSavePointStatement) => {
                self.drop_stuck_writers().await?;
                begin().await.map_err(db_err::<D>)
            }
            other => other.map_err(db_err::<D>),
        }
    }

    /// Closes every idle writer connection that sqlx still counts as inside a transaction.
    /// SQLite rolls a transaction back by itself on some errors (a full disk); sqlx's
    /// `ROLLBACK` then fails and it keeps counting the transaction open, so every later
    /// `BEGIN` on that connection would fail. The pool opens a fresh connection instead.
    pub(super) async fn drop_stuck_writers(&self) -> Result<()> {
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
    pub(super) async fn run_atomic(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<OpOutcome>> {
        let (store, ctx) = (self.clone(), ctx.clone());
        crate::detached(async move { store.run_atomic_here(&ctx, &ops).await }).await
    }

    pub(super) async fn run_atomic_here(
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
                let params = Self::tenant_params(&mut tx, &store.params, ctx.tenant()).await?;
                let out = Self::apply_ops(&mut tx, ctx, ops, &store.config, params).await?;
                tx.commit().await.map_err(db_err::<D>)?;
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
    pub(super) async fn run_batch(
        &self,
        ctx: &TenantContext,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<OpOutcome>>> {
        let (store, ctx) = (self.clone(), ctx.clone());
        crate::detached(async move { store.run_batch_here(&ctx, &ops).await }).await
    }

    pub(super) async fn run_batch_here(
        &self,
        ctx: &TenantContext,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<OpOutcome>>> {
        let mut tx = self.begin_write().await?;
        let params = Self::tenant_params(&mut tx, &self.params, ctx.tenant()).await?;
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
                    let mut sp = match sqlx::Connection::begin(&mut ***tx).await {
                        Ok(sp) => sp,
                        Err(e) => {
                            **fatal = Some(db_err::<D>(e));
                            return Err(stop());
                        }
                    };
                    let applied =
                        Self::apply_ops(&mut sp, ctx, single, &store.config, (*params).clone())
                            .await;
                    let ended = match &applied {
                        Ok(_) => sp.commit().await,
                        Err(_) => sp.rollback().await,
                    };
                    if let Err(e) = ended {
                        **fatal = Some(db_err::<D>(e));
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
        tx.commit().await.map_err(db_err::<D>)?;
        self.note_writes(results.iter().filter(|r| r.is_ok()).count() as u64);
        Ok(results)
    }

    /// The number of live resources matching `query`'s criteria.
    /// Counts committed versions and refreshes the planner's statistics in the background when
    /// they are due (see `StatsUpkeep`), with the dialect's `analyze_sql`.
    pub(super) fn note_writes(&self, n: u64) {
        if !self.stats.due(n) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.refresh_stats().await {
                tracing::warn!(error = %e, "ANALYZE failed; plans may be slower until it succeeds");
            }
        });
    }

    /// Runs the dialect's `analyze_sql` on a connection of its own, outside any transaction
    /// (PostgreSQL's `VACUUM` refuses to run inside one).
    pub(super) async fn refresh_stats(&self) -> Result<()> {
        let mut conn = self.write_conn().await?;
        D::sql(D::analyze_sql())
            .persistent(false)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}
