//! A local stand-in Discord Gateway (HELLO, IDENTIFY, READY, GUILD_CREATE, MESSAGE_CREATE,
//! GUILD_DELETE over a WebSocket) plus the REST calls serenity makes, driving the real serenity
//! client inside the application: mention → run → reply → audit events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentgate::app::Application;
use agentgate::config::{AuditOptions, Config};
use agentgate::installation::{InstallSource, NewInstallation, Workspace};
use agentgate::tenant::PrincipalId;
use agentgate::transport::discord::DiscordConfig;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::{wait_for, APP_ID};

const BOT: &str = "800000000000000001";
const GUILD: &str = "300000000000000050";
const OTHER_GUILD: &str = "300000000000000051";
const CHANNEL: &str = "600000000000000050";

#[derive(Clone, Default)]
struct Rest {
    replies: Arc<Mutex<Vec<(String, HeaderMap, Value)>>>,
}

async fn create_message(
    State(r): State<Rest>,
    headers: HeaderMap,
    Path(channel): Path<String>,
    Json(body): Json<Value>,
) -> Json<Value> {
    r.replies
        .lock()
        .unwrap()
        .push((channel.clone(), headers, body.clone()));
    Json(message_json(
        "900000000000000999",
        &channel,
        BOT,
        true,
        body["content"].as_str().unwrap_or_default(),
        &[],
    ))
}

fn user(id: &str, bot: bool) -> Value {
    json!({"id": id, "username": format!("u{id}"), "discriminator": "0", "global_name": null, "avatar": null, "bot": bot})
}

fn message_json(
    id: &str,
    channel: &str,
    author: &str,
    bot: bool,
    content: &str,
    mentions: &[&str],
) -> Value {
    json!({
        "id": id, "channel_id": channel, "guild_id": GUILD, "author": user(author, bot), "content": content,
        "timestamp": "2026-11-22T10:00:00.000000+00:00", "edited_timestamp": null, "tts": false,
        "mention_everyone": false, "mentions": mentions.iter().map(|m| user(m, *m == BOT)).collect::<Vec<_>>(),
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0
    })
}

fn guild_json(id: &str, owner: &str) -> Value {
    json!({
        "id": id, "name": "Rustaceans", "owner_id": owner, "verification_level": 0, "default_message_notifications": 0,
        "explicit_content_filter": 0, "roles": [], "emojis": [], "features": [], "mfa_level": 0,
        "system_channel_flags": 0, "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0, "stickers": [],
        "premium_progress_bar_enabled": false, "joined_at": "2026-11-22T10:00:00.000000+00:00", "large": false,
        "member_count": 2, "voice_states": [], "members": [], "channels": [], "threads": [], "presences": [],
        "stage_instances": [], "guild_scheduled_events": [], "afk_timeout": 300, "icon": null, "splash": null,
        "discovery_splash": null, "afk_channel_id": null, "application_id": null, "system_channel_id": null,
        "rules_channel_id": null, "vanity_url_code": null, "description": null, "banner": null,
        "public_updates_channel_id": null, "max_video_channel_users": 25, "safety_alerts_channel_id": null
    })
}

/// Serves one gateway connection: HELLO, then READY and GUILD_CREATE after IDENTIFY, then whatever
/// the test pushes, answering heartbeats all along.
async fn gateway(
    listener: tokio::net::TcpListener,
    mut push: mpsc::UnboundedReceiver<Value>,
    identified: Arc<Mutex<Option<Value>>>,
) {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    ws.send(Ws::Text(
        json!({"op": 10, "d": {"heartbeat_interval": 45000}}).to_string(),
    ))
    .await
    .unwrap();
    let mut seq = 0u64;
    let mut frame = |t: &str, d: Value| {
        seq += 1;
        Ws::Text(json!({"op": 0, "t": t, "s": seq, "d": d}).to_string())
    };
    loop {
        tokio::select! {
            incoming = ws.next() => {
                let Some(Ok(msg)) = incoming else { return };
                let Ws::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text).unwrap();
                match v["op"].as_u64() {
                    Some(1) => ws.send(Ws::Text(json!({"op": 11}).to_string())).await.unwrap(),
                    Some(2) => {
                        *identified.lock().unwrap() = Some(v["d"].clone());
                        let ready = json!({
                            "v": 10, "user": user(BOT, true), "guilds": [{"id": GUILD, "unavailable": true}],
                            "session_id": "session-1", "resume_gateway_url": "ws://127.0.0.1:9", "shard": [0, 1],
                            "application": {"id": APP_ID, "flags": 0}
                        });
                        ws.send(frame("READY", ready)).await.unwrap();
                        ws.send(frame("GUILD_CREATE", guild_json(GUILD, "400000000000000050"))).await.unwrap();
                        ws.send(frame("GUILD_CREATE", guild_json(OTHER_GUILD, "400000000000000051"))).await.unwrap();
                    }
                    _ => {}
                }
            }
            pushed = push.recv() => {
                let Some(ev) = pushed else { return };
                let t = ev["t"].as_str().unwrap().to_owned();
                ws.send(frame(&t, ev["d"].clone())).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_mention_over_the_gateway_runs_and_is_answered_and_a_removal_revokes() {
    let rest = Rest::default();
    let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_url = format!("ws://{}", gw_listener.local_addr().unwrap());
    let router = Router::new()
        .route(
            "/api/v10/gateway",
            get(move || {
                let u = gw_url.clone();
                async move { Json(json!({"url": u})) }
            }),
        )
        .route("/api/v10/channels/{channel}/messages", post(create_message))
        .with_state(rest.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    let (push, pushed) = mpsc::unbounded_channel();
    let identified = Arc::new(Mutex::new(None));
    tokio::spawn(gateway(gw_listener, pushed, identified.clone()));

    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let config = Config {
        data_dir: dir.path().to_owned(),
        installations_dir: dir.path().join("none"),
        bind: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
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
            client_secret: None,
            bot_token: Some(SecretString::from("gateway-bot-token")),
            api_url: format!("{base}/api/v10"),
            authorize_url: format!("{base}/authorize"),
            permissions: "3072".into(),
            redirect_url: "http://localhost/discord/oauth_redirect".into(),
        }),
    };
    let app = Application::build(config).await.unwrap();
    let services = app.services().clone();
    services
        .tenants
        .install(
            NewInstallation {
                workspace: Workspace::discord_guild(GUILD).unwrap(),
                app_id: APP_ID.into(),
                bot_user_id: Some(BOT.into()),
                bot_token: None,
                refresh_token: None,
                token_expires_at: None,
                scopes: vec![],
                installer: PrincipalId::qualified("discord", "400000000000000050").unwrap(),
                source: InstallSource::OAuth,
            },
            "Rustaceans",
            None,
        )
        .await
        .unwrap();
    tokio::spawn(app.run_until_stopped(std::future::pending()));

    let identify = wait_for("IDENTIFY", || identified.lock().unwrap().clone()).await;
    assert_eq!(identify["token"], "Bot gateway-bot-token");
    let intents = identify["intents"].as_u64().unwrap();
    assert_eq!(
        intents,
        1 | (1 << 9),
        "GUILDS and GUILD_MESSAGES, no privileged message content"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A mention from a member runs and is answered in its channel.
    let mention = message_json(
        "900000000000000001",
        CHANNEL,
        "400000000000000060",
        false,
        &format!("<@{BOT}> remember ship: friday"),
        &[BOT],
    );
    push.send(json!({"t": "MESSAGE_CREATE", "d": mention.clone()}))
        .unwrap();
    let (channel, headers, body) = wait_for("the reply", || {
        rest.replies.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(channel, CHANNEL);
    assert_eq!(headers["authorization"], "Bot gateway-bot-token");
    assert_eq!(body["content"], "Remembered that about ship.");
    assert_eq!(
        body["message_reference"]["message_id"],
        "900000000000000001"
    );

    // The same message delivered again (a resume) does not run twice; bots and unmentioned messages are ignored.
    push.send(json!({"t": "MESSAGE_CREATE", "d": mention}))
        .unwrap();
    push.send(json!({"t": "MESSAGE_CREATE", "d": message_json("900000000000000002", CHANNEL, "800000000000000077", true, &format!("<@{BOT}> help"), &[BOT])})).unwrap();
    push.send(json!({"t": "MESSAGE_CREATE", "d": message_json("900000000000000003", CHANNEL, "400000000000000060", false, "just chatting", &[])})).unwrap();
    // The guild owner is an admin: audit.status is granted to admins.
    push.send(json!({"t": "MESSAGE_CREATE", "d": message_json("900000000000000004", CHANNEL, "400000000000000050", false, &format!("<@{BOT}> audit status"), &[BOT])})).unwrap();
    let (_, _, owner_reply) = wait_for("the owner's reply", || {
        rest.replies.lock().unwrap().get(1).cloned()
    })
    .await;
    assert!(
        owner_reply["content"]
            .as_str()
            .unwrap()
            .starts_with("Audit log: "),
        "{owner_reply}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rest.replies.lock().unwrap().len(),
        2,
        "one reply per distinct human mention"
    );

    let t = services.store.admin().tenants().unwrap()[0].id.clone();
    let op = services.tenants.operator_context(&t).unwrap();
    let repo = services.store.for_tenant(&op).unwrap();
    let head = services.audit.head(&op, repo.clone()).await.unwrap();
    let events: Vec<Value> = services
        .audit
        .read_range(&op, repo, 0, head.size)
        .await
        .unwrap()
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    let cmds: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "command.received")
        .collect();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0]["data"]["kind"], "mention");
    assert_eq!(cmds[0]["correlation_id"], "900000000000000001");
    assert!(events.iter().any(|e| e["type"] == "run.completed"));
    // The guild without an installation was not trusted as one.
    assert_eq!(services.store.admin().tenants().unwrap().len(), 1);

    // An outage is not a removal; a removal revokes.
    push.send(json!({"t": "GUILD_DELETE", "d": {"id": GUILD, "unavailable": true}}))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = services
        .tenants
        .resolve(&agentgate::tenant::WorkspaceRequest {
            identity: agentgate::installation::PlatformIdentity::Discord {
                guild_id: GUILD.into(),
            },
            user: PrincipalId::qualified("discord", "1").unwrap(),
            correlation_id: None,
            initiator: agentgate::tenant::Initiator::User,
        });
    assert!(still.is_ok(), "an unavailable guild stays installed");
    push.send(json!({"t": "GUILD_DELETE", "d": {"id": GUILD}}))
        .unwrap();
    wait_for("the revocation", || {
        let r = services
            .tenants
            .resolve(&agentgate::tenant::WorkspaceRequest {
                identity: agentgate::installation::PlatformIdentity::Discord {
                    guild_id: GUILD.into(),
                },
                user: PrincipalId::qualified("discord", "1").unwrap(),
                correlation_id: None,
                initiator: agentgate::tenant::Initiator::User,
            });
        matches!(r, Err(agentgate::tenant::ResolveError::Revoked)).then_some(())
    })
    .await;
}
