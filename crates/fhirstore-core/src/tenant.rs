//! Tenants and the context every storage call carries.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A validated tenant identifier: 1 to 64 characters of `[A-Za-z0-9-]`.
///
/// The restricted alphabet matters beyond tidiness: tenant ids are embedded in SQL rows, Redis
/// keys (inside `{…}` hash tags) and index documents, and must never contain a separator.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Validates and wraps a tenant id.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let ok = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(TenantId(id))
        } else {
            Err(Error::TenantDenied(format!(
                "invalid tenant id {id:?}: expected 1-64 characters of [A-Za-z0-9-]"
            )))
        }
    }

    /// The tenant id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TenantId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TenantId::new(s)
    }
}

/// One thing a caller may be allowed to do within a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// read, vread, history, search, count.
    Read,
    /// create and update (including conditional forms).
    Write,
    /// delete (including conditional delete).
    Delete,
    /// Operational calls: clearing a tenant, rebuilding secondaries, reconciling.
    Admin,
}

/// The set of permissions a context grants. A plain struct of flags, cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// May read.
    pub read: bool,
    /// May create and update.
    pub write: bool,
    /// May delete.
    pub delete: bool,
    /// May run operational calls.
    pub admin: bool,
}

impl Permissions {
    /// Every permission.
    pub const ALL: Permissions = Permissions {
        read: true,
        write: true,
        delete: true,
        admin: true,
    };
    /// Read only.
    pub const READ_ONLY: Permissions = Permissions {
        read: true,
        write: false,
        delete: false,
        admin: false,
    };

    /// Whether `p` is granted.
    pub fn allows(&self, p: Permission) -> bool {
        match p {
            Permission::Read => self.read,
            Permission::Write => self.write,
            Permission::Delete => self.delete,
            Permission::Admin => self.admin,
        }
    }
}

/// Who is asking, on behalf of which tenant. No storage call reads or writes without one, so a
/// query that forgets its tenant cannot be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantContext {
    tenant: TenantId,
    permissions: Permissions,
}

impl TenantContext {
    /// A context for `tenant` with the given permissions.
    pub fn new(tenant: TenantId, permissions: Permissions) -> Self {
        TenantContext {
            tenant,
            permissions,
        }
    }

    /// A context with every permission, for embedded use and tests.
    pub fn full(tenant: TenantId) -> Self {
        TenantContext::new(tenant, Permissions::ALL)
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The granted permissions.
    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// Fails with [`Error::TenantDenied`] unless `p` is granted.
    pub fn require(&self, p: Permission) -> Result<()> {
        if self.permissions.allows(p) {
            Ok(())
        } else {
            Err(Error::TenantDenied(format!(
                "tenant {} context lacks {p:?} permission",
                self.tenant
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_validated() {
        assert!(TenantId::new("acme-1").is_ok());
        assert!(TenantId::new("a".repeat(64)).is_ok());
        for bad in ["", "a b", "a|b", "a{b}", "ü", "a_b", &"a".repeat(65)] {
            assert!(TenantId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn permissions_are_enforced() {
        let t = TenantId::new("t1").expect("valid");
        let ro = TenantContext::new(t, Permissions::READ_ONLY);
        assert!(ro.require(Permission::Read).is_ok());
        assert!(matches!(
            ro.require(Permission::Write),
            Err(Error::TenantDenied(_))
        ));
        assert!(ro.require(Permission::Delete).is_err());
        assert!(ro.require(Permission::Admin).is_err());
    }
}
