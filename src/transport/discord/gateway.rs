//! The Discord Gateway (serenity): bot mentions in guilds run as commands and are answered in their
//! channel; a guild that removes the bot revokes its installation; a guild the bot joins without an
//! installation is logged, never trusted as one.

use std::sync::{Arc, OnceLock};

use secrecy::{ExposeSecret, SecretString};
use serenity::all::{
    Client, Context, EventHandler, GatewayIntents, Guild, HttpBuilder, Message, Ready,
    UnavailableGuild, UserId,
};

use crate::agent::Agent;
use crate::audit::AuditSink;
use crate::installation::{PlatformIdentity, Workspace};
use crate::tenant::{Initiator, PrincipalId, Tenants, WorkspaceRequest};
use crate::transport::{accept_once, Command, Dedupe};

/// What the Gateway handler reaches.
pub struct Handler {
    tenants: Tenants,
    agent: Agent,
    sink: Arc<dyn AuditSink>,
    bot: OnceLock<UserId>,
    /// Message ids seen before, so that a redelivered message runs nothing twice.
    seen: Dedupe,
    /// The work a stopping server waits for before it closes the logs: serenity runs each event
    /// in a task of its own, which its shutdown does not wait for.
    handlers: tokio_util::task::TaskTracker,
}

impl Handler {
    /// A handler over the services.
    pub fn new(
        tenants: Tenants,
        agent: Agent,
        sink: Arc<dyn AuditSink>,
        handlers: tokio_util::task::TaskTracker,
    ) -> Self {
        Handler {
            seen: Dedupe::new(tenants.store().clone()),
            tenants,
            agent,
            sink,
            bot: OnceLock::new(),
            handlers,
        }
    }
}

/// Removes the bot's mention (`<@id>` or `<@!id>`) from a message.
fn strip_mention(content: &str, bot: UserId) -> String {
    content
        .replace(&format!("<@{bot}>"), "")
        .replace(&format!("<@!{bot}>"), "")
        .trim()
        .to_owned()
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        let _ = self.bot.set(ready.user.id);
        tracing::info!(bot = %ready.user.id, guilds = ready.guilds.len(), "Discord gateway ready");
    }

    async fn guild_create(&self, _ctx: Context, guild: Guild, _is_new: Option<bool>) {
        let Ok(ws) = Workspace::discord_guild(&guild.id.to_string()) else {
            return;
        };
        let known = self
            .tenants
            .resolve(&WorkspaceRequest {
                identity: PlatformIdentity::Discord {
                    guild_id: guild.id.to_string(),
                },
                user: PrincipalId::qualified("discord", &guild.owner_id.to_string())
                    .expect("snowflakes are valid ids"),
                correlation_id: None,
                initiator: Initiator::Webhook,
            })
            .is_ok();
        if !known {
            tracing::warn!(workspace = %ws, "the bot is in a guild without an installation; it will not answer there until the guild installs it");
        }
    }

    async fn guild_delete(
        &self,
        _ctx: Context,
        incomplete: UnavailableGuild,
        _full: Option<Guild>,
    ) {
        // `unavailable` means an outage, not a removal.
        if incomplete.unavailable {
            return;
        }
        let _running = self.handlers.token();
        let Ok(ws) = Workspace::discord_guild(&incomplete.id.to_string()) else {
            return;
        };
        match self.tenants.revoke_workspace(&ws, "removed").await {
            Ok(_) => {
                tracing::info!(workspace = %ws, "the bot was removed from a guild; installation revoked")
            }
            Err(crate::tenant::ProvisionError::UnknownWorkspace(_)) => {}
            Err(e) => {
                tracing::error!(workspace = %ws, error = %e, "could not revoke a Discord installation")
            }
        }
    }

    async fn message(&self, ctx: Context, msg: Message) {
        if msg.author.bot {
            return;
        }
        let _running = self.handlers.token();
        let (Some(bot), Some(guild_id)) = (self.bot.get().copied(), msg.guild_id) else {
            return;
        };
        if !msg.mentions.iter().any(|u| u.id == bot) {
            return;
        }
        let Ok(user) = PrincipalId::qualified("discord", &msg.author.id.to_string()) else {
            return;
        };
        // The guild owner counts as an admin (known from the cache once GUILD_CREATE arrived).
        let owner = ctx.cache.guild(guild_id).map(|g| g.owner_id);
        let is_admin = owner == Some(msg.author.id);
        let req = WorkspaceRequest {
            identity: PlatformIdentity::Discord {
                guild_id: guild_id.to_string(),
            },
            user,
            correlation_id: msg.id.to_string().parse().ok(),
            initiator: Initiator::User,
        };
        let Ok(resolved) = self.tenants.resolve_with(&req, is_admin) else {
            return;
        };
        let cmd = Command {
            platform: "discord",
            kind: "mention",
            text: strip_mention(&msg.content, bot),
            conversation: format!("discord:{}", msg.channel_id),
        };
        let target = serde_json::json!({
            "platform": "discord",
            "kind": "reply",
            "channel": msg.channel_id.to_string(),
            "message": msg.id.to_string(),
        });
        // A reconnect can redeliver a message: run each message at most once.
        let key = format!("discord-message:{}", msg.id);
        let accepted = accept_once(
            &self.seen,
            &key,
            &self.sink,
            &self.agent,
            resolved.ctx,
            cmd,
            target,
        )
        .await;
        if let Err(e) = accepted {
            tracing::error!(error = %e, "could not record a Discord mention");
        }
    }
}

/// Builds the Gateway client. `api_url` other than Discord's own routes every REST call (the
/// gateway URL lookup included) to that host, with serenity's rate limiter off, which is how tests
/// point it at a local stand-in.
///
/// # Errors
/// serenity's, when the client cannot be built.
pub async fn client(
    token: &SecretString,
    api_url: &str,
    handler: Handler,
) -> serenity::Result<Client> {
    let intents = GatewayIntents::GUILDS | GatewayIntents::GUILD_MESSAGES;
    let mut http = HttpBuilder::new(token.expose_secret());
    if let Some(base) = api_url
        .strip_suffix("/api/v10")
        .filter(|b| *b != "https://discord.com")
    {
        http = http.proxy(base.to_owned()).ratelimiter_disabled(true);
    }
    serenity::client::ClientBuilder::new_with_http(http.build(), intents)
        .event_handler(handler)
        .await
}
