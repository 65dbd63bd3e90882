//! Subscriptions at the HTTP edge: checking a Subscription before it is stored, and the
//! backport IG's `$status` and `$events` operations.

use axum::http::StatusCode;
use fhirstore_core::subscription::{Content, Criteria, Spec, State};
use fhirstore_core::{LogicalId, ResourceType, WriteOp};
use serde_json::{json, Value};

use super::notify;
use crate::outcome::{ApiError, ApiResult};
use crate::rest::Req;

fn unprocessable(what: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", what.into())
}

/// Checks a Subscription about to be written: a rest-hook channel this server serves,
/// criteria that parse in the tenant's registry, and an endpoint the operator's rule allows.
/// A `requested` subscription passes to `active` (R4: the server activates what it accepts).
/// Any other resource passes untouched.
pub(crate) async fn admit(req: &Req<'_>, body: &mut Value) -> ApiResult<()> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
        return Ok(());
    }
    let spec = Spec::from_resource(body).map_err(|e| unprocessable(e.0))?;
    let reg = req.app.store.storage().search_parameters(&req.ctx).await?;
    Criteria::parse(&reg, &spec.criteria)
        .map_err(|e| unprocessable(format!("Subscription.criteria: {e}")))?;
    req.app
        .subscriptions
        .policy()
        .check(&spec.endpoint)
        .map_err(unprocessable)?;
    if spec.status == fhirstore_core::subscription::Status::Requested {
        body["status"] = json!("active");
    }
    Ok(())
}

/// [`admit`] for every Subscription a Bundle writes.
pub(crate) async fn admit_ops(req: &Req<'_>, ops: &mut [WriteOp]) -> ApiResult<()> {
    for op in ops {
        match op {
            WriteOp::Create { resource, .. }
            | WriteOp::Update { resource, .. }
            | WriteOp::ConditionalUpdate { resource, .. } => admit(req, resource).await?,
            _ => {}
        }
    }
    Ok(())
}

/// The subscription's state, or the state it starts in when matching has not reached its
/// creation yet. 404 when the tenant has no such Subscription.
async fn state_of(req: &Req<'_>, id: &LogicalId) -> ApiResult<State> {
    let rt = ResourceType::new("Subscription")?;
    let current = req.app.store.storage().read(&req.ctx, rt, id).await?;
    let primary = req.app.store.composite().primary();
    if let Some(s) = primary.subscription_state(req.ctx.tenant(), id).await? {
        return Ok(s);
    }
    let spec = Spec::from_resource(&current.content).map_err(|e| unprocessable(e.0))?;
    Ok(State {
        tenant: req.ctx.tenant().clone(),
        id: id.clone(),
        version: i64::try_from(current.version.get()).unwrap_or(i64::MAX),
        spec,
        events: 0,
        delivered: 0,
        failures: 0,
        failing_since: 0,
        next_attempt: 0,
        last_sent: 0,
        last_error: None,
    })
}

/// `Subscription/[id]/$status`: a `searchset` Bundle holding its status.
pub(crate) async fn status(req: &Req<'_>, id: &LogicalId) -> ApiResult {
    let state = state_of(req, id).await?;
    let status = notify::status(
        &req.base,
        &state,
        notify::Kind::QueryStatus,
        &[],
        state.spec.content,
    );
    Ok(req.json(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [{"fullUrl": format!("urn:uuid:{}", status["id"].as_str().unwrap_or_default()),
                       "resource": status, "search": {"mode": "match"}}],
        }),
    ))
}

/// A query parameter's value, if present.
fn param(req: &Req<'_>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn number(req: &Req<'_>, name: &str) -> ApiResult<Option<i64>> {
    param(req, name)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::bad_request(format!("{name} must be a positive integer")))
        })
        .transpose()
}

/// `Subscription/[id]/$events?eventsSinceNumber=…&eventsUntilNumber=…&content=…`: the events
/// in that range as a notification would carry them, so a client that missed some replays
/// them. At most `max_events` per call; ask again from the last number returned.
pub(crate) async fn events(req: &Req<'_>, id: &LogicalId) -> ApiResult {
    let mut state = state_of(req, id).await?;
    let since = number(req, "eventsSinceNumber")?.unwrap_or(1);
    let until = number(req, "eventsUntilNumber")?.unwrap_or(state.events);
    if let Some(c) = param(req, "content") {
        state.spec.content = match c.as_str() {
            "empty" => Content::Empty,
            "id-only" => Content::IdOnly,
            "full-resource" => Content::FullResource,
            other => {
                return Err(ApiError::bad_request(format!(
                    "content {other:?}: use empty, id-only or full-resource"
                )))
            }
        };
    }
    let engine = &req.app.subscriptions;
    let events = req
        .app
        .store
        .composite()
        .primary()
        .subscription_events(
            req.ctx.tenant(),
            id,
            since,
            until.min(state.events),
            engine.settings().max_events,
        )
        .await?;
    let mut items = Vec::with_capacity(events.len());
    for e in events {
        items.push(engine.item(&state, e).await);
    }
    Ok(req.json(
        StatusCode::OK,
        &notify::bundle(&req.base, &state, notify::Kind::QueryEvent, &items),
    ))
}
