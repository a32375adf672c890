//! Process-wide counters, rendered at `/metrics` in the Prometheus text format. Labels carry only
//! opaque ids, never workspace names, users or text.

use std::sync::atomic::{AtomicU64, Ordering};

/// HTTP requests answered.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Agent runs started.
pub static RUNS: AtomicU64 = AtomicU64::new(0);
/// Tool calls the gate refused.
pub static REFUSALS: AtomicU64 = AtomicU64::new(0);
/// Runs a budget or quota stopped.
pub static BUDGET_STOPS: AtomicU64 = AtomicU64::new(0);
/// Events appended to audit logs.
pub static APPENDS: AtomicU64 = AtomicU64::new(0);
/// Platform requests refused for a bad signature.
pub static SIGNATURE_FAILURES: AtomicU64 = AtomicU64::new(0);
/// API requests refused for a bad credential.
pub static AUTH_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Renders the counters, plus the age in seconds of the oldest latest checkpoint among open logs.
pub fn render(checkpoint_age_secs: Option<u64>) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, c: &AtomicU64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            c.load(Ordering::Relaxed)
        ));
    };
    counter(
        "agentgate_http_requests_total",
        "HTTP requests answered.",
        &REQUESTS,
    );
    counter("agentgate_runs_total", "Agent runs started.", &RUNS);
    counter(
        "agentgate_tool_refusals_total",
        "Tool calls refused by the policy gate.",
        &REFUSALS,
    );
    counter(
        "agentgate_budget_stops_total",
        "Runs stopped by a budget or quota.",
        &BUDGET_STOPS,
    );
    counter(
        "agentgate_audit_appends_total",
        "Events appended to audit logs.",
        &APPENDS,
    );
    counter(
        "agentgate_signature_failures_total",
        "Platform requests refused for a bad signature.",
        &SIGNATURE_FAILURES,
    );
    counter(
        "agentgate_auth_failures_total",
        "API requests refused for a bad credential.",
        &AUTH_FAILURES,
    );
    if let Some(age) = checkpoint_age_secs {
        out.push_str(&format!(
            "# HELP agentgate_checkpoint_age_seconds Age of the stalest latest checkpoint among open logs.\n# TYPE agentgate_checkpoint_age_seconds gauge\nagentgate_checkpoint_age_seconds {age}\n"
        ));
    }
    out
}
