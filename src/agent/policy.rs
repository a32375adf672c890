//! The policy gate: every tool call is authorised by Cedar (`cedar-policy`) against the default
//! policies shipped in `default.cedar` and the tenant's own policies. A decision is made afresh for
//! every call; nothing is cached across runs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression,
};
use serde_json::Value;

use crate::tenant::{Role, TenantContext};

/// The default policies, shipped in the repository.
pub const DEFAULT_POLICIES: &str = include_str!("default.cedar");

/// Why a policy text was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text does not parse; the message is Cedar's.
    #[error("{0}")]
    Parse(String),
    /// A policy lacks an `@id("…")` annotation, or reuses an id.
    #[error("{0}")]
    Ids(String),
}

/// A gate decision, with the ids of the policies that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The call may go ahead.
    Allow {
        /// The permitting policies.
        policy_ids: Vec<String>,
    },
    /// The call is refused.
    Deny {
        /// Why, in words that reveal nothing of the tool.
        reason: String,
        /// The forbidding policies (empty when nothing permitted it).
        policy_ids: Vec<String>,
    },
}

/// Parses policy text whose policies carry `@id("…")` annotations, and names each policy by it (with
/// `prefix`), so audited decisions name policies the way their authors do.
///
/// # Errors
/// [`PolicyError`] with Cedar's message, or a missing or repeated id.
pub fn parse_policies(text: &str, prefix: &str) -> Result<PolicySet, PolicyError> {
    let parsed: PolicySet = text
        .parse()
        .map_err(|e: cedar_policy::ParseErrors| PolicyError::Parse(e.to_string()))?;
    let mut out = PolicySet::new();
    for p in parsed.policies() {
        let id = p.annotation("id").ok_or_else(|| {
            PolicyError::Ids(format!("a policy has no @id(\"…\") annotation: {}", p.id()))
        })?;
        let named = p.new_id(PolicyId::new(format!("{prefix}{id}")));
        out.add(named)
            .map_err(|_| PolicyError::Ids(format!("the policy id {id:?} is used twice")))?;
    }
    Ok(out)
}

/// Validates a tenant's policy text: it must parse and name every policy.
///
/// # Errors
/// As [`parse_policies`].
pub fn validate_tenant_policies(text: &str) -> Result<(), PolicyError> {
    parse_policies(text, "tenant.").map(|_| ())
}

/// What the gate is asked about one call.
pub struct Ask<'a> {
    /// The run's context.
    pub ctx: &'a TenantContext,
    /// The capability.
    pub capability: &'a str,
    /// The least role the tenant's grant requires.
    pub min_role: Role,
    /// Whether the tool only reads.
    pub read_only: bool,
    /// The tenant's plan.
    pub plan: &'a str,
    /// The arguments (summarised into the context; never stored).
    pub args: &'a Value,
}

fn rank(role: Role) -> i64 {
    match role {
        Role::Owner => 0,
        Role::Admin => 1,
        Role::Member => 2,
        Role::Viewer => 3,
    }
}

/// The entity types of a request, parsed once (parsing them for every call was 2% of the loop's
/// CPU).
struct Types {
    user: EntityTypeName,
    tool: EntityTypeName,
    action: EntityTypeName,
}

impl Default for Types {
    fn default() -> Self {
        let t = |name: &str| name.parse().expect("a fixed entity type name parses");
        Types {
            user: t("Agentgate::User"),
            tool: t("Agentgate::Tool"),
            action: t("Agentgate::Action"),
        }
    }
}

fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
}

fn s(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

/// The gate.
pub struct Gate {
    defaults: Arc<PolicySet>,
    authorizer: Authorizer,
    types: Types,
    /// Parsed policy sets (defaults plus a tenant's text), keyed by the SHA-256 of the tenant's id
    /// and text. This caches parsing, not decisions: every call is still decided afresh, and a
    /// changed text has another key.
    parsed: Mutex<HashMap<[u8; 32], Arc<PolicySet>>>,
}

/// The Cedar entities of one context's calls of one tool: the principal and the tool, with their
/// attributes.
#[derive(Clone, Debug)]
pub struct CallEntities {
    principal: EntityUid,
    resource: EntityUid,
    entities: Entities,
}

/// Parsed policy sets kept at most; the cache is simply emptied when it grows past this.
const PARSED_CACHE: usize = 1024;

impl Default for Gate {
    fn default() -> Self {
        Gate {
            defaults: Arc::new(
                parse_policies(DEFAULT_POLICIES, "").expect("the shipped default policies parse"),
            ),
            authorizer: Authorizer::new(),
            types: Types::default(),
            parsed: Mutex::new(HashMap::new()),
        }
    }
}

impl Gate {
    /// The default policies plus a tenant's text, parsed once per tenant and distinct text (keyed
    /// by both, so that no tenant's entry serves another).
    fn with_tenant(&self, tenant: &str, text: &str) -> Option<Arc<PolicySet>> {
        let mut h = Sha256::new();
        h.update(tenant.as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        if let Some(set) = self
            .parsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(Arc::clone(set));
        }
        let mut set = (*self.defaults).clone();
        for p in parse_policies(text, "tenant.").ok()?.policies() {
            set.add(p.clone()).ok()?;
        }
        let set = Arc::new(set);
        let mut cache = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= PARSED_CACHE {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&set));
        Some(set)
    }

    /// The entities of a call: its principal (the context's user, with tenant and role) and its
    /// tool (with capability, least role and whether it only reads). They depend on nothing that
    /// changes within a run, so a run builds them once per tool ([`Gate::decide_with`]); building
    /// them for every call was 6% of the loop's CPU at 32 runs. `None` if Cedar refuses them.
    fn entities(&self, ask: &Ask<'_>) -> Option<CallEntities> {
        let ctx = ask.ctx;
        let tenant = ctx.tenant_id().as_str();
        let principal = uid(&self.types.user, ctx.principal().as_str());
        let resource = uid(&self.types.tool, ask.capability);
        let entities = [
            Entity::new(
                principal.clone(),
                HashMap::from([
                    ("tenant".to_owned(), s(tenant)),
                    ("role".to_owned(), s(ctx.role().as_str())),
                    (
                        "role_rank".to_owned(),
                        RestrictedExpression::new_long(rank(ctx.role())),
                    ),
                ]),
                HashSet::new(),
            ),
            Entity::new(
                resource.clone(),
                HashMap::from([
                    ("tenant".to_owned(), s(tenant)),
                    ("capability".to_owned(), s(ask.capability)),
                    (
                        "min_role_rank".to_owned(),
                        RestrictedExpression::new_long(rank(ask.min_role)),
                    ),
                    (
                        "read_only".to_owned(),
                        RestrictedExpression::new_bool(ask.read_only),
                    ),
                ]),
                HashSet::new(),
            ),
        ];
        let entities = entities
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .and_then(|e| Entities::from_entities(e, None).ok())?;
        Some(CallEntities {
            principal,
            resource,
            entities,
        })
    }

    /// Decides one call under the default policies and the tenant's own (already validated) text.
    pub fn decide(&self, ask: &Ask<'_>, tenant_policies: Option<&str>) -> Decision {
        self.decide_with(ask, &OnceLock::new(), tenant_policies)
    }

    /// Decides one call, as [`Gate::decide`], with the call's entities taken from `entities`, or
    /// built into it if it is empty. A run keeps one per tool, so that the
    /// entities are built once per run and tool; the decision itself is made afresh every time.
    pub fn decide_with(
        &self,
        ask: &Ask<'_>,
        entities: &OnceLock<Option<CallEntities>>,
        tenant_policies: Option<&str>,
    ) -> Decision {
        let deny = |reason: &str, ids: Vec<String>| Decision::Deny {
            reason: reason.to_owned(),
            policy_ids: ids,
        };
        let set = match tenant_policies {
            None => Arc::clone(&self.defaults),
            Some(text) => match self.with_tenant(ask.ctx.tenant_id().as_str(), text) {
                Some(set) => set,
                // Stored policies were validated; if they no longer parse, fail closed.
                None => return deny("the tenant's policies are invalid", vec![]),
            },
        };
        let Some(e) = entities.get_or_init(|| self.entities(ask)) else {
            return deny("the request could not be evaluated", vec![]);
        };
        let ctx = ask.ctx;
        let action = uid(&self.types.action, "invoke");
        let features: Vec<RestrictedExpression> = ctx
            .features()
            .iter()
            .filter(|(_, on)| **on)
            .map(|(k, _)| s(k))
            .collect();
        let keys: Vec<RestrictedExpression> = ask
            .args
            .as_object()
            .map(|o| o.keys().map(|k| s(k)).collect())
            .unwrap_or_default();
        let arg_bytes = i64::try_from(ask.args.to_string().len()).unwrap_or(i64::MAX);
        let context = Context::from_pairs([
            ("plan".to_owned(), s(ask.plan)),
            (
                "features".to_owned(),
                RestrictedExpression::new_set(features),
            ),
            ("arg_keys".to_owned(), RestrictedExpression::new_set(keys)),
            (
                "arg_bytes".to_owned(),
                RestrictedExpression::new_long(arg_bytes),
            ),
        ]);
        let request = match context.ok().and_then(|c| {
            Request::new(e.principal.clone(), action, e.resource.clone(), c, None).ok()
        }) {
            Some(r) => r,
            None => return deny("the request could not be evaluated", vec![]),
        };
        let response = self.authorizer.is_authorized(&request, &set, &e.entities);
        let ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        match response.decision() {
            CedarDecision::Allow => Decision::Allow { policy_ids: ids },
            CedarDecision::Deny if ids.is_empty() => deny("no policy permits this call", ids),
            CedarDecision::Deny => deny("a policy forbids this call", ids),
        }
    }
}
