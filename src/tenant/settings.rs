//! Per-tenant settings: plan, monthly quotas, per-run ceilings, LLM settings, feature flags and tool grants.
//!
//! These are configuration values that an admin edits and the store persists, so unlike the identity
//! types they derive serde; their stored form is versioned by the store module.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::context::Role;

/// Ceilings for one run. The agent loop checks them before every model and tool call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Model tokens in and out, together.
    pub tokens: u64,
    /// Tool calls.
    pub tool_calls: u64,
    /// Wall time in milliseconds.
    pub walltime_ms: u64,
    /// Cost in microcents (a millionth of a cent).
    pub cost_microcents: u64,
}

/// A tenant's monthly allowance; each run's ceilings are clipped to what remains of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonthlyQuota {
    /// Model tokens per calendar month (UTC).
    pub tokens: u64,
    /// Tool calls per calendar month.
    pub tool_calls: u64,
    /// Runs per calendar month.
    pub runs: u64,
    /// Cost per calendar month, in microcents.
    pub cost_microcents: u64,
}

/// Which model provider plans a tenant's runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmSettings {
    /// `rules` (no network), `openai` or `anthropic`.
    pub provider: String,
    /// The model name passed to the provider.
    pub default_model: String,
    /// Sampling temperature, in thousandths, so that settings compare exactly.
    pub default_temperature_milli: u32,
    /// Upper bound on tokens the model may produce per call.
    pub default_max_tokens: u32,
    /// The name of the environment variable or stored credential that holds the key; never the key.
    pub key_ref: Option<String>,
}

/// The subscription tier, which chooses the default quotas and ceilings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// The default for a new installation.
    Free,
    /// A paying tenant.
    Team,
    /// A tenant with negotiated limits.
    Enterprise,
}

/// Everything an admin can tune for a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSettings {
    /// A human name, such as the workspace name, for operators' listings.
    pub name: String,
    /// The subscription tier.
    pub plan: Plan,
    /// The monthly allowance.
    pub quota: MonthlyQuota,
    /// Ceilings for each run.
    pub run_ceilings: Budget,
    /// Model provider settings.
    pub llm: LlmSettings,
    /// Feature flags, off unless listed as true.
    pub features: BTreeMap<String, bool>,
    /// The role of a workspace user who is not in the membership table.
    pub default_role: Role,
}

impl TenantSettings {
    /// The settings a tenant gets when its first installation arrives.
    pub fn defaults(name: &str) -> Self {
        TenantSettings {
            name: name.to_owned(),
            plan: Plan::Free,
            quota: MonthlyQuota {
                tokens: 2_000_000,
                tool_calls: 20_000,
                runs: 5_000,
                cost_microcents: 500_000_000,
            },
            run_ceilings: Budget {
                tokens: 50_000,
                tool_calls: 20,
                walltime_ms: 60_000,
                cost_microcents: 20_000_000,
            },
            llm: LlmSettings {
                provider: "rules".to_owned(),
                default_model: "rules-v1".to_owned(),
                default_temperature_milli: 200,
                default_max_tokens: 1024,
                key_ref: None,
            },
            features: BTreeMap::new(),
            default_role: Role::Member,
        }
    }
}

/// One tool capability granted to the roles that may use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolGrant {
    /// The capability, such as `memory.save`.
    pub capability: String,
    /// The least powerful role that may invoke it.
    pub min_role: Role,
}

/// The tool grants a tenant gets when its first installation arrives.
pub fn default_tool_grants() -> Vec<ToolGrant> {
    [
        ("memory.save", Role::Member),
        ("memory.recall", Role::Viewer),
        ("memory.forget", Role::Member),
        ("budget.status", Role::Viewer),
        ("audit.status", Role::Admin),
    ]
    .into_iter()
    .map(|(capability, min_role)| ToolGrant {
        capability: capability.to_owned(),
        min_role,
    })
    .collect()
}
