//! The change log (`fhirstore_core::changelog`) of the SQL store: the outbox read in commit
//! order, consumer leases and backfills, dead letters and read fences.

use super::*;
use crate::OutboxEntry;
use fhirstore_core::changelog::{
    Backfill, ChangeCursor, ChangeLog, ConsumerState, Consumers, DeadLetter, DeadLetters,
    LoggedChange, ReadFences,
};
use fhirstore_core::secondary::Change;

/// A backfill as the `sync_consumers.backfill` column keeps it.
pub(super) fn backfill_json(b: &Backfill) -> String {
    let after = b
        .after
        .as_ref()
        .map(|(t, rt, id)| serde_json::json!([t.as_str(), rt.as_str(), id.as_str()]));
    serde_json::json!({"start": [b.start.major, b.start.minor], "after": after}).to_string()
}

pub(super) fn backfill_of(text: &str) -> Result<Backfill> {
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
pub(super) fn version_at(r: &mut Row, at: usize) -> Result<StoredResource> {
    let tenant: String = r.get(at)?;
    let tenant = TenantId::new(tenant).map_err(|e| corrupt(e.to_string()))?;
    let rt: String = r.get(at + 1)?;
    let key = key_from_row(&rt, r.get(at + 2)?)?;
    stored(
        &tenant,
        key,
        r.get(at + 3)?,
        r.get(at + 4)?,
        r.get(at + 5)?,
        r.get(at + 6)?,
    )
}

impl<D: Dialect> Store<D> {
    pub(super) async fn register_consumer(&self, name: &str) -> Result<()> {
        D::sql(
            "INSERT INTO sync_consumers (name, updated_at) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_micros())
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(())
    }

    /// Outbox entries after `after_seq`, by `seq`, for inspecting the outbox. Consumers read
    /// through `ChangeLog::changes_after` instead: on PostgreSQL, `seq` order can skip a slow
    /// transaction's entry (see `fhirstore_core::changelog`).
    pub async fn outbox_after(&self, after_seq: i64, limit: u32) -> Result<Vec<OutboxEntry>> {
        let rows = D::sql(
            "SELECT seq, tenant, resource_type, id, version, op FROM outbox \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.read_conn().await?)
        .await?;
        rows.into_iter()
            .map(|mut r| {
                Ok(OutboxEntry {
                    seq: r.get(0)?,
                    tenant: r.get(1)?,
                    resource_type: r.get(2)?,
                    id: r.get(3)?,
                    version: r.get(4)?,
                    op: r.get(5)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl<D: Dialect> ChangeLog for Store<D> {
    fn change_stamp(&self) -> Option<u128> {
        self.stamp.as_ref().and_then(|read| read())
    }

    async fn changes_after(&self, after: ChangeCursor, limit: u32) -> Result<Vec<LoggedChange>> {
        let sql = format!(
            "SELECT o.major, o.seq, o.tenant, o.resource_type, o.id, o.version, v.last_updated, \
             v.deleted, v.body FROM (SELECT {log_major} AS major, seq, tenant, resource_type, \
             id, version FROM outbox WHERE {log_after}{log_visible} ORDER BY {log_order} \
             LIMIT $3) o JOIN resource_versions v ON v.tenant = o.tenant \
             AND v.resource_type = o.resource_type AND v.id = o.id AND v.version = o.version \
             ORDER BY o.major, o.seq",
            log_after = D::LOG_AFTER,
            log_major = D::LOG_MAJOR,
            log_order = D::LOG_ORDER,
            log_visible = D::LOG_VISIBLE
        );
        let rows = D::sql(sql)
            .bind(after.major)
            .bind(after.minor)
            .bind(i64::from(limit))
            .fetch_all(&mut *self.read_conn().await?)
            .await?;
        rows.into_iter()
            .map(|mut r| {
                let seq: i64 = r.get(1)?;
                Ok(LoggedChange {
                    cursor: ChangeCursor {
                        major: r.get(0)?,
                        minor: seq,
                    },
                    seq,
                    change: Change::of(&version_at(&mut r, 2)?),
                })
            })
            .collect()
    }

    async fn log_head(&self) -> Result<ChangeCursor> {
        let (major, minor): (i64, i64) = D::sql(D::LOG_HEAD)
            .fetch_one(&mut *self.read_conn().await?)
            .await?
            .into_tuple()?;
        Ok(ChangeCursor { major, minor })
    }

    async fn position_of(&self, seq: i64) -> Result<Option<ChangeCursor>> {
        let sql = format!(
            "SELECT {log_major}, seq FROM outbox WHERE seq = $1",
            log_major = D::LOG_MAJOR
        );
        let row: Option<(i64, i64)> = D::sql(sql)
            .bind(seq)
            .fetch_optional_as(&mut *self.read_conn().await?)
            .await?;
        Ok(row.map(|(major, minor)| ChangeCursor { major, minor }))
    }

    async fn backlog(&self, after: ChangeCursor) -> Result<(u64, Option<i64>)> {
        let sql = format!(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE {log_after}",
            log_after = D::LOG_AFTER
        );
        let (n, oldest): (i64, Option<i64>) = D::sql(sql)
            .bind(after.major)
            .bind(after.minor)
            .fetch_one(&mut *self.read_conn().await?)
            .await?
            .into_tuple()?;
        Ok((u64::try_from(n).unwrap_or(0), oldest))
    }

    async fn prune(&self, upto: ChangeCursor) -> Result<u64> {
        let sql = format!(
            "DELETE FROM outbox WHERE {log_upto}",
            log_upto = D::LOG_UPTO
        );
        let done = D::sql(sql)
            .bind(upto.major)
            .bind(upto.minor)
            .execute(&mut *self.write_conn().await?)
            .await?;
        Ok(done)
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
        let rows = D::sql(
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
        .fetch_all(&mut *self.read_conn().await?)
        .await?;
        rows.into_iter()
            .map(|mut r| version_at(&mut r, 0))
            .collect()
    }
}

#[async_trait]
impl<D: Dialect> Consumers for Store<D> {
    async fn consumer(&self, name: &str) -> Result<ConsumerState> {
        let select = || {
            D::sql("SELECT major, minor, backfill FROM sync_consumers WHERE name = $1").bind(name)
        };
        let row = match select()
            .fetch_optional(&mut *self.read_conn().await?)
            .await?
        {
            Some(row) => row,
            None => {
                self.register_consumer(name).await?;
                select().fetch_one(&mut *self.write_conn().await?).await?
            }
        };
        let (major, minor, backfill): (i64, i64, Option<String>) = row.into_tuple()?;
        Ok(ConsumerState {
            cursor: ChangeCursor { major, minor },
            backfill: backfill.as_deref().map(backfill_of).transpose()?,
        })
    }

    async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        let now = now_micros();
        let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        let take = || async {
            D::sql(
                "UPDATE sync_consumers SET holder = $2, lease_until = $3 \
                 WHERE name = $1 AND (holder = $2 OR holder IS NULL OR lease_until < $4)",
            )
            .bind(name)
            .bind(holder)
            .bind(until)
            .bind(now)
            .execute(&mut *self.write_conn().await?)
            .await
            .map(|done| done == 1)
        };
        if take().await? {
            return Ok(true);
        }
        self.register_consumer(name).await?;
        take().await
    }

    async fn release(&self, name: &str, holder: &str) -> Result<()> {
        D::sql(
            "UPDATE sync_consumers SET holder = NULL, lease_until = 0 \
             WHERE name = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .execute(&mut *self.write_conn().await?)
        .await?;
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
        let done = D::sql(
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
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(done == 1)
    }

    async fn begin_backfill(&self, name: &str, holder: &str, backfill: &Backfill) -> Result<bool> {
        let done = D::sql(
            "UPDATE sync_consumers SET major = $3, minor = $4, backfill = $5, updated_at = $6 \
             WHERE name = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .bind(backfill.start.major)
        .bind(backfill.start.minor)
        .bind(backfill_json(backfill))
        .bind(now_micros())
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(done == 1)
    }

    async fn consumers(&self) -> Result<Vec<(String, ChangeCursor)>> {
        let rows: Vec<(String, i64, i64)> =
            D::sql("SELECT name, major, minor FROM sync_consumers ORDER BY name")
                .fetch_all_as(&mut *self.read_conn().await?)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(n, major, minor)| (n, ChangeCursor { major, minor }))
            .collect())
    }
}

#[async_trait]
impl<D: Dialect> DeadLetters for Store<D> {
    async fn dead_letter(&self, name: &str, change: &LoggedChange, error: &str) -> Result<()> {
        let c = &change.change;
        D::sql(
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
        .execute(&mut *self.write_conn().await?)
        .await?;
        Ok(())
    }

    async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>> {
        type Letter = (i64, String, String, String, i64, String);
        let rows: Vec<Letter> = D::sql(
            "SELECT seq, tenant, resource_type, id, version, error FROM sync_dead_letters \
             WHERE consumer = $1 ORDER BY created_at, seq",
        )
        .bind(name)
        .fetch_all_as(&mut *self.read_conn().await?)
        .await?;
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
impl<D: Dialect> ReadFences for Store<D> {
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
            let (major, minor): (i64, i64) = D::sql(
                "INSERT INTO sync_read_fences (consumer, major, minor) VALUES ($1, 0, 0) \
                 ON CONFLICT (consumer) DO UPDATE SET consumer = excluded.consumer \
                 RETURNING major, minor",
            )
            .bind(&name)
            .fetch_one(&mut *tx)
            .await?
            .into_tuple()?;
            D::sql(
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
            .await?;
            // Readers gone for an hour are forgotten.
            D::sql("DELETE FROM sync_readers WHERE consumer = $1 AND expires_at < $2")
                .bind(&name)
                .bind(now.saturating_sub(3_600_000_000))
                .execute(&mut *tx)
                .await?;
            tx.commit().await.map_err(db_err::<D>)?;
            let fence = ChangeCursor { major, minor };
            Ok((fence != ChangeCursor::default()).then_some(fence))
        })
        .await
    }

    async fn raise_read_fence(&self, name: &str, at: ChangeCursor) -> Result<()> {
        let store = self.clone();
        let name = name.to_owned();
        crate::detached(async move {
            D::sql(
                "INSERT INTO sync_read_fences (consumer, major, minor) VALUES ($1, $2, $3) \
                 ON CONFLICT (consumer) DO UPDATE SET major = excluded.major, \
                 minor = excluded.minor WHERE sync_read_fences.major < excluded.major \
                 OR (sync_read_fences.major = excluded.major \
                     AND sync_read_fences.minor < excluded.minor)",
            )
            .bind(&name)
            .bind(at.major)
            .bind(at.minor)
            .execute(&mut *store.write_conn().await?)
            .await?;
            Ok(())
        })
        .await
    }

    async fn readers_fenced(&self, name: &str, holder: &str, at: ChangeCursor) -> Result<bool> {
        // A lease counts as live for this long past its end, for clock differences between
        // the processes sharing the primary.
        const SKEW_MICROS: i64 = 100_000;
        let (live,): (i64,) = D::sql(
            "SELECT COUNT(*) FROM sync_readers WHERE consumer = $1 AND holder <> $2 \
             AND expires_at >= $3 \
             AND (seen_major < $4 OR (seen_major = $4 AND seen_minor < $5))",
        )
        .bind(name)
        .bind(holder)
        .bind(now_micros().saturating_sub(SKEW_MICROS))
        .bind(at.major)
        .bind(at.minor)
        .fetch_one(&mut *self.write_conn().await?)
        .await?
        .into_tuple()?;
        Ok(live == 0)
    }
}
