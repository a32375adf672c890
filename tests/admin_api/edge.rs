//! What the HTTP edge answers before a handler runs: an absent body where every field has a
//! default, a malformed body, path or query value, and a body past the size limit. Every refusal
//! is the API's own `{"error": …}` JSON, never the framework's plain text or a Rust type name.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{assert_unauthorized, spawn, Body, Resp, TestApp};

/// Asserts `r` is an `ApiError` body with `status` whose message contains `needle` and names no
/// internals.
fn assert_api_error(r: &Resp, status: u16, needle: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(r.content_type, "application/json", "{what}: {}", r.text());
    let body: Value = r.json();
    let keys: Vec<&String> = body.as_object().expect("an object").keys().collect();
    assert_eq!(keys, ["error"], "{what}: {body}");
    let msg = r.error();
    assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
    for internal in [
        "u64", "u32", "String", "::", "axum", "serde", "Path<", "Query<",
    ] {
        assert!(
            !msg.contains(internal),
            "{what}: {msg:?} shows {internal:?}"
        );
    }
}

/// The events of A's log other than checkpoints, which the log may sign at any time.
async fn changes(app: &TestApp) -> Vec<Value> {
    app.events(&app.a.id)
        .await
        .into_iter()
        .filter(|e| e["type"] != "checkpoint.signed")
        .collect()
}

/// `POST path` with `body` and A's admin key.
async fn post(app: &TestApp, path: &str, body: Body<'_>) -> Resp {
    app.call(Method::POST, path, Some(&app.a.admin.token), &[], body)
        .await
}

#[tokio::test]
async fn rotate_and_export_without_a_body_use_the_defaults() {
    let app = spawn().await;

    // No body and no content type, as `curl -X POST` sends; then an empty JSON body; then only
    // whitespace. Each rotates with the default overlap of 0, so the old key stops at once.
    for (what, body) in [
        ("no body", Body::None),
        ("empty JSON body", Body::Raw("")),
        ("whitespace", Body::Raw(" \r\n")),
        ("empty text body", Body::Typed("text/plain", "")),
    ] {
        let old = crate::helpers::make_key(
            &app.services,
            &app.a.id,
            "defaults",
            agentgate::tenant::KeyRole::Compliance,
            vec![],
            None,
        )
        .await;
        let r = post(&app, &format!("/api/v1/keys/{}/rotate", old.id), body).await;
        assert_eq!(r.status, 201, "{what}: {}", r.text());
        let new = r.json();
        assert_eq!(new["name"], "defaults", "{what}");
        assert_eq!(new["role"], "compliance", "{what}");
        let token = new["token"].as_str().expect("the new token");
        assert_eq!(
            app.get("/api/v1/settings", token).await.status,
            200,
            "{what}"
        );
        assert_unauthorized(
            &app.get("/api/v1/settings", &old.token).await,
            &format!("{what}: the old key after a rotation with no overlap"),
        );
    }

    // The export of everything so far, as `{}` would ask for.
    for (what, body) in [("no body", Body::None), ("empty JSON body", Body::Raw(""))] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/audit/export",
                Some(&app.a.compliance.token),
                &[],
                body,
            )
            .await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.content_type, "application/x-tar", "{what}");
        let out = tempfile::tempdir().unwrap();
        tar::Archive::new(r.bytes.as_slice())
            .unpack(out.path())
            .unwrap();
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(out.path().join("bundle").join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["from"], 0, "{what}: {manifest}");
        assert_eq!(manifest["tenant"], app.a.id.as_str(), "{what}");
    }
}

#[tokio::test]
async fn a_present_but_malformed_optional_body_is_still_a_400() {
    let app = spawn().await;
    let key = app.a.compliance.id.clone();
    let rotate = format!("/api/v1/keys/{key}/rotate");
    let before = changes(&app).await;
    let keys_before = app.get("/api/v1/keys", &app.a.admin.token).await.json();

    for (path, what, body, status, needle) in [
        (
            rotate.as_str(),
            "syntax",
            Body::Raw("{not json"),
            400,
            "Failed to parse the request body as JSON",
        ),
        (
            rotate.as_str(),
            "negative overlap",
            Body::Raw(r#"{"overlap_secs": -1}"#),
            400,
            "overlap_secs",
        ),
        (
            rotate.as_str(),
            "unknown field",
            Body::Raw(r#"{"overlap": 60}"#),
            400,
            "unknown field `overlap`",
        ),
        (
            rotate.as_str(),
            "null",
            Body::Raw("null"),
            400,
            "invalid type: null",
        ),
        (
            rotate.as_str(),
            "JSON sent as text",
            Body::Typed("text/plain", r#"{"overlap_secs": 60}"#),
            415,
            "Content-Type: application/json",
        ),
        (
            rotate.as_str(),
            "JSON with no content type",
            Body::Bare(r#"{"overlap_secs": 60}"#),
            415,
            "Content-Type: application/json",
        ),
        (
            "/api/v1/audit/export",
            "export syntax",
            Body::Raw("{\"from\": "),
            400,
            "Failed to parse the request body as JSON",
        ),
        (
            "/api/v1/audit/export",
            "export wrong type",
            Body::Raw(r#"{"from": "zero"}"#),
            400,
            "from: invalid type",
        ),
        (
            "/api/v1/audit/export",
            "export as a form",
            Body::Typed("application/x-www-form-urlencoded", "from=0"),
            415,
            "Content-Type: application/json",
        ),
    ] {
        let r = post(&app, path, body).await;
        assert_api_error(&r, status, needle, what);
    }
    assert_eq!(
        app.get("/api/v1/keys", &app.a.admin.token).await.json(),
        keys_before,
        "a refused rotation made a key"
    );
    assert_eq!(changes(&app).await, before, "a refused request was audited");
}

#[tokio::test]
async fn malformed_path_and_query_values_get_the_apis_json_error() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let before = changes(&app).await;

    for (what, method, path, needle) in [
        (
            "seq not a number",
            Method::GET,
            "/api/v1/audit/proof/abc",
            "`seq` must be a non-negative integer, got `abc`",
        ),
        (
            "negative seq",
            Method::GET,
            "/api/v1/audit/proof/-1",
            "`seq` must be a non-negative integer",
        ),
        (
            "fractional seq",
            Method::GET,
            "/api/v1/audit/proof/1.5",
            "`seq` must be a non-negative integer",
        ),
        (
            "seq past 2^64",
            Method::GET,
            "/api/v1/audit/proof/99999999999999999999999",
            "`seq` is out of range, got `99999999999999999999999`",
        ),
        (
            "from not a number",
            Method::GET,
            "/api/v1/audit/consistency?from=one&to=2",
            "from: invalid digit",
        ),
        (
            "negative to",
            Method::GET,
            "/api/v1/audit/consistency?from=1&to=-2",
            "to: invalid digit",
        ),
        (
            "to missing",
            Method::GET,
            "/api/v1/audit/consistency?from=1",
            "missing field `to`",
        ),
        (
            "no query at all",
            Method::GET,
            "/api/v1/audit/consistency",
            "missing field",
        ),
        (
            "run id not UTF-8",
            Method::GET,
            "/api/v1/runs/%FF",
            "`id` is not valid UTF-8",
        ),
        (
            "key id not UTF-8",
            Method::DELETE,
            "/api/v1/keys/%C3%28",
            "`id` is not valid UTF-8",
        ),
        (
            "rotated key id not UTF-8",
            Method::POST,
            "/api/v1/keys/%FF/rotate",
            "`id` is not valid UTF-8",
        ),
        (
            "principal not UTF-8",
            Method::DELETE,
            "/api/v1/members/slack:%FF",
            "`principal` is not valid UTF-8",
        ),
        (
            "capability not UTF-8",
            Method::DELETE,
            "/api/v1/tools/grants/%FF",
            "`capability` is not valid UTF-8",
        ),
        (
            "webhook name not UTF-8",
            Method::DELETE,
            "/api/v1/tools/webhooks/%FF",
            "`name` is not valid UTF-8",
        ),
    ] {
        let r = app.call(method, path, Some(a), &[], Body::None).await;
        assert_api_error(&r, 400, needle, what);
    }
    assert_eq!(changes(&app).await, before, "a refused request was audited");

    // The credential is checked first: without one, a malformed path says nothing about itself.
    for path in ["/api/v1/audit/proof/abc", "/api/v1/runs/%FF"] {
        let r = app.call(Method::GET, path, None, &[], Body::None).await;
        assert_unauthorized(&r, path);
    }
    // Well-formed values still work.
    let r = app.get("/api/v1/audit/proof/0", a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let size = app.get("/api/v1/audit/head", a).await.json()["size"].clone();
    let r = app
        .get(&format!("/api/v1/audit/consistency?from=1&to={size}"), a)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A body past the limit is the API's own 413, not a 400 that blames the JSON.
#[tokio::test]
async fn a_body_past_the_limit_is_a_json_413() {
    let app = spawn().await;
    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(3 * 1024 * 1024));
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/settings",
            Some(&app.a.admin.token),
            &[],
            Body::Raw(&big),
        )
        .await;
    assert_api_error(&r, 413, "too large", "a 3 MiB body");
    let r = post(
        &app,
        &format!("/api/v1/keys/{}/rotate", app.a.compliance.id),
        Body::Raw(&big),
    )
    .await;
    assert_api_error(&r, 413, "too large", "a 3 MiB optional body");
    assert_eq!(app.settings(&app.a.id).name, app.a.name);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_the_apis_json_error() {
    let app = spawn().await;
    let r = app
        .call(
            Method::GET,
            "/api/v1/no-such-thing",
            Some(&app.a.admin.token),
            &[],
            Body::None,
        )
        .await;
    assert_api_error(&r, 404, "not found", "an unknown path");
    let r = app
        .call(Method::GET, "/nowhere", None, &[], Body::None)
        .await;
    assert_api_error(&r, 404, "not found", "an unknown path without a key");
    let r = app
        .call(Method::DELETE, "/healthz", None, &[], Body::None)
        .await;
    assert_api_error(
        &r,
        405,
        "method not allowed",
        "a known path with another method",
    );
}
