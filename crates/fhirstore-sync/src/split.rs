//! Split searches: one query answered by a secondary and the primary together.
//!
//! When no single backend answers a whole query (full text with a chain, an include or a sort
//! by a parameter, say), the criteria only a secondary answers go to it and the rest to the
//! primary, and the two meet on an id set:
//!
//! 1. The secondary lists the ids its criteria match, up to [`SyncConfig::split_bound`]. That
//!    set is usually the smaller one, and listing it is cheap (an index walk, no bodies).
//! 2. When it passes the bound, the primary's side drives instead: the primary lists the ids
//!    its criteria match (up to the bound) and the secondary's criteria are asked within them.
//!    When both sides pass the bound the search is refused (`TooCostly`, naming the bound):
//!    nothing is held in memory beyond it.
//! 3. The primary then answers the query within that id set ([`SearchQuery::among`]): sorts,
//!    paging, `_include`, `_revinclude`, chains, `_has` and totals are its own, so a page
//!    cursor is the primary's keyset cursor and paging stays stable under writes.
//! 4. With `_sort=_score` the secondary's order is kept: the primary filters the ranked ids,
//!    and a page is a slice of that order (the cursor carries its offset, as the secondary's
//!    own relevance paging does).
//!
//! Each part sees every write that returned before the search began: the secondary is
//! admitted exactly as for a search it answers alone (its cursor must reach the log's head at
//! request time, within the same bounded wait), and a secondary still behind is reported
//! ([`Routed::behind`]), never mixed in silently.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fhirstore_core::search::{Criterion, SortKey, Summary, TotalMode};
use fhirstore_core::{Error, LogicalId, Result, SearchPage, SearchQuery, TenantContext};

use crate::lane::Lane;
use crate::{CompositeStorage, Fit, RoutePart, Routed, PRIMARY};

/// How a split search's cursors start, so that a later page is split the same way.
pub(crate) const SPLIT_CURSOR: &str = "split:";

/// The secondary's side of a split, once settled.
struct Side {
    /// The lane that answers it.
    lane: Arc<Lane>,
    /// Whether it had applied every change committed before the search began.
    fit: Fit,
}

impl CompositeStorage {
    /// Answers `query` split between a secondary and the primary, or `None` when no split
    /// applies (every criterion is the primary's, or no available secondary answers the rest).
    pub(crate) async fn split(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        token: Option<i64>,
    ) -> Result<Option<Routed>> {
        let Some(rt) = query.resource_type else {
            return Ok(None);
        };
        let primary_caps = self.shared.primary.capabilities();
        let (theirs, ours): (Vec<Criterion>, Vec<Criterion>) =
            query.criteria.iter().cloned().partition(|c| {
                let alone = SearchQuery {
                    resource_type: Some(rt),
                    criteria: vec![c.clone()],
                    ..SearchQuery::default()
                };
                !primary_caps.can_search(&alone)
            });
        if theirs.is_empty() {
            return Ok(None);
        }
        let by_score = query.sort.iter().any(|k| k.param == "_score");
        if by_score && query.sort.len() > 1 {
            return Err(Error::Unsupported(
                "_sort=_score cannot be combined with other sort keys when full text and other \
                 criteria are answered by different backends: sort by relevance alone, or by \
                 the other keys alone"
                    .to_owned(),
            ));
        }
        let mut secondary = SearchQuery {
            resource_type: Some(rt),
            criteria: theirs,
            sort: if by_score {
                query.sort.clone()
            } else {
                Vec::<SortKey>::new()
            },
            ..SearchQuery::default()
        };
        let primary_side = SearchQuery {
            resource_type: Some(rt),
            criteria: ours,
            compartment: query.compartment.clone(),
            ..SearchQuery::default()
        };
        let bound = self.shared.config.split_bound;
        let mut parts = Vec::new();
        let Some((side, mut ids)) = self
            .secondary_ids(ctx, &secondary, token, bound, &mut parts)
            .await?
        else {
            return Ok(None);
        };
        if ids.len() > bound {
            // The secondary's side is the broad one: the primary's drives.
            let started = Instant::now();
            let theirs = self
                .shared
                .primary
                .search_ids(ctx, &primary_side, bound + 1)
                .await?;
            parts.push(RoutePart::new(
                PRIMARY,
                &primary_side,
                theirs.len(),
                started,
            ));
            if theirs.len() > bound {
                return Err(Error::TooCostly(format!(
                    "split_bound: the full-text criteria and the other criteria each match more \
                     than {bound} resources, beyond the limit split_bound = {bound}; add a more \
                     selective criterion"
                )));
            }
            secondary.among = Some(theirs.into());
            let started = Instant::now();
            ids = side
                .lane
                .secondary
                .search_ids(ctx, &secondary, bound + 1)
                .await?;
            parts.push(RoutePart::new(
                &side.lane.name,
                &secondary,
                ids.len(),
                started,
            ));
        }
        let page = if by_score {
            self.ranked_page(ctx, query, primary_side, ids, &mut parts)
                .await?
        } else {
            let mut within = query.clone();
            within.criteria = primary_side.criteria;
            within.among = Some(ids.into());
            within.cursor = match &query.cursor {
                None => None,
                Some(c) => Some(
                    c.strip_prefix(SPLIT_CURSOR)
                        .ok_or_else(|| Error::InvalidSearch(format!("not a split cursor: {c}")))?
                        .to_owned(),
                ),
            };
            let started = Instant::now();
            let mut page = self.shared.primary.search(ctx, &within).await?;
            parts.push(RoutePart::new(
                PRIMARY,
                &within,
                page.matches.len(),
                started,
            ));
            page.next_cursor = page.next_cursor.map(|c| format!("{SPLIT_CURSOR}{c}"));
            page
        };
        Ok(Some(Routed {
            page,
            backend: format!("{}+{PRIMARY}", side.lane.name),
            behind: side.fit != Fit::Current,
            parts,
        }))
    }

    /// The ids the cheapest available secondary that answers `query` (criteria and sort only)
    /// lists for it, at most `bound + 1`: `None` when none is available.
    async fn secondary_ids(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        token: Option<i64>,
        bound: usize,
        parts: &mut Vec<RoutePart>,
    ) -> Result<Option<(Side, Vec<LogicalId>)>> {
        let mut capable: Vec<_> = self
            .shared
            .lanes
            .iter()
            .filter(|l| {
                let caps = l.secondary.capabilities();
                caps.id_sets && caps.can_search(query)
            })
            .collect();
        capable.sort_by_key(|l| l.config.search_cost);
        let mut head = None;
        for lane in capable {
            let mut fit = self.may_search(lane, &mut head, false).await?;
            if fit == Fit::No {
                continue;
            }
            if let Some(t) = token {
                if !self.wait_for_token(lane, t).await? {
                    fit = Fit::Behind;
                }
            }
            let started = Instant::now();
            match lane.secondary.search_ids(ctx, query, bound + 1).await {
                Ok(ids) => {
                    parts.push(RoutePart::new(&lane.name, query, ids.len(), started));
                    if fit == Fit::Behind {
                        tracing::warn!(secondary = %lane.name,
                            "split search answered in part by a secondary that has not caught up");
                    }
                    let side = Side {
                        lane: Arc::clone(lane),
                        fit,
                    };
                    return Ok(Some((side, ids)));
                }
                Err(Error::Unsupported(why)) => {
                    tracing::debug!(secondary = %lane.name, %why, "cannot list ids");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// A page of `ranked` (the secondary's ids, most relevant first) kept where the primary's
    /// criteria hold, in that order; includes and summary as `query` asks.
    async fn ranked_page(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
        mut primary_side: SearchQuery,
        ranked: Vec<LogicalId>,
        parts: &mut Vec<RoutePart>,
    ) -> Result<SearchPage> {
        let filtered = !primary_side.criteria.is_empty() || primary_side.compartment.is_some();
        let ranked = if filtered {
            let bound = ranked.len();
            primary_side.among = Some(Arc::from(ranked.as_slice()));
            let started = Instant::now();
            let kept = self
                .shared
                .primary
                .search_ids(ctx, &primary_side, bound)
                .await?;
            parts.push(RoutePart::new(PRIMARY, &primary_side, kept.len(), started));
            let kept: std::collections::HashSet<LogicalId> = kept.into_iter().collect();
            ranked.into_iter().filter(|id| kept.contains(id)).collect()
        } else {
            ranked
        };
        let total = ranked.len();
        let count_only = query.summary == Some(Summary::Count);
        let offset = match &query.cursor {
            None => 0,
            Some(c) => c
                .strip_prefix(SPLIT_CURSOR)
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::InvalidSearch(format!("not a split cursor: {c}")))?,
        };
        let size = if count_only {
            0
        } else {
            query.page_size() as usize
        };
        let slice: Vec<LogicalId> = ranked.iter().skip(offset).take(size).cloned().collect();
        let mut page = if slice.is_empty() {
            SearchPage {
                matches: Vec::new(),
                included: Vec::new(),
                total: None,
                next_cursor: None,
            }
        } else {
            let fetch = SearchQuery {
                resource_type: query.resource_type,
                count: Some(query.page_size()),
                summary: query.summary,
                elements: query.elements.clone(),
                includes: query.includes.clone(),
                revincludes: query.revincludes.clone(),
                among: Some(Arc::from(slice.as_slice())),
                ..SearchQuery::default()
            };
            let started = Instant::now();
            let page = self.shared.primary.search(ctx, &fetch).await?;
            parts.push(RoutePart::new(PRIMARY, &fetch, page.matches.len(), started));
            page
        };
        let rank: HashMap<&LogicalId, usize> =
            slice.iter().enumerate().map(|(i, id)| (id, i)).collect();
        page.matches
            .sort_by_key(|m| rank.get(&m.key.id).copied().unwrap_or(usize::MAX));
        let next = offset.saturating_add(size);
        page.next_cursor = (!count_only && next < total).then(|| format!("{SPLIT_CURSOR}{next}"));
        page.total = (count_only || query.total != TotalMode::None).then_some(total as u64);
        Ok(page)
    }
}
