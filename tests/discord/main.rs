//! Discord end to end: Ed25519-signed interactions and the Gateway, against the real application on
//! port 0 with local stand-ins for Discord's REST API and Gateway.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate::app::{Application, Services};
use agentgate::config::{AuditOptions, Config};
use agentgate::installation::{InstallSource, NewInstallation, Workspace};
use agentgate::tenant::PrincipalId;
use agentgate::transport::discord::DiscordConfig;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ed25519_dalek::{Signer, SigningKey};
use secrecy::SecretString;
use serde_json::{json, Value};

mod gateway;

pub const APP_ID: &str = "200000000000000001";

#[derive(Clone, Default)]
struct Discord {
    follow_ups: Arc<Mutex<Vec<(String, Value)>>>,
    token_forms: Arc<Mutex<Vec<String>>>,
    commands: Arc<Mutex<Vec<(String, String, Value)>>>,
}

async fn follow_up(
    State(d): State<Discord>,
    Path((app, token)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Json<Value> {
    d.follow_ups
        .lock()
        .unwrap()
        .push((format!("{app}/{token}"), body.clone()));
    Json(json!({"id": "1", "content": body["content"]}))
}

async fn token(State(d): State<Discord>, body: String) -> Json<Value> {
    d.token_forms.lock().unwrap().push(body.clone());
    if body.contains("code=good") {
        Json(
            json!({"access_token": "user-access", "token_type": "Bearer", "scope": "bot applications.commands", "guild": {"id": "300000000000000001", "name": "Rustaceans", "owner_id": "400000000000000001"}}),
        )
    } else {
        Json(json!({"error": "invalid_grant"}))
    }
}

async fn me(headers: HeaderMap) -> Json<Value> {
    assert_eq!(headers["authorization"], "Bearer user-access");
    Json(json!({"id": "400000000000000001", "username": "ferris"}))
}

async fn commands(
    State(d): State<Discord>,
    headers: HeaderMap,
    Path(p): Path<Vec<(String, String)>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let auth = headers["authorization"].to_str().unwrap().to_owned();
    d.commands
        .lock()
        .unwrap()
        .push((format!("{p:?}"), auth, body.clone()));
    Json(body)
}

struct App {
    url: String,
    api: String,
    discord: Discord,
    services: Services,
    key: SigningKey,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn serve(router: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    format!("http://{a}")
}

async fn spawn() -> App {
    let discord = Discord::default();
    let base = serve(
        Router::new()
            .route("/api/webhooks/{app}/{token}", post(follow_up))
            .route("/api/oauth2/token", post(token))
            .route("/api/users/@me", get(me))
            .route("/api/applications/{app}/commands", put(commands))
            .route(
                "/api/applications/{app}/guilds/{guild}/commands",
                put(commands),
            )
            .with_state(discord.clone()),
    )
    .await;
    let api = format!("{base}/api");
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let dir = tempfile::tempdir().unwrap();
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
        slack: None,
        discord: Some(DiscordConfig {
            public_key: key.verifying_key(),
            application_id: APP_ID.into(),
            client_secret: Some(SecretString::from("discord-client-secret")),
            bot_token: Some(SecretString::from("bot-token")),
            api_url: api.clone(),
            authorize_url: format!("{base}/authorize"),
            permissions: "3072".into(),
            redirect_url: "http://localhost/discord/oauth_redirect".into(),
        }),
    };
    let app = Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let services = app.services().clone();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    App {
        url,
        api,
        discord,
        services,
        key,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        _dir: dir,
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl App {
    async fn install(&self, guild: &str) {
        self.services
            .tenants
            .install(
                NewInstallation {
                    workspace: Workspace::discord_guild(guild).unwrap(),
                    app_id: APP_ID.into(),
                    bot_user_id: None,
                    bot_token: None,
                    refresh_token: None,
                    token_expires_at: None,
                    scopes: vec![],
                    installer: PrincipalId::qualified("discord", "400000000000000009").unwrap(),
                    source: InstallSource::OAuth,
                },
                guild,
                None,
            )
            .await
            .unwrap();
    }

    async fn interaction_at(&self, body: &str, ts: i64, key: &SigningKey) -> reqwest::Response {
        let sig = hex::encode(
            key.sign(&[ts.to_string().as_bytes(), body.as_bytes()].concat())
                .to_bytes(),
        );
        self.http
            .post(format!("{}/discord/interactions", self.url))
            .header("content-type", "application/json")
            .header("x-signature-ed25519", sig)
            .header("x-signature-timestamp", ts.to_string())
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// The tenant's audit events, as the operator reads them.
    async fn events_of(&self, tenant: &agentgate::tenant::TenantId) -> Vec<Value> {
        let op = self.services.tenants.operator_context(tenant).unwrap();
        let repo = self.services.store.for_tenant(&op).unwrap();
        let head = self.services.audit.head(&op, repo.clone()).await.unwrap();
        self.services
            .audit
            .read_range(&op, repo, 0, head.size)
            .await
            .unwrap()
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    async fn interaction(&self, body: &Value) -> reqwest::Response {
        self.interaction_at(&body.to_string(), now(), &self.key)
            .await
    }
}

/// An interaction with an id of its own.
fn command(guild: &str, user: &str, permissions: &str, text: &str) -> Value {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = 500_000_000_000_000_001 + IDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    json!({
        "id": id.to_string(), "application_id": APP_ID, "type": 2, "token": "interaction-token-abc",
        "guild_id": guild, "channel_id": "600000000000000001",
        "member": {"user": {"id": user, "username": "u"}, "permissions": permissions},
        "data": {"id": "700000000000000001", "name": "agentgate", "type": 1, "options": [{"name": "text", "type": 3, "value": text}]}
    })
}

pub async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
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
async fn ping_command_and_follow_up() {
    let app = spawn().await;
    let r = app
        .interaction(&json!({"id": "1", "application_id": APP_ID, "type": 1, "token": "t"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"type": 1}));

    app.install("300000000000000002").await;
    let r = app
        .interaction(&command(
            "300000000000000002",
            "400000000000000005",
            "0",
            "remember ship: friday",
        ))
        .await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"type": 5}),
        "a deferred response within 3 s"
    );
    let (path, body) = wait_for("the follow-up", || {
        app.discord.follow_ups.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(path, format!("{APP_ID}/interaction-token-abc"));
    assert_eq!(body["content"], "Remembered that about ship.");

    // A member holding Administrator counts as an admin: audit.status is granted to admins.
    let r = app
        .interaction(&command(
            "300000000000000002",
            "400000000000000006",
            "8",
            "audit status",
        ))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"type": 5}));
    let (_, body) = wait_for("the admin's follow-up", || {
        app.discord.follow_ups.lock().unwrap().get(1).cloned()
    })
    .await;
    assert!(
        body["content"].as_str().unwrap().starts_with("Audit log: "),
        "{body}"
    );
    let r = app
        .interaction(&command(
            "300000000000000002",
            "400000000000000007",
            "2048",
            "audit status",
        ))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"type": 5}));
    let (_, body) = wait_for("the member's follow-up", || {
        app.discord.follow_ups.lock().unwrap().get(2).cloned()
    })
    .await;
    assert_eq!(body["content"], "You do not have access to audit.status.");
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_malformed_bodies_are_refused() {
    let app = spawn().await;
    let ping = json!({"type": 1}).to_string();
    // Discord probes with deliberately bad signatures: they must get 401.
    let other = SigningKey::from_bytes(&[1u8; 32]);
    assert_eq!(app.interaction_at(&ping, now(), &other).await.status(), 401);
    assert_eq!(
        app.interaction_at(&ping, now() - 301, &app.key)
            .await
            .status(),
        401
    );
    let r = app
        .http
        .post(format!("{}/discord/interactions", app.url))
        .body(ping.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        app.interaction_at("{not json", now(), &app.key)
            .await
            .status(),
        400
    );
    let huge = format!("{{\"type\":1,\"pad\":\"{}\"}}", "a".repeat(70 * 1024));
    assert_eq!(
        app.interaction_at(&huge, now(), &app.key).await.status(),
        413
    );
}

#[tokio::test]
async fn unknown_and_removed_guilds_get_an_ephemeral_message() {
    let app = spawn().await;
    let r: Value = app
        .interaction(&command(
            "300000000000000099",
            "400000000000000005",
            "0",
            "help",
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["type"], 4);
    assert_eq!(r["data"]["flags"], 64);
    assert!(r["data"]["content"]
        .as_str()
        .unwrap()
        .contains("not installed"));
    app.install("300000000000000003").await;
    app.services
        .tenants
        .revoke_workspace(
            &Workspace::discord_guild("300000000000000003").unwrap(),
            "removed",
        )
        .await
        .unwrap();
    let r: Value = app
        .interaction(&command(
            "300000000000000003",
            "400000000000000005",
            "0",
            "help",
        ))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        r["data"]["content"].as_str().unwrap().contains("removed"),
        "{r}"
    );
    // The handler records a command before it answers: none was recorded after the removal.
    let tenant = app.services.store.admin().tenants().unwrap()[0].id.clone();
    let events = app.events_of(&tenant).await;
    let revoked = events
        .iter()
        .position(|e| e["type"] == "installation.revoked")
        .unwrap();
    assert!(
        !events[revoked..]
            .iter()
            .any(|e| e["type"] == "command.received"),
        "nothing ran"
    );
}

#[tokio::test]
async fn the_oauth_install_uses_the_guild_in_the_token_answer() {
    let app = spawn().await;
    let r = app
        .http
        .get(format!("{}/discord/install", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
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
    let loc = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = loc.query_pairs().into_owned().collect();
    assert_eq!(q["scope"], "bot applications.commands");
    assert_eq!(q["permissions"], "3072");
    assert_eq!(q["client_id"], APP_ID);
    let back = |code: &str, guild_hint: &str| {
        app.http
            .get(format!("{}/discord/oauth_redirect", app.url))
            .query(&[
                ("code", code),
                ("state", q["state"].as_str()),
                ("guild_id", guild_hint),
            ])
            .header("cookie", format!("agentgate_discord_oauth={nonce}"))
            .send()
    };
    // The guild_id query parameter is a hint only: a forged one changes nothing.
    let r = back("good", "300000000000000777").await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let tenants = app.services.store.admin().tenants().unwrap();
    assert_eq!(tenants.len(), 1);
    assert_eq!(tenants[0].name, "Rustaceans");
    let op = app
        .services
        .tenants
        .operator_context(&tenants[0].id)
        .unwrap();
    let inst = &app
        .services
        .store
        .for_tenant(&op)
        .unwrap()
        .installations()
        .list()
        .unwrap()[0];
    assert_eq!(
        inst.workspace.directory_key(),
        "discord:guild:300000000000000001"
    );
    assert_eq!(inst.installer.as_str(), "discord:400000000000000001");
    let r = back("good", "").await.unwrap();
    assert_eq!(r.status(), 400, "a state is used once");
    let r = app
        .http
        .get(format!(
            "{}/discord/oauth_redirect?error=access_denied",
            app.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[test]
fn register_commands_puts_the_definitions_with_the_bot_token() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(spawn());
    let bin = env!("CARGO_BIN_EXE_agentgate");
    let out = std::process::Command::new(bin)
        .args([
            "discord",
            "register-commands",
            "--guild",
            "300000000000000001",
        ])
        .env("AGENTGATE_DISCORD_APPLICATION_ID", APP_ID)
        .env("AGENTGATE_DISCORD_BOT_TOKEN", "bot-token")
        .env("AGENTGATE_DISCORD_API_URL", &app.api)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("registered 1 command(s) in guild 300000000000000001"));
    let got = app.discord.commands.lock().unwrap().clone();
    assert_eq!(got[0].1, "Bot bot-token");
    assert_eq!(got[0].2[0]["name"], "agentgate");
    assert!(got[0].0.contains("300000000000000001"));
    let out = std::process::Command::new(bin)
        .args(["discord", "register-commands", "--guild", "not-a-guild"])
        .env("AGENTGATE_DISCORD_APPLICATION_ID", APP_ID)
        .env("AGENTGATE_DISCORD_BOT_TOKEN", "bot-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    drop(rt);
}

#[tokio::test]
async fn an_interaction_sent_again_runs_once() {
    let app = spawn().await;
    app.install("300000000000000004").await;
    // The very same signed request, as a replay within the signature's five minutes sends it.
    let body = command("300000000000000004", "400000000000000005", "0", "whoami").to_string();
    let ts = now();
    let first = app.interaction_at(&body, ts, &app.key).await;
    let again = app.interaction_at(&body, ts, &app.key).await;
    assert_eq!(first.json::<Value>().await.unwrap(), json!({"type": 5}));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["type"], 4, "{again}");
    assert_eq!(
        again["data"]["content"],
        "This command was already received."
    );
    wait_for("the follow-up", || {
        app.discord.follow_ups.lock().unwrap().first().cloned()
    })
    .await;
    let tenant = app.services.store.admin().tenants().unwrap()[0].id.clone();
    let received = app
        .events_of(&tenant)
        .await
        .iter()
        .filter(|e| e["type"] == "command.received")
        .count();
    assert_eq!(received, 1);
    // Discord sends an id with every interaction; one without cannot be told from its replay.
    let mut no_id = command("300000000000000004", "400000000000000005", "0", "whoami");
    no_id.as_object_mut().unwrap().remove("id");
    assert_eq!(app.interaction(&no_id).await.status(), 400);
}

#[tokio::test]
async fn an_oauth_error_page_does_not_repeat_the_links_text() {
    let app = spawn().await;
    let r = app
        .http
        .get(format!("{}/discord/oauth_redirect", app.url))
        .query(&[("error", "Call +1 555 0100 to finish installing")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("Discord reported an error."), "{page}");
    assert!(!page.contains("555"), "{page}");
}

#[tokio::test]
async fn the_install_cookie_follows_a_public_url_with_a_path() {
    let app = spawn().await;
    // The gateway behind a proxy that serves it under /agents: the browser sees /agents/discord/….
    let state = agentgate::transport::discord::DiscordState::new(
        DiscordConfig {
            public_key: app.key.verifying_key(),
            application_id: APP_ID.into(),
            client_secret: Some(SecretString::from("discord-client-secret")),
            bot_token: None,
            api_url: app.api.clone(),
            authorize_url: format!("{}/authorize", app.api),
            permissions: "3072".into(),
            redirect_url: "https://example.com/agents/discord/oauth_redirect".into(),
        },
        Arc::new(agentgate::transport::SystemClock),
        app.services.tenants.clone(),
        app.services.agent.clone(),
        app.services.sink.clone(),
        app.services.state_key.clone(),
    );
    let base = serve(agentgate::transport::discord::router(state)).await;
    let r = app
        .http
        .get(format!("{base}/discord/install"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("; Path=/agents/discord;"), "{cookie}");
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
        .get(format!("{base}/discord/oauth_redirect"))
        .query(&[("code", "good"), ("state", &state)])
        .header("cookie", format!("agentgate_discord_oauth={nonce}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cleared = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("; Path=/agents/discord;"),
        "{cleared}"
    );
}

#[tokio::test]
async fn the_follow_up_goes_to_the_configured_application() {
    let app = spawn().await;
    app.install("300000000000000005").await;
    let mut cmd = command("300000000000000005", "400000000000000005", "0", "whoami");
    cmd["application_id"] = json!("299999999999999999");
    let r = app.interaction(&cmd).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"type": 5}));
    let (path, _) = wait_for("the follow-up", || {
        app.discord.follow_ups.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(path, format!("{APP_ID}/interaction-token-abc"));
}

#[tokio::test]
async fn an_interaction_whose_token_would_move_the_follow_up_path_is_refused() {
    let app = spawn().await;
    app.install("300000000000000011").await;
    let tenant = app.services.store.admin().tenants().unwrap()[0].id.clone();
    let before = app.events_of(&tenant).await.len();
    for token in ["../../users/@me", "t?x=1", "", "t#x"] {
        let mut c = command("300000000000000011", "400000000000000005", "0", "whoami");
        c["token"] = json!(token);
        assert_eq!(app.interaction(&c).await.status(), 400, "{token:?}");
    }
    let mut c = command("300000000000000011", "400000000000000005", "0", "whoami");
    c.as_object_mut().unwrap().remove("token");
    assert_eq!(app.interaction(&c).await.status(), 400);
    // Nothing was recorded or run, and nothing was posted anywhere.
    assert_eq!(app.events_of(&tenant).await.len(), before);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(app.discord.follow_ups.lock().unwrap().is_empty());
}
