//! The immutable `TenantContext` every layer takes first, and the small enums it is made of.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::ids::{CorrelationId, PrincipalId, RunId, Scope, TenantId};
use super::settings::Budget;

/// What kind of actor a principal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// A person in a workspace.
    User,
    /// A machine credential (an API key, the operator's CLI).
    Service,
    /// The agent itself, acting on a principal's behalf.
    Agent,
}

impl PrincipalKind {
    /// The lower-case name used in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Service => "service",
            PrincipalKind::Agent => "agent",
        }
    }
}

/// A principal's role in one tenant, most powerful first.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Installed the app; can do everything, including granting admin.
    Owner,
    /// Manages settings, members, tools and policies.
    Admin,
    /// Runs commands with the tools granted to members.
    Member,
    /// Reads status; runs only read-only tools.
    Viewer,
}

impl Role {
    /// The lower-case name used in storage, policies and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    /// True when this role is at least as powerful as `other`.
    pub fn at_least(self, other: Role) -> bool {
        // The enum is declared most powerful first, so a smaller discriminant is more power.
        self <= other
    }

    /// The scopes a principal with this role holds by default.
    pub fn default_scopes(self) -> Vec<Scope> {
        let names: &[&str] = match self {
            Role::Owner | Role::Admin => {
                &["agent:invoke", "audit:read", "admin:read", "admin:write"]
            }
            Role::Member => &["agent:invoke"],
            Role::Viewer => &["agent:invoke:readonly"],
        };
        names
            .iter()
            .map(|s| s.parse().expect("built-in scopes are valid"))
            .collect()
    }
}

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            _ => Err(UnknownRole(s.to_owned())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of owner, admin, member, viewer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown role {0:?}: expected owner, admin, member or viewer")]
pub struct UnknownRole(pub String);

/// What set a run in motion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initiator {
    /// A person typed a command or mentioned the bot.
    User,
    /// A schedule.
    Cron,
    /// A platform callback such as an install or an uninstall.
    Webhook,
    /// Another agent run.
    Agent,
}

impl Initiator {
    /// The lower-case name used in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::User => "user",
            Initiator::Cron => "cron",
            Initiator::Webhook => "webhook",
            Initiator::Agent => "agent",
        }
    }
}

/// Who, when and why, carried by every event a run emits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditMeta {
    /// Unique per unit of work; threads through tools and logs.
    pub run_id: RunId,
    /// The platform's own id for the request, when it gave one.
    pub correlation_id: Option<CorrelationId>,
    /// When the work started.
    pub initiated_at: DateTime<Utc>,
    /// What started it.
    pub initiator: Initiator,
}

/// The immutable context of one unit of work in one tenant.
///
/// INVARIANT: a value of this type exists only if it was built by the tenant module from a verified
/// installation lookup or a verified credential. The fields are private and there is no public
/// constructor, so a transport cannot forge one and the store cannot be reached without one.
#[derive(Clone, Debug)]
pub struct TenantContext {
    tenant: TenantId,
    principal: PrincipalId,
    principal_kind: PrincipalKind,
    role: Role,
    scopes: Vec<Scope>,
    budget: Budget,
    audit: AuditMeta,
    features: BTreeMap<String, bool>,
}

/// The parts of a context, gathered by the tenant module before it seals them into a [`TenantContext`].
pub(super) struct ContextParts {
    pub tenant: TenantId,
    pub principal: PrincipalId,
    pub principal_kind: PrincipalKind,
    pub role: Role,
    pub scopes: Vec<Scope>,
    pub budget: Budget,
    pub audit: AuditMeta,
    pub features: BTreeMap<String, bool>,
}

impl TenantContext {
    /// Seals the parts. Visible to the tenant module only; see the type's invariant.
    pub(super) fn from_parts(p: ContextParts) -> Self {
        TenantContext {
            tenant: p.tenant,
            principal: p.principal,
            principal_kind: p.principal_kind,
            role: p.role,
            scopes: p.scopes,
            budget: p.budget,
            audit: p.audit,
            features: p.features,
        }
    }

    /// The tenant this work belongs to.
    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }

    /// Who acts.
    pub fn principal(&self) -> &PrincipalId {
        &self.principal
    }

    /// What kind of actor the principal is.
    pub fn principal_kind(&self) -> PrincipalKind {
        self.principal_kind
    }

    /// The principal's role in the tenant at the time the context was built.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The capability scopes granted to this unit of work.
    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    /// True when `scope` was granted.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s.as_str() == scope)
    }

    /// The ceilings this unit of work must stay under.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Run id, correlation id, start time and initiator.
    pub fn audit(&self) -> &AuditMeta {
        &self.audit
    }

    /// The tenant's feature flags, as they were when the context was built.
    pub fn features(&self) -> &BTreeMap<String, bool> {
        &self.features
    }

    /// True when the named feature flag is on.
    pub fn feature(&self, name: &str) -> bool {
        self.features.get(name).copied().unwrap_or(false)
    }
}
