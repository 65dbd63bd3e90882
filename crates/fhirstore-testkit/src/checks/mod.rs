//! The conformance checks. Each builds its own data in a fresh tenant and asserts behaviour the
//! FHIR R4 spec or the fhirstore contract requires.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use fhirstore_core::search::{Criterion, CriterionValues, TokenValue};
use fhirstore_core::{
    format_instant, Error, Handling, HistoryRequest, HistoryScope, LogicalId, OpOutcome,
    Permissions, ResourceStorage, ResourceType, SearchQuery, StoredResource, TenantContext,
    VersionId, WriteKind, WriteOp,
};
use serde_json::{json, Value};

use crate::random_tenant;
pub use crate::reindex::{
    custom_date_parameter_over_several_values, custom_parameters_across_stores,
    custom_search_parameters, custom_search_parameters_rejected,
};

mod bundles;
mod concurrency;
mod conditional;
mod crud;
mod examples;
mod history;
mod isolation;
mod search;

pub use bundles::*;
pub use concurrency::*;
pub use conditional::*;
pub use crud::*;
pub use examples::*;
pub use history::*;
pub use isolation::*;
pub use search::*;

fn rt(name: &str) -> ResourceType {
    ResourceType::new(name).expect("known resource type")
}

fn patient() -> ResourceType {
    rt("Patient")
}

fn id(s: &str) -> LogicalId {
    LogicalId::new(s).expect("valid id")
}

fn patient_body(id: Option<&str>, family: &str) -> Value {
    let mut v = json!({"resourceType": "Patient", "name": [{"family": family}]});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

/// Writes Patient `id` (update-as-create) with one name, `family`.
async fn put_patient(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    id: &LogicalId,
    family: &str,
) -> fhirstore_core::Written {
    store
        .update(
            ctx,
            patient(),
            id,
            patient_body(Some(id.as_str()), family),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("writing Patient/{id}: {e}"))
}

fn with_identifier(mut body: Value, system: &str, value: &str) -> Value {
    body["identifier"] = json!([{"system": system, "value": value}]);
    body
}

fn family(r: &StoredResource) -> &str {
    r.content["name"][0]["family"].as_str().unwrap_or("")
}

fn query(rt: Option<ResourceType>, qs: &str) -> SearchQuery {
    SearchQuery::parse(rt, qs, Handling::Strict).expect("valid query")
}

fn identifier_query(system: &str, value: &str) -> SearchQuery {
    SearchQuery::all(Some(patient())).with(Criterion::new(
        "identifier",
        CriterionValues::Token(vec![TokenValue {
            system: Some(system.into()),
            code: Some(value.into()),
        }]),
    ))
}

async fn all_history(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    scope: HistoryScope,
    page: u32,
) -> Vec<StoredResource> {
    let mut req = HistoryRequest::new(scope);
    req.count = Some(page);
    let mut out = Vec::new();
    loop {
        let p = store.history(ctx, &req).await.expect("history page");
        assert!(p.entries.len() <= page as usize, "page larger than _count");
        out.extend(p.entries);
        match p.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => return out,
        }
    }
}

async fn all_matches(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    mut q: SearchQuery,
) -> Vec<StoredResource> {
    let mut out = Vec::new();
    loop {
        let p = store.search(ctx, &q).await.expect("search page");
        out.extend(p.matches);
        match p.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

/// Ids matching `qs`, sorted; every match must belong to `ctx`'s tenant.
async fn matching_ids(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    rt: &str,
    qs: &str,
) -> Vec<String> {
    let hits = all_matches(store, ctx, query(Some(self::rt(rt)), qs)).await;
    assert!(
        hits.iter().all(|r| &r.tenant == ctx.tenant()),
        "{qs} crossed tenants"
    );
    let mut ids: Vec<String> = hits.into_iter().map(|r| r.key.id.to_string()).collect();
    ids.sort();
    ids
}

/// Runs each `(type, query, expected ids)` case and fails listing every case that differed.
async fn expect_matches(
    store: &dyn ResourceStorage,
    ctx: &TenantContext,
    cases: &[(&str, &str, &[&str])],
) {
    let mut failures = Vec::new();
    for (t, qs, want) in cases {
        let got = matching_ids(store, ctx, t, qs).await;
        if got != *want {
            failures.push(format!("{t}?{qs}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Stores each document (which names its type and id) in the tenant.
async fn put_all(store: &dyn ResourceStorage, ctx: &TenantContext, docs: Vec<Value>) {
    for d in docs {
        let t = rt(d["resourceType"].as_str().expect("type"));
        let i = id(d["id"].as_str().expect("id"));
        store.update(ctx, t, &i, d, None).await.expect("seed");
    }
}
