//! The closed, versioned set of audit events and their one canonical encoding (the leaf bytes).
//!
//! The encoding is JSON with keys sorted, no insignificant whitespace and integers only, so that an
//! independent verifier can recompute every leaf hash byte for byte (docs/AUDIT-FORMAT.md).

use std::io::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use crate::tenant::{Initiator, PrincipalKind, RunId, TenantContext, TenantId};

/// The version of the event encoding written into every event as `v`.
pub const EVENT_VERSION: u64 = 1;

/// What happened. Each variant is one event type; its name in the log is [`EventBody::type_name`].
///
/// Prompts, tool arguments and results appear only as SHA-256 hashes; secrets never appear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventBody {
    /// A tenant was created by its first installation.
    TenantProvisioned {
        /// Its human name.
        name: String,
        /// Its plan.
        plan: String,
    },
    /// An installation was stored.
    InstallationCreated {
        /// The installation id.
        installation_id: String,
        /// slack or discord.
        platform: String,
        /// The directory key of the workspace.
        workspace: String,
        /// oauth or declared.
        source: String,
    },
    /// An installation's record changed (tokens rotated, scopes changed, reinstalled).
    InstallationUpdated {
        /// The installation id.
        installation_id: String,
        /// The names of the fields that changed, never their values.
        changed: Vec<String>,
    },
    /// An installation was revoked; its tokens are never used again.
    InstallationRevoked {
        /// The installation id.
        installation_id: String,
        /// uninstalled, tokens_revoked, operator.
        reason: String,
    },
    /// Settings changed.
    SettingsChanged {
        /// The names of the settings that changed.
        fields: Vec<String>,
    },
    /// A principal was given a role.
    RoleGranted {
        /// Who.
        principal: String,
        /// Which role.
        role: String,
    },
    /// A principal lost a role.
    RoleRevoked {
        /// Who.
        principal: String,
        /// Which role.
        role: String,
    },
    /// A command arrived from a platform.
    CommandReceived {
        /// slack or discord.
        platform: String,
        /// The kind of request: slash_command, app_mention, mention, interaction.
        kind: String,
        /// SHA-256 of the command text, in hex.
        text_sha256: String,
    },
    /// A run started.
    RunStarted {
        /// SHA-256 of the prompt, in hex.
        prompt_sha256: String,
    },
    /// A model call is about to be made; appended, with everything the run did before it, before
    /// anything is sent, so that a call a crash interrupts is still on record.
    ModelRequested {
        /// The provider.
        provider: String,
        /// The model asked for.
        model: String,
        /// The run's planning step (from 0).
        step: u64,
        /// SHA-256 of the messages sent, in hex: the JSON array the run's checkpoint stores as
        /// its transcript at this step.
        prompt_sha256: String,
    },
    /// A model was called.
    ModelCalled {
        /// The provider.
        provider: String,
        /// The model.
        model: String,
        /// Prompt tokens.
        tokens_in: u64,
        /// Completion tokens.
        tokens_out: u64,
        /// Cost in microcents.
        cost_microcents: u64,
    },
    /// The gate allowed a tool call; appended before the call is made.
    ToolAuthorized {
        /// The capability.
        capability: String,
        /// SHA-256 of the arguments, in hex.
        arguments_sha256: String,
        /// The call's idempotency key (`<run id>:<step>:<index>`), sent to the tool.
        idempotency_key: String,
        /// The ids of the permitting policies.
        policy_ids: Vec<String>,
    },
    /// A tool was invoked.
    ToolInvoked {
        /// The capability.
        capability: String,
        /// SHA-256 of the canonical arguments, in hex.
        arguments_sha256: String,
        /// SHA-256 of the result, in hex.
        result_sha256: String,
        /// How long it took.
        latency_ms: u64,
        /// Cost in microcents.
        cost_microcents: u64,
    },
    /// The gate refused a tool call.
    ToolRefused {
        /// The capability.
        capability: String,
        /// Why, in words safe to show.
        reason: String,
        /// The ids of the deciding policies.
        policy_ids: Vec<String>,
    },
    /// A ceiling or quota stopped a run.
    BudgetExceeded {
        /// tokens, tool_calls, walltime_ms, cost_microcents, or a quota.
        ceiling: String,
        /// The limit.
        limit: u64,
        /// What the next call would have brought it to.
        attempted: u64,
    },
    /// A run finished with an answer.
    RunCompleted {
        /// Totals of the run.
        totals: RunTotals,
    },
    /// A run stopped without an answer.
    RunFailed {
        /// Totals of the run.
        totals: RunTotals,
        /// Why, in words safe to show.
        reason: String,
    },
    /// A range of the log was exported.
    ExportCreated {
        /// First sequence number exported.
        from: u64,
        /// One past the last sequence number exported.
        to: u64,
    },
    /// A checkpoint was signed.
    CheckpointSigned {
        /// The tree size it covers.
        size: u64,
        /// The root hash, in hex.
        root: String,
    },
}

/// What a run consumed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunTotals {
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// Tool calls.
    pub tool_calls: u64,
    /// Wall time.
    pub walltime_ms: u64,
    /// Cost in microcents.
    pub cost_microcents: u64,
}

impl EventBody {
    /// The event's type name in the log, such as `tenant.provisioned`.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::TenantProvisioned { .. } => "tenant.provisioned",
            EventBody::InstallationCreated { .. } => "installation.created",
            EventBody::InstallationUpdated { .. } => "installation.updated",
            EventBody::InstallationRevoked { .. } => "installation.revoked",
            EventBody::SettingsChanged { .. } => "settings.changed",
            EventBody::RoleGranted { .. } => "role.granted",
            EventBody::RoleRevoked { .. } => "role.revoked",
            EventBody::CommandReceived { .. } => "command.received",
            EventBody::RunStarted { .. } => "run.started",
            EventBody::ModelRequested { .. } => "model.requested",
            EventBody::ModelCalled { .. } => "model.called",
            EventBody::ToolAuthorized { .. } => "tool.authorized",
            EventBody::ToolInvoked { .. } => "tool.invoked",
            EventBody::ToolRefused { .. } => "tool.refused",
            EventBody::BudgetExceeded { .. } => "budget.exceeded",
            EventBody::RunCompleted { .. } => "run.completed",
            EventBody::RunFailed { .. } => "run.failed",
            EventBody::ExportCreated { .. } => "export.created",
            EventBody::CheckpointSigned { .. } => "checkpoint.signed",
        }
    }

    /// The event's `data` object, as a value (the log writes it with [`EventBody::write_data`]).
    pub fn data(&self) -> Value {
        Value::Object(
            self.fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_value()))
                .collect(),
        )
    }
}

/// A member of an event's `data`, as [`EventBody::write_data`] writes it.
enum Field<'a> {
    Str(&'a str),
    Num(u64),
    Strs(&'a [String]),
    Totals(&'a RunTotals),
}

impl Field<'_> {
    fn to_value(&self) -> Value {
        match self {
            Field::Str(s) => Value::from(*s),
            Field::Num(n) => Value::from(*n),
            Field::Strs(items) => Value::from(items.to_vec()),
            Field::Totals(t) => Value::Object(
                totals_fields(t)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

fn totals_fields(t: &RunTotals) -> [(&'static str, Field<'static>); 5] {
    [
        ("tokens_in", Field::Num(t.tokens_in)),
        ("tokens_out", Field::Num(t.tokens_out)),
        ("tool_calls", Field::Num(t.tool_calls)),
        ("walltime_ms", Field::Num(t.walltime_ms)),
        ("cost_microcents", Field::Num(t.cost_microcents)),
    ]
}

/// Writes `entries` as a JSON object with its keys sorted by their bytes and no whitespace, each
/// value written by `write`; `None` if `write` refuses one.
fn write_sorted<T>(
    out: &mut Vec<u8>,
    entries: &mut [(&str, T)],
    mut write: impl FnMut(&T, &mut Vec<u8>) -> Option<()>,
) -> Option<()> {
    // Keys are unique (a JSON map's, or one event type's fields), so the order is total.
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.push(b'{');
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        put_str(out, key);
        out.push(b':');
        write(value, out)?;
    }
    out.push(b'}');
    Some(())
}

/// Writes `fields` as a canonical JSON object.
fn write_object(out: &mut Vec<u8>, fields: &mut [(&str, Field<'_>)]) {
    let _ = write_sorted(out, fields, |value, out| {
        match value {
            Field::Str(s) => put_str(out, s),
            // Writing into a Vec cannot fail.
            Field::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Field::Strs(items) => {
                out.push(b'[');
                for (j, item) in items.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    put_str(out, item);
                }
                out.push(b']');
            }
            Field::Totals(t) => write_object(out, &mut totals_fields(t)),
        }
        Some(())
    });
}

impl EventBody {
    /// Writes [`EventBody::data`] in its canonical encoding, without building it as a
    /// `serde_json::Value` first (an IndexMap and a `String` per key, since cedar-policy turns on
    /// `preserve_order`: 8% of an appender's CPU at 64 writers). A test holds the two equal for
    /// every event type.
    fn write_data(&self, out: &mut Vec<u8>) {
        write_object(out, &mut self.fields());
    }

    /// The members of the event's `data`, in any order: the one list both renderings take.
    fn fields(&self) -> Vec<(&'static str, Field<'_>)> {
        use Field::{Num, Str, Strs, Totals};
        match self {
            EventBody::TenantProvisioned { name, plan } => {
                vec![("name", Str(name)), ("plan", Str(plan))]
            }
            EventBody::InstallationCreated {
                installation_id,
                platform,
                workspace,
                source,
            } => vec![
                ("installation_id", Str(installation_id)),
                ("platform", Str(platform)),
                ("workspace", Str(workspace)),
                ("source", Str(source)),
            ],
            EventBody::InstallationUpdated {
                installation_id,
                changed,
            } => vec![
                ("installation_id", Str(installation_id)),
                ("changed", Strs(changed)),
            ],
            EventBody::InstallationRevoked {
                installation_id,
                reason,
            } => vec![
                ("installation_id", Str(installation_id)),
                ("reason", Str(reason)),
            ],
            EventBody::SettingsChanged { fields } => vec![("fields", Strs(fields))],
            EventBody::RoleGranted { principal, role }
            | EventBody::RoleRevoked { principal, role } => {
                vec![("principal", Str(principal)), ("role", Str(role))]
            }
            EventBody::CommandReceived {
                platform,
                kind,
                text_sha256,
            } => vec![
                ("platform", Str(platform)),
                ("kind", Str(kind)),
                ("text_sha256", Str(text_sha256)),
            ],
            EventBody::RunStarted { prompt_sha256 } => vec![("prompt_sha256", Str(prompt_sha256))],
            EventBody::ModelRequested {
                provider,
                model,
                step,
                prompt_sha256,
            } => vec![
                ("provider", Str(provider)),
                ("model", Str(model)),
                ("step", Num(*step)),
                ("prompt_sha256", Str(prompt_sha256)),
            ],
            EventBody::ModelCalled {
                provider,
                model,
                tokens_in,
                tokens_out,
                cost_microcents,
            } => vec![
                ("provider", Str(provider)),
                ("model", Str(model)),
                ("tokens_in", Num(*tokens_in)),
                ("tokens_out", Num(*tokens_out)),
                ("cost_microcents", Num(*cost_microcents)),
            ],
            EventBody::ToolAuthorized {
                capability,
                arguments_sha256,
                idempotency_key,
                policy_ids,
            } => vec![
                ("capability", Str(capability)),
                ("arguments_sha256", Str(arguments_sha256)),
                ("idempotency_key", Str(idempotency_key)),
                ("policy_ids", Strs(policy_ids)),
            ],
            EventBody::ToolInvoked {
                capability,
                arguments_sha256,
                result_sha256,
                latency_ms,
                cost_microcents,
            } => vec![
                ("capability", Str(capability)),
                ("arguments_sha256", Str(arguments_sha256)),
                ("result_sha256", Str(result_sha256)),
                ("latency_ms", Num(*latency_ms)),
                ("cost_microcents", Num(*cost_microcents)),
            ],
            EventBody::ToolRefused {
                capability,
                reason,
                policy_ids,
            } => vec![
                ("capability", Str(capability)),
                ("reason", Str(reason)),
                ("policy_ids", Strs(policy_ids)),
            ],
            EventBody::BudgetExceeded {
                ceiling,
                limit,
                attempted,
            } => vec![
                ("ceiling", Str(ceiling)),
                ("limit", Num(*limit)),
                ("attempted", Num(*attempted)),
            ],
            EventBody::RunCompleted { totals } => vec![("totals", Totals(totals))],
            EventBody::RunFailed { totals, reason } => {
                vec![("totals", Totals(totals)), ("reason", Str(reason))]
            }
            EventBody::ExportCreated { from, to } => vec![("from", Num(*from)), ("to", Num(*to))],
            EventBody::CheckpointSigned { size, root } => {
                vec![("size", Num(*size)), ("root", Str(root))]
            }
        }
    }
}

/// Formats a time the one way the log writes it: RFC 3339, UTC, microseconds, `Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Who and on whose behalf, as written into every event. Taken from a [`TenantContext`], or built for
/// the log's own system events (checkpoints), which belong to the tenant but to no principal of it.
#[derive(Clone, Debug)]
pub struct Envelope {
    tenant: String,
    principal: String,
    principal_kind: &'static str,
    run_id: String,
    correlation_id: Option<String>,
    initiator: &'static str,
}

impl Envelope {
    /// The envelope of work done under `ctx`.
    pub fn from_ctx(ctx: &TenantContext) -> Self {
        let audit = ctx.audit();
        Envelope {
            tenant: ctx.tenant_id().to_string(),
            principal: ctx.principal().to_string(),
            principal_kind: ctx.principal_kind().as_str(),
            run_id: audit.run_id.to_string(),
            correlation_id: audit.correlation_id.as_ref().map(|c| c.to_string()),
            initiator: audit.initiator.as_str(),
        }
    }

    /// The envelope of the log's own events in `tenant`'s log, such as `checkpoint.signed`.
    pub(crate) fn system(tenant: &TenantId) -> Self {
        Envelope {
            tenant: tenant.to_string(),
            principal: "system:audit-log".to_owned(),
            principal_kind: PrincipalKind::Service.as_str(),
            run_id: RunId::generate().to_string(),
            correlation_id: None,
            initiator: Initiator::Cron.as_str(),
        }
    }

    /// The tenant the event belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The run the event belongs to.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
}

/// Encodes one event as its canonical leaf bytes.
pub fn encode(env: &Envelope, seq: u64, time: DateTime<Utc>, body: &EventBody) -> Vec<u8> {
    encode_unplaced(env, body).place(seq, time)
}

/// An event encoded but for its sequence number and time, which the log assigns under its lock.
///
/// Encoding costs a few µs and needs nothing the lock guards, so appenders encode concurrently and
/// the lock only joins the parts ([`Unplaced::place`]), which keeps the section every append of a
/// tenant passes through one at a time short.
#[derive(Clone, Debug)]
pub struct Unplaced {
    /// Everything up to and including `"seq":`.
    head: Vec<u8>,
    /// From the comma after the sequence number up to and including `"time":"`.
    mid: Vec<u8>,
    /// From the closing quote of the time to the end.
    tail: Vec<u8>,
}

impl Unplaced {
    /// The event's leaf bytes at `seq` and `time`: exactly [`encode`]`(env, seq, time, body)`.
    pub fn place(&self, seq: u64, time: DateTime<Utc>) -> Vec<u8> {
        self.place_at(seq, &format_time(time))
    }

    /// [`Unplaced::place`] with the time already formatted ([`format_time`]), so that the events
    /// of one append, which share their time, format it once under the log's lock.
    pub fn place_at(&self, seq: u64, time: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.head.len() + 20 + self.mid.len() + time.len() + self.tail.len(),
        );
        out.extend_from_slice(&self.head);
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{seq}");
        out.extend_from_slice(&self.mid);
        out.extend_from_slice(time.as_bytes());
        out.extend_from_slice(&self.tail);
        out
    }
}

/// Writes a JSON string as the canonical form does (serde_json's escaping).
fn put_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("a string serialises into a Vec");
}

/// Encodes an event with its sequence number and time left open; see [`Unplaced`].
///
/// The envelope's members are written directly, in the canonical (byte) order of their keys:
/// correlation_id, data, initiator, principal, principal_kind, run_id, seq, tenant, time, type,
/// v. Only `data` goes through [`canonical_json`]. A test holds this to the canonical encoding of
/// the same event built as one JSON value.
pub fn encode_unplaced(env: &Envelope, body: &EventBody) -> Unplaced {
    let mut head = Vec::with_capacity(320);
    head.extend_from_slice(b"{\"correlation_id\":");
    match &env.correlation_id {
        Some(c) => put_str(&mut head, c),
        None => head.extend_from_slice(b"null"),
    }
    head.extend_from_slice(b",\"data\":");
    body.write_data(&mut head);
    head.extend_from_slice(b",\"initiator\":");
    put_str(&mut head, env.initiator);
    head.extend_from_slice(b",\"principal\":");
    put_str(&mut head, &env.principal);
    head.extend_from_slice(b",\"principal_kind\":");
    put_str(&mut head, env.principal_kind);
    head.extend_from_slice(b",\"run_id\":");
    put_str(&mut head, &env.run_id);
    head.extend_from_slice(b",\"seq\":");
    let mut mid = Vec::with_capacity(64);
    mid.extend_from_slice(b",\"tenant\":");
    put_str(&mut mid, &env.tenant);
    mid.extend_from_slice(b",\"time\":\"");
    let mut tail = Vec::with_capacity(48);
    tail.extend_from_slice(b"\",\"type\":");
    put_str(&mut tail, body.type_name());
    let _ = write!(tail, ",\"v\":{EVENT_VERSION}}}");
    Unplaced { head, mid, tail }
}

/// Writes `value` in the canonical form of docs/AUDIT-FORMAT.md: object members sorted by key in
/// byte order at every depth, no whitespace, integers only, strings escaped as serde_json does.
/// Returns `None` for a value holding a non-integer number, which has no canonical form here.
///
/// The key order is imposed here, not left to serde_json's map type: another crate in the build
/// (cedar-policy) turns on serde_json's `preserve_order` feature, which keeps insertion order.
pub fn canonical_json(value: &Value) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out)?;
    Some(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Option<()> {
    match value {
        // Written straight into `out`, not through a buffer of their own (an allocation each).
        Value::Null | Value::Bool(_) | Value::String(_) => {
            serde_json::to_writer(&mut *out, value).expect("scalars serialise into a Vec");
        }
        Value::Number(n) => {
            if !(n.is_u64() || n.is_i64()) {
                return None;
            }
            serde_json::to_writer(&mut *out, n).expect("integers serialise into a Vec");
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&str, &Value)> =
                map.iter().map(|(k, v)| (k.as_str(), v)).collect();
            write_sorted(out, &mut entries, |v, out| write_canonical(v, out))?;
        }
    }
    Some(())
}

/// Checks that `bytes` are in canonical form: parsing and re-encoding them gives the same bytes.
/// A verifier uses this so that two encodings of one event can never both verify.
pub fn is_canonical(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| canonical_json(&v))
        .is_some_and(|again| again == bytes)
}

/// One event of every type, its strings `text` and its numbers from `a`, `b` and `c`.
#[cfg(test)]
pub(crate) fn one_of_every_type(a: u64, b: u64, c: u64, text: &str) -> Vec<EventBody> {
    let t = || text.to_owned();
    let totals = RunTotals {
        tokens_in: a,
        tokens_out: b,
        tool_calls: c,
        walltime_ms: a ^ b,
        cost_microcents: b ^ c,
    };
    let all = vec![
        EventBody::TenantProvisioned {
            name: t(),
            plan: t(),
        },
        EventBody::InstallationCreated {
            installation_id: t(),
            platform: t(),
            workspace: t(),
            source: t(),
        },
        EventBody::InstallationUpdated {
            installation_id: t(),
            changed: vec![t(), "b".into()],
        },
        EventBody::InstallationRevoked {
            installation_id: t(),
            reason: t(),
        },
        EventBody::SettingsChanged { fields: vec![] },
        EventBody::RoleGranted {
            principal: t(),
            role: t(),
        },
        EventBody::RoleRevoked {
            principal: t(),
            role: t(),
        },
        EventBody::CommandReceived {
            platform: t(),
            kind: t(),
            text_sha256: t(),
        },
        EventBody::RunStarted { prompt_sha256: t() },
        EventBody::ModelRequested {
            provider: t(),
            model: t(),
            step: a,
            prompt_sha256: t(),
        },
        EventBody::ModelCalled {
            provider: t(),
            model: t(),
            tokens_in: a,
            tokens_out: b,
            cost_microcents: c,
        },
        EventBody::ToolAuthorized {
            capability: t(),
            arguments_sha256: t(),
            idempotency_key: t(),
            policy_ids: vec![t(), t()],
        },
        EventBody::ToolInvoked {
            capability: t(),
            arguments_sha256: t(),
            result_sha256: t(),
            latency_ms: a,
            cost_microcents: b,
        },
        EventBody::ToolRefused {
            capability: t(),
            reason: t(),
            policy_ids: vec![t()],
        },
        EventBody::BudgetExceeded {
            ceiling: t(),
            limit: a,
            attempted: b,
        },
        EventBody::RunCompleted {
            totals: totals.clone(),
        },
        EventBody::RunFailed {
            totals,
            reason: t(),
        },
        EventBody::ExportCreated { from: a, to: b },
        EventBody::CheckpointSigned { size: c, root: t() },
    ];
    // Every type once: a type added to `EventBody` must be added here (this match then fails to
    // compile) and to the list above (the count below then fails).
    for body in &all {
        match body {
            EventBody::TenantProvisioned { .. }
            | EventBody::InstallationCreated { .. }
            | EventBody::InstallationUpdated { .. }
            | EventBody::InstallationRevoked { .. }
            | EventBody::SettingsChanged { .. }
            | EventBody::RoleGranted { .. }
            | EventBody::RoleRevoked { .. }
            | EventBody::CommandReceived { .. }
            | EventBody::RunStarted { .. }
            | EventBody::ModelRequested { .. }
            | EventBody::ModelCalled { .. }
            | EventBody::ToolAuthorized { .. }
            | EventBody::ToolInvoked { .. }
            | EventBody::ToolRefused { .. }
            | EventBody::BudgetExceeded { .. }
            | EventBody::RunCompleted { .. }
            | EventBody::RunFailed { .. }
            | EventBody::ExportCreated { .. }
            | EventBody::CheckpointSigned { .. } => {}
        }
    }
    let types: std::collections::BTreeSet<_> = all.iter().map(EventBody::type_name).collect();
    assert_eq!(types.len(), 19);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    proptest::proptest! {
        /// The data written directly is the canonical encoding of the data built as a value, for
        /// every event type, whatever its strings and numbers.
        #[test]
        fn data_written_directly_is_the_canonical_data(
            a in proptest::num::u64::ANY, b in proptest::num::u64::ANY,
            c in proptest::num::u64::ANY, text in "[a-z\"\\\n\u{1}é{}:,]{0,10}",
        ) {
            for body in one_of_every_type(a, b, c, &text) {
                let mut direct = Vec::new();
                body.write_data(&mut direct);
                proptest::prop_assert_eq!(
                    String::from_utf8(direct).unwrap(),
                    String::from_utf8(canonical_json(&body.data()).unwrap()).unwrap(),
                    "{}", body.type_name()
                );
            }
        }
    }

    /// docs/AUDIT-FORMAT.md's table of types and `data` members is what the log writes: an
    /// independent verifier is written from it.
    #[test]
    fn every_type_writes_the_data_members_the_format_documents() {
        let doc = include_str!("../../docs/AUDIT-FORMAT.md");
        let table = doc
            .split("**Types and `data` members.**")
            .nth(1)
            .expect("the format lists the types")
            .split("\n\n")
            .nth(1)
            .expect("in a table after the heading");
        let mut documented = std::collections::BTreeMap::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let ty = cells[1].trim_matches('`');
            // The members are the names in backticks outside parentheses (which give examples,
            // values, or a nested object's members).
            let mut outside = String::new();
            let mut depth = 0;
            for ch in cells[2].chars() {
                match ch {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ if depth == 0 => outside.push(ch),
                    _ => {}
                }
            }
            let members: Vec<String> = outside
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect();
            documented.insert(ty.to_owned(), members);
        }
        let bodies = one_of_every_type(1, 2, 3, "x");
        assert_eq!(documented.len(), bodies.len(), "{documented:?}");
        for body in &bodies {
            let mut written: Vec<String> =
                body.fields().iter().map(|(k, _)| (*k).to_owned()).collect();
            let mut listed = documented[body.type_name()].clone();
            written.sort();
            listed.sort();
            assert_eq!(written, listed, "{}", body.type_name());
        }
        let totals: Vec<&str> = totals_fields(&RunTotals::default())
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert!(
            doc.contains(&format!(
                "`totals` ({})",
                totals
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            "{totals:?}"
        );
    }

    /// The verifier knows exactly the types the log writes: one it did not know would fail every
    /// bundle holding it, one the log cannot write would pass unchecked.
    #[test]
    fn the_verifier_knows_every_type_the_log_writes_and_no_other() {
        let written: std::collections::BTreeSet<&str> = one_of_every_type(1, 2, 3, "x")
            .iter()
            .map(EventBody::type_name)
            .collect();
        let known: std::collections::BTreeSet<&str> =
            super::super::bundle::EVENT_TYPES.iter().copied().collect();
        assert_eq!(written, known);
        assert_eq!(known.len(), super::super::bundle::EVENT_TYPES.len());
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_depth_and_refuses_fractions() {
        let v = json!({"b": 1, "a": {"z": [true, null, "x\n\u{e9}"], "y": -2}, "A": "é"});
        let text = String::from_utf8(canonical_json(&v).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"A":"é","a":{"y":-2,"z":[true,null,"x\né"]},"b":1}"#
        );
        assert!(is_canonical(text.as_bytes()));
        assert!(!is_canonical(br#"{"b":1,"a":2}"#), "unsorted keys");
        assert!(!is_canonical(br#"{"a": 2}"#), "whitespace");
        assert!(!is_canonical(br#"{"a":1.0}"#), "a fraction");
        assert!(!is_canonical(br#"{"a":"\u0041"}"#), "a needless escape");
        assert!(canonical_json(&json!({"a": 0.5})).is_none());
    }

    /// The event as one JSON value in canonical form: what [`encode`] must produce, built the
    /// slow, obvious way.
    fn encode_as_value(env: &Envelope, seq: u64, time: DateTime<Utc>, body: &EventBody) -> Vec<u8> {
        let value = json!({
            "v": EVENT_VERSION,
            "tenant": env.tenant,
            "seq": seq,
            "time": format_time(time),
            "principal": env.principal,
            "principal_kind": env.principal_kind,
            "run_id": env.run_id,
            "correlation_id": env.correlation_id,
            "initiator": env.initiator,
            "type": body.type_name(),
            "data": body.data(),
        });
        canonical_json(&value).unwrap()
    }

    proptest::proptest! {
        /// Placing an unplaced event gives the canonical encoding of the whole event, whatever its
        /// strings hold: here principals and roles that imitate keys, quotes and escapes.
        #[test]
        fn an_unplaced_event_places_to_its_encoding(
            principal in "(,\"seq\":0,|\"time\":\"|\\{|[a-z:\"\\\\]){0,6}",
            role in "(\"seq\":[0-9]|1970-01-01T00:00:00.000000Z|[a-z]){0,4}",
            seq in proptest::prelude::any::<u64>(),
            micros in 0i64..4_102_444_800_000_000,
        ) {
            let mut env = Envelope::system(&TenantId::generate());
            env.principal = principal.clone();
            if seq % 2 == 0 {
                env.correlation_id = Some(role.clone());
            }
            let time = DateTime::<Utc>::from_timestamp_micros(micros).unwrap();
            for body in [
                EventBody::RoleGranted { principal: principal.clone(), role: role.clone() },
                EventBody::InstallationUpdated {
                    installation_id: role.clone(),
                    changed: vec![principal.clone(), "seq".into(), "time".into()],
                },
            ] {
                let unplaced = encode_unplaced(&env, &body);
                let expected = encode_as_value(&env, seq, time, &body);
                proptest::prop_assert_eq!(unplaced.place(seq, time), expected.clone());
                proptest::prop_assert_eq!(encode(&env, seq, time, &body), expected);
            }
        }
    }

    #[test]
    fn an_encoded_event_is_canonical_with_its_keys_in_order() {
        let tenant = TenantId::generate();
        let env = Envelope::system(&tenant);
        let bytes = encode(
            &env,
            7,
            Utc::now(),
            &EventBody::ExportCreated { from: 1, to: 2 },
        );
        assert!(is_canonical(&bytes));
        let text = String::from_utf8(bytes).unwrap();
        let keys: Vec<usize> = [
            "correlation_id",
            "data",
            "initiator",
            "principal",
            "principal_kind",
            "run_id",
            "seq",
            "tenant",
            "time",
            "type",
            "v",
        ]
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).unwrap())
        .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
}
