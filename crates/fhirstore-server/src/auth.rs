//! API tokens: each grants one tenant, and the admin token grants every tenant and the admin
//! endpoints. Tokens are held only as BLAKE3 hashes, and a request's token is hashed before it
//! is looked up, so the comparison takes the same time whatever the token.

use std::collections::HashMap;

use axum::http::{header, HeaderMap, StatusCode};
use fhirstore_core::{TenantContext, TenantId};

use crate::outcome::ApiError;

/// Who may call what.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tenants: HashMap<[u8; 32], String>,
    admin: Option<[u8; 32]>,
}

fn digest(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

impl Auth {
    /// From `(tenant, token)` pairs and the admin token; with none, every request is allowed.
    pub fn new(tokens: &[(String, String)], admin: Option<&str>) -> Self {
        Auth {
            tenants: tokens
                .iter()
                .map(|(tenant, token)| (digest(token), tenant.clone()))
                .collect(),
            admin: admin.map(digest),
        }
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.admin.is_some() || !self.tenants.is_empty()
    }

    fn presented(headers: &HeaderMap) -> Result<Option<[u8; 32]>, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("expected `Authorization: Bearer <token>`"))?;
        Ok(Some(digest(token)))
    }

    /// The context for a request to `tenant`. Without a token: 401. With a token that does not
    /// grant this tenant: 403, the same answer whether or not the tenant has any data.
    pub fn tenant(&self, headers: &HeaderMap, tenant: &str) -> Result<TenantContext, ApiError> {
        if self.enabled() {
            let token = Self::presented(headers)?
                .ok_or_else(|| unauthorized("this server requires an API token"))?;
            let granted =
                self.admin == Some(token) || self.tenants.get(&token).is_some_and(|t| t == tenant);
            if !granted {
                return Err(forbidden());
            }
        }
        let tenant = TenantId::new(tenant).map_err(|e| ApiError::not_found(e.to_string()))?;
        Ok(TenantContext::full(tenant))
    }

    /// Checks a call to an admin endpoint.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let token = Self::presented(headers)?
            .ok_or_else(|| unauthorized("this endpoint requires the admin token"))?;
        if self.admin == Some(token) {
            Ok(())
        } else {
            Err(forbidden())
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "login", message)
}

fn forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "the token does not grant access to this tenant",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("header"),
        );
        h
    }

    #[test]
    fn tokens_grant_their_tenant_only() {
        let auth = Auth::new(&[("a".into(), "ta".into())], Some("root"));
        assert!(auth.tenant(&bearer("ta"), "a").is_ok());
        assert_eq!(
            auth.tenant(&bearer("ta"), "b")
                .expect_err("other tenant")
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            auth.tenant(&HeaderMap::new(), "a")
                .expect_err("no token")
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert!(auth.tenant(&bearer("root"), "b").is_ok());
        assert!(auth.admin(&bearer("root")).is_ok());
        assert_eq!(
            auth.admin(&bearer("ta")).expect_err("tenant token").status,
            StatusCode::FORBIDDEN
        );
        let open = Auth::new(&[], None);
        assert!(open.tenant(&HeaderMap::new(), "x").is_ok());
        assert!(open.admin(&HeaderMap::new()).is_ok());
    }
}
