//! Installation records: one per installed Slack workspace, Slack Enterprise Grid org or Discord guild.
//!
//! An installation is what turns a platform identity into a tenant. It is created by a platform's OAuth
//! install flow or declared by an operator in `installations/*.toml` (see [`manifest`]).

pub mod manifest;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use ulid::Ulid;

use crate::tenant::{IdError, PrincipalId, TenantId};

/// The chat platform an installation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    /// Slack.
    Slack,
    /// Discord.
    Discord,
}

impl Platform {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Slack => "slack",
            Platform::Discord => "discord",
        }
    }
}

impl FromStr for Platform {
    type Err = WorkspaceError;

    fn from_str(s: &str) -> Result<Self, WorkspaceError> {
        match s {
            "slack" => Ok(Platform::Slack),
            "discord" => Ok(Platform::Discord),
            other => Err(WorkspaceError::UnknownPlatform(other.to_owned())),
        }
    }
}

/// An offending value as an error shows it: quoted when it is short enough to be the id it was
/// meant to be, and only its length when longer, since a value that long may be a token pasted
/// into the wrong field (Slack and Discord tokens run from about 50 characters up), and these
/// messages reach the terminal and the logs.
fn shown(value: &str) -> String {
    if value.chars().count() <= 32 {
        format!("{value:?}")
    } else {
        format!("(a value of {} characters)", value.chars().count())
    }
}

/// Why a workspace identity did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkspaceError {
    /// The platform is neither slack nor discord.
    #[error("unknown platform {}: expected slack or discord", shown(.0))]
    UnknownPlatform(String),
    /// A Slack id was not upper-case alphanumeric starting with the expected letter.
    #[error(
        "{what} {} is not a Slack id (expected {prefix} followed by letters and digits)",
        shown(.value)
    )]
    BadSlackId {
        /// team_id or enterprise_id.
        what: &'static str,
        /// The offending text.
        value: String,
        /// The expected first letter.
        prefix: char,
    },
    /// A Discord id was not a decimal snowflake.
    #[error("{what} {} is not a Discord snowflake (decimal digits)", shown(.value))]
    BadSnowflake {
        /// guild_id, application id or user id.
        what: &'static str,
        /// The offending text.
        value: String,
    },
    /// A Slack identity named neither a team nor an enterprise.
    #[error("a Slack identity needs a team_id, an enterprise_id, or both")]
    EmptySlackIdentity,
}

fn slack_id(what: &'static str, prefix: char, value: &str) -> Result<String, WorkspaceError> {
    let ok = value.len() >= 2
        && value.len() <= 32
        && value.starts_with(prefix)
        && value
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(WorkspaceError::BadSlackId {
            what,
            value: value.to_owned(),
            prefix,
        })
    }
}

/// Parses a Discord snowflake (a u64 written in decimal).
///
/// # Errors
/// [`WorkspaceError::BadSnowflake`] for anything else.
pub fn snowflake(what: &'static str, value: &str) -> Result<String, WorkspaceError> {
    if !value.is_empty()
        && value.len() <= 20
        && value.parse::<u64>().is_ok()
        && !value.starts_with('+')
    {
        Ok(value.to_owned())
    } else {
        Err(WorkspaceError::BadSnowflake {
            what,
            value: value.to_owned(),
        })
    }
}

/// What one installation covers. Its [`Workspace::directory_key`] is the lookup key for resolution.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Workspace {
    /// A Slack workspace (team), possibly inside an Enterprise Grid org.
    SlackTeam {
        /// The Grid org, when the team belongs to one.
        enterprise_id: Option<String>,
        /// The team.
        team_id: String,
    },
    /// An org-wide Enterprise Grid install, which covers every team of the org.
    SlackOrg {
        /// The Grid org.
        enterprise_id: String,
    },
    /// A Discord guild (server).
    DiscordGuild {
        /// The guild's snowflake.
        guild_id: String,
    },
}

impl Workspace {
    /// A Slack team install.
    ///
    /// # Errors
    /// [`WorkspaceError::BadSlackId`] when an id is not a Slack id.
    pub fn slack_team(enterprise_id: Option<&str>, team_id: &str) -> Result<Self, WorkspaceError> {
        Ok(Workspace::SlackTeam {
            enterprise_id: enterprise_id
                .map(|e| slack_id("enterprise_id", 'E', e))
                .transpose()?,
            team_id: slack_id("team_id", 'T', team_id)?,
        })
    }

    /// An org-wide Enterprise Grid install.
    ///
    /// # Errors
    /// [`WorkspaceError::BadSlackId`] when the id is not a Slack enterprise id.
    pub fn slack_org(enterprise_id: &str) -> Result<Self, WorkspaceError> {
        Ok(Workspace::SlackOrg {
            enterprise_id: slack_id("enterprise_id", 'E', enterprise_id)?,
        })
    }

    /// A Discord guild install.
    ///
    /// # Errors
    /// [`WorkspaceError::BadSnowflake`] when the id is not a snowflake.
    pub fn discord_guild(guild_id: &str) -> Result<Self, WorkspaceError> {
        Ok(Workspace::DiscordGuild {
            guild_id: snowflake("guild_id", guild_id)?,
        })
    }

    /// The platform.
    pub fn platform(&self) -> Platform {
        match self {
            Workspace::SlackTeam { .. } | Workspace::SlackOrg { .. } => Platform::Slack,
            Workspace::DiscordGuild { .. } => Platform::Discord,
        }
    }

    /// The key under which the installation directory finds this workspace's installation.
    pub fn directory_key(&self) -> String {
        match self {
            // Slack team ids are unique across Slack, with or without an enterprise, so the team alone keys it.
            Workspace::SlackTeam { team_id, .. } => format!("slack:team:{team_id}"),
            Workspace::SlackOrg { enterprise_id } => format!("slack:org:{enterprise_id}"),
            Workspace::DiscordGuild { guild_id } => format!("discord:guild:{guild_id}"),
        }
    }
}

impl fmt::Display for Workspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.directory_key())
    }
}

/// A platform identity taken from a request whose signature was verified: the candidates that may
/// hold an installation, in the order they are tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformIdentity {
    /// A Slack request names a team, an enterprise, or both.
    Slack {
        /// The Grid org, if any.
        enterprise_id: Option<String>,
        /// The team, if any (org-level events may carry none).
        team_id: Option<String>,
    },
    /// A Discord request names a guild.
    Discord {
        /// The guild.
        guild_id: String,
    },
}

impl PlatformIdentity {
    /// The directory keys to try, most specific first: a team install wins over an org-wide install.
    ///
    /// # Errors
    /// [`WorkspaceError`] when an id is malformed or a Slack identity names nothing.
    pub fn candidates(&self) -> Result<Vec<Workspace>, WorkspaceError> {
        match self {
            PlatformIdentity::Slack {
                enterprise_id,
                team_id,
            } => {
                let mut out = Vec::with_capacity(2);
                if let Some(team) = team_id {
                    out.push(Workspace::slack_team(enterprise_id.as_deref(), team)?);
                }
                if let Some(e) = enterprise_id {
                    out.push(Workspace::slack_org(e)?);
                }
                if out.is_empty() {
                    return Err(WorkspaceError::EmptySlackIdentity);
                }
                Ok(out)
            }
            PlatformIdentity::Discord { guild_id } => Ok(vec![Workspace::discord_guild(guild_id)?]),
        }
    }
}

/// An installation's identifier: `i_` followed by a ULID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstallationId(String);

impl InstallationId {
    pub(crate) fn generate() -> Self {
        InstallationId(format!("i_{}", Ulid::new()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InstallationId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let body = s.strip_prefix("i_").ok_or(IdError::Malformed {
            kind: "installation id",
            why: "it must start with i_",
        })?;
        let ulid = Ulid::from_string(body).map_err(|_| IdError::Malformed {
            kind: "installation id",
            why: "the part after i_ must be a ULID",
        })?;
        Ok(InstallationId(format!("i_{ulid}")))
    }
}

impl fmt::Display for InstallationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstallationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstallationId({})", self.0)
    }
}

/// Whether an installation may still be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallationStatus {
    /// In use.
    Active,
    /// Uninstalled or revoked; its tokens are never used again.
    Revoked {
        /// When.
        at: DateTime<Utc>,
        /// Why, in a few words (uninstalled, tokens_revoked, operator).
        reason: String,
    },
}

/// How an installation came to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallSource {
    /// The platform's OAuth install flow.
    OAuth,
    /// An operator's declarative file, named relative to the installations directory.
    Declared {
        /// The file name.
        file: String,
    },
}

/// An installation as it arrives, before it is bound to a tenant.
#[derive(Clone, Debug)]
pub struct NewInstallation {
    /// What it covers.
    pub workspace: Workspace,
    /// The platform's application id.
    pub app_id: String,
    /// The bot's own user id on the platform, to ignore its own messages.
    pub bot_user_id: Option<String>,
    /// The bot token; absent for a declared installation whose token variable is not set.
    pub bot_token: Option<SecretString>,
    /// The refresh token, when Slack token rotation is on.
    pub refresh_token: Option<SecretString>,
    /// When the bot token expires, when Slack token rotation is on.
    pub token_expires_at: Option<DateTime<Utc>>,
    /// The OAuth scopes granted.
    pub scopes: Vec<String>,
    /// The user who installed the app; becomes the tenant's owner.
    pub installer: PrincipalId,
    /// How it came to be.
    pub source: InstallSource,
}

/// A stored installation record.
#[derive(Clone, Debug)]
pub struct Installation {
    /// Its id.
    pub id: InstallationId,
    /// The tenant it belongs to.
    pub tenant: TenantId,
    /// What it covers.
    pub workspace: Workspace,
    /// The platform's application id.
    pub app_id: String,
    /// The bot's own user id on the platform.
    pub bot_user_id: Option<String>,
    /// The bot token, decrypted only in memory.
    pub bot_token: Option<SecretString>,
    /// The refresh token, decrypted only in memory.
    pub refresh_token: Option<SecretString>,
    /// When the bot token expires.
    pub token_expires_at: Option<DateTime<Utc>>,
    /// The OAuth scopes granted.
    pub scopes: Vec<String>,
    /// Who installed it.
    pub installer: PrincipalId,
    /// When it was first installed.
    pub installed_at: DateTime<Utc>,
    /// When it was last changed.
    pub updated_at: DateTime<Utc>,
    /// Whether it may be used.
    pub status: InstallationStatus,
    /// How it came to be.
    pub source: InstallSource,
}

impl Installation {
    /// True when the installation may be used.
    pub fn is_active(&self) -> bool {
        self.status == InstallationStatus::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ids_are_parsed() {
        assert!(Workspace::slack_team(None, "T0123ABC").is_ok());
        assert!(Workspace::slack_team(Some("E0123"), "T0123ABC").is_ok());
        assert!(Workspace::slack_team(None, "t0123").is_err());
        assert!(Workspace::slack_team(Some("T1"), "T0123").is_err());
        assert!(Workspace::slack_team(None, "T01:23").is_err());
        assert!(Workspace::slack_org("E0ABC").is_ok());
        assert!(Workspace::discord_guild("197038439483310086").is_ok());
        for bad in [
            "",
            "abc",
            "-1",
            "+1",
            "123456789012345678901",
            "18446744073709551616",
        ] {
            assert!(Workspace::discord_guild(bad).is_err(), "{bad:?}");
        }
    }

    /// An id that is wrong but short is shown, so the operator sees the typo; a value as long as
    /// a token is shown only by its length.
    #[test]
    fn a_bad_id_is_shown_only_when_it_is_short() {
        let typo = Workspace::slack_team(None, "t0123")
            .unwrap_err()
            .to_string();
        assert!(typo.contains("\"t0123\""), "{typo}");
        let token = "xoxb-1234567890-0987654321-SECRETSECRETSECRET";
        for err in [
            Workspace::slack_team(None, token).unwrap_err(),
            Workspace::discord_guild(token).unwrap_err(),
            token.parse::<Platform>().unwrap_err(),
        ] {
            let err = err.to_string();
            assert!(!err.contains("SECRET"), "{err}");
            assert!(
                err.contains(&format!("{} characters", token.len())),
                "{err}"
            );
        }
    }

    #[test]
    fn slack_identity_tries_team_before_org() {
        let id = PlatformIdentity::Slack {
            enterprise_id: Some("E1".into()),
            team_id: Some("T1".into()),
        };
        let keys: Vec<String> = id
            .candidates()
            .unwrap()
            .iter()
            .map(Workspace::directory_key)
            .collect();
        assert_eq!(keys, ["slack:team:T1", "slack:org:E1"]);
        let empty = PlatformIdentity::Slack {
            enterprise_id: None,
            team_id: None,
        };
        assert_eq!(empty.candidates(), Err(WorkspaceError::EmptySlackIdentity));
    }
}
