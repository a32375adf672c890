//! `Config`: the gateway's settings as plain data, parsed once from flags and `AGENTGATE_*` variables.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the store, the audit logs and the development master key live.
    pub data_dir: PathBuf,
    /// Declarative installation files to upsert at start; missing is not an error.
    pub installations_dir: PathBuf,
    /// The address to listen on.
    pub bind: IpAddr,
    /// The port; 0 picks a free one (tests).
    pub port: u16,
    /// The master key that seals tokens at rest; `None` uses a generated key file (development).
    pub master_key: Option<SecretString>,
    /// How long a request may take before it is answered 408.
    pub request_timeout: Duration,
    /// The audit log's signing and checkpoint settings.
    pub audit: AuditOptions,
    /// The agent loop's settings.
    pub agent: crate::agent::AgentConfig,
    /// Slack, when a signing secret is configured.
    pub slack: Option<crate::transport::slack::SlackConfig>,
    /// API requests one tenant may make per minute.
    pub api_requests_per_minute: std::num::NonZeroU32,
    /// Discord, when a public key and application id are configured.
    pub discord: Option<crate::transport::discord::DiscordConfig>,
}

/// How the audit log signs checkpoints.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// The signing key as a note signer key text (`PRIVATE+KEY+name+id+key`); wins over the file.
    pub signing_key: Option<SecretString>,
    /// A file holding the signing key text; unset uses (and in development generates) `audit/signing.key`.
    pub signing_key_file: Option<PathBuf>,
    /// The prefix of each tenant log's origin line.
    pub origin_prefix: String,
    /// Sign once this many events arrived since the last checkpoint.
    pub checkpoint_every: u64,
    /// Sign at least this often: over new events, or as a heartbeat.
    pub checkpoint_interval: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            signing_key: None,
            signing_key_file: None,
            origin_prefix: "agentgate".to_owned(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}
