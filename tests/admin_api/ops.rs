//! The per-tenant rate limit, the OpenAPI document against the router, and `/metrics`.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{spawn, spawn_with_limit, Body};

#[tokio::test]
async fn the_rate_limit_is_per_tenant() {
    let app = spawn_with_limit(3).await;
    let a = &app.a.admin.token;
    for i in 0..3 {
        let r = app.get("/api/v1/settings", a).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // Another key of the same tenant shares the tenant's limit.
    for token in [a, &app.a.compliance.token] {
        let r = app.get("/api/v1/settings", token).await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.error(), "too many requests; slow down");
    }
    let r = app.get("/api/v1/settings", &app.b.admin.token).await;
    assert_eq!(r.status, 200, "B is not limited by A: {}", r.text());
    assert_eq!(r.json()["name"], app.b.name.as_str());
}

/// `(path, methods)` of every `.route(…)` in src/http/api.rs's router functions (the timed
/// routes and the untimed ones), read from the source.
fn routes_in_source() -> BTreeMap<String, BTreeSet<String>> {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/api.rs")).unwrap();
    let mut out = BTreeMap::new();
    for function in ["pub fn router()", "pub fn untimed_router()"] {
        let start = src.find(function).expect("the router function");
        let body = &src[start..];
        let body = &body[..body.find("\n}\n").expect("the end of the router function")];
        routes_in(body, &mut out);
    }
    out
}

fn routes_in(body: &str, out: &mut BTreeMap<String, BTreeSet<String>>) {
    for chunk in body.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).expect("a quoted path").to_owned();
        let rest = &chunk[chunk.find(',').expect("a method router")..];
        let mut methods = BTreeSet::new();
        for m in ["get", "put", "post", "patch", "delete"] {
            let mut s = rest;
            while let Some(i) = s.find(&format!("{m}(")) {
                let before = s[..i].chars().last();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    methods.insert(m.to_owned());
                }
                s = &s[i + m.len() + 1..];
            }
        }
        assert!(!methods.is_empty(), "no method found for {path}");
        out.insert(path, methods);
    }
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_metrics_name_no_tenant() {
    let app = spawn().await;
    let src = routes_in_source();
    // The parse of the source found what the router is known to have.
    assert_eq!(src.len(), 19, "{src:?}");
    assert_eq!(
        src["/api/v1/members/{principal}"],
        BTreeSet::from(["put".to_owned(), "delete".to_owned()])
    );
    assert_eq!(
        src["/api/v1/keys/{id}"],
        BTreeSet::from(["delete".to_owned()])
    );
    assert_eq!(
        src["/api/v1/settings"],
        BTreeSet::from(["get".to_owned(), "patch".to_owned()])
    );

    let r = app
        .call(Method::GET, "/api/v1/openapi.json", None, &[], Body::None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "application/json");
    let doc: Value = r.json();
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let methods: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| {
                matches!(
                    k.as_str(),
                    "get" | "put" | "post" | "patch" | "delete" | "head" | "options"
                )
            })
            .cloned()
            .collect();
        documented.insert(path.clone(), methods);
    }
    let mut routed = src.clone();
    // The document does not describe itself.
    routed.remove("/api/v1/openapi.json");
    assert_eq!(
        documented, routed,
        "the OpenAPI paths differ from the router's"
    );

    // Metrics: no authentication, Prometheus text, counters that move, no tenant names.
    let metrics = || async {
        let r = app
            .call(Method::GET, "/metrics", None, &[], Body::None)
            .await;
        assert_eq!(r.status, 200);
        assert!(
            r.content_type.starts_with("text/plain"),
            "{}",
            r.content_type
        );
        r.text()
    };
    let counter = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = metrics().await;
    let failures = counter(&before, "agentgate_auth_failures_total");
    let requests = counter(&before, "agentgate_http_requests_total");
    assert_eq!(app.get("/api/v1/settings", "garbage").await.status, 401);
    assert_eq!(
        app.get("/api/v1/members", &app.a.admin.token).await.status,
        200
    );
    let after = metrics().await;
    assert!(counter(&after, "agentgate_auth_failures_total") > failures);
    assert!(counter(&after, "agentgate_http_requests_total") >= requests + 2);
    for name in [
        app.a.name.as_str(),
        app.b.name.as_str(),
        app.a.id.as_str(),
        app.b.id.as_str(),
        app.a.team.as_str(),
        app.b.team.as_str(),
    ] {
        assert!(!after.contains(name), "/metrics names {name}");
    }
}
