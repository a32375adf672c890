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
