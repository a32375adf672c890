//! API keys: made by a tenant admin (or the operator), shown once, stored only as a keyed hash,
//! named by a visible id, with expiry, revocation and rotation with an overlap window. A valid key
//! is a verified credential: it yields a `TenantContext` for the key's tenant and nothing else.

use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::context::{AuditMeta, ContextParts, Initiator, PrincipalKind, Role, TenantContext};
use super::ids::{PrincipalId, RunId, Scope, TenantId};
use super::service::Tenants;
use crate::audit::{AuditError, EventBody};
use crate::store::{ApiKey, StoreError};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    /// Everything an admin may do.
    Admin,
    /// Read settings, usage, runs and the audit log; export.
    Compliance,
    /// Run commands as a service, or for a named user.
    Service,
}

impl KeyRole {
    /// The name used in records and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Admin => "admin",
            KeyRole::Compliance => "compliance",
            KeyRole::Service => "service",
        }
    }

    fn role(self) -> Role {
        match self {
            KeyRole::Admin => Role::Admin,
            KeyRole::Compliance => Role::Viewer,
            KeyRole::Service => Role::Member,
        }
    }

    /// Whether a key of this role can ever use the extra scope `s`: `admin:write` needs the
    /// admin role, which only an admin key reaches.
    fn may_hold(self, s: &str) -> bool {
        s != "admin:write" || self == KeyRole::Admin
    }

    fn scopes(self) -> Vec<&'static str> {
        match self {
            KeyRole::Admin => vec!["agent:invoke", "audit:read", "admin:read", "admin:write"],
            KeyRole::Compliance => vec!["audit:read", "admin:read"],
            KeyRole::Service => vec!["agent:invoke"],
        }
    }
}

impl std::str::FromStr for KeyRole {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "admin" => Ok(KeyRole::Admin),
            "compliance" => Ok(KeyRole::Compliance),
            "service" => Ok(KeyRole::Service),
            other => Err(KeyError::BadRole(other.to_owned())),
        }
    }
}

/// The longest lifetime, in days, of a key made through the API (the CLI may make longer ones).
pub const MAX_API_KEY_DAYS: u32 = 3650;
/// The lifetime, in days, of a key made through the API that does not ask for one.
pub const DEFAULT_API_KEY_DAYS: u32 = 90;

/// Why a key could not be made or used. Every authentication failure reads the same to a client.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The role is none of admin, compliance, service.
    #[error("unknown key role {0:?}: expected admin, compliance or service")]
    BadRole(String),
    /// A scope did not parse.
    #[error("invalid scope {0:?}")]
    BadScope(String),
    /// An extra scope that a key of its role can never use.
    #[error("the scope {0} is only for admin keys")]
    ScopeBeyondRole(String),
    /// The key is malformed, unknown, wrong, expired or revoked.
    #[error("invalid API key")]
    Invalid,
    /// The tenant header names another tenant than the key's.
    #[error("the tenant header does not match the key")]
    TenantMismatch,
    /// The acting-user header is malformed, or names a user for a key that may not act for users.
    #[error("invalid acting user")]
    BadActingUser,
    /// The caller may not manage keys.
    #[error("this needs the admin role")]
    Forbidden,
    /// No key has that id in this tenant.
    #[error("no such key")]
    NotFound,
    /// The key is revoked or expired, so it has nothing left to hand over to a successor.
    #[error("the key is revoked or expired; make a new key instead")]
    NotLive,
    /// The key's name is empty, too long or holds a control character.
    #[error("the key's name must be 1 to 100 characters, none of them a control character")]
    BadName,
    /// The asked lifetime is not a number of days the API makes keys for.
    #[error("expires_in_days must be from 1 to {MAX_API_KEY_DAYS}")]
    BadExpiry,
    /// The key asked for would be valid after the key asking for it expires: a short-lived key
    /// must not be able to make itself a longer-lived one.
    #[error("a key may not make a key that outlives it (this key expires at {0}); use a longer-lived key, or the agentgate keys command")]
    OutlivesIssuer(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit event could not be made durable.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// A key just made: the whole token is shown once and never stored.
#[derive(Debug)]
pub struct IssuedKey {
    /// The stored record.
    pub record: ApiKey,
    /// `agk_<id>_<secret>`: what the client sends as `Authorization: Bearer …`.
    pub token: SecretString,
}

const PREFIX: &str = "agk_";

fn hash(pepper: &SecretString, secret: &str) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(secret.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

fn hash_matches(pepper: &SecretString, secret: &str, stored_hex: &str) -> bool {
    let Ok(stored) = hex::decode(stored_hex) else {
        return false;
    };
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(pepper.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(secret.as_bytes());
    m.verify_slice(&stored).is_ok()
}

/// Splits a token into id and secret.
fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok = id.len() == 26
        && id.bytes().all(|b| b.is_ascii_alphanumeric())
        && secret.len() == 64
        && secret.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some((id, secret))
}

/// True when the key works at `now`.
pub fn is_live(k: &ApiKey, now: DateTime<Utc>) -> bool {
    k.revoked_at.is_none_or(|r| r > now) && k.expires_at.is_none_or(|e| e > now)
}

impl Tenants {
    fn mint(
        &self,
        tenant: &TenantId,
        name: &str,
        role: KeyRole,
        scopes: Vec<String>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<IssuedKey, KeyError> {
        if !super::settings::label_ok(name) {
            return Err(KeyError::BadName);
        }
        for s in &scopes {
            s.parse::<Scope>()
                .map_err(|_| KeyError::BadScope(s.clone()))?;
            // Dropped at every login of a key that is not an admin's (its role never reaches
            // admin), so a key would list a power it does not have.
            if !role.may_hold(s) {
                return Err(KeyError::ScopeBeyondRole(s.clone()));
            }
        }
        let id = ulid::Ulid::new().to_string();
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let secret = hex::encode(raw);
        let record = ApiKey {
            id: id.clone(),
            name: name.to_owned(),
            hash: hash(self.key_pepper(), &secret),
            role: role.as_str().to_owned(),
            scopes,
            created_at: Utc::now(),
            expires_at,
            revoked_at: None,
        };
        self.store().bind_key(&id, tenant)?;
        Ok(IssuedKey {
            record,
            token: SecretString::from(format!("{PREFIX}{id}_{secret}")),
        })
    }

    fn require_admin(ctx: &TenantContext) -> Result<(), KeyError> {
        if ctx.role().at_least(Role::Admin) && ctx.has_scope("admin:write") {
            Ok(())
        } else {
            Err(KeyError::Forbidden)
        }
    }

    /// Makes a key for the context's tenant; audited (the id only).
    ///
    /// # Errors
    /// [`KeyError`]: not an admin, a bad scope, storage or audit failures.
    pub async fn create_key(
        &self,
        ctx: &TenantContext,
        name: &str,
        role: KeyRole,
        scopes: Vec<String>,
        expires_in: Option<Duration>,
    ) -> Result<IssuedKey, KeyError> {
        Self::require_admin(ctx)?;
        // With every other change to this tenant's keys: a revocation of the asking key cannot
        // land between the check of its end below and the new key's making.
        let _keys = self.lock_keys(ctx.tenant_id()).await;
        let expires_at = match expires_in {
            None => None,
            Some(d) => Some(
                Utc::now()
                    .checked_add_signed(d)
                    .ok_or(KeyError::BadExpiry)?,
            ),
        };
        if let Some(limit) = self.issuer_end(ctx)? {
            let outlives = match (limit, expires_at) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(end), Some(at)) => at > end,
            };
            if outlives {
                let end = limit.map(|e| e.to_rfc3339()).unwrap_or_default();
                return Err(KeyError::OutlivesIssuer(end));
            }
        }
        self.create_key_until(ctx, name, role, scopes, expires_at)
            .await
    }

    /// Makes, audits and stores a key that expires at `expires_at`; the caller checked it.
    async fn create_key_until(
        &self,
        ctx: &TenantContext,
        name: &str,
        role: KeyRole,
        scopes: Vec<String>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<IssuedKey, KeyError> {
        let issued = self.mint(ctx.tenant_id(), name, role, scopes, expires_at)?;
        self.record(
            ctx,
            EventBody::SettingsChanged {
                fields: vec![format!(
                    "api-key:{}:created:{}",
                    issued.record.id,
                    role.as_str()
                )],
            },
        )
        .await?;
        self.store()
            .for_tenant(ctx)?
            .api_keys()
            .put_key(&issued.record)?;
        Ok(issued)
    }

    /// Revokes a key at `at` (now, or later for a rotation's overlap); audited.
    ///
    /// # Errors
    /// [`KeyError::NotFound`] for a key of another tenant or none; [`KeyError::Forbidden`].
    pub async fn revoke_key(
        &self,
        ctx: &TenantContext,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<(), KeyError> {
        Self::require_admin(ctx)?;
        let _keys = self.lock_keys(ctx.tenant_id()).await;
        self.revoke_locked(ctx, id, at).await
    }

    /// [`Tenants::revoke_key`] for a caller that holds the tenant's key lock.
    async fn revoke_locked(
        &self,
        ctx: &TenantContext,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<(), KeyError> {
        let repo = self.store().for_tenant(ctx)?;
        let mut key = repo.api_keys().get_key(id)?.ok_or(KeyError::NotFound)?;
        self.record(
            ctx,
            EventBody::SettingsChanged {
                fields: vec![format!("api-key:{id}:revoked")],
            },
        )
        .await?;
        key.revoked_at = Some(key.revoked_at.map_or(at, |r| r.min(at)));
        repo.api_keys().put_key(&key)?;
        Ok(())
    }

    /// Rotates a key: a new key with the same role, scopes and lifetime, and the old one revoked
    /// after `overlap`, so clients can switch without an outage. Only a live key rotates: a
    /// successor of a revoked or expired key would bring back a credential that was taken away.
    /// A key inside an earlier rotation's overlap is still live and may rotate again.
    ///
    /// # Errors
    /// As [`Tenants::revoke_key`]; [`KeyError::NotLive`] for a revoked or expired key (checked
    /// after the tenant lookup, so a key of another tenant is still [`KeyError::NotFound`]).
    pub async fn rotate_key(
        &self,
        ctx: &TenantContext,
        id: &str,
        overlap: Duration,
    ) -> Result<IssuedKey, KeyError> {
        Self::require_admin(ctx)?;
        // Checking that the key is live, making its successor and revoking it are one step for
        // every other change to this tenant's keys.
        let _keys = self.lock_keys(ctx.tenant_id()).await;
        let old = self
            .store()
            .for_tenant(ctx)?
            .api_keys()
            .get_key(id)?
            .ok_or(KeyError::NotFound)?;
        if !is_live(&old, Utc::now()) {
            return Err(KeyError::NotLive);
        }
        // The successor lives as long as the old key did, from now. Through the API (a key
        // asking) it always ends: a key that never expired gets the API's default lifetime, and
        // no successor outlives the key asking for it, so a key rotating itself hands over what
        // it has left rather than extending it.
        let lifetime = old.expires_at.map(|e| e - old.created_at);
        let now = Utc::now();
        let mut expires_at = lifetime.and_then(|l| now.checked_add_signed(l));
        if let Some(limit) = self.issuer_end(ctx)? {
            // The asking key ended since it was checked (revoked meanwhile): it rotates nothing.
            if limit.is_some_and(|end| end <= now) {
                return Err(KeyError::Forbidden);
            }
            let default = Duration::days(i64::from(DEFAULT_API_KEY_DAYS));
            let at = expires_at.unwrap_or(now + default);
            expires_at = Some(limit.map_or(at, |end| at.min(end)));
        }
        let role: KeyRole = old.role.parse()?;
        // A scope a key made before this was checked can never have used is not carried over.
        let scopes = old
            .scopes
            .iter()
            .filter(|s| role.may_hold(s))
            .cloned()
            .collect();
        let new = self
            .create_key_until(ctx, &old.name, role, scopes, expires_at)
            .await?;
        self.revoke_locked(ctx, id, Utc::now() + overlap).await?;
        Ok(new)
    }

    /// Turns a bearer token into a context: the verified credential path. `acting_user` (a service
    /// key acting for a user) must name the user; `tenant_header`, when sent, must name the key's
    /// tenant, so a token of one tenant can never be replayed against another by changing a header.
    ///
    /// # Errors
    /// [`KeyError::Invalid`] for anything wrong with the key itself (the same for every cause);
    /// [`KeyError::TenantMismatch`]; [`KeyError::BadActingUser`].
    pub fn authenticate(
        &self,
        token: &str,
        acting_user: Option<&str>,
        tenant_header: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Result<TenantContext, KeyError> {
        let (id, secret) = parse(token).ok_or(KeyError::Invalid)?;
        let tenant = self.store().key_tenant(id)?.ok_or(KeyError::Invalid)?;
        let probe = Self::probe_context(&tenant);
        let repo = self.store().for_tenant(&probe)?;
        let key = repo.api_keys().get_key(id)?.ok_or(KeyError::Invalid)?;
        if !hash_matches(self.key_pepper(), secret, &key.hash) || !is_live(&key, Utc::now()) {
            return Err(KeyError::Invalid);
        }
        if tenant_header.is_some_and(|h| h != tenant.as_str()) {
            return Err(KeyError::TenantMismatch);
        }
        let key_role: KeyRole = key.role.parse().map_err(|_| KeyError::Invalid)?;
        let settings = repo.settings().get()?.ok_or(KeyError::Invalid)?;
        let (principal, kind, role) = match acting_user {
            None => (
                PrincipalId::qualified("key", id).map_err(|_| KeyError::Invalid)?,
                PrincipalKind::Service,
                key_role.role(),
            ),
            Some(user) => {
                if key_role != KeyRole::Service {
                    return Err(KeyError::BadActingUser);
                }
                let p: PrincipalId = user.parse().map_err(|_| KeyError::BadActingUser)?;
                // Only a workspace's users: not the operator, the gateway itself (`system:…`) or
                // another key, whose names in the audit log must mean what they say.
                if !["slack:", "discord:"]
                    .iter()
                    .any(|source| p.as_str().starts_with(source))
                {
                    return Err(KeyError::BadActingUser);
                }
                let user_role = repo.members().role_of(&p)?.unwrap_or(settings.default_role);
                // Acting for a user never grants more than the user has, nor more than the key.
                let role = if user_role.at_least(key_role.role()) {
                    key_role.role()
                } else {
                    user_role
                };
                (p, PrincipalKind::User, role)
            }
        };
        let mut scopes: Vec<Scope> = key_role
            .scopes()
            .into_iter()
            .map(|s| s.parse().expect("built-in scopes"))
            .collect();
        // Extra admin scopes never reach past the role actually held: a key acting for a viewer
        // cannot make the viewer an admin.
        scopes.extend(
            key.scopes
                .iter()
                .filter(|s| role.at_least(Role::Admin) || s.as_str() != "admin:write")
                .filter_map(|s| s.parse().ok()),
        );
        Ok(TenantContext::from_parts(ContextParts {
            tenant,
            principal,
            principal_kind: kind,
            role,
            scopes,
            budget: settings.run_ceilings,
            audit: AuditMeta {
                run_id: RunId::generate(),
                correlation_id: correlation_id.and_then(|c| c.parse().ok()),
                initiated_at: Utc::now(),
                initiator: Initiator::User,
            },
            features: settings.features,
        }))
    }

    /// Refuses a key that would be valid after the API key asking for it (the context's
    /// principal, `key:<id>`) expires; a person's or the operator's context has no such bound.
    /// When the API key asking (the context's principal, `key:<id>`) stops working: `None` for a
    /// person's or the operator's context, which no key bounds; `Some(None)` for a key that never
    /// ends; else the earlier of its expiry and its revocation (a rotation's overlap ends it
    /// early, and a key must not use that hour to make itself a lasting successor).
    ///
    /// # Errors
    /// [`KeyError::Forbidden`] when the asking key is not on record (fails closed); storage.
    fn issuer_end(&self, ctx: &TenantContext) -> Result<Option<Option<DateTime<Utc>>>, KeyError> {
        let Some(issuer) = ctx.principal().as_str().strip_prefix("key:") else {
            return Ok(None);
        };
        let key = self
            .store()
            .for_tenant(ctx)?
            .api_keys()
            .get_key(issuer)?
            .ok_or(KeyError::Forbidden)?;
        let end = match (key.expires_at, key.revoked_at) {
            (Some(e), Some(r)) => Some(e.min(r)),
            (e, r) => e.or(r),
        };
        Ok(Some(end))
    }

    /// Makes a key as the operator (the CLI), for bootstrapping a tenant's first admin key.
    ///
    /// # Errors
    /// As [`Tenants::create_key`].
    pub async fn create_key_as_operator(
        &self,
        tenant: &TenantId,
        name: &str,
        role: KeyRole,
        scopes: Vec<String>,
        expires_in: Option<Duration>,
    ) -> Result<IssuedKey, KeyError> {
        let ctx = self
            .operator_context(tenant)
            .map_err(|_| KeyError::NotFound)?;
        self.create_key(&ctx, name, role, scopes, expires_in).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly_and_hashes_compare() {
        let id = ulid::Ulid::new().to_string();
        let secret = "ab".repeat(32);
        let token = format!("agk_{id}_{secret}");
        assert_eq!(parse(&token), Some((id.as_str(), secret.as_str())));
        for bad in [
            "",
            "agk_",
            "agk_x_y",
            &format!("agk_{id}_{}", "zz".repeat(32)),
            &format!("xyz_{id}_{secret}"),
            &format!("agk_{id}_{secret}0"),
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        let pepper = SecretString::from("pepper");
        let h = hash(&pepper, &secret);
        assert!(hash_matches(&pepper, &secret, &h));
        assert!(!hash_matches(&pepper, &"cd".repeat(32), &h));
        assert!(!hash_matches(&SecretString::from("other"), &secret, &h));
    }
}
