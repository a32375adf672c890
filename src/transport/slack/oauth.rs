//! The Slack OAuth v2 install: `/slack/install` redirects to Slack with a signed, expiring,
//! single-use state bound to a browser cookie; `/slack/oauth_redirect` checks all of that, exchanges
//! the code, and stores the installation (provisioning the tenant on first install).
//!
//! slack-morphism's own OAuth routes send no state (no CSRF protection), so this is written here.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

use super::{workspace_of, SlackState};
use crate::installation::{InstallSource, NewInstallation};
use crate::tenant::PrincipalId;

/// How long an install link is good for.
pub const STATE_TTL_SECS: i64 = 600;

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

fn mac(key: &[u8], payload: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(payload.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Makes a state `<nonce>.<expiry>.<hmac>`; returns it and the nonce for the cookie.
pub fn make_state(key: &[u8], now: i64) -> (String, String) {
    let mut n = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut n);
    let nonce = hex::encode(n);
    let payload = format!("{nonce}.{}", now + STATE_TTL_SECS);
    let sig = mac(key, &payload);
    (format!("{payload}.{sig}"), nonce)
}

/// Why a state was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not of our making.
    #[error("the install state is not valid")]
    Forged,
    /// Older than ten minutes.
    #[error("the install link expired")]
    Expired,
    /// Not started in this browser.
    #[error("the install was started in another browser")]
    WrongBrowser,
    /// Already used.
    #[error("the install link was already used")]
    Replayed,
}

/// Checks a state's signature, expiry and cookie; returns its nonce (to be consumed once).
///
/// # Errors
/// [`StateError`].
pub fn check_state(
    key: &[u8],
    state: &str,
    cookie_nonce: Option<&str>,
    now: i64,
) -> Result<String, StateError> {
    let mut parts = state.rsplitn(2, '.');
    let (Some(sig), Some(payload)) = (parts.next(), parts.next()) else {
        return Err(StateError::Forged);
    };
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(payload.as_bytes());
    let given = hex::decode(sig).map_err(|_| StateError::Forged)?;
    m.verify_slice(&given).map_err(|_| StateError::Forged)?;
    let (nonce, exp) = payload.split_once('.').ok_or(StateError::Forged)?;
    let exp: i64 = exp.parse().map_err(|_| StateError::Forged)?;
    if now > exp {
        return Err(StateError::Expired);
    }
    if cookie_nonce != Some(nonce) {
        return Err(StateError::WrongBrowser);
    }
    Ok(nonce.to_owned())
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    (
        status,
        Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1><p>{x}</p></body></html>",
            t = esc(title),
            x = esc(text)
        )),
    )
        .into_response()
}

fn clear_cookie() -> (header::HeaderName, String) {
    (
        header::SET_COOKIE,
        format!("{COOKIE}=; Max-Age=0; Path=/slack; HttpOnly; Secure; SameSite=Lax"),
    )
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
                format!("{COOKIE}={nonce}; Max-Age={STATE_TTL_SECS}; Path=/slack; HttpOnly; Secure; SameSite=Lax"),
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

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
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
        let why = if err == "access_denied" {
            "The install was cancelled in Slack.".to_owned()
        } else {
            format!("Slack reported: {err}.")
        };
        return page(StatusCode::BAD_REQUEST, "agentgate was not installed", &why);
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "agentgate was not installed",
            "The link is missing its code or state.",
        );
    };
    let nonce = match check_state(
        state.state_key.expose_secret().as_bytes(),
        &st,
        cookie(&headers, COOKIE).as_deref(),
        state.clock.now(),
    ) {
        Ok(n) => n,
        Err(e) => {
            return page(
                StatusCode::BAD_REQUEST,
                "agentgate was not installed",
                &format!("{e}. Start again from /slack/install."),
            );
        }
    };
    match state
        .tenants
        .store()
        .consume_nonce(&format!("slack-oauth:{nonce}"))
    {
        Ok(true) => {}
        Ok(false) => {
            return page(
                StatusCode::BAD_REQUEST,
                "agentgate was not installed",
                &format!("{}. Start again from /slack/install.", StateError::Replayed),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "could not record an OAuth state");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "agentgate was not installed",
                "Please try again in a moment.",
            );
        }
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
                &format!("The exchange with Slack failed ({e})."),
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
            let (k, v) = clear_cookie();
            r.headers_mut()
                .insert(k, v.parse().expect("a valid header"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_signed_expires_and_is_bound_to_the_cookie() {
        let key = b"k".repeat(32);
        let (st, nonce) = make_state(&key, 1_000);
        assert_eq!(
            check_state(&key, &st, Some(&nonce), 1_000),
            Ok(nonce.clone())
        );
        assert_eq!(
            check_state(&key, &st, Some(&nonce), 1_000 + STATE_TTL_SECS + 1),
            Err(StateError::Expired)
        );
        assert_eq!(
            check_state(&key, &st, Some("other"), 1_000),
            Err(StateError::WrongBrowser)
        );
        assert_eq!(
            check_state(&key, &st, None, 1_000),
            Err(StateError::WrongBrowser)
        );
        assert_eq!(
            check_state(b"other-key", &st, Some(&nonce), 1_000),
            Err(StateError::Forged)
        );
        let tampered = st.replacen(&nonce, &"0".repeat(32), 1);
        assert_eq!(
            check_state(&key, &tampered, Some(&"0".repeat(32)), 1_000),
            Err(StateError::Forged)
        );
        assert_eq!(
            check_state(&key, "garbage", Some(&nonce), 1_000),
            Err(StateError::Forged)
        );
    }
}
