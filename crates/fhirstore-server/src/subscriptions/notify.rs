//! The notification Bundles of the Subscriptions Backport IG (R4): a `history` Bundle whose
//! first entry is the `SubscriptionStatus` (a `Parameters` on R4), then the events' resources
//! as the subscription's payload content asks.

use fhirstore_core::subscription::{Content, Event, State};
use fhirstore_core::{format_instant, from_micros};
use serde_json::{json, Value};

/// The backport IG's profile of the status `Parameters` on R4.
const STATUS_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";

/// What a status Bundle reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Events happened.
    Event,
    /// Nothing happened for the heartbeat period.
    Heartbeat,
    /// The answer to `$status`.
    QueryStatus,
    /// The answer to `$events`.
    QueryEvent,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Event => "event-notification",
            Kind::Heartbeat => "heartbeat",
            Kind::QueryStatus => "query-status",
            Kind::QueryEvent => "query-event",
        }
    }
}

/// One event with the version it names, read when the payload carries it.
pub struct Item {
    /// The event.
    pub event: Event,
    /// The version's body, for `full-resource` (absent for a deletion or a pruned version).
    pub body: Option<Value>,
}

/// The `SubscriptionStatus` of `state` as the backport's R4 `Parameters`.
pub fn status(base: &str, state: &State, kind: Kind, items: &[Item], content: Content) -> Value {
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{base}/Subscription/{}", state.id)}}),
        json!({"name": "topic", "valueCanonical": format!("{base}/Subscription/{}", state.id)}),
        json!({"name": "status", "valueCode": state.spec.status.code()}),
        json!({"name": "type", "valueCode": kind.code()}),
        json!({"name": "events-since-subscription-start", "valueString": state.events.to_string()}),
    ];
    for item in items {
        let e = &item.event;
        let mut parts = vec![
            json!({"name": "event-number", "valueString": e.number.to_string()}),
            json!({"name": "timestamp", "valueInstant": format_instant(from_micros(e.at))}),
        ];
        if content != Content::Empty {
            parts.push(json!({"name": "focus", "valueReference": {
                "reference": format!("{base}/{}/{}/_history/{}", e.resource_type, e.id, e.version)
            }}));
        }
        params.push(json!({"name": "notification-event", "part": parts}));
    }
    if let Some(err) = &state.last_error {
        params.push(json!({"name": "error", "valueCodeableConcept": {"text": err}}));
    }
    json!({
        "resourceType": "Parameters",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": params,
    })
}

/// A notification (or `$events` answer) Bundle: the status, then each event's resource.
pub fn bundle(base: &str, state: &State, kind: Kind, items: &[Item]) -> Value {
    let content = state.spec.content;
    let status = status(base, state, kind, items, content);
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{}", status["id"].as_str().unwrap_or_default()),
        "resource": status,
        "request": {"method": "GET", "url": format!("{base}/Subscription/{}/$status", state.id)},
        "response": {"status": "200"},
    })];
    if content != Content::Empty {
        for item in items {
            let e = &item.event;
            let url = format!("{}/{}", e.resource_type, e.id);
            let (method, code) = match (e.deleted, e.version) {
                (true, _) => ("DELETE", "204"),
                (false, 1) => ("POST", "201"),
                (false, _) => ("PUT", "200"),
            };
            let mut entry = json!({
                "fullUrl": format!("{base}/{url}"),
                "request": {"method": method, "url": url},
                "response": {"status": code, "etag": format!("W/\"{}\"", e.version),
                    "lastModified": format_instant(from_micros(e.at))},
            });
            if content == Content::FullResource {
                if let Some(body) = &item.body {
                    entry["resource"] = body.clone();
                }
            }
            entries.push(entry);
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": format_instant(chrono::Utc::now()),
        "entry": entries,
    })
}
