//! The FHIR interactions under `/fhir/{tenant}`, parsed once from the method and the path.
//!
//! The dispatcher matches on a [`Route`], and the metrics label comes from the same value, so
//! the two can never read the path differently. A path or method that names no interaction is
//! an error here (404, 405, or 400 `not-supported` for an operation this server does not
//! define), before any handler runs.

use axum::http::{Method, StatusCode};
use fhirstore_core::compartment::Compartments;
use fhirstore_core::{LogicalId, ResourceType};

use crate::export::Level;
use crate::outcome::{ApiError, ApiResult};
use crate::rest::{logical_id, resource_type};

/// One FHIR interaction, with what the path names.
#[derive(Debug)]
pub(crate) enum Route<'a> {
    /// `GET [base]/metadata`.
    Capabilities,
    /// `GET [base]?…`, or `[base]/_search` (`post`: the criteria are a form body).
    SearchSystem {
        /// The criteria come as a form body.
        post: bool,
    },
    /// `POST [base]`: a `batch` or `transaction` Bundle.
    Bundle,
    /// `GET [base]/_history`.
    HistorySystem,
    /// `GET [base]/[type]?…`, or `[type]/_search` (`post`: the criteria are a form body).
    SearchType {
        /// The type searched.
        rt: ResourceType,
        /// The criteria come as a form body.
        post: bool,
    },
    /// `POST [base]/[type]`.
    Create(ResourceType),
    /// `PUT [base]/[type]?criteria`.
    ConditionalUpdate(ResourceType),
    /// `DELETE [base]/[type]?criteria`.
    ConditionalDelete(ResourceType),
    /// `GET [base]/[type]/_history`.
    HistoryType(ResourceType),
    /// `GET [base]/[type]/[id]`.
    Read(ResourceType, LogicalId),
    /// `PUT [base]/[type]/[id]`.
    Update(ResourceType, LogicalId),
    /// `DELETE [base]/[type]/[id]`.
    Delete(ResourceType, LogicalId),
    /// `PATCH [base]/[type]/[id]`.
    Patch(ResourceType, LogicalId),
    /// `GET [base]/[type]/[id]/_history`.
    HistoryInstance(ResourceType, LogicalId),
    /// `GET [base]/[type]/[id]/_history/[vid]`.
    Vread(ResourceType, LogicalId, &'a str),
    /// `GET [base]/[compartment type]/[id]/[type or *]?…`.
    Compartment {
        /// The compartment's type.
        rt: ResourceType,
        /// The compartment's focal resource.
        id: LogicalId,
        /// The member type searched, or `*`.
        member: &'a str,
    },
    /// `$export` kick-off at some level (`post`: the parameters are a Parameters body).
    Export {
        /// System, Patient or Group.
        level: Level,
        /// The parameters come as a Parameters body.
        post: bool,
    },
    /// `GET [base]/$export-status/[job]`.
    ExportStatus(&'a str),
    /// `DELETE [base]/$export-status/[job]`.
    ExportCancel(&'a str),
    /// `GET [base]/$export-file/[job]/[file]`.
    ExportFile(&'a str, &'a str),
    /// `Patient/[id]/$everything`, `Patient/$everything`, and the same for Encounter.
    Everything {
        /// Patient or Encounter.
        rt: ResourceType,
        /// The focal resource; `None` at type level.
        id: Option<LogicalId>,
    },
    /// `GET [base]/Subscription/[id]/$status`.
    SubscriptionStatus(LogicalId),
    /// `GET [base]/Subscription/[id]/$events`.
    SubscriptionEvents(LogicalId),
}

impl<'a> Route<'a> {
    /// The route of `method` on the path segments after `/fhir/{tenant}`.
    pub(crate) fn parse(method: &Method, segs: &[&'a str]) -> ApiResult<Self> {
        let m = method.as_str();
        let not_allowed = |allow: &'static str| Err(method_not_allowed(method, allow));
        if let Some(level) = crate::export::level(segs) {
            return match m {
                "GET" | "POST" => Ok(Route::Export {
                    level,
                    post: m == "POST",
                }),
                _ => not_allowed("GET, POST"),
            };
        }
        match (m, segs) {
            ("GET", ["$export-status", id]) => return Ok(Route::ExportStatus(id)),
            ("DELETE", ["$export-status", id]) => return Ok(Route::ExportCancel(id)),
            ("GET", ["$export-file", id, file]) => return Ok(Route::ExportFile(id, file)),
            (_, ["$export-status", _] | ["$export-file", _, _]) => {
                return not_allowed("GET, DELETE");
            }
            ("GET" | "POST", [t @ ("Patient" | "Encounter"), rest @ ..])
                if rest.last() == Some(&"$everything") && rest.len() <= 2 =>
            {
                let rt = resource_type(t)?;
                let id = match rest {
                    [id, _] => Some(logical_id(id)?),
                    _ => None,
                };
                return Ok(Route::Everything { rt, id });
            }
            ("GET" | "POST", ["Subscription", id, "$status"]) => {
                return Ok(Route::SubscriptionStatus(logical_id(id)?));
            }
            ("GET" | "POST", ["Subscription", id, "$events"]) => {
                return Ok(Route::SubscriptionEvents(logical_id(id)?));
            }
            (_, ["Subscription", _, "$status" | "$events"]) => return not_allowed("GET, POST"),
            _ => {}
        }
        // An operation this server does not define is the client's request for something
        // absent: a 4xx with `not-supported`, never a 5xx that would read as a server fault
        // and invite retries.
        if let Some(op) = segs.iter().find(|s| s.starts_with('$')) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!("the operation {op} is not supported by this server"),
            ));
        }
        match segs {
            [] => match m {
                "GET" => Ok(Route::SearchSystem { post: false }),
                "POST" => Ok(Route::Bundle),
                _ => not_allowed("GET, POST"),
            },
            ["metadata"] => match m {
                "GET" => Ok(Route::Capabilities),
                _ => not_allowed("GET"),
            },
            ["_history"] => match m {
                "GET" => Ok(Route::HistorySystem),
                _ => not_allowed("GET"),
            },
            ["_search"] => match m {
                "GET" | "POST" => Ok(Route::SearchSystem { post: m == "POST" }),
                _ => not_allowed("GET, POST"),
            },
            [t, rest @ ..] => Self::on_type(method, resource_type(t)?, rest, segs),
        }
    }

    /// The routes under `[base]/[type]`.
    fn on_type(
        method: &Method,
        rt: ResourceType,
        rest: &[&'a str],
        segs: &[&str],
    ) -> ApiResult<Self> {
        let m = method.as_str();
        let not_allowed = |allow: &'static str| Err(method_not_allowed(method, allow));
        match (m, rest) {
            ("GET", []) => Ok(Route::SearchType { rt, post: false }),
            ("POST", []) => Ok(Route::Create(rt)),
            ("PUT", []) => Ok(Route::ConditionalUpdate(rt)),
            ("DELETE", []) => Ok(Route::ConditionalDelete(rt)),
            (_, []) => not_allowed("GET, POST, PUT, DELETE"),
            ("GET" | "POST", ["_search"]) => Ok(Route::SearchType {
                rt,
                post: m == "POST",
            }),
            (_, ["_search"]) => not_allowed("GET, POST"),
            ("GET", ["_history"]) => Ok(Route::HistoryType(rt)),
            ("GET", [id]) => Ok(Route::Read(rt, logical_id(id)?)),
            ("PUT", [id]) => Ok(Route::Update(rt, logical_id(id)?)),
            ("DELETE", [id]) => Ok(Route::Delete(rt, logical_id(id)?)),
            ("PATCH", [id]) => Ok(Route::Patch(rt, logical_id(id)?)),
            (_, [_]) => not_allowed("GET, PUT, DELETE, PATCH"),
            ("GET", [id, "_history"]) => Ok(Route::HistoryInstance(rt, logical_id(id)?)),
            ("GET", [id, "_history", v]) => Ok(Route::Vread(rt, logical_id(id)?, v)),
            ("GET", [id, member]) if *member == "*" || ResourceType::new(member).is_ok() => {
                if Compartments::r4().get(rt).is_none() {
                    return Err(ApiError::not_found(format!(
                        "{rt} has no compartment: no FHIR interaction at {}",
                        segs.join("/")
                    )));
                }
                Ok(Route::Compartment {
                    rt,
                    id: logical_id(id)?,
                    member,
                })
            }
            (_, [_, "_history"] | [_, "_history", _]) => not_allowed("GET"),
            _ => Err(ApiError::not_found(format!(
                "no FHIR interaction at {}",
                segs.join("/")
            ))),
        }
    }

    /// The interaction's name, the `interaction` label of the request metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Route::Capabilities => "capabilities",
            Route::SearchSystem { .. } => "search-system",
            Route::Bundle => "transaction",
            Route::HistorySystem => "history-system",
            Route::SearchType { .. } => "search-type",
            Route::Create(_) => "create",
            Route::ConditionalUpdate(_) => "conditional-update",
            Route::ConditionalDelete(_) => "conditional-delete",
            Route::HistoryType(_) => "history-type",
            Route::Read(..) => "read",
            Route::Update(..) => "update",
            Route::Delete(..) => "delete",
            Route::Patch(..) => "patch",
            Route::HistoryInstance(..) => "history-instance",
            Route::Vread(..) => "vread",
            Route::Compartment { .. } => "search-compartment",
            Route::Export { .. } => "export",
            Route::ExportStatus(_) | Route::ExportCancel(_) | Route::ExportFile(..) => {
                "export-status"
            }
            Route::Everything { .. } => "everything",
            Route::SubscriptionStatus(_) => "subscription-status",
            Route::SubscriptionEvents(_) => "subscription-events",
        }
    }
}

/// 405 naming the methods the path allows.
pub(crate) fn method_not_allowed(method: &Method, allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        format!("{method} is not allowed here (allowed: {allow})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(method: Method, path: &str) -> &'static str {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        Route::parse(&method, &segs).map_or("other", |r| r.label())
    }

    #[test]
    fn every_interaction_has_its_label() {
        for (method, path, want) in [
            (Method::GET, "metadata", "capabilities"),
            (Method::GET, "", "search-system"),
            (Method::POST, "_search", "search-system"),
            (Method::POST, "", "transaction"),
            (Method::GET, "_history", "history-system"),
            (Method::GET, "Patient", "search-type"),
            (Method::POST, "Patient/_search", "search-type"),
            (Method::POST, "Patient", "create"),
            (Method::PUT, "Patient", "conditional-update"),
            (Method::DELETE, "Patient", "conditional-delete"),
            (Method::GET, "Patient/_history", "history-type"),
            (Method::GET, "Patient/p1", "read"),
            (Method::PUT, "Patient/p1", "update"),
            (Method::DELETE, "Patient/p1", "delete"),
            (Method::PATCH, "Patient/p1", "patch"),
            (Method::GET, "Patient/p1/_history", "history-instance"),
            (Method::GET, "Patient/p1/_history/2", "vread"),
            (Method::GET, "Patient/p1/Observation", "search-compartment"),
            (Method::GET, "Patient/p1/*", "search-compartment"),
            (Method::GET, "$export", "export"),
            (Method::POST, "Group/g1/$export", "export"),
            (Method::GET, "$export-status/j1", "export-status"),
            (Method::DELETE, "$export-status/j1", "export-status"),
            (Method::GET, "$export-file/j1/f.ndjson", "export-status"),
            (Method::GET, "Patient/p1/$everything", "everything"),
            (Method::POST, "Encounter/$everything", "everything"),
            (
                Method::GET,
                "Subscription/s1/$status",
                "subscription-status",
            ),
            (
                Method::GET,
                "Subscription/s1/$events",
                "subscription-events",
            ),
        ] {
            assert_eq!(label(method.clone(), path), want, "{method} {path}");
        }
    }

    #[test]
    fn what_names_no_interaction_is_refused_with_the_right_status() {
        let status = |method: Method, path: &str| {
            let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            Route::parse(&method, &segs).err().map(|e| e.status)
        };
        assert_eq!(
            status(Method::PUT, "metadata"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            status(Method::POST, "Patient/p1"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            status(Method::DELETE, "$export"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(status(Method::GET, "NotAType"), Some(StatusCode::NOT_FOUND));
        assert_eq!(
            status(Method::GET, "Observation/o1/Patient"),
            Some(StatusCode::NOT_FOUND),
            "Observation has no compartment"
        );
        assert_eq!(
            status(Method::GET, "Patient/p1/_history/2/x"),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            status(Method::GET, "Patient/$validate"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(Method::GET, "Patient/bad id!"),
            Some(StatusCode::BAD_REQUEST)
        );
    }
}
