//! The Slack OAuth v2 install: `/slack/install` redirects to Slack with a signed, expiring,
//! single-use state bound to a browser cookie; `/slack/oauth_redirect` checks all of that, exchanges
//! the code, and stores the installation (provisioning the tenant on first install).
//!
//! slack-morphism's own OAuth routes send no state (no CSRF protection), so this is written here;
//! the state itself is `transport::install_state`.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::api::SlackApiError;
use super::{workspace_of, SlackState};
use crate::installation::{InstallSource, NewInstallation};
use crate::tenant::PrincipalId;
use crate::transport::install_state::{
    accept_state, authorize_error, clear_cookie, cookie_path, make_state, page, set_cookie,
};

/// The cookie that binds a state to the browser that started the install.
pub const COOKIE: &str = "agentgate_slack_oauth";

/// OAuth settings.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    /// The app's client id.
    pub client_id: String,
    /// The app's client secret.
    pub client_secret: SecretString,
    /// Bot scopes, comma-separated.
    pub scopes: String,
    /// Slack's authorize URL.
    pub authorize_url: String,
    /// Our redirect URL, `<public URL>/slack/oauth_redirect`.
    pub redirect_url: String,
}

/// oauth.v2.access error codes that a person installing can act on (start again, or tell the
/// operator the app's settings are wrong), the only ones a page names.
const EXCHANGE_ERRORS: &[&str] = &[
    "invalid_code",
    "bad_redirect_uri",
    "invalid_client_id",
    "bad_client_secret",
    "oauth_authorization_url_mismatch",
    "invalid_team_for_non_distributed_app",
];

/// What the page says about a failed code exchange: a known code, else nothing of the error,
/// whose text (a transport or parse failure, or a code of Slack's or a proxy's choosing) is for
/// the log.
fn exchange_failure(e: &SlackApiError) -> String {
    match e {
        SlackApiError::Refused(code) if EXCHANGE_ERRORS.contains(&code.as_str()) => {
            format!("The exchange with Slack failed ({code}).")
        }
        _ => "The exchange with Slack failed.".to_owned(),
    }
}

/// `GET /slack/install`.
pub async fn install(State(state): State<SlackState>) -> Response {
    let Some(o) = state.config.oauth.as_ref() else {
        return page(
            StatusCode::NOT_FOUND,
            "Not available",
            "Installing from this page is not configured on this deployment.",
        );
    };
    let (st, nonce) = make_state(
        state.state_key.expose_secret().as_bytes(),
        state.clock.now(),
    );
    let mut url =
        url::Url::parse(&o.authorize_url).expect("the authorize URL was checked at start");
    url.query_pairs_mut()
        .append_pair("client_id", &o.client_id)
        .append_pair("scope", &o.scopes)
        .append_pair("state", &st)
        .append_pair("redirect_uri", &o.redirect_url);
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, url.to_string()),
            (
                header::SET_COOKIE,
                set_cookie(COOKIE, &nonce, &cookie_path(&o.redirect_url)),
            ),
        ],
    )
        .into_response()
}

/// The query Slack redirects back with.
#[derive(Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /slack/oauth_redirect`.
pub async fn redirect(
    State(state): State<SlackState>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let Some(o) = state.config.oauth.as_ref() else {
        return page(
            StatusCode::NOT_FOUND,
            "Not available",
            "Installing is not configured on this deployment.",
        );
    };
    if let Some(err) = q.error {
        return page(
            StatusCode::BAD_REQUEST,
            "agentgate was not installed",
            &authorize_error("Slack", &err),
        );
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "agentgate was not installed",
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
            cookie_path(&o.redirect_url).trim_end_matches('/')
        ),
    ) {
        return page(status, "agentgate was not installed", &why);
    }
    let access = match state
        .api
        .exchange_code(&o.client_id, &o.client_secret, &code, &o.redirect_url)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "the Slack code exchange failed");
            return page(
                StatusCode::BAD_GATEWAY,
                "agentgate was not installed",
                &exchange_failure(&e),
            );
        }
    };
    let (Some(workspace), Some(token), Some(user)) = (
        workspace_of(&access),
        access.access_token.clone(),
        access.authed_user.as_ref(),
    ) else {
        return page(
            StatusCode::BAD_GATEWAY,
            "agentgate was not installed",
            "Slack's answer lacked the workspace, the bot token or the installing user.",
        );
    };
    let token = SecretString::from(token);
    let bot_user_id = match state.api.bot_user_id(&token).await {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(error = %e, "auth.test failed after an install");
            return page(
                StatusCode::BAD_GATEWAY,
                "agentgate was not installed",
                "Slack did not confirm the bot token.",
            );
        }
    };
    let Ok(installer) = PrincipalId::qualified("slack", &user.id) else {
        return page(
            StatusCode::BAD_GATEWAY,
            "agentgate was not installed",
            "Slack named an invalid installing user.",
        );
    };
    let name = access
        .team
        .as_ref()
        .and_then(|t| t.name.clone())
        .or_else(|| access.enterprise.as_ref().and_then(|e| e.name.clone()))
        .unwrap_or_else(|| workspace.directory_key());
    let new = NewInstallation {
        workspace,
        app_id: access.app_id.clone().unwrap_or_default(),
        bot_user_id,
        bot_token: Some(token),
        refresh_token: access.refresh_token.clone().map(SecretString::from),
        token_expires_at: access
            .expires_in
            .map(|s| chrono::Utc::now() + chrono::Duration::seconds(s)),
        scopes: access
            .scope
            .as_deref()
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        installer,
        source: InstallSource::OAuth,
    };
    match state.tenants.install(new, &name, None).await {
        Ok(_) => {
            let mut r = page(StatusCode::OK, "agentgate is installed", &format!("agentgate is now installed in {name}. Mention it or use its slash command to start."));
            r.headers_mut().insert(
                header::SET_COOKIE,
                clear_cookie(COOKIE, &cookie_path(&o.redirect_url))
                    .parse()
                    .expect("a valid header"),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store a Slack installation");
            page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "agentgate was not installed",
                "The installation could not be stored; please try again.",
            )
        }
    }
}
