//! Transaction support shared by backends and front ends: `urn:uuid:` reference resolution, and
//! turning a `batch` or `transaction` Bundle's entries into [`WriteOp`]s.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{LogicalId, ResourceType};
use crate::registry::Registry;
use crate::search::{Handling, SearchQuery};
use crate::storage::WriteOp;

/// The write of each entry of a `batch` or `transaction` Bundle, in entry order, from its
/// `request` (R4 http §3.1.0.11): `POST Type` (with `ifNoneExist`), `PUT Type/id`,
/// `PUT Type?criteria`, `DELETE Type/id` and `DELETE Type?criteria`. An entry that cannot be
/// turned into a write fails the whole Bundle with [`Error::InvalidResource`] naming the entry;
/// reads (`GET`) are [`Error::Unsupported`] here.
pub fn write_ops(bundle: &Value) -> Result<Vec<WriteOp>> {
    write_ops_in(Registry::r4(), bundle)
}

/// [`write_ops`], with conditional criteria parsed against `reg` (a tenant's searchable
/// parameters).
pub fn write_ops_in(reg: &Registry, bundle: &Value) -> Result<Vec<WriteOp>> {
    let (ops, reads) = transaction_ops_in(reg, bundle)?;
    if let Some(i) = reads.first() {
        return Err(
            Error::Unsupported("reads inside a Bundle are not supported".into()).in_entry(*i),
        );
    }
    Ok(ops)
}

/// The writes of a `transaction` Bundle, and the indexes of its read entries (`GET`,
/// `HEAD`), which R4 processes after every write.
pub fn transaction_ops_in(reg: &Registry, bundle: &Value) -> Result<(Vec<WriteOp>, Vec<usize>)> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Error::InvalidResource("not a Bundle".into()));
    }
    let entries = bundle.get("entry").and_then(Value::as_array);
    let mut ops = Vec::with_capacity(entries.map_or(0, Vec::len));
    let mut reads = Vec::new();
    // References resolve by fullUrl: two entries with one fullUrl would make every reference
    // to it ambiguous (bundle.html: fullUrl SHALL be unique within a Bundle, versions aside).
    let mut full_urls = HashMap::new();
    // Entries created here, by absolute fullUrl: a relative reference elsewhere in the Bundle
    // that resolves to one of them points at the new resource (bundle.html, resolving
    // references in Bundles).
    let posted: std::collections::HashSet<&str> = entries
        .into_iter()
        .flatten()
        .filter(|e| e.pointer("/request/method").and_then(Value::as_str) == Some("POST"))
        .filter_map(|e| e.get("fullUrl").and_then(Value::as_str))
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .collect();
    for (i, e) in entries.into_iter().flatten().enumerate() {
        if let Some(url) = e.get("fullUrl").and_then(Value::as_str) {
            if let Some(first) = full_urls.insert(url, i) {
                return Err(Error::InvalidResource(format!(
                    "fullUrl {url:?} is also entry {first}'s; each entry needs its own"
                ))
                .in_entry(i));
            }
        }
        let method = e.pointer("/request/method").and_then(Value::as_str);
        if matches!(method, Some("GET" | "HEAD")) {
            reads.push(i);
            continue;
        }
        ops.push(entry_op(reg, e, &posted).map_err(|err| err.in_entry(i))?);
    }
    Ok((ops, reads))
}

fn entry_op(
    reg: &Registry,
    e: &Value,
    posted: &std::collections::HashSet<&str>,
) -> Result<WriteOp> {
    let bad = |what: &str| Error::InvalidResource(what.to_owned());
    let request = e
        .get("request")
        .ok_or_else(|| bad("the entry has no request"))?;
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the entry's request has no url"))?;
    let (path, criteria) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let mut segments = path.trim_matches('/').split('/');
    let resource_type = ResourceType::new(segments.next().unwrap_or(""))?;
    let id = segments.next().map(LogicalId::new).transpose()?;
    if segments.next().is_some() {
        return Err(bad(&format!(
            "request url {url:?}: expected Type, Type/id or Type?query"
        )));
    }
    let search = |q: &str| SearchQuery::parse_in(reg, Some(resource_type), q, Handling::Strict);
    let base = e
        .get("fullUrl")
        .and_then(Value::as_str)
        .and_then(full_url_base);
    let resource = || {
        let mut r = e
            .get("resource")
            .cloned()
            .ok_or_else(|| bad(&format!("{method} {url}: the entry has no resource")))?;
        if let (Some(base), false) = (base, posted.is_empty()) {
            absolute_to_posted(&mut r, base, posted);
        }
        Ok::<_, Error>(r)
    };
    Ok(match (method, id, criteria) {
        ("POST", None, None) => WriteOp::Create {
            resource_type,
            resource: resource()?,
            if_none_exist: request
                .get("ifNoneExist")
                .and_then(Value::as_str)
                .map(|q| search(q.trim_start_matches('?')))
                .transpose()?,
            full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_owned),
        },
        ("PUT", Some(id), None) => WriteOp::Update {
            resource_type,
            id,
            resource: resource()?,
            if_match: request
                .get("ifMatch")
                .and_then(Value::as_str)
                .map(crate::model::VersionId::from_etag)
                .transpose()?,
        },
        ("PUT", None, Some(q)) => WriteOp::ConditionalUpdate {
            resource_type,
            criteria: search(q)?,
            resource: resource()?,
        },
        ("DELETE", Some(id), None) => WriteOp::Delete { resource_type, id },
        ("DELETE", None, Some(q)) => WriteOp::ConditionalDelete {
            resource_type,
            criteria: search(q)?,
        },
        ("GET" | "HEAD", _, _) => {
            return Err(Error::Unsupported(format!(
                "{method} {url}: reads inside a Bundle are not supported"
            )))
        }
        _ => {
            return Err(bad(&format!(
                "{method} {url}: not a write this Bundle can hold"
            )))
        }
    })
}

/// The base of an absolute RESTful fullUrl (`http://x/fhir/Patient/1` → `http://x/fhir/`),
/// which the entry's relative references are relative to.
fn full_url_base(full_url: &str) -> Option<&str> {
    if !(full_url.starts_with("http://") || full_url.starts_with("https://")) {
        return None;
    }
    let path = full_url.split(['?', '#']).next()?;
    let segs: Vec<&str> = path.rsplitn(5, '/').collect();
    // `…/Type/id` or `…/Type/id/_history/v`.
    let type_at = match segs.as_slice() {
        [_, "_history", _, t, _] if ResourceType::new(t).is_ok() => 3,
        [_, t, ..] if ResourceType::new(t).is_ok() => 1,
        _ => return None,
    };
    let tail: usize = segs[..=type_at].iter().map(|s| s.len() + 1).sum();
    path.get(..path.len() + 1 - tail)
}

/// Turns each relative `Type/id` reference of `body` that, against `base`, names an entry
/// the Bundle creates into that entry's absolute fullUrl, which the store then maps to the
/// new resource like any fullUrl.
fn absolute_to_posted(body: &mut Value, base: &str, posted: &std::collections::HashSet<&str>) {
    match body {
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                match v {
                    Value::String(s) if k == "reference" && !s.contains(':') => {
                        let absolute = format!("{base}{s}");
                        if posted.contains(absolute.as_str()) {
                            *s = absolute;
                        }
                    }
                    other => absolute_to_posted(other, base, posted),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| absolute_to_posted(i, base, posted)),
        _ => {}
    }
}

/// Rewrites every `reference` string in `body` that names a key of `map` (a Bundle entry's
/// `fullUrl`, such as `urn:uuid:…`) to the map's value (`Type/id`). Returns how many were
/// rewritten.
pub fn rewrite_references(body: &mut Value, map: &HashMap<String, String>) -> usize {
    if map.is_empty() {
        return 0;
    }
    match body {
        Value::Object(obj) => {
            let mut n = 0;
            for (k, v) in obj.iter_mut() {
                match v {
                    Value::String(s) if k == "reference" => {
                        if let Some(target) = map.get(s.as_str()) {
                            *s = target.clone();
                            n += 1;
                        }
                    }
                    other => n += rewrite_references(other, map),
                }
            }
            n
        }
        Value::Array(items) => items.iter_mut().map(|i| rewrite_references(i, map)).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bundle_entries_become_writes() {
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"},
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:x|1"}},
            {"resource": {"resourceType": "Patient", "id": "a"},
             "request": {"method": "PUT", "url": "Patient/a", "ifMatch": "W/\"3\""}},
            {"resource": {"resourceType": "Patient"},
             "request": {"method": "PUT", "url": "Patient?identifier=urn:x|2"}},
            {"request": {"method": "DELETE", "url": "Patient/b"}},
            {"request": {"method": "DELETE", "url": "Patient?name=x"}}
        ]});
        let ops = write_ops(&b).expect("writes");
        assert!(
            matches!(&ops[0], WriteOp::Create { full_url: Some(u), if_none_exist: Some(_), .. } if u == "urn:uuid:1")
        );
        assert!(
            matches!(&ops[1], WriteOp::Update { id, if_match: Some(v), .. } if id.as_str() == "a" && v.get() == 3)
        );
        assert!(matches!(&ops[2], WriteOp::ConditionalUpdate { .. }));
        assert!(matches!(&ops[3], WriteOp::Delete { id, .. } if id.as_str() == "b"));
        assert!(matches!(&ops[4], WriteOp::ConditionalDelete { .. }));
        for (entry, want) in [
            (
                json!({"request": {"method": "POST", "url": "Nope"}}),
                "entry 0",
            ),
            (
                json!({"request": {"method": "PUT", "url": "Patient/a"}}),
                "no resource",
            ),
            (json!({"resource": {}}), "no request"),
            (
                json!({"request": {"method": "PATCH", "url": "Patient/a"}}),
                "PATCH",
            ),
        ] {
            let e =
                write_ops(&json!({"resourceType": "Bundle", "entry": [entry]})).expect_err(want);
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn a_full_url_names_one_entry() {
        let entry = |u: &str| {
            json!({"fullUrl": u, "resource": {"resourceType": "Patient"},
                   "request": {"method": "POST", "url": "Patient"}})
        };
        let b = json!({"resourceType": "Bundle", "type": "transaction",
            "entry": [entry("urn:uuid:1"), entry("urn:uuid:2"), entry("urn:uuid:1")]});
        let e = write_ops(&b).expect_err("duplicate fullUrl");
        assert!(
            e.to_string().contains("entry 2") && e.to_string().contains("entry 0's"),
            "{e}"
        );
        let b = json!({"resourceType": "Bundle", "type": "transaction",
            "entry": [entry("urn:uuid:1"), entry("urn:uuid:2")]});
        assert_eq!(write_ops(&b).expect("distinct").len(), 2);
    }

    #[test]
    fn nested_references_are_rewritten() {
        let mut body = json!({"resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "urn:uuid:2"}, {"reference": "Practitioner/x"}],
            "note": [{"text": "urn:uuid:1"}]});
        let map = HashMap::from([
            ("urn:uuid:1".to_string(), "Patient/p".to_string()),
            ("urn:uuid:2".to_string(), "Practitioner/q".to_string()),
        ]);
        assert_eq!(rewrite_references(&mut body, &map), 2);
        assert_eq!(body["subject"]["reference"], "Patient/p");
        assert_eq!(body["performer"][0]["reference"], "Practitioner/q");
        assert_eq!(body["performer"][1]["reference"], "Practitioner/x");
        assert_eq!(body["note"][0]["text"], "urn:uuid:1");
    }

    #[test]
    fn relative_references_resolve_against_the_full_url_base() {
        assert_eq!(
            full_url_base("http://example.com/fhir/Patient/0"),
            Some("http://example.com/fhir/")
        );
        assert_eq!(
            full_url_base("https://x.org/Patient/0/_history/2"),
            Some("https://x.org/")
        );
        assert_eq!(full_url_base("urn:uuid:1"), None);
        assert_eq!(full_url_base("http://example.com/fhir/Nope/0"), None);
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "http://example.com/fhir/Patient/0",
             "resource": {"resourceType": "Patient"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "http://example.com/fhir/Observation/0",
             "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/0"},
                          "performer": [{"reference": "Practitioner/9"}]},
             "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": "http://other.org/fhir/Observation/1",
             "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/0"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]});
        let ops = write_ops(&b).expect("writes");
        let subject = |i: usize| match &ops[i] {
            WriteOp::Create { resource, .. } => resource["subject"]["reference"].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(subject(1), "http://example.com/fhir/Patient/0");
        // Another base: Patient/0 there is not the entry created here.
        assert_eq!(subject(2), "Patient/0");
        let WriteOp::Create { resource, .. } = &ops[1] else {
            panic!()
        };
        assert_eq!(resource["performer"][0]["reference"], "Practitioner/9");
    }
}
