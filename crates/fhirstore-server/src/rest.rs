//! The FHIR R4 RESTful API under `/fhir/{tenant}`: one dispatcher reads the path's shape, so
//! unknown paths, unknown types and wrong methods all get an `OperationOutcome`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use fhirstore_core::bundle::{transaction_ops_in, write_ops_in};
use fhirstore_core::compartment::{CompartmentScope, Compartments};
use fhirstore_core::search::Summary;
use fhirstore_core::{
    Error, Handling, HistoryRequest, HistoryScope, LogicalId, ResourceType, SearchQuery,
    StoredResource, TenantContext, VersionId,
};
use fhirstore_core::{WriteKind, Written};
use serde_json::{json, Map, Value};

use crate::bundles;
use crate::outcome::{operation_outcome, ApiError, ApiResult, FHIR_JSON};
use crate::App;

/// Which interaction a response answered, for `/metrics`.
#[derive(Clone, Copy, Debug)]
pub struct Interaction(pub &'static str);

/// `Prefer: return=…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Return {
    Minimal,
    Representation,
    Outcome,
}

/// One request's settled context: the tenant, the base URL and the client's preferences.
pub(crate) struct Req<'a> {
    pub app: &'a App,
    pub ctx: TenantContext,
    /// `http://host/fhir/{tenant}`, without a trailing slash.
    pub base: String,
    /// The request's path after the base (`/Patient/$export`), empty for a batch entry.
    path: String,
    headers: &'a HeaderMap,
    /// The query string, percent-encoded as received, without `_format` and `_pretty`.
    pub query: String,
    pretty: bool,
    ret: Return,
    handling: Handling,
    /// A Binary's own media type was asked for (`Accept` without JSON): a read of it answers
    /// with its content, not the resource (R4 binary.html).
    native: bool,
}

/// Query parameters about the response format rather than the data.
const FORMAT_PARAMS: [&str; 2] = ["_format", "_pretty"];

fn wants_json(v: &str) -> bool {
    v.split(',').any(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        t.is_empty() || t.contains("json") || t == "*/*" || t == "application/*"
    })
}

impl<'a> Req<'a> {
    fn new(
        app: &'a App,
        ctx: TenantContext,
        headers: &'a HeaderMap,
        uri: &Uri,
        tenant: &str,
    ) -> ApiResult<Self> {
        let (query, pretty) = split_format(uri.query().unwrap_or(""))?;
        let binary = uri
            .path()
            .strip_prefix(&format!("/fhir/{tenant}/Binary"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        let mut native = false;
        if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
            if !wants_json(accept) {
                if !binary {
                    return Err(not_acceptable(accept));
                }
                native = true;
            }
        }
        let prefer = headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_ascii_lowercase())
            .collect::<Vec<_>>();
        let ret = if prefer.iter().any(|p| p == "return=minimal") {
            Return::Minimal
        } else if prefer.iter().any(|p| p == "return=operationoutcome") {
            Return::Outcome
        } else {
            Return::Representation
        };
        let handling = if prefer.iter().any(|p| p == "handling=strict") {
            Handling::Strict
        } else {
            Handling::Lenient
        };
        let host = match &app.settings.public_url {
            Some(u) => u.clone(),
            None => {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
                    .unwrap_or_else(|| app.settings.listen.to_string());
                format!("http://{host}")
            }
        };
        let path = uri
            .path()
            .strip_prefix(&format!("/fhir/{tenant}"))
            .unwrap_or("")
            .to_owned();
        Ok(Req {
            app,
            ctx,
            base: format!("{host}/fhir/{tenant}"),
            path,
            headers,
            query,
            pretty,
            ret,
            handling,
            native,
        })
    }

    /// A read made on behalf of a `batch` entry: the same tenant, base and handling, the entry's
    /// own query and conditional headers, and always the full representation, since the entry's
    /// `resource` is its answer whatever the batch asked of its writes.
    fn sub_request<'b>(&'b self, headers: &'b HeaderMap, raw_query: &str) -> ApiResult<Req<'b>> {
        let (query, _) = split_format(raw_query)?;
        Ok(Req {
            app: self.app,
            ctx: self.ctx.clone(),
            base: self.base.clone(),
            path: String::new(),
            headers,
            query,
            pretty: false,
            ret: Return::Representation,
            handling: self.handling,
            native: false,
        })
    }

    fn header(&self, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether a `Prefer` header holds `token` (`respond-async`).
    pub(crate) fn prefers(&self, token: &str) -> bool {
        self.headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case(token))
    }

    /// The request's URL without its query.
    pub(crate) fn url(&self) -> String {
        format!("{}{}", self.base, self.path)
    }

    /// The client's `Prefer: handling`.
    pub(crate) fn handling(&self) -> Handling {
        self.handling
    }

    /// A FHIR JSON response.
    pub fn json(&self, status: StatusCode, body: &Value) -> Response {
        let bytes = if self.pretty {
            serde_json::to_vec_pretty(body)
        } else {
            serde_json::to_vec(body)
        }
        .unwrap_or_default();
        let mut r = (status, bytes).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        r
    }

    /// The response to a write or a read of one version: ETag, Last-Modified, Location when
    /// asked, and the body `Prefer` chose.
    fn resource(&self, status: StatusCode, r: &StoredResource, location: bool) -> Response {
        let mut resp = match self.ret {
            Return::Minimal => status.into_response(),
            Return::Representation => self.json(status, &r.content),
            Return::Outcome => self.json(
                status,
                &operation_outcome(
                    "information",
                    "informational",
                    &format!("{}/{} version {}", r.key.resource_type, r.key.id, r.version),
                ),
            ),
        };
        set_version_headers(resp.headers_mut(), r);
        if location {
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{}/{}/{}/_history/{}",
                self.base, r.key.resource_type, r.key.id, r.version
            )) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
        }
        resp
    }

    fn written(&self, w: &Written) -> Response {
        let status = match w.kind {
            WriteKind::Created => StatusCode::CREATED,
            WriteKind::Updated | WriteKind::Unchanged => StatusCode::OK,
        };
        self.resource(status, &w.resource, true)
    }
}

/// The query without its format parameters (`_format`, `_pretty`), and whether `_pretty=true`
/// was asked; a `_format` other than JSON is a 406.
fn split_format(raw: &str) -> ApiResult<(String, bool)> {
    let mut pretty = false;
    let mut kept = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "_format" if !wants_json(&v) || v.contains("xml") => {
                return Err(not_acceptable(&v));
            }
            "_pretty" => pretty = v == "true",
            _ if FORMAT_PARAMS.contains(&k.as_ref()) => {}
            _ => {
                kept.append_pair(&k, &v);
            }
        }
    }
    Ok((kept.finish(), pretty))
}

fn not_acceptable(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "not-supported",
        format!("{what:?}: this server speaks JSON only (application/fhir+json)"),
    )
}

/// `ETag: W/"n"` and `Last-Modified` for one version.
pub(crate) fn set_version_headers(h: &mut HeaderMap, r: &StoredResource) {
    if let Ok(v) = HeaderValue::from_str(&etag(r.version)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(r.last_updated)) {
        h.insert(header::LAST_MODIFIED, v);
    }
}

/// `W/"n"`.
pub(crate) fn etag(v: VersionId) -> String {
    format!("W/\"{v}\"")
}

/// RFC 9110's IMF-fixdate, the HTTP date form that servers send.
const IMF_FIXDATE: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// An HTTP date (RFC 9110 IMF-fixdate).
pub(crate) fn http_date(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(IMF_FIXDATE)
        .unwrap_or_default()
}

/// An IMF-fixdate, read as UTC. Other (obsolete) forms are `None`, which RFC 9110 lets a
/// server treat as an absent condition.
fn parse_http_date(s: &str) -> Option<time::OffsetDateTime> {
    time::PrimitiveDateTime::parse(s.trim(), IMF_FIXDATE)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// `If-None-Match` names the current version, or `If-Modified-Since` (consulted only without
/// `If-None-Match`, as RFC 9110 orders them) is not older than its last change: the client's
/// copy is current. HTTP dates have whole seconds, so the change time is compared truncated.
fn not_modified(req: &Req<'_>, r: &StoredResource) -> bool {
    if let Some(tag) = req.header(header::IF_NONE_MATCH) {
        return VersionId::from_etag(tag).ok() == Some(r.version);
    }
    req.header(header::IF_MODIFIED_SINCE)
        .and_then(parse_http_date)
        .is_some_and(|since| r.last_updated.unix_timestamp() <= since.unix_timestamp())
}

pub(crate) fn resource_type(name: &str) -> ApiResult<ResourceType> {
    ResourceType::new(name)
        .map_err(|_| ApiError::not_found(format!("{name:?} is not an R4 resource type")))
}

pub(crate) fn logical_id(id: &str) -> ApiResult<LogicalId> {
    LogicalId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn interaction(method: &Method, segs: &[&str], has_query: bool) -> &'static str {
    let m = method.as_str();
    match (m, segs) {
        ("GET", []) => "search-system",
        ("POST", []) => "transaction",
        (_, ["metadata"]) => "capabilities",
        (_, ["_history"]) => "history-system",
        (_, ["_search"]) => "search-system",
        ("GET", [_]) => "search-type",
        ("POST", [_]) => "create",
        ("PUT", [_]) if has_query => "conditional-update",
        ("DELETE", [_]) if has_query => "conditional-delete",
        (_, [_, "_search"]) => "search-type",
        (_, [_, "_history"]) => "history-type",
        ("GET", [_, _]) => "read",
        ("PUT", [_, _]) => "update",
        ("DELETE", [_, _]) => "delete",
        ("PATCH", [_, _]) => "patch",
        (_, [_, _, "_history"]) => "history-instance",
        (_, [_, _, "_history", _]) => "vread",
        _ => "other",
    }
}

/// Every request under `/fhir/{tenant}`.
pub async fn fhir(
    State(app): State<Arc<App>>,
    Path(params): Path<Vec<(String, String)>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tenant = params
        .iter()
        .find(|(k, _)| k == "tenant")
        .map_or("", |(_, v)| v.as_str());
    let rest = params
        .iter()
        .find(|(k, _)| k == "rest")
        .map_or("", |(_, v)| v.as_str());
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let label = interaction(&method, &segs, uri.query().is_some_and(|q| !q.is_empty()));
    let result = async {
        let ctx = app.auth.tenant(&headers, tenant)?;
        let req = Req::new(&app, ctx, &headers, &uri, tenant)?;
        dispatch(&req, &method, &segs, body).await
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(Interaction(label));
    resp
}

fn method_not_allowed(method: &Method, allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        format!("{method} is not allowed here (allowed: {allow})"),
    )
}

/// [`dispatch`] as a boxed future: a `batch` entry's read re-enters the dispatcher, and an
/// async call cycle needs one boxed step.
fn dispatch_boxed<'a>(
    req: &'a Req<'a>,
    method: &'a Method,
    segs: &'a [&'a str],
    body: Body,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApiResult> + Send + 'a>> {
    Box::pin(dispatch(req, method, segs, body))
}

async fn dispatch(req: &Req<'_>, method: &Method, segs: &[&str], body: Body) -> ApiResult {
    let m = method.as_str();
    // An operation this server does not define is the client's request for something absent:
    // a 4xx with `not-supported`, as for any other unknown interaction, never a 5xx that would
    // read as a server fault and invite retries.
    if let Some(level) = crate::export::level(segs) {
        return match m {
            "GET" => crate::export::kick_off(req, level, &req.query).await,
            "POST" => {
                let query = export_parameters(req, body).await?;
                crate::export::kick_off(req, level, &query).await
            }
            _ => Err(method_not_allowed(method, "GET, POST")),
        };
    }
    match (m, segs) {
        ("GET", ["$export-status", id]) => return crate::export::status(req, id).await,
        ("DELETE", ["$export-status", id]) => return crate::export::cancel(req, id).await,
        ("GET", ["$export-file", id, file]) => return crate::export::file(req, id, file).await,
        (_, ["$export-status", _] | ["$export-file", _, _]) => {
            return Err(method_not_allowed(method, "GET, DELETE"))
        }
        ("GET" | "POST", [t @ ("Patient" | "Encounter"), rest @ ..])
            if rest.last() == Some(&"$everything") && rest.len() <= 2 =>
        {
            let rt = resource_type(t)?;
            let id = match rest {
                [id, _] => Some(logical_id(id)?),
                _ => None,
            };
            return crate::everything::everything(req, rt, id).await;
        }
        _ => {}
    }
    if let Some(op) = segs.iter().find(|s| s.starts_with('$')) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!("the operation {op} is not supported by this server"),
        ));
    }
    match segs {
        [] => match m {
            "GET" => search(req, None, req.query.clone()).await,
            "POST" => bundle(req, body).await,
            _ => Err(method_not_allowed(method, "GET, POST")),
        },
        ["metadata"] => match m {
            "GET" => Ok(req.json(StatusCode::OK, &crate::capability::statement(req).await?)),
            _ => Err(method_not_allowed(method, "GET")),
        },
        ["_history"] => match m {
            "GET" => history(req, HistoryScope::System).await,
            _ => Err(method_not_allowed(method, "GET")),
        },
        ["_search"] => match m {
            "GET" => search(req, None, req.query.clone()).await,
            "POST" => search(req, None, form_query(req, body).await?).await,
            _ => Err(method_not_allowed(method, "GET, POST")),
        },
        [t, rest @ ..] => {
            let rt = resource_type(t)?;
            match (m, rest) {
                ("GET", []) => search(req, Some(rt), req.query.clone()).await,
                ("POST", []) => create(req, rt, body).await,
                ("PUT", []) => conditional_update(req, rt, body).await,
                ("DELETE", []) => conditional_delete(req, rt).await,
                (_, []) => Err(method_not_allowed(method, "GET, POST, PUT, DELETE")),
                ("GET" | "POST", ["_search"]) => {
                    let q = if m == "POST" {
                        form_query(req, body).await?
                    } else {
                        req.query.clone()
                    };
                    search(req, Some(rt), q).await
                }
                (_, ["_search"]) => Err(method_not_allowed(method, "GET, POST")),
                ("GET", ["_history"]) => history(req, HistoryScope::Type(rt)).await,
                ("GET", [id]) => read(req, rt, &logical_id(id)?).await,
                ("PUT", [id]) => update(req, rt, logical_id(id)?, body).await,
                ("DELETE", [id]) => delete(req, rt, &logical_id(id)?).await,
                ("PATCH", [id]) => patch(req, rt, logical_id(id)?, body).await,
                (_, [_]) => Err(method_not_allowed(method, "GET, PUT, DELETE, PATCH")),
                ("GET", [id, "_history"]) => {
                    history(req, HistoryScope::Instance(rt, logical_id(id)?)).await
                }
                ("GET", [id, "_history", v]) => vread(req, rt, &logical_id(id)?, v).await,
                ("GET", [id, member]) if *member == "*" || ResourceType::new(member).is_ok() => {
                    if Compartments::r4().get(rt).is_none() {
                        return Err(ApiError::not_found(format!(
                            "{rt} has no compartment: no FHIR interaction at {}",
                            segs.join("/")
                        )));
                    }
                    compartment_search(req, rt, &logical_id(id)?, member).await
                }
                (_, [_, "_history"] | [_, "_history", _]) => Err(method_not_allowed(method, "GET")),
                _ => Err(ApiError::not_found(format!(
                    "no FHIR interaction at {}",
                    segs.join("/")
                ))),
            }
        }
    }
}

/// The request body, refused with 413 beyond the configured limit.
pub(crate) async fn body_bytes(req: &Req<'_>, body: Body) -> ApiResult<Bytes> {
    let limit = req.app.settings.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    if req
        .header(header::CONTENT_LENGTH)
        .and_then(|l| l.parse::<usize>().ok())
        .is_some_and(|l| l > limit)
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())
}

/// A FHIR JSON body: 415 for another media type, 400 for bad JSON or not an object.
async fn json_body(req: &Req<'_>, body: Body) -> ApiResult<Value> {
    if let Some(ct) = req.header(header::CONTENT_TYPE) {
        let media = ct.split(';').next().unwrap_or("").trim();
        if !matches!(
            media,
            "application/fhir+json" | "application/json" | "application/json+fhir" | "text/json"
        ) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!("content type {media:?}: send application/fhir+json"),
            ));
        }
    }
    let bytes = body_bytes(req, body).await?;
    let v = fhirstore_core::json::from_slice_strict(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid FHIR JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    Ok(v)
}

/// A resource body of type `rt`: a body of another type is a 400.
async fn resource_body(req: &Req<'_>, rt: ResourceType, body: Body) -> ApiResult<Value> {
    let v = json_body(req, body).await?;
    match v.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == rt.as_str() => Ok(v),
        Some(t) => Err(ApiError::bad_request(format!(
            "the body is a {t}, the URL names {rt}"
        ))),
        None => Err(ApiError::bad_request("the body has no resourceType")),
    }
}

/// A POSTed `$export` kick-off: its `Parameters` body as the query string GET would carry.
async fn export_parameters(req: &Req<'_>, body: Body) -> ApiResult<String> {
    let p = json_body(req, body).await?;
    if p.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request(
            "POST $export takes a Parameters resource",
        ));
    }
    let mut query = form_urlencoded::Serializer::new(req.query.clone());
    for param in p["parameter"].as_array().into_iter().flatten() {
        let name = param["name"].as_str().unwrap_or("");
        let value = ["valueString", "valueInstant", "valueCode", "valueUri"]
            .iter()
            .find_map(|f| param[*f].as_str());
        match (name, value) {
            ("_outputFormat" | "_since" | "_type" | "_typeFilter", Some(v)) => {
                query.append_pair(name, v);
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "$export parameter {name:?}: not supported, or without a value"
                )))
            }
        }
    }
    Ok(query.finish())
}

/// `POST …/_search`: the form body's parameters joined to the URL's.
async fn form_query(req: &Req<'_>, body: Body) -> ApiResult<String> {
    if let Some(ct) = req.header(header::CONTENT_TYPE) {
        if !ct.starts_with("application/x-www-form-urlencoded") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "POST _search takes application/x-www-form-urlencoded",
            ));
        }
    }
    let bytes = body_bytes(req, body).await?;
    let form = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the form body is not UTF-8"))?
        .trim();
    Ok(match (req.query.is_empty(), form.is_empty()) {
        (true, _) => form.to_owned(),
        (false, true) => req.query.clone(),
        (false, false) => format!("{}&{form}", req.query),
    })
}

/// Criteria for a conditional interaction: strict, since ignoring a criterion would widen
/// what the write touches.
async fn criteria(req: &Req<'_>, rt: ResourceType, query: &str) -> ApiResult<SearchQuery> {
    let reg = req.app.store.storage().search_parameters(&req.ctx).await?;
    Ok(SearchQuery::parse_limited(
        &reg,
        Some(rt),
        query.trim_start_matches('?'),
        Handling::Strict,
        &req.app.settings.limits.search,
    )?)
}

async fn create(req: &Req<'_>, rt: ResourceType, body: Body) -> ApiResult {
    let resource = match native_binary(req, rt, body).await? {
        Native::Resource(r) => r,
        Native::Fhir(body) => resource_body(req, rt, body).await?,
    };
    let storage = req.app.store.storage();
    let w = match req.header("if-none-exist") {
        Some(q) => {
            let q = criteria(req, rt, q).await?;
            storage
                .conditional_create(&req.ctx, rt, &q, resource)
                .await?
        }
        None => storage.create(&req.ctx, rt, resource).await?,
    };
    req.app.after_write(&req.ctx, &[rt]);
    Ok(req.written(&w))
}

fn if_match(req: &Req<'_>) -> ApiResult<Option<VersionId>> {
    req.header(header::IF_MATCH)
        .map(|t| VersionId::from_etag(t).map_err(|e| ApiError::bad_request(e.to_string())))
        .transpose()
}

async fn update(req: &Req<'_>, rt: ResourceType, id: LogicalId, body: Body) -> ApiResult {
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

async fn conditional_update(req: &Req<'_>, rt: ResourceType, body: Body) -> ApiResult {
    if req.query.is_empty() {
        return Err(method_not_allowed(
            &Method::PUT,
            "PUT Type/id, or PUT Type?criteria",
        ));
    }
    let q = criteria(req, rt, &req.query).await?;
    let resource = resource_body(req, rt, body).await?;
    let w = req
        .app
        .store
        .storage()
        .conditional_update(&req.ctx, rt, &q, resource)
        .await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(req.written(&w))
}

fn deleted_response(req: &Req<'_>, d: &fhirstore_core::Deleted) -> Response {
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

async fn delete(req: &Req<'_>, rt: ResourceType, id: &LogicalId) -> ApiResult {
    let d = req.app.store.storage().delete(&req.ctx, rt, id).await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(deleted_response(req, &d))
}

async fn conditional_delete(req: &Req<'_>, rt: ResourceType) -> ApiResult {
    if req.query.is_empty() {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "multiple-matches",
            "a conditional delete needs criteria",
        ));
    }
    let q = criteria(req, rt, &req.query).await?;
    let d = req
        .app
        .store
        .storage()
        .conditional_delete(&req.ctx, rt, &q)
        .await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(deleted_response(req, &d))
}

/// JSON Patch (RFC 6902) against the current version, written with that version as the
/// `If-Match`, so a concurrent write makes the patch fail (412) instead of being lost.
async fn patch(req: &Req<'_>, rt: ResourceType, id: LogicalId, body: Body) -> ApiResult {
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
    let w = storage
        .update(&req.ctx, rt, &id, doc, Some(current.version))
        .await?;
    req.app.after_write(&req.ctx, &[rt]);
    Ok(req.written(&w))
}

async fn read(req: &Req<'_>, rt: ResourceType, id: &LogicalId) -> ApiResult {
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
    let mut resp = req.json(StatusCode::OK, &shape(&r.content, summary, &elements));
    set_version_headers(resp.headers_mut(), &r);
    Ok(resp)
}

async fn vread(req: &Req<'_>, rt: ResourceType, id: &LogicalId, v: &str) -> ApiResult {
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
enum Native {
    Resource(Value),
    Fhir(Body),
}

/// R4 binary.html: a Binary may be written in its native content type (`POST Binary` with
/// `Content-Type: application/pdf`); it is stored as a Binary resource holding the bytes.
async fn native_binary(req: &Req<'_>, rt: ResourceType, body: Body) -> ApiResult<Native> {
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
fn binary_content(r: &StoredResource) -> ApiResult {
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

/// `_summary` and `_elements` from a read's query.
fn shaping(query: &str) -> ApiResult<(Option<Summary>, Vec<String>)> {
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

async fn search(req: &Req<'_>, rt: Option<ResourceType>, query: String) -> ApiResult {
    let path = rt.map(|t| t.to_string()).unwrap_or_default();
    // A system search of one `_type` is that type's search, so its own parameters apply
    // (R4 search contexts).
    let single = rt.is_none().then(|| single_type(&query)).flatten();
    search_in(req, rt.or(single), None, &path, query).await
}

/// The one type a query's `_type` names, if it names exactly one.
fn single_type(query: &str) -> Option<ResourceType> {
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
async fn search_in(
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
    let routed = req.app.store.search_routed(&req.ctx, &q).await?;
    let body = bundles::searchset(&req.base, path, &query, &q, &routed);
    Ok(req.json(StatusCode::OK, &body))
}

/// `GET [base]/Patient/p1/Observation?…` and `GET [base]/Patient/p1/*?…` (R4 3.1.0.10.1): a
/// search within the compartment of `Patient/p1`.
async fn compartment_search(
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

async fn history(req: &Req<'_>, scope: HistoryScope) -> ApiResult {
    let mut h = HistoryRequest::new(scope.clone());
    for (k, v) in form_urlencoded::parse(req.query.as_bytes()) {
        match k.as_ref() {
            "_count" => {
                h.count = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("_count={v:?} is not a non-negative integer"))
                })?)
            }
            "_since" => {
                h.since = Some(
                    time::OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| {
                            ApiError::bad_request(format!("_since={v:?} is not an instant"))
                        })?,
                )
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

/// A `batch` or `transaction` Bundle posted to the base.
async fn bundle(req: &Req<'_>, body: Body) -> ApiResult {
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
            let (ops, reads) = transaction_ops_in(&reg, &b).map_err(bundle_error)?;
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
struct ResponseBudget {
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
enum BatchItem<'e> {
    Read(&'e Value),
    Write(ApiResult<Vec<fhirstore_core::WriteOp>>),
}

fn is_read_entry(e: &Value) -> bool {
    e.pointer("/request/method")
        .and_then(Value::as_str)
        .is_some_and(|m| m == "GET" || m == "HEAD")
}

/// A `batch` entry's read (read, vread, search, history) through the same dispatcher as a
/// direct request, so it answers exactly what `GET {url}` would: its body becomes the entry's
/// `resource`, its headers the entry's `response`. `ifNoneMatch` and `ifModifiedSince` work as
/// the headers do.
async fn batch_read(req: &Req<'_>, e: &Value) -> ApiResult<Value> {
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

/// A Bundle entry that cannot become a write is the request's fault (400), not the
/// resource's (422).
/// A Bundle that cannot be read as one is a bad request (400), whichever entry broke it.
fn bundle_error(e: Error) -> ApiError {
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
fn entry_of_write(e: Error, reads: &[usize]) -> Error {
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

fn op_types(ops: &[fhirstore_core::WriteOp]) -> Vec<ResourceType> {
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
