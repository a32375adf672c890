//! The HTTP edge around every route: the platforms' routes are under the same request timeout as
//! the API's, so a client that sends its body slowly cannot hold a connection forever.

use std::time::Duration;

use agentgate::transport::discord::DiscordConfig;
use agentgate::transport::slack::SlackConfig;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{repo_installations, spawn_with, test_config};

/// Sends a POST to `path` that announces a body it never finishes, and returns the status line
/// the server answers with, or `None` when it has not answered in five seconds.
async fn post_half_a_body(address: &str, path: &str) -> Option<String> {
    let host = address.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"a\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .ok()?
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    // Nothing goes on reading the rest of the body after the answer: the connection closes.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "{path}: the connection stayed open after the answer"
    );
    Some(text.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn slack_and_discord_routes_are_under_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &repo_installations());
    config.request_timeout = Duration::from_millis(300);
    config.slack = Some(SlackConfig {
        signing_secret: SecretString::from("edge-signing-secret"),
        api_url: "http://127.0.0.1:9/api/".into(),
        oauth: None,
    });
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    config.discord = Some(DiscordConfig {
        public_key: key.verifying_key(),
        application_id: "100000000000000001".into(),
        client_secret: None,
        bot_token: None,
        api_url: "http://127.0.0.1:9/api/v10".into(),
        authorize_url: "http://127.0.0.1:9/authorize".into(),
        permissions: "3072".into(),
        redirect_url: "http://localhost/discord/oauth_redirect".into(),
    });
    let app = spawn_with(config).await;
    for path in ["/slack/events", "/slack/commands", "/discord/interactions"] {
        let status = post_half_a_body(&app.address, path).await;
        assert_eq!(
            status.as_deref(),
            Some("HTTP/1.1 408 Request Timeout"),
            "{path} answers a half-sent body by its timeout"
        );
    }
    app.stop().await;
}

/// An API request without a credential is refused before its body is read: a client cannot make
/// the gateway hold a body it was never going to accept (here the body never comes, and the
/// answer does not wait for it, nor for the request timeout).
#[tokio::test]
async fn a_request_without_a_credential_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &repo_installations());
    config.request_timeout = Duration::from_secs(30);
    let app = spawn_with(config).await;
    let started = std::time::Instant::now();
    let status = post_half_a_body(&app.address, "/api/v1/keys").await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 401 Unauthorized"));
    assert!(started.elapsed() < Duration::from_secs(10));
    app.stop().await;
}

/// A client that sends its request headers slowly is cut off by the header-read timeout (the
/// request timeout only starts once the headers are in), and does not hold up a graceful stop.
#[tokio::test]
async fn half_sent_headers_are_cut_off_and_do_not_hold_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &repo_installations());
    config.request_timeout = Duration::from_millis(300);
    let app = spawn_with(config).await;
    let host = app.address.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&host).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let ended = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the server cut the connection off");
    // Closed, or answered with an error status and then closed: never a 200 for half a request.
    match ended {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(!text.starts_with("HTTP/1.1 200"), "{text}");
        }
    }

    // Another slow client, this time while the server stops.
    let mut slower = tokio::net::TcpStream::connect(&host).await.unwrap();
    slower
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the stop was not held up by a slow client");
}
