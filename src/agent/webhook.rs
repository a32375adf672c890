//! Per-tenant webhook tools: the gateway POSTs the arguments to the tenant's URL, signed with the
//! tenant's own credential, with a run id and an idempotency key, a timeout and a response size limit.
//!
//! Signature: `X-Agentgate-Signature: v1=<hex HMAC-SHA256(secret, "v1:" + timestamp + ":" + body)>`
//! with `X-Agentgate-Timestamp` (Unix seconds); see docs/tools.md for the receiving side.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sha2::Sha256;

use super::egress::{is_refusal, WebhookClient};
use super::planner::ToolSpec;
use super::tools::{ToolBinding, ToolCall, ToolError, ToolOutput, WEBHOOK_PREFIX};
use crate::store::WebhookTool;

/// The most a webhook may answer; more is refused, so a tenant's endpoint cannot flood a run.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Computes the signature header value for a request body sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("v1:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook tool bound for one tenant.
pub struct WebhookBinding {
    tool: WebhookTool,
    client: WebhookClient,
}

impl WebhookBinding {
    /// Binds `tool`, calling it with `client` (which enforces the egress policy).
    pub fn new(tool: WebhookTool, client: WebhookClient) -> Self {
        WebhookBinding { tool, client }
    }
}

/// What the model hears when the egress policy refuses the webhook's address; it names no address.
const NOT_ALLOWED: &str = "the webhook's address is not one the gateway may call";

#[async_trait::async_trait]
impl ToolBinding for WebhookBinding {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: format!("{WEBHOOK_PREFIX}{}", self.tool.name),
            description: self.tool.description.clone(),
            parameters: self.tool.schema.clone(),
        }
    }

    fn read_only(&self) -> bool {
        false
    }

    async fn invoke(&self, call: &ToolCall<'_>, args: &Value) -> Result<ToolOutput, ToolError> {
        let body = serde_json::to_vec(&json!({
            "tool": self.tool.name,
            "arguments": args,
            "run_id": call.ctx.audit().run_id.to_string(),
            "idempotency_key": call.idempotency_key,
        }))
        .expect("JSON serialises");
        let url = reqwest::Url::parse(&self.tool.url)
            .map_err(|_| ToolError::Failed("the webhook's URL does not parse".into()))?;
        // The resolver checks names; an address literal never reaches it.
        if self.client.egress.check_url(&url).is_err() {
            return Err(ToolError::Failed(NOT_ALLOWED.into()));
        }
        let ts = chrono::Utc::now().timestamp();
        let sig = signature(self.tool.secret.expose_secret().as_bytes(), ts, &body);
        let started = Instant::now();
        let send = self
            .client
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("x-agentgate-timestamp", ts.to_string())
            .header("x-agentgate-signature", sig)
            .header("x-agentgate-run-id", call.ctx.audit().run_id.to_string())
            .header("idempotency-key", call.idempotency_key)
            .timeout(Duration::from_millis(self.tool.timeout_ms))
            .body(body)
            .send();
        let mut resp = send.await.map_err(|e| {
            if e.is_timeout() {
                ToolError::Timeout
            } else if is_refusal(&e) {
                ToolError::Failed(NOT_ALLOWED.into())
            } else {
                ToolError::Failed("the webhook could not be reached".into())
            }
        })?;
        if !resp.status().is_success() {
            return Err(ToolError::Failed(format!(
                "the webhook answered {}",
                resp.status().as_u16()
            )));
        }
        let mut out = Vec::new();
        let deadline = Duration::from_millis(self.tool.timeout_ms);
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, resp.chunk()).await {
                Err(_) => return Err(ToolError::Timeout),
                Ok(Err(_)) => {
                    return Err(ToolError::Failed("the webhook's answer broke off".into()))
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(ToolError::Failed(format!(
                            "the webhook's answer is larger than {MAX_RESPONSE_BYTES} bytes"
                        )));
                    }
                    out.extend_from_slice(&chunk);
                }
            }
        }
        Ok(ToolOutput {
            content: String::from_utf8_lossy(&out).into_owned(),
            cost_microcents: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_version_timestamp_and_body() {
        // Cross-checked with: printf 'v1:1700000000:{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature(b"secret", 1_700_000_000, br#"{"a":1}"#),
            "v1=17bb75ebc8e3db9f892e182dac08b5bd115c2a12570908248a7ed41d89710ec8"
        );
    }
}
