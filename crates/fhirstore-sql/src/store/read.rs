//! Reads: the current and older versions of a resource, history, search pages and counts.

use super::*;
use crate::{parse_history_cursor, search_cursor};
use fhirstore_core::search::TotalMode;
use fhirstore_core::HistoryScope;

impl<D: Dialect> Store<D> {
    /// Keys of live resources matching `query`, at most `limit`, in key order.
    pub(super) async fn find_keys(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        query: &SearchQuery,
        limit: usize,
    ) -> Result<Vec<ResourceKey>> {
        let sql = search::keys(D::SYNTAX, tenant, query, limit, now_micros())?;
        let rows = sql.fetch_all(&mut *conn).await?;
        rows.into_iter()
            .map(|mut row| {
                let rt: String = row.get(0)?;
                key_from_row(&rt, row.get(1)?)
            })
            .collect()
    }

    pub(super) async fn read_current(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        rt: ResourceType,
        id: &LogicalId,
    ) -> Result<StoredResource> {
        let mut row = D::sql(
            "SELECT version, last_updated, deleted, body FROM resource_versions \
         WHERE tenant = $1 AND resource_type = $2 AND id = $3 ORDER BY version DESC LIMIT 1",
        )
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{rt}/{id}")))?;
        let r = stored(
            tenant,
            ResourceKey::new(rt, id.clone()),
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
        )?;
        if r.deleted {
            return Err(Error::Gone(format!(
                "{rt}/{id} was deleted in version {}",
                r.version
            )));
        }
        Ok(r)
    }
}

impl<D: Dialect> Store<D> {
    /// The planner's estimate of the number of matches, where the dialect has one.
    async fn estimate_matches(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        query: &SearchQuery,
        now: i64,
    ) -> Result<Option<u64>> {
        let Some(explain) = D::ESTIMATE_PREFIX else {
            return Ok(None);
        };
        let sql = search::estimate(D::SYNTAX, explain, tenant, query, now)?;
        let mut row = sql.fetch_one(&mut *conn).await?;
        Ok(D::plan_rows(&mut row))
    }

    async fn count_matches(
        conn: &mut Conn<D>,
        tenant: &TenantId,
        query: &SearchQuery,
        now: i64,
    ) -> Result<u64> {
        let sql = search::count(D::SYNTAX, tenant, query, now)?;
        let n: i64 = sql.fetch_one(&mut *conn).await?.get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Runs `work` on a connection of the search pool within `SqlConfig::search_timeout`
    /// (waiting for the connection included). Past the limit, or when the caller drops the
    /// returned future, the statement running is stopped (see [`Dialect::arm_search`]).
    pub(super) async fn bounded_search<T>(
        &self,
        work: impl AsyncFnOnce(&mut Conn<D>) -> Result<T>,
    ) -> Result<T> {
        let limit = self.config.search_timeout;
        let deadline = std::time::Instant::now() + limit;
        let timed_out = || {
            Error::TooCostly(format!(
                "search_timeout: the search did not finish within {limit:?}; narrow it \
                 (more selective criteria, fewer OR values, chains or includes)"
            ))
        };
        let run = async {
            let mut held = self.searcher.acquire(deadline).await?;
            // A connection that came free only after the deadline is not used to start a
            // statement that would run on after the caller has been told the search failed.
            if held.due() {
                return Err(timed_out());
            }
            let result = work(held.conn()?).await;
            // After a backend error the connection may be broken: sqlx checks it, not us.
            if !matches!(result, Err(Error::Backend { .. })) {
                held.finish();
            }
            result
        };
        match tokio::time::timeout_at(deadline.into(), run).await {
            Err(_) => Err(timed_out()),
            Ok(Err(Error::TooCostly(m))) if m == crate::STATEMENT_CANCELLED => Err(timed_out()),
            Ok(result) => result,
        }
    }

    /// The number of live resources matching `query`.
    pub(super) async fn count_bounded(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
    ) -> Result<u64> {
        let now = now_micros();
        self.bounded_search(async |conn| Self::count_matches(conn, tenant, query, now).await)
            .await
    }

    /// Version `version` of `rt/id`, a tombstone included.
    pub(super) async fn read_version(
        &self,
        tenant: &TenantId,
        rt: ResourceType,
        id: &LogicalId,
        version: VersionId,
    ) -> Result<StoredResource> {
        let mut row = D::sql(
            "SELECT last_updated, deleted, body FROM resource_versions \
             WHERE tenant = $1 AND resource_type = $2 AND id = $3 AND version = $4",
        )
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .bind(id.as_str())
        .bind(as_i64(version))
        .fetch_optional(&mut *self.read_conn().await?)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{rt}/{id}/_history/{version}")))?;
        stored(
            tenant,
            ResourceKey::new(rt, id.clone()),
            as_i64(version),
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
        )
    }

    /// One page of history, newest first.
    pub(super) async fn history_page(
        &self,
        tenant: &TenantId,
        request: &HistoryRequest,
    ) -> Result<HistoryPage> {
        let page = request
            .count
            .unwrap_or(fhirstore_core::search::DEFAULT_PAGE_SIZE)
            .min(fhirstore_core::search::MAX_PAGE_SIZE);
        let mut qb = D::sql(
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
        let rows = qb.fetch_all(&mut *self.read_conn().await?).await?;
        let more = rows.len() > page as usize;
        let mut entries = Vec::with_capacity(rows.len().min(page as usize));
        let mut last_seq = 0i64;
        for mut row in rows.into_iter().take(page as usize) {
            let rt: String = row.get(0)?;
            let key = key_from_row(&rt, row.get(1)?)?;
            last_seq = row.get(3)?;
            entries.push(stored(
                tenant,
                key,
                row.get(2)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
            )?);
        }
        Ok(HistoryPage {
            entries,
            next_cursor: more.then(|| last_seq.to_string()),
        })
    }

    /// One page of matches, with what they include and the total asked for.
    pub(super) async fn search_page(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
    ) -> Result<SearchPage> {
        self.bounded_search(async |conn| self.page_on(conn, tenant, query).await)
            .await
    }

    /// How this page's criteria meet the resources (see [`search::Strategy`]): from each index
    /// criterion's entries, counted up to the threshold `SqlConfig::selective_below` describes,
    /// in one statement.
    async fn strategy(
        &self,
        conn: &mut Conn<D>,
        tenant: &TenantId,
        query: &SearchQuery,
        now: i64,
    ) -> Result<search::Strategy> {
        let floor = self.config.selective_below;
        let cap = match (floor, query.resource_type) {
            (0 | u32::MAX, _) | (_, None) => floor,
            (_, Some(rt)) => {
                let resources = self.type_size(conn, tenant, rt).await?;
                let page = f64::from(query.page_size()) + 1.0;
                // Saturating: the float is finite and non-negative.
                let even = (4.0 * page * resources as f64).sqrt().ceil() as u32;
                even.max(floor)
            }
        };
        // Index criteria and chains, then date ranges after them (tagged from `ranges_from`),
        // counted in one statement. Sets counted within `SizeCache::FRESH` are not counted again (see
        // `CountCache`): counts only steer the plan.
        let mut sets = search::index_sets(D::SYNTAX, tenant, query, now)?;
        sets.extend(search::chain_sets(D::SYNTAX, tenant, query, now)?);
        let ranges_from = query.criteria.len();
        sets.extend(
            search::range_sets(D::SYNTAX, tenant, query, now)?
                .into_iter()
                .enumerate()
                .map(|(k, (_, set))| (ranges_from + k, set)),
        );
        let mut counts = Vec::new();
        let mut uncounted = Vec::new();
        let mut keys = HashMap::new();
        for (i, set) in sets {
            let key = crate::CountCache::key(&set);
            match self.counts.get(tenant.as_str(), &key, cap) {
                Some(n) => counts.push((i, n)),
                None => {
                    keys.insert(i, key);
                    uncounted.push((i, set));
                }
            }
        }
        if let Some((sql, which)) = search::count_sets(D::SYNTAX, uncounted, cap)? {
            let mut row = sql.fetch_one(&mut *conn).await?;
            for (col, i) in which.into_iter().enumerate() {
                let n: i64 = row.get(col)?;
                let n = u64::try_from(n).unwrap_or(0);
                if let Some(key) = keys.remove(&i) {
                    self.counts.put(tenant.as_str(), key, cap, n);
                }
                counts.push((i, n));
            }
        }
        counts.sort_unstable();
        let (criteria, ranges): (Vec<_>, Vec<_>) =
            counts.into_iter().partition(|&(i, _)| i < ranges_from);
        let ranges: Vec<(usize, u64)> = ranges
            .into_iter()
            .map(|(i, n)| (i - ranges_from, n))
            .collect();
        Ok(search::choose(query, &criteria, &ranges, cap))
    }

    /// The live resources of `rt` in the tenant, counted at most every `SizeCache::FRESH`.
    async fn type_size(
        &self,
        conn: &mut Conn<D>,
        tenant: &TenantId,
        rt: ResourceType,
    ) -> Result<u64> {
        if let Some(n) = self.sizes.get(tenant.as_str(), rt.as_str()) {
            return Ok(n);
        }
        let n: i64 = D::sql(
            "SELECT COUNT(*) FROM resources WHERE tenant = $1 AND resource_type = $2 \
             AND NOT deleted",
        )
        .bind(tenant.as_str())
        .bind(rt.as_str())
        .fetch_one(&mut *conn)
        .await?
        .get(0)?;
        let n = u64::try_from(n).unwrap_or(0);
        self.sizes.put(tenant.as_str(), rt.as_str(), n);
        Ok(n)
    }

    async fn page_on(
        &self,
        conn: &mut Conn<D>,
        tenant: &TenantId,
        query: &SearchQuery,
    ) -> Result<SearchPage> {
        let now = now_micros();
        let page = query.page_size();
        if query.summary == Some(fhirstore_core::search::Summary::Count) {
            return Ok(SearchPage {
                matches: Vec::new(),
                included: Vec::new(),
                total: Some(Self::count_matches(conn, tenant, query, now).await?),
                next_cursor: None,
            });
        }
        if query.sort.iter().any(|k| k.param == "_score") {
            return Err(Error::Unsupported(
                "_sort=_score needs a full-text criterion, which the SQL primary does not answer"
                    .to_owned(),
            ));
        }
        let strategy = self.strategy(conn, tenant, query, now).await?;
        let plan = search::page(D::SYNTAX, tenant, query, now, strategy)?;
        let mut rows = match plan.sql {
            Some(sql) => sql.fetch_all(&mut *conn).await?,
            None => Vec::new(),
        };
        if let Some(after) = &plan.then_missing {
            // The walk ran out of resources with a value before the page was full.
            let want = page as usize + 1;
            if rows.len() < want {
                let missing = search::missing_page(
                    D::SYNTAX,
                    tenant,
                    query,
                    now,
                    after.as_ref(),
                    want - rows.len(),
                )?;
                rows.extend(missing.fetch_all(&mut *conn).await?);
            }
        }
        let keys = plan.keys;
        let more = rows.len() > page as usize;
        let mut matches = Vec::with_capacity(rows.len().min(page as usize));
        let mut last_keys = Vec::new();
        for mut row in rows.into_iter().take(page as usize) {
            last_keys = keys
                .iter()
                .enumerate()
                .map(|(i, k)| read_key(k.kind, &mut row, 5 + i))
                .collect::<Result<Vec<_>>>()?;
            let rt: String = row.get(0)?;
            let key = key_from_row(&rt, row.get(1)?)?;
            matches.push(stored(
                tenant,
                key,
                row.get(2)?,
                row.get(3)?,
                false,
                row.get(4)?,
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
        let included = Self::resolve_includes(conn, tenant, query, &matches).await?;
        let total = match query.total {
            TotalMode::None => None,
            // The first page holds every match: its length is the total, with no second query.
            _ if query.cursor.is_none() && next_cursor.is_none() => Some(matches.len() as u64),
            TotalMode::Estimate => Some(
                match Self::estimate_matches(conn, tenant, query, now).await? {
                    Some(n) if n >= ESTIMATE_TRUSTED_FROM => n,
                    _ => Self::count_matches(conn, tenant, query, now).await?,
                },
            ),
            TotalMode::Accurate => Some(Self::count_matches(conn, tenant, query, now).await?),
        };
        Ok(SearchPage {
            matches,
            included,
            total,
            next_cursor,
        })
    }
}
