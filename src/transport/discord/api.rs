//! Calls to Discord's REST API: interaction follow-ups, the OAuth2 code exchange, the installing
//! user, and slash-command registration. Every call honours 429 with Retry-After.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

/// Why a call to Discord failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscordApiError {
    /// Discord could not be reached.
    #[error("Discord could not be reached: {0}")]
    Transport(String),
    /// Discord answered with an error status.
    #[error("Discord answered {status}: {message}")]
    Status {
        /// The status.
        status: u16,
        /// Discord's message, truncated.
        message: String,
    },
    /// The answer did not parse.
    #[error("Discord's answer was malformed: {0}")]
    Malformed(String),
}

/// The OAuth2 token answer for a bot install.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenAnswer {
    /// The installing user's access token (used once, to learn who installed).
    pub access_token: String,
    /// Granted scopes, space-separated.
    #[serde(default)]
    pub scope: String,
    /// The guild the bot joined: this is the installation.
    pub guild: Option<Guild>,
}

/// A guild in an OAuth2 answer.
#[derive(Clone, Debug, Deserialize)]
pub struct Guild {
    /// Its snowflake.
    pub id: String,
    /// Its name.
    pub name: Option<String>,
}

/// The Discord REST client.
#[derive(Clone, Debug)]
pub struct DiscordApi {
    api_url: String,
    http: reqwest::Client,
}

/// The slash command agentgate registers.
pub fn command_definitions() -> Value {
    json!([{
        "name": "agentgate",
        "type": 1,
        "description": "Ask agentgate (try: help)",
        "options": [{"type": 3, "name": "text", "description": "What to do, e.g. remember dog: Rex", "required": true}]
    }])
}

impl DiscordApi {
    /// A client for `api_url` (normally `https://discord.com/api/v10`).
    pub fn new(api_url: &str) -> Self {
        DiscordApi {
            api_url: api_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("a TLS backend is compiled in"),
        }
    }

    /// Sends a request (waiting out 429s); any other non-2xx answer is an error.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DiscordApiError> {
        let r = crate::transport::retry::send(req)
            .await
            .map_err(DiscordApiError::Transport)?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status().as_u16();
        let message: String = r
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(DiscordApiError::Status { status, message })
    }

    /// Posts the answer to an interaction as its follow-up message.
    ///
    /// # Errors
    /// [`DiscordApiError`].
    pub async fn follow_up(
        &self,
        application_id: &str,
        interaction_token: &str,
        text: &str,
    ) -> Result<(), DiscordApiError> {
        let url = format!(
            "{}/webhooks/{application_id}/{interaction_token}",
            self.api_url
        );
        self.send(
            self.http
                .post(url)
                .json(&json!({"content": truncate(text)})),
        )
        .await
        .map(|_| ())
    }

    /// Replies to a message in its channel with the bot token.
    ///
    /// # Errors
    /// [`DiscordApiError`].
    pub async fn reply(
        &self,
        bot_token: &SecretString,
        channel: &str,
        message: &str,
        text: &str,
    ) -> Result<(), DiscordApiError> {
        let req = self
            .http
            .post(format!("{}/channels/{channel}/messages", self.api_url))
            .header(
                "authorization",
                format!("Bot {}", bot_token.expose_secret()),
            )
            .json(&json!({
                "content": truncate(text),
                "message_reference": {"message_id": message, "fail_if_not_exists": false},
                "allowed_mentions": {"parse": []},
            }));
        self.send(req).await.map(|_| ())
    }

    /// Exchanges an install's code.
    ///
    /// # Errors
    /// [`DiscordApiError`].
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        code: &str,
        redirect_uri: &str,
    ) -> Result<TokenAnswer, DiscordApiError> {
        let req = self
            .http
            .post(format!("{}/oauth2/token", self.api_url))
            .basic_auth(client_id, Some(client_secret.expose_secret()))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
            ]);
        self.send(req)
            .await?
            .json()
            .await
            .map_err(|e| DiscordApiError::Malformed(e.without_url().to_string()))
    }

    /// The id of the user an OAuth2 access token belongs to.
    ///
    /// # Errors
    /// [`DiscordApiError`].
    pub async fn user_id(&self, access_token: &str) -> Result<String, DiscordApiError> {
        let v: Value = self
            .send(
                self.http
                    .get(format!("{}/users/@me", self.api_url))
                    .bearer_auth(access_token),
            )
            .await?
            .json()
            .await
            .map_err(|e| DiscordApiError::Malformed(e.without_url().to_string()))?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| DiscordApiError::Malformed("no id".into()))
    }

    /// Registers the slash commands globally, or in one guild (which takes effect at once).
    ///
    /// # Errors
    /// [`DiscordApiError`].
    pub async fn register_commands(
        &self,
        application_id: &str,
        bot_token: &SecretString,
        guild: Option<&str>,
    ) -> Result<usize, DiscordApiError> {
        let url = match guild {
            Some(g) => format!(
                "{}/applications/{application_id}/guilds/{g}/commands",
                self.api_url
            ),
            None => format!("{}/applications/{application_id}/commands", self.api_url),
        };
        let req = self
            .http
            .put(url)
            .header(
                "authorization",
                format!("Bot {}", bot_token.expose_secret()),
            )
            .json(&command_definitions());
        let v: Value = self
            .send(req)
            .await?
            .json()
            .await
            .map_err(|e| DiscordApiError::Malformed(e.without_url().to_string()))?;
        Ok(v.as_array().map_or(0, Vec::len))
    }
}

/// Discord messages hold at most 2000 characters.
pub fn truncate(text: &str) -> String {
    if text.chars().count() <= 2000 {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(1997).collect();
        t.push('…');
        t
    }
}
