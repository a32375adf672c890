//! Slack: signed slash commands, Events API callbacks (app mentions, uninstalls, revoked tokens),
//! interactions, and the OAuth v2 multi-workspace install with token rotation.
//!
//! Routes sit at Slack Bolt's conventional paths. Every request body is limited to 64 KiB and its
//! signature is checked on the raw bytes before anything is parsed.

pub mod api;
pub mod oauth;
pub mod signature;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

use self::api::SlackApi;
use super::{accept_once, Accepted, Clock, Command, Dedupe};
use crate::agent::Agent;
use crate::audit::AuditSink;
use crate::installation::{Installation, PlatformIdentity, Workspace};
use crate::tenant::{
    Initiator, PrincipalId, ResolveError, Resolved, TenantId, Tenants, WorkspaceRequest,
};

/// The most a Slack request body may be.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Slack settings.
#[derive(Clone, Debug)]
pub struct SlackConfig {
    /// The app's signing secret.
    pub signing_secret: SecretString,
    /// The Web API base URL.
    pub api_url: String,
    /// OAuth install settings; `None` turns `/slack/install` off.
    pub oauth: Option<oauth::OAuthConfig>,
}

/// What Slack handlers reach.
#[derive(Clone)]
pub struct SlackState {
    config: Arc<SlackConfig>,
    clock: Arc<dyn Clock>,
    tenants: Tenants,
    agent: Agent,
    sink: Arc<dyn AuditSink>,
    api: SlackApi,
    /// Requests refused for a bad signature, for `/metrics`.
    pub signature_failures: Arc<AtomicU64>,
    state_key: Arc<SecretString>,
    /// Event and trigger ids seen before, so that retries and replays run nothing twice.
    seen: Dedupe,
}

impl SlackState {
    /// Builds the state.
    ///
    /// # Errors
    /// When the HTTPS client cannot load the system's root certificates.
    pub fn new(
        config: SlackConfig,
        clock: Arc<dyn Clock>,
        tenants: Tenants,
        agent: Agent,
        sink: Arc<dyn AuditSink>,
        state_key: SecretString,
    ) -> std::io::Result<Self> {
        let api = SlackApi::new(&config.api_url)?;
        let seen = Dedupe::new(tenants.store().clone());
        Ok(SlackState {
            seen,
            config: Arc::new(config),
            clock,
            tenants,
            agent,
            sink,
            api,
            signature_failures: Arc::new(AtomicU64::new(0)),
            state_key: Arc::new(state_key),
        })
    }
}

/// The Slack routes.
pub fn router(state: SlackState) -> Router {
    Router::new()
        .route("/slack/commands", post(commands))
        .route("/slack/events", post(events))
        .route("/slack/interactions", post(interactions))
        .route("/slack/install", get(oauth::install))
        .route("/slack/oauth_redirect", get(oauth::redirect))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn unauthorized(state: &SlackState, why: signature::SignatureError) -> Response {
    state.signature_failures.fetch_add(1, Ordering::Relaxed);
    crate::metrics::inc(&crate::metrics::SIGNATURE_FAILURES);
    tracing::warn!(reason = %why, "refused a Slack request with a bad signature");
    (StatusCode::UNAUTHORIZED, "invalid request signature").into_response()
}

fn check(state: &SlackState, headers: &HeaderMap, body: &[u8]) -> Result<(), Box<Response>> {
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    signature::verify(
        state.config.signing_secret.expose_secret().as_bytes(),
        h("x-slack-request-timestamp"),
        h("x-slack-signature"),
        body,
        state.clock.now(),
    )
    .map_err(|e| Box::new(unauthorized(state, e)))
}

fn ephemeral(text: &str) -> Response {
    Json(json!({"response_type": "ephemeral", "text": text})).into_response()
}

/// What a user is told when their workspace cannot be served.
fn resolve_failure(e: &ResolveError) -> &'static str {
    match e {
        ResolveError::UnknownWorkspace | ResolveError::Malformed(_) => {
            "agentgate is not installed in this workspace yet. Ask a workspace admin to install it."
        }
        ResolveError::Revoked => {
            "agentgate was uninstalled from this workspace. Reinstall it to use it again."
        }
        ResolveError::NotProvisioned(_) | ResolveError::Store(_) => {
            "agentgate could not look up this workspace right now. Please try again in a moment."
        }
    }
}

/// The slash command form Slack posts.
#[derive(Deserialize)]
struct CommandForm {
    team_id: Option<String>,
    enterprise_id: Option<String>,
    channel_id: String,
    user_id: String,
    #[serde(default)]
    text: String,
    response_url: String,
    trigger_id: Option<String>,
}

fn identity(enterprise_id: Option<String>, team_id: Option<String>) -> PlatformIdentity {
    PlatformIdentity::Slack {
        enterprise_id: enterprise_id.filter(|s| !s.is_empty()),
        team_id: team_id.filter(|s| !s.is_empty()),
    }
}

fn request(
    identity: PlatformIdentity,
    user: &str,
    correlation: Option<&str>,
) -> Option<WorkspaceRequest> {
    Some(WorkspaceRequest {
        identity,
        user: PrincipalId::qualified("slack", user).ok()?,
        correlation_id: correlation.and_then(|c| c.parse().ok()),
        initiator: Initiator::User,
    })
}

async fn commands(State(state): State<SlackState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = check(&state, &headers, &body) {
        return *r;
    }
    let Ok(form) = serde_urlencoded::from_bytes::<CommandForm>(&body) else {
        return (StatusCode::BAD_REQUEST, "malformed slash command").into_response();
    };
    // A signed request can be sent again within the signature's five minutes: each slash command
    // runs at most once, by its trigger id, which Slack sends with every one.
    // It is also the command's correlation id, by which a retry after a crash finds whether the
    // command was recorded: one that is not a correlation id's shape is refused like a missing one.
    let Some(trigger_id) = form
        .trigger_id
        .filter(|t| t.parse::<crate::tenant::CorrelationId>().is_ok())
    else {
        return (StatusCode::BAD_REQUEST, "slash command without trigger_id").into_response();
    };
    if !state.api.response_url_allowed(&form.response_url) {
        tracing::warn!("refused a slash command whose response_url is not Slack's");
        return (StatusCode::BAD_REQUEST, "the response_url is not Slack's").into_response();
    }
    let Some(req) = request(
        identity(form.enterprise_id, form.team_id),
        &form.user_id,
        Some(&trigger_id),
    ) else {
        return (StatusCode::BAD_REQUEST, "malformed user id").into_response();
    };
    let resolved = match state.tenants.resolve(&req) {
        Ok(r) => r,
        Err(e) => return ephemeral(resolve_failure(&e)),
    };
    let cmd = Command {
        platform: "slack",
        kind: "slash_command",
        text: api::unescape(&form.text),
        conversation: format!("slack:{}", form.channel_id),
    };
    let target = json!({"platform": "slack", "kind": "response_url", "url": form.response_url});
    let accepted = accept_once(
        &state.seen,
        &format!("slack-command:{trigger_id}"),
        &state.sink,
        &state.agent,
        resolved.ctx,
        cmd,
        target,
    )
    .await;
    match accepted {
        Ok(Accepted::Started) => ephemeral("Working on it…"),
        Ok(Accepted::AlreadySeen | Accepted::InFlight) => {
            ephemeral("This command was already received.")
        }
        Err(e) => {
            tracing::error!(error = %e, "could not record a slash command");
            ephemeral("agentgate could not accept this command right now. Please try again.")
        }
    }
}

/// Strips a leading bot mention (`<@U123> do this` → `do this`).
fn strip_mention(text: &str) -> &str {
    let t = text.trim_start();
    match t.strip_prefix("<@").and_then(|r| r.split_once('>')) {
        Some((_, rest)) => rest.trim(),
        None => t.trim(),
    }
}

async fn events(State(state): State<SlackState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = check(&state, &headers, &body) {
        return *r;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "malformed event").into_response();
    };
    match v["type"].as_str() {
        Some("url_verification") => {
            return Json(json!({"challenge": v["challenge"]})).into_response();
        }
        Some("event_callback") => {}
        _ => return StatusCode::OK.into_response(),
    }
    let s = |x: &Value| x.as_str().map(str::to_owned);
    let ident = identity(s(&v["enterprise_id"]), s(&v["team_id"]));
    let event = &v["event"];
    match event["type"].as_str() {
        Some("app_uninstalled") => revoke(&state, &ident, "uninstalled").await,
        Some("tokens_revoked") => {
            let bot_revoked = event["tokens"]["bot"]
                .as_array()
                .is_some_and(|b| !b.is_empty());
            if bot_revoked {
                revoke(&state, &ident, "tokens_revoked").await;
            }
        }
        Some("app_mention") => {
            // A bot's message mentioning us (another bot, an integration, or our own answer
            // quoting a mention) is not a user's command: answering it could loop between bots.
            let from_bot = !event["bot_id"].is_null() || event["subtype"] == "bot_message";
            if from_bot {
                return StatusCode::OK.into_response();
            }
            // Slack retries a delivery it thinks failed, and a signed request can be sent again
            // within the signature's five minutes: each event runs at most once, by its id. Slack
            // always sends one; an event without it could not be told from its own retry.
            let Some(event_id) = v["event_id"]
                .as_str()
                .filter(|id| id.parse::<crate::tenant::CorrelationId>().is_ok())
            else {
                return (StatusCode::BAD_REQUEST, "event without event_id").into_response();
            };
            let user = event["user"].as_str().unwrap_or_default();
            let Some(req) = request(ident, user, Some(event_id)) else {
                return StatusCode::OK.into_response();
            };
            let resolved = match state.tenants.resolve(&req) {
                Ok(r) => r,
                // Nothing can be answered in a workspace we do not serve.
                Err(_) => return StatusCode::OK.into_response(),
            };
            if !member_of_tenant(&state, &v, user, resolved.ctx.tenant_id()) {
                tracing::info!(tenant = %resolved.ctx.tenant_id(), "ignored a mention by a user of another workspace in a shared channel");
                return StatusCode::OK.into_response();
            }
            let channel = event["channel"].as_str().unwrap_or_default().to_owned();
            let ts = s(&event["thread_ts"]).or_else(|| s(&event["ts"]));
            let cmd = Command {
                platform: "slack",
                kind: "app_mention",
                text: api::unescape(strip_mention(event["text"].as_str().unwrap_or_default())),
                conversation: match &ts {
                    Some(ts) => format!("slack:{channel}:{ts}"),
                    None => format!("slack:{channel}"),
                },
            };
            let target = json!({
                "platform": "slack",
                "kind": "thread",
                "installation": resolved.installation.id.to_string(),
                "channel": channel,
                "thread_ts": ts,
            });
            let accepted = accept_once(
                &state.seen,
                &format!("slack-event:{event_id}"),
                &state.sink,
                &state.agent,
                resolved.ctx,
                cmd,
                target,
            )
            .await;
            match accepted {
                Ok(Accepted::Started | Accepted::AlreadySeen) => {}
                // Slack retried while the first delivery was still being recorded, which may yet
                // fail: asked to retry later instead of being told it was handled.
                Ok(Accepted::InFlight) => {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not record a Slack mention");
                    // Slack retries it, and the retry runs: its id was released.
                    return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                }
            }
        }
        _ => {}
    }
    StatusCode::OK.into_response()
}

/// Whether the user of an event belongs to `tenant`. In a channel shared with another
/// organisation (Slack Connect: `is_ext_shared_channel`), an event is delivered to the host
/// workspace's installation for every member, outsiders included, and resolving the host
/// workspace would give an outsider the host tenant's default role: its tools, its memory, its
/// quota. So there the user's own workspace (`event.user_team`) must resolve, by itself, to the
/// same tenant; an event that does not say which workspace its user belongs to runs nothing. This
/// is the fail-closed reading until outsiders get a role of their own.
fn member_of_tenant(state: &SlackState, v: &Value, user: &str, tenant: &TenantId) -> bool {
    if v["is_ext_shared_channel"] != true {
        return true;
    }
    let Some(user_team) = v["event"]["user_team"].as_str().filter(|t| !t.is_empty()) else {
        return false;
    };
    if v["team_id"].as_str() == Some(user_team) {
        return true;
    }
    request(identity(None, Some(user_team.to_owned())), user, None)
        .and_then(|req| state.tenants.resolve(&req).ok())
        .is_some_and(|r| r.ctx.tenant_id() == tenant)
}

async fn revoke(state: &SlackState, identity: &PlatformIdentity, reason: &str) {
    let Ok(candidates) = identity.candidates() else {
        return;
    };
    for ws in candidates {
        match state.tenants.revoke_workspace(&ws, reason).await {
            Ok(_) => {
                tracing::info!(workspace = %ws, reason, "Slack installation revoked");
                return;
            }
            Err(crate::tenant::ProvisionError::UnknownWorkspace(_)) => continue,
            Err(e) => {
                tracing::error!(workspace = %ws, error = %e, "could not revoke a Slack installation");
                return;
            }
        }
    }
}

async fn interactions(
    State(state): State<SlackState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = check(&state, &headers, &body) {
        return *r;
    }
    // Interactive components are not handled yet: an empty 200 tells Slack not to retry.
    StatusCode::OK.into_response()
}

/// How close to expiry a rotating token is refreshed before use.
const REFRESH_MARGIN_SECS: i64 = 300;

/// The installation's bot token, refreshed first when token rotation is on and it is about to
/// expire. `None` when there is no usable token (none stored, revoked, or the refresh failed after
/// the token expired).
async fn fresh_token(
    state: &SlackState,
    ctx: &crate::tenant::TenantContext,
    inst: Installation,
) -> Option<SecretString> {
    if !inst.is_active() {
        return None;
    }
    let now = chrono::Utc::now();
    let soon = inst
        .token_expires_at
        .is_some_and(|at| (at - now).num_seconds() < REFRESH_MARGIN_SECS);
    if !soon {
        return inst.bot_token;
    }
    let (Some(refresh), Some(oauth)) = (inst.refresh_token.as_ref(), state.config.oauth.as_ref())
    else {
        return inst.bot_token;
    };
    // Refreshing starts a few minutes early: while the current token has not expired, a refresh
    // that fails (Slack down, rate-limited) can still be answered with it.
    let current = inst
        .bot_token
        .clone()
        .filter(|_| inst.token_expires_at.is_some_and(|at| at > now));
    let access = match state
        .api
        .refresh(&oauth.client_id, &oauth.client_secret, refresh)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, still_valid = current.is_some(), "could not refresh a rotating Slack token");
            return current;
        }
    };
    let Some(token) = access.access_token.map(SecretString::from) else {
        tracing::warn!("Slack's token refresh answer had no access token");
        return current;
    };
    let stored = state
        .tenants
        .store_rotated_tokens(
            &inst,
            token.clone(),
            access.refresh_token.map(SecretString::from),
            access
                .expires_in
                .map(|s| chrono::Utc::now() + chrono::Duration::seconds(s)),
        )
        .await;
    match stored {
        Ok(true) => Some(token),
        // Revoked while the refresh was under way, or another refresh stored a newer pair first:
        // what is stored now decides.
        Ok(false) => {
            let now_stored = state
                .tenants
                .store()
                .for_tenant(ctx)
                .ok()?
                .installations()
                .get(&inst.id)
                .ok()??;
            if now_stored.is_active() {
                now_stored.bot_token
            } else {
                tracing::info!(installation = %inst.id, "a Slack token refresh finished after the installation was revoked; its tokens were dropped");
                None
            }
        }
        // Not recorded, so not known to be unrevoked: fail closed.
        Err(e) => {
            tracing::error!(error = %e, "could not store a rotated Slack token");
            None
        }
    }
}

/// Delivers an answer to a Slack reply target written by this module.
///
/// # Errors
/// A message for the log.
pub async fn deliver(
    state: &SlackState,
    ctx: &crate::tenant::TenantContext,
    target: &Value,
    text: &str,
) -> Result<(), String> {
    let s = |k: &str| target[k].as_str().map(str::to_owned);
    match target["kind"].as_str() {
        Some("response_url") => {
            let url = s("url").ok_or("no response_url")?;
            state
                .api
                .respond(&url, text)
                .await
                .map_err(|e| e.to_string())
        }
        Some("thread") => {
            let id: crate::installation::InstallationId = s("installation")
                .ok_or("no installation")?
                .parse()
                .map_err(|_| "bad installation id")?;
            let repo = state
                .tenants
                .store()
                .for_tenant(ctx)
                .map_err(|e| e.to_string())?;
            let inst = repo
                .installations()
                .get(&id)
                .map_err(|e| e.to_string())?
                .ok_or("the installation is gone")?;
            let token = fresh_token(state, ctx, inst)
                .await
                .ok_or("no usable bot token")?;
            let channel = s("channel").ok_or("no channel")?;
            state
                .api
                .post_message(&token, &channel, s("thread_ts").as_deref(), text)
                .await
                .map_err(|e| e.to_string())
        }
        _ => Err("unknown Slack reply target".into()),
    }
}

/// The workspace an OAuth answer installs into.
fn workspace_of(access: &api::OAuthAccess) -> Option<Workspace> {
    let enterprise = access.enterprise.as_ref().map(|e| e.id.as_str());
    if access.is_enterprise_install {
        Workspace::slack_org(enterprise?).ok()
    } else {
        Workspace::slack_team(enterprise, &access.team.as_ref()?.id).ok()
    }
}

/// A resolved workspace and its bot token, for callers outside the handlers (tests, tools).
pub async fn bot_token(state: &SlackState, resolved: Resolved) -> Option<SecretString> {
    fresh_token(state, &resolved.ctx, resolved.installation).await
}
