//! Slack end to end: the real application on port 0 with a local stand-in for Slack's Web API
//! (chat.postMessage, auth.test, oauth.v2.access) and for response_url, so the real client code runs.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate::app::{Application, Services};
use agentgate::audit::{AuditError, AuditSink, EventBody};
use agentgate::config::{AuditOptions, Config};
use agentgate::installation::{InstallSource, NewInstallation, PlatformIdentity, Workspace};
use agentgate::tenant::{Initiator, PrincipalId, ResolveError, TenantContext, WorkspaceRequest};
use agentgate::transport::slack::oauth::OAuthConfig;
use agentgate::transport::slack::signature::sign;
use agentgate::transport::slack::{bot_token, SlackConfig, SlackState};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

const SECRET: &str = "test-signing-secret-0123456789";

/// What the Slack stand-in saw and how it answers.
#[derive(Clone, Default)]
struct Slack {
    posts: Arc<Mutex<Vec<(String, Value)>>>,
    responses: Arc<Mutex<Vec<Value>>>,
    oauth_forms: Arc<Mutex<Vec<(String, String)>>>,
    response_status: Arc<Mutex<VecDeque<u16>>>,
    /// When set, a token refresh waits for `release_refresh` before answering.
    hold_refresh: Arc<AtomicBool>,
    release_refresh: Arc<tokio::sync::Notify>,
    /// When set, a token refresh is refused.
    refuse_refresh: Arc<AtomicBool>,
    /// The stand-in's own base URL, for its redirect.
    base: Arc<Mutex<String>>,
}

async fn post_message(
    State(s): State<Slack>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    s.posts.lock().unwrap().push((auth, body.clone()));
    Json(
        json!({"ok": true, "channel": body["channel"], "ts": "1700000001.000200", "message": {"text": body["text"], "ts": "1700000001.000200"}}),
    )
}

async fn auth_test() -> Json<Value> {
    Json(
        json!({"ok": true, "url": "https://acme.slack.com/", "team": "Acme", "user": "agentgate", "team_id": "T0OAUTH01", "user_id": "U0BOTUSER", "bot_id": "B0BOT"}),
    )
}

async fn oauth_access(
    State(s): State<Slack>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    s.oauth_forms.lock().unwrap().push((auth, body.clone()));
    let form: std::collections::HashMap<String, String> =
        serde_urlencoded::from_str(&body).unwrap();
    if form.get("grant_type").map(String::as_str) == Some("refresh_token") {
        if s.hold_refresh.load(Ordering::SeqCst) {
            s.release_refresh.notified().await;
        }
        if s.refuse_refresh.load(Ordering::SeqCst) {
            return Json(json!({"ok": false, "error": "invalid_refresh_token"})).into_response();
        }
        return Json(
            json!({"ok": true, "access_token": "xoxe.xoxb-rotated", "refresh_token": "xoxe-1-refresh-2", "expires_in": 43200, "token_type": "bot", "scope": "commands"}),
        )
        .into_response();
    }
    match form.get("code").map(String::as_str) {
        Some("good-code") => Json(json!({
            "ok": true, "access_token": "xoxb-from-oauth", "token_type": "bot", "scope": "commands,chat:write,app_mentions:read",
            "bot_user_id": "U0BOTUSER", "app_id": "A0OAUTH", "team": {"id": "T0OAUTH01", "name": "Acme"}, "enterprise": null,
            "authed_user": {"id": "U0INSTALLER"}, "is_enterprise_install": false,
            "refresh_token": "xoxe-1-refresh-1", "expires_in": 60
        }))
        .into_response(),
        // Codes a proxy or Slack itself might answer with, carrying internals.
        Some("leaky-code") => {
            Json(json!({"ok": false, "error": "internal_error_at_db-7.corp"})).into_response()
        }
        Some("html-code") => "<html>upstream db-7.corp timed out</html>".into_response(),
        _ => Json(json!({"ok": false, "error": "invalid_code"})).into_response(),
    }
}

async fn respond(State(s): State<Slack>, Json(body): Json<Value>) -> impl IntoResponse {
    if let Some(code) = s.response_status.lock().unwrap().pop_front() {
        return (
            StatusCode::from_u16(code).unwrap(),
            [("retry-after", "1")],
            "slow down",
        )
            .into_response();
    }
    s.responses.lock().unwrap().push(body);
    (StatusCode::OK, "ok").into_response()
}

async fn serve(router: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    format!("http://{a}")
}

struct App {
    url: String,
    slack_url: String,
    slack: Slack,
    services: Services,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn spawn() -> App {
    spawn_in(tempfile::tempdir().unwrap()).await
}

/// Starts the Slack stand-in, then the application over `dir`.
async fn spawn_in(dir: tempfile::TempDir) -> App {
    let (slack, slack_url) = stand_in().await;
    spawn_with(dir, slack, slack_url).await
}

/// Starts the Slack stand-in; returns what it sees and its URL.
async fn stand_in() -> (Slack, String) {
    let slack = Slack::default();
    let slack_url = serve(
        Router::new()
            .route("/api/chat.postMessage", post(post_message))
            .route("/api/auth.test", get(auth_test).post(auth_test))
            .route("/api/oauth.v2.access", post(oauth_access))
            .route("/respond", post(respond))
            .route(
                "/redirect",
                post(|State(s): State<Slack>| async move {
                    let to = format!("{}/respond", s.base.lock().unwrap());
                    (StatusCode::TEMPORARY_REDIRECT, [("location", to)]).into_response()
                }),
            )
            .route(
                "/authorize",
                get(|Query(q): Query<Value>| async move { Json(q) }),
            )
            .with_state(slack.clone()),
    )
    .await;
    *slack.base.lock().unwrap() = slack_url.clone();
    (slack, slack_url)
}

/// Starts the application over `dir`, with the Slack stand-in at `slack_url`.
async fn spawn_with(dir: tempfile::TempDir, slack: Slack, slack_url: String) -> App {
    let config = Config {
        data_dir: dir.path().to_owned(),
        installations_dir: dir.path().join("none"),
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        master_key: Some("42".repeat(32).into()),
        request_timeout: Duration::from_secs(10),
        audit: AuditOptions::default(),
        agent: Default::default(),
        api_requests_per_minute: std::num::NonZeroU32::new(600).unwrap(),
        slack: Some(SlackConfig {
            signing_secret: SecretString::from(SECRET),
            api_url: format!("{slack_url}/api/"),
            oauth: Some(OAuthConfig {
                client_id: "1111.2222".into(),
                client_secret: SecretString::from("client-secret-x"),
                scopes: "app_mentions:read,chat:write,commands".into(),
                authorize_url: format!("{slack_url}/authorize"),
                redirect_url: "http://localhost/slack/oauth_redirect".into(),
            }),
        }),
        discord: None,
    };
    let app = Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let services = app.services().clone();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    App {
        url,
        slack_url,
        slack,
        services,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        _dir: dir,
    }
}

impl App {
    async fn install(&self, team: &str, token: &str) {
        self.services
            .tenants
            .install(
                NewInstallation {
                    workspace: Workspace::slack_team(None, team).unwrap(),
                    app_id: "A0TEST".into(),
                    bot_user_id: Some("U0BOTUSER".into()),
                    bot_token: Some(token.to_owned().into()),
                    refresh_token: None,
                    token_expires_at: None,
                    scopes: vec![],
                    installer: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
                    source: InstallSource::OAuth,
                },
                team,
                None,
            )
            .await
            .unwrap();
    }

    /// POSTs a signed body.
    async fn signed(
        &self,
        path: &str,
        content_type: &str,
        body: String,
        ts: i64,
    ) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .header("x-slack-request-timestamp", ts.to_string())
            .header(
                "x-slack-signature",
                sign(SECRET.as_bytes(), ts, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// A slash command's form, as Slack posts it.
    fn command_body(&self, team: &str, user: &str, text: &str, trigger: &str) -> String {
        serde_urlencoded::to_string([
            ("token", "ignored"),
            ("team_id", team),
            ("team_domain", "acme"),
            ("channel_id", "C0CHAN"),
            ("user_id", user),
            ("command", "/agentgate"),
            ("text", text),
            ("response_url", &format!("{}/respond", self.slack_url)),
            ("trigger_id", trigger),
        ])
        .unwrap()
    }

    /// Sends a slash command with a trigger id of its own.
    async fn command(&self, team: &str, user: &str, text: &str) -> reqwest::Response {
        static TRIGGERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = TRIGGERS.fetch_add(1, Ordering::SeqCst);
        self.command_with(team, user, text, &format!("13345224609.738474920.{n:x}"))
            .await
    }

    async fn command_with(
        &self,
        team: &str,
        user: &str,
        text: &str,
        trigger: &str,
    ) -> reqwest::Response {
        self.signed(
            "/slack/commands",
            "application/x-www-form-urlencoded",
            self.command_body(team, user, text, trigger),
            now(),
        )
        .await
    }

    async fn event(&self, team: &str, event_id: &str, event: Value) -> reqwest::Response {
        let body = json!({"type": "event_callback", "team_id": team, "api_app_id": "A0TEST", "event_id": event_id, "event_time": now(), "event": event});
        self.signed("/slack/events", "application/json", body.to_string(), now())
            .await
    }

    async fn events_of(&self, team: &str) -> Vec<Value> {
        let r = self.services.tenants.resolve(&WorkspaceRequest {
            identity: PlatformIdentity::Slack {
                enterprise_id: None,
                team_id: Some(team.into()),
            },
            user: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
            correlation_id: None,
            initiator: Initiator::User,
        });
        let ctx = match r {
            Ok(r) => r.ctx,
            Err(ResolveError::Revoked) => {
                let t = &self
                    .services
                    .store
                    .admin()
                    .tenants()
                    .unwrap()
                    .into_iter()
                    .find(|t| t.name == team)
                    .unwrap()
                    .id;
                self.services.tenants.operator_context(t).unwrap()
            }
            Err(e) => panic!("{e}"),
        };
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
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_slash_command_is_acknowledged_run_and_answered_through_response_url() {
    let app = spawn().await;
    app.install("T0ACME01", "xoxb-acme").await;
    let r = app
        .command_with(
            "T0ACME01",
            "U0MEMBER",
            "remember dog: Rex",
            "13345224609.738474920.8088930838d88f008e0",
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"response_type": "ephemeral", "text": "Working on it…"})
    );
    let answer = wait_for("the response_url answer", || {
        app.slack.responses.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(answer["text"], "Remembered that about dog.");
    assert_eq!(answer["response_type"], "in_channel");
    let ev = app.events_of("T0ACME01").await;
    let cmd = ev.iter().find(|e| e["type"] == "command.received").unwrap();
    assert_eq!(cmd["data"]["kind"], "slash_command");
    assert_eq!(cmd["principal"], "slack:U0MEMBER");
    assert_eq!(
        cmd["correlation_id"],
        "13345224609.738474920.8088930838d88f008e0"
    );
    assert!(
        !serde_json::to_string(&ev).unwrap().contains("Rex"),
        "the command text is logged as a hash"
    );
}

#[tokio::test]
async fn unknown_and_uninstalled_workspaces_get_a_helpful_message() {
    let app = spawn().await;
    let r: Value = app
        .command("T0NOBODY", "U1", "help")
        .await
        .json()
        .await
        .unwrap();
    assert!(r["text"].as_str().unwrap().contains("not installed"), "{r}");
    app.install("T0GONE01", "xoxb-gone").await;
    assert_eq!(
        app.event("T0GONE01", "Ev0UNINST", json!({"type": "app_uninstalled"}))
            .await
            .status(),
        200
    );
    let r: Value = app
        .command("T0GONE01", "U1", "help")
        .await
        .json()
        .await
        .unwrap();
    assert!(r["text"].as_str().unwrap().contains("uninstalled"), "{r}");
    let ev = app.events_of("T0GONE01").await;
    let revoked = ev
        .iter()
        .find(|e| e["type"] == "installation.revoked")
        .unwrap();
    assert_eq!(revoked["data"]["reason"], "uninstalled");
    // A mention after the uninstall runs nothing: the handler records a command before it answers,
    // and none was recorded after the revocation.
    let r = app.event("T0GONE01", "Ev0AFTER", json!({"type": "app_mention", "user": "U1", "text": "<@U0BOTUSER> help", "channel": "C1", "ts": "1.2"})).await;
    assert_eq!(r.status(), 200);
    assert!(
        !app.after_revocation("T0GONE01", "command.received").await,
        "nothing was run after the uninstall"
    );
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_oversized_bodies_are_refused() {
    let app = spawn().await;
    app.install("T0SIG01", "xoxb-sig").await;
    let body = "team_id=T0SIG01&user_id=U1&channel_id=C1&text=help&response_url=http%3A%2F%2F127.0.0.1%3A9%2Fx".to_owned();
    let bad = app
        .http
        .post(format!("{}/slack/commands", app.url))
        .header("x-slack-request-timestamp", now().to_string())
        .header("x-slack-signature", "v0=00")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(bad.text().await.unwrap(), "invalid request signature");
    let missing = app
        .http
        .post(format!("{}/slack/events", app.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let stale = app
        .signed(
            "/slack/commands",
            "application/x-www-form-urlencoded",
            body.clone(),
            now() - 301,
        )
        .await;
    assert_eq!(stale.status(), 401);
    let huge = app
        .signed(
            "/slack/events",
            "application/json",
            format!("{{\"type\":\"x\",\"pad\":\"{}\"}}", "a".repeat(70 * 1024)),
            now(),
        )
        .await;
    assert_eq!(huge.status(), 413);
    let malformed = app
        .signed(
            "/slack/events",
            "application/json",
            "{not json".into(),
            now(),
        )
        .await;
    assert_eq!(malformed.status(), 400);
    let ev = app.events_of("T0SIG01").await;
    assert!(
        !ev.iter().any(|e| e["type"] == "command.received"),
        "nothing ran"
    );
}

#[tokio::test]
async fn events_verify_the_url_answer_mentions_in_thread_and_never_run_a_retry_twice() {
    let app = spawn().await;
    app.install("T0EVT01", "xoxb-events").await;
    let r = app.signed("/slack/events", "application/json", json!({"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}).to_string(), now()).await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
    );

    let mention = json!({"type": "app_mention", "user": "U0M", "text": "<@U0BOTUSER> remember cat: Tom", "channel": "C0GEN", "ts": "1700000000.000100"});
    assert_eq!(
        app.event("T0EVT01", "Ev0MENTION1", mention.clone())
            .await
            .status(),
        200
    );
    let (auth, post) = wait_for("chat.postMessage", || {
        app.slack.posts.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(auth, "Bearer xoxb-events");
    assert_eq!(post["channel"], "C0GEN");
    assert_eq!(post["thread_ts"], "1700000000.000100");
    assert_eq!(post["text"], "Remembered that about cat.");
    // Slack retries the same delivery: nothing runs again.
    let retry = app
        .http
        .post(format!("{}/slack/events", app.url))
        .header("content-type", "application/json")
        .header("x-slack-retry-num", "1")
        .header("x-slack-retry-reason", "http_timeout");
    let body = json!({"type": "event_callback", "team_id": "T0EVT01", "event_id": "Ev0MENTION1", "event": mention}).to_string();
    let ts = now();
    let r = retry
        .header("x-slack-request-timestamp", ts.to_string())
        .header(
            "x-slack-signature",
            sign(SECRET.as_bytes(), ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.slack.posts.lock().unwrap().len(), 1);
    let ev = app.events_of("T0EVT01").await;
    assert_eq!(
        ev.iter()
            .filter(|e| e["type"] == "command.received")
            .count(),
        1
    );
    let r = app
        .signed(
            "/slack/interactions",
            "application/x-www-form-urlencoded",
            "payload=%7B%7D".into(),
            now(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_response_url_that_rate_limits_is_retried_after_its_retry_after() {
    let app = spawn().await;
    app.install("T0RATE01", "xoxb-rate").await;
    app.slack.response_status.lock().unwrap().push_back(429);
    let started = Instant::now();
    app.command("T0RATE01", "U1", "whoami").await;
    let answer = wait_for("the answer after a 429", || {
        app.slack.responses.lock().unwrap().first().cloned()
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(
        answer["text"],
        "You are slack:U1 with role member in T0RATE01."
    );
}

#[tokio::test]
async fn the_oauth_install_checks_state_and_cookie_and_stores_an_encrypted_installation() {
    let app = spawn().await;
    let r = app
        .http
        .get(format!("{}/slack/install", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Secure") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let nonce = cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], "1111.2222");
    assert_eq!(q["scope"], "app_mentions:read,chat:write,commands");
    assert_eq!(q["redirect_uri"], "http://localhost/slack/oauth_redirect");
    let state = q["state"].clone();

    let back = |code: &str, state: &str, cookie: Option<String>| {
        let mut req = app
            .http
            .get(format!("{}/slack/oauth_redirect", app.url))
            .query(&[("code", code), ("state", state)]);
        if let Some(c) = cookie {
            req = req.header("cookie", format!("agentgate_slack_oauth={c}"));
        }
        req.send()
    };
    // Another browser (no or a different cookie) cannot finish this install.
    let r = back("good-code", &state, Some("0".repeat(32)))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("another browser"));
    let r = back("good-code", &state, None).await.unwrap();
    assert_eq!(r.status(), 400);
    // A forged state.
    let r = back(
        "good-code",
        &format!("{nonce}.9999999999.00"),
        Some(nonce.clone()),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        app.services.store.admin().tenants().unwrap().is_empty(),
        "nothing was stored"
    );

    let r = back("good-code", &state, Some(nonce.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("installed in Acme"));
    let forms = app.slack.oauth_forms.lock().unwrap().clone();
    assert!(
        forms[0].0.starts_with("Basic "),
        "client credentials as HTTP basic auth"
    );
    assert!(forms[0].1.contains("code=good-code"));
    // The same state cannot be used twice.
    let r = back("good-code", &state, Some(nonce.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("already used"));

    let tenants = app.services.store.admin().tenants().unwrap();
    assert_eq!(tenants.len(), 1);
    assert_eq!(tenants[0].name, "Acme");
    let resolved = app
        .services
        .tenants
        .resolve(&WorkspaceRequest {
            identity: PlatformIdentity::Slack {
                enterprise_id: None,
                team_id: Some("T0OAUTH01".into()),
            },
            user: PrincipalId::qualified("slack", "U0INSTALLER").unwrap(),
            correlation_id: None,
            initiator: Initiator::User,
        })
        .unwrap();
    assert_eq!(
        resolved.ctx.role(),
        agentgate::tenant::Role::Owner,
        "the installer owns the tenant"
    );
    assert_eq!(
        resolved.installation.bot_user_id.as_deref(),
        Some("U0BOTUSER")
    );
    assert!(resolved.installation.refresh_token.is_some());

    // Denied installs and failed exchanges change nothing.
    let r = app
        .http
        .get(format!(
            "{}/slack/oauth_redirect?error=access_denied&state=x",
            app.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("cancelled"));
    let (state2, cookie2) = app.start_install().await;
    let r = back("bad-code", &state2, Some(cookie2)).await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("invalid_code"));
    assert_eq!(app.services.store.admin().tenants().unwrap().len(), 1);

    // Token rotation: the token expires within the margin, so it is refreshed before a reply.
    app.event("T0OAUTH01", "Ev0ROT", json!({"type": "app_mention", "user": "U0INSTALLER", "text": "<@U0BOTUSER> whoami", "channel": "C9", "ts": "5.6"})).await;
    let (auth, _) = wait_for("a reply with the rotated token", || {
        app.slack.posts.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(auth, "Bearer xoxe.xoxb-rotated");
    let forms = app.slack.oauth_forms.lock().unwrap().clone();
    assert!(forms
        .iter()
        .any(|(_, f)| f.contains("grant_type=refresh_token")
            && f.contains("refresh_token=xoxe-1-refresh-1")));
    let ev = app.events_of("T0OAUTH01").await;
    assert!(ev.iter().any(|e| e["type"] == "installation.updated"
        && e["data"]["changed"]
            .as_array()
            .unwrap()
            .contains(&json!("bot_token"))));
    assert!(
        !serde_json::to_string(&ev).unwrap().contains("xoxb"),
        "no token reaches the audit log"
    );
}

#[tokio::test]
async fn a_run_interrupted_by_a_crash_is_resumed_at_start_and_still_answers() {
    use agentgate::agent::state::{RunState, Status};
    // Before the restart: an accepted command whose run had not finished when the process died.
    let dir = tempfile::tempdir().unwrap();
    // The stand-in the restarted gateway talks to, whose response_url the command carried.
    let (slack, stand_in) = stand_in().await;
    {
        let s = Services::open(
            dir.path(),
            Some(&SecretString::from("42".repeat(32))),
            &AuditOptions::default(),
        )
        .unwrap();
        let t = s
            .tenants
            .install(
                NewInstallation {
                    workspace: Workspace::slack_team(None, "T0CRASH1").unwrap(),
                    app_id: "A0TEST".into(),
                    bot_user_id: None,
                    bot_token: None,
                    refresh_token: None,
                    token_expires_at: None,
                    scopes: vec![],
                    installer: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
                    source: InstallSource::OAuth,
                },
                "crashco",
                None,
            )
            .await
            .unwrap()
            .tenant;
        let op = s.tenants.operator_context(&t).unwrap();
        let st = RunState {
            v: 1,
            run_id: ulid::Ulid::new().to_string(),
            principal: "slack:U0WAITING".into(),
            conversation: "slack:C0CRASH".into(),
            correlation_id: None,
            started_at: chrono::Utc::now(),
            text: "whoami".into(),
            messages: vec![agentgate::agent::planner::Message::User {
                text: "whoami".into(),
            }]
            .into(),
            step: 0,
            pending: vec![],
            next_call: 0,
            in_flight: None,
            usage: Default::default(),
            status: Status::Running,
            // As a checkpoint written before reply targets were sealed has it (still read).
            reply_to: Some(
                json!({"platform": "slack", "kind": "response_url", "url": format!("{stand_in}/respond")}),
            ),
            reply_sealed: None,
            last_seq: None,
            counted_through: None,
        };
        s.store
            .for_tenant(&op)
            .unwrap()
            .runs()
            .put_run(&st.run_id, &serde_json::to_vec(&st).unwrap(), false)
            .unwrap();
        s.close().await.unwrap();
    }
    // The restart resumes the run and delivers its answer where the command came from.
    let _app = spawn_with(dir, slack.clone(), stand_in).await;
    let answer = wait_for("the resumed run's answer", || {
        slack.responses.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        answer["text"],
        "You are slack:U0WAITING with role member in crashco."
    );
}

impl App {
    /// Installs a workspace with token rotation on: its bot token expires `expires_in` seconds from
    /// now (negative: already expired).
    async fn install_rotating(&self, team: &str, expires_in: i64) {
        self.services
            .tenants
            .install(
                NewInstallation {
                    workspace: Workspace::slack_team(None, team).unwrap(),
                    app_id: "A0TEST".into(),
                    bot_user_id: Some("U0BOTUSER".into()),
                    bot_token: Some("xoxe.xoxb-old".to_owned().into()),
                    refresh_token: Some("xoxe-1-refresh-1".to_owned().into()),
                    token_expires_at: Some(
                        chrono::Utc::now() + chrono::Duration::seconds(expires_in),
                    ),
                    scopes: vec![],
                    installer: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
                    source: InstallSource::OAuth,
                },
                team,
                None,
            )
            .await
            .unwrap();
    }

    /// A Slack adapter over the application's services and this stand-in, to ask for a bot token
    /// directly (as a reply about to be delivered does).
    fn slack_state(&self) -> SlackState {
        self.slack_state_with("http://localhost/slack/oauth_redirect")
    }

    /// As `slack_state`, with the public URL's redirect given.
    fn slack_state_with(&self, redirect_url: &str) -> SlackState {
        SlackState::new(
            SlackConfig {
                signing_secret: SecretString::from(SECRET),
                api_url: format!("{}/api/", self.slack_url),
                oauth: Some(OAuthConfig {
                    client_id: "1111.2222".into(),
                    client_secret: SecretString::from("client-secret-x"),
                    scopes: "commands".into(),
                    authorize_url: format!("{}/authorize", self.slack_url),
                    redirect_url: redirect_url.into(),
                }),
            },
            Arc::new(agentgate::transport::SystemClock),
            self.services.tenants.clone(),
            self.services.agent.clone(),
            self.services.sink.clone(),
            self.services.state_key.clone(),
        )
        .unwrap()
    }

    fn resolve(&self, team: &str) -> Result<agentgate::tenant::Resolved, ResolveError> {
        self.services.tenants.resolve(&WorkspaceRequest {
            identity: PlatformIdentity::Slack {
                enterprise_id: None,
                team_id: Some(team.into()),
            },
            user: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
            correlation_id: None,
            initiator: Initiator::User,
        })
    }

    fn refreshes(&self) -> usize {
        self.slack
            .oauth_forms
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f.contains("grant_type=refresh_token"))
            .count()
    }
}

#[tokio::test]
async fn an_uninstall_during_a_token_refresh_is_not_undone_by_the_refresh() {
    let app = spawn().await;
    app.install_rotating("T0ROTREV", 60).await;
    let state = app.slack_state();
    let resolved = app.resolve("T0ROTREV").unwrap();
    app.slack.hold_refresh.store(true, Ordering::SeqCst);
    let token = tokio::spawn(async move { bot_token(&state, resolved).await });
    wait_for("the refresh to reach Slack", || {
        (app.refreshes() == 1).then_some(())
    })
    .await;
    // Slack says the app was uninstalled while its refresh answer is still on the way.
    let r = app
        .event(
            "T0ROTREV",
            "Ev0UNINSTROT",
            json!({"type": "app_uninstalled"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    app.slack.release_refresh.notify_one();
    let token = token.await.unwrap();
    assert!(
        token.is_none(),
        "no token of a revoked installation is used"
    );
    assert!(matches!(
        app.resolve("T0ROTREV"),
        Err(ResolveError::Revoked)
    ));
    assert!(
        !app.after_revocation("T0ROTREV", "installation.updated")
            .await,
        "nothing was stored after the revocation"
    );
    let t = app.services.store.admin().tenants().unwrap()[0].id.clone();
    let op = app.services.tenants.operator_context(&t).unwrap();
    let inst = &app
        .services
        .store
        .for_tenant(&op)
        .unwrap()
        .installations()
        .list()
        .unwrap()[0];
    assert!(!inst.is_active());
    assert!(inst.bot_token.is_none() && inst.refresh_token.is_none());
}

#[tokio::test]
async fn a_failed_refresh_uses_the_current_token_until_it_expires() {
    let app = spawn().await;
    app.slack.refuse_refresh.store(true, Ordering::SeqCst);
    let state = app.slack_state();
    // Within the refresh margin but not expired: the refresh fails, the current token still works.
    app.install_rotating("T0ROTOLD", 120).await;
    let token = bot_token(&state, app.resolve("T0ROTOLD").unwrap()).await;
    assert_eq!(app.refreshes(), 1, "a refresh was tried");
    assert_eq!(
        token.as_ref().map(|t| t.expose_secret().to_owned()),
        Some("xoxe.xoxb-old".to_owned())
    );
    // Expired: there is nothing to fall back on.
    app.install_rotating("T0ROTEXP", -5).await;
    let token = bot_token(&state, app.resolve("T0ROTEXP").unwrap()).await;
    assert_eq!(app.refreshes(), 2);
    assert!(token.is_none());
}

/// What [`FirstCommand`] does with the first command.received it sees.
#[derive(Clone, Copy)]
enum Then {
    /// Fails it, as a full disk would.
    Fail,
    /// Holds it until told to go on (`go`), having said so (`held`), then fails it.
    HoldThenFail,
    /// Records it, then reports that what follows the append failed, as a checkpoint that came
    /// due and could not be signed would.
    RecordThenFail,
    /// Panics, as a bug in the write path would.
    Panic,
}

/// An audit sink that passes every append through but does `then` with the first
/// command.received.
struct FirstCommand {
    inner: Arc<dyn AuditSink>,
    then: Then,
    first: std::sync::atomic::AtomicBool,
    held: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

impl FirstCommand {
    fn new(app: &App, then: Then) -> Arc<Self> {
        Arc::new(FirstCommand {
            inner: app.services.sink.clone(),
            then,
            first: true.into(),
            held: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
        })
    }
}

#[async_trait::async_trait]
impl AuditSink for FirstCommand {
    async fn append(&self, ctx: &TenantContext, body: EventBody) -> Result<u64, AuditError> {
        let first = matches!(body, EventBody::CommandReceived { .. })
            && self.first.swap(false, Ordering::SeqCst);
        if !first {
            return self.inner.append(ctx, body).await;
        }
        let full = || AuditError::Checkpoint("the disk is full".into());
        match self.then {
            Then::Fail => Err(full()),
            Then::HoldThenFail => {
                self.held.notify_one();
                self.go.notified().await;
                Err(full())
            }
            Then::RecordThenFail => {
                self.inner.append(ctx, body).await?;
                Err(AuditError::AfterDurable(Box::new(AuditError::Checkpoint(
                    "the checkpoint could not be signed".into(),
                ))))
            }
            Then::Panic => panic!("a bug while recording the command"),
        }
    }
}

/// A mention of the bot, event `event_id` of `team`, as Slack sends it.
fn mention(team: &str, event_id: &str) -> String {
    json!({"type": "event_callback", "team_id": team, "event_id": event_id, "event": {"type": "app_mention", "user": "U0M", "text": "<@U0BOTUSER> whoami", "channel": "C0R", "ts": "1.1"}}).to_string()
}

impl App {
    /// Serves a second Slack adapter over the application's services recording through `sink`;
    /// returns its base URL.
    async fn adapter_with(&self, sink: Arc<dyn AuditSink>) -> String {
        let config = SlackConfig {
            signing_secret: SecretString::from(SECRET),
            api_url: format!("{}/api/", self.slack_url),
            oauth: None,
        };
        let state = SlackState::new(
            config,
            Arc::new(agentgate::transport::SystemClock),
            self.services.tenants.clone(),
            self.services.agent.clone(),
            sink,
            self.services.state_key.clone(),
        )
        .unwrap();
        serve(agentgate::transport::slack::router(state)).await
    }

    /// POSTs a signed body to another base URL.
    async fn signed_to(&self, base: &str, path: &str, body: String) -> reqwest::Response {
        signed_json(&self.http, format!("{base}{path}"), body).await
    }

    /// Whether the workspace's log holds an event of type `ty` after its installation.revoked.
    async fn after_revocation(&self, team: &str, ty: &str) -> bool {
        let ev = self.events_of(team).await;
        let revoked = ev
            .iter()
            .position(|e| e["type"] == "installation.revoked")
            .expect("the installation was revoked");
        ev[revoked..].iter().any(|e| e["type"] == ty)
    }

    async fn commands_received(&self, team: &str) -> usize {
        self.events_of(team)
            .await
            .iter()
            .filter(|e| e["type"] == "command.received")
            .count()
    }
}

#[tokio::test]
async fn a_mention_that_could_not_be_recorded_runs_when_slack_retries_it() {
    let app = spawn().await;
    app.install("T0RETRY1", "xoxb-retry").await;
    let adapter = app.adapter_with(FirstCommand::new(&app, Then::Fail)).await;
    let body = mention("T0RETRY1", "Ev0RETRY1");
    let r = app.signed_to(&adapter, "/slack/events", body.clone()).await;
    assert_eq!(r.status(), 500, "Slack is told to retry");
    assert_eq!(app.commands_received("T0RETRY1").await, 0);
    // Slack's retry of the same event runs it, once.
    let r = app.signed_to(&adapter, "/slack/events", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.commands_received("T0RETRY1").await, 1);
    let (_, post) = wait_for("the answer", || {
        app.slack.posts.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        post["text"],
        "You are slack:U0M with role member in T0RETRY1."
    );
    let r = app.signed_to(&adapter, "/slack/events", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.commands_received("T0RETRY1").await,
        1,
        "a later retry does not run"
    );
}

/// POSTs a JSON body signed now, as Slack sends events.
async fn signed_json(http: &reqwest::Client, url: String, body: String) -> reqwest::Response {
    try_signed_json(http, url, body).await.unwrap()
}

/// [`signed_json`], for a request whose answer may not come (the connection dropped).
async fn try_signed_json(
    http: &reqwest::Client,
    url: String,
    body: String,
) -> reqwest::Result<reqwest::Response> {
    let ts = now();
    http.post(url)
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts.to_string())
        .header(
            "x-slack-signature",
            sign(SECRET.as_bytes(), ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
}

/// Slack retries a mention while its first delivery is still being recorded, and that record then
/// fails: the retry is asked to come back (503) rather than told the mention was handled, and the
/// retry after the failure runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_during_a_first_delivery_that_then_fails_is_asked_to_come_back() {
    let app = spawn().await;
    app.install("T0INFLT1", "xoxb-inflight").await;
    let sink = FirstCommand::new(&app, Then::HoldThenFail);
    let adapter = app.adapter_with(sink.clone()).await;
    let body = mention("T0INFLT1", "Ev0INFLT1");
    let first = {
        let (http, url, body) = (
            app.http.clone(),
            format!("{adapter}/slack/events"),
            body.clone(),
        );
        tokio::spawn(async move { signed_json(&http, url, body).await.status() })
    };
    tokio::time::timeout(Duration::from_secs(10), sink.held.notified())
        .await
        .expect("the first delivery is being recorded");
    let r = app.signed_to(&adapter, "/slack/events", body.clone()).await;
    assert_eq!(r.status(), 503, "the retry is asked to come back");
    sink.go.notify_one();
    assert_eq!(first.await.unwrap(), 500, "the first delivery failed");
    assert_eq!(app.commands_received("T0INFLT1").await, 0);
    let r = app.signed_to(&adapter, "/slack/events", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.commands_received("T0INFLT1").await,
        1,
        "the later retry ran"
    );
}

/// A command that is on record although what followed its append failed runs, and keeps its id:
/// Slack's retry is not recorded or run a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_record_runs_even_when_what_follows_its_append_fails() {
    let app = spawn().await;
    app.install("T0AFTER1", "xoxb-after").await;
    let adapter = app
        .adapter_with(FirstCommand::new(&app, Then::RecordThenFail))
        .await;
    let body = mention("T0AFTER1", "Ev0AFTER1");
    let r = app.signed_to(&adapter, "/slack/events", body.clone()).await;
    assert_eq!(r.status(), 200);
    let (_, post) = wait_for("the answer", || {
        app.slack.posts.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        post["text"],
        "You are slack:U0M with role member in T0AFTER1."
    );
    let r = app.signed_to(&adapter, "/slack/events", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.commands_received("T0AFTER1").await,
        1,
        "recorded and run once"
    );
}

/// A first delivery that panics while its command is recorded gives its id back: Slack's retry
/// runs the mention instead of being asked to come back for as long as the process lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_panics_gives_its_id_back() {
    let app = spawn().await;
    app.install("T0PANIC1", "xoxb-panic").await;
    let adapter = app.adapter_with(FirstCommand::new(&app, Then::Panic)).await;
    let body = mention("T0PANIC1", "Ev0PANIC1");
    // The handler's panic drops the connection: no answer to look at.
    let _ = try_signed_json(&app.http, format!("{adapter}/slack/events"), body.clone()).await;
    assert_eq!(app.commands_received("T0PANIC1").await, 0);
    let r = app.signed_to(&adapter, "/slack/events", body).await;
    assert_eq!(r.status(), 200, "the retry is not kept waiting");
    assert_eq!(app.commands_received("T0PANIC1").await, 1, "the retry ran");
}

#[tokio::test]
async fn a_mention_without_an_event_id_is_refused() {
    let app = spawn().await;
    app.install("T0NOID01", "xoxb-noid").await;
    // An id that is not a correlation id's shape could not be looked for in the log after a
    // crash: refused like a missing one.
    let long = "E".repeat(257);
    for id in [
        None,
        Some(""),
        Some("Ev/1"),
        Some("Ev 1"),
        Some(long.as_str()),
    ] {
        let mut body = json!({"type": "event_callback", "team_id": "T0NOID01", "event": {"type": "app_mention", "user": "U0M", "text": "<@U0BOTUSER> whoami", "channel": "C0R", "ts": "1.1"}});
        if let Some(id) = id {
            body["event_id"] = json!(id);
        }
        let r = app
            .signed("/slack/events", "application/json", body.to_string(), now())
            .await;
        assert_eq!(r.status(), 400);
    }
    assert_eq!(app.commands_received("T0NOID01").await, 0);
}

#[tokio::test]
async fn a_slash_command_sent_again_runs_once() {
    let app = spawn().await;
    app.install("T0REPLAY", "xoxb-replay").await;
    // The very same signed request, as a replay within the signature's five minutes sends it.
    let body = app.command_body("T0REPLAY", "U0M", "whoami", "1.2.replayed");
    let ts = now();
    let first = app
        .signed(
            "/slack/commands",
            "application/x-www-form-urlencoded",
            body.clone(),
            ts,
        )
        .await;
    let again = app
        .signed(
            "/slack/commands",
            "application/x-www-form-urlencoded",
            body,
            ts,
        )
        .await;
    assert_eq!(
        first.json::<Value>().await.unwrap()["text"],
        "Working on it…"
    );
    assert_eq!(
        again.json::<Value>().await.unwrap()["text"],
        "This command was already received."
    );
    wait_for("the answer", || {
        app.slack.responses.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(app.commands_received("T0REPLAY").await, 1);
    // Slack sends a trigger id with every command; one without cannot be told from its replay.
    let body = app
        .command_body("T0REPLAY", "U0M", "whoami", "")
        .replace("&trigger_id=", "&other=");
    let r = app
        .signed(
            "/slack/commands",
            "application/x-www-form-urlencoded",
            body,
            now(),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(app.commands_received("T0REPLAY").await, 1);
}

#[tokio::test]
async fn mentions_from_bots_are_not_run() {
    let app = spawn().await;
    app.install("T0BOTS01", "xoxb-bots").await;
    let base = json!({"type": "app_mention", "user": "U0OTHERBOT", "text": "<@U0BOTUSER> whoami", "channel": "C0B", "ts": "1.1"});
    let mut with_bot_id = base.clone();
    with_bot_id["bot_id"] = json!("B0OTHER");
    let mut bot_message = base.clone();
    bot_message["subtype"] = json!("bot_message");
    for (id, event) in [("Ev0BOT1", with_bot_id), ("Ev0BOT2", bot_message)] {
        assert_eq!(app.event("T0BOTS01", id, event).await.status(), 200);
    }
    // The handler records a command before it answers, so none was recorded for the bots.
    assert_eq!(app.commands_received("T0BOTS01").await, 0);
    app.event("T0BOTS01", "Ev0HUMAN", base).await;
    assert_eq!(app.commands_received("T0BOTS01").await, 1, "a user's is");
}

#[tokio::test]
async fn answers_are_escaped_so_they_cannot_notify_the_channel() {
    let app = spawn().await;
    app.install("T0ESC001", "xoxb-esc").await;
    // As Slack sends them: its own sequences as they are, what the user typed encoded.
    app.command("T0ESC001", "U0M", "remember <!channel> &amp; <@U0BOSS>: x")
        .await;
    let answer = wait_for("the response_url answer", || {
        app.slack.responses.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        answer["text"],
        "Remembered that about &lt;!channel&gt; &amp; &lt;@u0boss&gt;."
    );
    app.event("T0ESC001", "Ev0ESC", json!({"type": "app_mention", "user": "U0M", "text": "<@U0BOTUSER> remember <!here>: y", "channel": "C0E", "ts": "1.1"})).await;
    let (_, post) = wait_for("chat.postMessage", || {
        app.slack.posts.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(post["text"], "Remembered that about &lt;!here&gt;.");

    // What the user typed is what is kept, and an answer repeating it is escaped once.
    app.command(
        "T0ESC001",
        "U0M",
        "remember dog: Rex &amp; Co &lt;3 &amp;lt;b&amp;gt;",
    )
    .await;
    app.command("T0ESC001", "U0M", "recall dog").await;
    let answer = wait_for("the recall's answer", || {
        app.slack.responses.lock().unwrap().get(2).cloned()
    })
    .await;
    let text = answer["text"].as_str().unwrap();
    assert!(
        text.contains("Rex &amp; Co &lt;3 &amp;lt;b&amp;gt;"),
        "{text}"
    );
    assert!(!text.contains("&amp;amp; Co"), "escaped twice: {text}");
}

impl App {
    /// Starts an install: the state from Slack's authorize link and the browser's cookie nonce.
    async fn start_install(&self) -> (String, String) {
        let r = self
            .http
            .get(format!("{}/slack/install", self.url))
            .send()
            .await
            .unwrap();
        let nonce = r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .split_once('=')
            .unwrap()
            .1
            .to_owned();
        let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
        let state = location
            .query_pairs()
            .find(|(k, _)| k == "state")
            .unwrap()
            .1
            .into_owned();
        (state, nonce)
    }
}

#[tokio::test]
async fn oauth_error_pages_repeat_neither_the_link_nor_slacks_internals() {
    let app = spawn().await;
    let r = app
        .http
        .get(format!("{}/slack/oauth_redirect", app.url))
        .query(&[
            ("error", "Call +1 555 0100 to finish installing"),
            ("state", "x"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("Slack reported an error."), "{page}");
    assert!(!page.contains("555"), "{page}");
    for code in ["leaky-code", "html-code"] {
        let (state, nonce) = app.start_install().await;
        let r = app
            .http
            .get(format!("{}/slack/oauth_redirect", app.url))
            .query(&[("code", code), ("state", &state)])
            .header("cookie", format!("agentgate_slack_oauth={nonce}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let page = r.text().await.unwrap();
        assert!(page.contains("The exchange with Slack failed."), "{page}");
        assert!(
            !page.contains("db-7") && !page.contains("decoding"),
            "{page}"
        );
    }
}

#[tokio::test]
async fn the_install_cookie_follows_a_public_url_with_a_path() {
    let app = spawn().await;
    // The gateway behind a proxy that serves it under /agents: the browser sees /agents/slack/….
    let state = app.slack_state_with("https://example.com/agents/slack/oauth_redirect");
    let base = serve(agentgate::transport::slack::router(state)).await;
    let r = app
        .http
        .get(format!("{base}/slack/install"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("; Path=/agents/slack;"), "{cookie}");
    let nonce = cookie.split(';').next().unwrap().split_once('=').unwrap().1;
    let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let state = location
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let r = app
        .http
        .get(format!("{base}/slack/oauth_redirect"))
        .query(&[("code", "good-code"), ("state", &state)])
        .header("cookie", format!("agentgate_slack_oauth={nonce}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cleared = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("; Path=/agents/slack;"),
        "{cleared}"
    );
}

#[tokio::test]
async fn a_response_url_must_be_slacks_and_is_not_redirected() {
    let app = spawn().await;
    app.install("T0HOOK01", "xoxb-hook").await;
    let body = app
        .command_body("T0HOOK01", "U0M", "whoami", "1.2.hook")
        .replace(
            &serde_urlencoded::to_string([("response_url", format!("{}/respond", app.slack_url))])
                .unwrap(),
            "response_url=https%3A%2F%2Fhooks.evil.example%2Fcommands%2F1",
        );
    let r = app
        .signed(
            "/slack/commands",
            "application/x-www-form-urlencoded",
            body,
            now(),
        )
        .await;
    assert_eq!(r.status(), 400, "refused at intake");
    assert_eq!(app.commands_received("T0HOOK01").await, 0);
    // And before delivery, whatever the target says (it may come from an older checkpoint).
    let api = agentgate::transport::slack::api::SlackApi::new(&format!("{}/api/", app.slack_url))
        .unwrap();
    // Another port of the API base's host is another service.
    let other_port = {
        let mut u = url::Url::parse(&app.slack_url).unwrap();
        u.set_port(Some(u.port().unwrap().wrapping_add(1).max(1)))
            .unwrap();
        format!("{u}respond")
    };
    for url in [
        other_port.as_str(),
        "https://hooks.evil.example/commands/1",
        "http://hooks.slack.com/commands/1",
        "https://hooks.slack.com:8443/commands/1",
        "https://hooks.slack.com.evil.example/commands/1",
        "not a url",
    ] {
        assert!(!api.response_url_allowed(url), "{url}");
        assert!(api.respond(url, "hi").await.is_err(), "{url}");
    }
    assert!(api.response_url_allowed("https://hooks.slack.com/commands/T1/2/3"));
    // GovSlack's host, and nothing that merely ends like it.
    assert!(api.response_url_allowed("https://hooks.slack-gov.com/commands/T1/2/3"));
    assert!(!api.response_url_allowed("https://xhooks.slack-gov.com/commands/T1/2/3"));
    assert!(!api.response_url_allowed("https://hooks.slack-gov.com.evil.example/c"));
    // A redirect is not followed: the answer does not reach where it points.
    let r = api
        .respond(&format!("{}/redirect", app.slack_url), "hi")
        .await;
    assert!(r.is_err());
    assert!(app.slack.responses.lock().unwrap().is_empty());
}

/// In a channel shared with another organisation, a mention by one of its users arrives for the
/// host's installation; it runs nothing unless the user's own workspace is the same tenant.
#[tokio::test]
async fn a_mention_by_another_organisations_user_in_a_shared_channel_runs_nothing() {
    let app = spawn().await;
    app.install("T0HOST01", "xoxb-host").await;
    app.install("T0GUEST1", "xoxb-guest").await;
    let shared = |event_id: &str, user_team: Option<&str>| {
        let mut event = json!({"type": "app_mention", "user": "U0VISITOR", "text": "<@U0BOTUSER> remember k: v", "channel": "C0SHARED", "ts": "1.1"});
        if let Some(t) = user_team {
            event["user_team"] = json!(t);
        }
        json!({"type": "event_callback", "team_id": "T0HOST01", "api_app_id": "A0TEST",
            "event_id": event_id, "event_time": now(), "is_ext_shared_channel": true, "event": event})
        .to_string()
    };
    let url = format!("{}/slack/events", app.url);
    // An outsider whose workspace is not served, one whose workspace is another tenant, and an
    // event that does not say: none runs in the host's tenant.
    for (id, team) in [
        ("Ev0OUT1", Some("T0NOWHERE")),
        ("Ev0OUT2", Some("T0GUEST1")),
        ("Ev0OUT3", None),
    ] {
        let r = signed_json(&app.http, url.clone(), shared(id, team)).await;
        assert_eq!(r.status(), 200, "{id}");
    }
    assert_eq!(app.commands_received("T0HOST01").await, 0);
    assert_eq!(app.commands_received("T0GUEST1").await, 0);
    // The host's own member in the same shared channel runs as ever.
    let r = signed_json(&app.http, url, shared("Ev0HOME", Some("T0HOST01"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.commands_received("T0HOST01").await, 1);
}

/// A delivery that claimed its event id and died before confirming its record (a crash) leaves
/// the id pending: Slack's retry runs the command if it is not on record after the claim, and
/// runs nothing if it is.
#[tokio::test]
async fn a_retry_after_a_crash_between_claim_and_record_runs_once() {
    let app = spawn().await;
    app.install("T0CLAIM1", "xoxb-claim").await;
    let mention_of = |event_id: &str| json!({"type": "app_mention", "user": "U0M", "text": "<@U0BOTUSER> whoami", "channel": "C0C", "ts": "1.1", "event_id": event_id});
    let ctx_for = |event_id: &str| {
        app.services
            .tenants
            .resolve(&WorkspaceRequest {
                identity: PlatformIdentity::Slack {
                    enterprise_id: None,
                    team_id: Some("T0CLAIM1".into()),
                },
                user: PrincipalId::qualified("slack", "U0M").unwrap(),
                correlation_id: event_id.parse().ok(),
                initiator: Initiator::User,
            })
            .unwrap()
            .ctx
    };
    let size = |ctx: &TenantContext| {
        let repo = app.services.store.for_tenant(ctx).unwrap();
        let audit = app.services.audit.clone();
        let ctx = ctx.clone();
        async move { audit.head(&ctx, repo).await.unwrap().size }
    };
    // Claimed, then the process died before the command was recorded.
    let ctx = ctx_for("Ev0LOST1");
    let at = size(&ctx).await;
    let repo = app.services.store.for_tenant(&ctx).unwrap();
    assert_eq!(
        repo.dedupe().claim("slack-event:Ev0LOST1", at).unwrap(),
        agentgate::store::SeenClaim::First
    );
    app.event("T0CLAIM1", "Ev0LOST1", mention_of("Ev0LOST1"))
        .await;
    assert_eq!(
        app.commands_received("T0CLAIM1").await,
        1,
        "the retry ran it"
    );
    app.event("T0CLAIM1", "Ev0LOST1", mention_of("Ev0LOST1"))
        .await;
    assert_eq!(
        app.commands_received("T0CLAIM1").await,
        1,
        "and confirmed it"
    );

    // Claimed and recorded, then the process died before the run began (its `run.started`
    // waits for its first barrier): nothing would ever answer it, so the retry records and runs
    // it.
    let record = |ctx: TenantContext, body: EventBody| {
        let sink = app.services.sink.clone();
        async move { sink.append(&ctx, body).await.unwrap() }
    };
    let command = || EventBody::CommandReceived {
        platform: "slack".into(),
        kind: "app_mention".into(),
        text_sha256: "00".repeat(32),
    };
    let ctx = ctx_for("Ev0HALF1");
    let at = size(&ctx).await;
    assert_eq!(
        repo.dedupe().claim("slack-event:Ev0HALF1", at).unwrap(),
        agentgate::store::SeenClaim::First
    );
    record(ctx, command()).await;
    assert_eq!(app.commands_received("T0CLAIM1").await, 2);
    app.event("T0CLAIM1", "Ev0HALF1", mention_of("Ev0HALF1"))
        .await;
    assert_eq!(
        app.commands_received("T0CLAIM1").await,
        3,
        "recorded again, and run"
    );

    // Claimed, recorded and begun, then the process died before confirming: the run is the
    // restart's to resume, and the retry runs nothing.
    let ctx = ctx_for("Ev0DONE1");
    let at = size(&ctx).await;
    assert_eq!(
        repo.dedupe().claim("slack-event:Ev0DONE1", at).unwrap(),
        agentgate::store::SeenClaim::First
    );
    record(ctx.clone(), command()).await;
    record(
        ctx,
        EventBody::RunStarted {
            prompt_sha256: "00".repeat(32),
        },
    )
    .await;
    assert_eq!(app.commands_received("T0CLAIM1").await, 4);
    app.event("T0CLAIM1", "Ev0DONE1", mention_of("Ev0DONE1"))
        .await;
    assert_eq!(
        app.commands_received("T0CLAIM1").await,
        4,
        "begun: not run again"
    );
}
