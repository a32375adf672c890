//! Broken object-level authorization: B's admin key against A's objects answers 404 (or, for the
//! audit proof, 400 about B's own log) and never shows or changes A's data; every list shows only
//! the caller's tenant.

use agentgate::agent::RunRequest;
use serde_json::{json, Value};

use crate::helpers::{assert_absent, spawn, Resp, TestApp};

/// A's identifying strings: none may appear in anything B's key is answered.
fn a_markers(app: &TestApp, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        app.a.id.to_string(),
        app.a.name.clone(),
        app.a.team.clone(),
        app.a.owner.to_string(),
        app.a.admin.id.clone(),
        app.a.compliance.id.clone(),
        app.a.service.id.clone(),
    ];
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

/// The one answer B gets for an object of A: exactly `404 {"error":"not found"}`, nothing of A.
fn assert_hidden(r: &Resp, markers: &[String], what: &str) {
    assert_eq!(r.status, 404, "{what}: {}", r.text());
    assert_eq!(r.json(), json!({"error": "not found"}), "{what}");
    assert_absent(&r.text(), markers, what);
}

fn has_principal(list: &Value, p: &str) -> Option<String> {
    list.as_array()
        .unwrap()
        .iter()
        .find(|m| m["principal"] == p)
        .map(|m| m["role"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn another_tenants_objects_answer_404_and_lists_show_only_the_callers_tenant() {
    let app = spawn().await;
    let (a, b) = (&app.a.admin.token, &app.b.admin.token);

    // A's objects, made through the API by A's admin.
    assert_eq!(
        app.put("/api/v1/members/slack:U0AONLY", a, json!({"role": "admin"}))
            .await
            .status,
        200
    );
    assert_eq!(
        app.put(
            "/api/v1/tools/grants/webhook.only_a_cap",
            a,
            json!({"min_role": "member"})
        )
        .await
        .status,
        200
    );
    let hook = json!({"description": "A's hook", "schema": {"type": "object"},
        "url": "https://hooks.example.com/a-only-hook", "secret": "a-webhook-secret-0123456789"});
    assert_eq!(
        app.put("/api/v1/tools/webhooks/only_a_hook", a, hook)
            .await
            .status,
        200
    );
    let policy = "@id(\"a-only-policy\")\nforbid (principal, action, resource) when { resource.capability == \"memory.forget\" };";
    assert_eq!(
        app.put("/api/v1/policies", a, json!({"text": policy}))
            .await
            .status,
        200
    );
    let flags = app
        .patch(
            "/api/v1/settings",
            a,
            json!({"features": {"a-secret-flag": true}}),
        )
        .await;
    assert_eq!(flags.status, 200, "{}", flags.text());
    // A run in A, by A's owner.
    let ctx = app.user_ctx(&app.a, "U0AOWNER");
    let run_id = ctx.audit().run_id.to_string();
    app.services
        .agent
        .run(
            &ctx,
            RunRequest {
                text: "help".into(),
                conversation: "slack:C0ACHAN".into(),
            },
        )
        .await
        .unwrap();
    let a_run = app.get(&format!("/api/v1/runs/{run_id}"), a).await;
    assert_eq!(a_run.status, 200, "A reads its own run: {}", a_run.text());
    assert_eq!(a_run.json()["run_id"], run_id.as_str());

    let markers = a_markers(
        &app,
        &[
            "U0AONLY",
            "only_a",
            "a-webhook-secret",
            "a-only-policy",
            "a-secret-flag",
            "C0ACHAN",
            &run_id,
        ],
    );
    let a_events_before = app.events(&app.a.id).await.len();

    // Members: GET of one member is not a route at all; DELETE of A's members is 404.
    let g = app.get("/api/v1/members/slack:U0AONLY", b).await;
    assert!(
        matches!(g.status, 404 | 405),
        "GET member: {} {}",
        g.status,
        g.text()
    );
    assert_absent(&g.text(), &markers, "GET member");
    for p in ["slack:U0AONLY", "slack:U0AOWNER"] {
        assert_hidden(
            &app.delete(&format!("/api/v1/members/{p}"), b).await,
            &markers,
            &format!("DELETE member {p}"),
        );
    }
    // PUT is an upsert into the caller's own membership table: it answers for B, and A is untouched.
    let put = app
        .put(
            "/api/v1/members/slack:U0AONLY",
            b,
            json!({"role": "viewer"}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(
        put.json(),
        json!({"principal": "slack:U0AONLY", "role": "viewer"})
    );
    let a_members = app.get("/api/v1/members", a).await.json();
    assert_eq!(
        has_principal(&a_members, "slack:U0AONLY").as_deref(),
        Some("admin"),
        "B's PUT changed A's member"
    );
    assert_eq!(
        has_principal(&a_members, "slack:U0AOWNER").as_deref(),
        Some("owner"),
        "B's DELETE removed A's owner"
    );
    let b_members = app.get("/api/v1/members", b).await.json();
    assert_eq!(
        has_principal(&b_members, "slack:U0AONLY").as_deref(),
        Some("viewer")
    );
    // B takes its own membership away again; A's stays.
    assert_eq!(
        app.delete("/api/v1/members/slack:U0AONLY", b).await.status,
        204
    );
    let a_members = app.get("/api/v1/members", a).await.json();
    assert_eq!(
        has_principal(&a_members, "slack:U0AONLY").as_deref(),
        Some("admin"),
        "B's DELETE of its own member removed A's"
    );

    // Tools.
    assert_hidden(
        &app.delete("/api/v1/tools/grants/webhook.only_a_cap", b)
            .await,
        &markers,
        "DELETE grant",
    );
    assert_hidden(
        &app.delete("/api/v1/tools/webhooks/only_a_hook", b).await,
        &markers,
        "DELETE webhook",
    );
    let a_tools = app.get("/api/v1/tools", a).await.text();
    assert!(
        a_tools.contains("webhook.only_a_cap") && a_tools.contains("only_a_hook"),
        "B's deletes reached A: {a_tools}"
    );

    // Runs.
    assert_hidden(
        &app.get(&format!("/api/v1/runs/{run_id}"), b).await,
        &markers,
        "GET run",
    );

    // Keys: B can neither revoke nor rotate A's keys, and A's key keeps working.
    for id in [&app.a.admin.id, &app.a.compliance.id] {
        assert_hidden(
            &app.delete(&format!("/api/v1/keys/{id}"), b).await,
            &markers,
            "DELETE key",
        );
        assert_hidden(
            &app.post(
                &format!("/api/v1/keys/{id}/rotate"),
                b,
                json!({"overlap_secs": 0}),
            )
            .await,
            &markers,
            "rotate key",
        );
    }
    assert_eq!(
        app.get("/api/v1/settings", &app.a.compliance.token)
            .await
            .status,
        200,
        "A's key still works after B's revoke and rotate"
    );
    let a_keys = app.get("/api/v1/keys", a).await.json();
    assert_eq!(
        a_keys.as_array().unwrap().len(),
        3,
        "B's rotate made a key in A: {a_keys}"
    );
    assert!(a_keys
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["revoked_at"].is_null()));

    // Audit: a proof beyond B's log is a 400 about B's log, never A's proof.
    let a_size = app.get("/api/v1/audit/head", a).await.json()["size"]
        .as_u64()
        .unwrap();
    let b_size = app.get("/api/v1/audit/head", b).await.json()["size"]
        .as_u64()
        .unwrap();
    assert!(
        a_size > b_size + 1,
        "A's log ({a_size}) must be longer than B's ({b_size})"
    );
    let seq = a_size - 1;
    let a_proof = app.get(&format!("/api/v1/audit/proof/{seq}"), a).await;
    assert_eq!(a_proof.status, 200, "{}", a_proof.text());
    assert!(a_proof.text().starts_with("c2sp.org/tlog-proof@v1\nindex "));
    let b_proof = app.get(&format!("/api/v1/audit/proof/{seq}"), b).await;
    assert_eq!(b_proof.status, 400, "{}", b_proof.text());
    assert!(!b_proof.text().contains("tlog-proof"));
    assert_absent(&b_proof.text(), &markers, "audit proof");
    let b_cons = app
        .get(&format!("/api/v1/audit/consistency?from=1&to={a_size}"), b)
        .await;
    assert_eq!(b_cons.status, 400, "{}", b_cons.text());
    assert_absent(&b_cons.text(), &markers, "audit consistency");

    // Nothing B did was recorded in A's log.
    // (A's own proof request may sign a checkpoint; that is the only thing that may be new.)
    let a_events = app.events(&app.a.id).await;
    let new: Vec<&Value> = a_events[a_events_before..]
        .iter()
        .filter(|e| e["type"] != "checkpoint.signed")
        .collect();
    assert!(new.is_empty(), "B's requests appended to A's log: {new:?}");

    // Every list B reads shows B and nothing of A.
    let b_markers = [app.b.id.to_string(), app.b.admin.id.clone()];
    for path in [
        "/api/v1/members",
        "/api/v1/tools",
        "/api/v1/keys",
        "/api/v1/runs",
        "/api/v1/policies",
        "/api/v1/settings",
        "/api/v1/usage",
        "/api/v1/audit/head",
    ] {
        let r = app.get(path, b).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_absent(&r.text(), &markers, path);
        // The same list for A does show A's data, so the check above is not vacuous.
        let ra = app.get(path, a).await;
        assert_eq!(ra.status, 200, "{path} for A");
        assert_ne!(ra.text(), r.text(), "{path}: A and B see the same thing");
    }
    assert!(app
        .get("/api/v1/members", b)
        .await
        .text()
        .contains("slack:U0BOWNER"));
    let b_keys = app.get("/api/v1/keys", b).await.text();
    assert!(b_keys.contains(&b_markers[1]));
    assert_eq!(app.get("/api/v1/runs", b).await.json(), json!([]));
    assert_eq!(
        app.get("/api/v1/settings", b).await.json()["name"],
        app.b.name.as_str()
    );
    let b_usage = app.get("/api/v1/usage", b).await.json();
    let b_runs: u64 = b_usage["usage_by_month"]
        .as_object()
        .unwrap()
        .values()
        .map(|u| u["runs"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(b_runs, 0, "A's run counted in B's usage: {b_usage}");
    let a_usage = app.get("/api/v1/usage", a).await.json();
    let a_runs: u64 = a_usage["usage_by_month"]
        .as_object()
        .unwrap()
        .values()
        .map(|u| u["runs"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(a_runs, 1, "{a_usage}");
    let head = app.get("/api/v1/audit/head", b).await.json();
    assert!(head["size"].as_u64().unwrap() < a_size, "{head}");
    assert_ne!(
        head["root"],
        app.get("/api/v1/audit/head", a).await.json()["root"]
    );
    if let Some(cp) = head["checkpoint"].as_str() {
        assert!(cp.contains(app.b.id.as_str()), "{cp}");
    }
}
