//! The `Planner` trait: given the conversation and the tools this run may use, the model (or the
//! rules) answers or asks for tool calls. Also the neutral message types every provider maps from.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tenant::LlmSettings;

/// A tool as the planner sees it: only bindings resolved for this tenant and role are ever shown.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    /// The capability name, such as `memory.save`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// The JSON Schema of its arguments.
    pub parameters: Value,
}

/// A tool call the planner asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call, echoed back with the result.
    pub id: String,
    /// The capability name.
    pub name: String,
    /// The arguments, as JSON.
    pub arguments: Value,
}

/// One message of a run's transcript.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    /// What the user said (this turn, or an earlier turn from the conversation history).
    User {
        /// The text.
        text: String,
    },
    /// What the planner said: text, tool calls, or both.
    Assistant {
        /// The text, if any.
        text: Option<String>,
        /// The tool calls, if any.
        tool_calls: Vec<ToolCall>,
    },
    /// A tool's result (or a refusal, or an error), for the call with `call_id`.
    Tool {
        /// The call this answers.
        call_id: String,
        /// The capability.
        name: String,
        /// The result as text.
        content: String,
    },
}

/// Who is asking, so the planner can answer `whoami` without seeing the context itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The principal.
    pub principal: String,
    /// Its role.
    pub role: String,
    /// The tenant's name.
    pub tenant_name: String,
}

/// What a planner is given for one step.
#[derive(Clone, Debug)]
pub struct PlanRequest<'a> {
    /// The system prompt.
    pub system: &'a str,
    /// The transcript so far.
    pub messages: &'a [Message],
    /// The tools this run may use.
    pub tools: &'a [ToolSpec],
    /// The tenant's model settings.
    pub llm: &'a LlmSettings,
    /// Who is asking.
    pub caller: &'a Caller,
}

/// The planner's answer for one step.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// The run is done; this is the answer.
    Final(String),
    /// Call these tools, then plan again.
    Tools {
        /// Text the model said alongside, if any.
        text: Option<String>,
        /// The calls, in order.
        calls: Vec<ToolCall>,
    },
}

/// A planned step with its accounting.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// What to do.
    pub reply: Reply,
    /// Prompt tokens, from the provider's usage.
    pub tokens_in: u64,
    /// Completion tokens, from the provider's usage.
    pub tokens_out: u64,
    /// The provider's name.
    pub provider: String,
    /// The model that answered.
    pub model: String,
}

/// Why a planner could not plan.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// The provider could not be reached: nothing was sent.
    #[error("the model provider could not be reached: {0}")]
    Transport(String),
    /// The request may have reached the provider, but its answer did not arrive whole (a timeout,
    /// a connection lost after sending): the provider may bill it.
    #[error("the model provider's answer was cut off: {0}")]
    Interrupted(String),
    /// The provider answered with an error status.
    #[error("the model provider answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// What kind of error the provider named (its `error.type` and `error.code`), never its
        /// free text: a provider or a proxy may quote the request, prompt included, and this
        /// goes to the logs.
        message: String,
    },
    /// The provider's answer did not have the expected shape.
    #[error("the model provider's answer was malformed: {0}")]
    Malformed(String),
    /// The tenant's settings name a provider or key that is not configured.
    #[error("the model is not configured: {0}")]
    NotConfigured(String),
}

impl PlannerError {
    /// Whether the provider may have billed the call: it may have reached the provider
    /// ([`PlannerError::Interrupted`]) or was answered with a success status that did not read
    /// ([`PlannerError::Malformed`]). Such a call is counted at its estimate.
    pub fn may_have_cost(&self) -> bool {
        matches!(
            self,
            PlannerError::Interrupted(_) | PlannerError::Malformed(_)
        )
    }
}

/// A model provider, or the rules.
#[async_trait::async_trait]
pub trait Planner: Send + Sync {
    /// The provider's name, as audited.
    fn provider(&self) -> &str;
    /// The model the next call asks for, as `model.requested` records it before the call (the
    /// model that answers is in the plan).
    fn model(&self, req: &PlanRequest<'_>) -> String {
        req.llm.default_model.clone()
    }
    /// A conservative estimate of the tokens the next call may use, for the budget check before it.
    fn estimate_tokens(&self, req: &PlanRequest<'_>) -> u64;
    /// Plans one step.
    ///
    /// # Errors
    /// [`PlannerError`] when the provider fails.
    async fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, PlannerError>;
}

/// A token estimate of a request, used for the budget checks before a call (the accounting
/// afterwards uses the provider's own usage fields). Text in ASCII counts four bytes a token, the
/// usual rule for English and code; every byte outside ASCII counts a token of its own, since a
/// byte-level tokenizer never makes more tokens than bytes and scripts such as Georgian or CJK
/// come to one or more tokens a character (three bytes), where a quarter of their bytes would be
/// half the truth or less; and each message adds four tokens for its framing. ASCII written to
/// defeat the tokenizer (long hex or base64) can still take more than a quarter of its bytes: then
/// the call is settled at its real usage, and only that call can pass a ceiling, by the
/// difference.
pub fn estimate_prompt_tokens(req: &PlanRequest<'_>) -> u64 {
    fn weigh(text: &str, ascii: &mut u64, other: &mut u64) {
        let non_ascii = text.bytes().filter(|b| !b.is_ascii()).count() as u64;
        *other += non_ascii;
        *ascii += text.len() as u64 - non_ascii;
    }
    let (mut ascii, mut other) = (0u64, 0u64);
    weigh(req.system, &mut ascii, &mut other);
    for m in req.messages {
        match m {
            Message::User { text } => weigh(text, &mut ascii, &mut other),
            Message::Assistant { text, tool_calls } => {
                weigh(text.as_deref().unwrap_or(""), &mut ascii, &mut other);
                for c in tool_calls {
                    weigh(&c.name, &mut ascii, &mut other);
                    weigh(&c.arguments.to_string(), &mut ascii, &mut other);
                }
            }
            Message::Tool { content, .. } => weigh(content, &mut ascii, &mut other),
        }
    }
    for t in req.tools {
        weigh(&t.name, &mut ascii, &mut other);
        weigh(&t.description, &mut ascii, &mut other);
        weigh(&t.parameters.to_string(), &mut ascii, &mut other);
    }
    let framing = 4 * (req.messages.len() as u64 + 1);
    ascii.div_ceil(4) + other + framing + 16
}

/// Provider tool names allow only `[A-Za-z0-9_-]`, so capabilities travel with `.` written as `__`.
pub fn wire_tool_name(capability: &str) -> String {
    capability.replace('.', "__")
}

/// The inverse of [`wire_tool_name`].
pub fn capability_from_wire(name: &str) -> String {
    name.replace("__", ".")
}

/// The identifiers of a provider's error answer (OpenAI's `{"error": {"type", "code"}}`,
/// Anthropic's `{"error": {"type"}}`), each only if it looks like one (up to 64 of letters,
/// digits, `_ . -`); the message beside them, which may quote the request, is left out.
fn error_kind(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let ident = |v: &Value| {
        v.as_str()
            .filter(|s| {
                (1..=64).contains(&s.len())
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            })
            .map(str::to_owned)
    };
    let kinds: Vec<String> = [&v["error"]["type"], &v["error"]["code"]]
        .into_iter()
        .filter_map(ident)
        .collect();
    if kinds.is_empty() {
        format!("an answer of {} bytes without an error type", body.len())
    } else {
        kinds.join(", ")
    }
}

/// Sends a provider request and reads its JSON answer; a non-2xx status is an error carrying the
/// kind of error the provider named. `parse` turns the answer into a plan; a plan that names no
/// model gets the requested one.
///
/// # Errors
/// [`PlannerError`].
pub async fn send_and_parse(
    http: reqwest::RequestBuilder,
    default_model: &str,
    parse: impl FnOnce(&Value) -> Result<Plan, PlannerError>,
) -> Result<Plan, PlannerError> {
    // Only a failure to connect sent nothing; any later one may have reached the provider.
    let sent = |e: reqwest::Error| {
        if e.is_connect() {
            PlannerError::Transport(e.without_url().to_string())
        } else {
            PlannerError::Interrupted(e.without_url().to_string())
        }
    };
    let resp = http.send().await.map_err(sent)?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| PlannerError::Interrupted(e.without_url().to_string()))?;
    if !status.is_success() {
        return Err(PlannerError::Status {
            status: status.as_u16(),
            message: error_kind(&text),
        });
    }
    let v: Value =
        serde_json::from_str(&text).map_err(|e| PlannerError::Malformed(e.to_string()))?;
    let mut plan = parse(&v)?;
    if plan.model.is_empty() {
        plan.model = default_model.to_owned();
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// English counts a quarter of its bytes; a script outside ASCII counts every byte, which is
    /// at least its tokens (a quarter of its bytes was half of them or less).
    #[test]
    fn the_estimate_counts_every_byte_outside_ascii() {
        let llm = crate::tenant::TenantSettings::defaults("t").llm;
        let caller = Caller {
            principal: "slack:U1".into(),
            role: "member".into(),
            tenant_name: "acme".into(),
        };
        let estimate = |text: String| {
            let messages = vec![Message::User { text }];
            estimate_prompt_tokens(&PlanRequest {
                system: "",
                messages: &messages,
                tools: &[],
                llm: &llm,
                caller: &caller,
            })
        };
        let framing = 4 * 2 + 16;
        assert_eq!(estimate("a".repeat(30_000)), 7_500 + framing);
        // "ქართული" is seven characters of three bytes each.
        let georgian = "ქართული ".repeat(1_000);
        assert_eq!(georgian.len(), 22_000);
        assert_eq!(estimate(georgian), 21_000 + 250 + framing);
    }

    /// Of a provider's error answer only its identifiers are kept: its message, which may quote
    /// the prompt, and anything that is not an identifier, are not.
    #[test]
    fn an_error_answer_keeps_its_kind_and_drops_its_text() {
        let openai = r#"{"error": {"message": "Your prompt 'the plan is ship friday' is too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}"#;
        assert_eq!(
            error_kind(openai),
            "invalid_request_error, context_length_exceeded"
        );
        let anthropic =
            r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#;
        assert_eq!(error_kind(anthropic), "overloaded_error");
        let sly = r#"{"error": {"type": "the plan is ship friday", "code": null}}"#;
        assert!(!error_kind(sly).contains("ship friday"));
        let html = "<html>the plan is ship friday</html>";
        assert_eq!(
            error_kind(html),
            format!("an answer of {} bytes without an error type", html.len())
        );
    }
}
