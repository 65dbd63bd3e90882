//! `$everything` for Patient and Encounter (R4 `OperationDefinition-Patient-everything`,
//! `Encounter-everything`): the focal resource, every resource in its compartment, and the
//! resources they reference, as a searchset that pages through the whole record.
//!
//! The record is walked one member type at a time, in a fixed order with the focal type
//! first, each type by the store's own keyset cursor; the page cursor is `{type}:{cursor}`,
//! so paging is stable while the record changes and nothing is capped or cut short. Each
//! page carries, as `include` entries, the resources its matches reference (practitioners,
//! medications, organizations, locations, …) that are not matches of that page.

use std::collections::HashSet;

use axum::http::StatusCode;
use fhirstore_core::compartment::{CompartmentScope, Compartments};
use fhirstore_core::search::{Include, Summary};
use fhirstore_core::{
    Error, Handling, LogicalId, ResourceKey, ResourceType, SearchPage, SearchQuery,
};

use crate::outcome::{ApiError, ApiResult};
use crate::rest::Req;

/// The page size when `_count` is not given.
const DEFAULT_COUNT: u32 = 100;

/// `GET|POST [base]/{Patient|Encounter}[/id]/$everything`: the whole record of one focal
/// resource, or of every one of the type when `id` is `None`.
pub(crate) async fn everything(
    req: &Req<'_>,
    owner: ResourceType,
    id: Option<LogicalId>,
) -> ApiResult {
    let storage = req.app.store.storage();
    let mut count = DEFAULT_COUNT;
    let mut since = None;
    let mut types: Option<Vec<ResourceType>> = None;
    let mut cursor = None;
    let mut shaping = SearchQuery::default();
    for (k, v) in form_urlencoded::parse(req.query.as_bytes()) {
        match k.as_ref() {
            "_count" => {
                count = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("_count={v:?} is not a positive integer"))
                    })?
                    .min(fhirstore_core::search::MAX_PAGE_SIZE)
            }
            "_since" => since = Some(v.into_owned()),
            "_type" => {
                types = Some(
                    v.split(',')
                        .filter(|t| !t.is_empty())
                        .map(crate::rest::resource_type)
                        .collect::<ApiResult<_>>()?,
                )
            }
            "_cursor" => cursor = Some(v.into_owned()),
            "_elements" | "_summary" => shaping.add_param(&k, &v, Handling::Strict)?,
            _ if req.handling() == Handling::Strict => {
                return Err(ApiError::bad_request(format!(
                    "$everything does not take the parameter {k:?}"
                )))
            }
            other => shaping.ignored.push(other.to_owned()),
        }
    }
    if let Some(id) = &id {
        // The focal resource must exist (404) and be live (410) for its record to.
        storage.read(&req.ctx, owner, id).await?;
    }
    let compartment = Compartments::r4()
        .get(owner)
        .ok_or_else(|| ApiError::not_found(format!("{owner} has no compartment")))?;
    // The focal type first: the patient leads the record.
    let mut order: Vec<ResourceType> = std::iter::once(owner)
        .chain(compartment.members.keys().copied().filter(|t| *t != owner))
        .collect();
    if let Some(only) = &types {
        order.retain(|t| only.contains(t));
    }
    let (mut at, mut inner) = match &cursor {
        None => (0, None),
        Some(c) => parse_cursor(c, order.len())?,
    };
    let mut matches = Vec::new();
    let mut included = Vec::new();
    while at < order.len() && matches.len() < count as usize {
        let rt = order[at];
        let mut q = SearchQuery::all(Some(rt));
        q.count = Some(count - matches.len() as u32);
        q.cursor = inner.take();
        q.compartment = Some(CompartmentScope::new(owner, id.clone(), Some(&[rt]))?);
        q.includes = vec![Include {
            source: None,
            param: None,
            target: None,
            iterate: false,
        }];
        if let Some(s) = &since {
            q.add_param("_lastUpdated", &format!("ge{s}"), Handling::Strict)
                .map_err(|_| ApiError::bad_request(format!("_since={s:?} is not an instant")))?;
        }
        let page = req
            .app
            .store
            .composite()
            .search_routed(&req.ctx, &q, None)
            .await?
            .page;
        matches.extend(page.matches);
        included.extend(page.included);
        match page.next_cursor {
            Some(next) => inner = Some(next),
            None => at += 1,
        }
    }
    let next_cursor =
        (at < order.len()).then(|| format!("{at}:{}", inner.as_deref().unwrap_or_default()));
    // An included resource that is a match of this page, or included twice, is listed once.
    let mut seen: HashSet<ResourceKey> = matches.iter().map(|r| r.key.clone()).collect();
    included.retain(|r| seen.insert(r.key.clone()));
    shaping.cursor = cursor;
    let routed = fhirstore_sync::Routed {
        page: SearchPage {
            matches,
            included,
            total: None,
            next_cursor,
        },
        backend: fhirstore_sync::PRIMARY.to_owned(),
        behind: false,
        parts: Vec::new(),
    };
    if shaping.summary == Some(Summary::Count) {
        return Err(ApiError::bad_request(
            "$everything returns the record; _summary=count is for searches",
        ));
    }
    let path = match &id {
        Some(id) => format!("{owner}/{id}/$everything"),
        None => format!("{owner}/$everything"),
    };
    let body = crate::bundles::searchset(&req.base, &path, &req.query, &shaping, &routed);
    Ok(req.json(StatusCode::OK, &body))
}

/// `{type index}:{that type's cursor}`, as [`everything`] hands it out.
fn parse_cursor(c: &str, types: usize) -> ApiResult<(usize, Option<String>)> {
    let bad = || ApiError::from(Error::InvalidSearch(format!("invalid paging cursor {c:?}")));
    let (at, inner) = c.split_once(':').ok_or_else(bad)?;
    let at: usize = at.parse().map_err(|_| bad())?;
    if at >= types {
        return Err(bad());
    }
    Ok((at, (!inner.is_empty()).then(|| inner.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_checked() {
        assert_eq!(parse_cursor("3:", 5).ok(), Some((3, None)));
        assert_eq!(
            parse_cursor("1:Observation/o9", 5).ok(),
            Some((1, Some("Observation/o9".to_owned())))
        );
        for bad in ["", "x:1", "9:", "5:", "-1:"] {
            assert!(parse_cursor(bad, 5).is_err(), "{bad}");
        }
    }
}
