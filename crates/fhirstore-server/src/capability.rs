//! `GET /fhir/{tenant}/metadata`: a CapabilityStatement built from what the stores really do
//! and the tenant's searchable parameters, so it changes when they do.

use fhirstore_core::compartment::Compartments;
use fhirstore_core::ResourceType;
use serde_json::{json, Value};

use crate::outcome::ApiResult;
use crate::rest::Req;

const TYPE_INTERACTIONS: [&str; 9] = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];

/// The tenant's CapabilityStatement.
pub async fn statement(req: &Req<'_>) -> ApiResult<Value> {
    let storage = req.app.store.storage();
    let reg = storage.search_parameters(&req.ctx).await?;
    let caps = storage.capabilities();
    let interactions: Vec<Value> = TYPE_INTERACTIONS
        .iter()
        .map(|c| json!({"code": c}))
        .collect();
    let resources: Vec<Value> = ResourceType::all()
        .map(|rt| {
            let mut params: Vec<Value> = reg
                .for_type(rt)
                .into_iter()
                // `special` parameters (Location's `near`) have no search behind them here:
                // advertised, they would be refused.
                .filter(|d| {
                    d.is_indexable()
                        && !d.code.starts_with('_')
                        && d.kind != fhirstore_core::search::ParamType::Special
                })
                .map(|d| json!({"name": d.code, "definition": d.url, "type": d.kind.code()}))
                .collect();
            params.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            let mut r = json!({
                "type": rt.as_str(),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": caps.history,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": true,
                "conditionalDelete": "multiple",
                "searchParam": params,
            });
            if caps.includes {
                r["searchInclude"] = json!(["*"]);
                r["searchRevInclude"] = json!(["*"]);
            }
            if caps.compartments && matches!(rt.as_str(), "Patient" | "Encounter") {
                r["operation"] = json!([{
                    "name": "everything",
                    "definition": format!("http://hl7.org/fhir/OperationDefinition/{rt}-everything"),
                }]);
            }
            r
        })
        .collect();
    let mut common: Vec<Value> = [
        ("_id", "token"),
        ("_lastUpdated", "date"),
        ("_tag", "token"),
        ("_profile", "uri"),
        ("_security", "token"),
        ("_source", "uri"),
    ]
    .into_iter()
    .map(|(n, t)| json!({"name": n, "type": t}))
    .collect();
    for p in ["_text", "_content"] {
        if caps.search_params.contains(&p) {
            // The composite splits a query the full-text index cannot answer alone: the
            // index lists its matches and the primary does the rest.
            common.push(json!({"name": p, "type": "string",
                "documentation": "Full text, answered by the full-text index. Combines with                 every other parameter, chains, _has, _include, _revinclude, _total and _sort                 (by a parameter, or by relevance with _sort=_score), which the primary answers                 within the index's matches; x-search-route reports which backend did what."}));
        }
    }
    let mut system = vec![json!({"code": "history-system"})];
    if caps.transaction {
        system.push(json!({"code": "transaction"}));
        system.push(json!({"code": "batch"}));
    }
    if caps.system_search {
        system.push(json!({"code": "search-system"}));
    }
    let mut rest = json!({
        "mode": "server",
        "resource": resources,
        "interaction": system,
        "searchParam": common,
    });
    if caps.compartments {
        rest["compartment"] = Compartments::r4()
            .types()
            .map(|t| {
                let mut name = t.as_str().to_owned();
                name[..1].make_ascii_lowercase();
                json!(format!("http://hl7.org/fhir/CompartmentDefinition/{name}"))
            })
            .collect::<Vec<Value>>()
            .into();
    }
    if req.app.auth.enabled() {
        rest["security"] = json!({
            "description": "Send `Authorization: Bearer <token>`; each token grants one tenant."
        });
    }
    Ok(json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhirstore_core::format_instant(chrono::Utc::now()),
        "kind": "instance",
        "software": {"name": "fhirstore", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": format!("fhirstore on {}", req.app.store.summary()),
            "url": req.base,
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [rest],
    }))
}
