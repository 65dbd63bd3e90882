//! Errors at the HTTP edge: every failure leaves as an `OperationOutcome` with the status R4
//! gives it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fhirstore_core::Error;
use serde_json::{json, Value};

/// The FHIR media type every body is sent as.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// An `OperationOutcome` with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]
    })
}

/// A failed request: a status, an `OperationOutcome` issue type and what went wrong.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The issue type (`invalid`, `not-found`, …).
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Where in the request it went wrong (`Bundle.entry[2]`), as the issue's `expression`.
    pub expression: Option<String>,
}

impl ApiError {
    /// An error with this status and issue type.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            expression: None,
        }
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// 404 for a path or resource type the server does not know.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", message)
    }

    /// The status line text of a Bundle response entry, such as `404 Not Found`.
    pub fn status_line(&self) -> String {
        status_line(self.status)
    }

    /// The `OperationOutcome` body.
    pub fn outcome(&self) -> Value {
        let mut o = operation_outcome("error", self.code, &self.message);
        if let (Some(x), Some(issue)) = (&self.expression, o.pointer_mut("/issue/0")) {
            issue["expression"] = json!([x]);
        }
        o
    }
}

/// `200 OK`, `201 Created`, …: how Bundle response entries write a status.
pub fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match e.kind() {
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Error::Gone(_) => (StatusCode::GONE, "deleted"),
            // Only an `If-Match` (or a Bundle entry's `ifMatch`) can name a version.
            Error::VersionConflict { .. } => (StatusCode::PRECONDITION_FAILED, "conflict"),
            Error::AlreadyExists(_) => (StatusCode::CONFLICT, "duplicate"),
            Error::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "multiple-matches"),
            Error::InvalidResource(_) => (StatusCode::UNPROCESSABLE_ENTITY, "processing"),
            Error::InvalidSearch(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            Error::TooCostly(_) => (StatusCode::BAD_REQUEST, "too-costly"),
            Error::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "no-store"),
            Error::TenantDenied(_) => (StatusCode::FORBIDDEN, "forbidden"),
            // The client asked for something this server does not do: its request's fault,
            // not a server failure that a retry could mend.
            Error::Unsupported(_) => (StatusCode::BAD_REQUEST, "not-supported"),
            Error::Configuration(_) => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
            e if e.is_temporary() => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "request failed");
        }
        let mut api = ApiError::new(status, code, e.to_string());
        api.expression = e.entry().map(|i| format!("Bundle.entry[{i}]"));
        api
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.outcome()).unwrap_or_default();
        let mut r = (self.status, body).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        match self.status {
            StatusCode::UNAUTHORIZED => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"fhirstore\""),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        r
    }
}

/// The result of every handler.
pub type ApiResult<T = Response> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_a_full_disk_have_their_statuses() {
        for (e, status, code) in [
            (
                Error::TooLarge("x".into()),
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-long",
            ),
            (
                Error::TooCostly("x".into()),
                StatusCode::BAD_REQUEST,
                "too-costly",
            ),
            (
                Error::StorageFull("x".into()),
                StatusCode::INSUFFICIENT_STORAGE,
                "no-store",
            ),
        ] {
            let a = ApiError::from(e);
            assert_eq!((a.status, a.code), (status, code));
            assert_eq!(a.outcome()["resourceType"], "OperationOutcome");
        }
    }
}
