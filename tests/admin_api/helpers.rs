//! `spawn()`: the real application on 127.0.0.1:0 over a temporary data directory, with two Slack
//! tenants A and B, each with an owner (the installer) and admin, compliance and service keys made
//! the way the operator makes them. Typed request helpers and audit readers.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use agentgate::app::{Application, Services};
use agentgate::config::{AuditOptions, Config};
use agentgate::installation::{InstallSource, NewInstallation, PlatformIdentity, Workspace};
use agentgate::tenant::{
    Initiator, KeyRole, PrincipalId, TenantContext, TenantId, WorkspaceRequest,
};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::Value;

/// The 401 body every credential failure gets.
pub const UNAUTHORIZED: &str = r#"{"error":"a valid API key is required"}"#;

/// A key made for a test: its visible id and the whole token.
#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub token: String,
}

/// One installed tenant and its keys.
pub struct Tenant {
    pub id: TenantId,
    /// The Slack team id.
    pub team: String,
    /// The tenant's name (as its settings and listings show it).
    pub name: String,
    /// The installer, who is the owner.
    pub owner: PrincipalId,
    pub admin: Key,
    pub compliance: Key,
    pub service: Key,
}

/// The running application.
pub struct TestApp {
    pub url: String,
    pub services: Services,
    pub http: reqwest::Client,
    pub a: Tenant,
    pub b: Tenant,
    pub dir: tempfile::TempDir,
}

/// A request body.
pub enum Body<'a> {
    None,
    Json(Value),
    /// Sent verbatim as `application/json` (for malformed JSON).
    Raw(&'a str),
    /// Sent verbatim with this content type: `Typed(content_type, body)`.
    Typed(&'a str, &'a str),
    /// Sent verbatim with no content type at all.
    Bare(&'a str),
}

/// What the server answered.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `error` message of an error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {}", self.text()))
            .to_owned()
    }
}

/// Starts the application with a large request limit.
pub async fn spawn() -> TestApp {
    spawn_with_limit(100_000).await
}

/// Starts the application with `api_requests_per_minute` = `per_minute`.
pub async fn spawn_with_limit(per_minute: u32) -> TestApp {
    spawn_with(per_minute, Duration::from_secs(10)).await
}

/// Starts the application with a request timeout of `timeout`.
pub async fn spawn_with_timeout(timeout: Duration) -> TestApp {
    spawn_with(100_000, timeout).await
}

async fn spawn_with(per_minute: u32, request_timeout: Duration) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_owned(),
        installations_dir: dir.path().join("no-installations"),
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        master_key: Some("42".repeat(32).into()),
        request_timeout,
        audit: AuditOptions::default(),
        agent: agentgate::agent::AgentConfig::default(),
        api_requests_per_minute: NonZeroU32::new(per_minute).unwrap(),
        slack: None,
        discord: None,
    };
    let app = Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let services = app.services().clone();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let a = install(&services, "T0AAAACME", "tenant-a-acme", "U0AOWNER").await;
    let b = install(&services, "T0BBBGLOBEX", "tenant-b-globex", "U0BOWNER").await;
    TestApp {
        url,
        services,
        http: reqwest::Client::new(),
        a,
        b,
        dir,
    }
}

async fn install(services: &Services, team: &str, name: &str, owner: &str) -> Tenant {
    let owner = PrincipalId::qualified("slack", owner).unwrap();
    let id = services
        .tenants
        .install(
            NewInstallation {
                workspace: Workspace::slack_team(None, team).unwrap(),
                app_id: "A0TEST".into(),
                bot_user_id: Some("U0BOT".into()),
                bot_token: None,
                refresh_token: None,
                token_expires_at: None,
                scopes: vec!["commands".into()],
                installer: owner.clone(),
                source: InstallSource::OAuth,
            },
            name,
            None,
        )
        .await
        .unwrap()
        .tenant;
    let admin = make_key(services, &id, "admin", KeyRole::Admin, vec![], None).await;
    let compliance = make_key(services, &id, "audit", KeyRole::Compliance, vec![], None).await;
    let service = make_key(services, &id, "bot", KeyRole::Service, vec![], None).await;
    Tenant {
        id,
        team: team.to_owned(),
        name: name.to_owned(),
        owner,
        admin,
        compliance,
        service,
    }
}

/// Makes a key as the operator.
pub async fn make_key(
    services: &Services,
    tenant: &TenantId,
    name: &str,
    role: KeyRole,
    scopes: Vec<String>,
    expires_in: Option<chrono::Duration>,
) -> Key {
    let issued = services
        .tenants
        .create_key_as_operator(tenant, name, role, scopes, expires_in)
        .await
        .unwrap();
    Key {
        id: issued.record.id.clone(),
        token: issued.token.expose_secret().to_owned(),
    }
}

impl TestApp {
    /// Sends one request. `token` goes in `Authorization: Bearer …`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Resp {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb = match body {
            Body::None => rb,
            Body::Json(v) => rb.json(&v),
            Body::Raw(s) => rb
                .header("content-type", "application/json")
                .body(s.to_owned()),
            Body::Typed(t, s) => rb.header("content-type", t).body(s.to_owned()),
            Body::Bare(s) => rb.body(s.to_owned()),
        };
        let resp = rb.send().await.expect("the request reaches the server");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = resp.bytes().await.expect("a body").to_vec();
        Resp {
            status,
            content_type,
            bytes,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, Some(token), &[], Body::None)
            .await
    }

    pub async fn get_h(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Resp {
        self.call(Method::GET, path, Some(token), headers, Body::None)
            .await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PUT, path, Some(token), &[], Body::Json(body))
            .await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PATCH, path, Some(token), &[], Body::Json(body))
            .await
    }

    pub async fn patch_raw(&self, path: &str, token: &str, raw: &str) -> Resp {
        self.call(Method::PATCH, path, Some(token), &[], Body::Raw(raw))
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(token), &[], Body::Json(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(Method::DELETE, path, Some(token), &[], Body::None)
            .await
    }

    /// The operator's context for a tenant.
    pub fn operator(&self, t: &TenantId) -> TenantContext {
        self.services.tenants.operator_context(t).unwrap()
    }

    /// Every event of a tenant's log, parsed, in order.
    pub async fn events(&self, t: &TenantId) -> Vec<Value> {
        let ctx = self.operator(t);
        let repo = self.services.store.for_tenant(&ctx).unwrap();
        let head = self.services.audit.head(&ctx, repo.clone()).await.unwrap();
        self.services
            .audit
            .read_range(&ctx, repo, 0, head.size)
            .await
            .unwrap()
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    /// The tenant's current settings, read directly from the store.
    pub fn settings(&self, t: &TenantId) -> agentgate::tenant::TenantSettings {
        let ctx = self.operator(t);
        self.services
            .store
            .for_tenant(&ctx)
            .unwrap()
            .settings()
            .get()
            .unwrap()
            .unwrap()
    }

    /// A context for `user` of the tenant's Slack team, resolved as a platform request would be.
    pub fn user_ctx(&self, t: &Tenant, user: &str) -> TenantContext {
        self.services
            .tenants
            .resolve(&WorkspaceRequest {
                identity: PlatformIdentity::Slack {
                    enterprise_id: None,
                    team_id: Some(t.team.clone()),
                },
                user: PrincipalId::qualified("slack", user).unwrap(),
                correlation_id: None,
                initiator: Initiator::User,
            })
            .unwrap()
            .ctx
    }
}

/// Asserts a response is the plain 401 every credential failure gets.
pub fn assert_unauthorized(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert_eq!(r.text(), UNAUTHORIZED, "{what}: the 401 body differs");
}

/// Asserts that no needle occurs in `haystack`.
pub fn assert_absent(haystack: &str, needles: &[String], what: &str) {
    for n in needles {
        assert!(
            !haystack.contains(n.as_str()),
            "{what}: {n:?} leaked into {haystack}"
        );
    }
}
