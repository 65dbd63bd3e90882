//! Interactions on a type: create, and the conditional update and delete.

use super::*;

/// Criteria for a conditional interaction: strict, since ignoring a criterion would widen
/// what the write touches.
pub(super) async fn criteria(
    req: &Req<'_>,
    rt: ResourceType,
    query: &str,
) -> ApiResult<SearchQuery> {
    let reg = req.app.store.storage().search_parameters(&req.ctx).await?;
    Ok(SearchQuery::parse_limited(
        &reg,
        Some(rt),
        query.trim_start_matches('?'),
        Handling::Strict,
        &req.app.settings.limits.search,
    )?)
}

pub(super) async fn create(req: &Req<'_>, rt: ResourceType, body: Body) -> ApiResult {
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

pub(super) async fn conditional_update(req: &Req<'_>, rt: ResourceType, body: Body) -> ApiResult {
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

pub(super) async fn conditional_delete(req: &Req<'_>, rt: ResourceType) -> ApiResult {
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
