//! Tenancy: identifiers, the immutable `TenantContext`, settings, and the `Tenants` service that is the
//! only place a context is built (from a verified installation lookup, or for the operator's CLI).
//!
//! Resolution fails closed: an unknown workspace, a revoked installation or a tenant whose records are
//! missing or corrupt is a typed error, never a default tenant.

mod context;
mod ids;
mod keys;
mod limits;
mod service;
mod settings;

pub use context::{AuditMeta, Initiator, PrincipalKind, Role, TenantContext, UnknownRole};
pub use ids::{CorrelationId, IdError, PrincipalId, RunId, Scope, TenantId};
pub use keys::{is_live, IssuedKey, KeyError, KeyRole, DEFAULT_API_KEY_DAYS, MAX_API_KEY_DAYS};
pub use limits::LimitsChange;
pub use service::{
    InstallOutcome, Installed, ProvisionError, ResolveError, Resolved, Tenants, WorkspaceRequest,
};
pub use settings::{
    default_tool_grants, label_ok, tenant_key_prefix, tenant_key_ref, Budget, LlmSettings,
    MonthlyQuota, Plan, TenantSettings, ToolGrant,
};
