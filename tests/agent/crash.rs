//! A child process is killed with SIGKILL while a run's tool call is in flight; the restart resumes
//! the run from its checkpoint, repeats no completed step, and never sends a call twice.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentgate::agent::RunRequest;
use agentgate::tenant::TenantId;
use serde_json::json;

use crate::stand_in::{hook_server, openai_server, Scripted};
use crate::{
    config, declare_and_grant, events, install, open, settings, tool_results, user, webhook,
};

const CHILD_ENV: &str = "AGENTGATE_TEST_AGENT_CRASH_CHILD";

async fn child(dir: &Path) {
    let model = std::env::var("AGENTGATE_TEST_MODEL_URL").unwrap();
    let s = open(dir, config(Some(&model), None));
    let ctx = user(&s, "T0CRASH", "U0M");
    println!("RUN {}", ctx.audit().run_id);
    let out = s
        .agent
        .run(
            &ctx,
            RunRequest {
                text: "file two tickets".into(),
                conversation: "slack:C0CRASH".into(),
            },
        )
        .await;
    // The parent kills this process before the run can end.
    println!("UNEXPECTED END {out:?}");
}

/// Runs the test `test` again in a child process that runs [`child`] on `dir`.
fn spawn_child(test: &str, dir: &Path, model_url: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env("AGENTGATE_TEST_MODEL_URL", model_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills `child` with SIGKILL as soon as `reached` holds, failing if it ends first or has not
/// `what` within a minute.
async fn kill_when(child: &mut std::process::Child, what: &str, reached: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reached() {
        assert!(Instant::now() < deadline, "the child never {what}");
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

/// Runs `text` for `ctx` in a task of its own and aborts it (its driver dies, as in a crash of
/// this process) as soon as `reached` holds, failing if it has not `what` within 10 s.
async fn abort_run_when(
    s: &agentgate::app::Services,
    ctx: agentgate::tenant::TenantContext,
    text: &str,
    what: &str,
    reached: impl Fn() -> bool,
) {
    let agent = s.agent.clone();
    let req = RunRequest {
        text: text.into(),
        conversation: "slack:C0ABORTED".into(),
    };
    let live = tokio::spawn(async move { agent.run(&ctx, req).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reached() {
        assert!(Instant::now() < deadline, "the run never {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    live.abort();
    let _ = live.await;
}

/// Installs `T0CRASH` in `dir` with the OpenAI planner at `model` and a webhook tool at `hooks`.
async fn crash_tenant(dir: &Path, model: &str, hooks: &str) -> TenantId {
    let s = open(dir, config(Some(model), None));
    let t = install(&s, "T0CRASH").await;
    settings(&s, &t, |st| st.llm.provider = "openai".into());
    let owner = user(&s, "T0CRASH", "U0OWNER");
    declare_and_grant(&s, &owner, webhook(hooks, "whsec-crash")).await;
    s.close().await.unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_call_resumes_without_repeating_a_step() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The second webhook call is held open until the child is dead: it is in flight at the kill.
    let hooks = hook_server("whsec-crash", |n| match n {
        2 => (Duration::from_secs(30), "too late".into()),
        _ => (Duration::ZERO, format!("ticket {n} created")),
    })
    .await;
    let call =
        |title: &str| Scripted::Tools(vec![("webhook__create_ticket", json!({"title": title}))]);
    let model = openai_server(
        vec![call("one"), call("two"), Scripted::Final("Both handled.")],
        (10, 5),
        Duration::ZERO,
    )
    .await;

    let tenant = crash_tenant(dir.path(), &model.url, &hooks.url).await;

    let mut child = spawn_child(
        "crash::a_run_killed_mid_call_resumes_without_repeating_a_step",
        dir.path(),
        &model.url,
    );
    kill_when(&mut child, "reached the second call", || {
        hooks.hooks().len() >= 2
    })
    .await;

    // Restart: the unfinished run resumes from its own checkpoint.
    let s = open(dir.path(), config(Some(&model.url), None));
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 1);
    assert_eq!(
        s.agent.resume_unfinished().await.unwrap(),
        0,
        "a finished run is not resumed again"
    );

    let got = hooks.hooks();
    assert_eq!(
        got.len(),
        2,
        "the in-flight call was not sent again: {got:?}"
    );
    assert_ne!(got[0].idempotency_key, got[1].idempotency_key);
    let run_id = got[0].run_id.clone();
    assert!(got[0].idempotency_key.starts_with(&run_id));

    let op = s.tenants.operator_context(&tenant).unwrap();
    let ev = events(&s, &op).await;
    let of_run: Vec<&serde_json::Value> = ev
        .iter()
        .filter(|e| e["run_id"] == run_id.as_str())
        .collect();
    let count = |t: &str| of_run.iter().filter(|e| e["type"] == t).count();
    assert_eq!(count("run.started"), 1);
    assert_eq!(
        count("model.called"),
        3,
        "every plan ran once: two before the kill, one after"
    );
    assert_eq!(count("tool.authorized"), 2);
    assert_eq!(
        count("tool.invoked"),
        1,
        "the interrupted call has no result"
    );
    assert_eq!(count("run.completed"), 1);
    let usage = s
        .store
        .for_tenant(&op)
        .unwrap()
        .projections()
        .usage()
        .unwrap();
    assert_eq!(
        usage.values().map(|u| u.tokens_in).sum::<u64>(),
        30,
        "three model calls charged, none twice"
    );

    // The model heard that the second call's outcome is unknown.
    let told = tool_results(&model.seen().bodies[2]);
    assert_eq!(told[0], "ticket 1 created");
    assert!(
        told[1].contains("interrupted") && told[1].contains(&got[1].idempotency_key),
        "{told:?}"
    );
    s.close().await.unwrap();
}

/// A child process is killed while a run's model call is in flight (the provider has the request
/// and has not answered): the call is on record although it never completed, and the restart asks
/// again for the same step, with the same prompt, and finishes the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_call_cut_off_by_a_crash_is_on_record() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hooks = hook_server("whsec-crash", |n| {
        (Duration::ZERO, format!("ticket {n} created"))
    })
    .await;
    let model = openai_server(
        vec![
            Scripted::Tools(vec![("webhook__create_ticket", json!({"title": "one"}))]),
            Scripted::Hang,
            Scripted::Final("Filed one."),
        ],
        (10, 5),
        Duration::ZERO,
    )
    .await;
    let tenant = crash_tenant(dir.path(), &model.url, &hooks.url).await;
    let mut child = spawn_child(
        "crash::a_model_call_cut_off_by_a_crash_is_on_record",
        dir.path(),
        &model.url,
    );
    kill_when(&mut child, "made the second model call", || {
        model.seen().bodies.len() >= 2
    })
    .await;

    let s = open(dir.path(), config(Some(&model.url), None));
    let op = s.tenants.operator_context(&tenant).unwrap();
    let requested = |ev: &[serde_json::Value]| -> Vec<serde_json::Value> {
        ev.iter()
            .filter(|e| e["type"] == "model.requested")
            .cloned()
            .collect()
    };
    let before = requested(&events(&s, &op).await);
    assert_eq!(
        before.len(),
        2,
        "the call in flight at the kill is on record: {before:?}"
    );
    assert_eq!(before[1]["data"]["step"], 1);

    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 1);
    let seen = model.seen().bodies;
    assert_eq!(seen.len(), 3, "the step was asked for again");
    assert_eq!(
        seen[1]["messages"], seen[2]["messages"],
        "with the same messages"
    );
    let ev = events(&s, &op).await;
    let after = requested(&ev);
    assert_eq!(after.len(), 3);
    assert_eq!(after[2]["data"]["step"], 1);
    assert_eq!(
        after[2]["data"]["prompt_sha256"], after[1]["data"]["prompt_sha256"],
        "the same prompt, so the same hash"
    );
    let count = |t: &str| ev.iter().filter(|e| e["type"] == t).count();
    assert_eq!(count("model.called"), 2, "the cut-off call has no usage");
    assert_eq!(count("run.completed"), 1);
    assert_eq!(
        hooks.hooks().len(),
        1,
        "the completed tool call was not repeated"
    );
    // The cut-off call lies between its request and the next request of the same step.
    let at = |e: &serde_json::Value| ev.iter().position(|x| x == e).unwrap();
    assert!(
        !ev[at(&after[1])..at(&after[2])]
            .iter()
            .any(|e| e["type"] == "model.called"),
        "nothing answered the cut-off call"
    );
    s.close().await.unwrap();
}

/// Stands in for a crash right after the run's end event became durable: the append succeeds,
/// and the agent hears a failure, so the run is not stored as finished.
struct EndThenFail(agentgate::audit::log::LogSink);

#[async_trait::async_trait]
impl agentgate::audit::AuditSink for EndThenFail {
    async fn append(
        &self,
        ctx: &agentgate::tenant::TenantContext,
        body: agentgate::audit::EventBody,
    ) -> Result<u64, agentgate::audit::AuditError> {
        use agentgate::audit::EventBody;
        let end = matches!(
            body,
            EventBody::RunCompleted { .. } | EventBody::RunFailed { .. }
        );
        if end {
            // More events than the resume reads at a time lie between the run's checkpoint and
            // its end event, so finding the end takes more than one read.
            let filler: Vec<EventBody> = (0..5000)
                .map(|i| EventBody::SettingsChanged {
                    fields: vec![format!("filler-{i}")],
                })
                .collect();
            self.0.append_batch(ctx, &filler).await?;
        }
        let seq = self.0.append(ctx, body).await?;
        if end {
            return Err(agentgate::audit::AuditError::Export(
                "simulated crash after the end event".into(),
            ));
        }
        Ok(seq)
    }
}

/// Runs `whoami` for `ctx` through an agent whose sink fails right after the run's end event is
/// durable, as a crash there would leave it: ended in the log, unfinished in the store. Returns
/// that agent, which the caller drops before the "restart".
async fn run_that_crashes_after_its_end(
    s: &agentgate::app::Services,
    ctx: &agentgate::tenant::TenantContext,
    conversation: &str,
) -> agentgate::agent::Agent {
    let crashing = agentgate::agent::Agent::new(
        s.tenants.clone(),
        s.audit.clone(),
        std::sync::Arc::new(EndThenFail(agentgate::audit::log::LogSink::new(
            s.audit.clone(),
            s.store.clone(),
        ))),
        config(None, None),
    );
    let req = RunRequest {
        text: "whoami".into(),
        conversation: conversation.into(),
    };
    assert!(crashing.run(ctx, req).await.is_err());
    crashing
}

/// A crash after a run's end event became durable and before the run was stored as finished: the
/// restart resumes the run, sees its end already in the log, and finishes it without a second end
/// event.
#[tokio::test]
async fn a_run_that_ended_before_the_crash_is_not_ended_twice() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), config(None, None));
    install(&s, "T0ENDED").await;
    let ctx = user(&s, "T0ENDED", "U0M");
    let run_id = ctx.audit().run_id.to_string();
    let crashing = run_that_crashes_after_its_end(&s, &ctx, "slack:C0ENDED").await;
    let repo = s.store.for_tenant(&ctx).unwrap();
    assert_eq!(repo.runs().unfinished_runs().unwrap(), vec![run_id.clone()]);
    let ends = |ev: &[serde_json::Value]| {
        ev.iter()
            .filter(|e| e["run_id"] == run_id.as_str() && e["type"] == "run.completed")
            .count()
    };
    assert_eq!(ends(&events(&s, &ctx).await), 1);
    drop((crashing, repo));
    s.close().await.unwrap();
    drop(s);

    let s = open(dir.path(), config(None, None));
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 1);
    let op = s
        .tenants
        .operator_context(&s.store.admin().tenants().unwrap()[0].id)
        .unwrap();
    assert_eq!(ends(&events(&s, &op).await), 1, "the end is recorded once");
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 0);
    let stored: serde_json::Value = serde_json::from_slice(
        &s.store
            .for_tenant(&op)
            .unwrap()
            .runs()
            .get_run(&run_id)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stored["status"]["status"], "completed");
    s.close().await.unwrap();
}

/// A finished run's final state stays in its tenant's journal of finished runs until the next sweep
/// (one store flush for every run finished since the last): meanwhile it is finished, not resumed,
/// and readable; after the sweep the journal is empty and its final state is read from the store.
#[tokio::test]
async fn a_finished_run_is_swept_and_never_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), config(None, None));
    install(&s, "T0LEFT").await;
    let ctx = user(&s, "T0LEFT", "U0M");
    let out = crate::run(&s, &ctx, "whoami").await;
    assert!(
        matches!(out, agentgate::agent::RunOutcome::Answered(_)),
        "{out:?}"
    );
    let run_id = ctx.audit().run_id.to_string();
    let repo = s.store.for_tenant(&ctx).unwrap();
    let runs = dir.path().join("runs").join(ctx.tenant_id().as_str());
    let journal = || {
        std::fs::metadata(runs.join("finished.journal.0"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let finished = repo.runs().get_run(&run_id).unwrap().unwrap();
    assert!(
        journal() > 0,
        "the final state waits in the journal for the sweep"
    );
    assert!(repo.runs().unfinished_runs().unwrap().is_empty());
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 0);
    assert_eq!(s.store.sweep_runs().unwrap(), 1);
    assert_eq!(journal(), 0, "the sweep emptied it");
    let mut names: Vec<String> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["finished.journal.0", "lane.0.0", "lane.0.1"],
        "no file per run: the lane waits for the next run"
    );
    assert_eq!(repo.runs().get_run(&run_id).unwrap().unwrap(), finished);
    assert_eq!(repo.runs().all_runs().unwrap(), vec![run_id]);
    drop(repo);
    s.close().await.unwrap();
}

/// Resuming unfinished runs while a run of this process is still going (the gateway resumes at
/// start while new commands already arrive) leaves that run to its own driver: its webhook call is
/// not sent a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_at_start_never_drives_a_live_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = hook_server("whsec-live", |_| {
        (Duration::from_millis(800), "done".into())
    })
    .await;
    let model = openai_server(
        vec![
            Scripted::Tools(vec![("webhook__create_ticket", json!({"title": "one"}))]),
            Scripted::Final("Handled."),
        ],
        (10, 5),
        Duration::ZERO,
    )
    .await;
    let s = open(dir.path(), config(Some(&model.url), None));
    let t = install(&s, "T0LIVE").await;
    settings(&s, &t, |st| st.llm.provider = "openai".into());
    let owner = user(&s, "T0LIVE", "U0OWNER");
    declare_and_grant(&s, &owner, webhook(&hooks.url, "whsec-live")).await;
    let ctx = user(&s, "T0LIVE", "U0M");
    let agent = s.agent.clone();
    let live = tokio::spawn(async move {
        agent
            .run(
                &ctx,
                RunRequest {
                    text: "file it".into(),
                    conversation: "slack:C0LIVE".into(),
                },
            )
            .await
    });
    // Wait until the call is in flight, then resume "unfinished" runs as a start would.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooks.hooks().is_empty() {
        assert!(Instant::now() < deadline, "the call never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 0);
    let out = live.await.unwrap().unwrap();
    assert_eq!(
        out,
        agentgate::agent::RunOutcome::Answered("Handled.".into())
    );
    assert_eq!(hooks.hooks().len(), 1, "the webhook was called once");
    s.close().await.unwrap();
}

/// Damages the latest checkpoint of `run_id`, the tenant's first run, as a power loss can (run
/// checkpoints are not synced): the one before it is read instead.
fn lose_latest_checkpoint(dir: &Path, tenant: &TenantId, run_id: &str) {
    let runs = dir.join("runs").join(tenant.as_str());
    // The tenant's first run took its first lane.
    let slot = |i: u8| runs.join(format!("lane.0.{i}"));
    let generation =
        |b: &[u8]| u64::from_le_bytes(b.get(4..12).unwrap_or(&[0; 8]).try_into().unwrap());
    let (a, b) = (
        std::fs::read(slot(0)).unwrap(),
        std::fs::read(slot(1)).unwrap(),
    );
    let (newest, mut bytes) = if generation(&a) > generation(&b) {
        (slot(0), a)
    } else {
        (slot(1), b)
    };
    assert_eq!(
        bytes.get(21..21 + run_id.len()),
        Some(run_id.as_bytes()),
        "the lane's latest frame is the run's"
    );
    bytes[30] ^= 0xff;
    std::fs::write(&newest, &bytes).unwrap();
}

/// After a power loss took the checkpoint that said how a run ended, the one before says it is
/// still running although its end is on record: the restart must not plan or call anything after
/// that end, and tells the user to ask again if the answer did not arrive.
#[tokio::test]
async fn a_run_whose_end_outlived_its_checkpoint_does_nothing_after_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), config(None, None));
    let tenant = install(&s, "T0LOST").await;
    let ctx = user(&s, "T0LOST", "U0M");
    let run_id = ctx.audit().run_id.to_string();
    let crashing = run_that_crashes_after_its_end(&s, &ctx, "slack:C0LOST").await;
    drop(crashing);
    s.close().await.unwrap();
    drop(s);
    lose_latest_checkpoint(dir.path(), &tenant, &run_id);

    let s = open(dir.path(), config(None, None));
    let op = s.tenants.operator_context(&tenant).unwrap();
    let stale: serde_json::Value = serde_json::from_slice(
        &s.store
            .for_tenant(&op)
            .unwrap()
            .runs()
            .get_run(&run_id)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        stale["status"]["status"], "running",
        "the checkpoint left is from before the end"
    );
    let before = events(&s, &op).await.len();
    let out = s.agent.resume(&tenant, &run_id).await.unwrap().unwrap();
    // It ended as completed (its `run.completed` is on record), and its answer is gone.
    assert!(
        matches!(&out, agentgate::agent::RunOutcome::Answered(m) if m.contains("did not reach you")),
        "{out:?}"
    );
    assert_eq!(
        events(&s, &op).await.len(),
        before,
        "nothing was appended after the run's end"
    );
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 0);
    s.close().await.unwrap();
}

/// After a power loss the latest checkpoint may be gone while the synced log still records the
/// authorisation of a call that was then sent. The resumed run reads its own events after its
/// checkpoint and does not send that call again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_record_as_authorised_is_not_sent_again_when_its_checkpoint_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = hook_server("whsec-power", |n| match n {
        2 => (Duration::from_secs(30), "too late".into()),
        _ => (Duration::ZERO, format!("ticket {n} created")),
    })
    .await;
    let model = openai_server(
        vec![
            Scripted::Tools(vec![
                ("webhook__create_ticket", json!({"title": "one"})),
                ("webhook__create_ticket", json!({"title": "two"})),
            ]),
            Scripted::Final("Both handled."),
        ],
        (10, 5),
        Duration::ZERO,
    )
    .await;
    let (tenant, run_id) = {
        let s = open(dir.path(), config(Some(&model.url), None));
        let t = install(&s, "T0POWER").await;
        settings(&s, &t, |st| st.llm.provider = "openai".into());
        let owner = user(&s, "T0POWER", "U0OWNER");
        declare_and_grant(&s, &owner, webhook(&hooks.url, "whsec-power")).await;
        let ctx = user(&s, "T0POWER", "U0M");
        let run_id = ctx.audit().run_id.to_string();
        // The driver dies with the second call in flight.
        abort_run_when(&s, ctx, "file two", "started the second call", || {
            hooks.hooks().len() >= 2
        })
        .await;
        s.close().await.unwrap();
        (t, run_id)
    };
    // The power loss takes the latest checkpoint (the second call in flight) with it; the slot
    // before it says the first call is done and the second is next.
    lose_latest_checkpoint(dir.path(), &tenant, &run_id);

    let s = open(dir.path(), config(Some(&model.url), None));
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 1);
    assert_eq!(
        hooks.hooks().len(),
        2,
        "the call on record as authorised was not sent again"
    );
    let told = tool_results(&model.seen().bodies[1]);
    assert_eq!(told[0], "ticket 1 created");
    assert!(told[1].contains("interrupted"), "{told:?}");
    s.close().await.unwrap();
}

/// One tenant whose unfinished runs cannot be listed does not stop the others' from resuming: the
/// restart reports the failure and still resumes every run it can.
#[tokio::test]
async fn a_tenant_whose_runs_cannot_be_listed_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), config(None, None));
    let mut runs = Vec::new();
    for team in ["T0FIRST", "T0SECOND"] {
        let tenant = install(&s, team).await;
        let ctx = user(&s, team, "U0M");
        run_that_crashes_after_its_end(&s, &ctx, "slack:C0LIST").await;
        runs.push((tenant, ctx.audit().run_id.to_string()));
    }
    // The tenant listed first is the one whose run directory becomes unreadable.
    let order: Vec<TenantId> = s
        .store
        .admin()
        .tenants()
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    let broken = order[0].clone();
    let (_, kept_run) = runs.iter().find(|(t, _)| *t != broken).unwrap().clone();
    s.close().await.unwrap();
    drop(s);
    let runs_dir = crate::walk(dir.path())
        .into_iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .find(|p| p.ends_with(Path::new("runs").join(broken.as_str())))
        .expect("the tenant has a run directory");
    std::fs::remove_dir_all(&runs_dir).unwrap();
    std::fs::write(&runs_dir, b"not a directory").unwrap();

    let s = open(dir.path(), config(None, None));
    assert!(
        s.agent.resume_unfinished().await.is_err(),
        "the broken tenant's failure is reported"
    );
    let kept = order.iter().find(|t| **t != broken).unwrap();
    let op = s.tenants.operator_context(kept).unwrap();
    let repo = s.store.for_tenant(&op).unwrap();
    assert_eq!(
        repo.runs().unfinished_runs().unwrap(),
        Vec::<String>::new(),
        "the other tenant's run was resumed"
    );
    let stored: serde_json::Value =
        serde_json::from_slice(&repo.runs().get_run(&kept_run).unwrap().unwrap()).unwrap();
    assert_eq!(stored["status"]["status"], "completed");
    s.close().await.unwrap();
}

/// A power loss took a run's checkpoints (they are not synced) while its events are on record:
/// nothing can resume it, so the restart ends it on record, once, with the totals its events add
/// up to, and the projections still agree with the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_lost_before_its_first_checkpoint_is_ended_on_record() {
    let dir = tempfile::tempdir().unwrap();
    let model = openai_server(
        vec![
            Scripted::Tools(vec![("budget__status", json!({}))]),
            Scripted::Hang,
        ],
        (10, 5),
        Duration::ZERO,
    )
    .await;
    let (tenant, run_id) = {
        let s = open(dir.path(), config(Some(&model.url), None));
        let t = install(&s, "T0GONE").await;
        settings(&s, &t, |st| st.llm.provider = "openai".into());
        let ctx = user(&s, "T0GONE", "U0M");
        let run_id = ctx.audit().run_id.to_string();
        abort_run_when(&s, ctx, "anything", "started the second model call", || {
            model.seen().bodies.len() >= 2
        })
        .await;
        s.close().await.unwrap();
        (t, run_id)
    };
    // The tenant's only run checkpoint goes with the power.
    std::fs::remove_dir_all(dir.path().join("runs").join(tenant.as_str())).unwrap();

    let s = open(dir.path(), config(Some(&model.url), None));
    let op = s.tenants.operator_context(&tenant).unwrap();
    assert_eq!(
        s.agent.resume_unfinished().await.unwrap(),
        0,
        "nothing to resume"
    );
    let ev = events(&s, &op).await;
    assert_ended_on_record(&ev, &run_id, "lost:");

    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 0);
    assert_eq!(events(&s, &op).await.len(), ev.len(), "ended once");
    let repo = s.store.for_tenant(&op).unwrap();
    assert!(repo.projections().running_runs().unwrap().is_empty());
    assert_eq!(
        s.audit.replay(&op, repo).await.unwrap(),
        Vec::<String>::new()
    );
    s.close().await.unwrap();
}

/// Checks that `run_id`'s events in `ev` are a run cut off in its second model call (one read-only
/// tool call after a first model call of 10 + 5 tokens) and then ended on record by the gateway
/// itself, with a reason starting with `reason` and the totals its own events add up to.
fn assert_ended_on_record(ev: &[serde_json::Value], run_id: &str, reason: &str) {
    let mine: Vec<&serde_json::Value> = ev.iter().filter(|e| e["run_id"] == run_id).collect();
    assert_eq!(
        crate::types(&mine),
        [
            "run.started",
            "model.requested",
            "model.called",
            "tool.authorized",
            "tool.invoked",
            "model.requested",
            "run.failed"
        ]
    );
    let end = mine[6];
    assert!(
        end["data"]["reason"].as_str().unwrap().starts_with(reason),
        "{end}"
    );
    assert_eq!(end["principal"], "system:agent");
    assert_eq!(end["initiator"], "cron");
    // Its totals are what its own events on record add up to.
    let totals = &end["data"]["totals"];
    assert_eq!(
        (totals["tokens_in"].as_u64(), totals["tokens_out"].as_u64()),
        (Some(10), Some(5))
    );
    assert_eq!(totals["tool_calls"], 1);
    assert_eq!(
        totals["cost_microcents"],
        mine[2]["data"]["cost_microcents"]
    );
}

/// Passes appends through, and right after the batch that records a run's start (before the run
/// can store its first checkpoint) asks the agent to end lost runs: a live run has no checkpoint
/// yet then, and must not be taken for lost.
struct EndLostAfterStart {
    inner: agentgate::audit::log::LogSink,
    agent: std::sync::OnceLock<agentgate::agent::Agent>,
    ended: std::sync::Mutex<Vec<usize>>,
}

#[async_trait::async_trait]
impl agentgate::audit::AuditSink for EndLostAfterStart {
    async fn append(
        &self,
        ctx: &agentgate::tenant::TenantContext,
        body: agentgate::audit::EventBody,
    ) -> Result<u64, agentgate::audit::AuditError> {
        self.inner.append(ctx, body).await
    }

    async fn append_batch(
        &self,
        ctx: &agentgate::tenant::TenantContext,
        bodies: &[agentgate::audit::EventBody],
    ) -> Result<std::ops::Range<u64>, agentgate::audit::AuditError> {
        let range = self.inner.append_batch(ctx, bodies).await?;
        let starts = bodies
            .iter()
            .any(|b| matches!(b, agentgate::audit::EventBody::RunStarted { .. }));
        if starts {
            let agent = self.agent.get().expect("set before the run").clone();
            let n = agent.end_lost_runs(ctx.tenant_id()).await.unwrap();
            self.ended.lock().unwrap().push(n);
        }
        Ok(range)
    }
}

#[tokio::test]
async fn a_live_run_before_its_first_checkpoint_is_not_taken_for_lost() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), config(None, None));
    install(&s, "T0LIVE").await;
    let sink = std::sync::Arc::new(EndLostAfterStart {
        inner: agentgate::audit::log::LogSink::new(s.audit.clone(), s.store.clone()),
        agent: std::sync::OnceLock::new(),
        ended: Default::default(),
    });
    let agent = agentgate::agent::Agent::new(
        s.tenants.clone(),
        s.audit.clone(),
        sink.clone(),
        config(None, None),
    );
    assert!(sink.agent.set(agent.clone()).is_ok());
    let ctx = user(&s, "T0LIVE", "U0M");
    let out = crate::run_on(&agent, &ctx, "whoami").await;
    assert!(
        matches!(out, agentgate::agent::RunOutcome::Answered(_)),
        "{out:?}"
    );
    assert_eq!(
        *sink.ended.lock().unwrap(),
        [0],
        "asked once, ended nothing"
    );
    let ev = events(&s, &ctx).await;
    assert!(
        !ev.iter().any(|e| e["principal"] == "system:agent"),
        "the live run was not ended for it"
    );
    s.close().await.unwrap();
}

/// Passes appends through, but holds the first lost run's end until another lost run's end is on
/// record, so that a second `end_lost_runs` started meanwhile ends the other run first.
struct HoldFirstLostEnd {
    inner: agentgate::audit::log::LogSink,
    held: tokio::sync::Notify,
    other_ended: tokio::sync::Notify,
    lost_ends: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl agentgate::audit::AuditSink for HoldFirstLostEnd {
    async fn append(
        &self,
        ctx: &agentgate::tenant::TenantContext,
        body: agentgate::audit::EventBody,
    ) -> Result<u64, agentgate::audit::AuditError> {
        let lost = matches!(
            &body,
            agentgate::audit::EventBody::RunFailed { reason, .. } if reason.starts_with("lost:")
        );
        if !lost {
            return self.inner.append(ctx, body).await;
        }
        let nth = self
            .lost_ends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if nth == 0 {
            self.held.notify_one();
            self.other_ended.notified().await;
            return self.inner.append(ctx, body).await;
        }
        let seq = self.inner.append(ctx, body).await?;
        self.other_ended.notify_one();
        Ok(seq)
    }

    async fn append_batch(
        &self,
        ctx: &agentgate::tenant::TenantContext,
        bodies: &[agentgate::audit::EventBody],
    ) -> Result<std::ops::Range<u64>, agentgate::audit::AuditError> {
        self.inner.append_batch(ctx, bodies).await
    }
}

/// Two ends of lost runs overlap: both list the same two runs, each ends the one the other has not
/// claimed, and the first, coming to the run the second ended meanwhile, looks again and leaves
/// it. Each run is ended once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_ends_of_lost_runs_end_each_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = openai_server(
        vec![Scripted::Hang, Scripted::Hang],
        (10, 5),
        Duration::ZERO,
    )
    .await;
    let tenant = {
        let s = open(dir.path(), config(Some(&model.url), None));
        let t = install(&s, "T0TWICE").await;
        settings(&s, &t, |st| st.llm.provider = "openai".into());
        for n in 1..=2 {
            let ctx = user(&s, "T0TWICE", "U0M");
            abort_run_when(&s, ctx, "anything", "called the model", || {
                model.seen().bodies.len() >= n
            })
            .await;
        }
        s.close().await.unwrap();
        t
    };
    // Both runs' checkpoints go with the power.
    std::fs::remove_dir_all(dir.path().join("runs").join(tenant.as_str())).unwrap();

    let s = open(dir.path(), config(Some(&model.url), None));
    let sink = std::sync::Arc::new(HoldFirstLostEnd {
        inner: agentgate::audit::log::LogSink::new(s.audit.clone(), s.store.clone()),
        held: tokio::sync::Notify::new(),
        other_ended: tokio::sync::Notify::new(),
        lost_ends: Default::default(),
    });
    let agent = agentgate::agent::Agent::new(
        s.tenants.clone(),
        s.audit.clone(),
        sink.clone(),
        config(Some(&model.url), None),
    );
    let first = tokio::spawn({
        let (agent, tenant) = (agent.clone(), tenant.clone());
        async move { agent.end_lost_runs(&tenant).await }
    });
    tokio::time::timeout(Duration::from_secs(10), sink.held.notified())
        .await
        .expect("the first end reached the log");
    let second = tokio::time::timeout(Duration::from_secs(10), agent.end_lost_runs(&tenant))
        .await
        .expect("the second end is not held")
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the first end goes on")
        .unwrap()
        .unwrap();
    assert_eq!((first, second), (1, 1), "each ended one run");

    let op = s.tenants.operator_context(&tenant).unwrap();
    let ev = events(&s, &op).await;
    let mut ended: Vec<&str> = ev
        .iter()
        .filter(|e| e["type"] == "run.failed")
        .map(|e| e["run_id"].as_str().unwrap())
        .collect();
    ended.sort_unstable();
    let mut started: Vec<&str> = ev
        .iter()
        .filter(|e| e["type"] == "run.started")
        .map(|e| e["run_id"].as_str().unwrap())
        .collect();
    started.sort_unstable();
    assert_eq!(started.len(), 2);
    assert_eq!(ended, started, "each run ended once");
    let repo = s.store.for_tenant(&op).unwrap();
    assert_eq!(
        s.audit.replay(&op, repo).await.unwrap(),
        Vec::<String>::new()
    );
    s.close().await.unwrap();
}

/// A run whose checkpoint is there but cannot be read (damaged, or written by another version)
/// cannot be resumed: the restart ends it on record once, with the totals its events add up to,
/// and keeps the checkpoint for the operator; neither that start nor the next counts it as a
/// failure. A checkpoint that parses but names no valid principal is one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_checkpoint_cannot_be_read_is_ended_on_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = openai_server(
        vec![
            Scripted::Tools(vec![("budget__status", json!({}))]),
            Scripted::Hang,
            Scripted::Hang,
            Scripted::Hang,
        ],
        (10, 5),
        Duration::ZERO,
    )
    .await;
    let (tenant, run_id, misnamed, later) = {
        let s = open(dir.path(), config(Some(&model.url), None));
        let t = install(&s, "T0DAMAGE").await;
        settings(&s, &t, |st| st.llm.provider = "openai".into());
        let ctx = user(&s, "T0DAMAGE", "U0M");
        let run_id = ctx.audit().run_id.to_string();
        abort_run_when(&s, ctx, "anything", "started the second model call", || {
            model.seen().bodies.len() >= 2
        })
        .await;
        // What a later version, or damage the files' checks cannot see, could leave.
        let op = s.tenants.operator_context(&t).unwrap();
        let repo = s.store.for_tenant(&op).unwrap();
        repo.runs()
            .put_run(&run_id, br#"{"format":"from another version"}"#, false)
            .unwrap();
        // A second run whose checkpoint parses but names no valid principal.
        let ctx = user(&s, "T0DAMAGE", "U0M");
        let misnamed = ctx.audit().run_id.to_string();
        abort_run_when(&s, ctx, "more", "called the model", || {
            model.seen().bodies.len() >= 3
        })
        .await;
        let mut state: serde_json::Value =
            serde_json::from_slice(&repo.runs().get_run(&misnamed).unwrap().unwrap()).unwrap();
        state["principal"] = json!("not a principal");
        repo.runs()
            .put_run(&misnamed, &serde_json::to_vec(&state).unwrap(), false)
            .unwrap();
        // A third whose checkpoint is well formed but of a later version's format.
        let ctx = user(&s, "T0DAMAGE", "U0M");
        let later = ctx.audit().run_id.to_string();
        abort_run_when(&s, ctx, "later", "called the model", || {
            model.seen().bodies.len() >= 4
        })
        .await;
        let mut state: serde_json::Value =
            serde_json::from_slice(&repo.runs().get_run(&later).unwrap().unwrap()).unwrap();
        state["v"] = json!(2);
        repo.runs()
            .put_run(&later, &serde_json::to_vec(&state).unwrap(), false)
            .unwrap();
        s.close().await.unwrap();
        (t, run_id, misnamed, later)
    };

    let s = open(dir.path(), config(Some(&model.url), None));
    let op = s.tenants.operator_context(&tenant).unwrap();
    assert_eq!(
        s.agent.resume_unfinished().await.unwrap(),
        0,
        "nothing resumed"
    );
    let ev = events(&s, &op).await;
    assert_ended_on_record(&ev, &run_id, "unreadable:");

    for other in [&misnamed, &later] {
        let ends: Vec<&serde_json::Value> = ev
            .iter()
            .filter(|e| e["run_id"] == other.as_str() && e["type"] == "run.failed")
            .collect();
        assert_eq!(ends.len(), 1, "{ends:?}");
        assert!(ends[0]["data"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("unreadable:"));
    }

    // Not ended again; the checkpoint is still there.
    assert_eq!(s.agent.resume_unfinished().await.unwrap(), 0);
    assert_eq!(events(&s, &op).await.len(), ev.len(), "ended once");
    let repo = s.store.for_tenant(&op).unwrap();
    assert_eq!(
        repo.runs().get_run(&run_id).unwrap().as_deref(),
        Some(&br#"{"format":"from another version"}"#[..])
    );
    assert!(repo.projections().running_runs().unwrap().is_empty());
    assert_eq!(
        s.audit.replay(&op, repo).await.unwrap(),
        Vec::<String>::new()
    );
    s.close().await.unwrap();
}

/// A restart resumes unfinished runs side by side, and ends lost runs before any of them: a
/// model that does not answer one resumed run holds back neither the other runs nor the end of
/// another tenant's lost run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_resumed_run_holds_back_neither_other_runs_nor_lost_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = openai_server(vec![Scripted::Hang; 6], (10, 5), Duration::ZERO).await;
    let (slow, gone, gone_run) = {
        let s = open(dir.path(), config(Some(&model.url), None));
        let slow = install(&s, "T0SLOWRES").await;
        settings(&s, &slow, |st| st.llm.provider = "openai".into());
        let gone = install(&s, "T0GONERES").await;
        settings(&s, &gone, |st| st.llm.provider = "openai".into());
        for n in 1..=2 {
            let ctx = user(&s, "T0SLOWRES", "U0M");
            abort_run_when(&s, ctx, "anything", "called the model", || {
                model.seen().bodies.len() >= n
            })
            .await;
        }
        let ctx = user(&s, "T0GONERES", "U0M");
        let gone_run = ctx.audit().run_id.to_string();
        abort_run_when(&s, ctx, "anything", "called the model", || {
            model.seen().bodies.len() >= 3
        })
        .await;
        s.close().await.unwrap();
        (slow, gone, gone_run)
    };
    // The second tenant's checkpoint goes with the power.
    std::fs::remove_dir_all(dir.path().join("runs").join(gone.as_str())).unwrap();

    let s = open(dir.path(), config(Some(&model.url), None));
    let agent = s.agent.clone();
    let resuming = tokio::spawn(async move { agent.resume_unfinished().await });
    let op = s.tenants.operator_context(&gone).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ended = events(&s, &op).await.iter().any(|e| {
            e["run_id"] == gone_run.as_str()
                && e["type"] == "run.failed"
                && e["data"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("lost:"))
        });
        // Both of the first tenant's runs asked the model again, neither answered.
        if ended && model.seen().bodies.len() >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lost run ended: {ended}; model calls: {}",
            model.seen().bodies.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !resuming.is_finished(),
        "the resumed runs are still waiting"
    );
    resuming.abort();
    let _ = slow;
}
