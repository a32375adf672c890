//! The policy gate: every tool call is authorised by Cedar (`cedar-policy`) against the default
//! policies shipped in `default.cedar` and the tenant's own policies. Every policy is validated in
//! strict mode against the schema in `schema.cedarschema`, which describes exactly the requests
//! the gate builds, and every request and its entities are checked against it too: a policy that
//! Cedar would skip (an unknown attribute, entity type or action) is refused where it is stored,
//! and an evaluation error at decision time denies rather than letting Cedar skip the policy. A
//! decision is made afresh for every call; nothing is cached across runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use cedar_policy::{
    AuthorizationError, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use serde_json::Value;

use crate::tenant::{Role, TenantContext};

/// The default policies, shipped in the repository.
pub const DEFAULT_POLICIES: &str = include_str!("default.cedar");

/// The Cedar schema of the gate's requests (principal, action, resource and context), in Cedar's
/// schema format.
pub const SCHEMA: &str = include_str!("schema.cedarschema");

/// Why a policy text was refused. Every message is about the text itself (its ids as the author
/// wrote them, Cedar's description of the problem), so it may be shown to whoever sent it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text does not parse; the message is Cedar's.
    #[error("{0}")]
    Parse(String),
    /// A policy lacks an `@id("…")` annotation, has one that is not 1 to 64 characters of a-z,
    /// 0-9, '.', '_' and '-', or reuses one.
    #[error("{0}")]
    Ids(String),
    /// A policy is a template (it has a `?principal` or `?resource` slot). Nothing links
    /// templates, so Cedar would never apply it.
    #[error(
        "policy {id:?} is a template (it uses ?principal or ?resource); templates are not supported"
    )]
    Template {
        /// The id as written.
        id: String,
        /// The id as audited (with the prefix).
        policy_id: String,
    },
    /// Policies do not validate against the schema; the message is Cedar's, one line a problem.
    #[error("{message}")]
    Invalid {
        /// Cedar's messages, which name each policy by the id as written.
        message: String,
        /// The ids of the policies at fault, as audited (with the prefix).
        policy_ids: Vec<String>,
    },
}

impl PolicyError {
    /// The ids, as audited, of the policies at fault, where the text got far enough to name them.
    fn policy_ids(&self) -> Vec<String> {
        match self {
            PolicyError::Parse(_) | PolicyError::Ids(_) => Vec::new(),
            PolicyError::Template { policy_id, .. } => vec![policy_id.clone()],
            PolicyError::Invalid { policy_ids, .. } => policy_ids.clone(),
        }
    }
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
        /// The forbidding policies, or those that could not be evaluated or loaded (empty when
        /// nothing permitted the call, or a stored text named no policy).
        policy_ids: Vec<String>,
    },
}

/// The validator for [`SCHEMA`], built once.
fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(SCHEMA).expect("the shipped schema parses");
        Validator::new(schema)
    })
}

/// Validation problems listed in a refusal at most; the rest are counted.
const LISTED_PROBLEMS: usize = 8;

/// Parses policy text whose policies carry `@id("…")` annotations, validates it against
/// [`SCHEMA`] in strict mode, and names each policy by its id (with `prefix`), so audited
/// decisions name policies the way their authors do.
///
/// # Errors
/// [`PolicyError`] with Cedar's message, a missing or repeated id, a template, or Cedar's
/// validation messages.
pub fn parse_policies(text: &str, prefix: &str) -> Result<PolicySet, PolicyError> {
    let parsed: PolicySet = text
        .parse()
        .map_err(|e: cedar_policy::ParseErrors| PolicyError::Parse(e.to_string()))?;
    // Every policy and template, in the order of the text: Cedar names them policy0, policy1, …
    let mut all: Vec<(Option<usize>, Option<&str>, bool)> = parsed
        .policies()
        .map(|p| (place(p.id()), p.annotation("id"), false))
        .chain(
            parsed
                .templates()
                .map(|t| (place(t.id()), t.annotation("id"), true)),
        )
        .collect();
    all.sort_by_key(|(at, ..)| *at);
    let mut seen: HashMap<&str, Option<usize>> = HashMap::new();
    for &(at, id, _) in &all {
        let Some(id) = id else {
            return Err(PolicyError::Ids(format!(
                "{} has no @id(\"…\") annotation; every policy needs one",
                which(at)
            )));
        };
        if !id_ok(id) {
            return Err(PolicyError::Ids(format!(
                "{} has the @id \"{}\": an @id is 1 to 64 characters, each a-z, 0-9, '.', '_' or '-'",
                which(at),
                shown(id)
            )));
        }
        if let Some(first) = seen.insert(id, at) {
            return Err(PolicyError::Ids(format!(
                "the @id \"{id}\" is used twice ({} and {})",
                which(first),
                which(at)
            )));
        }
    }
    if let Some(&(_, Some(id), _)) = all.iter().find(|(.., template)| *template) {
        return Err(PolicyError::Template {
            id: id.to_owned(),
            policy_id: format!("{prefix}{id}"),
        });
    }
    // Named by the ids as written first, so that Cedar's validation messages name them so.
    let mut named = PolicySet::new();
    for p in parsed.policies() {
        let id = p
            .annotation("id")
            .expect("every policy's @id was checked above");
        named
            .add(p.new_id(PolicyId::new(id)))
            .map_err(|_| PolicyError::Ids(format!("the @id \"{id}\" is used twice")))?;
    }
    let result = validator().validate(&named, ValidationMode::Strict);
    if !result.validation_passed() {
        let errors: Vec<_> = result.validation_errors().collect();
        let mut policy_ids: Vec<String> = Vec::new();
        for e in &errors {
            let id = format!("{prefix}{}", e.policy_id());
            if !policy_ids.contains(&id) {
                policy_ids.push(id);
            }
        }
        let mut message: Vec<String> = errors
            .iter()
            .take(LISTED_PROBLEMS)
            .map(ToString::to_string)
            .collect();
        if errors.len() > LISTED_PROBLEMS {
            message.push(format!("and {} more", errors.len() - LISTED_PROBLEMS));
        }
        return Err(PolicyError::Invalid {
            message: message.join("\n"),
            policy_ids,
        });
    }
    if prefix.is_empty() {
        return Ok(named);
    }
    let mut out = PolicySet::new();
    for p in named.policies() {
        out.add(p.new_id(PolicyId::new(format!("{prefix}{}", p.id()))))
            .map_err(|_| PolicyError::Ids(format!("the @id \"{}\" is used twice", p.id())))?;
    }
    Ok(out)
}

/// Validates a tenant's policy text: it must parse, name every policy, have no templates, and
/// validate against [`SCHEMA`]. A text with no policies (empty, or only comments) is valid: it is
/// how a tenant removes its own policies.
///
/// # Errors
/// As [`parse_policies`].
pub fn validate_tenant_policies(text: &str) -> Result<(), PolicyError> {
    parse_policies(text, "tenant.").map(|_| ())
}

/// Whether `id` may be a policy's `@id`: 1 to 64 characters of a-z, 0-9, '.', '_' and '-'. It is
/// written into the audit event of every decision the policy takes part in, so it is short and
/// plain (no newlines, control characters or look-alikes).
fn id_ok(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

/// A refused `@id` as a message shows it: its first 64 characters, anything but printable ASCII
/// escaped, so the message stays one short line whatever the id held.
fn shown(id: &str) -> String {
    let mut out: String = id.chars().take(64).flat_map(char::escape_default).collect();
    if id.chars().nth(64).is_some() {
        out.push('…');
    }
    out
}

/// Where in its text Cedar's generated id (`policy0`, `policy1`, …) puts a policy, counting from 1.
fn place(id: &PolicyId) -> Option<usize> {
    let n: usize = id.to_string().strip_prefix("policy")?.parse().ok()?;
    Some(n + 1)
}

/// A policy, for a message, by its place in the text.
fn which(at: Option<usize>) -> String {
    at.map_or_else(
        || "a policy".to_owned(),
        |n| format!("policy {n} of the text"),
    )
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

/// The parts of an [`Ask`] that go into a Cedar request, taken out of the run's context.
struct Call<'a> {
    tenant: &'a str,
    principal: &'a str,
    role: Role,
    /// The tenant's feature flags; those that are on go into the context.
    features: &'a BTreeMap<String, bool>,
    capability: &'a str,
    min_role: Role,
    read_only: bool,
    plan: &'a str,
    args: &'a Value,
}

impl<'a> Call<'a> {
    fn of(ask: &Ask<'a>) -> Self {
        let ctx = ask.ctx;
        Call {
            tenant: ctx.tenant_id().as_str(),
            principal: ctx.principal().as_str(),
            role: ctx.role(),
            features: ctx.features(),
            capability: ask.capability,
            min_role: ask.min_role,
            read_only: ask.read_only,
            plan: ask.plan,
            args: ask.args,
        }
    }
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

/// A tenant's policies as the gate holds them: the defaults and the tenant's, or, when the stored
/// text no longer parses or validates, the ids (as audited) of the policies at fault, if it named
/// any.
type Loaded = Result<Arc<PolicySet>, Vec<String>>;

/// The gate.
pub struct Gate {
    defaults: Arc<PolicySet>,
    authorizer: Authorizer,
    types: Types,
    /// Parsed policy sets (defaults plus a tenant's text), keyed by the SHA-256 of the tenant's id
    /// and text. This caches parsing and validation, not decisions: every call is still decided
    /// afresh, and a changed text has another key.
    parsed: Mutex<HashMap<[u8; 32], Loaded>>,
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
                parse_policies(DEFAULT_POLICIES, "")
                    .expect("the shipped default policies parse and validate"),
            ),
            authorizer: Authorizer::new(),
            types: Types::default(),
            parsed: Mutex::new(HashMap::new()),
        }
    }
}

impl Gate {
    /// The default policies plus a tenant's text, parsed and validated once per tenant and
    /// distinct text (keyed by both, so that no tenant's entry serves another).
    fn with_tenant(&self, tenant: &str, text: &str) -> Loaded {
        let mut h = Sha256::new();
        h.update(tenant.as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        if let Some(loaded) = self
            .parsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return loaded.clone();
        }
        // The text was validated when stored, but with an older gate's rules perhaps (or none):
        // checked again, so that nothing stored makes the gate allow more than it now would.
        let loaded = parse_policies(text, "tenant.")
            .map_err(|e| e.policy_ids())
            .and_then(|tenant_set| {
                let mut set = (*self.defaults).clone();
                for p in tenant_set.policies() {
                    set.add(p.clone()).map_err(|_| vec![p.id().to_string()])?;
                }
                Ok(Arc::new(set))
            });
        let mut cache = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= PARSED_CACHE {
            cache.clear();
        }
        cache.insert(key, loaded.clone());
        loaded
    }

    /// The entities of a call: its principal (the context's user, with tenant and role) and its
    /// tool (with capability, least role and whether it only reads), checked against [`SCHEMA`].
    /// They depend on nothing that changes within a run, so a run builds them once per tool
    /// ([`Gate::decide_with`]); building them for every call was 6% of the loop's CPU at 32 runs.
    /// `None` if Cedar refuses them.
    fn entities(&self, call: &Call<'_>) -> Option<CallEntities> {
        let principal = uid(&self.types.user, call.principal);
        let resource = uid(&self.types.tool, call.capability);
        let entities = [
            Entity::new(
                principal.clone(),
                HashMap::from([
                    ("tenant".to_owned(), s(call.tenant)),
                    ("role".to_owned(), s(call.role.as_str())),
                    (
                        "role_rank".to_owned(),
                        RestrictedExpression::new_long(rank(call.role)),
                    ),
                ]),
                HashSet::new(),
            ),
            Entity::new(
                resource.clone(),
                HashMap::from([
                    ("tenant".to_owned(), s(call.tenant)),
                    ("capability".to_owned(), s(call.capability)),
                    (
                        "min_role_rank".to_owned(),
                        RestrictedExpression::new_long(rank(call.min_role)),
                    ),
                    (
                        "read_only".to_owned(),
                        RestrictedExpression::new_bool(call.read_only),
                    ),
                ]),
                HashSet::new(),
            ),
        ];
        let schema = validator().schema();
        let entities = entities
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .and_then(|e| Entities::from_entities(e, Some(schema)).ok())?;
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
        self.decide_call(&Call::of(ask), entities, tenant_policies)
    }

    fn decide_call(
        &self,
        call: &Call<'_>,
        entities: &OnceLock<Option<CallEntities>>,
        tenant_policies: Option<&str>,
    ) -> Decision {
        let deny = |reason: &str, ids: Vec<String>| Decision::Deny {
            reason: reason.to_owned(),
            policy_ids: ids,
        };
        let set = match tenant_policies {
            None => Arc::clone(&self.defaults),
            Some(text) => match self.with_tenant(call.tenant, text) {
                Ok(set) => set,
                // Fail closed, naming the policies at fault where the text named them.
                Err(ids) => return deny("the tenant's policies are invalid", ids),
            },
        };
        let Some(e) = entities.get_or_init(|| self.entities(call)) else {
            return deny("the request could not be evaluated", vec![]);
        };
        let action = uid(&self.types.action, "invoke");
        let features: Vec<RestrictedExpression> = call
            .features
            .iter()
            .filter(|(_, on)| **on)
            .map(|(k, _)| s(k))
            .collect();
        let keys: Vec<RestrictedExpression> = call
            .args
            .as_object()
            .map(|o| o.keys().map(|k| s(k)).collect())
            .unwrap_or_default();
        let arg_bytes = i64::try_from(call.args.to_string().len()).unwrap_or(i64::MAX);
        let context = Context::from_pairs([
            ("plan".to_owned(), s(call.plan)),
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
        // Checked against the schema in debug builds (every test's decision), not in release:
        // the request is built here, so it conforms by construction, and the check was 14 µs of
        // every call (`cargo bench --bench agent`); policies are validated when stored and loaded.
        let schema = cfg!(debug_assertions).then(|| validator().schema());
        let request = match context.ok().and_then(|c| {
            Request::new(e.principal.clone(), action, e.resource.clone(), c, schema).ok()
        }) {
            Some(r) => r,
            None => return deny("the request could not be evaluated", vec![]),
        };
        let response = self.authorizer.is_authorized(&request, &set, &e.entities);
        // Cedar skips a policy whose evaluation errors (an overflow, say) and decides without it;
        // a skipped forbid would allow what its author forbade, so any error denies.
        let mut failed: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| match e {
                AuthorizationError::PolicyEvaluationError(e) => e.policy_id().to_string(),
            })
            .collect();
        if !failed.is_empty() {
            failed.sort();
            failed.dedup();
            return deny("a policy could not be evaluated", failed);
        }
        let mut ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        // Cedar's reasons are a set; sorted, an audited decision does not depend on its order.
        ids.sort();
        match response.decision() {
            CedarDecision::Allow => Decision::Allow { policy_ids: ids },
            CedarDecision::Deny if ids.is_empty() => deny("no policy permits this call", ids),
            CedarDecision::Deny => deny("a policy forbids this call", ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The review's example: `capabilty` for `capability`. It parses, but errors on every
    /// evaluation, and Cedar skips an erroring policy, so the forbid never forbade anything.
    const TYPO: &str = r#"@id("no-forget") forbid(principal,action,resource) when { resource.capabilty == "memory.forget" };"#;

    /// A member's call of `capability`, granted to members, with `args`.
    fn decide(capability: &str, args: &Value, tenant_policies: Option<&str>) -> Decision {
        let features = BTreeMap::from([("beta".to_owned(), true)]);
        let call = Call {
            tenant: "t0",
            principal: "slack:U0MEMBER",
            role: Role::Member,
            features: &features,
            capability,
            min_role: Role::Member,
            read_only: false,
            plan: "team",
            args,
        };
        Gate::default().decide_call(&call, &OnceLock::new(), tenant_policies)
    }

    #[test]
    fn requests_conform_to_the_schema_and_valid_policies_decide() {
        let args = serde_json::json!({"topic": "dog"});
        assert_eq!(
            decide("memory.forget", &args, None),
            Decision::Allow {
                policy_ids: vec!["default.granted-role".into()]
            }
        );
        let valid = TYPO.replace("capabilty", "capability");
        assert_eq!(
            decide("memory.forget", &args, Some(&valid)),
            Decision::Deny {
                reason: "a policy forbids this call".into(),
                policy_ids: vec!["tenant.no-forget".into()]
            }
        );
        assert!(matches!(
            decide("memory.recall", &args, Some(&valid)),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn stored_policies_that_do_not_validate_deny_every_call_naming_them() {
        // Stored before the gate validated against the schema: Cedar would skip the forbid and
        // allow memory.forget.
        let args = serde_json::json!({"topic": "dog"});
        for capability in ["memory.forget", "memory.recall"] {
            assert_eq!(
                decide(capability, &args, Some(TYPO)),
                Decision::Deny {
                    reason: "the tenant's policies are invalid".into(),
                    policy_ids: vec!["tenant.no-forget".into()]
                },
                "{capability}"
            );
        }
    }

    #[test]
    fn a_policy_that_errors_at_evaluation_denies_naming_it() {
        // It validates (the types are right) but overflows on every call: Cedar skips it.
        let text = r#"@id("overflow") forbid(principal, action, resource) when { context.arg_bytes * 9223372036854775807 > 0 && resource.capability == "memory.forget" };"#;
        validate_tenant_policies(text).expect("it validates");
        let args = serde_json::json!({"topic": "dog"});
        for capability in ["memory.forget", "memory.recall"] {
            assert_eq!(
                decide(capability, &args, Some(text)),
                Decision::Deny {
                    reason: "a policy could not be evaluated".into(),
                    policy_ids: vec!["tenant.overflow".into()]
                },
                "{capability}"
            );
        }
    }

    #[test]
    fn an_id_that_is_not_short_and_plain_is_refused() {
        let policy = |id: &str| {
            format!("@id(\"{id}\") forbid(principal, action, resource) when {{ context.plan == \"free\" }};")
        };
        let long = "a".repeat(64);
        for ok in ["no-forget", "a", "v1.2_x-y", long.as_str()] {
            validate_tenant_policies(&policy(ok)).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let too_long = "a".repeat(65);
        for (bad, shown) in [
            ("", ""),
            ("No-Forget", "No-Forget"),
            ("no forget", "no forget"),
            ("a\\nb", "a\\nb"),
            ("tab\\there", "tab\\there"),
            ("caf\u{e9}", "caf\\u{e9}"),
            ("rtl\u{202e}", "rtl\\u{202e}"),
            ("a/b", "a/b"),
        ] {
            let err = validate_tenant_policies(&policy(bad)).expect_err(bad);
            assert!(matches!(err, PolicyError::Ids(_)), "{bad:?}: {err:?}");
            assert_eq!(
                err.to_string(),
                format!("policy 1 of the text has the @id \"{shown}\": an @id is 1 to 64 characters, each a-z, 0-9, '.', '_' or '-'"),
                "{bad:?}"
            );
        }
        let err = validate_tenant_policies(&policy(&too_long)).expect_err("65 characters");
        assert!(err.to_string().contains(&format!("\"{long}…\"")), "{err}");
        let huge = format!("{}\n{}", "x".repeat(1 << 20), "y".repeat(1000));
        let err = validate_tenant_policies(&policy(&huge.replace('\n', "\\n"))).expect_err("huge");
        assert!(err.to_string().len() < 200, "{err}");
        // Stored under the old rules, such an id is never audited: every call is refused.
        let args = serde_json::json!({});
        assert_eq!(
            decide("memory.recall", &args, Some(&policy("No Forget"))),
            Decision::Deny {
                reason: "the tenant's policies are invalid".into(),
                policy_ids: vec![]
            }
        );
    }

    #[test]
    fn no_policies_clear_and_a_missing_id_and_a_repeated_id_are_refused_clearly() {
        for empty in ["", "  \n", "// nothing yet\n// none\n"] {
            // How a tenant removes its own policies: stored, it adds nothing and takes nothing
            // away.
            validate_tenant_policies(empty).expect(empty);
            assert!(matches!(
                decide("memory.recall", &serde_json::json!({}), Some(empty)),
                Decision::Allow { .. }
            ));
        }
        let text = r#"@id("one") permit(principal, action, resource) when { false };
forbid(principal, action, resource);"#;
        assert_eq!(
            validate_tenant_policies(text).unwrap_err().to_string(),
            "policy 2 of the text has no @id(\"…\") annotation; every policy needs one"
        );
        let text = r#"@id("one") permit(principal, action, resource) when { false };
@id("two") permit(principal, action, resource) when { false };
@id("one") forbid(principal, action, resource);"#;
        assert_eq!(
            validate_tenant_policies(text).unwrap_err().to_string(),
            "the @id \"one\" is used twice (policy 1 of the text and policy 3 of the text)"
        );
        // A template is held to the same: its id is checked before it is refused as a template.
        let text = r#"@id("one") permit(principal, action, resource) when { false };
@id("one") forbid(principal == ?principal, action, resource);"#;
        assert!(validate_tenant_policies(text)
            .unwrap_err()
            .to_string()
            .contains("used twice"));
        let text = "forbid(principal == ?principal, action, resource);";
        assert!(validate_tenant_policies(text)
            .unwrap_err()
            .to_string()
            .contains("no @id"));
    }

    #[test]
    fn the_default_policies_validate_against_the_schema() {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA).expect("the schema parses");
        let defaults: PolicySet = DEFAULT_POLICIES.parse().expect("the defaults parse");
        let result = Validator::new(schema).validate(&defaults, ValidationMode::Strict);
        assert!(result.validation_passed(), "{result}");
        assert_eq!(defaults.policies().count(), 3);
        assert!(parse_policies(DEFAULT_POLICIES, "").is_ok());
    }

    #[test]
    fn a_misspelt_attribute_entity_type_or_action_is_refused_naming_the_policy() {
        let err = validate_tenant_policies(TYPO).expect_err("the typo is refused");
        assert_eq!(
            err.to_string(),
            "for policy `no-forget`, attribute `capabilty` on entity type `Agentgate::Tool` not found"
        );
        assert!(
            matches!(&err, PolicyError::Invalid { policy_ids, .. } if policy_ids == &["tenant.no-forget"]),
            "{err:?}"
        );
        for (id, text) in [
            (
                "no-such-type",
                r#"@id("no-such-type") forbid(principal == Agentgate::Users::"slack:U1", action, resource);"#,
            ),
            (
                "no-such-action",
                r#"@id("no-such-action") forbid(principal, action == Agentgate::Action::"call", resource);"#,
            ),
            (
                "no-such-context",
                r#"@id("no-such-context") forbid(principal, action, resource) when { context.plann == "free" };"#,
            ),
        ] {
            let err = validate_tenant_policies(text).expect_err(id);
            assert!(err.to_string().contains(&format!("`{id}`")), "{id}: {err}");
        }
        // What the documentation shows is accepted.
        let good = r#"@id("no-forget") forbid (principal, action, resource) when { resource.capability == "memory.forget" };
@id("tickets-on-team-plan-only") forbid (principal, action, resource) when { resource.capability like "webhook.*" && context.plan == "free" };
@id("no-recall-for-member") forbid (principal == Agentgate::User::"slack:U0MEMBER", action == Agentgate::Action::"invoke", resource == Agentgate::Tool::"memory.recall");"#;
        validate_tenant_policies(good).expect("valid policies are accepted");
    }

    #[test]
    fn a_template_is_refused() {
        let text = r#"@id("ok") permit(principal, action, resource) when { false };
@id("linked") forbid(principal == ?principal, action, resource);"#;
        let err = validate_tenant_policies(text).expect_err("a template is refused");
        assert!(matches!(err, PolicyError::Template { .. }), "{err:?}");
        assert!(
            err.to_string().contains("\"linked\" is a template"),
            "{err}"
        );
    }
}
