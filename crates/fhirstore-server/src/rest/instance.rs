//! Interactions on one resource: read, vread, update, delete, patch, and Binary in its
//! own media type.

use super::*;

pub(super) fn if_match(req: &Req<'_>) -> ApiResult<Option<VersionId>> {
    req.header(header::IF_MATCH)
        .map(|t| VersionId::from_etag(t).map_err(|e| ApiError::bad_request(e.to_string())))
        .transpose()
}

pub(super) async fn update(
    req: &Req<'_>,
    rt: ResourceType,
    id: LogicalId,
    body: Body,
) -> ApiResult {
    let resource = match native_binary(req, rt, body).await? {
        Native::Resource(mut r) => {
            r["id"] = json!(id.as_str());
            r
        }
        Native::Fhir(body) => resource_body(req, rt, body).await?,
    };
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id.as_str() => {}
        Some(body_id) => {
            return Err(ApiError::bad_request(format!(
                "the body's id {body_id:?} is not the URL's {id:?}"
            )))
        }
        None => return Err(ApiError::bad_request("an update's body must carry its id")),
    }
    let w = req
        .app
        .store
        .storage()
        .update(&req.ctx, rt, &id, resource, if_match(req)?)
        .await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(req.written(&w))
}

pub(super) fn deleted_response(req: &Req<'_>, d: &fhirstore_core::Deleted) -> Response {
    let mut resp = match req.ret {
        Return::Outcome => req.json(
            StatusCode::OK,
            &operation_outcome(
                "information",
                "informational",
                &format!("{} resource(s) deleted", d.deleted.len()),
            ),
        ),
        _ => StatusCode::NO_CONTENT.into_response(),
    };
    if let [(_, v)] = d.deleted.as_slice() {
        if let Ok(v) = HeaderValue::from_str(&etag(*v)) {
            resp.headers_mut().insert(header::ETAG, v);
        }
    }
    resp
}

pub(super) async fn delete(req: &Req<'_>, rt: ResourceType, id: &LogicalId) -> ApiResult {
    let d = req.app.store.storage().delete(&req.ctx, rt, id).await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(deleted_response(req, &d))
}

/// JSON Patch (RFC 6902) against the current version, written with that version as the
/// `If-Match`, so a concurrent write makes the patch fail (412) instead of being lost.
pub(super) async fn patch(req: &Req<'_>, rt: ResourceType, id: LogicalId, body: Body) -> ApiResult {
    let media = req
        .header(header::CONTENT_TYPE)
        .and_then(|c| c.split(';').next())
        .map(str::trim);
    if media != Some("application/json-patch+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "PATCH takes a JSON Patch (application/json-patch+json)",
        ));
    }
    let bytes = body_bytes(req, body).await?;
    let ops: json_patch::Patch = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("not a JSON Patch document: {e}")))?;
    let storage = req.app.store.storage();
    let current = storage.read(&req.ctx, rt, &id).await?;
    if let Some(v) = if_match(req)? {
        if v != current.version {
            return Err(Error::VersionConflict {
                key: format!("{rt}/{id}"),
                expected: v.get(),
                current: current.version.get(),
            }
            .into());
        }
    }
    let mut doc = current.content.clone();
    json_patch::patch(&mut doc, &ops).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            format!("the patch does not apply: {e}"),
        )
    })?;
    if doc.get("resourceType") != current.content.get("resourceType")
        || doc.get("id") != current.content.get("id")
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "a patch may not change resourceType or id",
        ));
    }
    crate::subscriptions::rest::admit(req, &mut doc).await?;
    let w = storage
        .update(&req.ctx, rt, &id, doc, Some(current.version))
        .await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(req.written(&w))
}

pub(super) async fn read(req: &Req<'_>, rt: ResourceType, id: &LogicalId) -> ApiResult {
    let r = req.app.store.storage().read(&req.ctx, rt, id).await?;
    if not_modified(req, &r) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        set_version_headers(resp.headers_mut(), &r);
        return Ok(resp);
    }
    if req.native && rt.as_str() == "Binary" {
        return binary_content(&r);
    }
    let (summary, elements) = shaping(&req.query)?;
    // The common read asks for the whole resource: serialise it as stored, without a copy.
    let mut resp = if summary.is_none() && elements.is_empty() {
        req.json(StatusCode::OK, &r.content)
    } else {
        req.json(StatusCode::OK, &shape(&r.content, summary, &elements))
    };
    set_version_headers(resp.headers_mut(), &r);
    Ok(resp)
}

pub(super) async fn vread(req: &Req<'_>, rt: ResourceType, id: &LogicalId, v: &str) -> ApiResult {
    let version = v
        .parse::<u64>()
        .ok()
        .and_then(VersionId::new)
        .ok_or_else(|| ApiError::not_found(format!("{v:?} is not a version number")))?;
    let r = req
        .app
        .store
        .storage()
        .vread(&req.ctx, rt, id, version)
        .await?;
    if r.deleted {
        let mut resp = ApiError::new(
            StatusCode::GONE,
            "deleted",
            format!("{rt}/{id} version {version} is a deletion"),
        )
        .into_response();
        set_version_headers(resp.headers_mut(), &r);
        return Ok(resp);
    }
    let mut resp = req.json(StatusCode::OK, &r.content);
    set_version_headers(resp.headers_mut(), &r);
    Ok(resp)
}

/// A request body for a Binary in its own media type, or any other body as it came.
pub(super) enum Native {
    Resource(Value),
    Fhir(Body),
}

/// R4 binary.html: a Binary may be written in its native content type (`POST Binary` with
/// `Content-Type: application/pdf`); it is stored as a Binary resource holding the bytes.
pub(super) async fn native_binary(
    req: &Req<'_>,
    rt: ResourceType,
    body: Body,
) -> ApiResult<Native> {
    let media = req
        .header(header::CONTENT_TYPE)
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    let fhir = matches!(
        media,
        "" | "application/fhir+json" | "application/json" | "application/json+fhir" | "text/json"
    );
    if rt.as_str() != "Binary" || fhir {
        return Ok(Native::Fhir(body));
    }
    use base64::Engine as _;
    let bytes = body_bytes(req, body).await?;
    Ok(Native::Resource(json!({
        "resourceType": "Binary",
        "contentType": media,
        "data": base64::engine::general_purpose::STANDARD.encode(&bytes),
    })))
}

/// A Binary's content in its own media type.
pub(super) fn binary_content(r: &StoredResource) -> ApiResult {
    use base64::Engine as _;
    let content_type = r.content["contentType"]
        .as_str()
        .unwrap_or("application/octet-stream");
    let data = base64::engine::general_purpose::STANDARD
        .decode(r.content["data"].as_str().unwrap_or(""))
        .map_err(|e| {
            ApiError::from(fhirstore_core::Error::backend_msg(
                format!("Binary/{} holds data that is not base64: {e}", r.key.id),
                false,
            ))
        })?;
    let mut resp = (StatusCode::OK, data).into_response();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    set_version_headers(resp.headers_mut(), r);
    Ok(resp)
}
