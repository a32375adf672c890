//! The `rules` planner: no network, deterministic. It understands a small command language and
//! turns each command into tool calls through the same gate, so the whole loop runs with no model.

use serde_json::json;

use super::planner::{Message, Plan, PlanRequest, Planner, PlannerError, Reply, ToolCall};

/// The help text, also the answer to anything the rules do not understand.
pub const HELP: &str = "I understand: help, remember <subject>: <fact>, recall <subject>, forget <subject>, tools, budget, audit status, whoami.";

/// The rules planner.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rules;

fn call(req: &PlanRequest<'_>, name: &str, arguments: serde_json::Value) -> Reply {
    if !req.tools.iter().any(|t| t.name == name) {
        return Reply::Final(format!("You do not have access to {name}."));
    }
    Reply::Tools {
        text: None,
        calls: vec![ToolCall {
            id: "call_0".into(),
            name: name.into(),
            arguments,
        }],
    }
}

/// Plans the reply to one command.
fn reply(req: &PlanRequest<'_>) -> Reply {
    // After tool results, the answer is what the tools said.
    if let Some(Message::Tool { .. }) = req.messages.last() {
        let answers: Vec<&str> = req
            .messages
            .iter()
            .rev()
            .take_while(|m| matches!(m, Message::Tool { .. }))
            .filter_map(|m| match m {
                Message::Tool { content, .. } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        return Reply::Final(answers.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let text = req
        .messages
        .iter()
        .rev()
        .find_map(|m| match m {
            Message::User { text } => Some(text.trim()),
            _ => None,
        })
        .unwrap_or_default();
    let lower = text.to_lowercase();
    let (verb, rest) = match text.split_once(char::is_whitespace) {
        Some((v, r)) => (v.to_lowercase(), r.trim()),
        None => (lower.clone(), ""),
    };
    match verb.as_str() {
        "help" | "" => Reply::Final(HELP.into()),
        "whoami" => Reply::Final(format!(
            "You are {} with role {} in {}.",
            req.caller.principal, req.caller.role, req.caller.tenant_name
        )),
        "tools" => {
            let names: Vec<&str> = req.tools.iter().map(|t| t.name.as_str()).collect();
            Reply::Final(if names.is_empty() {
                "No tools are available to you.".into()
            } else {
                format!("Your tools: {}.", names.join(", "))
            })
        }
        "budget" => call(req, "budget.status", json!({})),
        "audit" if rest.eq_ignore_ascii_case("status") => call(req, "audit.status", json!({})),
        "remember" => match rest.split_once(':') {
            Some((subject, fact)) if !subject.trim().is_empty() && !fact.trim().is_empty() => call(
                req,
                "memory.save",
                json!({"subject": subject.trim(), "fact": fact.trim()}),
            ),
            _ => Reply::Final("Usage: remember <subject>: <fact>".into()),
        },
        "recall" if !rest.is_empty() => call(req, "memory.recall", json!({"subject": rest})),
        "forget" if !rest.is_empty() => call(req, "memory.forget", json!({"subject": rest})),
        "recall" | "forget" => Reply::Final(format!("Usage: {verb} <subject>")),
        _ => Reply::Final(format!("I did not understand that. {HELP}")),
    }
}

/// The rules' model name, whatever the tenant's default model is: they never ask a model.
const MODEL: &str = "rules-v1";

#[async_trait::async_trait]
impl Planner for Rules {
    fn provider(&self) -> &str {
        super::pricing::RULES_PROVIDER
    }

    fn model(&self, _req: &PlanRequest<'_>) -> String {
        MODEL.into()
    }

    fn estimate_tokens(&self, _req: &PlanRequest<'_>) -> u64 {
        0
    }

    async fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, PlannerError> {
        Ok(Plan {
            reply: reply(req),
            tokens_in: 0,
            tokens_out: 0,
            provider: super::pricing::RULES_PROVIDER.into(),
            model: MODEL.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::planner::{Caller, ToolSpec};
    use crate::tenant::TenantSettings;

    fn check(input: &str, tools: &[&str], expect: Reply) {
        let specs: Vec<ToolSpec> = tools
            .iter()
            .map(|n| ToolSpec {
                name: (*n).into(),
                description: String::new(),
                parameters: json!({}),
            })
            .collect();
        let messages = vec![Message::User { text: input.into() }];
        let llm = TenantSettings::defaults("t").llm;
        let caller = Caller {
            principal: "slack:U1".into(),
            role: "member".into(),
            tenant_name: "acme".into(),
        };
        let req = PlanRequest {
            system: "",
            messages: &messages,
            tools: &specs,
            llm: &llm,
            caller: &caller,
        };
        assert_eq!(reply(&req), expect, "input {input:?}");
    }

    fn tool(name: &str, args: serde_json::Value) -> Reply {
        Reply::Tools {
            text: None,
            calls: vec![ToolCall {
                id: "call_0".into(),
                name: name.into(),
                arguments: args,
            }],
        }
    }

    #[test]
    fn commands_become_tool_calls() {
        let all = [
            "memory.save",
            "memory.recall",
            "memory.forget",
            "budget.status",
            "audit.status",
        ];
        check("help", &all, Reply::Final(HELP.into()));
        check(
            "remember Dog: is called Rex",
            &all,
            tool(
                "memory.save",
                json!({"subject": "Dog", "fact": "is called Rex"}),
            ),
        );
        check(
            "recall dog",
            &all,
            tool("memory.recall", json!({"subject": "dog"})),
        );
        check(
            "forget dog",
            &all,
            tool("memory.forget", json!({"subject": "dog"})),
        );
        check("budget", &all, tool("budget.status", json!({})));
        check("Audit Status", &all, tool("audit.status", json!({})));
        check(
            "whoami",
            &all,
            Reply::Final("You are slack:U1 with role member in acme.".into()),
        );
        check(
            "tools",
            &["memory.recall"],
            Reply::Final("Your tools: memory.recall.".into()),
        );
        check(
            "tools",
            &[],
            Reply::Final("No tools are available to you.".into()),
        );
        check(
            "remember nothing",
            &all,
            Reply::Final("Usage: remember <subject>: <fact>".into()),
        );
        check(
            "recall",
            &all,
            Reply::Final("Usage: recall <subject>".into()),
        );
        check(
            "audit status",
            &["memory.save"],
            Reply::Final("You do not have access to audit.status.".into()),
        );
        check(
            "dance",
            &all,
            Reply::Final(format!("I did not understand that. {HELP}")),
        );
    }
}
