//! An OpenAI-compatible Chat Completions client with tool calling (OpenAI, Azure OpenAI, Ollama,
//! vLLM, llama.cpp's server): base URL, key and model are configurable.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::planner::{
    capability_from_wire, estimate_prompt_tokens, send_and_parse, wire_tool_name, Message, Plan,
    PlanRequest, Planner, PlannerError, Reply, ToolCall,
};

/// A Chat Completions client.
pub struct OpenAi {
    http: reqwest::Client,
    base_url: String,
    key: Option<SecretString>,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl OpenAi {
    /// A client for `base_url` (for example `https://api.openai.com/v1`), sending `key` as a bearer
    /// token when there is one (local servers often need none).
    pub fn new(base_url: &str, key: Option<SecretString>, timeout: Duration) -> Self {
        OpenAi {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("a TLS backend is compiled in"),
            base_url: base_url.trim_end_matches('/').to_owned(),
            key,
        }
    }
}

/// The request body for one step.
fn body(req: &PlanRequest<'_>) -> Value {
    let mut messages = vec![json!({"role": "system", "content": req.system})];
    for m in req.messages {
        messages.push(match m {
            Message::User { text } => json!({"role": "user", "content": text}),
            Message::Assistant { text, tool_calls } => {
                let mut v = json!({"role": "assistant", "content": text});
                if !tool_calls.is_empty() {
                    v["tool_calls"] = tool_calls
                        .iter()
                        .map(|c| {
                            json!({
                                "id": c.id,
                                "type": "function",
                                "function": {"name": wire_tool_name(&c.name), "arguments": c.arguments.to_string()},
                            })
                        })
                        .collect();
                }
                v
            }
            Message::Tool { call_id, content, .. } => {
                json!({"role": "tool", "tool_call_id": call_id, "content": content})
            }
        });
    }
    let mut body = json!({
        "model": req.llm.default_model,
        "messages": messages,
        "temperature": f64::from(req.llm.default_temperature_milli) / 1000.0,
        "max_tokens": req.llm.default_max_tokens,
    });
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {"name": wire_tool_name(&t.name), "description": t.description, "parameters": t.parameters},
                })
            })
            .collect();
    }
    body
}

/// Reads a Chat Completions response.
/// `unknown` is what an answer without usage fields is counted as: the request's estimate (its
/// prompt, and the most it asked for), since the provider bills it all the same.
fn parse(v: &Value, unknown: (u64, u64)) -> Result<Plan, PlannerError> {
    let bad = |why: &str| PlannerError::Malformed(why.to_owned());
    let msg = v["choices"]
        .get(0)
        .map(|c| &c["message"])
        .ok_or_else(|| bad("no choices"))?;
    let text = msg["content"]
        .as_str()
        .map(str::to_owned)
        .filter(|t| !t.is_empty());
    let mut calls = Vec::new();
    if let Some(list) = msg["tool_calls"].as_array() {
        for c in list {
            let name = c["function"]["name"]
                .as_str()
                .ok_or_else(|| bad("a tool call has no name"))?;
            let raw = c["function"]["arguments"].as_str().unwrap_or("{}");
            // A model may produce arguments that are not JSON; the call then fails validation
            // against the tool's schema, which the model hears about, instead of failing the run.
            let arguments = serde_json::from_str(raw).unwrap_or(Value::String(raw.to_owned()));
            calls.push(ToolCall {
                id: c["id"].as_str().unwrap_or("call").to_owned(),
                name: capability_from_wire(name),
                arguments,
            });
        }
    }
    let reply = if calls.is_empty() {
        Reply::Final(text.unwrap_or_default())
    } else {
        Reply::Tools { text, calls }
    };
    Ok(Plan {
        reply,
        tokens_in: v["usage"]["prompt_tokens"].as_u64().unwrap_or(unknown.0),
        tokens_out: v["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(unknown.1),
        provider: "openai".into(),
        model: v["model"].as_str().unwrap_or_default().to_owned(),
    })
}

#[async_trait::async_trait]
impl Planner for OpenAi {
    fn provider(&self) -> &str {
        "openai"
    }

    fn estimate_tokens(&self, req: &PlanRequest<'_>) -> u64 {
        estimate_prompt_tokens(req) + u64::from(req.llm.default_max_tokens)
    }

    async fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, PlannerError> {
        let mut http = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .json(&body(req));
        if let Some(key) = &self.key {
            http = http.bearer_auth(key.expose_secret());
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
    fn parses_tool_calls_and_usage() {
        let v = json!({
            "model": "gpt-4o-mini",
            "choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "memory__save", "arguments": "{\"subject\":\"a\",\"fact\":\"b\"}"}}
            ]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3}
        });
        let p = parse(&v, (0, 0)).unwrap();
        // An answer without usage is billed all the same: it counts as the request's estimate.
        let mut bare = v.clone();
        bare.as_object_mut().unwrap().remove("usage");
        let p2 = parse(&bare, (900, 100)).unwrap();
        assert_eq!((p2.tokens_in, p2.tokens_out), (900, 100));
        assert_eq!((p.tokens_in, p.tokens_out), (12, 3));
        match p.reply {
            Reply::Tools { calls, .. } => {
                assert_eq!(calls[0].name, "memory.save");
                assert_eq!(calls[0].arguments, json!({"subject": "a", "fact": "b"}));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&json!({"choices": []}), (0, 0)).is_err());
    }
}
