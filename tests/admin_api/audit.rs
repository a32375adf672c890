//! Every admin change is in the tenant's audit log (and no secret is), and the export over HTTP
//! verifies with the real `agentgate audit verify`.

use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::{spawn, spawn_with_timeout, TestApp};

/// Finds, at or after `from`, the first event `want` matches; returns the index after it.
fn expect_after(events: &[Value], from: usize, want: &Value, principal: &str) -> usize {
    let found = events[from..].iter().position(|e| {
        e["type"] == want["type"]
            && e["data"] == want["data"]
            && e["principal"] == principal
            && e["principal_kind"] == "service"
    });
    match found {
        Some(i) => from + i + 1,
        None => panic!(
            "no {want} by {principal} at or after event {from} in {:#?}",
            &events[from..]
        ),
    }
}

#[tokio::test]
async fn every_admin_change_is_audited_in_order_and_no_secret_is_logged() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let start = app.events(&app.a.id).await.len();
    let hook_secret = "hook-secret-value-7f3a9c2e1b";
    let ok = |r: crate::helpers::Resp, what: &str| {
        assert!(
            (200..300).contains(&r.status),
            "{what}: {} {}",
            r.status,
            r.text()
        );
        r
    };

    ok(
        app.patch(
            "/api/v1/settings",
            a,
            json!({"name": "audited", "default_role": "viewer"}),
        )
        .await,
        "settings",
    );
    ok(
        app.patch("/api/v1/settings/llm", a, json!({"provider": "anthropic"}))
            .await,
        "llm",
    );
    ok(
        app.put("/api/v1/members/slack:U0NEW", a, json!({"role": "member"}))
            .await,
        "member put",
    );
    ok(
        app.delete("/api/v1/members/slack:U0NEW", a).await,
        "member delete",
    );
    ok(
        app.put(
            "/api/v1/tools/grants/memory.save",
            a,
            json!({"min_role": "viewer"}),
        )
        .await,
        "grant put",
    );
    ok(
        app.delete("/api/v1/tools/grants/memory.save", a).await,
        "grant delete",
    );
    ok(
        app.put(
            "/api/v1/tools/webhooks/lookup",
            a,
            json!({"description": "look up", "schema": {"type": "object"},
                "url": "https://hooks.example.com/lookup?token=in-the-url", "secret": hook_secret, "timeout_ms": 1000}),
        )
        .await,
        "webhook put",
    );
    let hook_digest =
        agentgate::agent::tools::webhook_definition_sha256(&agentgate::store::WebhookTool {
            name: "lookup".into(),
            description: "look up".into(),
            schema: json!({"type": "object"}),
            url: "https://hooks.example.com/lookup?token=in-the-url".into(),
            secret: secrecy::SecretString::from(hook_secret.to_owned()),
            timeout_ms: 1000,
        });
    let policy_text = "@id(\"p1\")\npermit (principal, action, resource) when { false };";
    let tools = app.get("/api/v1/tools", a).await.json();
    assert_eq!(tools["webhooks"][0]["name"], "lookup");
    assert!(!tools.to_string().contains(hook_secret), "{tools}");
    assert_eq!(
        tools["webhooks"][0]["url"], "https://hooks.example.com/lookup?token=in-the-url",
        "an admin sees the URL it set"
    );
    // A reader who may not change the tool sees where it goes, not a token in its path or query.
    let read = app.get("/api/v1/tools", &app.a.compliance.token).await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(
        read.json()["webhooks"][0]["url"],
        "https://hooks.example.com/…"
    );
    ok(
        app.delete("/api/v1/tools/webhooks/lookup", a).await,
        "webhook delete",
    );
    ok(
        app.put("/api/v1/policies", a, json!({"text": policy_text}))
            .await,
        "policy put",
    );
    let created = ok(
        app.post(
            "/api/v1/keys",
            a,
            json!({"name": "siem", "role": "compliance", "expires_in_days": 30}),
        )
        .await,
        "key create",
    )
    .json();
    let created_id = created["id"].as_str().unwrap().to_owned();
    let created_token = created["token"].as_str().unwrap().to_owned();
    assert!(created_token.starts_with(&format!("agk_{created_id}_")));
    assert_eq!(created["live"], true);
    assert!(created["expires_at"].is_string());
    // The token is shown once: the listing does not have it.
    let listing = app.get("/api/v1/keys", a).await.text();
    assert!(listing.contains(&created_id) && !listing.contains(&created_token));
    let rotated = ok(
        app.post(
            &format!("/api/v1/keys/{created_id}/rotate"),
            a,
            json!({"overlap_secs": 60}),
        )
        .await,
        "key rotate",
    )
    .json();
    let rotated_id = rotated["id"].as_str().unwrap().to_owned();
    let rotated_token = rotated["token"].as_str().unwrap().to_owned();
    ok(
        app.delete(&format!("/api/v1/keys/{rotated_id}"), a).await,
        "key revoke",
    );

    let events = app.events(&app.a.id).await;
    let by = format!("key:{}", app.a.admin.id);
    let changed = |fields: Value| json!({"type": "settings.changed", "data": {"fields": fields}});
    let mut at = start;
    for want in [
        changed(json!(["name", "default_role"])),
        changed(json!(["llm.provider"])),
        json!({"type": "role.granted", "data": {"principal": "slack:U0NEW", "role": "member"}}),
        json!({"type": "role.revoked", "data": {"principal": "slack:U0NEW", "role": "member"}}),
        changed(json!(["grant:memory.save:viewer"])),
        changed(json!(["grant:memory.save:removed"])),
        changed(json!([format!("webhook:lookup:sha256:{hook_digest}")])),
        changed(json!(["webhook:lookup:removed"])),
        changed(json!([format!(
            "policies:sha256:{}",
            sha256_hex(policy_text)
        )])),
        changed(json!([format!("api-key:{created_id}:created:compliance")])),
        changed(json!([format!("api-key:{rotated_id}:created:compliance")])),
        changed(json!([format!("api-key:{created_id}:revoked")])),
        changed(json!([format!("api-key:{rotated_id}:revoked")])),
    ] {
        at = expect_after(&events, at, &want, &by);
    }
    for e in &events {
        assert_eq!(e["tenant"], app.a.id.as_str(), "{e}");
    }

    // No secret in A's log, nor in B's.
    let mut secrets = vec![hook_secret.to_owned()];
    for t in [
        &created_token,
        &rotated_token,
        &app.a.admin.token,
        &app.a.compliance.token,
        &app.a.service.token,
        &app.b.admin.token,
    ] {
        secrets.push(t.clone());
        secrets.push(t.rsplit_once('_').unwrap().1.to_owned());
    }
    for log in [events, app.events(&app.b.id).await] {
        let text = serde_json::to_string(&log).unwrap();
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret is in the audit log");
        }
    }
}

/// The first verifier key in the deployment's keyring.
fn vkey(app: &TestApp) -> String {
    let ring = std::fs::read_to_string(app.dir.path().join("audit").join("keyring.txt")).unwrap();
    ring.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("a key in the keyring")
        .to_owned()
}

fn unpack(tar_bytes: &[u8], into: &Path) {
    tar::Archive::new(tar_bytes).unpack(into).unwrap();
}

/// An export writes the whole bundle before it answers, which can outlast the request timeout
/// for a large tenant: it is not under it. With a timeout of zero, a route that waits at all
/// answers 408, yet finishes what it started (the log and the store agree); the export still
/// answers with its bundle.
#[tokio::test]
async fn an_export_is_not_cut_by_the_request_timeout() {
    let app = spawn_with_timeout(std::time::Duration::ZERO).await;
    // A route under the timeout is cut (this one waits for its audit event to be durable).
    let r = app
        .patch(
            "/api/v1/settings",
            &app.a.admin.token,
            json!({"name": "late"}),
        )
        .await;
    assert_eq!(r.status, 408, "{}", r.text());
    // The change it started is finished all the same, so the log and the store agree: its
    // settings.changed is on record and the name is stored.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while app.settings(&app.a.id).name != "late" {
        assert!(
            std::time::Instant::now() < deadline,
            "the change the timeout answered was not finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let events = app.events(&app.a.id).await;
    assert!(events
        .iter()
        .any(|e| e["type"] == "settings.changed" && e["data"]["fields"] == json!(["name"])));
    let out = export_all(&app).await;
    agentgate::audit::bundle::verify(&out.path().join("bundle"), None, None).unwrap();
}

/// A client that stops reading its export gives up the tenant's slot once it has read nothing
/// for the request timeout (a second here), so it cannot hold the tenant's exports, nor a
/// blocking thread, for as long as its connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_client_stops_reading_gives_up_its_slot() {
    let app = spawn_with_timeout(std::time::Duration::from_secs(1)).await;
    big_log(&app).await;
    let held = start_export(&app).await;
    export_once_free(
        &app,
        std::time::Duration::from_secs(15),
        "the stalled export kept its slot",
    )
    .await;
    // What it reads now ends in an error, not as if it were a whole (if short) archive.
    assert!(
        held.bytes().await.is_err(),
        "a cut-off export ended as a whole response"
    );
}

/// Asks for an export as A's compliance officer until the tenant's one export slot is free and
/// the export is made (200), each refusal meanwhile a 409; fails with `why` after `within`.
async fn export_once_free(app: &TestApp, within: std::time::Duration, why: &str) {
    let started = std::time::Instant::now();
    loop {
        let r = app
            .post("/api/v1/audit/export", &app.a.compliance.token, json!({}))
            .await;
        if r.status == 200 {
            return;
        }
        assert_eq!(r.status, 409, "{}", r.error());
        assert!(started.elapsed() < within, "{why}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Starts an export of all of A's log and returns its response, its bundle not yet read.
async fn start_export(app: &TestApp) -> reqwest::Response {
    let r = app
        .http
        .post(format!("{}/api/v1/audit/export", app.url))
        .bearer_auth(&app.a.compliance.token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

/// Appends events to A's log until a bundle of it is larger than the sockets' buffers.
async fn big_log(app: &TestApp) {
    let ctx = app.operator(&app.a.id);
    let repo = app.services.store.for_tenant(&ctx).unwrap();
    let bodies: Vec<agentgate::audit::EventBody> = (0..120)
        .map(|i| agentgate::audit::EventBody::SettingsChanged {
            fields: vec![format!("{i}:{}", "x".repeat(60_000))],
        })
        .collect();
    app.services
        .audit
        .append_batch_with(&ctx, repo, &bodies)
        .await
        .unwrap();
}

/// How many exports A's log records.
async fn exports_of(app: &TestApp) -> usize {
    app.events(&app.a.id)
        .await
        .iter()
        .filter(|e| e["type"] == "export.created")
        .count()
}

/// One export per tenant at a time: each writes a copy of the whole range to the temporary
/// directory, so a loop of them would fill the disk every tenant's log is on. A second export
/// while the first is still being sent is refused before it is recorded; another tenant's goes
/// ahead; once the first is sent, the next one is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_export_per_tenant_at_a_time() {
    let app = spawn().await;
    // A bundle larger than the sockets' buffers, so the first export is still being sent while
    // its client does not read.
    big_log(&app).await;

    let first = start_export(&app).await;
    assert_eq!(exports_of(&app).await, 1);
    let r = app
        .post("/api/v1/audit/export", &app.a.compliance.token, json!({}))
        .await;
    assert_eq!(r.status, 409, "a second export of A was not refused");
    assert_eq!(
        r.error(),
        "an export of this tenant is running; ask again when it has been sent"
    );
    assert_eq!(
        exports_of(&app).await,
        1,
        "the refused export is not recorded"
    );
    let r = app
        .post("/api/v1/audit/export", &app.b.compliance.token, json!({}))
        .await;
    assert_eq!(r.status, 200, "another tenant's export goes ahead");

    let bundle = first.bytes().await.unwrap();
    assert!(bundle.len() > 14_000_000, "{}", bundle.len());
    // The slot is given up once the archive is written, just after its last bytes went out.
    export_once_free(
        &app,
        std::time::Duration::from_secs(10),
        "the slot was not given up",
    )
    .await;
    assert_eq!(exports_of(&app).await, 2);
}

/// Exports all of A's log over HTTP, as its compliance officer, and unpacks the tar.
async fn export_all(app: &TestApp) -> tempfile::TempDir {
    let r = app
        .post("/api/v1/audit/export", &app.a.compliance.token, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "application/x-tar");
    let out = tempfile::tempdir().unwrap();
    unpack(&r.bytes, out.path());
    out
}

#[tokio::test]
async fn the_export_over_http_verifies_offline_with_the_cli() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    // Something to export.
    app.patch("/api/v1/settings", a, json!({"name": "exported"}))
        .await;
    app.put("/api/v1/members/slack:U0EXP", a, json!({"role": "viewer"}))
        .await;
    let size = app.events(&app.a.id).await.len() as u64;

    let out = export_all(&app).await;
    let bundle = out.path().join("bundle");
    for f in [
        "manifest.json",
        "events.jsonl",
        "checkpoint.txt",
        "keyring.txt",
        "proofs.json",
    ] {
        assert!(bundle.join(f).is_file(), "{f} is missing from the tar");
    }
    let events = std::fs::read_to_string(bundle.join("events.jsonl")).unwrap();
    assert!(
        !events.contains(app.b.id.as_str()),
        "B's events in A's export"
    );
    assert_eq!(events.lines().count() as u64, size);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["tenant"], app.a.id.as_str());
    assert_eq!(manifest["to"], size);
    // The checkpoint covers the export's own record, appended after the exported range.
    assert!(manifest["tree_size"].as_u64().unwrap() > size, "{manifest}");
    let log = app.events(&app.a.id).await;
    assert_eq!(log[size as usize]["type"], "export.created");
    assert_eq!(log[size as usize]["data"], json!({"from": 0, "to": size}));

    let key = vkey(&app);
    let run = |dir: &Path, key: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_agentgate"))
            .args(["audit", "verify"])
            .arg(dir)
            .args(["--trusted-key", key])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, stdout) = run(&bundle, &key);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("verified: "), "{stdout}");
    assert!(stdout.contains(app.a.id.as_str()), "{stdout}");

    let trusted = agentgate::audit::checkpoint::VerifierKey::from_vkey_text(&key).unwrap();
    let v = agentgate::audit::bundle::verify(&bundle, Some(&trusted), None).unwrap();
    assert_eq!(v.tenant, app.a.id.as_str());
    assert!(v.trusted_key);
    assert_eq!(v.range, (0, size));
    assert_eq!(v.events, size);
    assert!(
        stdout.contains(&format!("verified: {size} events")),
        "{stdout}"
    );

    // A changed byte fails, so the checks above are not vacuous.
    let tampered = out.path().join("bundle");
    let text = events.replacen("slack:U0EXP", "slack:U0EXQ", 1);
    assert_ne!(text, events);
    std::fs::write(tampered.join("events.jsonl"), text).unwrap();
    let (code, stdout) = run(&tampered, &key);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.starts_with("FAILED: "), "{stdout}");
    assert!(agentgate::audit::bundle::verify(&tampered, Some(&trusted), None).is_err());

    // A reversed range is a 400.
    let r = app
        .post(
            "/api/v1/audit/export",
            &app.a.compliance.token,
            json!({"from": 5, "to": 2}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("5..2"), "{}", r.text());
    let r = app
        .post(
            "/api/v1/audit/export",
            &app.a.compliance.token,
            json!({"to": 1_000_000}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}
