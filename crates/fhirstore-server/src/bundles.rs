//! The Bundles the API returns: `searchset`, `history`, and `batch`/`transaction` responses.

use axum::http::StatusCode;
use fhirstore_core::{HistoryPage, OpOutcome, WriteKind};
use fhirstore_core::{SearchQuery, StoredResource};
use serde_json::{json, Value};

use crate::outcome::{status_line, ApiResult};
use crate::rest::{etag, shape, wants_resource, Req};

fn now() -> String {
    fhirstore_core::format_instant(chrono::Utc::now())
}

fn bundle(kind: &str) -> Value {
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::now_v7().to_string(),
        "meta": {"lastUpdated": now()},
        "type": kind,
    })
}

/// `{base}/Type/id`.
fn full_url(base: &str, r: &StoredResource) -> String {
    format!("{base}/{}/{}", r.key.resource_type, r.key.id)
}

/// The link for these query pairs, with `_cursor` replaced by `cursor` when given.
fn link(path: &str, pairs: &[(String, String)], cursor: Option<&str>) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if cursor.is_none() || k != "_cursor" {
            s.append_pair(k, v);
        }
    }
    if let Some(c) = cursor {
        s.append_pair("_cursor", c);
    }
    let q = s.finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

/// A `searchset`: matches, then included resources, then an `OperationOutcome` naming any
/// parameter that was ignored, and saying when the backend that answered had not caught up
/// (`routed.behind`). The `self` link leaves ignored parameters out, as R4 asks; the `next`
/// link carries the store's cursor, which stays valid while data changes. `path` is what
/// followed the base in the request (`Patient`, `Patient/p1/Observation`, or nothing).
pub fn searchset(
    base: &str,
    path: &str,
    query: &str,
    q: &SearchQuery,
    routed: &fhirstore_sync::Routed,
) -> Value {
    let page = &routed.page;
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .filter(|(k, _)| !q.ignored.iter().any(|i| i == k))
        .collect();
    let path = if path.is_empty() {
        base.to_owned()
    } else {
        format!("{base}/{path}")
    };
    let mut b = bundle("searchset");
    let total = page.total.or_else(|| {
        // One page holding everything: the total is known for free.
        (q.cursor.is_none() && page.next_cursor.is_none()).then_some(page.matches.len() as u64)
    });
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    let mut links = vec![json!({"relation": "self", "url": link(&path, &pairs, None)})];
    if let Some(next) = &page.next_cursor {
        links.push(json!({"relation": "next", "url": link(&path, &pairs, Some(next))}));
    }
    b["link"] = Value::Array(links);
    let mut entries = Vec::new();
    for (list, mode) in [(&page.matches, "match"), (&page.included, "include")] {
        for r in list {
            entries.push(json!({
                "fullUrl": full_url(base, r),
                "resource": shape(&r.content, q.summary, &q.elements),
                "search": {"mode": mode},
            }));
        }
    }
    let mut issues = Vec::new();
    if !q.ignored.is_empty() {
        issues.push(json!({"severity": "warning", "code": "not-supported",
            "diagnostics": format!("ignored search parameters: {}", q.ignored.join(", "))}));
    }
    if routed.behind {
        issues.push(json!({"severity": "warning", "code": "incomplete",
        "diagnostics": format!(
            "answered by {}, which had not yet applied every change committed before this \
             search; the most recent writes may be missing",
            routed.backend
        )}));
    }
    if !issues.is_empty() {
        entries.push(json!({
            "resource": {"resourceType": "OperationOutcome", "issue": issues},
            "search": {"mode": "outcome"},
        }));
    }
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

/// A `history` Bundle, newest first, each entry with the request that made the version.
pub(crate) fn history(req: &Req<'_>, path: &str, page: &HistoryPage) -> Value {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(req.query.as_bytes())
        .into_owned()
        .collect();
    let path = format!("{}/{path}", req.base);
    let mut b = bundle("history");
    let mut links = vec![json!({"relation": "self", "url": link(&path, &pairs, None)})];
    if let Some(next) = &page.next_cursor {
        links.push(json!({"relation": "next", "url": link(&path, &pairs, Some(next))}));
    }
    b["link"] = Value::Array(links);
    let entries: Vec<Value> = page
        .entries
        .iter()
        .map(|r| {
            let (method, url, status) = if r.deleted {
                (
                    "DELETE",
                    format!("{}/{}", r.key.resource_type, r.key.id),
                    "204 No Content",
                )
            } else if r.version.get() == 1 {
                ("POST", r.key.resource_type.to_string(), "201 Created")
            } else {
                (
                    "PUT",
                    format!("{}/{}", r.key.resource_type, r.key.id),
                    "200 OK",
                )
            };
            let mut e = json!({
                "fullUrl": full_url(&req.base, r),
                "request": {"method": method, "url": url},
                "response": {
                    "status": status,
                    "etag": etag(r.version),
                    "lastModified": fhirstore_core::format_instant(r.last_updated),
                },
            });
            if !r.deleted {
                e["resource"] = r.content.clone();
            }
            e
        })
        .collect();
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

/// The response entry of one applied write.
pub(crate) fn response_entry(req: &Req<'_>, o: &OpOutcome) -> Value {
    match o {
        OpOutcome::Written(w) => {
            let r = &w.resource;
            let status = match w.kind {
                WriteKind::Created => StatusCode::CREATED,
                WriteKind::Updated | WriteKind::Unchanged => StatusCode::OK,
            };
            let mut e = json!({
                "fullUrl": full_url(&req.base, r),
                "response": {
                    "status": status_line(status),
                    "location": format!("{}/{}/_history/{}", r.key.resource_type, r.key.id, r.version),
                    "etag": etag(r.version),
                    "lastModified": fhirstore_core::format_instant(r.last_updated),
                },
            });
            if wants_resource(req) {
                e["resource"] = r.content.clone();
            }
            e
        }
        OpOutcome::Deleted(d) => {
            let mut response = json!({"status": status_line(StatusCode::NO_CONTENT)});
            if let [(_, v)] = d.deleted.as_slice() {
                response["etag"] = json!(etag(*v));
            }
            json!({"response": response})
        }
    }
}

/// A `batch-response` or `transaction-response`: one entry per request entry, in order; a
/// failed batch entry carries its status and `OperationOutcome`.
pub(crate) fn response_bundle(kind: &str, entries: Vec<ApiResult<Value>>) -> Value {
    let mut b = bundle(kind);
    b["entry"] = entries
        .into_iter()
        .map(|e| match e {
            Ok(v) => v,
            Err(err) => {
                json!({"response": {"status": err.status_line(), "outcome": err.outcome()}})
            }
        })
        .collect();
    b
}
