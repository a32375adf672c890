//! The `Tenants` service: resolves verified platform identities to contexts, provisions tenants when
//! their first installation arrives, and revokes installations.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use secrecy::ExposeSecret;

use super::context::{AuditMeta, ContextParts, Initiator, PrincipalKind, Role, TenantContext};
use super::ids::{CorrelationId, PrincipalId, RunId, TenantId};
use super::settings::{default_tool_grants, Budget, TenantSettings};
use crate::audit::{AuditError, AuditSink, EventBody};
use crate::installation::manifest::Manifest;
use crate::installation::{
    InstallSource, Installation, InstallationId, InstallationStatus, NewInstallation,
    PlatformIdentity, Workspace, WorkspaceError,
};
use crate::store::{DirectoryEntry, Store, StoreError, TenantSummary};

/// Why no context was built for a request.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The request's workspace ids are malformed.
    #[error("malformed workspace identity: {0}")]
    Malformed(#[from] WorkspaceError),
    /// No installation exists for the workspace.
    #[error("this workspace has not installed agentgate")]
    UnknownWorkspace,
    /// The workspace's installation was revoked.
    #[error("agentgate was uninstalled from this workspace")]
    Revoked,
    /// The directory names a tenant or installation whose records are missing.
    #[error("tenant {0} is not provisioned")]
    NotProvisioned(TenantId),
    /// The store failed or holds a corrupt record.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an installation could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The event recording it could not be made durable, so nothing was changed after it.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operator named a tenant that does not exist.
    #[error("tenant {0} does not exist")]
    UnknownTenant(TenantId),
    /// The workspace is installed in another tenant than the one named.
    #[error("workspace {workspace} is already installed in tenant {tenant}")]
    InstalledElsewhere {
        /// The workspace.
        workspace: String,
        /// Its tenant.
        tenant: TenantId,
    },
    /// No installation exists for the workspace.
    #[error("workspace {0} has no installation")]
    UnknownWorkspace(String),
    /// No installation has that id.
    #[error("installation {0} not found")]
    UnknownInstallation(InstallationId),
}

/// A request from a platform whose signature was verified: who, where, and the platform's request id.
#[derive(Clone, Debug)]
pub struct WorkspaceRequest {
    /// The workspace the request came from.
    pub identity: PlatformIdentity,
    /// The platform user who sent it, qualified (`slack:U…`, `discord:…`).
    pub user: PrincipalId,
    /// The platform's id for the request.
    pub correlation_id: Option<CorrelationId>,
    /// What started the work.
    pub initiator: Initiator,
}

/// A resolved request: its context and the installation it came through.
#[derive(Debug)]
pub struct Resolved {
    /// The context for the work.
    pub ctx: TenantContext,
    /// The installation, with its tokens, for replying.
    pub installation: Installation,
}

/// What an install did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallOutcome {
    /// A new tenant was provisioned with this installation.
    TenantCreated,
    /// The installation was added to an existing tenant.
    Added,
    /// An existing installation's record changed.
    Updated,
    /// Nothing changed.
    Unchanged,
    /// The installation was revoked and a declared file does not bring it back.
    KeptRevoked,
}

/// The result of an install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    /// The tenant.
    pub tenant: TenantId,
    /// The installation.
    pub installation: InstallationId,
    /// What happened.
    pub outcome: InstallOutcome,
}

/// The tenancy service. Cheap to clone.
#[derive(Clone)]
pub struct Tenants {
    store: Store,
    audit: Arc<dyn AuditSink>,
    /// The key API key secrets are hashed under, derived from the master key.
    key_pepper: Arc<secrecy::SecretString>,
    /// One lock per tenant for changes to its API keys (revoke, rotate), which read a key, append
    /// an audit event and write the key back: without it a rotation racing a revocation could
    /// leave a live successor of a revoked key, or move a revocation later.
    key_locks: Arc<TenantLocks>,
    /// One lock per tenant for changes to its settings, which read them, append an audit event and
    /// write them back: without it two changes at once would both be audited and one lost.
    settings_locks: Arc<TenantLocks>,
    /// One lock per tenant for changes to an existing installation (an update, a revocation, a
    /// rotated token pair), which read the record, append an audit event and write it back:
    /// without it a token refresh that finishes after an uninstall could write the installation
    /// back as active.
    install_locks: Arc<TenantLocks>,
}

/// One lock per tenant, for one kind of change.
type TenantLocks =
    std::sync::Mutex<std::collections::HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>;

/// Waits for `tenant`'s lock in `locks` and holds it until the guard drops.
async fn lock_tenant(locks: &TenantLocks, tenant: &TenantId) -> tokio::sync::OwnedMutexGuard<()> {
    let lock = Arc::clone(
        locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(tenant.clone())
            .or_default(),
    );
    lock.lock_owned().await
}

/// Who a context acts for.
struct Actor {
    principal: PrincipalId,
    kind: PrincipalKind,
    role: Role,
}

impl Actor {
    fn new(principal: PrincipalId, kind: PrincipalKind, role: Role) -> Self {
        Actor {
            principal,
            kind,
            role,
        }
    }
}

/// The principal the operator's CLI acts as.
const OPERATOR: &str = "operator:cli";

impl Tenants {
    /// A service over `store`, recording events in `audit`, hashing API key secrets under
    /// `key_pepper` (derived from the master key). A constructor argument, not a setter, so that
    /// no service can hash keys under an empty pepper by leaving it out.
    pub fn new(store: Store, audit: Arc<dyn AuditSink>, key_pepper: secrecy::SecretString) -> Self {
        Tenants {
            store,
            audit,
            key_pepper: Arc::new(key_pepper),
            key_locks: Arc::default(),
            settings_locks: Arc::default(),
            install_locks: Arc::default(),
        }
    }

    /// Holds the tenant's installation lock until the guard drops.
    async fn lock_installs(&self, tenant: &TenantId) -> tokio::sync::OwnedMutexGuard<()> {
        lock_tenant(&self.install_locks, tenant).await
    }

    /// Holds the tenant's API key lock until the guard drops.
    pub(super) async fn lock_keys(&self, tenant: &TenantId) -> tokio::sync::OwnedMutexGuard<()> {
        lock_tenant(&self.key_locks, tenant).await
    }

    /// Holds the tenant's settings lock until the guard drops: every read, change and write back of
    /// a tenant's settings happens under it.
    pub async fn lock_settings(&self, tenant: &TenantId) -> tokio::sync::OwnedMutexGuard<()> {
        lock_tenant(&self.settings_locks, tenant).await
    }

    pub(super) fn key_pepper(&self) -> &secrecy::SecretString {
        &self.key_pepper
    }
    /// Appends `body` to the context's tenant log, taking it as recorded once it is durable
    /// ([`crate::audit::on_record`]): a fold or a due checkpoint that fails after the append must
    /// not leave a change on record but not made (an installation, a role, a key, a limit).
    pub(super) async fn record(
        &self,
        ctx: &TenantContext,
        body: EventBody,
    ) -> Result<(), crate::audit::AuditError> {
        let what = body.type_name();
        crate::audit::on_record(self.audit.append(ctx, body).await, what)
    }

    /// A context that may only read a tenant's records, to check a credential.
    pub(super) fn probe_context(tenant: &TenantId) -> TenantContext {
        Self::lookup_context(tenant, &"system:auth".parse().expect("a valid principal"))
    }

    /// The store, for callers that hold a context.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Builds a context for work in a tenant on behalf of `actor`.
    fn context(
        tenant: TenantId,
        Actor {
            principal,
            kind,
            role,
        }: Actor,
        budget: Budget,
        features: BTreeMap<String, bool>,
        correlation_id: Option<CorrelationId>,
        initiator: Initiator,
    ) -> TenantContext {
        TenantContext::from_parts(ContextParts {
            tenant,
            principal,
            principal_kind: kind,
            scopes: role.default_scopes(),
            role,
            budget,
            audit: AuditMeta {
                run_id: RunId::generate(),
                correlation_id,
                initiated_at: Utc::now(),
                initiator,
            },
            features,
        })
    }

    /// A context that may read a tenant's records while resolving, with no budget and no scopes.
    fn lookup_context(tenant: &TenantId, principal: &PrincipalId) -> TenantContext {
        TenantContext::from_parts(ContextParts {
            tenant: tenant.clone(),
            principal: principal.clone(),
            principal_kind: PrincipalKind::Service,
            role: Role::Viewer,
            scopes: Vec::new(),
            budget: Budget {
                tokens: 0,
                tool_calls: 0,
                walltime_ms: 0,
                cost_microcents: 0,
            },
            audit: AuditMeta {
                run_id: RunId::generate(),
                correlation_id: None,
                initiated_at: Utc::now(),
                initiator: Initiator::Webhook,
            },
            features: BTreeMap::new(),
        })
    }

    /// Resolves a verified platform request to a context, through the workspace's installation record.
    ///
    /// # Errors
    /// [`ResolveError`]: a malformed identity, an unknown workspace, a revoked installation, a tenant
    /// whose records are missing, or a store failure (a corrupt record among them).
    pub fn resolve(&self, req: &WorkspaceRequest) -> Result<Resolved, ResolveError> {
        self.resolve_with(req, false)
    }

    /// As [`Tenants::resolve`], for a user the platform itself vouches is an administrator of the
    /// workspace (a Discord guild's owner, or a member holding Administrator): such a user holds at
    /// least the admin role, whatever the membership table says.
    ///
    /// # Errors
    /// As [`Tenants::resolve`].
    pub fn resolve_with(
        &self,
        req: &WorkspaceRequest,
        platform_admin: bool,
    ) -> Result<Resolved, ResolveError> {
        let mut found = None;
        for ws in req.identity.candidates()? {
            if let Some(entry) = self.store.directory().lookup(&ws.directory_key())? {
                found = Some(entry);
                break;
            }
        }
        let entry = found.ok_or(ResolveError::UnknownWorkspace)?;
        let lookup = Self::lookup_context(&entry.tenant, &req.user);
        let repos = self.store.for_tenant(&lookup)?;
        let installation = repos
            .installations()
            .get(&entry.installation)?
            .ok_or_else(|| ResolveError::NotProvisioned(entry.tenant.clone()))?;
        if !installation.is_active() {
            return Err(ResolveError::Revoked);
        }
        let settings = repos
            .settings()
            .get()?
            .ok_or_else(|| ResolveError::NotProvisioned(entry.tenant.clone()))?;
        let mut role = repos
            .members()
            .role_of(&req.user)?
            .unwrap_or(settings.default_role);
        if platform_admin && !role.at_least(Role::Admin) {
            role = Role::Admin;
        }
        let ctx = Self::context(
            entry.tenant,
            Actor::new(req.user.clone(), PrincipalKind::User, role),
            settings.run_ceilings,
            settings.features,
            req.correlation_id.clone(),
            req.initiator,
        );
        Ok(Resolved { ctx, installation })
    }

    /// Forgets, in every tenant, the platform request ids first seen before `before` (Unix
    /// seconds), which no platform retries or replays any more; returns how many. Reviewed admin
    /// path, for the gateway's sweeper: each tenant's ids are removed through its own repository.
    ///
    /// # Errors
    /// [`ResolveError::Store`] on a store failure (the tenants swept before it stay swept).
    pub fn sweep_seen(&self, before: i64) -> Result<usize, ResolveError> {
        let sweeper: PrincipalId = "system:sweeper".parse().expect("a valid principal");
        let mut n = 0;
        for t in self.store.admin().tenants()? {
            let repos = self
                .store
                .for_tenant(&Self::lookup_context(&t.id, &sweeper))?;
            n += repos.dedupe().sweep(before)?;
        }
        Ok(n)
    }

    /// A context for the operator's CLI in an existing tenant. Reviewed admin path: the operator has
    /// the data directory and the master key, so it is already trusted with every tenant.
    ///
    /// # Errors
    /// [`ResolveError::NotProvisioned`] for a tenant that is not registered, or a store failure.
    pub fn operator_context(&self, tenant: &TenantId) -> Result<TenantContext, ResolveError> {
        let known = self
            .store
            .admin()
            .tenants()?
            .into_iter()
            .any(|t| &t.id == tenant);
        if !known {
            return Err(ResolveError::NotProvisioned(tenant.clone()));
        }
        let operator: PrincipalId = OPERATOR.parse().expect("the operator principal is valid");
        let repos = self
            .store
            .for_tenant(&Self::lookup_context(tenant, &operator))?;
        let settings = repos
            .settings()
            .get()?
            .ok_or_else(|| ResolveError::NotProvisioned(tenant.clone()))?;
        Ok(Self::context(
            tenant.clone(),
            Actor::new(operator, PrincipalKind::Service, Role::Admin),
            settings.run_ceilings,
            settings.features,
            None,
            Initiator::User,
        ))
    }

    /// The context of a run being resumed after a restart: the run's own id, principal, correlation
    /// id and start time, with the principal's role looked up afresh (permissions may have changed).
    /// The run was started from a verified context and its checkpoint is the tenant's own record.
    ///
    /// # Errors
    /// [`ResolveError`] when the tenant or its settings are gone, or an id in the checkpoint is malformed.
    pub fn resume_context(
        &self,
        tenant: &TenantId,
        principal: &str,
        run_id: &str,
        correlation_id: Option<&str>,
        started_at: chrono::DateTime<Utc>,
        initiator: Initiator,
    ) -> Result<TenantContext, ResolveError> {
        let malformed = |e: super::ids::IdError| {
            ResolveError::Store(StoreError::Corrupt {
                key: format!("{tenant}/run-state/{run_id}"),
                why: e.to_string(),
            })
        };
        let principal: PrincipalId = principal.parse().map_err(malformed)?;
        let run_id: RunId = run_id.parse().map_err(malformed)?;
        let correlation_id = correlation_id
            .map(str::parse)
            .transpose()
            .map_err(malformed)?;
        let repos = self
            .store
            .for_tenant(&Self::lookup_context(tenant, &principal))?;
        let settings = repos
            .settings()
            .get()?
            .ok_or_else(|| ResolveError::NotProvisioned(tenant.clone()))?;
        let role = repos
            .members()
            .role_of(&principal)?
            .unwrap_or(settings.default_role);
        let kind = if principal.as_str().starts_with("slack:")
            || principal.as_str().starts_with("discord:")
        {
            PrincipalKind::User
        } else {
            PrincipalKind::Service
        };
        Ok(TenantContext::from_parts(ContextParts {
            tenant: tenant.clone(),
            principal,
            principal_kind: kind,
            scopes: role.default_scopes(),
            role,
            budget: settings.run_ceilings,
            audit: AuditMeta {
                run_id,
                correlation_id,
                initiated_at: started_at,
                initiator,
            },
            features: settings.features,
        }))
    }

    /// Stores an installation, provisioning its tenant when this is the tenant's first installation.
    ///
    /// `into` puts a new workspace into an existing tenant (a declared file with several workspaces);
    /// otherwise a new workspace gets a new tenant named `tenant_name`. Each step's audit event is
    /// appended before the step, and the workspace becomes resolvable only at the very end.
    ///
    /// # Errors
    /// [`ProvisionError`]; on any error, the workspace is not resolvable unless it was before.
    pub async fn install(
        &self,
        new: NewInstallation,
        tenant_name: &str,
        into: Option<&TenantId>,
    ) -> Result<Installed, ProvisionError> {
        let key = new.workspace.directory_key();
        let initiator = match new.source {
            InstallSource::OAuth => Initiator::Webhook,
            InstallSource::Declared { .. } => Initiator::User,
        };
        if let Some(entry) = self.store.directory().lookup(&key)? {
            if into.is_some_and(|t| *t != entry.tenant) {
                return Err(ProvisionError::InstalledElsewhere {
                    workspace: key,
                    tenant: entry.tenant,
                });
            }
            return self.update_existing(entry, new, initiator).await;
        }

        let (tenant, fresh) = match into {
            Some(t) => {
                if !self.store.admin().tenants()?.iter().any(|s| &s.id == t) {
                    return Err(ProvisionError::UnknownTenant(t.clone()));
                }
                (t.clone(), false)
            }
            None => (TenantId::generate(), true),
        };
        let defaults = TenantSettings::defaults(tenant_name);
        let ctx = Self::context(
            tenant.clone(),
            Actor::new(new.installer.clone(), PrincipalKind::User, Role::Owner),
            defaults.run_ceilings.clone(),
            defaults.features.clone(),
            None,
            initiator,
        );
        let repos = self.store.for_tenant(&ctx)?;
        if fresh {
            self.record(
                &ctx,
                EventBody::TenantProvisioned {
                    name: tenant_name.to_owned(),
                    plan: "free".to_owned(),
                },
            )
            .await?;
            repos.settings().put(&defaults)?;
            for grant in default_tool_grants() {
                repos.grants().put(&grant)?;
            }
        }
        if repos.members().role_of(&new.installer)?.is_none() {
            self.record(
                &ctx,
                EventBody::RoleGranted {
                    principal: new.installer.to_string(),
                    role: Role::Owner.to_string(),
                },
            )
            .await?;
        }
        let now = Utc::now();
        let installation = Installation {
            id: InstallationId::generate(),
            tenant: tenant.clone(),
            workspace: new.workspace.clone(),
            app_id: new.app_id,
            bot_user_id: new.bot_user_id,
            bot_token: new.bot_token,
            refresh_token: new.refresh_token,
            token_expires_at: new.token_expires_at,
            scopes: new.scopes,
            installer: new.installer,
            installed_at: now,
            updated_at: now,
            status: InstallationStatus::Active,
            source: new.source,
        };
        self.record(
            &ctx,
            EventBody::InstallationCreated {
                installation_id: installation.id.to_string(),
                platform: installation.workspace.platform().as_str().to_owned(),
                workspace: key.clone(),
                source: source_name(&installation.source).to_owned(),
            },
        )
        .await?;
        repos.installations().put(&installation)?;
        let summary = TenantSummary {
            id: tenant.clone(),
            name: tenant_name.to_owned(),
            created_at: now,
        };
        let entry = DirectoryEntry {
            tenant: tenant.clone(),
            installation: installation.id.clone(),
        };
        self.store.directory().bind(&key, &entry, &summary)?;
        Ok(Installed {
            tenant,
            installation: installation.id,
            outcome: if fresh {
                InstallOutcome::TenantCreated
            } else {
                InstallOutcome::Added
            },
        })
    }

    async fn update_existing(
        &self,
        entry: DirectoryEntry,
        new: NewInstallation,
        initiator: Initiator,
    ) -> Result<Installed, ProvisionError> {
        let _guard = self.lock_installs(&entry.tenant).await;
        let lookup = Self::lookup_context(&entry.tenant, &new.installer);
        let repos = self.store.for_tenant(&lookup)?;
        let mut current = repos
            .installations()
            .get(&entry.installation)?
            .ok_or_else(|| ProvisionError::UnknownInstallation(entry.installation.clone()))?;
        let done = |outcome| Installed {
            tenant: entry.tenant.clone(),
            installation: entry.installation.clone(),
            outcome,
        };
        let revoked = !current.is_active();
        if revoked && matches!(new.source, InstallSource::Declared { .. }) {
            // An operator revoked it; re-reading the same file at the next start must not undo that.
            return Ok(done(InstallOutcome::KeptRevoked));
        }
        let mut changed = Vec::new();
        let same_secret =
            |a: &Option<secrecy::SecretString>, b: &Option<secrecy::SecretString>| match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
                _ => false,
            };
        if current.app_id != new.app_id {
            changed.push("app_id");
        }
        if current.bot_user_id != new.bot_user_id {
            changed.push("bot_user_id");
        }
        if !same_secret(&current.bot_token, &new.bot_token) {
            changed.push("bot_token");
        }
        if !same_secret(&current.refresh_token, &new.refresh_token) {
            changed.push("refresh_token");
        }
        if current.token_expires_at != new.token_expires_at {
            changed.push("token_expires_at");
        }
        if current.scopes != new.scopes {
            changed.push("scopes");
        }
        if current.workspace != new.workspace {
            changed.push("workspace");
        }
        if revoked {
            changed.push("status");
        }
        if changed.is_empty() {
            return Ok(done(InstallOutcome::Unchanged));
        }
        let settings = repos.settings().get()?;
        let ctx = Self::context(
            entry.tenant.clone(),
            Actor::new(new.installer.clone(), PrincipalKind::User, Role::Owner),
            settings
                .as_ref()
                .map(|s| s.run_ceilings.clone())
                .unwrap_or_else(|| TenantSettings::defaults("").run_ceilings),
            BTreeMap::new(),
            None,
            initiator,
        );
        self.record(
            &ctx,
            EventBody::InstallationUpdated {
                installation_id: current.id.to_string(),
                changed: changed.iter().map(|s| s.to_string()).collect(),
            },
        )
        .await?;
        current.app_id = new.app_id;
        current.bot_user_id = new.bot_user_id;
        current.bot_token = new.bot_token;
        current.refresh_token = new.refresh_token;
        current.token_expires_at = new.token_expires_at;
        current.scopes = new.scopes;
        current.workspace = new.workspace;
        current.status = InstallationStatus::Active;
        current.updated_at = Utc::now();
        self.store.for_tenant(&ctx)?.installations().put(&current)?;
        Ok(done(InstallOutcome::Updated))
    }

    /// Stores the token pair that refreshing `used` (the installation as read before the refresh)
    /// returned, only if the installation is still active and still holds the refresh token `used`
    /// held. The refresh is a call to the platform that an uninstall, a token revocation or another
    /// refresh can overtake; storing its answer as an install would bring a revoked installation
    /// back, or overwrite a newer pair. Returns false, having stored and audited nothing, when
    /// either no longer holds. A `refresh_token` of `None` keeps the one used.
    ///
    /// # Errors
    /// [`ProvisionError::UnknownInstallation`] when the tenant no longer has the installation;
    /// audit or store failures.
    pub async fn store_rotated_tokens(
        &self,
        used: &Installation,
        bot_token: secrecy::SecretString,
        refresh_token: Option<secrecy::SecretString>,
        expires_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<bool, ProvisionError> {
        let Some(used_refresh) = used.refresh_token.as_ref() else {
            return Ok(false);
        };
        let tenant = &used.tenant;
        // INVARIANT: the check and the write happen under the lock every revocation takes.
        let _guard = self.lock_installs(tenant).await;
        let operator: PrincipalId = OPERATOR.parse().expect("valid");
        let repos = self
            .store
            .for_tenant(&Self::lookup_context(tenant, &operator))?;
        let mut current = repos
            .installations()
            .get(&used.id)?
            .ok_or_else(|| ProvisionError::UnknownInstallation(used.id.clone()))?;
        let holds_used = current
            .refresh_token
            .as_ref()
            .is_some_and(|r| r.expose_secret() == used_refresh.expose_secret());
        if !current.is_active() || !holds_used {
            return Ok(false);
        }
        let mut changed = vec!["bot_token"];
        if refresh_token
            .as_ref()
            .is_some_and(|r| r.expose_secret() != used_refresh.expose_secret())
        {
            changed.push("refresh_token");
        }
        if current.token_expires_at != expires_at {
            changed.push("token_expires_at");
        }
        let settings = repos.settings().get()?;
        // Audited as the installer, like the update an OAuth reinstall makes.
        let ctx = Self::context(
            tenant.clone(),
            Actor::new(current.installer.clone(), PrincipalKind::User, Role::Owner),
            settings
                .map(|s| s.run_ceilings)
                .unwrap_or_else(|| TenantSettings::defaults("").run_ceilings),
            BTreeMap::new(),
            None,
            Initiator::Webhook,
        );
        self.record(
            &ctx,
            EventBody::InstallationUpdated {
                installation_id: used.id.to_string(),
                changed: changed.iter().map(|s| s.to_string()).collect(),
            },
        )
        .await?;
        current.bot_token = Some(bot_token);
        if let Some(r) = refresh_token {
            current.refresh_token = Some(r);
        }
        current.token_expires_at = expires_at;
        current.updated_at = Utc::now();
        self.store.for_tenant(&ctx)?.installations().put(&current)?;
        Ok(true)
    }

    /// Gives `principal` a role in the context's tenant, auditing the change first. Returns false when
    /// the principal already held that role.
    ///
    /// # Errors
    /// [`ProvisionError`] when the event or the record could not be stored.
    pub async fn grant_role(
        &self,
        ctx: &TenantContext,
        principal: &PrincipalId,
        role: Role,
    ) -> Result<bool, ProvisionError> {
        let repos = self.store.for_tenant(ctx)?;
        if repos.members().role_of(principal)? == Some(role) {
            return Ok(false);
        }
        self.record(
            ctx,
            EventBody::RoleGranted {
                principal: principal.to_string(),
                role: role.to_string(),
            },
        )
        .await?;
        // The audit log folds the event into the membership table before the append returns.
        debug_assert_eq!(repos.members().role_of(principal)?, Some(role));
        Ok(true)
    }

    /// Takes `principal`'s role away in the context's tenant, auditing it first. Returns false when
    /// the principal held none.
    ///
    /// # Errors
    /// [`ProvisionError`] when the event or the record could not be stored.
    pub async fn revoke_role(
        &self,
        ctx: &TenantContext,
        principal: &PrincipalId,
    ) -> Result<bool, ProvisionError> {
        let repos = self.store.for_tenant(ctx)?;
        let Some(role) = repos.members().role_of(principal)? else {
            return Ok(false);
        };
        self.record(
            ctx,
            EventBody::RoleRevoked {
                principal: principal.to_string(),
                role: role.to_string(),
            },
        )
        .await?;
        Ok(true)
    }

    /// Revokes the installation of a workspace (the platform said it was uninstalled, or its tokens
    /// were revoked). Returns false when it was already revoked.
    ///
    /// # Errors
    /// [`ProvisionError::UnknownWorkspace`] when the workspace has no installation; audit or store failures.
    pub async fn revoke_workspace(
        &self,
        workspace: &Workspace,
        reason: &str,
    ) -> Result<bool, ProvisionError> {
        let key = workspace.directory_key();
        let entry = self
            .store
            .directory()
            .lookup(&key)?
            .ok_or(ProvisionError::UnknownWorkspace(key))?;
        self.revoke_in(&entry.tenant, &entry.installation, reason)
            .await
    }

    /// Revokes an installation by id, wherever it is. Reviewed admin path for the operator's CLI.
    ///
    /// # Errors
    /// [`ProvisionError::UnknownInstallation`] when no tenant has it; audit or store failures.
    pub async fn revoke_installation(
        &self,
        id: &InstallationId,
        reason: &str,
    ) -> Result<bool, ProvisionError> {
        for summary in self.store.admin().tenants()? {
            let ctx = Self::lookup_context(&summary.id, &OPERATOR.parse().expect("valid"));
            if self
                .store
                .for_tenant(&ctx)?
                .installations()
                .get(id)?
                .is_some()
            {
                return self.revoke_in(&summary.id, id, reason).await;
            }
        }
        Err(ProvisionError::UnknownInstallation(id.clone()))
    }

    async fn revoke_in(
        &self,
        tenant: &TenantId,
        id: &InstallationId,
        reason: &str,
    ) -> Result<bool, ProvisionError> {
        let _guard = self.lock_installs(tenant).await;
        let operator: PrincipalId = OPERATOR.parse().expect("valid");
        let ctx = Self::context(
            tenant.clone(),
            Actor::new(operator, PrincipalKind::Service, Role::Admin),
            TenantSettings::defaults("").run_ceilings,
            BTreeMap::new(),
            None,
            Initiator::Webhook,
        );
        let repos = self.store.for_tenant(&ctx)?;
        let mut inst = repos
            .installations()
            .get(id)?
            .ok_or_else(|| ProvisionError::UnknownInstallation(id.clone()))?;
        if !inst.is_active() {
            return Ok(false);
        }
        self.record(
            &ctx,
            EventBody::InstallationRevoked {
                installation_id: id.to_string(),
                reason: reason.to_owned(),
            },
        )
        .await?;
        let now = Utc::now();
        inst.status = InstallationStatus::Revoked {
            at: now,
            reason: reason.to_owned(),
        };
        // Forget the tokens as well as refusing to use them: a revoked token has no further use.
        inst.bot_token = None;
        inst.refresh_token = None;
        inst.updated_at = now;
        repos.installations().put(&inst)?;
        Ok(true)
    }
}

impl Tenants {
    /// Upserts a declarative file: its workspaces land in one tenant (an existing one if any of them is
    /// already installed), then its extra members get their roles. Importing the same file again
    /// changes nothing.
    ///
    /// # Errors
    /// The first [`ProvisionError`]; the installations before it stay stored.
    pub async fn import_manifest(
        &self,
        manifest: &Manifest,
    ) -> Result<Vec<Installed>, ProvisionError> {
        let mut tenant: Option<TenantId> = None;
        for inst in &manifest.installations {
            if let Some(entry) = self
                .store
                .directory()
                .lookup(&inst.workspace.directory_key())?
            {
                tenant = Some(entry.tenant);
                break;
            }
        }
        let mut out = Vec::with_capacity(manifest.installations.len());
        for inst in &manifest.installations {
            let done = self
                .install(inst.clone(), &manifest.tenant_name, tenant.as_ref())
                .await?;
            tenant.get_or_insert_with(|| done.tenant.clone());
            out.push(done);
        }
        if let (Some(tenant), false) = (&tenant, manifest.members.is_empty()) {
            let ctx = self.operator_context(tenant).map_err(|e| match e {
                ResolveError::Store(s) => ProvisionError::Store(s),
                _ => ProvisionError::UnknownTenant(tenant.clone()),
            })?;
            for (principal, role) in &manifest.members {
                self.grant_role(&ctx, principal, *role).await?;
            }
        }
        Ok(out)
    }
}

fn source_name(source: &InstallSource) -> &'static str {
    match source {
        InstallSource::OAuth => "oauth",
        InstallSource::Declared { .. } => "declared",
    }
}
