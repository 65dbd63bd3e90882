//! The subscription state and event log (`fhirstore_core::subscription`) of the SQL store.

use super::*;
use fhirstore_core::changelog::ChangeCursor;
use fhirstore_core::subscription::{
    Attempt, Event, Finished, Matched, Spec, State, Status, SubscriptionLog,
};

/// The state columns, in the order [`state_of`] reads them.
const STATE_COLUMNS: &str = "tenant, id, version, spec, events, delivered, failures, \
     failing_since, next_attempt, last_sent, last_error";

fn state_of(mut r: Row) -> Result<State> {
    let tenant: String = r.get(0)?;
    let id: String = r.get(1)?;
    let spec: String = r.get(3)?;
    let spec = serde_json::from_str(&spec)
        .ok()
        .and_then(|v| Spec::from_json(&v))
        .ok_or_else(|| corrupt(format!("subscription spec {spec:?}")))?;
    Ok(State {
        tenant: TenantId::new(tenant).map_err(|e| corrupt(e.to_string()))?,
        id: LogicalId::new(id).map_err(|e| corrupt(e.to_string()))?,
        version: r.get(2)?,
        spec,
        events: r.get(4)?,
        delivered: r.get(5)?,
        failures: r.get(6)?,
        failing_since: r.get(7)?,
        next_attempt: r.get(8)?,
        last_sent: r.get(9)?,
        last_error: r.get(10)?,
    })
}

impl<D: Dialect> Store<D> {
    async fn write_spec(
        conn: &mut impl crate::dialect::Exec,
        tenant: &TenantId,
        id: &LogicalId,
        version: i64,
        spec: Option<&Spec>,
        now: i64,
    ) -> Result<()> {
        let Some(spec) = spec else {
            for table in ["subscription_events", "subscription_state"] {
                D::sql(format!("DELETE FROM {table} WHERE tenant = $1 AND id = $2"))
                    .bind(tenant.as_str())
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await?;
            }
            return Ok(());
        };
        // Coming back to `active` clears the failures that sent it to `error`, so delivery
        // resumes at once from the first event not delivered.
        D::sql(
            "INSERT INTO subscription_state (tenant, id, version, status, spec, heartbeat_due) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, id) DO UPDATE SET \
             version = excluded.version, status = excluded.status, spec = excluded.spec, \
             heartbeat_due = excluded.heartbeat_due, \
             failures = CASE WHEN subscription_state.status = 'error' \
               AND excluded.status <> 'error' THEN 0 ELSE subscription_state.failures END, \
             failing_since = CASE WHEN subscription_state.status = 'error' \
               AND excluded.status <> 'error' THEN 0 ELSE subscription_state.failing_since END, \
             next_attempt = CASE WHEN subscription_state.status = 'error' \
               AND excluded.status <> 'error' THEN 0 ELSE subscription_state.next_attempt END \
             WHERE subscription_state.version < excluded.version",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(version)
        .bind(spec.status.code())
        .bind(spec.to_json().to_string())
        .bind(spec.heartbeat_after(now))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl<D: Dialect> SubscriptionLog for Store<D> {
    async fn subscription_states(&self) -> Result<Vec<State>> {
        let rows = D::sql(format!(
            "SELECT {STATE_COLUMNS} FROM subscription_state ORDER BY tenant, id"
        ))
        .fetch_all(&mut *self.read_conn().await?)
        .await?;
        rows.into_iter().map(state_of).collect()
    }

    async fn subscription_state(&self, tenant: &TenantId, id: &LogicalId) -> Result<Option<State>> {
        D::sql(format!(
            "SELECT {STATE_COLUMNS} FROM subscription_state WHERE tenant = $1 AND id = $2"
        ))
        .bind(tenant.as_str())
        .bind(id.as_str())
        .fetch_optional(&mut *self.read_conn().await?)
        .await?
        .map(state_of)
        .transpose()
    }

    async fn record_matches(
        &self,
        name: &str,
        holder: &str,
        cursor: ChangeCursor,
        matched: &Matched,
    ) -> Result<bool> {
        let store = self.clone();
        let (name, holder, matched) = (name.to_owned(), holder.to_owned(), matched.clone());
        crate::detached(async move {
            let now = now_micros();
            let mut tx = store.begin_write().await?;
            // The lease check and the cursor move come first: a process that lost the lease
            // writes nothing, so no event is numbered twice.
            let moved = D::sql(
                "UPDATE sync_consumers SET \
                 major = CASE WHEN major < $3 OR (major = $3 AND minor < $4) THEN $3 ELSE major END, \
                 minor = CASE WHEN major < $3 OR (major = $3 AND minor < $4) THEN $4 ELSE minor END, \
                 updated_at = $5 WHERE name = $1 AND holder = $2",
            )
            .bind(&name)
            .bind(&holder)
            .bind(cursor.major)
            .bind(cursor.minor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if moved != 1 {
                return Ok(false);
            }
            for (tenant, id, version, spec) in &matched.specs {
                Self::write_spec(&mut *tx, tenant, id, *version, spec.as_ref(), now).await?;
            }
            // Each subscription's events, in log order, numbered after its counter.
            let mut runs: Vec<(&TenantId, &LogicalId, Vec<&Event>)> = Vec::new();
            for (tenant, id, event) in &matched.events {
                match runs.iter_mut().find(|(t, i, _)| *t == tenant && *i == id) {
                    Some(run) => run.2.push(event),
                    None => runs.push((tenant, id, vec![event])),
                }
            }
            // Rows are locked in key order, as `finish_deliveries` locks them, so a matcher
            // and a deliverer never wait on each other in a cycle.
            runs.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            for (tenant, id, events) in runs {
                let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
                let last: Option<(i64,)> = D::sql(
                    "UPDATE subscription_state SET events = events + $3 \
                     WHERE tenant = $1 AND id = $2 RETURNING events",
                )
                .bind(tenant.as_str())
                .bind(id.as_str())
                .bind(n)
                .fetch_optional_as(&mut *tx)
                .await?;
                let Some((last,)) = last else {
                    continue;
                };
                let mut number = last - n;
                for chunk in events.chunks(ROWS_PER_INSERT / 9) {
                    let mut sql = String::from(
                        "INSERT INTO subscription_events (tenant, id, number, resource_type, \
                         resource_id, version, deleted, at, recorded_at) VALUES ",
                    );
                    for k in 0..chunk.len() {
                        let b = k * 9;
                        if k > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(&format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6,
                            b + 7,
                            b + 8,
                            b + 9
                        ));
                    }
                    let mut q = D::sql(sql);
                    for e in chunk {
                        number += 1;
                        q = q
                            .bind(tenant.as_str())
                            .bind(id.as_str())
                            .bind(number)
                            .bind(e.resource_type.as_str())
                            .bind(e.id.as_str())
                            .bind(e.version)
                            .bind(e.deleted)
                            .bind(e.at)
                            .bind(now);
                    }
                    q.execute(&mut *tx).await?;
                }
            }
            tx.commit().await.map_err(db_err::<D>)?;
            Ok(true)
        })
        .await
    }

    async fn subscription_events(
        &self,
        tenant: &TenantId,
        id: &LogicalId,
        from: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        let rows: Vec<(i64, String, String, i64, bool, i64)> = D::sql(
            "SELECT number, resource_type, resource_id, version, deleted, at \
             FROM subscription_events WHERE tenant = $1 AND id = $2 \
             AND number >= $3 AND number <= $4 ORDER BY number LIMIT $5",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(from)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all_as(&mut *self.read_conn().await?)
        .await?;
        rows.into_iter()
            .map(|(number, rt, rid, version, deleted, at)| {
                let key = key_from_row(&rt, rid)?;
                Ok(Event {
                    number,
                    resource_type: key.resource_type,
                    id: key.id,
                    version,
                    deleted,
                    at,
                })
            })
            .collect()
    }

    async fn claim_deliveries(
        &self,
        holder: &str,
        ttl: std::time::Duration,
        now: i64,
        limit: u32,
    ) -> Result<Vec<State>> {
        let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        // The lease condition sits in the outer WHERE, which PostgreSQL checks again on each row
        // after waiting for a concurrent claimer's lock: two processes never both take one. A
        // subscription this holder is delivering is leased to it, so it is not taken twice here
        // either. Rows another transaction holds are skipped, not waited for, so a claim takes
        // no part in a lock cycle.
        let rows = D::sql(format!(
            "UPDATE subscription_state SET holder = $1, lease_until = $2 \
             WHERE (tenant, id) IN (SELECT tenant, id FROM subscription_state \
               WHERE status IN ('active', 'requested') AND next_attempt <= $3 \
               AND (delivered < events OR (heartbeat_due > 0 AND heartbeat_due <= $3)) \
               AND (holder IS NULL OR lease_until < $3) \
               ORDER BY next_attempt LIMIT $4{skip_locked}) \
             AND (holder IS NULL OR lease_until < $3) \
             RETURNING {STATE_COLUMNS}",
            skip_locked = D::SKIP_LOCKED
        ))
        .bind(holder)
        .bind(until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.write_conn().await?)
        .await?;
        rows.into_iter().map(state_of).collect()
    }

    async fn finish_deliveries(
        &self,
        holder: &str,
        finished: &[Finished],
        now: i64,
    ) -> Result<Vec<bool>> {
        if finished.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.clone();
        let holder = holder.to_owned();
        // In key order, as `record_matches` locks rows, so the two never deadlock.
        let mut order: Vec<usize> = (0..finished.len()).collect();
        order.sort_by(|&a, &b| {
            (&finished[a].tenant, &finished[a].id).cmp(&(&finished[b].tenant, &finished[b].id))
        });
        let finished = finished.to_vec();
        crate::detached(async move {
            let mut tx = store.begin_write().await?;
            let mut held = vec![false; finished.len()];
            for i in order {
                let f = &finished[i];
                let q = finish_statement::<D>(&f.tenant, &f.id, &holder, &f.attempt, now);
                held[i] = q.execute(&mut *tx).await? == 1;
            }
            tx.commit().await.map_err(db_err::<D>)?;
            Ok(held)
        })
        .await
    }

    async fn prune_events(&self, before: i64, limit: u32) -> Result<u64> {
        D::sql(
            "DELETE FROM subscription_events WHERE (tenant, id, number) IN (\
             SELECT e.tenant, e.id, e.number FROM subscription_events e \
             JOIN subscription_state s ON s.tenant = e.tenant AND s.id = e.id \
             WHERE e.number <= s.delivered AND e.recorded_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&mut *self.write_conn().await?)
        .await
    }
}

/// The UPDATE recording one finished attempt; it changes a row only for the lease holder.
fn finish_statement<D: Dialect>(
    tenant: &TenantId,
    id: &LogicalId,
    holder: &str,
    attempt: &Attempt,
    now: i64,
) -> crate::search::Sql {
    match attempt {
        Attempt::Delivered {
            through,
            heartbeat_due,
        } => D::sql(
            "UPDATE subscription_state SET \
             delivered = CASE WHEN delivered < $4 THEN $4 ELSE delivered END, \
             failures = 0, failing_since = 0, next_attempt = 0, last_error = NULL, \
             last_sent = $5, heartbeat_due = $6, holder = NULL, lease_until = 0 \
             WHERE tenant = $1 AND id = $2 AND holder = $3",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(holder)
        .bind(*through)
        .bind(now)
        .bind(*heartbeat_due),
        Attempt::Failed {
            through,
            error,
            retry_at,
        } => D::sql(
            "UPDATE subscription_state SET \
             failures = CASE WHEN delivered < $7 THEN 1 ELSE failures + 1 END, \
             failing_since = CASE WHEN delivered < $7 OR failing_since = 0 THEN $4 \
               ELSE failing_since END, \
             delivered = CASE WHEN delivered < $7 THEN $7 ELSE delivered END, \
             next_attempt = $5, last_error = $6, holder = NULL, lease_until = 0 \
             WHERE tenant = $1 AND id = $2 AND holder = $3",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(holder)
        .bind(now)
        .bind(*retry_at)
        .bind(error.clone())
        .bind(*through),
        Attempt::GaveUp {
            through,
            error,
            version,
        } => D::sql(
            "UPDATE subscription_state SET status = CASE WHEN version = $4 THEN $5 \
             ELSE status END, failures = failures + 1, last_error = $6, \
             delivered = CASE WHEN delivered < $7 THEN $7 ELSE delivered END, \
             holder = NULL, lease_until = 0 \
             WHERE tenant = $1 AND id = $2 AND holder = $3",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(holder)
        .bind(*version)
        .bind(Status::Error.code())
        .bind(error.clone())
        .bind(*through),
    }
}
