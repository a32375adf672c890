//! Discord: HTTP interactions (Ed25519-signed slash commands, answered with a deferred response and
//! a follow-up), the OAuth2 bot install, and slash-command registration.

pub mod api;
pub mod gateway;
pub mod signature;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ed25519_dalek::VerifyingKey;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

use self::api::DiscordApi;
use super::install_state::{
    accept_state, authorize_error, clear_cookie, cookie_path, make_state, page, set_cookie,
};
use super::{accept_once, Accepted, Clock, Command, Dedupe};
use crate::agent::Agent;
use crate::audit::AuditSink;
use crate::installation::{InstallSource, NewInstallation, PlatformIdentity, Workspace};
use crate::tenant::{Initiator, PrincipalId, ResolveError, Tenants, WorkspaceRequest};

/// The most an interaction body may be.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The Administrator permission bit.
const ADMINISTRATOR: u64 = 1 << 3;

/// The install cookie.
pub const COOKIE: &str = "agentgate_discord_oauth";

/// Discord settings.
#[derive(Clone, Debug)]
pub struct DiscordConfig {
    /// The application's public key, for interaction signatures.
    pub public_key: VerifyingKey,
    /// The application id (also the OAuth2 client id).
    pub application_id: String,
    /// The OAuth2 client secret; `None` turns `/discord/install` off.
    pub client_secret: Option<SecretString>,
    /// The bot token, for the Gateway and command registration.
    pub bot_token: Option<SecretString>,
    /// The REST base URL.
    pub api_url: String,
    /// The OAuth2 authorize URL.
    pub authorize_url: String,
    /// The bot permissions requested at install (a decimal bitfield).
    pub permissions: String,
    /// Our redirect URL, `<public URL>/discord/oauth_redirect`.
    pub redirect_url: String,
}

/// What Discord handlers reach.
#[derive(Clone)]
pub struct DiscordState {
    config: Arc<DiscordConfig>,
    clock: Arc<dyn Clock>,
    tenants: Tenants,
    agent: Agent,
    sink: Arc<dyn AuditSink>,
    api: DiscordApi,
    state_key: Arc<SecretString>,
    /// Interactions refused for a bad signature, for `/metrics`.
    pub signature_failures: Arc<AtomicU64>,
    /// Interaction ids seen before, so that a replayed interaction runs nothing twice.
    seen: Dedupe,
}

impl DiscordState {
    /// Builds the state.
    pub fn new(
        config: DiscordConfig,
        clock: Arc<dyn Clock>,
        tenants: Tenants,
        agent: Agent,
        sink: Arc<dyn AuditSink>,
        state_key: SecretString,
    ) -> Self {
        let api = DiscordApi::new(&config.api_url);
        DiscordState {
            seen: Dedupe::new(tenants.store().clone()),
            config: Arc::new(config),
            clock,
            tenants,
            agent,
            sink,
            api,
            state_key: Arc::new(state_key),
            signature_failures: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// The Discord routes.
pub fn router(state: DiscordState) -> Router {
    Router::new()
        .route("/discord/interactions", post(interactions))
        .route("/discord/install", get(install))
        .route("/discord/oauth_redirect", get(redirect))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// An interaction's reply visible only to its user.
fn ephemeral(text: &str) -> Response {
    Json(json!({"type": 4, "data": {"content": text, "flags": 64}})).into_response()
}

fn resolve_failure(e: &ResolveError) -> &'static str {
    match e {
        ResolveError::UnknownWorkspace | ResolveError::Malformed(_) => {
            "agentgate is not installed in this server yet. Ask a server admin to install it."
        }
        ResolveError::Revoked => "agentgate was removed from this server. Add it again to use it.",
        ResolveError::NotProvisioned(_) | ResolveError::Store(_) => {
            "agentgate could not look up this server right now. Please try again in a moment."
        }
    }
}

/// The text of the `/agentgate text:…` option.
fn command_text(data: &Value) -> String {
    data["options"]
        .as_array()
        .and_then(|opts| opts.iter().find(|o| o["name"] == "text"))
        .and_then(|o| o["value"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn interactions(
    State(state): State<DiscordState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    if let Err(e) = signature::verify(
        &state.config.public_key,
        h("x-signature-timestamp"),
        h("x-signature-ed25519"),
        &body,
        state.clock.now(),
    ) {
        state.signature_failures.fetch_add(1, Ordering::Relaxed);
        crate::metrics::inc(&crate::metrics::SIGNATURE_FAILURES);
        tracing::warn!(reason = %e, "refused a Discord interaction with a bad signature");
        return (StatusCode::UNAUTHORIZED, "invalid request signature").into_response();
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "malformed interaction").into_response();
    };
    match v["type"].as_u64() {
        Some(1) => return Json(json!({"type": 1})).into_response(),
        Some(2) => {}
        _ => return ephemeral("This kind of interaction is not supported."),
    }
    // A signed request can be sent again within the signature's five minutes: each interaction
    // runs at most once, by its id, which Discord sends with every one.
    let Some(interaction_id) = v["id"]
        .as_str()
        .filter(|i| i.parse::<crate::tenant::CorrelationId>().is_ok())
    else {
        return (StatusCode::BAD_REQUEST, "malformed interaction").into_response();
    };
    let Some(guild_id) = v["guild_id"].as_str() else {
        return ephemeral("Use agentgate in a server where it is installed.");
    };
    let member = &v["member"];
    let user_id = member["user"]["id"].as_str().unwrap_or_default();
    let Ok(user) = PrincipalId::qualified("discord", user_id) else {
        return (StatusCode::BAD_REQUEST, "malformed interaction").into_response();
    };
    let permissions: u64 = member["permissions"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let req = WorkspaceRequest {
        identity: PlatformIdentity::Discord {
            guild_id: guild_id.to_owned(),
        },
        user,
        correlation_id: interaction_id.parse().ok(),
        initiator: Initiator::User,
    };
    let resolved = match state
        .tenants
        .resolve_with(&req, permissions & ADMINISTRATOR != 0)
    {
        Ok(r) => r,
        Err(e) => return ephemeral(resolve_failure(&e)),
    };
    // The follow-up goes to our own application's webhook, whatever the payload names: the
    // interaction's token is only good there.
    let app_id = state.config.application_id.clone();
    // The token goes into the follow-up's path: one that could move it is refused here, before
    // anything is recorded, as Discord never sends one.
    let Some(token) = v["token"].as_str().filter(|t| api::segment_ok(t)) else {
        return (StatusCode::BAD_REQUEST, "malformed interaction").into_response();
    };
    let channel = v["channel_id"].as_str().unwrap_or_default();
    let cmd = Command {
        platform: "discord",
        kind: "interaction",
        text: command_text(&v["data"]),
        conversation: format!("discord:{channel}"),
    };
    let target = json!({"platform": "discord", "kind": "follow_up", "application_id": app_id, "token": token});
    let accepted = accept_once(
        &state.seen,
        &format!("discord-interaction:{interaction_id}"),
        &state.sink,
        &state.agent,
        resolved.ctx,
        cmd,
        target,
    )
    .await;
    match accepted {
        // Deferred: Discord shows "thinking…" until the follow-up arrives.
        Ok(Accepted::Started) => Json(json!({"type": 5})).into_response(),
        Ok(Accepted::AlreadySeen | Accepted::InFlight) => {
            ephemeral("This command was already received.")
        }
        Err(e) => {
            tracing::error!(error = %e, "could not record a Discord command");
            ephemeral("agentgate could not accept this command right now. Please try again.")
        }
    }
}

/// Delivers an answer to a Discord reply target written by this module or its gateway.
///
/// # Errors
/// A message for the log.
pub async fn deliver(state: &DiscordState, target: &Value, text: &str) -> Result<(), String> {
    let s = |k: &str| {
        target[k]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("no {k}"))
    };
    match target["kind"].as_str() {
        Some("follow_up") => state
            .api
            .follow_up(&s("application_id")?, &s("token")?, text)
            .await
            .map_err(|e| e.to_string()),
        Some("reply") => {
            let token = state.config.bot_token.as_ref().ok_or("no bot token")?;
            state
                .api
                .reply(token, &s("channel")?, &s("message")?, text)
                .await
                .map_err(|e| e.to_string())
        }
        _ => Err("unknown Discord reply target".into()),
    }
}

async fn install(State(state): State<DiscordState>) -> Response {
    if state.config.client_secret.is_none() {
        return page(
            StatusCode::NOT_FOUND,
            "Not available",
            "Installing from this page is not configured on this deployment.",
        );
    }
    let (st, nonce) = make_state(
        state.state_key.expose_secret().as_bytes(),
        state.clock.now(),
    );
    let mut url = match url::Url::parse(&state.config.authorize_url) {
        Ok(u) => u,
        Err(_) => {
            return page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Not available",
                "The authorize URL is misconfigured.",
            )
        }
    };
    url.query_pairs_mut()
        .append_pair("client_id", &state.config.application_id)
        .append_pair("scope", "bot applications.commands")
        .append_pair("permissions", &state.config.permissions)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", &state.config.redirect_url)
        .append_pair("state", &st);
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, url.to_string()),
            (
                header::SET_COOKIE,
                set_cookie(COOKIE, &nonce, &cookie_path(&state.config.redirect_url)),
            ),
        ],
    )
        .into_response()
}

/// The query Discord redirects back with.
#[derive(Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn redirect(
    State(state): State<DiscordState>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let fail = |status, text: &str| page(status, "agentgate was not added", text);
    let Some(secret) = state.config.client_secret.clone() else {
        return page(
            StatusCode::NOT_FOUND,
            "Not available",
            "Installing is not configured on this deployment.",
        );
    };
    if let Some(err) = q.error {
        return fail(StatusCode::BAD_REQUEST, &authorize_error("Discord", &err));
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "The link is missing its code or state.",
        );
    };
    if let Err((status, why)) = accept_state(
        state.tenants.store(),
        state.state_key.expose_secret().as_bytes(),
        &st,
        &headers,
        COOKIE,
        state.clock.now(),
        &format!(
            "{}/install",
            cookie_path(&state.config.redirect_url).trim_end_matches('/')
        ),
    ) {
        return fail(status, &why);
    }
    let answer = match state
        .api
        .exchange_code(
            &state.config.application_id,
            &secret,
            &code,
            &state.config.redirect_url,
        )
        .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "the Discord code exchange failed");
            return fail(StatusCode::BAD_GATEWAY, "The exchange with Discord failed.");
        }
    };
    // The guild in the token answer is the installation; the guild_id query parameter is only a hint.
    let Some(guild) = answer.guild.clone() else {
        return fail(
            StatusCode::BAD_GATEWAY,
            "Discord's answer named no server; add the bot with the bot scope.",
        );
    };
    let Ok(workspace) = Workspace::discord_guild(&guild.id) else {
        return fail(
            StatusCode::BAD_GATEWAY,
            "Discord named an invalid server id.",
        );
    };
    let installer = match state
        .api
        .user_id(&answer.access_token)
        .await
        .map(|id| PrincipalId::qualified("discord", &id))
    {
        Ok(Ok(p)) => p,
        _ => {
            return fail(
                StatusCode::BAD_GATEWAY,
                "Discord did not say who installed the bot.",
            )
        }
    };
    let name = guild
        .name
        .clone()
        .unwrap_or_else(|| workspace.directory_key());
    let new = NewInstallation {
        workspace,
        app_id: state.config.application_id.clone(),
        bot_user_id: None,
        // The application's one bot token serves every guild; it is configuration, not per install.
        bot_token: None,
        refresh_token: None,
        token_expires_at: None,
        scopes: answer.scope.split_whitespace().map(str::to_owned).collect(),
        installer,
        source: InstallSource::OAuth,
    };
    match state.tenants.install(new, &name, None).await {
        Ok(_) => {
            let mut r = page(
                StatusCode::OK,
                "agentgate was added",
                &format!("agentgate is now in {name}. Use /agentgate to start."),
            );
            r.headers_mut().insert(
                header::SET_COOKIE,
                clear_cookie(COOKIE, &cookie_path(&state.config.redirect_url))
                    .parse()
                    .expect("a valid header"),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store a Discord installation");
            fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The installation could not be stored; please try again.",
            )
        }
    }
}
