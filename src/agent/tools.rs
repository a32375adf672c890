//! Tool capabilities and their per-tenant bindings: `resolve` gives the bindings a context may use,
//! and only those are ever shown to the planner. Built in: memory, budget and audit status; per
//! tenant: webhook tools (see `webhook`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use chrono::Utc;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::planner::ToolSpec;
use super::webhook::WebhookBinding;
use crate::audit::log::AuditLog;
use crate::store::{Fact, StoreError, TenantStore, WebhookTool};
use crate::tenant::{Budget, Role, TenantContext, TenantId};

/// What a tool sees of the run that calls it.
pub struct ToolCall<'a> {
    /// The run's context.
    pub ctx: &'a TenantContext,
    /// The tenant's repositories.
    pub repo: &'a TenantStore,
    /// `<run id>:<step>:<call index>`: the same for a retried call, different for every other.
    pub idempotency_key: &'a str,
    /// The audit log, for `audit.status`.
    pub audit: &'a AuditLog,
    /// What the run has used and may still use, for `budget.status`.
    pub budget: &'a BudgetView,
}

/// The run's budget as `budget.status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetView {
    /// The run's ceilings.
    pub ceilings: Option<Budget>,
    /// What the run used so far: tokens, tool calls, wall time, cost.
    pub used: (u64, u64, u64, u64),
    /// What remains of the tenant's monthly quota: tokens, tool calls, cost.
    pub quota_left: (u64, u64, u64),
}

/// A tool's result, shown to the planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolOutput {
    /// The result as text.
    pub content: String,
    /// What the call cost, in microcents.
    pub cost_microcents: u64,
}

/// Why a tool call failed; the message is shown to the planner, so it says nothing internal.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool itself reported a failure.
    #[error("the tool failed: {0}")]
    Failed(String),
    /// The tool did not answer in time.
    #[error("the tool did not answer in time")]
    Timeout,
    /// The store failed.
    #[error("the tool could not reach its storage")]
    Store(#[from] StoreError),
}

/// A concrete function that performs a capability for one tenant.
#[async_trait::async_trait]
pub trait ToolBinding: Send + Sync {
    /// The capability's name, description and argument schema.
    fn spec(&self) -> ToolSpec;
    /// True when the tool changes nothing (viewers may use only these).
    fn read_only(&self) -> bool;
    /// Runs the tool with arguments already validated against its schema and allowed by the gate.
    ///
    /// # Errors
    /// [`ToolError`], shown to the planner as a recoverable message.
    async fn invoke(&self, call: &ToolCall<'_>, args: &Value) -> Result<ToolOutput, ToolError>;
}

/// A binding resolved for a context, with the grant that allows it.
#[derive(Clone)]
pub struct Resolved {
    /// The binding.
    pub binding: Arc<dyn ToolBinding>,
    /// The least role the grant requires.
    pub min_role: Role,
    /// The binding's spec, computed once.
    pub spec: ToolSpec,
    /// Its argument schema, compiled once per distinct schema; `None` if the schema does not
    /// compile (every call is then refused as having invalid arguments).
    pub validator: Option<Arc<jsonschema::Validator>>,
    /// The gate's entities for this context and tool, built at the run's first call of it.
    pub entities: OnceLock<Option<super::policy::CallEntities>>,
    /// For a webhook tool, the [`webhook_fingerprint`] of the definition the run resolved, so that
    /// a call can tell whether the tenant has changed it since.
    pub webhook: Option<[u8; 32]>,
}

/// The SHA-256 of a webhook tool's definition (name, description, schema as compact JSON, URL,
/// the secret when `with_secret`, and the timeout as 8 big-endian bytes), each part as its
/// 8-byte big-endian length and its bytes, so that no two definitions share one.
fn webhook_digest(w: &WebhookTool, with_secret: bool) -> [u8; 32] {
    let schema = w.schema.to_string();
    let secret = with_secret.then(|| w.secret.expose_secret().as_bytes());
    let timeout = w.timeout_ms.to_be_bytes();
    let parts = [
        Some(w.name.as_bytes()),
        Some(w.description.as_bytes()),
        Some(schema.as_bytes()),
        Some(w.url.as_bytes()),
        secret,
        Some(&timeout[..]),
    ];
    let mut h = Sha256::new();
    for part in parts.into_iter().flatten() {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The SHA-256, in hex, of a webhook tool's definition without its secret, for the audit log
/// (docs/AUDIT-FORMAT.md): it shows which definition the calls after it used, and reveals
/// nothing of the secret.
pub fn webhook_definition_sha256(w: &WebhookTool) -> String {
    hex::encode(webhook_digest(w, false))
}

/// A digest of everything a webhook tool's calls depend on, its secret included, so that a call
/// can tell whether the tool changed since its run resolved it.
pub fn webhook_fingerprint(w: &WebhookTool) -> [u8; 32] {
    webhook_digest(w, true)
}

impl Resolved {
    /// Checks arguments against the tool's schema.
    ///
    /// # Errors
    /// The first violation, in words for the planner.
    /// `json_len` is the length of `args` as compact JSON, which the caller has at hand.
    pub fn validate(&self, args: &Value, json_len: usize) -> Result<(), String> {
        let v = self
            .validator
            .as_ref()
            .ok_or("the tool's schema is invalid")?;
        if json_len > MAX_ARGUMENTS_BYTES {
            return Err(format!(
                "the arguments are larger than {MAX_ARGUMENTS_BYTES} bytes"
            ));
        }
        let first = v.iter_errors(args).next().map(|e| e.to_string());
        first.map_or(Ok(()), Err)
    }
}

/// Normalises a memory subject so `Dog` and ` dog ` are one subject.
fn subject(args: &Value) -> String {
    args["subject"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}

struct MemorySave;
struct MemoryRecall;
struct MemoryForget;
struct BudgetStatus;
struct AuditStatus;

fn subject_schema(with_fact: bool) -> Value {
    let mut props = json!({"subject": {"type": "string", "minLength": 1, "maxLength": 200}});
    let mut required = vec!["subject"];
    if with_fact {
        props["fact"] = json!({"type": "string", "minLength": 1, "maxLength": 4000});
        required.push("fact");
    }
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

fn no_args() -> Value {
    json!({"type": "object", "properties": {}, "additionalProperties": false})
}

#[async_trait::async_trait]
impl ToolBinding for MemorySave {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "memory.save".into(),
            description: "Remember a fact about a subject for this workspace.".into(),
            parameters: subject_schema(true),
        }
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn invoke(&self, call: &ToolCall<'_>, args: &Value) -> Result<ToolOutput, ToolError> {
        let subject = subject(args);
        call.repo.memory().save_fact(&Fact {
            subject: subject.clone(),
            fact: args["fact"].as_str().unwrap_or_default().trim().to_owned(),
            saved_by: call.ctx.principal().to_string(),
            saved_at: Utc::now(),
        })?;
        Ok(ToolOutput {
            content: format!("Remembered that about {subject}."),
            cost_microcents: 0,
        })
    }
}

#[async_trait::async_trait]
impl ToolBinding for MemoryRecall {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "memory.recall".into(),
            description: "Recall the facts remembered about a subject in this workspace.".into(),
            parameters: subject_schema(false),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    async fn invoke(&self, call: &ToolCall<'_>, args: &Value) -> Result<ToolOutput, ToolError> {
        let subject = subject(args);
        let facts = call.repo.memory().recall(&subject)?;
        let content = if facts.is_empty() {
            format!("I know nothing about {subject}.")
        } else {
            let list: Vec<String> = facts.iter().map(|f| format!("- {}", f.fact)).collect();
            format!("About {subject}:\n{}", list.join("\n"))
        };
        Ok(ToolOutput {
            content,
            cost_microcents: 0,
        })
    }
}

#[async_trait::async_trait]
impl ToolBinding for MemoryForget {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "memory.forget".into(),
            description: "Forget every fact about a subject in this workspace.".into(),
            parameters: subject_schema(false),
        }
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn invoke(&self, call: &ToolCall<'_>, args: &Value) -> Result<ToolOutput, ToolError> {
        let subject = subject(args);
        let n = call.repo.memory().forget(&subject)?;
        Ok(ToolOutput {
            content: format!("Forgot {n} facts about {subject}."),
            cost_microcents: 0,
        })
    }
}

#[async_trait::async_trait]
impl ToolBinding for BudgetStatus {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "budget.status".into(),
            description: "Show this run's budget and the workspace's remaining monthly quota."
                .into(),
            parameters: no_args(),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    async fn invoke(&self, call: &ToolCall<'_>, _args: &Value) -> Result<ToolOutput, ToolError> {
        let b = call.budget;
        let c = b
            .ceilings
            .clone()
            .unwrap_or_else(|| call.ctx.budget().clone());
        Ok(ToolOutput {
            content: format!(
                "This run: {} of {} tokens, {} of {} tool calls, {} of {} ms, {} of {} microcents. This month's quota left: {} tokens, {} tool calls, {} microcents.",
                b.used.0, c.tokens, b.used.1, c.tool_calls, b.used.2, c.walltime_ms, b.used.3, c.cost_microcents,
                b.quota_left.0, b.quota_left.1, b.quota_left.2
            ),
            cost_microcents: 0,
        })
    }
}

#[async_trait::async_trait]
impl ToolBinding for AuditStatus {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "audit.status".into(),
            description: "Show the audit log's size, Merkle root and last signed checkpoint."
                .into(),
            parameters: no_args(),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    async fn invoke(&self, call: &ToolCall<'_>, _args: &Value) -> Result<ToolOutput, ToolError> {
        let head = call
            .audit
            .head(call.ctx, call.repo.clone())
            .await
            .map_err(|_| ToolError::Failed("the audit log could not be read".into()))?;
        let last = head
            .checkpoint
            .as_deref()
            .and_then(|n| n.lines().nth(1))
            .map_or("none yet".to_owned(), |size| format!("at size {size}"));
        Ok(ToolOutput {
            content: format!(
                "Audit log: {} events, root {}, last signed checkpoint {last}.",
                head.size,
                hex::encode(head.root)
            ),
            cost_microcents: 0,
        })
    }
}

/// The built-in capability named `name`, if there is one.
fn builtin(name: &str) -> Option<Arc<dyn ToolBinding>> {
    Some(match name {
        "memory.save" => Arc::new(MemorySave),
        "memory.recall" => Arc::new(MemoryRecall),
        "memory.forget" => Arc::new(MemoryForget),
        "budget.status" => Arc::new(BudgetStatus),
        "audit.status" => Arc::new(AuditStatus),
        _ => return None,
    })
}

/// The prefix of webhook tool capabilities.
pub const WEBHOOK_PREFIX: &str = "webhook.";

/// Compiled argument validators kept at most; the cache is simply emptied when it grows past this.
const COMPILED_CACHE: usize = 1024;

/// The validator of a tool's parameter schema, compiled once per distinct schema and owner:
/// compiling the built-in tools' schemas for every run was 4% of the loop's CPU with 32 concurrent
/// runs. Keyed by the SHA-256 of the owning tenant's id (none for a built-in tool) and the schema's
/// text, so a changed webhook schema is compiled afresh and no tenant's entry serves another (not
/// even as a faster first run that would tell it someone has the same schema). This caches
/// compilation only; every call's arguments are still checked. `None` for a schema that does not
/// compile (not cached, so it is tried again).
fn compiled(owner: Option<&TenantId>, schema: &Value) -> Option<Arc<jsonschema::Validator>> {
    static CACHE: OnceLock<Mutex<HashMap<[u8; 32], Arc<jsonschema::Validator>>>> = OnceLock::new();
    let mut h = Sha256::new();
    h.update(owner.map_or("", |t| t.as_str()).as_bytes());
    h.update([0]);
    h.update(schema.to_string().as_bytes());
    let key: [u8; 32] = h.finalize().into();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        return Some(Arc::clone(v));
    }
    let v = Arc::new(compile_schema(schema).ok()?);
    let mut c = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if c.len() >= COMPILED_CACHE {
        c.clear();
    }
    c.insert(key, Arc::clone(&v));
    Some(v)
}

/// The largest argument schema a webhook tool may declare, in bytes of compact JSON.
pub const MAX_SCHEMA_BYTES: usize = 16 * 1024;
/// The deepest nesting of objects and arrays a webhook tool's schema may have.
pub const MAX_SCHEMA_DEPTH: usize = 16;
/// The largest arguments checked against a schema, in bytes of compact JSON (a model can write
/// more; such a call is refused as having invalid arguments before its schema is tried).
pub const MAX_ARGUMENTS_BYTES: usize = 64 * 1024;

/// Whether a tenant's schema is one the gateway can check every call against in bounded time:
/// small and shallow, with no reference (`$ref`, `$dynamicRef`, `$recursiveRef`). The schema
/// library compiles a reference again each time validation reaches it, so two definitions that
/// refer to each other recurse until the stack overflows, which aborts the process for every
/// tenant, and a chain of definitions that each refer twice to the next doubles the work at every
/// level. Its patterns are compiled with the `regex` engine (linear time, no backtracking), and
/// its size bounds the rest. Checked when the tool is declared and again whenever it is compiled,
/// so a schema stored before these limits refuses its calls instead.
///
/// # Errors
/// What is wrong, in words for the admin.
pub fn schema_within_limits(schema: &Value) -> Result<(), String> {
    fn walk(v: &Value, depth: usize) -> Result<(), String> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!(
                "the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels"
            ));
        }
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    if matches!(k.as_str(), "$ref" | "$dynamicRef" | "$recursiveRef") {
                        return Err(format!(
                            "the schema uses {k}; write the definition where it is used"
                        ));
                    }
                    walk(child, depth + 1)?;
                }
                Ok(())
            }
            Value::Array(a) => a.iter().try_for_each(|c| walk(c, depth + 1)),
            _ => Ok(()),
        }
    }
    if schema.to_string().len() > MAX_SCHEMA_BYTES {
        return Err(format!(
            "the schema is larger than {MAX_SCHEMA_BYTES} bytes"
        ));
    }
    walk(schema, 0)
}

/// Compiles an argument schema within [`schema_within_limits`], its patterns with the `regex`
/// engine (at most 1 MiB each compiled).
///
/// # Errors
/// Why it cannot be used, in words for the admin.
pub fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, String> {
    schema_within_limits(schema)?;
    jsonschema::options()
        .with_pattern_options(jsonschema::PatternOptions::regex().size_limit(1 << 20))
        .build(schema)
        .map_err(|e| format!("the schema is invalid: {e}"))
}

/// Resolves the bindings the context may use: every capability granted to the tenant at a role the
/// principal holds, that exists (a built-in, or one of the tenant's own webhook tools).
///
/// # Errors
/// [`StoreError`] when the grants or the webhook tools cannot be read.
pub fn resolve(
    ctx: &TenantContext,
    repo: &TenantStore,
    client: &super::egress::WebhookClient,
) -> Result<Vec<Resolved>, StoreError> {
    let grants = repo.grants().list()?;
    let webhooks = if grants
        .iter()
        .any(|g| g.capability.starts_with(WEBHOOK_PREFIX))
    {
        repo.webhooks().webhooks()?
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for g in grants {
        if !ctx.role().at_least(g.min_role) {
            continue;
        }
        let webhook = g.capability.strip_prefix(WEBHOOK_PREFIX);
        let mut fingerprint = None;
        let binding = match webhook {
            Some(name) => webhooks.iter().find(|w| w.name == name).map(|w| {
                fingerprint = Some(webhook_fingerprint(w));
                Arc::new(WebhookBinding::new(w.clone(), client.clone())) as Arc<dyn ToolBinding>
            }),
            None => builtin(&g.capability),
        };
        if let Some(binding) = binding {
            let spec = binding.spec();
            let owner = webhook.map(|_| ctx.tenant_id());
            let validator = compiled(owner, &spec.parameters);
            // A tool whose schema cannot be used (stored before the schema limits, say) is not
            // shown: every call of it would be refused, spending the run's steps.
            if validator.is_none() {
                tracing::warn!(tenant = %ctx.tenant_id(), capability = %g.capability, "a granted tool's schema cannot be used; the tool is not shown until it is declared again");
                continue;
            }
            out.push(Resolved {
                binding,
                min_role: g.min_role,
                spec,
                validator,
                entities: OnceLock::new(),
                webhook: fingerprint,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_validators_are_shared_per_owner_and_schema_only() {
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let of = |owner: Option<&TenantId>| compiled(owner, &schema).expect("compiles");
        assert!(Arc::ptr_eq(&of(Some(&a)), &of(Some(&a))), "compiled once");
        assert!(
            Arc::ptr_eq(&of(None), &of(None)),
            "a built-in's once for all"
        );
        assert!(
            !Arc::ptr_eq(&of(Some(&a)), &of(Some(&b))),
            "never another tenant's"
        );
        assert!(!Arc::ptr_eq(&of(Some(&a)), &of(None)));
        let other = json!({"type": "object", "required": ["n"]});
        let v = compiled(Some(&a), &other).unwrap();
        assert!(!v.is_valid(&json!({})), "another schema, another validator");
        assert!(of(Some(&a)).is_valid(&json!({})));
        assert!(
            compiled(None, &json!({"type": 7})).is_none(),
            "a bad schema"
        );
    }

    /// A schema that refers to itself through another definition overflowed the stack when a call
    /// was checked (aborting the process); references are refused, as are very large or deep
    /// schemas, and patterns run without backtracking.
    #[test]
    fn schemas_that_validation_could_not_bound_are_refused() {
        let cycle = json!({
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/a"}},
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}
        });
        assert_eq!(
            compile_schema(&cycle).err().unwrap(),
            "the schema uses $ref; write the definition where it is used"
        );
        assert!(
            compiled(None, &cycle).is_none(),
            "nor compiled for a stored one"
        );
        for key in ["$dynamicRef", "$recursiveRef"] {
            let s = json!({"type": "object", "properties": {"p": {key: "#"}}});
            assert!(compile_schema(&s).is_err(), "{key}");
        }
        let mut deep = json!({"type": "string"});
        for _ in 0..MAX_SCHEMA_DEPTH {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(compile_schema(&deep).unwrap_err().contains("nested deeper"));
        let big = json!({"type": "object", "description": "x".repeat(MAX_SCHEMA_BYTES)});
        assert!(compile_schema(&big).unwrap_err().contains("larger than"));
        // Patterns use the regex engine, which cannot backtrack: one that needs backtracking
        // (a backreference) is refused when declared, where the default engine took it.
        let backref =
            json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "(a)\\1"}}});
        assert!(compile_schema(&backref).is_err());
    }
}
