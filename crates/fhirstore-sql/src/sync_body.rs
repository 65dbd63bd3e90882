// The change log (`fhirstore_core::changelog::ChangeLog`) of the SQL store, compiled into
// `sqlite.rs` and `postgres.rs`. The including module provides `LOG_MAJOR`, `LOG_ORDER`,
// `LOG_AFTER`, `LOG_UPTO` (each over the outbox's own columns, with the cursor bound as $1 and
// $2), `LOG_VISIBLE` and `LOG_HEAD`.

use fhirstore_core::changelog::{
    Backfill, ChangeCursor, ChangeLog, ConsumerState, Consumers, DeadLetter, DeadLetters,
    LoggedChange, ReadFences,
};
use fhirstore_core::secondary::Change;

/// A backfill as the `sync_consumers.backfill` column keeps it.
fn backfill_json(b: &Backfill) -> String {
    let after = b
        .after
        .as_ref()
        .map(|(t, rt, id)| serde_json::json!([t.as_str(), rt.as_str(), id.as_str()]));
    serde_json::json!({"start": [b.start.major, b.start.minor], "after": after}).to_string()
}

fn backfill_of(text: &str) -> Result<Backfill> {
    let bad = || corrupt(format!("backfill state {text:?}"));
    let v: Value = serde_json::from_str(text).map_err(|_| bad())?;
    let start = ChangeCursor {
        major: v["start"][0].as_i64().ok_or_else(bad)?,
        minor: v["start"][1].as_i64().ok_or_else(bad)?,
    };
    let after = match &v["after"] {
        Value::Null => None,
        a => Some((
            TenantId::new(a[0].as_str().ok_or_else(bad)?).map_err(|_| bad())?,
            ResourceType::new(a[1].as_str().ok_or_else(bad)?).map_err(|_| bad())?,
            LogicalId::new(a[2].as_str().ok_or_else(bad)?).map_err(|_| bad())?,
        )),
    };
    Ok(Backfill { start, after })
}

/// A version from seven columns starting at `at`: tenant, type, id, version, lastUpdated,
/// deleted, body.
fn version_at(r: &<Db as sqlx::Database>::Row, at: usize) -> Result<StoredResource> {
    let tenant: String = r.try_get(at).map_err(db_err)?;
    let tenant = TenantId::new(tenant).map_err(|e| corrupt(e.to_string()))?;
    let rt: String = r.try_get(at + 1).map_err(db_err)?;
    let key = key_from_row(&rt, r.try_get(at + 2).map_err(db_err)?)?;
    stored(
        &tenant,
        key,
        r.try_get(at + 3).map_err(db_err)?,
        r.try_get(at + 4).map_err(db_err)?,
        r.try_get(at + 5).map_err(db_err)?,
        r.try_get(at + 6).map_err(db_err)?,
    )
}

impl Store {
    async fn register_consumer(&self, name: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO sync_consumers (name, updated_at) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_micros())
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }
}

#[async_trait]
impl ChangeLog for Store {
    async fn changes_after(&self, after: ChangeCursor, limit: u32) -> Result<Vec<LoggedChange>> {
        let sql = format!(
            "SELECT o.major, o.seq, o.tenant, o.resource_type, o.id, o.version, v.last_updated, \
             v.deleted, v.body FROM (SELECT {LOG_MAJOR} AS major, seq, tenant, resource_type, \
             id, version FROM outbox WHERE {LOG_AFTER}{LOG_VISIBLE} ORDER BY {LOG_ORDER} \
             LIMIT $3) o JOIN resource_versions v ON v.tenant = o.tenant \
             AND v.resource_type = o.resource_type AND v.id = o.id AND v.version = o.version \
             ORDER BY o.major, o.seq"
        );
        let rows = sqlx::query(&sql)
            .bind(after.major)
            .bind(after.minor)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?;
        rows.into_iter()
            .map(|r| {
                let seq: i64 = r.try_get(1).map_err(db_err)?;
                Ok(LoggedChange {
                    cursor: ChangeCursor {
                        major: r.try_get(0).map_err(db_err)?,
                        minor: seq,
                    },
                    seq,
                    change: Change::of(&version_at(&r, 2)?),
                })
            })
            .collect()
    }

    async fn log_head(&self) -> Result<ChangeCursor> {
        let (major, minor): (i64, i64) = sqlx::query_as(LOG_HEAD)
            .fetch_one(&self.reader)
            .await
            .map_err(db_err)?;
        Ok(ChangeCursor { major, minor })
    }

    async fn position_of(&self, seq: i64) -> Result<Option<ChangeCursor>> {
        let sql = format!("SELECT {LOG_MAJOR}, seq FROM outbox WHERE seq = $1");
        let row: Option<(i64, i64)> = sqlx::query_as(&sql)
            .bind(seq)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?;
        Ok(row.map(|(major, minor)| ChangeCursor { major, minor }))
    }

    async fn backlog(&self, after: ChangeCursor) -> Result<(u64, Option<i64>)> {
        let sql = format!("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE {LOG_AFTER}");
        let (n, oldest): (i64, Option<i64>) = sqlx::query_as(&sql)
            .bind(after.major)
            .bind(after.minor)
            .fetch_one(&self.reader)
            .await
            .map_err(db_err)?;
        Ok((u64::try_from(n).unwrap_or(0), oldest))
    }

    async fn prune(&self, upto: ChangeCursor) -> Result<u64> {
        let sql = format!("DELETE FROM outbox WHERE {LOG_UPTO}");
        let done = sqlx::query(&sql)
            .bind(upto.major)
            .bind(upto.minor)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn snapshot(
        &self,
        after: Option<&(TenantId, ResourceType, LogicalId)>,
        limit: u32,
    ) -> Result<Vec<StoredResource>> {
        let (t, rt, id) = match after {
            Some((t, rt, id)) => (t.as_str(), rt.as_str(), id.as_str()),
            None => ("", "", ""),
        };
        let rows = sqlx::query(
            "SELECT r.tenant, r.resource_type, r.id, r.version, v.last_updated, r.deleted, \
             v.body FROM resources r JOIN resource_versions v ON v.tenant = r.tenant \
             AND v.resource_type = r.resource_type AND v.id = r.id AND v.version = r.version \
             WHERE (r.tenant, r.resource_type, r.id) > ($1, $2, $3) \
             ORDER BY r.tenant, r.resource_type, r.id LIMIT $4",
        )
        .bind(t)
        .bind(rt)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        rows.iter().map(|r| version_at(r, 0)).collect()
    }
}

#[async_trait]
impl Consumers for Store {
    async fn consumer(&self, name: &str) -> Result<ConsumerState> {
        type Row = (i64, i64, Option<String>);
        let select = || {
            sqlx::query_as::<_, Row>(
                "SELECT major, minor, backfill FROM sync_consumers WHERE name = $1",
            )
            .bind(name)
        };
        let row = match select()
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?
        {
            Some(row) => row,
            None => {
                self.register_consumer(name).await?;
                select().fetch_one(&self.writer).await.map_err(db_err)?
            }
        };
        let (major, minor, backfill) = row;
        Ok(ConsumerState {
            cursor: ChangeCursor { major, minor },
            backfill: backfill.as_deref().map(backfill_of).transpose()?,
        })
    }

    async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        let now = now_micros();
        let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        let take = || async {
            sqlx::query(
                "UPDATE sync_consumers SET holder = $2, lease_until = $3 \
                 WHERE name = $1 AND (holder = $2 OR holder IS NULL OR lease_until < $4)",
            )
            .bind(name)
            .bind(holder)
            .bind(until)
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(db_err)
            .map(|done| done.rows_affected() == 1)
        };
        if take().await? {
            return Ok(true);
        }
        self.register_consumer(name).await?;
        take().await
    }

    async fn release(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query(
            "UPDATE sync_consumers SET holder = NULL, lease_until = 0 \
             WHERE name = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn advance(
        &self,
        name: &str,
        holder: &str,
        cursor: ChangeCursor,
        backfill: Option<&Backfill>,
    ) -> Result<bool> {
        // Every right-hand side reads the row as it was, so `minor` compares the old `major`.
        let done = sqlx::query(
            "UPDATE sync_consumers SET \
             major = CASE WHEN major < $3 OR (major = $3 AND minor < $4) THEN $3 ELSE major END, \
             minor = CASE WHEN major < $3 OR (major = $3 AND minor < $4) THEN $4 ELSE minor END, \
             backfill = $5, updated_at = $6 WHERE name = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .bind(cursor.major)
        .bind(cursor.minor)
        .bind(backfill.map(backfill_json))
        .bind(now_micros())
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn begin_backfill(&self, name: &str, holder: &str, backfill: &Backfill) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sync_consumers SET major = $3, minor = $4, backfill = $5, updated_at = $6 \
             WHERE name = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .bind(backfill.start.major)
        .bind(backfill.start.minor)
        .bind(backfill_json(backfill))
        .bind(now_micros())
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn consumers(&self) -> Result<Vec<(String, ChangeCursor)>> {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT name, major, minor FROM sync_consumers ORDER BY name")
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|(n, major, minor)| (n, ChangeCursor { major, minor }))
            .collect())
    }
}

#[async_trait]
impl DeadLetters for Store {
    async fn dead_letter(&self, name: &str, change: &LoggedChange, error: &str) -> Result<()> {
        let c = &change.change;
        sqlx::query(
            "INSERT INTO sync_dead_letters (consumer, seq, tenant, resource_type, id, version, \
             error, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (consumer, tenant, resource_type, id, version) DO NOTHING",
        )
        .bind(name)
        .bind(change.seq)
        .bind(c.tenant.as_str())
        .bind(c.key.resource_type.as_str())
        .bind(c.key.id.as_str())
        .bind(as_i64(c.version))
        .bind(error)
        .bind(now_micros())
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>> {
        type Row = (i64, String, String, String, i64, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, tenant, resource_type, id, version, error FROM sync_dead_letters \
             WHERE consumer = $1 ORDER BY created_at, seq",
        )
        .bind(name)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, tenant, resource_type, id, version, error)| DeadLetter {
                    seq,
                    tenant,
                    resource_type,
                    id,
                    version,
                    error,
                },
            )
            .collect())
    }
}

#[async_trait]
impl ReadFences for Store {
    async fn renew_reader(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<ChangeCursor>> {
        let store = self.clone();
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let now = now_micros();
        let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        crate::detached(async move {
            let mut tx = store.begin_write().await?;
            // Taking the fence row first serialises this renewal with any raise of the fence:
            // either it sees the raised fence, or the raiser sees this renewal's old one.
            let (major, minor): (i64, i64) = sqlx::query_as(
                "INSERT INTO sync_read_fences (consumer, major, minor) VALUES ($1, 0, 0) \
                 ON CONFLICT (consumer) DO UPDATE SET consumer = excluded.consumer \
                 RETURNING major, minor",
            )
            .bind(&name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            sqlx::query(
                "INSERT INTO sync_readers (consumer, holder, expires_at, seen_major, seen_minor) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, holder) DO UPDATE SET \
                 expires_at = excluded.expires_at, seen_major = excluded.seen_major, \
                 seen_minor = excluded.seen_minor",
            )
            .bind(&name)
            .bind(&holder)
            .bind(until)
            .bind(major)
            .bind(minor)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            // Readers gone for an hour are forgotten.
            sqlx::query("DELETE FROM sync_readers WHERE consumer = $1 AND expires_at < $2")
                .bind(&name)
                .bind(now.saturating_sub(3_600_000_000))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            let fence = ChangeCursor { major, minor };
            Ok((fence != ChangeCursor::default()).then_some(fence))
        })
        .await
    }

    async fn raise_read_fence(&self, name: &str, at: ChangeCursor) -> Result<()> {
        let store = self.clone();
        let name = name.to_owned();
        crate::detached(async move {
            sqlx::query(
                "INSERT INTO sync_read_fences (consumer, major, minor) VALUES ($1, $2, $3) \
                 ON CONFLICT (consumer) DO UPDATE SET major = excluded.major, \
                 minor = excluded.minor WHERE sync_read_fences.major < excluded.major \
                 OR (sync_read_fences.major = excluded.major \
                     AND sync_read_fences.minor < excluded.minor)",
            )
            .bind(&name)
            .bind(at.major)
            .bind(at.minor)
            .execute(&store.writer)
            .await
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn readers_fenced(&self, name: &str, holder: &str, at: ChangeCursor) -> Result<bool> {
        // A lease counts as live for this long past its end, for clock differences between
        // the processes sharing the primary.
        const SKEW_MICROS: i64 = 100_000;
        let (live,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM sync_readers WHERE consumer = $1 AND holder <> $2 \
             AND expires_at >= $3 \
             AND (seen_major < $4 OR (seen_major = $4 AND seen_minor < $5))",
        )
        .bind(name)
        .bind(holder)
        .bind(now_micros().saturating_sub(SKEW_MICROS))
        .bind(at.major)
        .bind(at.minor)
        .fetch_one(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(live == 0)
    }
}

#[async_trait]
impl fhirstore_core::secondary::DigestSource for Store {
    async fn root_digest(&self, tenant: &TenantId, rt: ResourceType) -> Result<Digest> {
        let mut d = Digest::default();
        for g in self.group_digests_of(tenant, rt).await? {
            d.merge(g.digest);
        }
        Ok(d)
    }

    async fn group_digests_of(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
    ) -> Result<Vec<fhirstore_core::secondary::GroupDigest>> {
        let rows = sqlx::query(GROUP_DIGESTS)
            .bind(tenant.as_str())
            .bind(rt.as_str())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?;
        rows.into_iter()
            .map(|r| {
                let s = segment_row(r)?;
                Ok(fhirstore_core::secondary::GroupDigest {
                    group: s.segment,
                    digest: s.digest,
                })
            })
            .collect()
    }

    async fn segment_digests_in_of(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        groups: &[u16],
    ) -> Result<Vec<SegmentDigest>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<i32> = groups
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .flat_map(|g| fhirstore_core::digest::group_segments(*g))
            .map(i32::from)
            .collect();
        let rows = sqlx::query(SEGMENTS_LISTED)
            .bind(tenant.as_str())
            .bind(rt.as_str())
            .bind(int_list(&list))
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?;
        let mut out = rows
            .into_iter()
            .map(segment_row)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|s| s.segment);
        Ok(out)
    }

    async fn segment_digests_of(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        self.digest_segments(&TenantContext::full(tenant.clone()), rt)
            .await
    }

    async fn segment_keys_of(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        segments: &[u16],
    ) -> Result<Vec<fhirstore_core::secondary::KeyState>> {
        let mut out = Vec::new();
        let list: Vec<i32> = segments
            .iter()
            .map(|s| i32::from(*s))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for chunk in list.chunks(4096) {
            let rows = sqlx::query(KEYS_IN_SEGMENTS)
                .bind(tenant.as_str())
                .bind(rt.as_str())
                .bind(int_list(chunk))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
            for r in rows {
                let id: String = r.try_get(0).map_err(db_err)?;
                out.push(fhirstore_core::secondary::KeyState {
                    id: LogicalId::new(id).map_err(|e| corrupt(e.to_string()))?,
                    version: version_of(r.try_get(1).map_err(db_err)?)?,
                    e: join_u128(r.try_get(2).map_err(db_err)?, r.try_get(3).map_err(db_err)?),
                });
            }
        }
        out.sort();
        Ok(out)
    }

    async fn tenants(&self) -> Result<Vec<TenantId>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT tenant FROM digests WHERE count <> 0 ORDER BY tenant")
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
        rows.into_iter()
            .map(|(t,)| TenantId::new(&t).map_err(|e| corrupt(e.to_string())))
            .collect()
    }

    async fn self_check(&self, tenant: &TenantId, rt: ResourceType) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        // Writers update digests last in their transaction: holding them off while the rows
        // are read makes the recomputed digests exact (SQLite's one writer already does).
        if let Some(lock) = LOCK_DIGESTS {
            sqlx::query(lock).execute(&mut *tx).await.map_err(db_err)?;
        }
        let rows = sqlx::query(
            "SELECT segment, e_hi, e_lo FROM resources WHERE tenant = $1 AND resource_type = $2",
        )
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut want: std::collections::BTreeMap<i32, Digest> = Default::default();
        for r in rows {
            let e = join_u128(r.try_get(1).map_err(db_err)?, r.try_get(2).map_err(db_err)?);
            want.entry(r.try_get(0).map_err(db_err)?)
                .or_default()
                .add(e);
        }
        let mut wrong =
            rewrite_digest_rows(&mut tx, "digests", "segment", tenant, rt, &want).await?;
        if GROUP_TABLE {
            let groups = fold_segment_map(&want);
            wrong +=
                rewrite_digest_rows(&mut tx, "digest_groups", "grp", tenant, rt, &groups).await?;
        }
        tx.commit().await.map_err(db_err)?;
        if wrong > 0 {
            tracing::warn!(tenant = tenant.as_str(), resource_type = %rt, wrong,
                "digest self-check rewrote digest rows that disagreed with the resources");
        }
        Ok(wrong)
    }

    async fn types_of(&self, tenant: &TenantId) -> Result<Vec<ResourceType>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT resource_type FROM digests WHERE tenant = $1 AND count <> 0 \
             ORDER BY resource_type",
        )
        .bind(tenant.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        rows.into_iter()
            .map(|(t,)| ResourceType::new(&t).map_err(|_| corrupt(format!("type {t:?}"))))
            .collect()
    }
}

/// Segment digests (by segment number) folded into their groups' digests.
fn fold_segment_map(
    segments: &std::collections::BTreeMap<i32, Digest>,
) -> std::collections::BTreeMap<i32, Digest> {
    let mut groups: std::collections::BTreeMap<i32, Digest> = Default::default();
    for (seg, d) in segments {
        groups
            .entry(seg >> fhirstore_core::digest::GROUP_SHIFT)
            .or_default()
            .merge(*d);
    }
    groups
}

/// Rewrites the rows of a digest table (`digests` by `segment`, `digest_groups` by `grp`) of one
/// (tenant, type) that disagree with `want`, the digests recomputed from the resources; returns
/// how many did.
async fn rewrite_digest_rows(
    tx: &mut sqlx::Transaction<'_, Db>,
    table: &str,
    key: &str,
    tenant: &TenantId,
    rt: ResourceType,
    want: &std::collections::BTreeMap<i32, Digest>,
) -> Result<u64> {
    let rows = sqlx::query(&format!(
        "SELECT {key}, h_hi, h_lo, count FROM {table} WHERE tenant = $1 AND resource_type = $2"
    ))
    .bind(tenant.as_str())
    .bind(rt.as_str())
    .fetch_all(&mut **tx)
    .await
    .map_err(db_err)?;
    let mut have: std::collections::BTreeMap<i32, Digest> = Default::default();
    for r in rows {
        let row = segment_row(r)?;
        if row.digest.count != 0 {
            have.insert(i32::from(row.segment), row.digest);
        }
    }
    let keys: std::collections::BTreeSet<i32> = want.keys().chain(have.keys()).copied().collect();
    let mut wrong = 0;
    for k in keys {
        let w = want.get(&k).copied().unwrap_or_default();
        if have.get(&k).copied().unwrap_or_default() == w {
            continue;
        }
        wrong += 1;
        let (hi, lo) = split_u128(w.hash);
        sqlx::query(&format!(
            "INSERT INTO {table} (tenant, resource_type, {key}, h_hi, h_lo, count) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, resource_type, {key}) \
             DO UPDATE SET h_hi = excluded.h_hi, h_lo = excluded.h_lo, count = excluded.count"
        ))
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .bind(k)
        .bind(hi)
        .bind(lo)
        .bind(w.count)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    }
    Ok(wrong)
}

#[async_trait]
impl fhirstore_core::changelog::JobLog for Store {
    async fn save_job(&self, job: &fhirstore_core::changelog::JobRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO reconcile_jobs (id, plan, next_step, report, state, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
             plan = excluded.plan, next_step = excluded.next_step, report = excluded.report, \
             state = excluded.state, updated_at = excluded.updated_at",
        )
        .bind(&job.id)
        .bind(&job.plan)
        .bind(i64::try_from(job.next_step).unwrap_or(i64::MAX))
        .bind(&job.report)
        .bind(&job.state)
        .bind(now_micros())
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn load_job(&self, id: &str) -> Result<Option<fhirstore_core::changelog::JobRecord>> {
        let row: Option<(String, String, i64, String, String)> = sqlx::query_as(
            "SELECT id, plan, next_step, report, state FROM reconcile_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await
        .map_err(db_err)?;
        Ok(row.map(
            |(id, plan, next, report, state)| fhirstore_core::changelog::JobRecord {
                id,
                plan,
                next_step: u64::try_from(next).unwrap_or(0),
                report,
                state,
            },
        ))
    }
}
