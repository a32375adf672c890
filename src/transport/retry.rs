//! Outgoing calls to a platform that honour `429 Too Many Requests` with `Retry-After`.

use std::time::Duration;

/// The longest Retry-After waited for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How many times a rate-limited call is tried again.
pub const MAX_RETRIES: u32 = 3;

/// Sends `req`, waiting out 429 answers as their Retry-After (seconds, possibly fractional) says,
/// up to [`MAX_RETRIES`] times; returns the last answer whatever its status.
///
/// # Errors
/// The transport error of an attempt (with the URL left out, since it may hold a token).
pub async fn send(req: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
    let mut attempt = 0;
    loop {
        let r = req
            .try_clone()
            .expect("request bodies here are not streams")
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS || attempt == MAX_RETRIES {
            return Ok(r);
        }
        let wait = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(Duration::from_secs(1), Duration::from_secs_f64)
            .min(MAX_RETRY_AFTER);
        tracing::warn!(
            wait_ms = wait.as_millis() as u64,
            "rate-limited by the platform; waiting"
        );
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}
