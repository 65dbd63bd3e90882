//! The digests the reconciler compares: kept by every write, read by segment and group, and
//! rebuilt by the self-check; and the reconciler's job log.

use super::*;
use fhirstore_core::digest::SEGMENTS;

pub(super) fn segment_row(mut r: Row) -> Result<SegmentDigest> {
    let seg: i32 = r.get(0)?;
    Ok(SegmentDigest {
        segment: u16::try_from(seg).map_err(|_| corrupt(format!("segment {seg}")))?,
        digest: Digest {
            hash: join_u128(r.get(1)?, r.get(2)?),
            count: r.get(3)?,
        },
    })
}

impl<D: Dialect> Store<D> {
    /// The stored digest segments of one (tenant, type), non-empty ones only, by segment.
    pub async fn digest_segments(
        &self,
        ctx: &TenantContext,
        rt: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        ctx.require(Permission::Read)?;
        let rows = D::sql(
            "SELECT segment, h_hi, h_lo, count FROM digests \
             WHERE tenant = $1 AND resource_type = $2 AND count <> 0 ORDER BY segment",
        )
        .bind(ctx.tenant().as_str())
        .bind(rt.as_str())
        .fetch_all(&mut *self.read_conn().await?)
        .await?;
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
        let rows = D::sql(
            "SELECT segment, e_hi, e_lo FROM resources WHERE tenant = $1 AND resource_type = $2",
        )
        .bind(ctx.tenant().as_str())
        .bind(rt.as_str())
        .fetch_all(&mut *self.read_conn().await?)
        .await?;
        let mut segs: std::collections::BTreeMap<u16, Digest> = Default::default();
        for mut r in rows {
            let seg: i32 = r.get(0)?;
            let seg = u16::try_from(seg).map_err(|_| corrupt(format!("segment {seg}")))?;
            let e = join_u128(r.get(1)?, r.get(2)?);
            segs.entry(seg).or_default().add(e);
        }
        debug_assert!(segs.len() <= SEGMENTS as usize);
        Ok(segs
            .into_iter()
            .map(|(segment, digest)| SegmentDigest { segment, digest })
            .collect())
    }
}

#[async_trait]
impl<D: Dialect> fhirstore_core::secondary::DigestSource for Store<D> {
    async fn tenants(&self) -> Result<Vec<TenantId>> {
        let rows: Vec<(String,)> =
            D::sql("SELECT DISTINCT tenant FROM digests WHERE count <> 0 ORDER BY tenant")
                .fetch_all_as(&mut *self.read_conn().await?)
                .await?;
        rows.into_iter()
            .map(|(t,)| TenantId::new(&t).map_err(|e| corrupt(e.to_string())))
            .collect()
    }

    async fn self_check(&self, tenant: &TenantId, rt: ResourceType) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        // Writers update digests last in their transaction: holding them off while the rows
        // are read makes the recomputed digests exact (SQLite's one writer already does).
        if let Some(lock) = D::LOCK_DIGESTS {
            D::sql(lock).execute(&mut *tx).await?;
        }
        let rows = D::sql(
            "SELECT segment, e_hi, e_lo FROM resources WHERE tenant = $1 AND resource_type = $2",
        )
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut want: std::collections::BTreeMap<i32, Digest> = Default::default();
        for mut r in rows {
            let e = join_u128(r.get(1)?, r.get(2)?);
            want.entry(r.get(0)?).or_default().add(e);
        }
        let mut wrong =
            Self::rewrite_digest_rows(&mut tx, "digests", "segment", tenant, rt, &want).await?;
        if D::GROUP_TABLE {
            let groups = fold_segment_map(&want);
            wrong +=
                Self::rewrite_digest_rows(&mut tx, "digest_groups", "grp", tenant, rt, &groups)
                    .await?;
        }
        tx.commit().await.map_err(db_err::<D>)?;
        if wrong > 0 {
            tracing::warn!(tenant = tenant.as_str(), resource_type = %rt, wrong,
                "digest self-check rewrote digest rows that disagreed with the resources");
        }
        Ok(wrong)
    }

    async fn types_of(&self, tenant: &TenantId) -> Result<Vec<ResourceType>> {
        let rows: Vec<(String,)> = D::sql(
            "SELECT DISTINCT resource_type FROM digests WHERE tenant = $1 AND count <> 0 \
             ORDER BY resource_type",
        )
        .bind(tenant.as_str())
        .fetch_all_as(&mut *self.read_conn().await?)
        .await?;
        rows.into_iter()
            .map(|(t,)| ResourceType::new(&t).map_err(|_| corrupt(format!("type {t:?}"))))
            .collect()
    }
}

#[async_trait]
impl<D: Dialect> fhirstore_core::secondary::DigestView for Store<D> {
    async fn group_digests(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
    ) -> Result<Vec<fhirstore_core::secondary::GroupDigest>> {
        let rows = D::sql(D::GROUP_DIGESTS)
            .bind(tenant.as_str())
            .bind(rt.as_str())
            .fetch_all(&mut *self.read_conn().await?)
            .await?;
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

    async fn segment_digests_in(
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
        let rows = D::sql(D::SEGMENTS_LISTED)
            .bind(tenant.as_str())
            .bind(rt.as_str())
            .bind(list)
            .fetch_all(&mut *self.read_conn().await?)
            .await?;
        let mut out = rows
            .into_iter()
            .map(segment_row)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|s| s.segment);
        Ok(out)
    }

    async fn segment_digests(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
    ) -> Result<Vec<SegmentDigest>> {
        self.digest_segments(&TenantContext::full(tenant.clone()), rt)
            .await
    }

    async fn segment_keys(
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
            let rows = D::sql(D::KEYS_IN_SEGMENTS)
                .bind(tenant.as_str())
                .bind(rt.as_str())
                .bind(chunk.to_vec())
                .fetch_all(&mut *self.read_conn().await?)
                .await?;
            for mut r in rows {
                let id: String = r.get(0)?;
                out.push(fhirstore_core::secondary::KeyState {
                    id: LogicalId::new(id).map_err(|e| corrupt(e.to_string()))?,
                    version: version_of(r.get(1)?)?,
                    e: join_u128(r.get(2)?, r.get(3)?),
                });
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Segment digests (by segment number) folded into their groups' digests.
pub(crate) fn fold_segment_map(
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

impl<D: Dialect> Store<D> {
    /// Rewrites the rows of a digest table (`digests` by `segment`, `digest_groups` by `grp`) of one
    /// (tenant, type) that disagree with `want`, the digests recomputed from the resources; returns
    /// how many did.
    pub(crate) async fn rewrite_digest_rows(
        tx: &mut Conn<D>,
        table: &str,
        key: &str,
        tenant: &TenantId,
        rt: ResourceType,
        want: &std::collections::BTreeMap<i32, Digest>,
    ) -> Result<u64> {
        let rows = D::sql(format!(
            "SELECT {key}, h_hi, h_lo, count FROM {table} WHERE tenant = $1 AND resource_type = $2"
        ))
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut have: std::collections::BTreeMap<i32, Digest> = Default::default();
        for r in rows {
            let row = segment_row(r)?;
            if row.digest.count != 0 {
                have.insert(i32::from(row.segment), row.digest);
            }
        }
        let keys: std::collections::BTreeSet<i32> =
            want.keys().chain(have.keys()).copied().collect();
        let mut wrong = 0;
        for k in keys {
            let w = want.get(&k).copied().unwrap_or_default();
            if have.get(&k).copied().unwrap_or_default() == w {
                continue;
            }
            wrong += 1;
            let (hi, lo) = split_u128(w.hash);
            D::sql(format!(
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
            .execute(&mut *tx)
            .await?;
        }
        Ok(wrong)
    }
}

#[async_trait]
impl<D: Dialect> fhirstore_core::changelog::JobLog for Store<D> {
    async fn save_job(&self, job: &fhirstore_core::changelog::JobRecord) -> Result<()> {
        D::sql(
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
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(())
    }

    async fn load_job(&self, id: &str) -> Result<Option<fhirstore_core::changelog::JobRecord>> {
        let row: Option<(String, String, i64, String, String)> =
            D::sql("SELECT id, plan, next_step, report, state FROM reconcile_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional_as(&mut *self.read_conn().await?)
                .await?;
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
