//! An Anthropic Messages API client with tool use.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::planner::{
    capability_from_wire, estimate_prompt_tokens, send_and_parse, wire_tool_name, Message, Plan,
    PlanRequest, Planner, PlannerError, Reply, ToolCall,
};

/// The API version this client speaks.
const VERSION: &str = "2023-06-01";

/// A Messages API client.
pub struct Anthropic {
    http: reqwest::Client,
    base_url: String,
    key: Option<SecretString>,
}

impl std::fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anthropic")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Anthropic {
    /// A client for `base_url` (for example `https://api.anthropic.com`).
    pub fn new(base_url: &str, key: Option<SecretString>, timeout: Duration) -> Self {
        Anthropic {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("a TLS backend is compiled in"),
            base_url: base_url.trim_end_matches('/').to_owned(),
            key,
        }
    }
}

fn body(req: &PlanRequest<'_>) -> Value {
    // The Messages API wants alternating roles; consecutive tool results go in one user message.
    let mut messages: Vec<Value> = Vec::new();
    for m in req.messages {
        match m {
            Message::User { text } => {
                messages.push(json!({"role": "user", "content": [{"type": "text", "text": text}]}))
            }
            Message::Assistant { text, tool_calls } => {
                let mut content = Vec::new();
                if let Some(t) = text {
                    content.push(json!({"type": "text", "text": t}));
                }
                for c in tool_calls {
                    content.push(json!({"type": "tool_use", "id": c.id, "name": wire_tool_name(&c.name), "input": c.arguments}));
                }
                messages.push(json!({"role": "assistant", "content": content}));
            }
            Message::Tool {
                call_id, content, ..
            } => {
                let block =
                    json!({"type": "tool_result", "tool_use_id": call_id, "content": content});
                match messages.last_mut() {
                    Some(last)
                        if last["role"] == "user"
                            && last["content"][0]["type"] == "tool_result" =>
                    {
                        last["content"]
                            .as_array_mut()
                            .expect("content is an array")
                            .push(block);
                    }
                    _ => messages.push(json!({"role": "user", "content": [block]})),
                }
            }
        }
    }
    let mut body = json!({
        "model": req.llm.default_model,
        "system": req.system,
        "messages": messages,
        "max_tokens": req.llm.default_max_tokens,
        "temperature": f64::from(req.llm.default_temperature_milli) / 1000.0,
    });
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| json!({"name": wire_tool_name(&t.name), "description": t.description, "input_schema": t.parameters}))
            .collect();
    }
    body
}

/// `unknown` is what an answer without usage fields is counted as: the request's estimate (its
/// prompt, and the most it asked for), since the provider bills it all the same.
fn parse(v: &Value, unknown: (u64, u64)) -> Result<Plan, PlannerError> {
    let blocks = v["content"]
        .as_array()
        .ok_or_else(|| PlannerError::Malformed("no content".into()))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(ToolCall {
                id: b["id"].as_str().unwrap_or("call").to_owned(),
                name: capability_from_wire(b["name"].as_str().unwrap_or_default()),
                arguments: b["input"].clone(),
            }),
            _ => {}
        }
    }
    let reply = if calls.is_empty() {
        Reply::Final(text)
    } else {
        Reply::Tools {
            text: Some(text).filter(|t| !t.is_empty()),
            calls,
        }
    };
    Ok(Plan {
        reply,
        tokens_in: v["usage"]["input_tokens"].as_u64().unwrap_or(unknown.0),
        tokens_out: v["usage"]["output_tokens"].as_u64().unwrap_or(unknown.1),
        provider: "anthropic".into(),
        model: v["model"].as_str().unwrap_or_default().to_owned(),
    })
}

#[async_trait::async_trait]
impl Planner for Anthropic {
    fn provider(&self) -> &str {
        "anthropic"
    }

    fn estimate_tokens(&self, req: &PlanRequest<'_>) -> u64 {
        estimate_prompt_tokens(req) + u64::from(req.llm.default_max_tokens)
    }

    async fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, PlannerError> {
        let mut http = self
            .http
            .post(format!("{}/v1/messages", self.base_url))
            .header("anthropic-version", VERSION)
            .json(&body(req));
        if let Some(key) = &self.key {
            http = http.header("x-api-key", key.expose_secret());
        }
        let unknown = (
            estimate_prompt_tokens(req),
            u64::from(req.llm.default_max_tokens),
        );
        send_and_parse(http, &req.llm.default_model, |v| parse(v, unknown)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tool_use_and_usage() {
        let v = json!({
            "model": "claude-3-5-haiku-latest",
            "content": [{"type": "text", "text": "Saving."}, {"type": "tool_use", "id": "tu1", "name": "memory__save", "input": {"subject": "a", "fact": "b"}}],
            "usage": {"input_tokens": 20, "output_tokens": 7}
        });
        let p = parse(&v, (0, 0)).unwrap();
        // An answer without usage is billed all the same: it counts as the request's estimate.
        let mut bare = v.clone();
        bare.as_object_mut().unwrap().remove("usage");
        let p2 = parse(&bare, (900, 100)).unwrap();
        assert_eq!((p2.tokens_in, p2.tokens_out), (900, 100));
        assert_eq!((p.tokens_in, p.tokens_out), (20, 7));
        match p.reply {
            Reply::Tools { text, calls } => {
                assert_eq!(text.as_deref(), Some("Saving."));
                assert_eq!(calls[0].name, "memory.save");
            }
            other => panic!("{other:?}"),
        }
    }
}
