//! The one error type every fhirstore backend returns.

use std::fmt;

/// Result alias used across fhirstore.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a storage call.
///
/// The kinds map onto FHIR HTTP outcomes (404, 410, 409/412, 400/422, 403, 5xx), so the REST
/// layer never needs to parse messages. [`Error::is_temporary`] tells a caller whether retrying
/// the same call may succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The resource, version or tenant data asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The resource exists but its current version is a deletion.
    #[error("gone: {0}")]
    Gone(String),
    /// An optimistic-locking check failed: the caller's version is not the current one.
    #[error("version conflict on {key}: expected version {expected}, current is {current}")]
    VersionConflict {
        /// `Type/id` of the resource.
        key: String,
        /// The version the caller said it was updating.
        expected: u64,
        /// The version actually stored (0 when the resource does not exist).
        current: u64,
    },
    /// A resource with this identity already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A conditional operation's criteria matched more than one resource (FHIR: 412).
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The resource body is not acceptable; nothing was stored.
    #[error("invalid resource: {0}")]
    InvalidResource(String),
    /// The search is malformed; the message names the parameter and value.
    #[error("invalid search: {0}")]
    InvalidSearch(String),
    /// A size limit was exceeded (a resource's bytes, a Bundle's entries, a response's bytes);
    /// the message names the limit and its configured value. Nothing was stored.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A request would cost more than a configured limit allows (criteria, chain depth, sort
    /// keys, OR values, includes); the message names the limit and its value.
    #[error("too costly: {0}")]
    TooCostly(String),
    /// The store has no room left (its disk is full); nothing of the write was stored, and
    /// what was stored before is intact. Writes succeed again once space is freed.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The caller's tenant context does not permit this operation.
    #[error("tenant denied: {0}")]
    TenantDenied(String),
    /// The backend cannot do this (a parameter type, modifier or interaction it does not support).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The backend failed: I/O, the database, a lost connection.
    #[error("backend error: {message}")]
    Backend {
        /// What failed, for people.
        message: String,
        /// Whether retrying may help (a lost connection, a deadlock, a busy database).
        temporary: bool,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// Whether retrying the same call may succeed.
    ///
    /// Only backend failures can be temporary; every other kind describes the request or the
    /// stored data and will fail the same way again.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Error::Backend {
                temporary: true,
                ..
            }
        )
    }

    /// Marks a temporary backend failure as permanent, for a caller that has exhausted its
    /// retries and must not let an outer layer retry again.
    pub fn set_persistent(self) -> Self {
        match self {
            Error::Backend {
                message, source, ..
            } => Error::Backend {
                message,
                temporary: false,
                source,
            },
            other => other,
        }
    }
    /// A backend failure with no underlying error value: `message` says what went wrong.
    pub fn backend_msg(message: impl fmt::Display, temporary: bool) -> Self {
        Error::Backend {
            message: message.to_string(),
            temporary,
            source: None,
        }
    }

    /// A secondary that cannot answer until it is rebuilt from the primary: new, or its data
    /// lost or damaged. Temporary, since it answers again once rebuilt.
    pub fn needs_rebuild(backend: &str, why: impl fmt::Display) -> Self {
        Self::backend_msg(
            format!("{backend} cannot answer until it is rebuilt from the primary: {why}"),
            true,
        )
    }

    /// A backend failure with its cause.
    pub fn backend(
        message: impl fmt::Display,
        temporary: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            message: message.to_string(),
            temporary,
            source: Some(Box::new(source)),
        }
    }

    /// Prefixes the message with the position of a Bundle entry, so a failed transaction says
    /// which entry broke it. The kind is kept.
    pub fn in_entry(self, index: usize) -> Self {
        let at = |m: String| format!("entry {index}: {m}");
        match self {
            Error::NotFound(m) => Error::NotFound(at(m)),
            Error::Gone(m) => Error::Gone(at(m)),
            Error::AlreadyExists(m) => Error::AlreadyExists(at(m)),
            Error::PreconditionFailed(m) => Error::PreconditionFailed(at(m)),
            Error::InvalidResource(m) => Error::InvalidResource(at(m)),
            Error::InvalidSearch(m) => Error::InvalidSearch(at(m)),
            Error::TenantDenied(m) => Error::TenantDenied(at(m)),
            Error::Unsupported(m) => Error::Unsupported(at(m)),
            Error::TooLarge(m) => Error::TooLarge(at(m)),
            Error::TooCostly(m) => Error::TooCostly(at(m)),
            Error::StorageFull(m) => Error::StorageFull(at(m)),
            Error::Backend {
                message,
                temporary,
                source,
            } => Error::Backend {
                message: at(message),
                temporary,
                source,
            },
            other @ Error::VersionConflict { .. } => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_temporary_backend_errors_are_retryable() {
        let io = std::io::Error::other("connection reset");
        let e = Error::backend("lost connection", true, io);
        assert!(e.is_temporary());
        assert!(!e.set_persistent().is_temporary());
        assert!(!Error::NotFound("Patient/x".into()).is_temporary());
        assert!(!Error::VersionConflict {
            key: "Patient/x".into(),
            expected: 1,
            current: 2
        }
        .is_temporary());
    }

    #[test]
    fn entry_prefix_keeps_the_kind() {
        let e = Error::InvalidResource("bad".into()).in_entry(3);
        assert!(matches!(&e, Error::InvalidResource(m) if m == "entry 3: bad"));
    }
}
