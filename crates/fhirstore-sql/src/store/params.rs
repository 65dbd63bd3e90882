//! A tenant's own SearchParameters and their reindex jobs.

use super::*;
use fhirstore_core::index;
use fhirstore_core::registry::{intern, parse_custom, parse_def, Registry, SearchParamDef};
use fhirstore_core::{ReindexOptions, ReindexState, ReindexStatus};

use super::write::WriteScope;

/// `AND {column} IN (…)` for the definition's base types; nothing when it applies to every
/// type.
pub(super) fn push_base_types(qb: &mut search::Sql, column: &str, def: &SearchParamDef) {
    if def
        .base
        .iter()
        .any(|b| b == "Resource" || b == "DomainResource")
    {
        return;
    }
    qb.push(format!(" AND {column} IN ("));
    qb.push_bind_list(&def.base);
    qb.push(")");
}

pub(super) type StatusRow = (String, String, String, i64, i64);

pub(super) fn status_of((url, code, state, processed, total): StatusRow) -> Result<ReindexStatus> {
    let state = match state.as_str() {
        crate::STATE_ACTIVE => ReindexState::Active,
        crate::STATE_REINDEXING => ReindexState::Reindexing,
        crate::STATE_REMOVING => ReindexState::Removing,
        other => return Err(corrupt(format!("search parameter state {other:?}"))),
    };
    Ok(ReindexStatus {
        url,
        code,
        state,
        processed: u64::try_from(processed).unwrap_or(0),
        total: u64::try_from(total).unwrap_or(0),
    })
}

impl<D: Dialect> Store<D> {
    /// Every parameter of the tenant's own, with its job's progress.
    pub(super) async fn param_statuses(&self, tenant: &TenantId) -> Result<Vec<ReindexStatus>> {
        let rows: Vec<StatusRow> = D::sql(
            "SELECT url, code, state, processed, total FROM search_parameters \
             WHERE tenant = $1 ORDER BY url",
        )
        .bind(tenant.as_str())
        .fetch_all_as(&mut *self.read_conn().await?)
        .await?;
        rows.into_iter().map(status_of).collect()
    }

    /// Runs pending jobs one batch at a time; see [`ResourceStorage::reindex`].
    pub(super) async fn run_reindex(
        &self,
        tenant: &TenantId,
        options: ReindexOptions,
        progress: &(dyn for<'r> Fn(&'r ReindexStatus) + Send + Sync),
    ) -> Result<Vec<ReindexStatus>> {
        let batch = options.batch.clamp(1, 10_000);
        let mut batches = 0u32;
        let mut finished = false;
        'jobs: loop {
            let pending: Option<String> = D::sql(
                "SELECT url FROM search_parameters WHERE tenant = $1 AND state <> $2 \
                 ORDER BY url LIMIT 1",
            )
            .bind(tenant.as_str())
            .bind(crate::STATE_ACTIVE)
            .fetch_optional(&mut *self.read_conn().await?)
            .await?
            .map(|mut r| r.get(0))
            .transpose()?;
            let Some(url) = pending else { break };
            loop {
                if options.max_batches.is_some_and(|m| batches >= m) {
                    break 'jobs;
                }
                let step = self.reindex_batch_retrying(tenant, &url, batch).await?;
                batches += 1;
                match step {
                    Some((status, done)) => {
                        progress(&status);
                        if done {
                            finished = true;
                            break;
                        }
                    }
                    // Deleted or re-registered under another resource meanwhile.
                    None => break,
                }
            }
        }
        // A finished job rewrote (or removed) one parameter's rows for a whole tenant: the
        // planner's picture of that parameter is stale. The job stands whatever happens here.
        if finished {
            if let Err(e) = self.refresh_stats().await {
                tracing::warn!(error = %e, "refreshing statistics after a reindex job failed");
            }
        }
        self.param_statuses(tenant).await
    }

    pub(super) async fn reindex_batch_retrying(
        &self,
        tenant: &TenantId,
        url: &str,
        batch: u32,
    ) -> Result<Option<(ReindexStatus, bool)>> {
        crate::retrying(self.config.max_retries, "reindex batch", &mut (), |_| {
            // Owned copies: the batch runs detached from this future.
            let (store, t, u) = (self.clone(), tenant.clone(), url.to_owned());
            Box::pin(crate::detached(async move {
                store.reindex_batch(&t, &u, batch).await
            }))
        })
        .await
    }

    /// One short transaction of a job: the next `batch` live resources of the parameter's
    /// base types after the saved position get their rows for this parameter rewritten (or,
    /// for a removal, deleted), and the position moves past them. `done` once none are left:
    /// the parameter turns active (searchable), or a removed one's row goes.
    #[instrument(skip(self), fields(tenant = tenant.as_str()))]
    pub(super) async fn reindex_batch(
        &self,
        tenant: &TenantId,
        url: &str,
        batch: u32,
    ) -> Result<Option<(ReindexStatus, bool)>> {
        let mut tx = self.begin_write().await?;
        let params = Self::tenant_params(&mut tx, &self.params, tenant).await?;
        type JobRow = (String, String, String, String, String, i64, i64);
        let job: Option<JobRow> = D::sql(
            "SELECT code, body, state, pos_type, pos_id, processed, total \
             FROM search_parameters WHERE tenant = $1 AND url = $2",
        )
        .bind(tenant.as_str())
        .bind(url)
        .fetch_optional_as(&mut *tx)
        .await?;
        let Some((code, body, state, pos_type, pos_id, processed, total)) = job else {
            return Ok(None);
        };
        if state == crate::STATE_ACTIVE {
            let status = status_of((url.to_owned(), code, state, processed, total))?;
            return Ok(Some((status, true)));
        }
        let def = serde_json::from_str::<Value>(&body)
            .map_err(|e| e.to_string())
            .and_then(|v| parse_def(&v))
            .map(intern)
            .map_err(|e| corrupt(format!("stored SearchParameter {url}: {e}")))?;

        let mut select = D::sql(
            "SELECT r.resource_type, r.id, v.body FROM resources r JOIN resource_versions v \
             ON v.tenant = r.tenant AND v.resource_type = r.resource_type AND v.id = r.id \
             AND v.version = r.version WHERE NOT r.deleted AND r.tenant = ",
        );
        select.push_bind(tenant.as_str().to_owned());
        select.push(" AND (r.tenant, r.resource_type, r.id) > (");
        select.push_bind(tenant.as_str().to_owned());
        select.push(", ");
        select.push_bind(pos_type);
        select.push(", ");
        select.push_bind(pos_id);
        select.push(")");
        push_base_types(&mut select, "r.resource_type", def);
        select.push(" ORDER BY r.resource_type, r.id LIMIT ");
        select.push_bind(i64::from(batch));
        select.push(D::LOCK_REINDEX_BATCH);
        let rows = select.fetch_all(&mut *tx).await?;

        let mut keys: Vec<(String, String)> = Vec::with_capacity(rows.len());
        let mut new_rows: [Vec<(usize, Vec<Value>)>; 7] = Default::default();
        for mut row in rows {
            let rt: String = row.get(0)?;
            let id: String = row.get(1)?;
            let body: Option<Vec<u8>> = row.get(2)?;
            if let (crate::STATE_REINDEXING, Some(body)) = (state.as_str(), body) {
                let text = crate::body::decode(body)
                    .map_err(|e| corrupt(format!("stored body of {rt}/{id}: {}", e.0)))?;
                let content: Value = serde_json::from_slice(&text)
                    .map_err(|e| corrupt(format!("stored body of {rt}/{id}: {e}")))?;
                let entries = index::extract_params(&params.index, &[def], &content);
                for (table, table_rows) in new_rows.iter_mut().zip(crate::index_rows(&entries)) {
                    table.extend(table_rows.into_iter().map(|r| (keys.len(), r)));
                }
            }
            keys.push((rt, id));
        }
        Self::rewrite_param_rows(&mut tx, tenant, def, &keys, &new_rows).await?;

        let processed = processed + i64::try_from(keys.len()).unwrap_or(i64::MAX);
        let done = keys.len() < batch as usize;
        let final_state = match (done, state.as_str()) {
            (true, crate::STATE_REMOVING) => {
                D::sql("DELETE FROM search_parameters WHERE tenant = $1 AND url = $2")
                    .bind(tenant.as_str())
                    .bind(url)
                    .execute(&mut *tx)
                    .await?;
                state
            }
            (done, _) => {
                let next_state = if done { crate::STATE_ACTIVE } else { &state };
                let (last_type, last_id) = keys.last().cloned().unwrap_or_default();
                D::sql(
                    "UPDATE search_parameters SET state = $3, processed = $4, \
                     pos_type = CASE WHEN $5 = '' THEN pos_type ELSE $5 END, \
                     pos_id = CASE WHEN $5 = '' THEN pos_id ELSE $6 END \
                     WHERE tenant = $1 AND url = $2",
                )
                .bind(tenant.as_str())
                .bind(url)
                .bind(next_state)
                .bind(processed)
                .bind(last_type)
                .bind(last_id)
                .execute(&mut *tx)
                .await?;
                next_state.to_owned()
            }
        };
        if done {
            Self::bump_param_generation(&mut tx, tenant.as_str()).await?;
        }
        tx.commit().await.map_err(db_err::<D>)?;
        let status = status_of((url.to_owned(), code, final_state, processed, total))?;
        Ok(Some((status, done)))
    }
}

impl<D: Dialect> Store<D> {
    /// The tenant's parameters as of this transaction (outside one: as of now), from the cache
    /// unless the tenant's generation moved.
    pub(super) async fn tenant_params(
        conn: &mut Conn<D>,
        cache: &crate::ParamCache,
        tenant: &TenantId,
    ) -> Result<std::sync::Arc<crate::TenantParams>> {
        let generation: Option<i64> = D::sql(D::SELECT_PARAM_GENERATION)
            .bind(tenant.as_str())
            .fetch_one(&mut *conn)
            .await?
            .get(0)?;
        let Some(generation) = generation else {
            return Ok(crate::TenantParams::r4());
        };
        if let Some(p) = cache.get(tenant.as_str(), generation) {
            return Ok(p);
        }
        let rows: Vec<(String, String)> =
            D::sql("SELECT body, state FROM search_parameters WHERE tenant = $1 ORDER BY url")
                .bind(tenant.as_str())
                .fetch_all_as(&mut *conn)
                .await?;
        let params = std::sync::Arc::new(crate::TenantParams::from_rows(&rows));
        cache.put(tenant.as_str(), generation, params.clone());
        Ok(params)
    }

    pub(super) async fn bump_param_generation(conn: &mut Conn<D>, tenant: &str) -> Result<()> {
        D::sql(
        "INSERT INTO search_parameter_generation (tenant, generation) VALUES ($1, 1) \
         ON CONFLICT (tenant) DO UPDATE SET generation = search_parameter_generation.generation + 1",
    )
    .bind(tenant)
    .execute(&mut *conn).await?;
        Ok(())
    }

    /// Keeps `search_parameters` in step with a SearchParameter resource just written (`content`)
    /// or deleted (`None`), inside the write's transaction, so a definition and its registration
    /// commit together. An active definition registers (or re-registers, when it changed) with a
    /// fresh reindex job; a retired, draft or deleted one, or one whose URL changed, turns to
    /// `removing`. An active definition that cannot be indexed fails the write: a client that
    /// stores a SearchParameter expects it to work.
    pub(super) async fn sync_search_parameter(
        conn: &mut Conn<D>,
        w: &WriteScope<'_>,
        id: &LogicalId,
        content: Option<&Value>,
    ) -> Result<()> {
        let tenant = w.tenant.as_str();
        if let Some(sql) = D::LOCK_PARAMS_EXCLUSIVE {
            D::sql(sql).bind(tenant).execute(&mut *conn).await?;
        }
        let active = content.filter(|c| c.get("status").and_then(Value::as_str) == Some("active"));
        // The official definitions are searchable already: storing one registers nothing.
        let url = active
            .and_then(|c| c.get("url"))
            .and_then(Value::as_str)
            .filter(|u| Registry::r4().by_url(u).is_none());
        let def = match (active, url) {
            (Some(c), Some(u)) => {
                let others =
                    Registry::r4().with(w.params.own.iter().copied().filter(|d| d.url != u));
                let def = parse_custom(c, &others)
                    .map_err(|e| Error::InvalidResource(format!("SearchParameter: {e}")))?;
                Some(intern(def))
            }
            _ => None,
        };
        let retired = D::sql(
            "UPDATE search_parameters SET state = $4, pos_type = '', pos_id = '', processed = 0, \
         total = 0 WHERE tenant = $1 AND resource_id = $2 AND url <> $3 AND state <> $4",
        )
        .bind(tenant)
        .bind(id.as_str())
        .bind(def.map_or("", |d| d.url.as_str()))
        .bind(crate::STATE_REMOVING)
        .execute(&mut *conn)
        .await?;
        let mut changed = retired > 0;
        if let (Some(def), Some(content)) = (def, content) {
            let body = content.to_string();
            let existing: Option<(String, String)> =
                D::sql("SELECT body, state FROM search_parameters WHERE tenant = $1 AND url = $2")
                    .bind(tenant)
                    .bind(&def.url)
                    .fetch_optional_as(&mut *conn)
                    .await?;
            // A new version that defines the same parameter (only its narrative or meta changed)
            // keeps its index and its place.
            let unchanged = existing.is_some_and(|(b, state)| {
                state != crate::STATE_REMOVING
                    && serde_json::from_str::<Value>(&b)
                        .ok()
                        .and_then(|v| parse_def(&v).ok())
                        .is_some_and(|d| std::ptr::eq(intern(d), def))
            });
            if unchanged {
                D::sql(
                    "UPDATE search_parameters SET body = $3, resource_id = $4 \
                 WHERE tenant = $1 AND url = $2",
                )
                .bind(tenant)
                .bind(&def.url)
                .bind(body)
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
            } else {
                let mut count =
                    D::sql("SELECT COUNT(*) FROM resources WHERE NOT deleted AND tenant = ");
                count.push_bind(tenant.to_owned());
                push_base_types(&mut count, "resource_type", def);
                let total: i64 = count.fetch_one(&mut *conn).await?.get(0)?;
                D::sql(
                "INSERT INTO search_parameters (tenant, url, code, resource_id, body, state, \
                 pos_type, pos_id, processed, total) VALUES ($1, $2, $3, $4, $5, $6, '', '', 0, $7) \
                 ON CONFLICT (tenant, url) DO UPDATE SET code = excluded.code, \
                 resource_id = excluded.resource_id, body = excluded.body, state = excluded.state, \
                 pos_type = '', pos_id = '', processed = 0, total = excluded.total",
            )
            .bind(tenant)
            .bind(&def.url)
            .bind(&def.code)
            .bind(id.as_str())
            .bind(body)
            .bind(crate::STATE_REINDEXING)
            .bind(total)
            .execute(&mut *conn).await?;
                changed = true;
            }
        }
        if changed {
            Self::bump_param_generation(conn, tenant).await?;
        }
        Ok(())
    }

    /// What the `tenant` column of `tenant`'s search-index rows holds: its key where the
    /// dialect keeps one (given now if it has none), else its name.
    async fn index_tenant(conn: &mut Conn<D>, tenant: &TenantId) -> Result<String> {
        let Some(ensure) = D::ENSURE_TENANT_KEY else {
            return Ok(tenant.as_str().to_owned());
        };
        D::sql(ensure)
            .bind(tenant.as_str())
            .execute(&mut *conn)
            .await?;
        D::sql("SELECT key FROM tenant_keys WHERE tenant = $1")
            .bind(tenant.as_str())
            .fetch_one(&mut *conn)
            .await?
            .get(0)
    }

    /// Replaces one parameter's index rows for `keys` (in type order) with `new_rows` (per index
    /// table, in `INDEX_TABLES` order, each row tagged with its key's position).
    pub(super) async fn rewrite_param_rows(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        def: &SearchParamDef,
        keys: &[(String, String)],
        new_rows: &[Vec<(usize, Vec<Value>)>; 7],
    ) -> Result<()> {
        let names = [
            &def.code,
            &def.text_param,
            &def.of_type_param,
            &def.identifier_param,
        ];
        let index_tenant = Self::index_tenant(conn, tenant).await?;
        for ((table, cols), rows) in crate::INDEX_TABLES.iter().zip(new_rows) {
            for group in keys.chunk_by(|a, b| a.0 == b.0) {
                let mut delete = D::sql(format!("DELETE FROM {table} WHERE tenant = "));
                delete.push_bind(index_tenant.clone());
                delete.push(" AND resource_type = ");
                delete.push_bind(group[0].0.clone());
                delete.push(" AND id IN (");
                delete.push_bind_list(group.iter().map(|(_, id)| id));
                delete.push(") AND param IN (");
                delete.push_bind_list(names);
                delete.push(")");
                delete.execute(&mut *conn).await?;
            }
            let columns: Vec<&str> = cols.iter().map(|c| c.0).collect();
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let mut insert = D::sql(format!(
                    "{} {table} (tenant, resource_type, id, {}) ",
                    D::INSERT_INDEX_ROWS,
                    columns.join(", ")
                ));
                insert.push_values(chunk.iter().map(|(k, values)| {
                    let (rt, id) = &keys[*k];
                    let mut row: Vec<search::Bind> =
                        vec![index_tenant.as_str().into(), rt.into(), id.into()];
                    for ((_, ty), v) in cols.iter().zip(values) {
                        row.push(match ty {
                            crate::Col::Text => v.as_str().unwrap_or_default().into(),
                            crate::Col::Int => v.as_i64().unwrap_or_default().into(),
                            crate::Col::Real => v.as_f64().unwrap_or_default().into(),
                        });
                    }
                    row
                }));
                insert.execute(&mut *conn).await?;
            }
        }
        // Date rows are the third table: (param, low, high) per row, grouped by resource.
        let dates = &new_rows[2];
        let mut flagged: Vec<String> = Vec::new();
        for (k, (rt, _)) in keys.iter().enumerate() {
            let rows = dates.iter().filter(|(at, _)| *at == k).map(|(_, v)| {
                let col = |i: usize| v.get(i).and_then(Value::as_i64).unwrap_or_default();
                (
                    v.first().and_then(Value::as_str).unwrap_or_default(),
                    col(1),
                    col(2),
                )
            });
            for param in super::write::dates_with_many_rows(rows) {
                let key = format!("{rt}|{param}");
                if !flagged.contains(&key) {
                    Self::flag_multi_dates(conn, tenant, rt, &[param]).await?;
                    flagged.push(key);
                }
            }
        }
        Ok(())
    }
}
