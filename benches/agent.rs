//! The agent loop's own overhead per tool call (gate, budget, quota reservation, audit appends,
//! checkpoints), with a planner and a tool that cost nothing. Results go in docs/PERFORMANCE.md.
//!
//! `cargo bench --bench agent` (add `-- --quick` for a short run; `-- --concurrency=N --rounds=N`
//! runs one level only, for profiling).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::agent::planner::{
    Message, Plan, PlanRequest, Planner, PlannerError, Reply, ToolCall,
};
use agentgate::agent::{Agent, AgentConfig, RunOutcome, RunRequest};
use agentgate::app::Services;
use agentgate::audit::log::LogSink;
use agentgate::config::AuditOptions;
use agentgate::installation::{InstallSource, NewInstallation, PlatformIdentity, Workspace};
use agentgate::tenant::{Initiator, PrincipalId, WorkspaceRequest};
use secrecy::SecretString;
use serde_json::json;

/// Asks for `calls` cheap tool calls (one per step), then answers; no model, no network.
struct Scripted {
    calls: usize,
}

#[async_trait::async_trait]
impl Planner for Scripted {
    fn provider(&self) -> &str {
        "bench"
    }
    fn estimate_tokens(&self, _req: &PlanRequest<'_>) -> u64 {
        0
    }
    async fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, PlannerError> {
        let done = req
            .messages
            .iter()
            .filter(|m| matches!(m, Message::Tool { .. }))
            .count();
        let reply = if done >= self.calls {
            Reply::Final("done".into())
        } else {
            Reply::Tools {
                text: None,
                calls: vec![ToolCall {
                    id: format!("c{done}"),
                    name: "budget.status".into(),
                    arguments: json!({}),
                }],
            }
        };
        Ok(Plan {
            reply,
            tokens_in: 0,
            tokens_out: 0,
            provider: "bench".into(),
            model: "rules-v1".into(),
        })
    }
}

/// CPU time (user + system) the whole process has used, in µs, from /proc/self/stat (Linux; the
/// kernel counts in ticks of 1/100 s, so this is read over whole rounds, never per call).
fn cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) * 1e6 / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // For profiling one case: `--concurrency=N` runs only that level, `--rounds=N` that many rounds.
    let flag = |name: &str| {
        std::env::args()
            .find_map(|a| a.strip_prefix(name).map(str::to_owned))
            .map(|v| v.parse::<usize>().expect("a number"))
    };
    let only = flag("--concurrency=");
    let rounds_flag = flag("--rounds=");
    let calls_per_run = 10;
    let dir = tempfile::tempdir().unwrap();
    let s = Services::open(
        dir.path(),
        Some(&SecretString::from("42".repeat(32))),
        &AuditOptions::default(),
    )
    .unwrap();
    s.tenants
        .install(
            NewInstallation {
                workspace: Workspace::slack_team(None, "T0BENCH").unwrap(),
                app_id: "A".into(),
                bot_user_id: None,
                bot_token: None,
                refresh_token: None,
                token_expires_at: None,
                scopes: vec![],
                installer: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
                source: InstallSource::OAuth,
            },
            "bench",
            None,
        )
        .await
        .unwrap();
    {
        let op = s
            .tenants
            .operator_context(&s.store.admin().tenants().unwrap()[0].id)
            .unwrap();
        let repo = s.store.for_tenant(&op).unwrap();
        let mut st = repo.settings().get().unwrap().unwrap();
        st.quota.tool_calls = u64::MAX / 4;
        st.quota.runs = u64::MAX / 4;
        st.run_ceilings.tool_calls = 1_000;
        repo.settings().put(&st).unwrap();
    }
    let config = AgentConfig {
        max_steps: 1_000,
        runs_per_minute: std::num::NonZeroU32::new(1_000_000).unwrap(),
        ..AgentConfig::default()
    };
    let sink = Arc::new(LogSink::new(s.audit.clone(), s.store.clone()));
    let agent = Agent::with_planner(
        s.tenants.clone(),
        s.audit.clone(),
        sink,
        config,
        Arc::new(Scripted {
            calls: calls_per_run,
        }),
    );
    let ctx = || {
        s.tenants
            .resolve(&WorkspaceRequest {
                identity: PlatformIdentity::Slack {
                    enterprise_id: None,
                    team_id: Some("T0BENCH".into()),
                },
                user: PrincipalId::qualified("slack", "U0B").unwrap(),
                correlation_id: None,
                initiator: Initiator::User,
            })
            .unwrap()
            .ctx
    };
    let one_run = |agent: Agent, c| async move {
        let out = agent
            .run(
                &c,
                RunRequest {
                    text: "go".into(),
                    conversation: "bench".into(),
                },
            )
            .await
            .unwrap();
        assert!(matches!(out, RunOutcome::Answered(_)), "{out:?}");
    };
    // Warm up.
    one_run(agent.clone(), ctx()).await;

    println!("agent loop overhead per tool call ({calls_per_run} tool calls per run; planner and tool cost nothing)");
    println!(
        "{:>12} {:>10} {:>16} {:>18} {:>14}",
        "concurrency", "runs", "µs/call latency", "µs/call amortised", "CPU µs/call"
    );
    for &concurrency in [1usize, 8, 32]
        .iter()
        .filter(|&&c| only.is_none_or(|o| o == c))
    {
        let rounds = rounds_flag.unwrap_or(if quick { 3 } else { 10 });
        let mut lat = Vec::new();
        let mut amort = Vec::new();
        let cpu_before = cpu_us();
        for _ in 0..rounds {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let a = agent.clone();
                let c = ctx();
                tasks.push(tokio::spawn(async move {
                    let t = Instant::now();
                    one_run(a, c).await;
                    t.elapsed()
                }));
            }
            let mut per_run: Vec<Duration> = Vec::new();
            for t in tasks {
                per_run.push(t.await.unwrap());
            }
            let wall = started.elapsed();
            let calls = (concurrency * calls_per_run) as f64;
            lat.push(median(
                per_run
                    .iter()
                    .map(|d| d.as_secs_f64() * 1e6 / calls_per_run as f64)
                    .collect(),
            ));
            amort.push(wall.as_secs_f64() * 1e6 / calls);
        }
        let cpu = (cpu_us() - cpu_before) / (rounds * concurrency * calls_per_run) as f64;
        println!(
            "{:>12} {:>10} {:>16.0} {:>18.0} {:>14.0}",
            concurrency,
            rounds * concurrency,
            median(lat),
            median(amort),
            cpu
        );
    }
    if only.is_some() {
        // Profiling one level: leave the decision timing out of the profile.
        return;
    }
    // The decision part alone: schema validation, the Cedar gate and the quota reservation, which
    // is what the loop adds per call besides its durable writes.
    let c = ctx();
    let repo = s.store.for_tenant(&c).unwrap();
    let settings = repo.settings().get().unwrap().unwrap();
    let gate = agentgate::agent::policy::Gate::default();
    let ledger = Arc::new(agentgate::agent::budget::Ledger::default());
    let schema = json!({"type": "object", "properties": {"subject": {"type": "string", "maxLength": 200}}, "required": ["subject"]});
    let validator = jsonschema::validator_for(&schema).unwrap();
    let args = json!({"subject": "dog"});
    let n = if quick { 2_000 } else { 20_000 };
    let mut samples = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            assert!(validator.is_valid(&args));
            let d = gate.decide(
                &agentgate::agent::policy::Ask {
                    ctx: &c,
                    capability: "memory.recall",
                    min_role: agentgate::tenant::Role::Viewer,
                    read_only: true,
                    plan: "free",
                    args: &args,
                },
                None,
            );
            assert!(matches!(
                d,
                agentgate::agent::policy::Decision::Allow { .. }
            ));
            let hold = ledger
                .reserve(
                    &repo,
                    &settings.quota,
                    agentgate::agent::budget::Amounts {
                        tool_calls: 1,
                        ..Default::default()
                    },
                )
                .unwrap();
            drop(hold);
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    println!(
        "validate + gate + quota reservation, per call: {:.1} µs (median of 5 x {n})",
        median(samples)
    );
    s.close().await.unwrap();
}
