//! The tenant admin and compliance API under `/api/v1` (documented in docs/api.md, described by
//! `/api/v1/openapi.json`). Every route is scoped by the API key's tenant: an id of another tenant
//! answers 404, never a 403 with details. Every admin change is audited before it is made.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Duration;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::ApiContext;
use super::extract::{JsonBody, JsonBodyOrDefault, Path, Query};
use super::{ApiError, AppState};
use crate::audit::EventBody;
use crate::store::{TenantStore, WebhookTool};
use crate::tenant::{is_live, KeyError, KeyRole, PrincipalId, Role, TenantContext};

/// The routes that may take longer than the request timeout before they answer: an export writes
/// the whole bundle first, minutes for a large tenant.
pub fn untimed_router() -> Router<AppState> {
    Router::new().route("/api/v1/audit/export", post(audit_export))
}

/// The API's routes, under the request timeout.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/settings", get(get_settings).patch(patch_settings))
        .route("/api/v1/settings/llm", get(get_llm).patch(patch_llm))
        .route("/api/v1/members", get(list_members))
        .route(
            "/api/v1/members/{principal}",
            put(put_member).delete(delete_member),
        )
        .route("/api/v1/tools", get(list_tools))
        .route(
            "/api/v1/tools/grants/{capability}",
            put(put_grant).delete(delete_grant),
        )
        .route(
            "/api/v1/tools/webhooks/{name}",
            put(put_webhook).delete(delete_webhook),
        )
        .route("/api/v1/policies", get(get_policies).put(put_policies))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/runs", get(list_runs))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/audit/head", get(audit_head))
        .route("/api/v1/audit/proof/{seq}", get(audit_proof))
        .route("/api/v1/audit/consistency", get(audit_consistency))
        .route("/api/v1/keys", get(list_keys).post(create_key))
        .route("/api/v1/keys/{id}", axum::routing::delete(revoke_key))
        .route("/api/v1/keys/{id}/rotate", post(rotate_key))
}

type Res = Result<Response, ApiError>;

fn repo(state: &AppState, ctx: &TenantContext) -> Result<TenantStore, ApiError> {
    Ok(state.store.for_tenant(ctx)?)
}

fn ok(v: Value) -> Res {
    Ok(Json(v).into_response())
}

async fn changed(
    state: &AppState,
    ctx: &TenantContext,
    fields: Vec<String>,
) -> Result<(), ApiError> {
    // Once on record the change is stored, even if what follows the append failed.
    let appended = state
        .sink
        .append(ctx, EventBody::SettingsChanged { fields })
        .await;
    crate::audit::on_record(appended, "settings.changed").map_err(|e| ApiError::Internal(e.into()))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn get_settings(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    let s = repo(&state, ctx)?
        .settings()
        .get()?
        .ok_or(ApiError::NotFound)?;
    ok(serde_json::to_value(s).expect("settings serialise"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsPatch {
    name: Option<String>,
    plan: Option<crate::tenant::Plan>,
    default_role: Option<Role>,
    features: Option<BTreeMap<String, bool>>,
    run_ceilings: Option<crate::tenant::Budget>,
    quota: Option<crate::tenant::MonthlyQuota>,
}

async fn patch_settings(
    State(state): State<AppState>,
    auth: ApiContext,
    JsonBody(p): JsonBody<SettingsPatch>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    // Refused whole, before anything changes: the limits bound what the tenant may spend, so only
    // the operator sets them (see `tenant::limits`).
    let limits: Vec<&str> = [
        ("plan", p.plan.is_some()),
        ("quota", p.quota.is_some()),
        ("run_ceilings", p.run_ceilings.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    if !limits.is_empty() {
        return Err(ApiError::Forbidden(format!(
            "{} can only be changed by the operator (agentgate tenants limits)",
            limits.join(", ")
        )));
    }
    let _settings = state.tenants.lock_settings(ctx.tenant_id()).await;
    let r = repo(&state, ctx)?;
    let mut s = r.settings().get()?.ok_or(ApiError::NotFound)?;
    let mut fields = Vec::new();
    if let Some(v) = p.name {
        if !crate::tenant::label_ok(&v) {
            return Err(ApiError::BadRequest(
                "name must be 1 to 100 characters, none of them a control character".into(),
            ));
        }
        s.name = v;
        fields.push("name".to_owned());
    }
    if let Some(v) = p.default_role {
        if v == Role::Owner {
            return Err(ApiError::BadRequest(
                "the default role cannot be owner".into(),
            ));
        }
        s.default_role = v;
        fields.push("default_role".to_owned());
    }
    if let Some(v) = p.features {
        s.features = v;
        fields.push("features".to_owned());
    }
    if !fields.is_empty() {
        changed(&state, ctx, fields).await?;
        r.settings().put(&s)?;
    }
    ok(serde_json::to_value(s).expect("settings serialise"))
}

fn llm_json(l: &crate::tenant::LlmSettings) -> Value {
    json!({
        "provider": l.provider,
        "default_model": l.default_model,
        "default_temperature": f64::from(l.default_temperature_milli) / 1000.0,
        "default_max_tokens": l.default_max_tokens,
        "key_ref": l.key_ref,
    })
}

async fn get_llm(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    let s = repo(&state, ctx)?
        .settings()
        .get()?
        .ok_or(ApiError::NotFound)?;
    ok(llm_json(&s.llm))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LlmPatch {
    provider: Option<String>,
    default_model: Option<String>,
    default_temperature: Option<f64>,
    default_max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    key_ref: Option<Option<String>>,
}

async fn patch_llm(
    State(state): State<AppState>,
    auth: ApiContext,
    JsonBody(p): JsonBody<LlmPatch>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let _settings = state.tenants.lock_settings(ctx.tenant_id()).await;
    let r = repo(&state, ctx)?;
    let mut s = r.settings().get()?.ok_or(ApiError::NotFound)?;
    let mut fields = Vec::new();
    if let Some(v) = p.provider {
        if !matches!(v.as_str(), "rules" | "openai" | "anthropic") {
            return Err(ApiError::BadRequest(
                "provider must be rules, openai or anthropic".into(),
            ));
        }
        s.llm.provider = v;
        fields.push("llm.provider");
    }
    if let Some(v) = p.default_model {
        if v.is_empty() || v.len() > 200 {
            return Err(ApiError::BadRequest(
                "default_model must be 1 to 200 characters".into(),
            ));
        }
        s.llm.default_model = v;
        fields.push("llm.default_model");
    }
    if let Some(v) = p.default_temperature {
        if !(0.0..=2.0).contains(&v) {
            return Err(ApiError::BadRequest(
                "default_temperature must be between 0 and 2".into(),
            ));
        }
        s.llm.default_temperature_milli = (v * 1000.0).round() as u32;
        fields.push("llm.default_temperature");
    }
    if let Some(v) = p.default_max_tokens {
        if v == 0 || v > 200_000 {
            return Err(ApiError::BadRequest(
                "default_max_tokens must be between 1 and 200000".into(),
            ));
        }
        s.llm.default_max_tokens = v;
        fields.push("llm.default_max_tokens");
    }
    if let Some(v) = p.key_ref {
        if v.as_deref().is_some_and(|k| {
            !k.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        }) {
            return Err(ApiError::BadRequest(
                "key_ref names an environment variable (A-Z, 0-9, _), never a key".into(),
            ));
        }
        if let Some(k) = v.as_deref() {
            if !crate::tenant::tenant_key_ref(ctx.tenant_id(), k) {
                return Err(ApiError::BadRequest(format!(
                    "key_ref must name this tenant's own variable: {} or {}_<NAME>",
                    crate::tenant::tenant_key_prefix(ctx.tenant_id()),
                    crate::tenant::tenant_key_prefix(ctx.tenant_id()),
                )));
            }
        }
        s.llm.key_ref = v;
        fields.push("llm.key_ref");
    }
    if !fields.is_empty() {
        changed(&state, ctx, fields.into_iter().map(str::to_owned).collect()).await?;
        r.settings().put(&s)?;
    }
    ok(llm_json(&s.llm))
}

async fn list_members(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    let list: Vec<Value> = repo(&state, ctx)?
        .members()
        .list()?
        .into_iter()
        .map(|(p, r)| json!({"principal": p.as_str(), "role": r.as_str()}))
        .collect();
    ok(json!(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: Role,
}

fn principal(p: &str) -> Result<PrincipalId, ApiError> {
    p.parse()
        .map_err(|e: crate::tenant::IdError| ApiError::BadRequest(e.to_string()))
}

/// Reads a field that is present (even as `null`) as `Some`, so that `null` can clear a value.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Refuses a change to the owner's membership by anyone but an owner.
fn guard_owner(state: &AppState, ctx: &TenantContext, p: &PrincipalId) -> Result<(), ApiError> {
    let target = repo(state, ctx)?.members().role_of(p)?;
    if target == Some(Role::Owner) && ctx.role() != Role::Owner {
        return Err(ApiError::Forbidden(
            "only an owner may change an owner".into(),
        ));
    }
    Ok(())
}

async fn put_member(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(p): Path<String>,
    JsonBody(b): JsonBody<RoleBody>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let p = principal(&p)?;
    guard_owner(&state, ctx, &p)?;
    if b.role == Role::Owner && ctx.role() != Role::Owner {
        return Err(ApiError::Forbidden(
            "only an owner may make an owner".into(),
        ));
    }
    state
        .tenants
        .grant_role(ctx, &p, b.role)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    ok(json!({"principal": p.as_str(), "role": b.role.as_str()}))
}

async fn delete_member(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(p): Path<String>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let p = principal(&p)?;
    guard_owner(&state, ctx, &p)?;
    if !state
        .tenants
        .revoke_role(ctx, &p)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
    {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_tools(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    let r = repo(&state, ctx)?;
    let grants: Vec<Value> = r
        .grants()
        .list()?
        .into_iter()
        .map(|g| json!({"capability": g.capability, "min_role": g.min_role.as_str()}))
        .collect();
    // The webhook credential is never shown, and a URL's path and query only to those who may
    // change the tool: receivers often take a token there (a Zapier hook's path, `?token=`).
    let full = ctx.has_scope("admin:write");
    let hooks: Vec<Value> = r
        .webhooks()
        .webhooks()?
        .into_iter()
        .map(|w| {
            let url = if full { w.url } else { url_origin(&w.url) };
            json!({"name": w.name, "description": w.description, "schema": w.schema, "url": url, "timeout_ms": w.timeout_ms})
        })
        .collect();
    ok(json!({"grants": grants, "webhooks": hooks}))
}

/// A webhook URL as a reader who may not change it sees it: scheme, host and port, then `/…` for
/// whatever path and query follow.
fn url_origin(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let rest = u.path() != "/" || u.query().is_some();
            format!(
                "{}{}",
                u.origin().ascii_serialization(),
                if rest { "/…" } else { "/" }
            )
        }
        Err(_) => "…".to_owned(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    min_role: Role,
}

async fn put_grant(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(cap): Path<String>,
    JsonBody(b): JsonBody<GrantBody>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let known = matches!(
        cap.as_str(),
        "memory.save" | "memory.recall" | "memory.forget" | "budget.status" | "audit.status"
    ) || cap
        .strip_prefix("webhook.")
        .is_some_and(crate::agent::webhook_name_ok);
    if !known {
        return Err(ApiError::BadRequest(format!("unknown capability {cap:?}")));
    }
    state
        .agent
        .grant_tool(ctx, &cap, b.min_role)
        .await
        .map_err(agent_error)?;
    ok(json!({"capability": cap, "min_role": b.min_role.as_str()}))
}

async fn delete_grant(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(cap): Path<String>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let r = repo(&state, ctx)?;
    if !r.grants().list()?.iter().any(|g| g.capability == cap) {
        return Err(ApiError::NotFound);
    }
    changed(&state, ctx, vec![format!("grant:{cap}:removed")]).await?;
    r.grants().remove(&cap)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    description: String,
    schema: Value,
    url: String,
    secret: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
}

fn default_timeout() -> u64 {
    5_000
}

fn agent_error(e: crate::agent::AgentError) -> ApiError {
    use crate::agent::AgentError as E;
    match e {
        E::InvalidPolicy(p) => ApiError::BadRequest(p.to_string()),
        E::InvalidWebhook(w) => ApiError::BadRequest(w),
        E::Forbidden => ApiError::Forbidden("this needs the admin role".into()),
        other => ApiError::Internal(other.into()),
    }
}

async fn put_webhook(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<WebhookBody>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    if b.secret.len() < 16 {
        return Err(ApiError::BadRequest(
            "the secret must be at least 16 characters".into(),
        ));
    }
    let tool = WebhookTool {
        name: name.clone(),
        description: b.description,
        schema: b.schema,
        url: b.url,
        secret: secrecy::SecretString::from(b.secret),
        timeout_ms: b.timeout_ms,
    };
    state
        .agent
        .declare_webhook(ctx, tool)
        .await
        .map_err(agent_error)?;
    ok(json!({"name": name, "capability": format!("webhook.{name}")}))
}

async fn delete_webhook(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(name): Path<String>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let r = repo(&state, ctx)?;
    if !r.webhooks().webhooks()?.iter().any(|w| w.name == name) {
        return Err(ApiError::NotFound);
    }
    changed(&state, ctx, vec![format!("webhook:{name}:removed")]).await?;
    r.webhooks().remove_webhook(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_policies(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    let text = repo(&state, ctx)?.policies().tenant_policies()?;
    ok(json!({"text": text, "defaults": crate::agent::policy::DEFAULT_POLICIES}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    text: String,
}

async fn put_policies(
    State(state): State<AppState>,
    auth: ApiContext,
    JsonBody(b): JsonBody<PolicyBody>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    state
        .agent
        .set_tenant_policies(ctx, &b.text)
        .await
        .map_err(agent_error)?;
    ok(json!({"text": b.text}))
}

async fn usage(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    let r = repo(&state, ctx)?;
    let s = r.settings().get()?.ok_or(ApiError::NotFound)?;
    let usage = r.projections().usage()?;
    ok(json!({
        "run_ceilings": s.run_ceilings,
        "monthly_quota": s.quota,
        "usage_by_month": usage,
    }))
}

fn run_summary(bytes: &[u8]) -> Option<Value> {
    let st: crate::agent::state::RunState = serde_json::from_slice(bytes).ok()?;
    Some(json!({
        "run_id": st.run_id,
        "principal": st.principal,
        "conversation": st.conversation,
        "started_at": st.started_at,
        "steps": st.step,
        "status": st.status,
        "usage": st.usage,
    }))
}

/// The most runs one page lists, and how many when not asked.
const MAX_RUNS_PAGE: usize = 1000;
const DEFAULT_RUNS_PAGE: usize = 100;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    /// List runs after this run id (the last of the previous page).
    after: Option<String>,
    limit: Option<usize>,
}

/// Runs oldest first (their ids sort by time), a page at a time, since each one listed is a
/// checkpoint read.
async fn list_runs(
    State(state): State<AppState>,
    auth: ApiContext,
    Query(q): Query<RunsQuery>,
) -> Res {
    let ctx = auth.require("admin:read")?;
    let limit = q.limit.unwrap_or(DEFAULT_RUNS_PAGE);
    if !(1..=MAX_RUNS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be from 1 to {MAX_RUNS_PAGE}"
        )));
    }
    let r = repo(&state, ctx)?;
    let mut out = Vec::new();
    let ids = r.runs().all_runs()?;
    let start = q
        .after
        .as_deref()
        .map_or(0, |after| ids.partition_point(|id| id.as_str() <= after));
    for id in &ids[start..] {
        if out.len() == limit {
            break;
        }
        if let Some(v) = r.runs().get_run(id)?.as_deref().and_then(run_summary) {
            out.push(v);
        }
    }
    ok(json!(out))
}

async fn get_run(State(state): State<AppState>, auth: ApiContext, Path(id): Path<String>) -> Res {
    let ctx = auth.require("admin:read")?;
    let bytes = repo(&state, ctx)?
        .runs()
        .get_run(&id)?
        .ok_or(ApiError::NotFound)?;
    ok(run_summary(&bytes).ok_or(ApiError::NotFound)?)
}

fn audit_err(e: crate::audit::AuditError) -> ApiError {
    use crate::audit::merkle::TreeError as T;
    use crate::audit::AuditError as E;
    match e {
        // What the caller asked for is outside the tree; anything else the tree reports (its
        // node store failing, a missing or mismatched node) is ours, and its cause is logged.
        E::Tree(
            T::SizeOutOfRange { .. }
            | T::LeafOutOfRange { .. }
            | T::SizeDecreased { .. }
            | T::EmptyOldTree,
        )
        | E::Export(_) => ApiError::BadRequest(e.to_string()),
        other => ApiError::Internal(other.into()),
    }
}

async fn audit_head(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("audit:read")?;
    let head = state
        .audit
        .head(ctx, repo(&state, ctx)?)
        .await
        .map_err(audit_err)?;
    ok(json!({"size": head.size, "root": hex::encode(head.root), "checkpoint": head.checkpoint}))
}

async fn audit_proof(State(state): State<AppState>, auth: ApiContext, Path(seq): Path<u64>) -> Res {
    let ctx = auth.require("audit:read")?;
    let text = state
        .audit
        .tlog_proof(ctx, repo(&state, ctx)?, seq)
        .await
        .map_err(audit_err)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[derive(Deserialize)]
struct SizesQuery {
    from: u64,
    to: u64,
}

async fn audit_consistency(
    State(state): State<AppState>,
    auth: ApiContext,
    Query(q): Query<SizesQuery>,
) -> Res {
    let ctx = auth.require("audit:read")?;
    let proof = state
        .audit
        .consistency_proof(ctx, repo(&state, ctx)?, q.from, q.to)
        .await
        .map_err(audit_err)?;
    ok(
        json!({"from": q.from, "to": q.to, "proof": proof.iter().map(hex::encode).collect::<Vec<_>>()}),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    #[serde(default)]
    from: u64,
    to: Option<u64>,
    since_checkpoint: Option<String>,
}

/// The tenants whose export is running (see [`AppState::exports`]).
#[derive(Default)]
pub struct Exporting(std::sync::Mutex<std::collections::HashSet<crate::tenant::TenantId>>);

/// A tenant's place in [`Exporting`], given up when dropped: after its bundle was sent, or when
/// the export failed or its client went away.
struct ExportSlot {
    all: std::sync::Arc<Exporting>,
    tenant: crate::tenant::TenantId,
}

impl Exporting {
    fn take(
        all: &std::sync::Arc<Exporting>,
        tenant: &crate::tenant::TenantId,
    ) -> Option<ExportSlot> {
        let fresh = all
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.clone());
        fresh.then(|| ExportSlot {
            all: std::sync::Arc::clone(all),
            tenant: tenant.clone(),
        })
    }
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        self.all
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.tenant);
    }
}

/// Streams the export bundle as a tar archive of the directory the CLI writes.
async fn audit_export(
    State(state): State<AppState>,
    auth: ApiContext,
    JsonBodyOrDefault(b): JsonBodyOrDefault<ExportBody>,
) -> Res {
    let ctx = auth.require("audit:read")?.clone();
    // Refused before anything is recorded, so a refused export leaves no `export.created`.
    let slot = Exporting::take(&state.exports, ctx.tenant_id()).ok_or_else(|| {
        ApiError::Conflict(
            "an export of this tenant is running; ask again when it has been sent".into(),
        )
    })?;
    let dir = tempfile::tempdir().map_err(|e| ApiError::Internal(e.into()))?;
    let out = dir.path().join("bundle");
    let repo = repo(&state, &ctx)?;
    // The export runs in a task of its own, which owns the temporary directory: if the client
    // goes away meanwhile, the export (already on record) still finishes and its directory is
    // removed after it, rather than under the writer's feet.
    let audit = state.audit.clone();
    // Tracked, so that a stopping server waits for it before it closes the logs it appends to.
    let export = state.handlers.spawn(async move {
        let written = audit
            .export(
                &ctx,
                repo,
                b.from,
                b.to,
                b.since_checkpoint.as_deref(),
                &out,
            )
            .await;
        (dir, out, written, slot)
    });
    let (dir, out, written, slot) = export
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("the export task stopped: {e}")))?;
    written.map_err(audit_err)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    let complete = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = ChannelWriter {
        tx,
        runtime: tokio::runtime::Handle::current(),
        // A client that reads nothing for this long gives up the tenant's export slot.
        stall: state.request_timeout.max(std::time::Duration::from_secs(1)),
        failed: false,
    };
    let written_whole = std::sync::Arc::clone(&complete);
    tokio::task::spawn_blocking(move || {
        // Keep the temporary directory, and the tenant's place, until the archive is written.
        let _dir = dir;
        let _slot = slot;
        let mut tar = tar::Builder::new(writer);
        let res = tar
            .append_dir_all("bundle", &out)
            .and_then(|()| tar.finish());
        match res {
            // Set before the writer (and its sender) drops, which ends the stream.
            Ok(()) => written_whole.store(true, std::sync::atomic::Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "an export was not sent whole"),
        }
    });
    let stream = tokio_stream_from(rx, complete);
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"audit-bundle.tar\"",
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Hands the archive's bytes to the response body, from a blocking thread, giving up when the
/// client goes away or reads nothing for `stall`; after one failure every write fails at once
/// (the archive's own end, written when it drops, included).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    runtime: tokio::runtime::Handle,
    stall: std::time::Duration,
    failed: bool,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the export was already cut off",
            ));
        }
        let sent = self.runtime.block_on(tokio::time::timeout(
            self.stall,
            self.tx.send(Ok(buf.to_vec())),
        ));
        let failure = match sent {
            Ok(Ok(())) => return Ok(buf.len()),
            Ok(Err(_)) => {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            }
            Err(_) => {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")
            }
        };
        self.failed = true;
        Err(failure)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The archive's bytes as a body stream that ends cleanly only when the archive was written
/// whole (`complete`): one cut off ends with an error, so the response is aborted rather than
/// ended as if it were a whole (if short) archive.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
    complete: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let mut ended = false;
    futures_util::stream::poll_fn(move |cx| {
        if ended {
            return std::task::Poll::Ready(None);
        }
        match rx.poll_recv(cx) {
            std::task::Poll::Ready(None) => {
                ended = true;
                if complete.load(std::sync::atomic::Ordering::Acquire) {
                    std::task::Poll::Ready(None)
                } else {
                    std::task::Poll::Ready(Some(Err(std::io::Error::other(
                        "the export was cut off",
                    ))))
                }
            }
            other => other,
        }
    })
}

fn key_json(k: &crate::store::ApiKey) -> Value {
    json!({
        "id": k.id, "name": k.name, "role": k.role, "scopes": k.scopes,
        "created_at": k.created_at, "expires_at": k.expires_at, "revoked_at": k.revoked_at,
        "live": is_live(k, chrono::Utc::now()),
    })
}

fn key_error(e: KeyError) -> ApiError {
    match e {
        KeyError::BadRole(_)
        | KeyError::BadScope(_)
        | KeyError::ScopeBeyondRole(_)
        | KeyError::BadName
        | KeyError::BadExpiry
        | KeyError::OutlivesIssuer(_) => ApiError::BadRequest(e.to_string()),
        KeyError::Forbidden => ApiError::Forbidden(e.to_string()),
        KeyError::NotFound => ApiError::NotFound,
        // The key is the caller's own (another tenant's is NotFound first), so its state may show.
        KeyError::NotLive => ApiError::Conflict(e.to_string()),
        other => ApiError::Internal(other.into()),
    }
}

async fn list_keys(State(state): State<AppState>, auth: ApiContext) -> Res {
    let ctx = auth.require("admin:read")?;
    ok(json!(repo(&state, ctx)?
        .api_keys()
        .keys()?
        .iter()
        .map(key_json)
        .collect::<Vec<_>>()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    name: String,
    role: String,
    #[serde(default)]
    scopes: Vec<String>,
    expires_in_days: Option<u32>,
}

async fn create_key(
    State(state): State<AppState>,
    auth: ApiContext,
    JsonBody(b): JsonBody<KeyBody>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let role: KeyRole = b.role.parse().map_err(key_error)?;
    // Keys made through the API always expire; only the operator's CLI makes keys that never do.
    let days = b
        .expires_in_days
        .unwrap_or(crate::tenant::DEFAULT_API_KEY_DAYS);
    if !(1..=crate::tenant::MAX_API_KEY_DAYS).contains(&days) {
        return Err(key_error(KeyError::BadExpiry));
    }
    let issued = state
        .tenants
        .create_key(
            ctx,
            &b.name,
            role,
            b.scopes,
            Some(Duration::days(i64::from(days))),
        )
        .await
        .map_err(key_error)?;
    let mut v = key_json(&issued.record);
    // Shown once, here; only its hash is stored.
    v["token"] = json!(secrecy::ExposeSecret::expose_secret(&issued.token));
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn revoke_key(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(id): Path<String>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    state
        .tenants
        .revoke_key(ctx, &id, chrono::Utc::now())
        .await
        .map_err(key_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    overlap_secs: u32,
}

async fn rotate_key(
    State(state): State<AppState>,
    auth: ApiContext,
    Path(id): Path<String>,
    JsonBodyOrDefault(b): JsonBodyOrDefault<RotateBody>,
) -> Res {
    let ctx = auth.require("admin:write")?;
    let issued = state
        .tenants
        .rotate_key(ctx, &id, Duration::seconds(i64::from(b.overlap_secs)))
        .await
        .map_err(key_error)?;
    let mut v = key_json(&issued.record);
    v["token"] = json!(secrecy::ExposeSecret::expose_secret(&issued.token));
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::TreeError;
    use crate::audit::AuditError;

    #[test]
    fn only_a_tree_error_the_caller_caused_is_a_bad_request() {
        let caller = [
            TreeError::SizeOutOfRange {
                requested: 9,
                current: 3,
            },
            TreeError::LeafOutOfRange { leaf: 5, size: 3 },
            TreeError::SizeDecreased { size1: 3, size2: 2 },
            TreeError::EmptyOldTree,
        ];
        for e in caller {
            assert!(
                matches!(audit_err(AuditError::Tree(e)), ApiError::BadRequest(_)),
                "a bad request"
            );
        }
        let ours = [
            TreeError::Store("disk".into()),
            TreeError::Full,
            TreeError::MissingNode(crate::audit::merkle::NodeId::new(0, 1).unwrap()),
            TreeError::NodeMismatch(crate::audit::merkle::NodeId::new(1, 0).unwrap()),
        ];
        for e in ours {
            assert!(
                matches!(audit_err(AuditError::Tree(e)), ApiError::Internal(_)),
                "an internal error"
            );
        }
    }
}
