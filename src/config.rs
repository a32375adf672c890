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
}
