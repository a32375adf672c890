//! A tenant's economic limits (plan, monthly quota, per-run ceilings): set by the operator, never by
//! the tenant's own admins, and changed under the tenant's settings lock like every other setting.
//!
//! Why the operator's: the quota is what bounds a tenant's spend, including on the deployment's own
//! model keys, which a tenant without a key of its own falls back to. A limit the limited party
//! can raise bounds nothing.

use super::service::Tenants;
use super::settings::{Plan, TenantSettings};
use super::{ProvisionError, TenantId};
use crate::audit::EventBody;

/// Which limits to change; `None` keeps a value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsChange {
    /// The subscription tier.
    pub plan: Option<Plan>,
    /// Model tokens per month.
    pub quota_tokens: Option<u64>,
    /// Tool calls per month.
    pub quota_tool_calls: Option<u64>,
    /// Runs per month.
    pub quota_runs: Option<u64>,
    /// Cost per month, in microcents.
    pub quota_cost_microcents: Option<u64>,
    /// Model tokens per run.
    pub run_tokens: Option<u64>,
    /// Tool calls per run.
    pub run_tool_calls: Option<u64>,
    /// Wall time per run, in milliseconds.
    pub run_walltime_ms: Option<u64>,
    /// Cost per run, in microcents.
    pub run_cost_microcents: Option<u64>,
}

impl Tenants {
    /// Changes a tenant's limits as the operator, audited as one `settings.changed` naming each
    /// field that changed (before it is stored); returns the settings as they are afterwards.
    ///
    /// # Errors
    /// [`ProvisionError::UnknownTenant`]; storage and audit failures.
    pub async fn set_limits_as_operator(
        &self,
        tenant: &TenantId,
        change: &LimitsChange,
    ) -> Result<TenantSettings, ProvisionError> {
        let ctx = self
            .operator_context(tenant)
            .map_err(|_| ProvisionError::UnknownTenant(tenant.clone()))?;
        let _settings = self.lock_settings(tenant).await;
        let repo = self.store().for_tenant(&ctx)?;
        let mut s = repo
            .settings()
            .get()?
            .ok_or_else(|| ProvisionError::UnknownTenant(tenant.clone()))?;
        let mut fields = Vec::new();
        if let Some(plan) = change.plan.filter(|p| *p != s.plan) {
            s.plan = plan;
            fields.push("plan".to_owned());
        }
        let (q, r) = (&mut s.quota, &mut s.run_ceilings);
        for (name, slot, value) in [
            ("quota.tokens", &mut q.tokens, change.quota_tokens),
            (
                "quota.tool_calls",
                &mut q.tool_calls,
                change.quota_tool_calls,
            ),
            ("quota.runs", &mut q.runs, change.quota_runs),
            (
                "quota.cost_microcents",
                &mut q.cost_microcents,
                change.quota_cost_microcents,
            ),
            ("run_ceilings.tokens", &mut r.tokens, change.run_tokens),
            (
                "run_ceilings.tool_calls",
                &mut r.tool_calls,
                change.run_tool_calls,
            ),
            (
                "run_ceilings.walltime_ms",
                &mut r.walltime_ms,
                change.run_walltime_ms,
            ),
            (
                "run_ceilings.cost_microcents",
                &mut r.cost_microcents,
                change.run_cost_microcents,
            ),
        ] {
            if let Some(v) = value.filter(|v| v != slot) {
                *slot = v;
                fields.push(name.to_owned());
            }
        }
        if fields.is_empty() {
            return Ok(s);
        }
        self.record(&ctx, EventBody::SettingsChanged { fields })
            .await?;
        repo.settings().put(&s)?;
        Ok(s)
    }
}
