//! The stored forms of records (versioned JSON) and their conversion to and from domain types.
//!
//! Domain types stay free of storage concerns; this is where a record's version and its sealed
//! secrets are handled.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{DirectoryEntry, Result, StoreError, TenantSummary};
use crate::crypto::Cipher;
use crate::installation::{InstallSource, Installation, InstallationStatus, Workspace};

/// Decodes a stored JSON record, naming the key when it is corrupt.
pub(super) fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}

/// Encodes a record.
pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

fn corrupt(key: &str, why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        why: why.into(),
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct DirectoryRecord {
    v: u32,
    tenant: String,
    installation: String,
}

impl DirectoryRecord {
    pub(super) fn from_entry(e: &DirectoryEntry) -> Self {
        DirectoryRecord {
            v: 1,
            tenant: e.tenant.to_string(),
            installation: e.installation.to_string(),
        }
    }

    pub(super) fn into_entry(self, key: &str) -> Result<DirectoryEntry> {
        Ok(DirectoryEntry {
            tenant: self
                .tenant
                .parse()
                .map_err(|e| corrupt(key, format!("{e}")))?,
            installation: self
                .installation
                .parse()
                .map_err(|e| corrupt(key, format!("{e}")))?,
        })
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct TenantRecord {
    v: u32,
    id: String,
    name: String,
    created_at: DateTime<Utc>,
}

impl TenantRecord {
    pub(super) fn from_summary(s: &TenantSummary) -> Self {
        TenantRecord {
            v: 1,
            id: s.id.to_string(),
            name: s.name.clone(),
            created_at: s.created_at,
        }
    }

    pub(super) fn into_summary(self, key: &str) -> Result<TenantSummary> {
        Ok(TenantSummary {
            id: self.id.parse().map_err(|e| corrupt(key, format!("{e}")))?,
            name: self.name,
            created_at: self.created_at,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WorkspaceRecord {
    SlackTeam {
        enterprise_id: Option<String>,
        team_id: String,
    },
    SlackOrg {
        enterprise_id: String,
    },
    DiscordGuild {
        guild_id: String,
    },
}

#[derive(Serialize, Deserialize)]
pub(super) struct InstallationRecord {
    v: u32,
    id: String,
    tenant: String,
    workspace: WorkspaceRecord,
    app_id: String,
    bot_user_id: Option<String>,
    /// Sealed under the master key, bound to tenant, installation and field.
    bot_token_sealed: Option<String>,
    /// Sealed like the bot token.
    refresh_token_sealed: Option<String>,
    token_expires_at: Option<DateTime<Utc>>,
    scopes: Vec<String>,
    installer: String,
    installed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    revoked_reason: Option<String>,
    declared_in: Option<String>,
}

fn seal_context(inst_tenant: &str, inst_id: &str, field: &str) -> String {
    format!("{inst_tenant}/{inst_id}/{field}")
}

impl InstallationRecord {
    pub(super) fn seal(i: &Installation, cipher: &Cipher) -> Self {
        let tenant = i.tenant.to_string();
        let id = i.id.to_string();
        let (revoked_at, revoked_reason) = match &i.status {
            InstallationStatus::Active => (None, None),
            InstallationStatus::Revoked { at, reason } => (Some(*at), Some(reason.clone())),
        };
        InstallationRecord {
            v: 1,
            workspace: match &i.workspace {
                Workspace::SlackTeam {
                    enterprise_id,
                    team_id,
                } => WorkspaceRecord::SlackTeam {
                    enterprise_id: enterprise_id.clone(),
                    team_id: team_id.clone(),
                },
                Workspace::SlackOrg { enterprise_id } => WorkspaceRecord::SlackOrg {
                    enterprise_id: enterprise_id.clone(),
                },
                Workspace::DiscordGuild { guild_id } => WorkspaceRecord::DiscordGuild {
                    guild_id: guild_id.clone(),
                },
            },
            app_id: i.app_id.clone(),
            bot_user_id: i.bot_user_id.clone(),
            bot_token_sealed: i
                .bot_token
                .as_ref()
                .map(|t| cipher.seal(&seal_context(&tenant, &id, "bot_token"), t)),
            refresh_token_sealed: i
                .refresh_token
                .as_ref()
                .map(|t| cipher.seal(&seal_context(&tenant, &id, "refresh_token"), t)),
            token_expires_at: i.token_expires_at,
            scopes: i.scopes.clone(),
            installer: i.installer.to_string(),
            installed_at: i.installed_at,
            updated_at: i.updated_at,
            revoked_at,
            revoked_reason,
            declared_in: match &i.source {
                InstallSource::OAuth => None,
                InstallSource::Declared { file } => Some(file.clone()),
            },
            tenant,
            id,
        }
    }

    /// Opens the record stored under `key`, in `tenant`'s tree, for installation `id` (the key's
    /// own suffix).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the record names another tenant or installation than where it
    /// is stored: its tokens are sealed for the names it carries, so a whole record copied into
    /// another tenant's tree would otherwise open there, tokens and all.
    pub(super) fn open(
        self,
        key: &str,
        cipher: &Cipher,
        tenant: &crate::tenant::TenantId,
        id: &str,
    ) -> Result<Installation> {
        let bad = |e: &dyn std::fmt::Display| corrupt(key, e.to_string());
        if self.tenant != tenant.as_str() || self.id != id {
            return Err(corrupt(
                key,
                "the record names another tenant or installation than where it is stored",
            ));
        }
        let open = |field: &str, sealed: Option<String>| {
            sealed
                .map(|s| {
                    cipher
                        .open(&seal_context(&self.tenant, &self.id, field), &s)
                        .map_err(|source| StoreError::Sealed {
                            key: key.to_owned(),
                            source,
                        })
                })
                .transpose()
        };
        let bot_token = open("bot_token", self.bot_token_sealed.clone())?;
        let refresh_token = open("refresh_token", self.refresh_token_sealed.clone())?;
        let workspace = match self.workspace {
            WorkspaceRecord::SlackTeam {
                enterprise_id,
                team_id,
            } => Workspace::slack_team(enterprise_id.as_deref(), &team_id),
            WorkspaceRecord::SlackOrg { enterprise_id } => Workspace::slack_org(&enterprise_id),
            WorkspaceRecord::DiscordGuild { guild_id } => Workspace::discord_guild(&guild_id),
        }
        .map_err(|e| bad(&e))?;
        let status = match (self.revoked_at, self.revoked_reason) {
            (None, _) => InstallationStatus::Active,
            (Some(at), reason) => InstallationStatus::Revoked {
                at,
                reason: reason.unwrap_or_default(),
            },
        };
        Ok(Installation {
            id: self.id.parse().map_err(|e| bad(&e))?,
            tenant: self.tenant.parse().map_err(|e| bad(&e))?,
            workspace,
            app_id: self.app_id,
            bot_user_id: self.bot_user_id,
            bot_token,
            refresh_token,
            token_expires_at: self.token_expires_at,
            scopes: self.scopes,
            installer: self.installer.parse().map_err(|e| bad(&e))?,
            installed_at: self.installed_at,
            updated_at: self.updated_at,
            status,
            source: match self.declared_in {
                None => InstallSource::OAuth,
                Some(file) => InstallSource::Declared { file },
            },
        })
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct MemberRecord {
    pub(super) v: u32,
    pub(super) role: crate::tenant::Role,
}
