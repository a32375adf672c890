//! Budgets and quotas: per-run ceilings checked before every model and tool call, and the tenant's
//! monthly quota shared safely by concurrent runs through reservations.
//!
//! A call first reserves what it may use (the model's worst case, or one tool call). The reservation
//! is checked against the month's committed usage (the projection folded from the audit log) plus
//! every other reservation in flight, under one lock per process, so concurrent runs of a tenant can
//! never together pass its quota. After the call the reservation is settled to what the call used,
//! and released once the call's event is appended, which is when that usage becomes committed.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::audit::projection::Usage;
use crate::store::{StoreError, TenantStore};
use crate::tenant::{Budget, MonthlyQuota, TenantId};

/// A ceiling or quota that a call would pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breach {
    /// Which: `tokens`, `tool_calls`, `walltime_ms`, `cost_microcents`, or `quota.<same>`/`quota.runs`.
    pub ceiling: &'static str,
    /// The limit.
    pub limit: u64,
    /// What the call would have brought the total to.
    pub attempted: u64,
}

impl Breach {
    /// A message for the user.
    pub fn message(&self) -> String {
        let what = match self.ceiling {
            "tokens" => "this run's token budget",
            "tool_calls" => "this run's tool-call budget",
            "walltime_ms" => "this run's time budget",
            "cost_microcents" => "this run's cost budget",
            "quota.tokens" => "this workspace's monthly token quota",
            "quota.tool_calls" => "this workspace's monthly tool-call quota",
            "quota.cost_microcents" => "this workspace's monthly cost quota",
            "quota.runs" => "this workspace's monthly run quota",
            _ => "a budget",
        };
        format!(
            "Stopped: the next step would exceed {what} ({} of {}).",
            self.attempted, self.limit
        )
    }
}

/// What one run has used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunUsage {
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// Tool calls.
    pub tool_calls: u64,
    /// Cost in microcents.
    pub cost_microcents: u64,
}

impl RunUsage {
    /// Tokens in and out (saturating: they are what providers report).
    pub fn tokens(&self) -> u64 {
        self.tokens_in.saturating_add(self.tokens_out)
    }
}

/// Checks that a model call of up to `tokens` tokens costing up to `cost` keeps the run within its ceilings.
///
/// # Errors
/// The first [`Breach`].
pub fn check_model(
    c: &Budget,
    used: &RunUsage,
    walltime_ms: u64,
    tokens: u64,
    cost: u64,
) -> Result<(), Breach> {
    check(c, used, walltime_ms)?;
    let t = used.tokens().saturating_add(tokens);
    if t > c.tokens {
        return Err(Breach {
            ceiling: "tokens",
            limit: c.tokens,
            attempted: t,
        });
    }
    let k = used.cost_microcents.saturating_add(cost);
    if k > c.cost_microcents {
        return Err(Breach {
            ceiling: "cost_microcents",
            limit: c.cost_microcents,
            attempted: k,
        });
    }
    Ok(())
}

/// Checks that one more tool call keeps the run within its ceilings.
///
/// # Errors
/// The first [`Breach`].
pub fn check_tool(c: &Budget, used: &RunUsage, walltime_ms: u64) -> Result<(), Breach> {
    check(c, used, walltime_ms)?;
    let n = used.tool_calls + 1;
    if n > c.tool_calls {
        return Err(Breach {
            ceiling: "tool_calls",
            limit: c.tool_calls,
            attempted: n,
        });
    }
    Ok(())
}

fn check(c: &Budget, _used: &RunUsage, walltime_ms: u64) -> Result<(), Breach> {
    if walltime_ms > c.walltime_ms {
        return Err(Breach {
            ceiling: "walltime_ms",
            limit: c.walltime_ms,
            attempted: walltime_ms,
        });
    }
    Ok(())
}

/// Amounts held against a tenant's monthly quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Tokens.
    pub tokens: u64,
    /// Tool calls.
    pub tool_calls: u64,
    /// Cost in microcents.
    pub cost_microcents: u64,
    /// Runs.
    pub runs: u64,
}

/// The sum of a tenant's reservations in flight. Wider than [`Amounts`], so that adding and
/// taking away are exact whatever the amounts: a settled reservation holds what the provider
/// reported, which may be anything up to `u64::MAX`, and a sum that saturated could not give back
/// the other reservations when that one goes.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    tokens: u128,
    tool_calls: u128,
    cost_microcents: u128,
    runs: u128,
}

impl Held {
    fn add(&mut self, o: &Amounts) {
        self.tokens += u128::from(o.tokens);
        self.tool_calls += u128::from(o.tool_calls);
        self.cost_microcents += u128::from(o.cost_microcents);
        self.runs += u128::from(o.runs);
    }

    // Every amount taken away was added before, so this never saturates; if a bug made it, the
    // ledger would hold too little rather than panic in a `Drop`.
    fn sub(&mut self, o: &Amounts) {
        self.tokens = self.tokens.saturating_sub(u128::from(o.tokens));
        self.tool_calls = self.tool_calls.saturating_sub(u128::from(o.tool_calls));
        self.cost_microcents = self
            .cost_microcents
            .saturating_sub(u128::from(o.cost_microcents));
        self.runs = self.runs.saturating_sub(u128::from(o.runs));
    }

    /// The sum, each amount capped at `u64::MAX` (which passes every quota).
    fn amounts(&self) -> Amounts {
        let cap = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
        Amounts {
            tokens: cap(self.tokens),
            tool_calls: cap(self.tool_calls),
            cost_microcents: cap(self.cost_microcents),
            runs: cap(self.runs),
        }
    }
}

/// Why a reservation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The quota would be passed.
    #[error("{0:?}")]
    Breach(Breach),
    /// The committed usage could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reservations in flight, per tenant.
#[derive(Debug, Default)]
pub struct Ledger {
    held: Mutex<HashMap<TenantId, Held>>,
}

/// Amounts held for one call; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Ledger>,
    tenant: TenantId,
    amounts: Amounts,
}

impl Reservation {
    /// Holds what the call actually used instead of what was reserved for it, from the moment its
    /// event is queued until that event is counted: a run reserves its next model call before the
    /// barrier that counts the previous step's events, and must see their real usage, not the
    /// estimates made before them.
    pub fn settle(&mut self, used: Amounts) {
        let mut held = self.ledger.held.lock().unwrap_or_else(|e| e.into_inner());
        // The reservation made the tenant's entry and nothing removes one, so there is no key
        // to clone here (this runs after every model and tool call).
        if let Some(h) = held.get_mut(&self.tenant) {
            h.sub(&self.amounts);
            h.add(&used);
        }
        self.amounts = used;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut held = self.ledger.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(&self.tenant) {
            h.sub(&self.amounts);
        }
    }
}

/// The current month's key, as the usage projection writes it.
pub fn current_month() -> String {
    month_key(chrono::Utc::now())
}

/// The `YYYY-MM` key of `t`, as [`crate::audit::projection::month_of`] reads it off an event's
/// time (for the years 0 to 9999, which are all a clock gives). Not `format("%Y-%m")`: that
/// parses its pattern on every call, and this runs before every model and tool call (1% of the
/// loop's CPU at 8 runs).
fn month_key(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::Datelike;
    format!("{:04}-{:02}", t.year(), t.month())
}

/// What remains of `quota` after `committed` usage and `held` reservations. Saturating: usage
/// comes from what providers report, so a sum may pass `u64::MAX`, and then nothing remains.
pub fn remaining(quota: &MonthlyQuota, committed: &Usage, held: &Amounts) -> Amounts {
    let used = |parts: &[u64]| parts.iter().fold(0u64, |a, &b| a.saturating_add(b));
    Amounts {
        tokens: quota.tokens.saturating_sub(used(&[
            committed.tokens_in,
            committed.tokens_out,
            held.tokens,
        ])),
        tool_calls: quota
            .tool_calls
            .saturating_sub(used(&[committed.tool_calls, held.tool_calls])),
        cost_microcents: quota
            .cost_microcents
            .saturating_sub(used(&[committed.cost_microcents, held.cost_microcents])),
        runs: quota
            .runs
            .saturating_sub(used(&[committed.runs, held.runs])),
    }
}

impl Ledger {
    /// Reserves `want` against the tenant's quota for this month.
    ///
    /// # Errors
    /// [`QuotaError::Breach`] naming the first quota `want` would pass; store failures.
    pub fn reserve(
        self: &Arc<Self>,
        repo: &TenantStore,
        quota: &MonthlyQuota,
        want: Amounts,
    ) -> Result<Reservation, QuotaError> {
        let tenant = repo.tenant_id().clone();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // Read committed usage under the lock, so that no other reservation slips in between.
        let committed = repo.projections().usage_in(&current_month())?;
        let h = held.entry(tenant.clone()).or_default();
        let left = remaining(quota, &committed, &h.amounts());
        let checks = [
            ("quota.tokens", want.tokens, left.tokens, quota.tokens),
            (
                "quota.tool_calls",
                want.tool_calls,
                left.tool_calls,
                quota.tool_calls,
            ),
            (
                "quota.cost_microcents",
                want.cost_microcents,
                left.cost_microcents,
                quota.cost_microcents,
            ),
            ("quota.runs", want.runs, left.runs, quota.runs),
        ];
        for (ceiling, w, l, limit) in checks {
            if w > l {
                return Err(QuotaError::Breach(Breach {
                    ceiling,
                    limit,
                    attempted: (limit - l).saturating_add(w),
                }));
            }
        }
        h.add(&want);
        Ok(Reservation {
            ledger: Arc::clone(self),
            tenant,
            amounts: want,
        })
    }

    /// What remains of the quota right now, counting reservations in flight.
    ///
    /// # Errors
    /// Store failures.
    pub fn left(&self, repo: &TenantStore, quota: &MonthlyQuota) -> Result<Amounts, StoreError> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let committed = repo.projections().usage_in(&current_month())?;
        Ok(remaining(
            quota,
            &committed,
            &held
                .get(repo.tenant_id())
                .map(Held::amounts)
                .unwrap_or_default(),
        ))
    }
}

/// A per-tenant rate limit on runs, so one noisy tenant cannot starve the others.
pub struct RunLimiter(DefaultKeyedRateLimiter<TenantId>);

impl std::fmt::Debug for RunLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunLimiter")
    }
}

impl RunLimiter {
    /// At most `per_minute` runs a minute per tenant, with bursts of up to the same number.
    pub fn new(per_minute: NonZeroU32) -> Self {
        RunLimiter(RateLimiter::keyed(Quota::per_minute(per_minute)))
    }

    /// True when the tenant may start a run now.
    pub fn allow(&self, tenant: &TenantId) -> bool {
        self.0.check_key(tenant).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quota check reads usage under the key the fold files each event's usage under.
    #[test]
    fn the_month_key_is_the_month_the_fold_reads_off_an_event_time() {
        use chrono::TimeZone;
        for (y, m, d) in [(2026, 12, 31), (2027, 1, 1), (999, 3, 4), (2026, 9, 30)] {
            let t = chrono::Utc.with_ymd_and_hms(y, m, d, 23, 59, 59).unwrap();
            let time = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(
                month_key(t),
                crate::audit::projection::month_of(&time),
                "{time}"
            );
            assert_eq!(month_key(t), t.format("%Y-%m").to_string());
        }
    }

    fn ceilings() -> Budget {
        Budget {
            tokens: 100,
            tool_calls: 2,
            walltime_ms: 1000,
            cost_microcents: 50,
        }
    }

    #[test]
    fn ceilings_are_checked_before_the_call() {
        let c = ceilings();
        let mut used = RunUsage::default();
        assert!(check_model(&c, &used, 0, 100, 50).is_ok());
        assert_eq!(
            check_model(&c, &used, 0, 101, 0).unwrap_err().ceiling,
            "tokens"
        );
        assert_eq!(
            check_model(&c, &used, 0, 1, 51).unwrap_err().ceiling,
            "cost_microcents"
        );
        assert_eq!(
            check_model(&c, &used, 1001, 1, 1).unwrap_err().ceiling,
            "walltime_ms"
        );
        used.tool_calls = 2;
        let b = check_tool(&c, &used, 0).unwrap_err();
        assert_eq!((b.ceiling, b.limit, b.attempted), ("tool_calls", 2, 3));
        assert!(b.message().contains("tool-call budget"));
    }

    /// A reservation settled to whatever a provider reported, however large, is given back
    /// exactly, leaving the others; and a quota check over such sums says nothing remains
    /// instead of overflowing.
    #[test]
    fn huge_reported_usage_neither_overflows_nor_loses_other_reservations() {
        let huge = Amounts {
            tokens: u64::MAX,
            tool_calls: 0,
            cost_microcents: u64::MAX,
            runs: 0,
        };
        let small = Amounts {
            tokens: 5,
            tool_calls: 1,
            cost_microcents: 7,
            runs: 1,
        };
        let mut h = Held::default();
        h.add(&small);
        h.add(&huge);
        h.add(&huge);
        assert_eq!(h.amounts().tokens, u64::MAX, "capped, not wrapped");
        h.sub(&huge);
        h.sub(&huge);
        assert_eq!(h.amounts(), small);
        let q = MonthlyQuota {
            tokens: 100,
            tool_calls: 10,
            runs: 5,
            cost_microcents: 1000,
        };
        let committed = Usage {
            runs: 1,
            tokens_in: u64::MAX,
            tokens_out: u64::MAX,
            tool_calls: 4,
            cost_microcents: u64::MAX,
        };
        let left = remaining(&q, &committed, &huge);
        assert_eq!((left.tokens, left.cost_microcents), (0, 0));
        assert_eq!((left.tool_calls, left.runs), (6, 4));
    }

    #[test]
    fn remaining_counts_committed_and_held() {
        let q = MonthlyQuota {
            tokens: 100,
            tool_calls: 10,
            runs: 5,
            cost_microcents: 1000,
        };
        let committed = Usage {
            runs: 1,
            tokens_in: 30,
            tokens_out: 10,
            tool_calls: 4,
            cost_microcents: 100,
        };
        let held = Amounts {
            tokens: 20,
            tool_calls: 1,
            cost_microcents: 0,
            runs: 1,
        };
        assert_eq!(
            remaining(&q, &committed, &held),
            Amounts {
                tokens: 40,
                tool_calls: 5,
                cost_microcents: 900,
                runs: 3
            }
        );
    }
}
