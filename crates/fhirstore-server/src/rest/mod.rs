//! The FHIR R4 RESTful API under `/fhir/{tenant}`: one dispatcher reads the path's shape, so
//! unknown paths, unknown types and wrong methods all get an `OperationOutcome`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use fhirstore_core::bundle::{transaction_ops_in, write_ops_in};
use fhirstore_core::compartment::CompartmentScope;
use fhirstore_core::search::Summary;
use fhirstore_core::{
    Error, Handling, HistoryRequest, HistoryScope, LogicalId, ResourceType, SearchQuery,
    StoredResource, TenantContext, VersionId,
};
use fhirstore_core::{WriteKind, Written};
use serde_json::{json, Map, Value};

use crate::bundles;
use crate::outcome::{operation_outcome, ApiError, ApiResult, FHIR_JSON};
use crate::route::{method_not_allowed, Route};
use crate::App;

mod bundle;
mod instance;
mod search;
mod type_level;

use bundle::*;
use instance::*;
use search::*;
use type_level::*;

pub(crate) use bundle::wants_resource;
pub(crate) use search::shape;

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
const IMF_FIXDATE: &str = "%a, %d %b %Y %H:%M:%S GMT";

/// An HTTP date (RFC 9110 IMF-fixdate).
pub(crate) fn http_date(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format(IMF_FIXDATE).to_string()
}

/// An IMF-fixdate, read as UTC. Other (obsolete) forms are `None`, which RFC 9110 lets a
/// server treat as an absent condition.
fn parse_http_date(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::NaiveDateTime::parse_from_str(s.trim(), IMF_FIXDATE)
        .ok()
        .map(|t| t.and_utc())
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
        .is_some_and(|since| r.last_updated.timestamp() <= since.timestamp())
}

pub(crate) fn resource_type(name: &str) -> ApiResult<ResourceType> {
    ResourceType::new(name)
        .map_err(|_| ApiError::not_found(format!("{name:?} is not an R4 resource type")))
}

pub(crate) fn logical_id(id: &str) -> ApiResult<LogicalId> {
    LogicalId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))
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
    let route = Route::parse(&method, &segs);
    let label = route.as_ref().map_or("other", Route::label);
    let result = async {
        // Who may ask comes first: a caller without access learns nothing about paths.
        let ctx = app.auth.tenant(&headers, tenant)?;
        let req = Req::new(&app, ctx, &headers, &uri, tenant)?;
        dispatch(&req, route?, body).await
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(Interaction(label));
    resp
}

/// [`dispatch`] of the route of `method` on `segs`, as a boxed future: a `batch` entry's read
/// re-enters the dispatcher, and an async call cycle needs one boxed step.
fn dispatch_boxed<'a>(
    req: &'a Req<'a>,
    method: &'a Method,
    segs: &'a [&'a str],
    body: Body,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApiResult> + Send + 'a>> {
    Box::pin(async move { dispatch(req, Route::parse(method, segs)?, body).await })
}

/// Runs the interaction `route` names.
async fn dispatch(req: &Req<'_>, route: Route<'_>, body: Body) -> ApiResult {
    match route {
        Route::Capabilities => {
            Ok(req.json(StatusCode::OK, &crate::capability::statement(req).await?))
        }
        Route::SearchSystem { post } => {
            let query = search_criteria(req, post, body).await?;
            search(req, None, query).await
        }
        Route::Bundle => bundle(req, body).await,
        Route::HistorySystem => history(req, HistoryScope::System).await,
        Route::SearchType { rt, post } => {
            let query = search_criteria(req, post, body).await?;
            search(req, Some(rt), query).await
        }
        Route::Create(rt) => create(req, rt, body).await,
        Route::ConditionalUpdate(rt) => conditional_update(req, rt, body).await,
        Route::ConditionalDelete(rt) => conditional_delete(req, rt).await,
        Route::HistoryType(rt) => history(req, HistoryScope::Type(rt)).await,
        Route::Read(rt, id) => read(req, rt, &id).await,
        Route::Update(rt, id) => update(req, rt, id, body).await,
        Route::Delete(rt, id) => delete(req, rt, &id).await,
        Route::Patch(rt, id) => patch(req, rt, id, body).await,
        Route::HistoryInstance(rt, id) => history(req, HistoryScope::Instance(rt, id)).await,
        Route::Vread(rt, id, v) => vread(req, rt, &id, v).await,
        Route::Compartment { rt, id, member } => compartment_search(req, rt, &id, member).await,
        Route::Export { level, post } => {
            let query = if post {
                export_parameters(req, body).await?
            } else {
                req.query.clone()
            };
            crate::export::kick_off(req, level, &query).await
        }
        Route::ExportStatus(id) => crate::export::status(req, id).await,
        Route::ExportCancel(id) => crate::export::cancel(req, id).await,
        Route::ExportFile(id, file) => crate::export::file(req, id, file).await,
        Route::Everything { rt, id } => crate::everything::everything(req, rt, id).await,
        Route::SubscriptionStatus(id) => crate::subscriptions::rest::status(req, &id).await,
        Route::SubscriptionEvents(id) => crate::subscriptions::rest::events(req, &id).await,
    }
}

/// A search's criteria: the query string, or for `POST _search` the form body.
async fn search_criteria(req: &Req<'_>, post: bool, body: Body) -> ApiResult<String> {
    if post {
        form_query(req, body).await
    } else {
        Ok(req.query.clone())
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
    let mut v = json_body(req, body).await?;
    match v.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == rt.as_str() => {
            crate::subscriptions::rest::admit(req, &mut v).await?;
            Ok(v)
        }
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
