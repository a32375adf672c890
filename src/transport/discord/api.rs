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

/// True for what may be one segment of a Discord API path: snowflakes (digits) and interaction
/// tokens (base64url and dots), 1 to 1,000 characters, and never `.` or `..`.
pub fn segment_ok(s: &str) -> bool {
    (1..=1000).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
            // Redirects are not followed: a call carries the bot token or an interaction token,
            // and goes to Discord or nowhere.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a TLS backend is compiled in"),
        }
    }

    /// `base` followed by `segments`, each checked by [`segment_ok`]: ids and tokens come from
    /// payloads and stored targets, and one holding `/`, `?`, `#` or `..` would send the request,
    /// with its credential, to another path of Discord's API.
    fn url(&self, segments: &[(&str, &str)]) -> Result<String, DiscordApiError> {
        let mut url = self.api_url.clone();
        for (what, seg) in segments {
            if !segment_ok(seg) {
                return Err(DiscordApiError::Malformed(format!("not a valid {what}")));
            }
            url.push('/');
            url.push_str(seg);
        }
        Ok(url)
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
        let url = self.url(&[
            ("path", "webhooks"),
            ("application id", application_id),
            ("interaction token", interaction_token),
        ])?;
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
            .post(self.url(&[
                ("path", "channels"),
                ("channel id", channel),
                ("path", "messages"),
            ])?)
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
            Some(g) => self.url(&[
                ("path", "applications"),
                ("application id", application_id),
                ("path", "guilds"),
                ("guild id", g),
                ("path", "commands"),
            ])?,
            None => self.url(&[
                ("path", "applications"),
                ("application id", application_id),
                ("path", "commands"),
            ])?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_segment_is_an_id_or_a_token_and_nothing_that_moves_the_path() {
        for ok in ["1234567890", "aW50ZXJhY3Rpb246MTIz.abc_-Def", "x"] {
            assert!(segment_ok(ok), "{ok}");
        }
        let long = "a".repeat(1001);
        for bad in [
            "", ".", "..", "a/b", "../x", "a?b", "a#b", "a%2Fb", "a b", "é", &long,
        ] {
            assert!(!segment_ok(bad), "{bad}");
        }
    }

    #[test]
    fn a_follow_up_url_keeps_its_token_in_one_segment() {
        let api = DiscordApi::new("http://127.0.0.1:9/api/");
        assert_eq!(
            api.url(&[
                ("path", "webhooks"),
                ("application id", "42"),
                ("interaction token", "t.k")
            ])
            .unwrap(),
            "http://127.0.0.1:9/api/webhooks/42/t.k"
        );
        let err = api
            .url(&[
                ("path", "webhooks"),
                ("application id", "42"),
                ("interaction token", "../../users/@me"),
            ])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Discord's answer was malformed: not a valid interaction token"
        );
    }
}
