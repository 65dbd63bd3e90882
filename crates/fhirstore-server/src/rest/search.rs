//! Search at every level, compartments, history, and `_summary`/`_elements` shaping.

use super::*;

/// `_summary` and `_elements` from a read's query.
pub(super) fn shaping(query: &str) -> ApiResult<(Option<Summary>, Vec<String>)> {
    let mut q = SearchQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "_summary" || k == "_elements" {
            q.add_param(&k, &v, Handling::Strict)?;
        }
    }
    Ok((q.summary, q.elements))
}

/// Applies `_summary` (`true`, `text`, `data`) and `_elements`, marking a cut-down resource
/// `SUBSETTED` as R4 asks. What `true` and `text` keep comes from the official definitions'
/// `isSummary` flags and mandatory elements ([`fhirstore_core::summary`]).
pub(crate) fn shape(resource: &Value, summary: Option<Summary>, elements: &[String]) -> Value {
    let Some(obj) = resource.as_object() else {
        return resource.clone();
    };
    let keep = |k: &str| matches!(k, "resourceType" | "id" | "meta");
    let rt = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let flags = fhirstore_core::summary::SummaryElements::r4();
    let out: Map<String, Value> = match summary {
        Some(Summary::True) => obj
            .iter()
            .filter(|(k, _)| flags.in_summary(rt, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(Summary::Text) => obj
            .iter()
            .filter(|(k, _)| flags.in_text_summary(rt, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(Summary::Data) => obj
            .iter()
            .filter(|(k, _)| *k != "text")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        _ if !elements.is_empty() => obj
            .iter()
            .filter(|(k, _)| keep(k) || elements.iter().any(|e| e == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        _ => return resource.clone(),
    };
    let mut out = Value::Object(out);
    let tag = json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                     "code": "SUBSETTED"});
    if let Some(meta) = out
        .as_object_mut()
        .map(|o| o.entry("meta").or_insert_with(|| json!({})))
    {
        if let Some(m) = meta.as_object_mut() {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Some(t) = tags.as_array_mut() {
                t.push(tag);
            }
        }
    }
    out
}

/// The response header that reports how a search was answered: each part as
/// `backend[criteria] rows ms`, separated by `; `.
pub const ROUTE_HEADER: &str = "x-search-route";

pub(super) async fn search(req: &Req<'_>, rt: Option<ResourceType>, query: String) -> ApiResult {
    let path = rt.map(|t| t.to_string()).unwrap_or_default();
    // A system search of one `_type` is that type's search, so its own parameters apply
    // (R4 search contexts).
    let single = rt.is_none().then(|| single_type(&query)).flatten();
    search_in(req, rt.or(single), None, &path, query).await
}

/// The one type a query's `_type` names, if it names exactly one.
pub(super) fn single_type(query: &str) -> Option<ResourceType> {
    let mut named = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "_type")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        });
    let first = named.next()?;
    if named.next().is_some() {
        return None;
    }
    ResourceType::new(&first).ok()
}

/// A search, within a compartment when `compartment` names one; `path` is the request's path
/// after the base, for the Bundle's links.
pub(super) async fn search_in(
    req: &Req<'_>,
    rt: Option<ResourceType>,
    compartment: Option<CompartmentScope>,
    path: &str,
    query: String,
) -> ApiResult {
    let reg = req.app.store.storage().search_parameters(&req.ctx).await?;
    let limits = &req.app.settings.limits.search;
    let mut q = SearchQuery::parse_limited(&reg, rt, &query, req.handling, limits)?;
    q.compartment = compartment;
    if q.count == Some(0) {
        // R4: `_count=0` asks for the total alone.
        q.summary = Some(Summary::Count);
    }
    let routed = req
        .app
        .store
        .composite()
        .search_routed(&req.ctx, &q, None)
        .await?;
    let body = bundles::searchset(&req.base, path, &query, &q, &routed);
    let mut response = req.json(StatusCode::OK, &body);
    // Which backend answered which criteria, with id-set sizes and times, so a caller can see
    // why a search is slow; no tenant data beyond counts.
    let route: Vec<String> = routed.parts.iter().map(ToString::to_string).collect();
    if let Ok(v) = HeaderValue::from_str(&route.join("; ")) {
        response.headers_mut().insert(ROUTE_HEADER, v);
    }
    Ok(response)
}

/// `GET [base]/Patient/p1/Observation?…` and `GET [base]/Patient/p1/*?…` (R4 3.1.0.10.1): a
/// search within the compartment of `Patient/p1`.
pub(super) async fn compartment_search(
    req: &Req<'_>,
    owner: ResourceType,
    id: &LogicalId,
    member: &str,
) -> ApiResult {
    let rt = match member {
        "*" => None,
        t => Some(resource_type(t)?),
    };
    let scope = CompartmentScope::new(
        owner,
        Some(id.clone()),
        rt.as_ref().map(std::slice::from_ref),
    )?;
    let path = format!("{owner}/{id}/{member}");
    search_in(req, rt, Some(scope), &path, req.query.clone()).await
}

pub(super) async fn history(req: &Req<'_>, scope: HistoryScope) -> ApiResult {
    let mut h = HistoryRequest::new(scope.clone());
    for (k, v) in form_urlencoded::parse(req.query.as_bytes()) {
        match k.as_ref() {
            "_count" => {
                h.count = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("_count={v:?} is not a non-negative integer"))
                })?)
            }
            "_since" => {
                h.since = Some(fhirstore_core::parse_instant(&v).ok_or_else(|| {
                    ApiError::bad_request(format!("_since={v:?} is not an instant"))
                })?)
            }
            "_cursor" => h.cursor = Some(v.into_owned()),
            _ if req.handling == Handling::Strict => {
                return Err(ApiError::bad_request(format!(
                    "history does not take the parameter {k:?}"
                )))
            }
            _ => {}
        }
    }
    let page = req.app.store.storage().history(&req.ctx, &h).await?;
    let path = match &scope {
        HistoryScope::System => "_history".to_owned(),
        HistoryScope::Type(rt) => format!("{rt}/_history"),
        HistoryScope::Instance(rt, id) => format!("{rt}/{id}/_history"),
    };
    if page.entries.is_empty() {
        if let HistoryScope::Instance(rt, id) = &scope {
            if h.cursor.is_none() && h.since.is_none() {
                return Err(ApiError::not_found(format!("{rt}/{id} has no history")));
            }
        }
    }
    Ok(req.json(StatusCode::OK, &bundles::history(req, &path, &page)))
}
