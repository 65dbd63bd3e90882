//! R4 Subscriptions fed by the change log: what a `Subscription` resource asks for, whether a
//! version matches its criteria, and the durable per-subscription state and event log a
//! primary keeps ([`SubscriptionLog`]).
//!
//! **Why events are numbered in the primary.** A notification that a crash interrupted is sent
//! again; a receiver can only drop the duplicate if it carries the same number. So the matcher
//! records each match as a numbered event in the same transaction that moves its log cursor,
//! and delivery reads those events back in order. Numbers per subscription have no gaps
//! (`eventsSinceSubscriptionStart` of the Subscriptions Backport IG), and `$events` replays any
//! range from the same rows.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::changelog::ChangeCursor;
use crate::date::{DateRange, Prefix};
use crate::error::Result;
use crate::index::{self, IndexEntries};
use crate::model::{LogicalId, ResourceType};
use crate::registry::Registry;
use crate::search::{
    Criterion, CriterionValues, Handling, Modifier, NumberValue, ReferenceValue, SearchQuery,
};
use crate::tenant::TenantId;
use crate::StoredResource;

/// The backport IG's extension on `Subscription.channel.payload` naming how much of a
/// resource a notification carries.
pub const PAYLOAD_CONTENT_URL: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
/// The backport IG's extension on `Subscription.channel` giving the heartbeat period, seconds.
pub const HEARTBEAT_URL: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period";
/// The backport IG's extension on `Subscription.channel` giving a delivery timeout, seconds.
pub const TIMEOUT_URL: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout";

/// `Subscription.status` (R4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Asked for; the server has not set it up yet.
    Requested,
    /// Matching and delivering.
    Active,
    /// Delivery failed past the retry period; events are still recorded, so setting it back
    /// to `requested` or `active` resumes from the first event not delivered.
    Error,
    /// Turned off: nothing is matched or sent.
    Off,
}

impl Status {
    /// The R4 code.
    pub fn code(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Active => "active",
            Status::Error => "error",
            Status::Off => "off",
        }
    }

    /// From the R4 code.
    pub fn parse(code: &str) -> Option<Status> {
        Some(match code {
            "requested" => Status::Requested,
            "active" => Status::Active,
            "error" => Status::Error,
            "off" => Status::Off,
            _ => return None,
        })
    }

    /// Whether changes are matched and recorded as events in this state. An `error`
    /// subscription keeps recording, so nothing is lost while its endpoint is down.
    pub fn records(self) -> bool {
        matches!(self, Status::Active | Status::Requested | Status::Error)
    }
}

/// How much of the changed resource a notification carries (the backport IG's
/// `backport-payload-content`; R4's `channel.payload` present means the whole resource).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Only the notification status: no reference to the resource.
    Empty,
    /// The resource's reference, not its body.
    IdOnly,
    /// The resource itself.
    FullResource,
}

impl Content {
    /// The backport IG's code.
    pub fn code(self) -> &'static str {
        match self {
            Content::Empty => "empty",
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
        }
    }
}

/// What a `Subscription` resource asks for, as the engine keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Its status.
    pub status: Status,
    /// The criteria, a search string `Type?params`.
    pub criteria: String,
    /// The rest-hook endpoint.
    pub endpoint: String,
    /// `channel.header`: `Name: value` lines sent with each notification.
    pub headers: Vec<String>,
    /// How much of the resource a notification carries.
    pub content: Content,
    /// A heartbeat is sent when nothing else was for this long.
    pub heartbeat: Option<Duration>,
    /// The delivery timeout the subscription asks for (bounded by the server's own).
    pub timeout: Option<Duration>,
    /// `Subscription.end`, microseconds: no event is recorded for a change after it.
    pub end: Option<i64>,
}

/// Why a `Subscription` resource cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn bad(what: impl Into<String>) -> SpecError {
    SpecError(what.into())
}

fn extension<'a>(element: &'a Value, url: &str) -> Option<&'a Value> {
    element["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"].as_str() == Some(url))
}

fn seconds(ext: Option<&Value>) -> Option<Duration> {
    ext.and_then(|e| {
        e["valueUnsignedInt"]
            .as_u64()
            .or(e["valuePositiveInt"].as_u64())
    })
    .filter(|&s| s > 0)
    .map(Duration::from_secs)
}

impl Spec {
    /// Reads a `Subscription` body: a rest-hook channel with an endpoint, criteria naming a
    /// resource type, and a JSON payload when there is one.
    pub fn from_resource(body: &Value) -> std::result::Result<Spec, SpecError> {
        if body["resourceType"].as_str() != Some("Subscription") {
            return Err(bad("not a Subscription"));
        }
        let status = body["status"]
            .as_str()
            .ok_or_else(|| bad("Subscription.status is required"))
            .and_then(|s| {
                Status::parse(s).ok_or_else(|| bad(format!("unknown Subscription.status {s:?}")))
            })?;
        let criteria = body["criteria"]
            .as_str()
            .filter(|c| !c.trim().is_empty())
            .ok_or_else(|| bad("Subscription.criteria is required"))?
            .trim()
            .to_owned();
        let channel = &body["channel"];
        match channel["type"].as_str() {
            Some("rest-hook") => {}
            Some(other) => {
                return Err(bad(format!(
                    "channel type {other:?} is not supported; this server delivers rest-hook \
                     notifications only"
                )))
            }
            None => return Err(bad("Subscription.channel.type is required")),
        }
        let endpoint = channel["endpoint"]
            .as_str()
            .filter(|e| !e.is_empty())
            .ok_or_else(|| bad("a rest-hook channel needs channel.endpoint"))?
            .to_owned();
        let headers = match &channel["header"] {
            Value::Null => Vec::new(),
            Value::Array(h) => h
                .iter()
                .map(|v| {
                    let line = v
                        .as_str()
                        .ok_or_else(|| bad("channel.header must be strings"))?;
                    check_header(line)?;
                    Ok(line.to_owned())
                })
                .collect::<std::result::Result<_, SpecError>>()?,
            _ => return Err(bad("channel.header must be an array of strings")),
        };
        let content = match channel["payload"].as_str() {
            None => Content::Empty,
            Some(mime) => {
                let base = mime.split(';').next().unwrap_or("").trim();
                if !matches!(base, "application/fhir+json" | "application/json") {
                    return Err(bad(format!(
                        "payload {mime:?} is not supported; use application/fhir+json"
                    )));
                }
                let payload_el = &channel["_payload"];
                match extension(payload_el, PAYLOAD_CONTENT_URL)
                    .and_then(|e| e["valueCode"].as_str())
                {
                    None | Some("full-resource") => Content::FullResource,
                    Some("id-only") => Content::IdOnly,
                    Some("empty") => Content::Empty,
                    Some(other) => return Err(bad(format!("unknown payload content {other:?}"))),
                }
            }
        };
        let end = match body["end"].as_str() {
            None => None,
            Some(t) => Some(
                crate::parse_instant(t)
                    .map(crate::to_micros)
                    .ok_or_else(|| bad(format!("Subscription.end {t:?} is not an instant")))?,
            ),
        };
        Ok(Spec {
            status,
            criteria,
            endpoint,
            headers,
            content,
            heartbeat: seconds(extension(channel, HEARTBEAT_URL)),
            timeout: seconds(extension(channel, TIMEOUT_URL)),
            end,
        })
    }

    /// When the next heartbeat falls due after a send at `at` (microseconds); 0 for none.
    pub fn heartbeat_after(&self, at: i64) -> i64 {
        self.heartbeat.map_or(0, |h| {
            at.saturating_add(i64::try_from(h.as_micros()).unwrap_or(i64::MAX))
        })
    }

    /// The spec as the state row keeps it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "status": self.status.code(),
            "criteria": self.criteria,
            "endpoint": self.endpoint,
            "headers": self.headers,
            "content": self.content.code(),
            "heartbeat": self.heartbeat.map(|d| d.as_secs()),
            "timeout": self.timeout.map(|d| d.as_secs()),
            "end": self.end,
        })
    }

    /// The inverse of [`Spec::to_json`].
    pub fn from_json(v: &Value) -> Option<Spec> {
        Some(Spec {
            status: Status::parse(v["status"].as_str()?)?,
            criteria: v["criteria"].as_str()?.to_owned(),
            endpoint: v["endpoint"].as_str()?.to_owned(),
            headers: v["headers"]
                .as_array()?
                .iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect(),
            content: match v["content"].as_str()? {
                "empty" => Content::Empty,
                "id-only" => Content::IdOnly,
                _ => Content::FullResource,
            },
            heartbeat: v["heartbeat"].as_u64().map(Duration::from_secs),
            timeout: v["timeout"].as_u64().map(Duration::from_secs),
            end: v["end"].as_i64(),
        })
    }
}

/// A `channel.header` line must be `Name: value` with a token name and no line breaks, so it
/// cannot smuggle a second header or a request into the notification.
fn check_header(line: &str) -> std::result::Result<(), SpecError> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| bad(format!("channel.header {line:?} is not \"Name: value\"")))?;
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(bad(format!(
            "channel.header name {name:?} is not a header name"
        )));
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(bad("channel.header values cannot hold line breaks"));
    }
    let lower = name.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection" | "content-type"
    ) {
        return Err(bad(format!("channel.header cannot set {name}")));
    }
    Ok(())
}

/// Compiled criteria: the search they denote, for matching versions as they are written.
#[derive(Clone, Debug)]
pub struct Criteria {
    /// The type the criteria select.
    pub resource_type: ResourceType,
    /// The parsed search (strict: an unknown parameter is an error, not ignored, since
    /// ignoring it would notify far more than was asked).
    pub query: SearchQuery,
}

/// Whether a version matches a subscription's criteria.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It matches.
    Yes,
    /// It does not.
    No,
    /// Only the store can tell (a chain, `_has`, a composite, a hierarchy modifier): ask it.
    AskStore,
}

impl Criteria {
    /// Parses `Type?params` in the tenant's registry. Result parameters (`_sort`, `_count`,
    /// `_include`…) mean nothing for a subscription and are refused.
    pub fn parse(reg: &Registry, criteria: &str) -> Result<Criteria> {
        let (rt, params) = criteria.split_once('?').unwrap_or((criteria, ""));
        let rt = ResourceType::new(rt.trim_start_matches('/')).map_err(|_| {
            crate::Error::InvalidSearch(format!(
                "criteria {criteria:?} must start with a resource type"
            ))
        })?;
        let query = SearchQuery::parse_in(reg, Some(rt), params, Handling::Strict)?;
        let shaping = !query.sort.is_empty()
            || query.count.is_some()
            || !query.includes.is_empty()
            || !query.revincludes.is_empty()
            || query.summary.is_some()
            || !query.elements.is_empty()
            || query.total != crate::search::TotalMode::None;
        if shaping {
            return Err(crate::Error::InvalidSearch(format!(
                "criteria {criteria:?} may hold search criteria only, not result parameters \
                 (_sort, _count, _include, _summary, _elements, _total)"
            )));
        }
        Ok(Criteria {
            resource_type: rt,
            query,
        })
    }

    /// Judges a live version in memory from its index entries; [`Verdict::AskStore`] when a
    /// criterion needs other resources or an index the store keeps.
    pub fn judge(&self, reg: &Registry, version: &StoredResource, now: i64) -> Verdict {
        match self.undecided(reg, version, now) {
            None => Verdict::No,
            Some(open) if open.is_empty() => Verdict::Yes,
            Some(_) => Verdict::AskStore,
        }
    }

    /// The criteria memory cannot settle for a live version (chains, `_has`, composites,
    /// hierarchy modifiers); `None` when one it can settle fails, so the version does not
    /// match whatever the rest say.
    pub fn undecided<'a>(
        &'a self,
        reg: &Registry,
        version: &StoredResource,
        now: i64,
    ) -> Option<Vec<&'a Criterion>> {
        self.undecided_in(&index::extract_in(reg, &version.content), version, now)
    }

    /// [`Criteria::undecided`] from the version's index entries, extracted once however many
    /// subscriptions judge it.
    pub fn undecided_in<'a>(
        &'a self,
        entries: &IndexEntries,
        version: &StoredResource,
        now: i64,
    ) -> Option<Vec<&'a Criterion>> {
        if version.key.resource_type != self.resource_type || version.deleted {
            return None;
        }
        let mut open = Vec::new();
        for c in &self.query.criteria {
            if !c.chain.is_empty() {
                open.push(c);
                continue;
            }
            match judge_one(c, version, entries, now) {
                Some(true) => {}
                Some(false) => return None,
                None => open.push(c),
            }
        }
        Some(open)
    }
}

/// One criterion against one version; `None` when memory cannot tell.
fn judge_one(c: &Criterion, version: &StoredResource, e: &IndexEntries, now: i64) -> Option<bool> {
    let p = c.param.as_str();
    match (p, &c.values) {
        ("_id", CriterionValues::Token(ts)) => {
            let hit = ts
                .iter()
                .any(|t| t.code.as_deref() == Some(version.key.id.as_str()));
            return Some(hit != (c.modifier == Some(Modifier::Not)));
        }
        ("_lastUpdated", CriterionValues::Date(ds)) => {
            let at = crate::to_micros(version.last_updated);
            let stored = DateRange {
                low: at,
                high: at + 1,
            };
            return Some(ds.iter().any(|d| d.matches(stored, now)));
        }
        _ => {}
    }
    match &c.values {
        CriterionValues::Token(ts) => {
            let mine = e.tokens.iter().filter(|t| t.param == p);
            let hit = match c.modifier {
                None | Some(Modifier::Not) => {
                    let rows: Vec<_> = mine.collect();
                    ts.iter().any(|v| {
                        rows.iter().any(|r| {
                            v.code.as_ref().is_none_or(|code| *code == r.code)
                                && v.system.as_ref().is_none_or(|s| *s == r.system)
                        })
                    })
                }
                _ => return None,
            };
            Some(hit != (c.modifier == Some(Modifier::Not)))
        }
        CriterionValues::String(ss) => {
            let rows: Vec<_> = e.strings.iter().filter(|s| s.param == p).collect();
            Some(ss.iter().any(|v| match c.modifier {
                Some(Modifier::Exact) => rows.iter().any(|r| r.exact == *v),
                Some(Modifier::Contains) => {
                    let f = index::fold(v);
                    rows.iter().any(|r| r.folded.contains(&f))
                }
                _ => {
                    let f = index::fold(v);
                    rows.iter().any(|r| r.folded.starts_with(&f))
                }
            }))
            .filter(|_| {
                matches!(
                    c.modifier,
                    None | Some(Modifier::Exact | Modifier::Contains)
                )
            })
        }
        CriterionValues::Date(ds) if c.modifier.is_none() => Some(ds.iter().any(|d| {
            e.dates.iter().filter(|r| r.param == p).any(|r| {
                d.matches(
                    DateRange {
                        low: r.low,
                        high: r.high,
                    },
                    now,
                )
            })
        })),
        CriterionValues::Number(ns) if c.modifier.is_none() => Some(ns.iter().any(|n| {
            e.numbers
                .iter()
                .filter(|r| r.param == p)
                .any(|r| number_holds(n, r.value))
        })),
        CriterionValues::Quantity(qs) if c.modifier.is_none() => Some(qs.iter().any(|q| {
            e.quantities.iter().filter(|r| r.param == p).any(|r| {
                number_holds(&q.number, r.value)
                    && match (&q.system, &q.code) {
                        (Some(s), Some(code)) => r.system == *s && r.code == *code,
                        (None, Some(code)) => r.code == *code || r.unit == *code,
                        (Some(s), None) => r.system == *s,
                        (None, None) => true,
                    }
            })
        })),
        CriterionValues::Reference(rs) if c.modifier.is_none() => Some(rs.iter().any(|v| {
            e.references
                .iter()
                .filter(|r| r.param == p)
                .any(|r| match v {
                    ReferenceValue::Local { resource_type, id } => {
                        r.target_id == *id
                            && resource_type
                                .as_ref()
                                .is_none_or(|t| r.target_type == t.as_str())
                    }
                    ReferenceValue::Url { url, version } => {
                        r.url == *url && version.as_ref().is_none_or(|v| r.version == *v)
                    }
                })
        })),
        CriterionValues::Uri(us) if c.modifier.is_none() => Some(
            us.iter()
                .any(|u| e.uris.iter().any(|r| r.param == p && r.uri == *u)),
        ),
        _ => None,
    }
}

/// The same rule the SQL stores apply to a stored number: `eq`/`ne` by the searched value's
/// precision range, the ordering prefixes by its exact value, `ap` within ±10%.
fn number_holds(n: &NumberValue, stored: f64) -> bool {
    match n.prefix {
        Prefix::Eq => stored >= n.low && stored < n.high,
        Prefix::Ne => !(stored >= n.low && stored < n.high),
        Prefix::Ap => {
            let pad = (n.value.abs() * 0.1).max(n.high - n.low);
            stored >= n.value - pad && stored <= n.value + pad
        }
        Prefix::Gt | Prefix::Sa => stored > n.value,
        Prefix::Lt | Prefix::Eb => stored < n.value,
        Prefix::Ge => stored >= n.value,
        Prefix::Le => stored <= n.value,
    }
}

/// A subscription's durable state in the primary.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// Its tenant.
    pub tenant: TenantId,
    /// The Subscription's id.
    pub id: LogicalId,
    /// The Subscription version the spec was read from.
    pub version: i64,
    /// What it asks for.
    pub spec: Spec,
    /// Events recorded so far: the last event's number.
    pub events: i64,
    /// Every event up to this number was delivered (a 2xx from the endpoint).
    pub delivered: i64,
    /// Failed attempts since the last success.
    pub failures: i64,
    /// When the first of those failures happened, microseconds; 0 when none.
    pub failing_since: i64,
    /// No attempt before this, microseconds.
    pub next_attempt: i64,
    /// The last successful delivery (a notification or heartbeat), microseconds; 0 when none.
    pub last_sent: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// One recorded event of a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its number, from 1, without gaps.
    pub number: i64,
    /// The changed resource's type.
    pub resource_type: ResourceType,
    /// Its id.
    pub id: LogicalId,
    /// The version that triggered it.
    pub version: i64,
    /// Whether that version was a deletion.
    pub deleted: bool,
    /// When the change was written, microseconds.
    pub at: i64,
}

/// What the matcher writes with one cursor advance.
#[derive(Clone, Debug, Default)]
pub struct Matched {
    /// Subscriptions created, changed or deleted in the batch: the new spec and the version
    /// it came from, or `None` for a deletion.
    pub specs: Vec<(TenantId, LogicalId, i64, Option<Spec>)>,
    /// Events, in log order. Their `number` is ignored: the log numbers each subscription's
    /// events after its counter, in this order.
    pub events: Vec<(TenantId, LogicalId, Event)>,
}

/// How a delivery attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Attempt {
    /// Everything up to `through` was delivered (a heartbeat: `through` is unchanged).
    Delivered {
        /// The last event number delivered.
        through: i64,
        /// When the next heartbeat falls due, microseconds; 0 for none.
        heartbeat_due: i64,
    },
    /// It failed; the next attempt is not before `retry_at`.
    Failed {
        /// The last event number delivered before the failure.
        through: i64,
        /// Why.
        error: String,
        /// The next attempt, microseconds.
        retry_at: i64,
    },
    /// It failed past the retry period: the subscription goes to `error`, as long as it is
    /// still at `version` (a newer version, such as a client reactivating it, wins).
    GaveUp {
        /// The last event number delivered before the failure.
        through: i64,
        /// Why.
        error: String,
        /// The version that was failing.
        version: i64,
    },
}

/// A delivery attempt to record: the subscription and how it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// The subscription's tenant.
    pub tenant: TenantId,
    /// The Subscription's id.
    pub id: LogicalId,
    /// How the attempt ended.
    pub attempt: Attempt,
}

/// The subscription state and event log a primary keeps beside its change log.
#[async_trait]
pub trait SubscriptionLog: Send + Sync {
    /// Every subscription's state, every tenant.
    async fn subscription_states(&self) -> Result<Vec<State>>;

    /// One subscription's state.
    async fn subscription_state(&self, tenant: &TenantId, id: &LogicalId) -> Result<Option<State>>;

    /// In one transaction: moves consumer `name`'s cursor to `cursor` (when `holder` holds its
    /// lease), applies the spec changes and appends the events. `false`, writing nothing,
    /// without the lease: another process matched these changes.
    async fn record_matches(
        &self,
        name: &str,
        holder: &str,
        cursor: ChangeCursor,
        matched: &Matched,
    ) -> Result<bool>;

    /// The subscription's events numbered `from..=until`, in order, at most `limit`.
    async fn subscription_events(
        &self,
        tenant: &TenantId,
        id: &LogicalId,
        from: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Event>>;

    /// Takes `holder`'s delivery lease for `ttl` on up to `limit` subscriptions that have
    /// something to send now (undelivered events, or a heartbeat due, and no retry pending) and
    /// that no one holds, this holder included: one delivery at a time per subscription keeps
    /// its order.
    async fn claim_deliveries(
        &self,
        holder: &str,
        ttl: Duration,
        now: i64,
        limit: u32,
    ) -> Result<Vec<State>>;

    /// Records attempts and releases their leases, all in one transaction (deliveries finish
    /// many at a time, and each would otherwise be a commit of its own). For each, `false`
    /// when `holder` had lost its lease.
    async fn finish_deliveries(
        &self,
        holder: &str,
        finished: &[Finished],
        now: i64,
    ) -> Result<Vec<bool>>;

    /// Events every subscription has delivered, older than `before` (microseconds), are
    /// deleted, at most `limit`; returns how many. `$events` can replay only what is kept.
    async fn prune_events(&self, before: i64, limit: u32) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version(body: Value) -> StoredResource {
        let rt = ResourceType::new(body["resourceType"].as_str().unwrap_or(""))
            .expect("a resource type");
        StoredResource {
            tenant: TenantId::new("t").expect("a tenant"),
            key: crate::ResourceKey::new(rt, LogicalId::new("p1").expect("an id")),
            version: crate::VersionId::new(1).expect("a version"),
            last_updated: crate::from_micros(1_700_000_000_000_000),
            deleted: false,
            content: body,
        }
    }

    fn judge(criteria: &str, body: Value) -> Verdict {
        let reg = Registry::r4();
        Criteria::parse(reg, criteria)
            .expect("criteria that parse")
            .judge(reg, &version(body), crate::now_micros())
    }

    #[test]
    fn judges_each_type_in_memory() {
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/a"},
            "effectiveDateTime": "2024-03-05",
            "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"}
        });
        assert_eq!(
            judge("Observation?code=http://loinc.org|8867-4", obs.clone()),
            Verdict::Yes
        );
        assert_eq!(judge("Observation?code=1234-5", obs.clone()), Verdict::No);
        assert_eq!(
            judge("Observation?code:not=1234-5", obs.clone()),
            Verdict::Yes
        );
        assert_eq!(
            judge("Observation?subject=Patient/a", obs.clone()),
            Verdict::Yes
        );
        assert_eq!(
            judge("Observation?subject=Patient/b", obs.clone()),
            Verdict::No
        );
        assert_eq!(judge("Observation?date=2024-03", obs.clone()), Verdict::Yes);
        assert_eq!(judge("Observation?date=gt2025", obs.clone()), Verdict::No);
        assert_eq!(
            judge("Observation?value-quantity=gt70||/min", obs.clone()),
            Verdict::Yes
        );
        assert_eq!(
            judge("Observation?value-quantity=lt70", obs.clone()),
            Verdict::No
        );
        assert_eq!(judge("Patient?name=x", obs.clone()), Verdict::No);
        assert_eq!(
            judge("Observation?subject:Patient.name=smith", obs.clone()),
            Verdict::AskStore
        );
        assert_eq!(
            judge("Observation?code=1234-5&subject:Patient.name=smith", obs),
            Verdict::No,
            "a criterion memory can refute settles it without the store"
        );
        let pat =
            json!({"resourceType": "Patient", "name": [{"family": "Müller"}], "gender": "female"});
        assert_eq!(
            judge("Patient?family=muller&gender=female", pat.clone()),
            Verdict::Yes
        );
        assert_eq!(
            judge("Patient?family:exact=Müller", pat.clone()),
            Verdict::Yes
        );
        assert_eq!(
            judge("Patient?family:exact=muller", pat.clone()),
            Verdict::No
        );
        assert_eq!(
            judge("Patient?family:contains=ll", pat.clone()),
            Verdict::Yes
        );
        assert_eq!(judge("Patient?_id=p1", pat.clone()), Verdict::Yes);
        assert_eq!(judge("Patient?_id=p2", pat), Verdict::No);
    }

    #[test]
    fn refuses_result_parameters_and_unknown_ones() {
        let reg = Registry::r4();
        assert!(Criteria::parse(reg, "Patient?_sort=name").is_err());
        assert!(Criteria::parse(reg, "Patient?nonsense=1").is_err());
        assert!(Criteria::parse(reg, "?name=x").is_err());
        assert!(Criteria::parse(reg, "Patient").is_ok());
    }

    #[test]
    fn reads_a_rest_hook_subscription() {
        let body = json!({
            "resourceType": "Subscription", "status": "requested", "reason": "r",
            "criteria": "Observation?code=8867-4",
            "channel": {
                "type": "rest-hook", "endpoint": "https://example.org/hook",
                "payload": "application/fhir+json", "header": ["Authorization: Bearer x"],
                "_payload": {"extension": [{"url": PAYLOAD_CONTENT_URL, "valueCode": "id-only"}]},
                "extension": [{"url": HEARTBEAT_URL, "valueUnsignedInt": 60}]
            }
        });
        let spec = Spec::from_resource(&body).expect("a subscription this server serves");
        assert_eq!(spec.content, Content::IdOnly);
        assert_eq!(spec.heartbeat, Some(Duration::from_secs(60)));
        assert_eq!(Spec::from_json(&spec.to_json()), Some(spec));
        let mut smuggled = body.clone();
        smuggled["channel"]["header"] = json!(["X: a\r\nHost: evil"]);
        assert!(Spec::from_resource(&smuggled).is_err());
        let mut email = body.clone();
        email["channel"]["type"] = json!("email");
        assert!(Spec::from_resource(&email).is_err());
        let mut xml = body;
        xml["channel"]["payload"] = json!("application/fhir+xml");
        assert!(Spec::from_resource(&xml).is_err());
    }
}
