//! Roles and scopes, and what the API refuses to accept.

use serde_json::{json, Value};

use crate::helpers::{spawn, Resp, TestApp};

/// Asserts a 400 whose message contains `needle`, and that the tenant's log did not grow.
async fn assert_refused(app: &TestApp, r: Resp, needle: &str, events_before: usize, what: &str) {
    assert_eq!(r.status, 400, "{what}: {}", r.text());
    let msg = r.error();
    assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
    let after = app.events(&app.a.id).await;
    assert_eq!(
        after.len(),
        events_before,
        "{what}: a refused request was audited: {:?}",
        &after[events_before..]
    );
}

#[tokio::test]
async fn compliance_keys_read_and_export_but_change_nothing_and_service_keys_read_nothing() {
    let app = spawn().await;
    let c = &app.a.compliance.token;
    for path in [
        "/api/v1/settings",
        "/api/v1/settings/llm",
        "/api/v1/usage",
        "/api/v1/runs",
        "/api/v1/members",
        "/api/v1/tools",
        "/api/v1/policies",
        "/api/v1/audit/head",
    ] {
        let r = app.get(path, c).await;
        assert_eq!(r.status, 200, "compliance GET {path}: {}", r.text());
    }
    let r = app.post("/api/v1/audit/export", c, json!({})).await;
    assert_eq!(r.status, 200, "compliance export: {}", r.text());
    assert_eq!(r.content_type, "application/x-tar");

    let before = app.events(&app.a.id).await.len();
    let keys_before = app.get("/api/v1/keys", &app.a.admin.token).await.json();
    let key_id = app.a.admin.id.clone();
    let forbidden: Vec<(&str, Resp)> = vec![
        (
            "PATCH settings",
            app.patch("/api/v1/settings", c, json!({"name": "by-compliance"}))
                .await,
        ),
        (
            "PATCH llm",
            app.patch("/api/v1/settings/llm", c, json!({"provider": "openai"}))
                .await,
        ),
        (
            "PUT policies",
            app.put(
                "/api/v1/policies",
                c,
                json!({"text": "@id(\"x\")\npermit (principal, action, resource);"}),
            )
            .await,
        ),
        (
            "POST keys",
            app.post("/api/v1/keys", c, json!({"name": "mine", "role": "admin"}))
                .await,
        ),
        (
            "DELETE key",
            app.delete(&format!("/api/v1/keys/{key_id}"), c).await,
        ),
        (
            "PUT member",
            app.put("/api/v1/members/slack:U0X", c, json!({"role": "admin"}))
                .await,
        ),
        (
            "PUT grant",
            app.put(
                "/api/v1/tools/grants/memory.save",
                c,
                json!({"min_role": "viewer"}),
            )
            .await,
        ),
    ];
    for (what, r) in &forbidden {
        assert_eq!(r.status, 403, "compliance {what}: {}", r.text());
        assert_eq!(r.error(), "this needs the admin:write scope", "{what}");
    }
    assert_eq!(app.settings(&app.a.id).name, app.a.name);
    assert_eq!(app.settings(&app.a.id).llm.provider, "rules");
    assert_eq!(
        app.get("/api/v1/keys", &app.a.admin.token).await.json(),
        keys_before
    );
    let after = app.events(&app.a.id).await;
    assert!(
        after[before..]
            .iter()
            .all(|e| e["type"] == "checkpoint.signed"),
        "{:?}",
        &after[before..]
    );

    // A service key reads nothing of the admin API.
    let s = &app.a.service.token;
    for path in [
        "/api/v1/settings",
        "/api/v1/keys",
        "/api/v1/runs",
        "/api/v1/audit/head",
    ] {
        let r = app.get(path, s).await;
        assert_eq!(r.status, 403, "service GET {path}: {}", r.text());
    }
    assert_eq!(
        app.post("/api/v1/audit/export", s, json!({})).await.status,
        403
    );
}

#[tokio::test]
async fn malformed_bodies_bad_policies_and_bad_llm_settings_are_400() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let n = app.events(&app.a.id).await.len();

    // JSON.
    let r = app.patch_raw("/api/v1/settings", a, "{not json").await;
    assert_refused(
        &app,
        r,
        "Failed to parse the request body as JSON",
        n,
        "malformed",
    )
    .await;
    // Names are printed in operators' listings: no escape sequences, no endless names.
    for name in [
        "",
        "   ",
        "evil\u{1b}]0;owned\u{7}",
        "line\nbreak",
        &"n".repeat(101),
    ] {
        let r = app
            .patch("/api/v1/settings", a, json!({ "name": name }))
            .await;
        assert_refused(&app, r, "1 to 100 characters", n, "bad tenant name").await;
        let r = app
            .post("/api/v1/keys", a, json!({"name": name, "role": "service"}))
            .await;
        assert_refused(&app, r, "1 to 100 characters", n, "bad key name").await;
    }
    let r = app
        .patch("/api/v1/settings", a, json!({"nmae": "typo"}))
        .await;
    assert_refused(&app, r, "unknown field `nmae`", n, "unknown field").await;
    let r = app.patch("/api/v1/settings", a, json!({"name": 5})).await;
    assert_refused(&app, r, "invalid type", n, "wrong type").await;
    let r = app
        .patch("/api/v1/settings", a, json!({"plan": "platinum"}))
        .await;
    assert_refused(&app, r, "unknown variant", n, "bad enum").await;
    let r = app
        .put("/api/v1/members/slack:U0X", a, json!({"role": "emperor"}))
        .await;
    assert_refused(&app, r, "unknown variant", n, "bad role").await;
    let r = app
        .put(
            "/api/v1/members/not-a-principal",
            a,
            json!({"role": "member"}),
        )
        .await;
    assert_eq!(r.status, 400, "bad principal: {}", r.text());
    let r = app
        .put(
            "/api/v1/tools/grants/shell.exec",
            a,
            json!({"min_role": "member"}),
        )
        .await;
    assert_refused(&app, r, "unknown capability", n, "bad capability").await;
    // A webhook capability names a webhook by its rules: its name goes into the audit log.
    let long = "a".repeat(49);
    for cap in [
        "webhook.",
        "webhook.Upper",
        "webhook.line%0Abreak",
        "webhook.sp%20ace",
        &format!("webhook.{long}"),
    ] {
        let r = app
            .put(
                &format!("/api/v1/tools/grants/{cap}"),
                a,
                json!({"min_role": "member"}),
            )
            .await;
        assert_refused(&app, r, "unknown capability", n, cap).await;
    }
    let r = app
        .put(
            "/api/v1/tools/webhooks/hook",
            a,
            json!({"description": "d", "schema": {"type": "object"}, "url": "https://hooks.example.com/", "secret": "short"}),
        )
        .await;
    assert_refused(&app, r, "at least 16 characters", n, "short secret").await;
    // A schema whose definitions refer to each other overflowed the stack when a call was
    // checked: references are refused when the tool is declared.
    let cycle = json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}},
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}});
    let r = app
        .put(
            "/api/v1/tools/webhooks/hook",
            a,
            json!({"description": "d", "schema": cycle, "url": "https://hooks.example.com/", "secret": "a-secret-of-sixteen-or-more"}),
        )
        .await;
    assert_refused(&app, r, "uses $ref", n, "schema with a reference").await;
    // A name with `__` could never be called: a provider's tool name writes `.` as `__`.
    let r = app
        .put(
            "/api/v1/tools/webhooks/create__ticket",
            a,
            json!({"description": "d", "schema": {"type": "object"}, "url": "https://hooks.example.com/", "secret": "a-secret-of-sixteen-or-more"}),
        )
        .await;
    assert_refused(&app, r, "without __", n, "name with __").await;
    let r = app
        .put(
            "/api/v1/tools/grants/webhook.create__ticket",
            a,
            json!({"min_role": "member"}),
        )
        .await;
    assert_refused(&app, r, "unknown capability", n, "grant with __").await;
    let r = app
        .post("/api/v1/keys", a, json!({"name": "k", "role": "root"}))
        .await;
    assert_refused(&app, r, "unknown key role", n, "bad key role").await;
    assert_eq!(app.settings(&app.a.id).name, app.a.name);

    // Policies: Cedar's own message for text that does not parse.
    let bad = "@id(\"p\")\npermit (principal, action, resource) when { principal.tenant == };";
    let cedar_msg = bad
        .parse::<cedar_policy::PolicySet>()
        .expect_err("the text is not Cedar")
        .to_string();
    let r = app.put("/api/v1/policies", a, json!({"text": bad})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error(), cedar_msg, "the message is Cedar's");
    let r = app
        .put(
            "/api/v1/policies",
            a,
            json!({"text": "permit (principal, action, resource);"}),
        )
        .await;
    assert_refused(&app, r, "@id", n, "policy without @id").await;
    let dup = "@id(\"same\")\npermit (principal, action, resource);\n@id(\"same\")\nforbid (principal, action, resource);";
    let r = app.put("/api/v1/policies", a, json!({"text": dup})).await;
    assert_refused(&app, r, "used twice", n, "duplicate @id").await;
    let r = app.put("/api/v1/policies", a, json!({"txt": "x"})).await;
    assert_refused(&app, r, "unknown field", n, "policy unknown field").await;
    assert_eq!(
        app.get("/api/v1/policies", a).await.json()["text"],
        Value::Null,
        "refused policies were stored"
    );
    let good = "@id(\"no-forget\")\nforbid (principal, action, resource) when { resource.capability == \"memory.forget\" };";
    let r = app.put("/api/v1/policies", a, json!({"text": good})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = app.get("/api/v1/policies", a).await.json();
    assert_eq!(got["text"], good);
    assert!(got["defaults"]
        .as_str()
        .unwrap()
        .contains("default.granted-role"));

    // LLM settings.
    let n = app.events(&app.a.id).await.len();
    let llm_before = app.get("/api/v1/settings/llm", a).await.json();
    for (what, body, needle) in [
        (
            "temperature 3",
            json!({"default_temperature": 3}),
            "between 0 and 2",
        ),
        (
            "negative temperature",
            json!({"default_temperature": -0.1}),
            "between 0 and 2",
        ),
        (
            "provider gpt",
            json!({"provider": "gpt"}),
            "provider must be",
        ),
        (
            "a key as key_ref",
            json!({"key_ref": "sk-live-abc"}),
            "never a key",
        ),
        (
            "the gateway's own secret as key_ref",
            json!({"key_ref": "AGENTGATE_MASTER_KEY"}),
            "this tenant's own variable",
        ),
        (
            "another tenant's variable as key_ref",
            json!({"key_ref": agentgate::tenant::tenant_key_prefix(&app.b.id)}),
            "this tenant's own variable",
        ),
        (
            "zero max tokens",
            json!({"default_max_tokens": 0}),
            "between 1 and 200000",
        ),
        (
            "empty model",
            json!({"default_model": ""}),
            "1 to 200 characters",
        ),
        // A valid field beside a bad one changes nothing.
        (
            "partly valid",
            json!({"provider": "openai", "default_temperature": 3}),
            "between 0 and 2",
        ),
        (
            "unknown field",
            json!({"api_key": "sk-live-abc"}),
            "unknown field",
        ),
        (
            "wrong type",
            json!({"default_max_tokens": "many"}),
            "invalid type",
        ),
    ] {
        let r = app.patch("/api/v1/settings/llm", a, body).await;
        assert_refused(&app, r, needle, n, what).await;
    }
    assert_eq!(app.get("/api/v1/settings/llm", a).await.json(), llm_before);
    let own = format!("{}_OPENAI", agentgate::tenant::tenant_key_prefix(&app.a.id));
    let patch = json!({"provider": "openai", "default_model": "gpt-4o-mini",
        "default_temperature": 0.7, "default_max_tokens": 1024, "key_ref": own});
    let r = app.patch("/api/v1/settings/llm", a, patch.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), patch);
    assert_eq!(app.get("/api/v1/settings/llm", a).await.json(), patch);
    let stored: Value = app.get("/api/v1/settings", a).await.json();
    assert_eq!(stored["llm"]["provider"], "openai");
    assert_eq!(stored["llm"]["default_temperature_milli"], 700);
}

/// A forbid that parses but names an attribute the gate never builds (`capabilty`): Cedar would
/// error on it at every call and skip it, so memory.forget would stay allowed. It is refused.
#[tokio::test]
async fn a_misspelt_forbid_is_refused_with_a_400_naming_the_policy() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let n = app.events(&app.a.id).await.len();
    let typo = "@id(\"no-forget\")\nforbid (principal, action, resource) when { resource.capabilty == \"memory.forget\" };";
    let r = app.put("/api/v1/policies", a, json!({"text": typo})).await;
    assert_refused(
        &app,
        r,
        "for policy `no-forget`, attribute `capabilty` on entity type `Agentgate::Tool` not found",
        n,
        "misspelt attribute",
    )
    .await;
    assert_eq!(
        app.get("/api/v1/policies", a).await.json()["text"],
        Value::Null,
        "the refused text was stored"
    );
}

/// `LlmPatch::key_ref` is `Option<Option<String>>` so that `null` can clear it, but serde reads
/// `null` as the outer `None`, so the key_ref can never be cleared (src/http/api.rs, `LlmPatch`).
#[tokio::test]
async fn a_null_key_ref_clears_it() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let own = agentgate::tenant::tenant_key_prefix(&app.a.id);
    let r = app
        .patch("/api/v1/settings/llm", a, json!({"key_ref": own}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        app.settings(&app.a.id).llm.key_ref.as_deref(),
        Some(own.as_str())
    );
    let r = app
        .patch("/api/v1/settings/llm", a, json!({"key_ref": null}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["key_ref"], Value::Null);
    assert_eq!(app.settings(&app.a.id).llm.key_ref, None);
}

/// A tenant's plan, monthly quota and run ceilings bound what it may spend (on the deployment's
/// own model keys too), so its admins cannot change them: the whole request is refused, nothing is
/// changed or audited, and the operator's limits stay. The refusal names every limit asked for.
#[tokio::test]
async fn a_tenant_admin_cannot_raise_its_own_limits() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let before = app.settings(&app.a.id);
    let n = app.events(&app.a.id).await.len();
    let huge = json!({"tokens": u64::MAX, "tool_calls": u64::MAX, "runs": u64::MAX, "cost_microcents": u64::MAX});
    let ceilings = json!({"tokens": u64::MAX, "tool_calls": u64::MAX, "walltime_ms": u64::MAX, "cost_microcents": u64::MAX});
    for (body, named) in [
        (json!({"plan": "enterprise"}), "plan"),
        (json!({"quota": huge}), "quota"),
        (json!({"run_ceilings": ceilings}), "run_ceilings"),
        (
            json!({"name": "renamed", "plan": "team", "quota": huge}),
            "plan, quota",
        ),
    ] {
        let r = app.patch("/api/v1/settings", a, body.clone()).await;
        assert_eq!(r.status, 403, "{body}: {}", r.text());
        assert_eq!(
            r.error(),
            format!("{named} can only be changed by the operator (agentgate tenants limits)"),
            "{body}"
        );
    }
    assert_eq!(app.settings(&app.a.id), before, "nothing changed");
    assert_eq!(app.events(&app.a.id).await.len(), n, "nothing audited");

    // The operator's change is audited as the operator, field by field, and stored.
    let change = agentgate::tenant::LimitsChange {
        plan: Some(agentgate::tenant::Plan::Team),
        quota_runs: Some(7),
        run_tool_calls: Some(before.run_ceilings.tool_calls),
        ..Default::default()
    };
    let after = app
        .services
        .tenants
        .set_limits_as_operator(&app.a.id, &change)
        .await
        .unwrap();
    assert_eq!(after.plan, agentgate::tenant::Plan::Team);
    assert_eq!(after.quota.runs, 7);
    assert_eq!(app.settings(&app.a.id), after);
    let events = app.events(&app.a.id).await;
    let last = &events[events.len() - 1];
    assert_eq!(last["type"], "settings.changed");
    assert_eq!(last["principal"], "operator:cli");
    // An unchanged value is not named.
    assert_eq!(last["data"]["fields"], json!(["plan", "quota.runs"]));
    let r = app.get("/api/v1/settings", a).await;
    assert_eq!(r.json()["quota"]["runs"], 7);
}

/// Two settings changes at once are both kept, as both are audited: each reads, audits and writes
/// back under the tenant's settings lock, so neither overwrites the other with what it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_settings_changes_are_all_kept() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    for round in 0..5 {
        let name = format!("renamed {round}");
        let role = if round % 2 == 0 { "viewer" } else { "member" };
        let (r1, r2, r3) = tokio::join!(
            app.patch("/api/v1/settings", a, json!({ "name": name })),
            app.patch("/api/v1/settings", a, json!({ "default_role": role })),
            app.patch(
                "/api/v1/settings/llm",
                a,
                json!({"default_max_tokens": 100 + round})
            ),
        );
        for r in [&r1, &r2, &r3] {
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let s = app.settings(&app.a.id);
        assert_eq!(
            (
                s.name.as_str(),
                s.default_role.as_str(),
                s.llm.default_max_tokens
            ),
            (name.as_str(), role, 100 + round),
            "round {round}: a change was lost"
        );
    }
}

/// Runs are listed a page at a time, oldest first: `limit` (1 to 1000, 100 unless asked) and
/// `after`, the last run id of the previous page, so a tenant with many runs is not read whole.
#[tokio::test]
async fn runs_are_listed_a_page_at_a_time() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let mut ids = Vec::new();
    for n in 0..5 {
        let ctx = app.user_ctx(&app.a, "U0PAGER");
        ids.push(ctx.audit().run_id.to_string());
        app.services
            .agent
            .run(
                &ctx,
                agentgate::agent::RunRequest {
                    text: "whoami".into(),
                    conversation: format!("slack:C0PAGE{n}"),
                },
            )
            .await
            .unwrap();
    }
    ids.sort();
    let page = |query: String| {
        let app = &app;
        async move {
            let r = app.get(&format!("/api/v1/runs{query}"), a).await;
            assert_eq!(r.status, 200, "{query}: {}", r.text());
            r.json()
                .as_array()
                .unwrap()
                .iter()
                .map(|run| run["run_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page(String::new()).await,
        ids,
        "all five fit one default page"
    );
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let q = if after.is_empty() {
            "?limit=2".to_owned()
        } else {
            format!("?limit=2&after={after}")
        };
        let got = page(q).await;
        assert!(got.len() <= 2);
        let Some(last) = got.last().cloned() else {
            break;
        };
        seen.extend(got);
        after = last;
    }
    assert_eq!(seen, ids, "the pages add up to every run, once, in order");
    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?page=2"] {
        let r = app.get(&format!("/api/v1/runs{bad}"), a).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
}
