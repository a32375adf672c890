//! Declarative installation files (`installations/*.toml`) for local development and self-hosted deployments.
//!
//! One file describes one tenant and the workspaces installed into it. Secrets are never written in
//! the file: a file names the environment variable that holds each token, and a file that writes a
//! token inline is rejected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use super::{snowflake, InstallSource, NewInstallation, Platform, Workspace, WorkspaceError};
use crate::tenant::{IdError, PrincipalId, Role};

/// Why a declarative file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the line and the key.
        message: String,
    },
    /// The file writes a secret inline.
    #[error("{path}: installation {index} writes `{key}` inline; name an environment variable with `{key}_env` instead")]
    InlineSecret {
        /// The file.
        path: PathBuf,
        /// The 1-based installation entry.
        index: usize,
        /// The key.
        key: &'static str,
    },
    /// A workspace id is malformed or missing.
    #[error("{path}: installation {index}: {source}")]
    Workspace {
        /// The file.
        path: PathBuf,
        /// The 1-based installation entry.
        index: usize,
        /// What is wrong.
        source: WorkspaceError,
    },
    /// An entry lacks a field its platform needs.
    #[error("{path}: installation {index}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The 1-based installation entry, or 0 for the file as a whole.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A principal id is malformed.
    #[error("{path}: {source}")]
    Principal {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: IdError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDto {
    tenant: TenantDto,
    #[serde(default, rename = "installation")]
    installations: Vec<InstallationDto>,
    #[serde(default)]
    members: BTreeMap<String, Role>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantDto {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallationDto {
    platform: String,
    enterprise_id: Option<String>,
    team_id: Option<String>,
    guild_id: Option<String>,
    app_id: String,
    bot_user_id: Option<String>,
    bot_token_env: Option<String>,
    refresh_token_env: Option<String>,
    installer: String,
    #[serde(default)]
    scopes: Vec<String>,
    // Present only so that an inline secret gets a helpful error instead of "unknown field".
    bot_token: Option<toml::Value>,
    refresh_token: Option<toml::Value>,
}

/// One parsed declarative file.
#[derive(Debug)]
pub struct Manifest {
    /// The file, as given.
    pub path: PathBuf,
    /// The tenant's human name.
    pub tenant_name: String,
    /// The installations, with tokens read from the environment.
    pub installations: Vec<NewInstallation>,
    /// Extra memberships, beyond each installer being owner.
    pub members: Vec<(PrincipalId, Role)>,
    /// Environment variables that were named but not set, so the caller can warn.
    pub missing_env: Vec<String>,
}

/// Reads a token from the environment variable a file names; an unset or empty variable is no token.
fn token_from_env(var: Option<&str>, missing: &mut Vec<String>) -> Option<SecretString> {
    let var = var?;
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(SecretString::from(v)),
        _ => {
            missing.push(var.to_owned());
            None
        }
    }
}

/// The parser's message and where in the file, without the values it quotes. toml's own text
/// shows the offending line, and serde's quotes a value of the wrong type (`string "…"`) or an
/// unknown one (``unknown variant `…` ``); any of them may be a token written where it does not
/// belong (`bot_tokn = "xoxb-…"`, a token as a role, or unquoted), and this message reaches the
/// terminal and the logs. So every double-quoted part goes, and a backticked part stays only when
/// it is a lower-case field name or a single punctuation mark (``expected `"` ``).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let mut message = String::new();
    let mut chars = e.message().chars();
    while let Some(ch) = chars.next() {
        match ch {
            '`' => {
                let inner: String = chars.by_ref().take_while(|&c| c != '`').collect();
                let mut one = inner.chars();
                let punctuation =
                    matches!((one.next(), one.next()), (Some(c), None) if !c.is_alphanumeric());
                let field = (1..=24).contains(&inner.len())
                    && inner.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                message.push('`');
                message.push_str(if punctuation || field { &inner } else { "…" });
                message.push('`');
            }
            '"' => {
                // To the closing quote, past escaped ones (serde writes the value with `{:?}`).
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                message.push_str("\"…\"");
            }
            _ => message.push(ch),
        }
    }
    if let Some(before) = e.span().and_then(|span| text.get(..span.start)) {
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        message.push_str(&format!(" (line {line}, column {column})"));
    }
    message
}

/// Parses one declarative file's text. `path` names it in errors and in the install source.
///
/// # Errors
/// [`ManifestError`] naming the file, the entry and the problem.
pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
    let dto: FileDto = toml::from_str(text).map_err(|e| ManifestError::Syntax {
        path: path.to_owned(),
        message: syntax_message(text, &e),
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if dto.tenant.name.trim().is_empty() {
        return Err(ManifestError::Invalid {
            path: path.to_owned(),
            index: 0,
            message: "[tenant] name must not be empty".into(),
        });
    }
    if dto.installations.is_empty() {
        return Err(ManifestError::Invalid {
            path: path.to_owned(),
            index: 0,
            message: "the file declares no [[installation]]".into(),
        });
    }
    let mut missing_env = Vec::new();
    let mut installations = Vec::with_capacity(dto.installations.len());
    for (i, inst) in dto.installations.into_iter().enumerate() {
        let index = i + 1;
        if inst.bot_token.is_some() {
            return Err(ManifestError::InlineSecret {
                path: path.to_owned(),
                index,
                key: "bot_token",
            });
        }
        if inst.refresh_token.is_some() {
            return Err(ManifestError::InlineSecret {
                path: path.to_owned(),
                index,
                key: "refresh_token",
            });
        }
        // A token pasted where its variable's name goes would otherwise be logged as a name.
        for (key, var) in [
            ("bot_token_env", &inst.bot_token_env),
            ("refresh_token_env", &inst.refresh_token_env),
        ] {
            let is_name = |v: &str| {
                !v.is_empty()
                    && v.len() <= 128
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !v.as_bytes()[0].is_ascii_digit()
            };
            if var.as_deref().is_some_and(|v| !is_name(v)) {
                return Err(ManifestError::Invalid {
                    path: path.to_owned(),
                    index,
                    message: format!(
                        "{key} must name an environment variable (letters, digits and _), not hold a token"
                    ),
                });
            }
        }
        let ws_err = |source| ManifestError::Workspace {
            path: path.to_owned(),
            index,
            source,
        };
        let platform: Platform = inst.platform.parse().map_err(ws_err)?;
        let workspace = match platform {
            Platform::Slack => match (&inst.enterprise_id, &inst.team_id) {
                (e, Some(team)) => Workspace::slack_team(e.as_deref(), team),
                (Some(e), None) => Workspace::slack_org(e),
                (None, None) => Err(WorkspaceError::EmptySlackIdentity),
            },
            Platform::Discord => match &inst.guild_id {
                Some(g) => Workspace::discord_guild(g),
                None => {
                    return Err(ManifestError::Invalid {
                        path: path.to_owned(),
                        index,
                        message: "a discord installation needs guild_id".into(),
                    })
                }
            },
        }
        .map_err(ws_err)?;
        if platform == Platform::Discord {
            snowflake("app_id", &inst.app_id).map_err(ws_err)?;
        }
        let installer =
            PrincipalId::qualified(platform.as_str(), &inst.installer).map_err(|source| {
                ManifestError::Principal {
                    path: path.to_owned(),
                    source,
                }
            })?;
        installations.push(NewInstallation {
            workspace,
            app_id: inst.app_id,
            bot_user_id: inst.bot_user_id,
            bot_token: token_from_env(inst.bot_token_env.as_deref(), &mut missing_env),
            refresh_token: token_from_env(inst.refresh_token_env.as_deref(), &mut missing_env),
            token_expires_at: None,
            scopes: inst.scopes,
            installer,
            source: InstallSource::Declared {
                file: file_name.clone(),
            },
        });
    }
    let members = dto
        .members
        .into_iter()
        .map(|(p, role)| {
            p.parse::<PrincipalId>()
                .map(|p| (p, role))
                .map_err(|source| ManifestError::Principal {
                    path: path.to_owned(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Manifest {
        path: path.to_owned(),
        tenant_name: dto.tenant.name,
        installations,
        members,
        missing_env,
    })
}

/// Reads a file, or every `*.toml` file of a directory in name order.
///
/// # Errors
/// The first file that cannot be read or parsed; nothing is returned for the others, so an operator
/// never gets half of a directory imported.
pub fn load(path: &Path) -> Result<Vec<Manifest>, ManifestError> {
    let io = |p: &Path, source| ManifestError::Io {
        path: p.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
    let files = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io(path, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|e| io(f, e))?;
            parse(f, &text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, needle: &str) {
        let err = parse(Path::new("x.toml"), text).unwrap_err().to_string();
        assert!(err.contains(needle), "error {err:?} lacks {needle:?}");
    }

    const GOOD: &str = r#"
        [tenant]
        name = "acme"
        [[installation]]
        platform = "slack"
        team_id = "T0ACME"
        app_id = "A0ACME"
        bot_token_env = "AGENTGATE_TEST_UNSET_TOKEN_VAR"
        installer = "U0ADMIN"
        scopes = ["commands"]
        [[installation]]
        platform = "discord"
        guild_id = "42"
        app_id = "43"
        installer = "44"
        [members]
        "slack:U0OTHER" = "viewer"
    "#;

    #[test]
    fn parses_a_good_file() {
        let m = parse(Path::new("dir/acme.toml"), GOOD).unwrap();
        assert_eq!(m.tenant_name, "acme");
        assert_eq!(m.installations.len(), 2);
        assert_eq!(
            m.installations[0].workspace.directory_key(),
            "slack:team:T0ACME"
        );
        assert_eq!(m.installations[0].installer.as_str(), "slack:U0ADMIN");
        assert!(m.installations[0].bot_token.is_none());
        assert_eq!(m.missing_env, ["AGENTGATE_TEST_UNSET_TOKEN_VAR"]);
        assert_eq!(
            m.installations[1].workspace.directory_key(),
            "discord:guild:42"
        );
        assert_eq!(
            m.installations[1].source,
            InstallSource::Declared {
                file: "acme.toml".into()
            }
        );
        assert_eq!(
            m.members,
            vec![("slack:U0OTHER".parse().unwrap(), Role::Viewer)]
        );
    }

    #[test]
    fn rejects_bad_files_with_clear_errors() {
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"slack\"\nteam_id=\"T1\"\napp_id=\"A\"\ninstaller=\"U1\"\nbot_token=\"xoxb-1\"\n", "inline");
        check_err("[tenant]\nname=\"a\"\n", "no [[installation]]");
        check_err("[tenant]\nname=\"\"\n[[installation]]\nplatform=\"slack\"\nteam_id=\"T1\"\napp_id=\"A\"\ninstaller=\"U1\"\n", "must not be empty");
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"teams\"\napp_id=\"A\"\ninstaller=\"U1\"\n", "unknown platform");
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"slack\"\napp_id=\"A\"\ninstaller=\"U1\"\n", "team_id");
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"discord\"\napp_id=\"1\"\ninstaller=\"2\"\n", "guild_id");
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"discord\"\nguild_id=\"x\"\napp_id=\"1\"\ninstaller=\"2\"\n", "snowflake");
        check_err("[tenant]\nname=\"a\"\nextra=1\n", "unknown field");
        check_err("not toml at all [", "x.toml");
        check_err("[tenant]\nname=\"a\"\nextra=1\n", "line 3");
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"slack\"\nteam_id=\"T1\"\napp_id=\"A\"\ninstaller=\"U 1\"\n", "principal");
        check_err("[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"slack\"\nteam_id=\"T1\"\napp_id=\"A\"\ninstaller=\"U1\"\n[members]\n\"slack:U2\"=\"god\"\n", "unknown variant");
    }

    /// A token written where the format does not expect one (under a misspelt key, in a field
    /// of another type, as a role, as a key, or unquoted) is not repeated in the error, which
    /// says where it is; what names the problem (field names, expected punctuation) stays.
    #[test]
    fn a_syntax_error_does_not_repeat_what_the_file_says() {
        let head = "[tenant]\nname=\"a\"\n[[installation]]\nplatform=\"slack\"\nteam_id=\"T1\"\napp_id=\"A\"\ninstaller=\"U1\"\n";
        for (line, why) in [
            ("bot_token = xoxb-1234-SECRET", "unquoted"),
            (
                "scopes = \"xoxb-1234-SECRET\"",
                "a string where a list goes",
            ),
            ("scopes = 'ab\"cd-SECRET'", "a string with a quote in it"),
            (
                "bot_token_env = [\"xoxb-1234-SECRET\"]",
                "a list where a name goes",
            ),
            (
                "[members]\n\"slack:U2\" = \"xoxb-1234-SECRET\"",
                "a token as a role",
            ),
            ("xoxb-1234-SECRET = 1", "a token as a key"),
        ] {
            let text = format!("{head}{line}\n");
            let err = parse(Path::new("x.toml"), &text).unwrap_err().to_string();
            assert!(!err.contains("SECRET"), "{why}: {err}");
            assert!(err.contains("(line "), "{why}: {err}");
        }
        let text = format!("{head}bot_tokn = 1\n");
        let err = parse(Path::new("x.toml"), &text).unwrap_err().to_string();
        assert!(
            err.contains("`bot_tokn`") && err.contains("`bot_token_env`"),
            "{err}"
        );
        // A token pasted where its variable's name goes is refused, not repeated.
        let text = format!("{head}bot_token_env = \"xoxb-1234-SECRET\"\n");
        let err = parse(Path::new("x.toml"), &text).unwrap_err().to_string();
        assert!(err.contains("must name an environment variable"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn the_shipped_dev_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("installations");
        let manifests = load(&dir).unwrap();
        let dev = manifests
            .iter()
            .find(|m| m.path.ends_with("dev.toml"))
            .expect("installations/dev.toml ships");
        let platforms: Vec<Platform> = dev
            .installations
            .iter()
            .map(|i| i.workspace.platform())
            .collect();
        assert_eq!(platforms, [Platform::Slack, Platform::Discord]);
    }
}
