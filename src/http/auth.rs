//! The bearer-auth extractor: an API key (plus optional acting-user and tenant headers) becomes the
//! request's `TenantContext`, and a per-tenant rate limit is applied.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::tenant::{KeyError, TenantContext};

/// The header a service key uses to act for a user (`slack:U…`, `discord:…`).
pub const ACTING_USER: &str = "agentgate-acting-user";
/// The header that, when sent, must name the key's tenant.
pub const TENANT: &str = "agentgate-tenant";

/// The authenticated context of an API request.
pub struct ApiContext(pub TenantContext);

impl ApiContext {
    /// Requires a scope.
    ///
    /// # Errors
    /// [`ApiError::Forbidden`] without it.
    pub fn require(&self, scope: &str) -> Result<&TenantContext, ApiError> {
        // Writing administrative state needs the admin role as well as the scope, whatever the
        // scope list says.
        let role_ok =
            !scope.starts_with("admin:write") || self.0.role().at_least(crate::tenant::Role::Admin);
        if self.0.has_scope(scope) && role_ok {
            Ok(&self.0)
        } else {
            Err(ApiError::Forbidden(format!("this needs the {scope} scope")))
        }
    }
}

impl FromRequestParts<AppState> for ApiContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let h = |k: &str| parts.headers.get(k).and_then(|v| v.to_str().ok());
        let token = h("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        let ctx = state
            .tenants
            .authenticate(token.trim(), h(ACTING_USER), h(TENANT), h("x-request-id"))
            .map_err(|e| {
                crate::metrics::inc(&crate::metrics::AUTH_FAILURES);
                match e {
                    KeyError::TenantMismatch => {
                        ApiError::Forbidden("the tenant header does not match the key".into())
                    }
                    KeyError::BadActingUser => ApiError::BadRequest("invalid acting user".into()),
                    KeyError::Store(e) => ApiError::Internal(e.into()),
                    _ => ApiError::Unauthorized,
                }
            })?;
        if !state.api_limiter.allow(ctx.tenant_id()) {
            return Err(ApiError::TooManyRequests);
        }
        Ok(ApiContext(ctx))
    }
}
