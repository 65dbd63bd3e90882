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
    /// The store or one of its backends was set up wrongly (a bad key prefix, a secondary
    /// named twice, a backend this build lacks): found when it opens, not caused by a request.
    #[error("configuration: {0}")]
    Configuration(String),
    /// One entry of a Bundle failed: `index` is its position in the Bundle (from 0), `error`
    /// what went wrong with it. [`Error::kind`] looks through to `error`.
    #[error("entry {index}: {error}")]
    InEntry {
        /// The entry's position in the Bundle.
        index: usize,
        /// The entry's own error.
        error: Box<Error>,
    },
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
            self.kind(),
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
            Error::InEntry { index, error } => Error::InEntry {
                index,
                error: Box::new(error.set_persistent()),
            },
            other => other,
        }
    }

    /// What went wrong, looking through the Bundle entry that carried it: match on this to
    /// tell the kinds apart whether or not the error came from an entry.
    pub fn kind(&self) -> &Error {
        match self {
            Error::InEntry { error, .. } => error.kind(),
            other => other,
        }
    }

    /// The position of the Bundle entry that failed, if the error came from one.
    pub fn entry(&self) -> Option<usize> {
        match self {
            Error::InEntry { index, .. } => Some(*index),
            _ => None,
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

    /// Marks the error as that of the Bundle entry at `index`, so a failed transaction says
    /// which entry broke it. An error already marked keeps its first entry.
    pub fn in_entry(self, index: usize) -> Self {
        match self {
            e @ Error::InEntry { .. } => e,
            other => Error::InEntry {
                index,
                error: Box::new(other),
            },
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
    fn entries_keep_the_kind_and_the_index() {
        let e = Error::InvalidResource("bad".into()).in_entry(3);
        assert!(matches!(e.kind(), Error::InvalidResource(m) if m == "bad"));
        assert_eq!(e.entry(), Some(3));
        assert_eq!(e.to_string(), "entry 3: invalid resource: bad");
        // The innermost entry is the one that failed.
        assert_eq!(e.in_entry(7).entry(), Some(3));
        assert_eq!(Error::NotFound("x".into()).entry(), None);
        let busy = Error::backend_msg("busy", true).in_entry(1);
        assert!(busy.is_temporary());
        let busy = busy.set_persistent();
        assert!(!busy.is_temporary());
        assert_eq!(busy.entry(), Some(1));
    }
}
