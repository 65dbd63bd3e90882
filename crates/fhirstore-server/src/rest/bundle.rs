//! `batch` and `transaction` Bundles posted to the base.

use super::*;

/// A `batch` or `transaction` Bundle posted to the base.
pub(super) async fn bundle(req: &Req<'_>, body: Body) -> ApiResult {
    let b = json_body(req, body).await?;
    if b.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::bad_request(
            "POST to the base takes a batch or transaction Bundle",
        ));
    }
    let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
    let limits = &req.app.settings.limits;
    let n = b.get("entry").and_then(Value::as_array).map_or(0, Vec::len);
    if n > limits.max_bundle_entries {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            format!(
                "the Bundle has {n} entries, beyond the limit max_bundle_entries = {}; \
                 split it",
                limits.max_bundle_entries
            ),
        ));
    }
    let reg = req.app.store.storage().search_parameters(&req.ctx).await?;
    let storage = req.app.store.storage();
    match kind {
        "transaction" => {
            let (mut ops, reads) = transaction_ops_in(&reg, &b).map_err(bundle_error)?;
            crate::subscriptions::rest::admit_ops(req, &mut ops).await?;
            let types = op_types(&ops);
            let outcomes = if ops.is_empty() {
                Vec::new()
            } else {
                storage
                    .transaction(&req.ctx, ops)
                    .await
                    .map_err(|e| entry_of_write(e, &reads))?
            };
            req.app.after_write(&req.ctx, &types);
            // Reads run after every write (R4's processing order), once the writes are
            // committed: each sees them, and answers in its own entry, as in a batch.
            let all = b.get("entry").and_then(Value::as_array);
            let mut outcomes = outcomes.iter();
            let mut entries = Vec::new();
            let mut budget = ResponseBudget::new(limits.max_response_bytes);
            for (i, e) in all.into_iter().flatten().enumerate() {
                entries.push(if reads.contains(&i) {
                    budget.take(batch_read(req, e).await)
                } else {
                    match outcomes.next() {
                        Some(o) => Ok(bundles::response_entry(req, o)),
                        None => Err(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "exception",
                            "the transaction returned fewer results than entries",
                        )),
                    }
                });
            }
            Ok(req.json(
                StatusCode::OK,
                &bundles::response_bundle("transaction-response", entries),
            ))
        }
        "batch" => {
            // Each entry stands alone: one that cannot be read fails only itself. Reads (GET)
            // run after the writes, the order R4 gives for processing a Bundle.
            let entries = b.get("entry").and_then(Value::as_array);
            let mut parsed = Vec::new();
            for e in entries.into_iter().flatten() {
                parsed.push(if is_read_entry(e) {
                    BatchItem::Read(e)
                } else {
                    let one = json!({"resourceType": "Bundle", "entry": [e]});
                    BatchItem::Write(write_ops_in(&reg, &one).map_err(bundle_error))
                });
            }
            let mut ops = Vec::new();
            for item in &mut parsed {
                if let BatchItem::Write(Ok(o)) = item {
                    if let Err(e) = crate::subscriptions::rest::admit_ops(req, o).await {
                        *item = BatchItem::Write(Err(e));
                        continue;
                    }
                    ops.append(o);
                }
            }
            let types = op_types(&ops);
            let mut results = storage.batch(&req.ctx, ops).await?.into_iter();
            req.app.after_write(&req.ctx, &types);
            let mut entries = Vec::with_capacity(parsed.len());
            // Reads can answer far more than the batch asked with (a search, the
            // CapabilityStatement): once the response reaches its limit, the reads left answer
            // 413 on their own, and the writes, already done, still report.
            let mut budget = ResponseBudget::new(limits.max_response_bytes);
            for item in parsed {
                entries.push(match item {
                    BatchItem::Read(e) => budget.take(batch_read(req, e).await),
                    BatchItem::Write(Err(e)) => Err(e),
                    BatchItem::Write(Ok(_)) => match results.next() {
                        Some(Ok(o)) => Ok(bundles::response_entry(req, &o)),
                        Some(Err(e)) => Err(ApiError::from(e)),
                        None => Err(ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "exception",
                            "the batch returned fewer results than entries",
                        )),
                    },
                });
            }
            Ok(req.json(
                StatusCode::OK,
                &bundles::response_bundle("batch-response", entries),
            ))
        }
        other => Err(ApiError::bad_request(format!(
            "Bundle type {other:?}: POST to the base takes batch or transaction"
        ))),
    }
}

/// What is left of a batch response's byte limit.
pub(super) struct ResponseBudget {
    limit: usize,
    used: usize,
}

impl ResponseBudget {
    fn new(limit: usize) -> Self {
        ResponseBudget { limit, used: 0 }
    }

    /// The read's entry while the response stays within the limit, else a 413 in its place.
    fn take(&mut self, entry: ApiResult<Value>) -> ApiResult<Value> {
        let over = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-long",
                format!(
                    "this read would take the batch response beyond the limit \
                     max_response_bytes = {}; ask for it on its own",
                    self.limit
                ),
            )
        };
        if self.used >= self.limit {
            return Err(over());
        }
        let size = match &entry {
            Ok(v) => serde_json::to_vec(v).map_or(0, |b| b.len()),
            Err(_) => 0,
        };
        if self.used + size > self.limit {
            self.used = self.limit;
            return Err(over());
        }
        self.used += size;
        entry
    }
}

/// One entry of a `batch` Bundle: a read, or what parsing it as a write gave.
pub(super) enum BatchItem<'e> {
    Read(&'e Value),
    Write(ApiResult<Vec<fhirstore_core::WriteOp>>),
}

pub(super) fn is_read_entry(e: &Value) -> bool {
    e.pointer("/request/method")
        .and_then(Value::as_str)
        .is_some_and(|m| m == "GET" || m == "HEAD")
}

/// A `batch` entry's read (read, vread, search, history) through the same dispatcher as a
/// direct request, so it answers exactly what `GET {url}` would: its body becomes the entry's
/// `resource`, its headers the entry's `response`. `ifNoneMatch` and `ifModifiedSince` work as
/// the headers do.
pub(super) async fn batch_read(req: &Req<'_>, e: &Value) -> ApiResult<Value> {
    let request = e.get("request").unwrap_or(&Value::Null);
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("the entry's request has no url"))?;
    let relative = match url.strip_prefix(req.base.as_str()) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') => rest,
        _ if url.contains("://") => {
            return Err(ApiError::bad_request(format!(
                "request url {url:?} is not on this server's base {}",
                req.base
            )))
        }
        _ => url,
    };
    let (path, query) = relative.split_once('?').unwrap_or((relative, ""));
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut headers = HeaderMap::new();
    for (field, name) in [
        ("ifNoneMatch", header::IF_NONE_MATCH),
        ("ifModifiedSince", header::IF_MODIFIED_SINCE),
    ] {
        if let Some(v) = request.get(field).and_then(Value::as_str) {
            let v = HeaderValue::from_str(v)
                .map_err(|_| ApiError::bad_request(format!("request.{field} {v:?}")))?;
            headers.insert(name, v);
        }
    }
    let sub = req.sub_request(&headers, query)?;
    let resp = dispatch_boxed(&sub, &Method::GET, &segs, Body::empty()).await?;
    let status = resp.status();
    let mut response = json!({"status": crate::outcome::status_line(status)});
    for (h, field) in [
        (header::ETAG, "etag"),
        (header::LAST_MODIFIED, "lastModified"),
        (header::LOCATION, "location"),
    ] {
        if let Some(v) = resp.headers().get(h).and_then(|v| v.to_str().ok()) {
            response[field] = json!(v);
        }
    }
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                e.to_string(),
            )
        })?;
    let mut entry = json!({ "response": response });
    if !bytes.is_empty() {
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                e.to_string(),
            )
        })?;
        // An error answered as a response (a vread of a deletion: 410 with version headers)
        // is the entry's outcome, as for an error returned outright.
        if status.is_client_error() || status.is_server_error() {
            entry["response"]["outcome"] = body;
            return Ok(entry);
        }
        if let Some(id) = body.get("id").and_then(Value::as_str) {
            if let Some(t) = body.get("resourceType").and_then(Value::as_str) {
                if t != "Bundle" {
                    entry["fullUrl"] = json!(format!("{}/{t}/{id}", req.base));
                }
            }
        }
        entry["resource"] = body;
    }
    Ok(entry)
}

/// A Bundle that cannot be read as one is a bad request (400), not the resource's fault
/// (422), whichever entry broke it.
pub(super) fn bundle_error(e: Error) -> ApiError {
    let malformed = matches!(e.kind(), Error::InvalidResource(_));
    let mut api = ApiError::from(e);
    if malformed {
        api.status = StatusCode::BAD_REQUEST;
        api.code = "invalid";
    }
    api
}

/// The store numbers a transaction's failing entry among the writes it was given; the client
/// numbers entries in its Bundle, where reads (run after the writes) sit between them.
pub(super) fn entry_of_write(e: Error, reads: &[usize]) -> Error {
    match e {
        Error::InEntry { index, error } => Error::InEntry {
            index: (0..)
                .filter(|i| !reads.contains(i))
                .nth(index)
                .unwrap_or(index),
            error,
        },
        other => other,
    }
}

pub(super) fn op_types(ops: &[fhirstore_core::WriteOp]) -> Vec<ResourceType> {
    use fhirstore_core::WriteOp as W;
    ops.iter()
        .map(|o| match o {
            W::Create { resource_type, .. }
            | W::Update { resource_type, .. }
            | W::ConditionalUpdate { resource_type, .. }
            | W::Delete { resource_type, .. }
            | W::ConditionalDelete { resource_type, .. } => *resource_type,
        })
        .collect()
}

/// Whether a Bundle response entry carries the resource (`Prefer: return=representation`,
/// the default).
pub(crate) fn wants_resource(req: &Req<'_>) -> bool {
    req.ret == Return::Representation
}
