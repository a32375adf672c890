//! Calls to Slack: chat.postMessage and auth.test through slack-morphism; oauth.v2.access (install
//! and token rotation) and response_url replies through reqwest with our own DTOs, because
//! slack-morphism's OAuth model has no enterprise, `is_enterprise_install`, `refresh_token` or
//! `expires_in` fields. Every call honours 429 with Retry-After.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use slack_morphism::prelude::*;

/// Why a call to Slack failed.
#[derive(Debug, thiserror::Error)]
pub enum SlackApiError {
    /// Slack could not be reached.
    #[error("Slack could not be reached: {0}")]
    Transport(String),
    /// Slack answered `ok: false`; the code (e.g. `invalid_code`) is safe to show.
    #[error("Slack refused: {0}")]
    Refused(String),
    /// Slack's answer did not parse.
    #[error("Slack's answer was malformed: {0}")]
    Malformed(String),
}

/// What oauth.v2.access answers, for an install or a token refresh.
#[derive(Clone, Debug, Deserialize)]
pub struct OAuthAccess {
    /// True when the call worked.
    pub ok: bool,
    /// The error code when it did not.
    pub error: Option<String>,
    /// The bot token.
    pub access_token: Option<String>,
    /// The refresh token, with token rotation on.
    pub refresh_token: Option<String>,
    /// Seconds until the bot token expires, with token rotation on.
    pub expires_in: Option<i64>,
    /// The granted scopes, comma-separated.
    pub scope: Option<String>,
    /// The bot's user id.
    pub bot_user_id: Option<String>,
    /// The app's id.
    pub app_id: Option<String>,
    /// The workspace.
    pub team: Option<IdName>,
    /// The Grid org, if any.
    pub enterprise: Option<IdName>,
    /// True for an org-wide install.
    #[serde(default)]
    pub is_enterprise_install: bool,
    /// The installing user.
    pub authed_user: Option<IdName>,
}

/// An id and maybe a name.
#[derive(Clone, Debug, Deserialize)]
pub struct IdName {
    /// The id.
    pub id: String,
    /// The name.
    pub name: Option<String>,
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The Slack Web API client.
#[derive(Clone)]
pub struct SlackApi {
    api_url: String,
    client: std::sync::Arc<SlackClient<SlackClientHyperConnector<Connector>>>,
    http: reqwest::Client,
}

impl std::fmt::Debug for SlackApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackApi")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl SlackApi {
    /// A client for the Web API at `api_url` (normally `https://slack.com/api/`; tests give a local
    /// `http://` stand-in).
    ///
    /// # Errors
    /// When the system's root certificates cannot be loaded.
    pub fn new(api_url: &str) -> std::io::Result<Self> {
        // slack-morphism joins the base and the method with a slash of its own.
        let api_url = api_url.trim_end_matches('/').to_owned();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        let connector = SlackClientHyperConnector::with_connector(https)
            .with_slack_api_url(&api_url)
            .with_rate_control(SlackApiRateControlConfig {
                max_retries: Some(3),
                max_delay_timeout: Some(crate::transport::retry::MAX_RETRY_AFTER),
                ..SlackApiRateControlConfig::new()
            });
        Ok(SlackApi {
            api_url,
            client: std::sync::Arc::new(SlackClient::new(connector)),
            // No redirects: a response_url is checked to be Slack's before it is posted to, and a
            // redirect would take the answer wherever Slack's (or a forger's) answer pointed.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a TLS backend is compiled in"),
        })
    }

    /// True when `url` may be a slash command's response_url: `https://hooks.slack.com/…` (or GovSlack's
    /// `hooks.slack-gov.com`) on the standard port, or the scheme, host and port of the configured Web API base (where a test's
    /// stand-in, or a Slack of another domain, serves both). The form that carries it is signed,
    /// but the answer must not go wherever a replayed or mistaken form says.
    pub fn response_url_allowed(&self, url: &str) -> bool {
        let Ok(u) = url::Url::parse(url) else {
            return false;
        };
        // Slack's commercial and GovSlack hosts for response URLs.
        let hooks = u.scheme() == "https"
            && matches!(
                u.host_str(),
                Some("hooks.slack.com" | "hooks.slack-gov.com")
            )
            && u.port_or_known_default() == Some(443);
        let api = url::Url::parse(&self.api_url).is_ok_and(|a| {
            a.scheme() == u.scheme()
                && a.host_str() == u.host_str()
                && a.port_or_known_default() == u.port_or_known_default()
        });
        hooks || api
    }

    /// Sends a request, waiting out 429 answers as Retry-After says.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, SlackApiError> {
        crate::transport::retry::send(req)
            .await
            .map_err(SlackApiError::Transport)
    }

    async fn oauth(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        form: &[(&str, &str)],
    ) -> Result<OAuthAccess, SlackApiError> {
        let req = self
            .http
            .post(format!("{}/oauth.v2.access", self.api_url))
            .basic_auth(client_id, Some(client_secret.expose_secret()))
            .form(form);
        let resp = self.send(req).await?;
        let access: OAuthAccess = resp
            .json()
            .await
            .map_err(|e| SlackApiError::Malformed(e.without_url().to_string()))?;
        if !access.ok {
            return Err(SlackApiError::Refused(
                access.error.unwrap_or_else(|| "unknown_error".into()),
            ));
        }
        Ok(access)
    }

    /// Exchanges an install's code for tokens.
    ///
    /// # Errors
    /// [`SlackApiError`]; `Refused` carries Slack's error code.
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        code: &str,
        redirect_uri: &str,
    ) -> Result<OAuthAccess, SlackApiError> {
        self.oauth(
            client_id,
            client_secret,
            &[("code", code), ("redirect_uri", redirect_uri)],
        )
        .await
    }

    /// Trades a refresh token for a new bot token (token rotation).
    ///
    /// # Errors
    /// [`SlackApiError`].
    pub async fn refresh(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<OAuthAccess, SlackApiError> {
        self.oauth(
            client_id,
            client_secret,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose_secret()),
            ],
        )
        .await
    }

    /// The bot user id behind a token (auth.test).
    ///
    /// # Errors
    /// [`SlackApiError`].
    pub async fn bot_user_id(&self, token: &SecretString) -> Result<String, SlackApiError> {
        let token = SlackApiToken::new(SlackApiTokenValue(token.expose_secret().to_owned()));
        let session = self.client.open_session(&token);
        let r = session
            .auth_test()
            .await
            .map_err(|e| SlackApiError::Refused(e.to_string()))?;
        Ok(r.user_id.0)
    }

    /// Posts a message (in a thread when `thread_ts` is given) with the bot token.
    ///
    /// # Errors
    /// [`SlackApiError`].
    pub async fn post_message(
        &self,
        token: &SecretString,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> Result<(), SlackApiError> {
        let token = SlackApiToken::new(SlackApiTokenValue(token.expose_secret().to_owned()));
        let session = self.client.open_session(&token);
        let mut req = SlackApiChatPostMessageRequest::new(
            SlackChannelId(channel.to_owned()),
            SlackMessageContent::new().with_text(escape(text)),
        );
        if let Some(ts) = thread_ts {
            req = req.with_thread_ts(SlackTs(ts.to_owned()));
        }
        session
            .chat_post_message(&req)
            .await
            .map(|_| ())
            .map_err(|e| SlackApiError::Refused(e.to_string()))
    }

    /// Answers a slash command through its response_url.
    ///
    /// # Errors
    /// [`SlackApiError`] when the URL is not Slack's (see [`SlackApi::response_url_allowed`]) or
    /// refuses; a redirect is a refusal.
    pub async fn respond(&self, response_url: &str, text: &str) -> Result<(), SlackApiError> {
        // Checked again here, since the target may come from a checkpoint written before the check.
        if !self.response_url_allowed(response_url) {
            return Err(SlackApiError::Refused(
                "the response_url is not Slack's".into(),
            ));
        }
        let req = self
            .http
            .post(response_url)
            .json(&json!({"response_type": "in_channel", "replace_original": false, "text": escape(text)}));
        let r = self.send(req).await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(SlackApiError::Refused(format!(
                "response_url answered {}",
                r.status().as_u16()
            )))
        }
    }
}

/// Escapes text for a Slack message, as Slack's formatting rules ask: `&`, `<` and `>` become
/// `&amp;`, `&lt;` and `&gt;`. An answer repeats what users and tools wrote, and unescaped, a
/// `<!channel>`, `<!here>` or `<@U…>` in it would notify the whole channel or a user, and `<url|text>`
/// would show a link under other text.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Undoes [`escape`] on text Slack sends (a message's or a slash command's), which comes with
/// `&`, `<` and `>` typed by the user encoded: decoded once here, so the planner sees what was
/// typed and an answer repeating it is escaped once, not twice. `&amp;` goes last, so that a
/// typed `&lt;` (sent as `&amp;lt;`) stays `&lt;`. Slack's own sequences (`<@U…>`, `<!here>`)
/// arrive unencoded and pass through.
pub fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}
