//! Per-tenant settings: plan, monthly quotas, per-run ceilings, LLM settings, feature flags and tool grants.
//!
//! These are configuration values that an admin edits and the store persists, so unlike the identity
//! types they derive serde; their stored form is versioned by the store module.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::context::Role;
use super::ids::TenantId;

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
    /// The name of the environment variable that holds the key; never the key. Only a name
    /// [`tenant_key_ref`] allows for the tenant is ever read.
    pub key_ref: Option<String>,
}

/// The start of every environment variable name a tenant's `key_ref` may give:
/// `AGENTGATE_LLM_KEY_` and the tenant id in capitals, e.g. `AGENTGATE_LLM_KEY_T_01J…`.
pub fn tenant_key_prefix(tenant: &TenantId) -> String {
    format!("AGENTGATE_LLM_KEY_{}", tenant.as_str().to_ascii_uppercase())
}

/// Whether `var` may hold `tenant`'s model provider key: the tenant's prefix alone, or followed
/// by `_` and capitals, digits or `_`. So a tenant admin can name only variables the operator
/// set for that tenant, never the gateway's own secrets (`AGENTGATE_MASTER_KEY`, a bot token)
/// nor another tenant's key (tenant ids all have the same length, so no prefix is another's).
pub fn tenant_key_ref(tenant: &TenantId, var: &str) -> bool {
    let Some(rest) = var.strip_prefix(&tenant_key_prefix(tenant)) else {
        return false;
    };
    rest.is_empty()
        || rest.strip_prefix('_').is_some_and(|suffix| {
            !suffix.is_empty()
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// Whether `text` may be a human label that a tenant's admin chooses (the tenant's name, an API
/// key's name): 1 to 100 characters, none of them a control character, since operators' listings
/// print them to a terminal, where an escape sequence would act.
pub fn label_ok(text: &str) -> bool {
    !text.trim().is_empty() && text.chars().count() <= 100 && !text.chars().any(char::is_control)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant may name its own variables only: not the gateway's secrets, not another
    /// tenant's, not a name that merely starts like its own.
    #[test]
    fn a_key_ref_names_only_the_tenants_own_variables() {
        let a = TenantId::generate();
        let b = TenantId::generate();
        let own = tenant_key_prefix(&a);
        assert!(own.starts_with("AGENTGATE_LLM_KEY_T_"), "{own}");
        assert!(tenant_key_ref(&a, &own));
        assert!(tenant_key_ref(&a, &format!("{own}_OPENAI_2")));
        for refused in [
            "AGENTGATE_MASTER_KEY".to_owned(),
            "AGENTGATE_DISCORD_BOT_TOKEN".to_owned(),
            "OPENAI_API_KEY".to_owned(),
            tenant_key_prefix(&b),
            format!("{}_OPENAI", tenant_key_prefix(&b)),
            format!("{own}_"),
            format!("{own}X"),
            format!("{own}_lower"),
            own[..own.len() - 1].to_owned(),
        ] {
            assert!(!tenant_key_ref(&a, &refused), "{refused}");
        }
    }
}
