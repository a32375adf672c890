//! agentgate: one deployment serving many Slack workspaces and Discord servers as isolated tenants.
//!
//! A tour, from the edge inwards:
//! - [`cli`] and [`app`] parse the configuration and start the server; [`http`] holds the router and
//!   the one `ApiError`.
//! - [`installation`] holds installation records and the declarative `installations/*.toml` files.
//! - [`tenant`] builds the immutable `TenantContext`, only from a verified installation lookup (or for the
//!   operator's CLI), and provisions tenants.
//! - [`store`] is the only module that touches the storage engine; every repository comes from a context.
//! - [`audit`] holds the closed set of audit events and the sink every event goes through.
//! - [`agent`] runs commands: planners, tools, the Cedar gate, budgets, crash-safe run checkpoints.
//! - [`crypto`] seals tokens at rest under the master key.
#![warn(missing_docs)]
#![warn(clippy::self_named_module_files)]

pub mod agent;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod http;
pub mod installation;
pub mod metrics;
pub mod shutdown;
pub mod store;
pub mod tenant;
pub mod transport;
