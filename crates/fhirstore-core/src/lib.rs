//! fhirstore-core: the domain model every fhirstore backend shares.
//!
//! - [`TenantId`] and [`TenantContext`]: every call is scoped to one tenant.
//! - [`ResourceType`], [`LogicalId`], [`VersionId`], [`StoredResource`]: resource identity and
//!   versions.
//! - [`ResourceStorage`]: the trait users hold as `Arc<dyn ResourceStorage>`.
//! - [`Error`]: one error type, with [`Error::is_temporary`] for retry decisions.
//! - [`search`]: the typed search model; [`index`]: index-value extraction.
//! - [`registry`]: the official R4 search parameters, with [`fhirpath`] to evaluate them.
//! - [`digest`]: the element hashes and XOR segment digests used to find drift.
//! - [`json`]: JSON reading that refuses duplicate keys.
//! - [`secondary`]: the contract of a secondary store (version-guarded apply, digests).
//! - [`subscription`]: R4 Subscriptions: their criteria, matching, and the event log.

pub mod bundle;
pub mod changelog;
pub mod compartment;
pub mod date;
pub mod digest;
mod error;
pub mod fhirpath;
pub mod index;
pub mod json;
mod model;
pub mod registry;
pub mod resource;
mod resource_types;
pub mod search;
pub mod secondary;
mod storage;
pub mod subscription;
pub mod summary;
mod tenant;
#[cfg(feature = "validation")]
pub mod validate;

pub use changelog::Primary;
pub use error::{Error, Result};
pub use model::{
    format_instant, from_micros, is_valid_id, now_micros, parse_instant, to_micros, LogicalId,
    ResourceKey, ResourceType, StoredResource, VersionId,
};
pub use search::{Handling, SearchQuery};
pub use storage::{
    Capabilities, Deleted, HistoryPage, HistoryRequest, HistoryScope, OpOutcome, ReindexOptions,
    ReindexState, ReindexStatus, ResourceStorage, SearchPage, WriteKind, WriteOp, Written,
};
pub use tenant::{Permission, Permissions, TenantContext, TenantId};
