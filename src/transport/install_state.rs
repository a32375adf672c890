//! Install states shared by the OAuth installs: `<nonce>.<expiry>.<hmac>`, signed with a key
//! derived from the master key, expiring after ten minutes, bound to a cookie in the browser that
//! started the install, and single-use (the caller consumes the nonce in the store).

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// How long an install link is good for.
pub const STATE_TTL_SECS: i64 = 600;

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

/// The standard OAuth 2.0 authorization error codes (RFC 6749, 4.1.2.1): the only `error` values
/// of a returning install that a page repeats.
const AUTHORIZE_ERRORS: &[&str] = &[
    "invalid_request",
    "unauthorized_client",
    "access_denied",
    "unsupported_response_type",
    "invalid_scope",
    "server_error",
    "temporarily_unavailable",
];

/// What a page says about a returning install's `error` parameter. The parameter is whatever the
/// link said, so it is repeated only when it is a standard code: otherwise anyone could have our
/// page show their text ("call this number") under our name.
pub fn authorize_error(platform: &str, error: &str) -> String {
    if error == "access_denied" {
        format!("The install was cancelled in {platform}.")
    } else if AUTHORIZE_ERRORS.contains(&error) {
        format!("{platform} reported: {error}.")
    } else {
        format!("{platform} reported an error.")
    }
}

/// A small HTML page for the person at the browser, with its text escaped.
pub fn page(status: StatusCode, title: &str, text: &str) -> Response {
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

/// Checks a returning install's state against the browser's cookie and uses it up, so that it
/// works once. On refusal, returns the status and the message for the page.
///
/// # Errors
/// `(400, why)` for a bad, expired, foreign or replayed state; `(503, …)` when the store failed.
pub fn accept_state(
    store: &crate::store::Store,
    key: &[u8],
    state: &str,
    headers: &HeaderMap,
    cookie_name: &str,
    now: i64,
    restart: &str,
) -> Result<(), (StatusCode, String)> {
    let nonce =
        check_state(key, state, cookie(headers, cookie_name).as_deref(), now).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("{e}. Start again from {restart}."),
            )
        })?;
    match store.consume_nonce(&format!("{cookie_name}:{nonce}")) {
        Ok(true) => Ok(()),
        Ok(false) => Err((
            StatusCode::BAD_REQUEST,
            format!("{}. Start again from {restart}.", StateError::Replayed),
        )),
        Err(e) => {
            tracing::error!(error = %e, "could not record an OAuth state");
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again in a moment.".into(),
            ))
        }
    }
}

/// Reads a cookie.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The path an install's cookie is sent on: the folder of the redirect URL, which holds the
/// install route too (`/slack` for `https://host/slack/oauth_redirect`, `/agents/slack` when a
/// proxy serves the gateway under `/agents`). A path that would not fit in a Set-Cookie value
/// whole (`;`, spaces, controls) gives `/`.
pub fn cookie_path(redirect_url: &str) -> String {
    let path = url::Url::parse(redirect_url)
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    match path.rsplit_once('/') {
        Some((dir, _))
            if !dir.is_empty() && dir.chars().all(|c| c.is_ascii_graphic() && c != ';') =>
        {
            dir.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// The Set-Cookie value that binds an install to this browser, for `path`.
pub fn set_cookie(name: &str, nonce: &str, path: &str) -> String {
    format!("{name}={nonce}; Max-Age={STATE_TTL_SECS}; Path={path}; HttpOnly; Secure; SameSite=Lax")
}

/// The Set-Cookie value that removes it.
pub fn clear_cookie(name: &str, path: &str) -> String {
    format!("{name}=; Max-Age=0; Path={path}; HttpOnly; Secure; SameSite=Lax")
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

    #[test]
    fn an_authorize_error_is_repeated_only_when_it_is_a_standard_code() {
        assert_eq!(
            authorize_error("Slack", "access_denied"),
            "The install was cancelled in Slack."
        );
        assert_eq!(
            authorize_error("Discord", "invalid_scope"),
            "Discord reported: invalid_scope."
        );
        for forged in [
            "Call +1 555 0100 to finish",
            "invalid_scope ",
            "<b>x</b>",
            "",
        ] {
            assert_eq!(authorize_error("Slack", forged), "Slack reported an error.");
        }
    }

    #[test]
    fn the_cookie_path_is_the_redirect_urls_folder() {
        let check = |url: &str, want: &str| assert_eq!(cookie_path(url), want, "{url}");
        check(
            "https://agentgate.example.com/slack/oauth_redirect",
            "/slack",
        );
        check(
            "https://example.com/agents/slack/oauth_redirect",
            "/agents/slack",
        );
        check(
            "https://example.com/a/b/discord/oauth_redirect",
            "/a/b/discord",
        );
        check("https://example.com/oauth_redirect", "/");
        check(
            "https://example.com/x;Domain=evil/slack/oauth_redirect",
            "/",
        );
        check("not a url", "/");
    }
}
