//! Checking incoming resource bodies and stamping the fields the store owns.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::digest::{canonical_json, content_hash};
use crate::error::{Error, Result};
use crate::model::{format_instant, LogicalId, ResourceType, VersionId};

/// The default cap on one resource's serialised size: 8 MiB.
pub const DEFAULT_MAX_RESOURCE_BYTES: usize = 8 * 1024 * 1024;

/// What the caller claims about the id of a body it sends.
#[derive(Clone, Copy, Debug)]
pub enum IdRule<'a> {
    /// create: the server assigns the id, and any id in the body is ignored (FHIR R4 create).
    Ignore,
    /// update: the body must carry exactly this id (FHIR R4 update: otherwise 400).
    MustEqual(&'a LogicalId),
    /// conditional update: the body may carry an id; if it does, it must be valid.
    Optional,
}

/// Checks a body against the type it is written as. Nothing in the store is touched; a failure
/// names the problem.
pub fn check_body(resource_type: ResourceType, body: &Value, ids: IdRule<'_>) -> Result<()> {
    let obj = body
        .as_object()
        .ok_or_else(|| Error::InvalidResource("a resource must be a JSON object".into()))?;
    match obj.get("resourceType") {
        Some(Value::String(t)) if t == resource_type.as_str() => {}
        Some(Value::String(t)) => {
            return Err(Error::InvalidResource(format!(
                "resourceType {t:?} does not match the type {resource_type} being written"
            )))
        }
        Some(_) => {
            return Err(Error::InvalidResource(
                "resourceType must be a string".into(),
            ))
        }
        None => {
            return Err(Error::InvalidResource(
                "the resource has no resourceType".into(),
            ))
        }
    }
    match (ids, obj.get("id")) {
        (IdRule::Ignore, _) => {}
        (IdRule::MustEqual(want), Some(Value::String(got))) if got == want.as_str() => {}
        (IdRule::MustEqual(want), Some(Value::String(got))) => {
            return Err(Error::InvalidResource(format!(
                "the body's id {got:?} does not match the id {want:?} being updated"
            )))
        }
        (IdRule::MustEqual(want), None) => {
            return Err(Error::InvalidResource(format!(
                "the body has no id; an update of {want:?} must carry the same id"
            )))
        }
        (IdRule::Optional, None) => {}
        (IdRule::Optional, Some(Value::String(got))) => {
            LogicalId::new(got.clone())?;
        }
        (_, Some(_)) => return Err(Error::InvalidResource("id must be a string".into())),
    }
    if let Some(meta) = obj.get("meta") {
        if !meta.is_object() {
            return Err(Error::InvalidResource("meta must be a JSON object".into()));
        }
    }
    if let Some(path) = nul_at(body) {
        return Err(Error::InvalidResource(format!(
            "{path} holds a NUL character, which FHIR strings may not contain"
        )));
    }
    Ok(())
}

/// The JSON path of the first string or key holding U+0000, if any. FHIR strings exclude it,
/// PostgreSQL's text cannot hold it, and a search for it would match every value on SQLite.
pub fn nul_at(v: &Value) -> Option<String> {
    fn walk(v: &Value) -> Option<String> {
        match v {
            Value::String(s) if s.contains('\0') => Some(String::new()),
            Value::Object(o) => o.iter().find_map(|(k, v)| {
                if k.contains('\0') {
                    return Some(format!("/{}", k.escape_debug()));
                }
                walk(v).map(|p| format!("/{k}{p}"))
            }),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v).map(|p| format!("/{i}{p}"))),
            _ => None,
        }
    }
    walk(v).map(|p| if p.is_empty() { "/".to_owned() } else { p })
}

/// A body ready to store: its canonical bytes and their content hash.
#[derive(Clone, Debug)]
pub struct PreparedBody {
    /// The resource with `id` and `meta` stamped.
    pub content: Value,
    /// Canonical JSON of `content`: what is stored, hashed and sent to secondaries.
    pub canonical: Vec<u8>,
    /// blake3 of `canonical`.
    pub hash: [u8; 32],
}

/// Stamps `id`, `meta.versionId` and `meta.lastUpdated`, then serialises canonically and enforces
/// the size limit. The caller's own values for these fields are never trusted.
pub fn prepare_body(
    mut body: Value,
    id: &LogicalId,
    version: VersionId,
    last_updated: DateTime<Utc>,
    max_bytes: usize,
) -> Result<PreparedBody> {
    let obj = body
        .as_object_mut()
        .ok_or_else(|| Error::InvalidResource("a resource must be a JSON object".into()))?;
    obj.insert("id".into(), Value::String(id.as_str().to_owned()));
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| Error::InvalidResource("meta must be a JSON object".into()))?;
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert(
        "lastUpdated".into(),
        Value::String(format_instant(last_updated)),
    );
    let canonical = canonical_json(&body);
    if canonical.len() > max_bytes {
        return Err(Error::TooLarge(format!(
            "the resource is {} bytes; the limit (max_resource_bytes) is {max_bytes}",
            canonical.len()
        )));
    }
    let hash = content_hash(&canonical);
    Ok(PreparedBody {
        content: body,
        canonical,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::from_micros;
    use serde_json::json;

    fn patient() -> ResourceType {
        ResourceType::new("Patient").expect("known")
    }

    #[test]
    fn bodies_are_checked_against_the_call() {
        let id = LogicalId::new("p1").expect("valid");
        let ok = json!({"resourceType": "Patient", "id": "p1"});
        assert!(check_body(patient(), &ok, IdRule::MustEqual(&id)).is_ok());
        assert!(check_body(patient(), &ok, IdRule::Ignore).is_ok());

        let cases = [
            (json!([1, 2]), "JSON object"),
            (
                json!({"resourceType": "Observation", "id": "p1"}),
                "does not match the type",
            ),
            (json!({"id": "p1"}), "no resourceType"),
            (
                json!({"resourceType": "Patient", "id": "p2"}),
                "does not match the id",
            ),
            (json!({"resourceType": "Patient"}), "has no id"),
            (
                json!({"resourceType": "Patient", "id": 5}),
                "id must be a string",
            ),
            (
                json!({"resourceType": "Patient", "id": "p1", "meta": 3}),
                "meta must be",
            ),
        ];
        for (body, want) in cases {
            let err = check_body(patient(), &body, IdRule::MustEqual(&id))
                .expect_err("should be rejected");
            assert!(
                matches!(&err, Error::InvalidResource(m) if m.contains(want)),
                "{body}: got {err}"
            );
        }
        let nul = json!({"resourceType": "Patient", "id": "p1",
            "name": [{"family": "a\u{0}b"}]});
        let err = check_body(patient(), &nul, IdRule::Optional).expect_err("NUL refused");
        assert!(err.to_string().contains("/name/0/family"), "{err}");
        let bad_id = json!({"resourceType": "Patient", "id": "a b"});
        assert!(check_body(patient(), &bad_id, IdRule::Optional).is_err());
    }

    #[test]
    fn store_owned_fields_are_overwritten() {
        let id = LogicalId::new("p1").expect("valid");
        let body = json!({"resourceType": "Patient", "id": "evil",
            "meta": {"versionId": "99", "lastUpdated": "1999-01-01T00:00:00Z", "tag": [{"code": "x"}]}});
        let p = prepare_body(body, &id, VersionId::FIRST.next(), from_micros(0), 1 << 20)
            .expect("prepared");
        assert_eq!(p.content["id"], "p1");
        assert_eq!(p.content["meta"]["versionId"], "2");
        assert_eq!(
            p.content["meta"]["lastUpdated"],
            "1970-01-01T00:00:00.000000Z"
        );
        assert_eq!(p.content["meta"]["tag"][0]["code"], "x");
        assert_eq!(p.hash, content_hash(&p.canonical));
    }

    #[test]
    fn size_limit_is_enforced() {
        let id = LogicalId::new("p1").expect("valid");
        let body = json!({"resourceType": "Patient", "text": {"div": "x".repeat(2000)}});
        let err =
            prepare_body(body, &id, VersionId::FIRST, from_micros(0), 1000).expect_err("too large");
        assert!(matches!(err, Error::TooLarge(m) if m.contains("is 1000")));
    }
}
