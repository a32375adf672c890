//! The command line: `serve`, `installations import|list|revoke` and `tenants list`.
//!
//! Every option is a flag and an `AGENTGATE_*` environment variable (the port is also `PORT`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use serde_json::json;

use crate::app::{Application, Services};
use std::num::NonZeroU32;
use std::process::ExitCode;

use crate::agent::{AgentConfig, LlmEndpoints};
use crate::transport::discord::signature as discord_signature;
use crate::transport::discord::DiscordConfig;
use crate::transport::slack::oauth::OAuthConfig;
use crate::transport::slack::SlackConfig;

use crate::audit::bundle;
use crate::audit::checkpoint::{SigningKey, VerifierKey};
use crate::config::{AuditOptions, Config, LogFormat};
use crate::installation::{manifest, Installation, InstallationId, InstallationStatus};
use crate::tenant::{TenantContext, TenantId};

/// agentgate: one gateway for many Slack workspaces and Discord servers, each an isolated tenant with a
/// policy-gated agent and its own Merkle-verified audit log.
#[derive(Debug, Parser)]
#[command(name = "agentgate", version, about, long_about = None)]
pub struct Cli {
    /// Settings every command shares.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command shares.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Directory for the store, the audit logs and (in development) the generated master key.
    #[arg(
        long,
        env = "AGENTGATE_DATA_DIR",
        default_value = "./data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Master key sealing tokens at rest: 32 bytes as 64 hex digits or base64. Unset in development:
    /// a key file is generated in the data directory (mode 0600) and a warning is logged.
    #[arg(
        long,
        env = "AGENTGATE_MASTER_KEY",
        hide_env_values = true,
        global = true
    )]
    pub master_key: Option<String>,
    /// Log line format.
    #[arg(
        long,
        env = "AGENTGATE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Audit checkpoint signing key, as a signed-note signer key text (`PRIVATE+KEY+name+id+key`).
    /// Unset: the key file below, or in development a generated `audit/signing.key` (with a warning).
    #[arg(
        long,
        env = "AGENTGATE_AUDIT_SIGNING_KEY",
        hide_env_values = true,
        global = true
    )]
    pub audit_signing_key: Option<String>,
    /// File holding the audit signing key text.
    #[arg(long, env = "AGENTGATE_AUDIT_SIGNING_KEY_FILE", global = true)]
    pub audit_signing_key_file: Option<PathBuf>,
    /// Prefix of every tenant log's origin line (`<prefix>/<tenant id>`), naming this deployment.
    #[arg(
        long,
        env = "AGENTGATE_AUDIT_ORIGIN",
        default_value = "agentgate",
        global = true
    )]
    pub audit_origin: String,
    /// Sign a checkpoint once this many events arrived since the last one.
    #[arg(
        long,
        env = "AGENTGATE_CHECKPOINT_EVERY",
        default_value_t = 1000,
        global = true
    )]
    pub checkpoint_every: u64,
    /// Sign a checkpoint at least this often (seconds): over new events, or as a signed heartbeat.
    #[arg(
        long,
        env = "AGENTGATE_CHECKPOINT_INTERVAL_SECS",
        default_value_t = 60,
        global = true
    )]
    pub checkpoint_interval_secs: u64,
    /// Log filter, in tracing's EnvFilter syntax (for example `info,agentgate=debug`).
    #[arg(long, env = "AGENTGATE_LOG", default_value = "info", global = true)]
    pub log: String,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: upsert the declared installations, then serve HTTP until SIGTERM or Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Manage installation records.
    #[command(subcommand)]
    Installations(InstallationsCommand),
    /// Inspect tenants.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// The per-tenant audit logs: export, verify offline, prove inclusion, sign, make keys.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Discord application setup.
    #[command(subcommand)]
    Discord(DiscordCommand),
    /// API keys for the admin and compliance API.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key; its token is printed once and never stored.
    Create {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// admin, compliance or service.
        #[arg(long)]
        role: String,
        /// How long it works: e.g. 90d, 12h, 30m, or never.
        #[arg(long, default_value = "90d")]
        expires: String,
        /// Extra scopes (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// A label.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List a tenant's keys (never their secrets).
    List {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
    },
    /// Revoke a key now.
    Revoke {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// The key id.
        id: String,
    },
}

/// A name as a terminal may show it: its control characters replaced. Names come from tenants
/// (a workspace's name as Slack or Discord gives it, a key's name), and an escape sequence in one
/// would act on the operator's terminal.
fn shown(name: &str) -> String {
    // Bidirectional overrides and isolates too: they make a name read as another.
    let hidden = |c: char| {
        c.is_control()
            || ('\u{202A}'..='\u{202E}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    name.chars()
        .map(|c| if hidden(c) { '\u{FFFD}' } else { c })
        .collect()
}

/// `v` as pretty JSON for a terminal: serde_json leaves DEL, the C1 controls and the bidirectional
/// overrides and isolates as they are, which a terminal acts on or which make a name read as
/// another (a workspace's own name is printed here); they are written as `\u` escapes, which
/// every JSON reader reads back as the same characters. They can only stand inside strings.
fn terminal_json(v: &serde_json::Value) -> serde_json::Result<String> {
    let text = serde_json::to_string_pretty(v)?;
    let escaped = |c: char| {
        ('\u{7F}'..='\u{9F}').contains(&c)
            || ('\u{202A}'..='\u{202E}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if escaped(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses `90d`, `12h`, `30m` or `never`.
fn parse_expiry(text: &str) -> anyhow::Result<Option<chrono::Duration>> {
    if text == "never" {
        return Ok(None);
    }
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = n
        .parse()
        .with_context(|| format!("--expires {text:?}: expected e.g. 90d, 12h, 30m or never"))?;
    if n <= 0 {
        anyhow::bail!("--expires must be positive");
    }
    // The `try_` constructors: the plain ones panic on a number too large for a duration.
    let d = match unit {
        "d" => chrono::Duration::try_days(n),
        "h" => chrono::Duration::try_hours(n),
        "m" => chrono::Duration::try_minutes(n),
        _ => anyhow::bail!("--expires {text:?}: expected e.g. 90d, 12h, 30m or never"),
    };
    // A time past what dates can hold is refused too (rather than when the key is made).
    match d.filter(|d| chrono::Utc::now().checked_add_signed(*d).is_some()) {
        Some(d) => Ok(Some(d)),
        None => anyhow::bail!(
            "--expires {text:?} is too far away; use never for a key that does not expire"
        ),
    }
}

/// `discord …`
#[derive(Debug, Subcommand)]
pub enum DiscordCommand {
    /// Register the /agentgate slash command, globally or in one guild (immediate, for testing).
    RegisterCommands {
        /// Register in this guild only.
        #[arg(long)]
        guild: Option<String>,
        /// The application and bot settings.
        #[command(flatten)]
        discord: DiscordArgs,
    },
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write a self-contained bundle of a tenant's events for a regulator (see docs/AUDIT-FORMAT.md).
    Export {
        /// The tenant id (`t_…`, from `tenants list`).
        #[arg(long)]
        tenant: String,
        /// First sequence number to export.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// One past the last sequence number to export; default: the whole log.
        #[arg(long)]
        to: Option<u64>,
        /// The checkpoint kept from the previous export; the bundle then proves the log only grew since.
        #[arg(long)]
        since_checkpoint: Option<PathBuf>,
        /// The bundle directory to create; it must not exist or be empty.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a bundle offline. Exit codes: 0 verified, 1 verification failed, 2 could not run
    /// (no such bundle directory, an unreadable or invalid --trusted-key, an unreadable
    /// --since-checkpoint).
    Verify {
        /// The bundle directory.
        path: PathBuf,
        /// The deployment's verifier key (`name+id+key`), or a file holding it. Without it the
        /// checkpoint is checked against the bundle's own keyring, which proves integrity but not origin.
        #[arg(long)]
        trusted_key: Option<String>,
        /// A checkpoint kept from an earlier export: the bundle must prove the log only grew since.
        /// Without --trusted-key, the new checkpoint must be signed by a key that signed this one.
        #[arg(long)]
        since_checkpoint: Option<PathBuf>,
    },
    /// Print the inclusion proof of one event in the C2SP tlog-proof format.
    Proof {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// The event's sequence number.
        #[arg(long)]
        seq: u64,
    },
    /// Rebuild a tenant's projections (memberships, installation states, usage, run states) from its
    /// log and report every difference from the live ones. Exits 1 when there is a difference.
    Replay {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
    },
    /// Sign a checkpoint of a tenant's log now and print it.
    Checkpoint {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
    },
    /// Generate a checkpoint signing key: writes the signer key to FILE (mode 0600) and prints the
    /// verifier key to give to auditors.
    Keygen {
        /// The key's name, shown in signatures (for example your deployment's host name).
        #[arg(long)]
        name: String,
        /// Where to write the signer key; it must not exist.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "AGENTGATE_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Directory of declarative installation files (`*.toml`) upserted at start.
    #[arg(
        long,
        env = "AGENTGATE_INSTALLATIONS_DIR",
        default_value = "./installations"
    )]
    pub installations_dir: PathBuf,
    /// Seconds a request may take before it is answered 408 (at least 1: with 0 every request
    /// would be).
    #[arg(
        long,
        env = "AGENTGATE_REQUEST_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub request_timeout_secs: u64,
    /// Admin API requests one tenant may make per minute.
    #[arg(long, env = "AGENTGATE_API_REQUESTS_PER_MINUTE", default_value_t = 600)]
    pub api_requests_per_minute: u32,
    /// The agent loop's settings.
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Slack.
    #[command(flatten)]
    pub slack: SlackArgs,
    /// Discord.
    #[command(flatten)]
    pub discord: DiscordArgs,
}

/// Discord settings; the interactions endpoint is on when the public key and application id are set.
#[derive(Debug, Args)]
pub struct DiscordArgs {
    /// The application's public key (General Information), 64 hex digits, for interaction signatures.
    #[arg(long, env = "AGENTGATE_DISCORD_PUBLIC_KEY")]
    pub discord_public_key: Option<String>,
    /// The application id (also the OAuth2 client id).
    #[arg(long, env = "AGENTGATE_DISCORD_APPLICATION_ID")]
    pub discord_application_id: Option<String>,
    /// The OAuth2 client secret, for the install at /discord/install.
    #[arg(long, env = "AGENTGATE_DISCORD_CLIENT_SECRET", hide_env_values = true)]
    pub discord_client_secret: Option<String>,
    /// The bot token, for registering slash commands (and the Gateway).
    #[arg(long, env = "AGENTGATE_DISCORD_BOT_TOKEN", hide_env_values = true)]
    pub discord_bot_token: Option<String>,
    /// Discord's REST base URL.
    #[arg(
        long,
        env = "AGENTGATE_DISCORD_API_URL",
        default_value = "https://discord.com/api/v10"
    )]
    pub discord_api_url: String,
    /// Discord's OAuth2 authorize URL.
    #[arg(
        long,
        env = "AGENTGATE_DISCORD_AUTHORIZE_URL",
        default_value = "https://discord.com/oauth2/authorize"
    )]
    pub discord_authorize_url: String,
    /// Bot permissions requested at install (decimal bitfield; default: View Channels and Send Messages).
    #[arg(long, env = "AGENTGATE_DISCORD_PERMISSIONS", default_value = "3072")]
    pub discord_permissions: String,
}

impl DiscordArgs {
    fn config(&self, public_url: &str) -> anyhow::Result<Option<DiscordConfig>> {
        let (Some(key), Some(app)) = (&self.discord_public_key, &self.discord_application_id)
        else {
            if self.discord_public_key.is_some() != self.discord_application_id.is_some() {
                anyhow::bail!("set both AGENTGATE_DISCORD_PUBLIC_KEY and AGENTGATE_DISCORD_APPLICATION_ID, or neither");
            }
            return Ok(None);
        };
        crate::installation::snowflake("application id", app)
            .map_err(|e| anyhow::anyhow!("AGENTGATE_DISCORD_APPLICATION_ID: {e}"))?;
        url::Url::parse(&self.discord_api_url).context("AGENTGATE_DISCORD_API_URL is not a URL")?;
        url::Url::parse(&self.discord_authorize_url)
            .context("AGENTGATE_DISCORD_AUTHORIZE_URL is not a URL")?;
        self.discord_permissions
            .parse::<u64>()
            .context("AGENTGATE_DISCORD_PERMISSIONS is not a decimal bitfield")?;
        Ok(Some(DiscordConfig {
            public_key: discord_signature::parse_public_key(key)
                .map_err(|e| anyhow::anyhow!("AGENTGATE_DISCORD_PUBLIC_KEY: {e}"))?,
            application_id: app.clone(),
            client_secret: self.discord_client_secret.clone().map(SecretString::from),
            bot_token: self.discord_bot_token.clone().map(SecretString::from),
            api_url: self.discord_api_url.clone(),
            authorize_url: self.discord_authorize_url.clone(),
            permissions: self.discord_permissions.clone(),
            redirect_url: format!(
                "{}/discord/oauth_redirect",
                public_url.trim_end_matches('/')
            ),
        }))
    }
}

/// Slack settings; Slack's routes are on when a signing secret is set.
#[derive(Debug, Args)]
pub struct SlackArgs {
    /// The Slack app's signing secret (Basic Information → App Credentials).
    #[arg(long, env = "AGENTGATE_SLACK_SIGNING_SECRET", hide_env_values = true)]
    pub slack_signing_secret: Option<String>,
    /// The Slack app's client id, for the OAuth install at /slack/install.
    #[arg(long, env = "AGENTGATE_SLACK_CLIENT_ID")]
    pub slack_client_id: Option<String>,
    /// The Slack app's client secret.
    #[arg(long, env = "AGENTGATE_SLACK_CLIENT_SECRET", hide_env_values = true)]
    pub slack_client_secret: Option<String>,
    /// Bot scopes requested at install, comma-separated.
    #[arg(
        long,
        env = "AGENTGATE_SLACK_SCOPES",
        default_value = "app_mentions:read,chat:write,commands"
    )]
    pub slack_scopes: String,
    /// The Slack Web API base URL.
    #[arg(
        long,
        env = "AGENTGATE_SLACK_API_URL",
        default_value = "https://slack.com/api/"
    )]
    pub slack_api_url: String,
    /// Slack's OAuth authorize URL.
    #[arg(
        long,
        env = "AGENTGATE_SLACK_AUTHORIZE_URL",
        default_value = "https://slack.com/oauth/v2/authorize"
    )]
    pub slack_authorize_url: String,
    /// This gateway's public base URL, e.g. https://agentgate.example.com (for OAuth redirects).
    #[arg(
        long,
        env = "AGENTGATE_PUBLIC_URL",
        default_value = "http://localhost:3000"
    )]
    pub public_url: String,
}

impl SlackArgs {
    fn config(&self) -> anyhow::Result<Option<SlackConfig>> {
        let Some(secret) = self.slack_signing_secret.clone() else {
            return Ok(None);
        };
        url::Url::parse(&self.slack_api_url).context("AGENTGATE_SLACK_API_URL is not a URL")?;
        url::Url::parse(&self.slack_authorize_url)
            .context("AGENTGATE_SLACK_AUTHORIZE_URL is not a URL")?;
        url::Url::parse(&self.public_url).context("AGENTGATE_PUBLIC_URL is not a URL")?;
        let oauth = match (&self.slack_client_id, &self.slack_client_secret) {
            (Some(id), Some(secret)) => Some(OAuthConfig {
                client_id: id.clone(),
                client_secret: SecretString::from(secret.clone()),
                scopes: self.slack_scopes.clone(),
                authorize_url: self.slack_authorize_url.clone(),
                redirect_url: format!(
                    "{}/slack/oauth_redirect",
                    self.public_url.trim_end_matches('/')
                ),
            }),
            (None, None) => None,
            _ => anyhow::bail!(
                "set both AGENTGATE_SLACK_CLIENT_ID and AGENTGATE_SLACK_CLIENT_SECRET, or neither"
            ),
        };
        Ok(Some(SlackConfig {
            signing_secret: SecretString::from(secret),
            api_url: self.slack_api_url.clone(),
            oauth,
        }))
    }
}

/// The agent loop's settings.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Planning steps a run may take before it stops.
    #[arg(long, env = "AGENTGATE_MAX_STEPS", default_value_t = 8)]
    pub max_steps: u32,
    /// Conversation turns kept per (principal, conversation) and fed back to the planner.
    #[arg(long, env = "AGENTGATE_HISTORY_TURNS", default_value_t = 20)]
    pub history_turns: usize,
    /// Runs a tenant may start per minute.
    #[arg(long, env = "AGENTGATE_RUNS_PER_MINUTE", default_value_t = 120)]
    pub runs_per_minute: u32,
    /// OpenAI-compatible base URL (OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp's server).
    #[arg(
        long,
        env = "AGENTGATE_OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub openai_base_url: String,
    /// The deployment's OpenAI-compatible API key, for tenants that name no key of their own.
    #[arg(long, env = "AGENTGATE_OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Anthropic base URL.
    #[arg(
        long,
        env = "AGENTGATE_ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: String,
    /// The deployment's Anthropic API key, for tenants that name no key of their own.
    #[arg(long, env = "AGENTGATE_ANTHROPIC_API_KEY", hide_env_values = true)]
    pub anthropic_api_key: Option<String>,
    /// Seconds one model call may take.
    #[arg(long, env = "AGENTGATE_LLM_TIMEOUT_SECS", default_value_t = 60)]
    pub llm_timeout_secs: u64,
    /// Private networks (CIDR, comma-separated, e.g. `10.0.0.0/8,fd00::/8`) that tenants' webhook
    /// tools may reach; public addresses are always allowed, loopback, private, link-local and
    /// metadata addresses only when listed here.
    #[arg(
        long,
        env = "AGENTGATE_WEBHOOK_ALLOWED_NETWORKS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub webhook_allowed_networks: Vec<crate::agent::egress::Network>,
}

impl AgentArgs {
    fn config(&self) -> AgentConfig {
        AgentConfig {
            max_steps: self.max_steps.max(1),
            history_turns: self.history_turns,
            runs_per_minute: NonZeroU32::new(self.runs_per_minute).unwrap_or(NonZeroU32::MIN),
            llm: LlmEndpoints {
                openai_base_url: self.openai_base_url.clone(),
                openai_api_key: self.openai_api_key.clone().map(SecretString::from),
                anthropic_base_url: self.anthropic_base_url.clone(),
                anthropic_api_key: self.anthropic_api_key.clone().map(SecretString::from),
                timeout: Duration::from_secs(self.llm_timeout_secs.max(1)),
            },
            webhook_networks: self.webhook_allowed_networks.clone(),
        }
    }
}

/// `installations …`
#[derive(Debug, Subcommand)]
pub enum InstallationsCommand {
    /// Upsert declarative installation files (a file, or every *.toml in a directory).
    Import {
        /// The file or directory.
        path: PathBuf,
    },
    /// List installations of every tenant (ids and status only, never tokens).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an installation: its workspace stops resolving and its tokens are forgotten.
    Revoke {
        /// The installation id (`i_…`, from `installations list`).
        id: String,
        /// Why, recorded in the audit log.
        #[arg(long, default_value = "operator")]
        reason: String,
    },
}

/// `tenants …`
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// List tenants with their installations (ids only, never tokens).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show or change a tenant's plan, monthly quota and per-run ceilings. Only the operator sets
    /// these (a tenant's admins cannot), each change is audited, and with no change given the
    /// current limits are printed.
    Limits {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// free, team or enterprise.
        #[arg(long)]
        plan: Option<String>,
        /// Model tokens per calendar month (UTC).
        #[arg(long)]
        quota_tokens: Option<u64>,
        /// Tool calls per calendar month.
        #[arg(long)]
        quota_tool_calls: Option<u64>,
        /// Runs per calendar month.
        #[arg(long)]
        quota_runs: Option<u64>,
        /// Cost per calendar month, in microcents (a millionth of a cent).
        #[arg(long)]
        quota_cost_microcents: Option<u64>,
        /// Model tokens per run.
        #[arg(long)]
        run_tokens: Option<u64>,
        /// Tool calls per run.
        #[arg(long)]
        run_tool_calls: Option<u64>,
        /// Wall time per run, in milliseconds.
        #[arg(long)]
        run_walltime_ms: Option<u64>,
        /// Cost per run, in microcents.
        #[arg(long)]
        run_cost_microcents: Option<u64>,
    },
}

impl GlobalArgs {
    fn audit_options(&self) -> AuditOptions {
        AuditOptions {
            signing_key: self.audit_signing_key.clone().map(SecretString::from),
            signing_key_file: self.audit_signing_key_file.clone(),
            origin_prefix: self.audit_origin.clone(),
            checkpoint_every: self.checkpoint_every,
            checkpoint_interval: Duration::from_secs(self.checkpoint_interval_secs.max(1)),
        }
    }
}

impl Cli {
    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command failed on, with context.
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let audit = self.global.audit_options();
        let master_key = self.global.master_key.clone().map(SecretString::from);
        match self.command {
            Command::Serve(args) => {
                let args = *args;
                let config = Config {
                    data_dir: self.global.data_dir,
                    installations_dir: args.installations_dir,
                    bind: args.bind,
                    port: args.port,
                    master_key,
                    request_timeout: Duration::from_secs(args.request_timeout_secs),
                    audit,
                    agent: args.agent.config(),
                    api_requests_per_minute: NonZeroU32::new(args.api_requests_per_minute).unwrap_or(NonZeroU32::MIN),
                    slack: args.slack.config()?,
                    discord: args.discord.config(&args.slack.public_url)?,
                };
                let app = Application::build(config).await?;
                app.run_until_stopped(crate::shutdown::signal()).await
            }
            Command::Installations(cmd) => {
                let services = Services::open(&self.global.data_dir, master_key.as_ref(), &audit)?;
                let result = installations(&services, cmd).await;
                services.close().await?;
                result
            }
            Command::Tenants(TenantsCommand::List { json }) => {
                let services = Services::open(&self.global.data_dir, master_key.as_ref(), &audit)?;
                tenants_list(&services, json)
            }
            Command::Tenants(cmd @ TenantsCommand::Limits { .. }) => {
                let services = Services::open(&self.global.data_dir, master_key.as_ref(), &audit)?;
                let result = tenants_limits(&services, cmd).await;
                services.close().await?;
                result
            }
            Command::Discord(DiscordCommand::RegisterCommands { guild, discord }) => {
                let (Some(app), Some(token)) = (discord.discord_application_id, discord.discord_bot_token) else {
                    anyhow::bail!("set AGENTGATE_DISCORD_APPLICATION_ID and AGENTGATE_DISCORD_BOT_TOKEN");
                };
                if let Some(g) = &guild {
                    crate::installation::snowflake("guild id", g).map_err(|e| anyhow::anyhow!("--guild: {e}"))?;
                }
                let api = crate::transport::discord::api::DiscordApi::new(&discord.discord_api_url);
                let n = api
                    .register_commands(&app, &SecretString::from(token), guild.as_deref())
                    .await
                    .context("Discord refused the commands")?;
                match guild {
                    Some(g) => println!("registered {n} command(s) in guild {g}"),
                    None => println!("registered {n} global command(s); Discord may take up to an hour to show them"),
                }
                Ok(())
            }
            Command::Keys(cmd) => {
                let services = Services::open(&self.global.data_dir, master_key.as_ref(), &audit)?;
                let result = keys_command(&services, cmd).await;
                services.close().await?;
                result
            }
            Command::Audit(AuditCommand::Verify {
                path,
                trusted_key,
                since_checkpoint,
            }) => {
                return Ok(audit_verify(
                    &path,
                    trusted_key.as_deref(),
                    since_checkpoint.as_deref(),
                ))
            }
            Command::Audit(AuditCommand::Keygen { name, out }) => audit_keygen(&name, &out),
            Command::Audit(AuditCommand::Replay { tenant }) => {
                let services = Services::open(&self.global.data_dir, master_key.as_ref(), &audit)?;
                let result = audit_replay(&services, &tenant).await;
                services.close().await?;
                return result;
            }
            Command::Audit(cmd) => {
                let services = Services::open(&self.global.data_dir, master_key.as_ref(), &audit)?;
                let result = audit_command(&services, cmd).await;
                services.close().await?;
                result
            }
        }
        .map(|()| ExitCode::SUCCESS)
    }
}

fn tenant_context(
    services: &Services,
    tenant: &str,
) -> anyhow::Result<(TenantContext, crate::store::TenantStore)> {
    let id: TenantId = tenant.parse().context("not a tenant id")?;
    let ctx = services.tenants.operator_context(&id)?;
    let repo = services.store.for_tenant(&ctx)?;
    Ok((ctx, repo))
}

async fn audit_command(services: &Services, cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Export {
            tenant,
            from,
            to,
            since_checkpoint,
            out,
        } => {
            let (ctx, repo) = tenant_context(services, &tenant)?;
            let since = since_checkpoint
                .map(|p| {
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))
                })
                .transpose()?;
            eprintln!("exporting tenant {tenant} to {}", out.display());
            let progress = ProgressLine::new("exported");
            let m = services
                .audit
                .export_with_progress(
                    &ctx,
                    repo,
                    from,
                    to,
                    since.as_deref(),
                    &out,
                    Some(std::sync::Arc::new(move |n| progress.tell(n))),
                )
                .await?;
            println!(
                "exported events {}..{} of tenant {} (checkpoint size {}) to {}",
                m.from,
                m.to,
                m.tenant,
                m.tree_size,
                out.display()
            );
            println!(
                "keep {} for the next export's --since-checkpoint",
                out.join("checkpoint.txt").display()
            );
            Ok(())
        }
        AuditCommand::Proof { tenant, seq } => {
            let (ctx, repo) = tenant_context(services, &tenant)?;
            print!("{}", services.audit.tlog_proof(&ctx, repo, seq).await?);
            Ok(())
        }
        AuditCommand::Checkpoint { tenant } => {
            let (ctx, repo) = tenant_context(services, &tenant)?;
            print!("{}", services.audit.checkpoint_now(&ctx, repo).await?);
            Ok(())
        }
        AuditCommand::Verify { .. } | AuditCommand::Keygen { .. } | AuditCommand::Replay { .. } => {
            unreachable!("handled by the caller")
        }
    }
}

async fn keys_command(services: &Services, cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            tenant,
            role,
            expires,
            scopes,
            name,
        } => {
            let id: TenantId = tenant.parse().context("not a tenant id")?;
            let role: crate::tenant::KeyRole = role.parse()?;
            let issued = services
                .tenants
                .create_key_as_operator(&id, &name, role, scopes, parse_expiry(&expires)?)
                .await?;
            eprintln!(
                "key {} ({}) for tenant {id}; the token below is shown once",
                issued.record.id,
                role.as_str()
            );
            println!("{}", secrecy::ExposeSecret::expose_secret(&issued.token));
            Ok(())
        }
        KeysCommand::List { tenant } => {
            let (_, repo) = tenant_context(services, &tenant)?;
            for k in repo.api_keys().keys()? {
                let state = if crate::tenant::is_live(&k, chrono::Utc::now()) {
                    "live"
                } else {
                    "revoked or expired"
                };
                println!("{}  {}  {}  {state}", k.id, k.role, shown(&k.name));
            }
            Ok(())
        }
        KeysCommand::Revoke { tenant, id } => {
            let (ctx, _) = tenant_context(services, &tenant)?;
            services
                .tenants
                .revoke_key(&ctx, &id, chrono::Utc::now())
                .await?;
            println!("revoked {id}");
            Ok(())
        }
    }
}

async fn audit_replay(services: &Services, tenant: &str) -> anyhow::Result<ExitCode> {
    let (ctx, repo) = tenant_context(services, tenant)?;
    let head = services.audit.head(&ctx, repo.clone()).await?;
    eprintln!("replaying {} events of tenant {tenant}", head.size);
    let diff = services.audit.replay(&ctx, repo).await?;
    if diff.is_empty() {
        println!(
            "no difference: the live projections match {} replayed events",
            head.size
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for d in &diff {
            println!("{d}");
        }
        println!("{} differences", diff.len());
        Ok(ExitCode::from(1))
    }
}

/// Reads a verifier key given inline or as a file. An argument naming an existing file is that
/// file, which must hold a key: a damaged or wrong key file is reported as such, not parsed as if
/// its name were the key.
fn read_verifier_key(arg: &str) -> anyhow::Result<VerifierKey> {
    let path = std::path::Path::new(arg);
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--trusted-key: cannot read the file {arg}"))?;
        return VerifierKey::from_vkey_text(text.trim()).map_err(|e| {
            anyhow::anyhow!("--trusted-key: the file {arg} does not hold a verifier key: {e}")
        });
    }
    VerifierKey::from_vkey_text(arg.trim()).map_err(|e| {
        anyhow::anyhow!("--trusted-key is neither a verifier key nor an existing file: {e}")
    })
}

/// A progress line on stderr for long work (`exported 1200000 events so far`): nothing for the
/// first two seconds, then at most one line every two seconds, so short runs stay quiet.
struct ProgressLine {
    verb: &'static str,
    next: std::sync::Mutex<std::time::Instant>,
}

impl ProgressLine {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(2);

    fn new(verb: &'static str) -> Self {
        ProgressLine {
            verb,
            next: std::sync::Mutex::new(std::time::Instant::now() + Self::EVERY),
        }
    }

    fn tell(&self, events: u64) {
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if now >= *next {
            eprintln!("{} {events} events so far", self.verb);
            *next = now + Self::EVERY;
        }
    }
}

fn audit_verify(
    path: &std::path::Path,
    trusted: Option<&str>,
    since: Option<&std::path::Path>,
) -> ExitCode {
    // No bundle to check is a command that could not run, not a bundle that failed.
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            eprintln!(
                "error: {} is not a directory; a bundle is the directory `audit export` wrote",
                path.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: cannot read the bundle {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let trusted = match trusted.map(read_verifier_key).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let since = match since.map(std::fs::read_to_string).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read --since-checkpoint: {e}");
            return ExitCode::from(2);
        }
    };
    let progress = ProgressLine::new("checked");
    let tell = |n| progress.tell(n);
    match bundle::verify_with_progress(path, trusted.as_ref(), since.as_deref(), &tell) {
        Ok(v) => {
            println!("{v}");
            if !v.trusted_key && since.is_some() {
                eprintln!("note: no --trusted-key: the checkpoint is signed by a key (from the bundle's keyring) that signed your earlier checkpoint");
            } else if !v.trusted_key {
                eprintln!("note: checked against the bundle's own keyring; pass --trusted-key to check who signed it");
            }
            if let Some(s) = v.consistent_since {
                println!("consistent with the earlier checkpoint at size {s}");
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("FAILED: {f}");
            ExitCode::from(1)
        }
    }
}

fn audit_keygen(name: &str, out: &std::path::Path) -> anyhow::Result<()> {
    let key = SigningKey::generate(name).map_err(|e| anyhow::anyhow!("bad key name: {e}"))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    std::io::Write::write_all(&mut f, key.to_skey_text().as_bytes())?;
    f.sync_all()?;
    println!("{}", key.verifier().to_vkey_text());
    eprintln!(
        "signer key written to {}; set AGENTGATE_AUDIT_SIGNING_KEY_FILE to it",
        out.display()
    );
    Ok(())
}

fn status_name(i: &Installation) -> &'static str {
    match i.status {
        InstallationStatus::Active => "active",
        InstallationStatus::Revoked { .. } => "revoked",
    }
}

/// Every tenant with its installations, read through an operator context per tenant.
fn listing(
    services: &Services,
) -> anyhow::Result<Vec<(crate::store::TenantSummary, Vec<Installation>)>> {
    let mut out = Vec::new();
    for t in services.store.admin().tenants()? {
        let ctx = services.tenants.operator_context(&t.id)?;
        let insts = services.store.for_tenant(&ctx)?.installations().list()?;
        out.push((t, insts));
    }
    Ok(out)
}

fn installation_json(i: &Installation) -> serde_json::Value {
    json!({
        "id": i.id.as_str(),
        "platform": i.workspace.platform().as_str(),
        "workspace": i.workspace.directory_key(),
        "status": status_name(i),
        "has_bot_token": i.bot_token.is_some(),
    })
}

fn tenants_list(services: &Services, as_json: bool) -> anyhow::Result<()> {
    let rows = listing(services)?;
    if as_json {
        let arr: Vec<_> = rows
            .iter()
            .map(|(t, insts)| {
                json!({
                    "id": t.id.as_str(),
                    "name": t.name,
                    "created_at": t.created_at.to_rfc3339(),
                    "installations": insts.iter().map(installation_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", terminal_json(&serde_json::Value::Array(arr))?);
    } else {
        for (t, insts) in &rows {
            let ids: Vec<&str> = insts.iter().map(|i| i.id.as_str()).collect();
            println!(
                "{}  {}  installations: {}",
                t.id,
                shown(&t.name),
                ids.join(", ")
            );
        }
        if rows.is_empty() {
            println!("no tenants");
        }
    }
    Ok(())
}

async fn tenants_limits(services: &Services, cmd: TenantsCommand) -> anyhow::Result<()> {
    let TenantsCommand::Limits {
        tenant,
        plan,
        quota_tokens,
        quota_tool_calls,
        quota_runs,
        quota_cost_microcents,
        run_tokens,
        run_tool_calls,
        run_walltime_ms,
        run_cost_microcents,
    } = cmd
    else {
        unreachable!("called for limits only")
    };
    let id: TenantId = tenant.parse().context("--tenant: not a tenant id")?;
    let plan = match plan {
        None => None,
        Some(p) => Some(
            serde_json::from_value::<crate::tenant::Plan>(serde_json::Value::String(p.clone()))
                .map_err(|_| anyhow::anyhow!("--plan {p:?}: expected free, team or enterprise"))?,
        ),
    };
    let change = crate::tenant::LimitsChange {
        plan,
        quota_tokens,
        quota_tool_calls,
        quota_runs,
        quota_cost_microcents,
        run_tokens,
        run_tool_calls,
        run_walltime_ms,
        run_cost_microcents,
    };
    let s = services
        .tenants
        .set_limits_as_operator(&id, &change)
        .await?;
    println!(
        "{}",
        terminal_json(&json!({
            "tenant": id.as_str(),
            "plan": s.plan,
            "quota": s.quota,
            "run_ceilings": s.run_ceilings,
        }))?
    );
    Ok(())
}

async fn installations(services: &Services, cmd: InstallationsCommand) -> anyhow::Result<()> {
    match cmd {
        InstallationsCommand::Import { path } => {
            let manifests = manifest::load(&path)?;
            for m in &manifests {
                for var in &m.missing_env {
                    eprintln!(
                        "warning: {}: {var} is not set; this installation has no bot token",
                        m.path.display()
                    );
                }
                for d in services.tenants.import_manifest(m).await? {
                    println!("{}  tenant {}  {:?}", d.installation, d.tenant, d.outcome);
                }
            }
            Ok(())
        }
        InstallationsCommand::List { json } => {
            let rows = listing(services)?;
            if json {
                let arr: Vec<_> = rows
                    .iter()
                    .flat_map(|(t, insts)| {
                        insts.iter().map(move |i| {
                            let mut v = installation_json(i);
                            v["tenant"] = json!(t.id.as_str());
                            v
                        })
                    })
                    .collect();
                println!("{}", terminal_json(&serde_json::Value::Array(arr))?);
            } else {
                for (t, insts) in &rows {
                    for i in insts {
                        println!("{}  {}  {}  {}", i.id, t.id, i.workspace, status_name(i));
                    }
                }
            }
            Ok(())
        }
        InstallationsCommand::Revoke { id, reason } => {
            let id: InstallationId = id.parse().context("not an installation id")?;
            if services.tenants.revoke_installation(&id, &reason).await? {
                println!("revoked {id}");
            } else {
                println!("{id} was already revoked");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a terminal acts on, or what makes a name read as another, is escaped in JSON output
    /// and reads back as the same text.
    #[test]
    fn json_for_a_terminal_escapes_del_c1_and_bidi_controls() {
        let name = "acme\u{7f}\u{9b}31m\u{202e}evil\u{2066}x";
        let out = terminal_json(&serde_json::json!({"name": name})).unwrap();
        assert!(
            !out.chars()
                .any(|c| c == '\u{7f}' || c == '\u{9b}' || c == '\u{202e}' || c == '\u{2066}'),
            "{out:?}"
        );
        assert!(out.contains("\\u007f") && out.contains("\\u009b") && out.contains("\\u202e"));
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back["name"], name);
    }

    #[test]
    fn names_are_shown_without_control_characters() {
        assert_eq!(shown("Acme Corp"), "Acme Corp");
        assert_eq!(
            shown("evil\u{1b}]0;owned\u{7}\nline"),
            "evil\u{FFFD}]0;owned\u{FFFD}\u{FFFD}line"
        );
        assert_eq!(
            shown("abc\u{202E}fdp.exe\u{2066}"),
            "abc\u{FFFD}fdp.exe\u{FFFD}"
        );
        assert_eq!(shown("c1\u{9b}31m"), "c1\u{FFFD}31m");
    }
}
