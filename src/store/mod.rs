//! Storage: the repository traits every caller uses, obtained only from a `TenantContext`, and the
//! embedded sled backend behind them. This is the only module that imports sled.
//!
//! Every tenant's records live in that tenant's own sled tree, and every key inside it begins with the
//! tenant id as well, so a record can be neither read nor written under another tenant's name. The one
//! cross-tenant structure is the installation directory (workspace key to tenant), read by tenant
//! resolution and written by provisioning, and the tenant registry read by the operator's listings:
//! both sit behind [`Store::directory`] and [`Store::admin`], which are reviewed admin paths.

mod embedded;
mod records;
mod run_files;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::audit::projection::{RunState, Usage, UsageDeltas};
use crate::crypto::{Cipher, CryptoError};
use crate::installation::{Installation, InstallationId};
use crate::tenant::{PrincipalId, Role, TenantContext, TenantId, TenantSettings, ToolGrant};

pub use embedded::Embedded;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O, or the database is locked by another process).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored record could not be decoded; the store never guesses a value for it.
    #[error("corrupt record {key}: {why}")]
    Corrupt {
        /// The record's key, which carries no secret.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// A sealed secret in a record did not open.
    #[error("a sealed secret in {key} did not open: {source}")]
    Sealed {
        /// The record's key.
        key: String,
        /// The failure.
        source: CryptoError,
    },
    /// A workspace is already bound to another tenant.
    #[error("workspace {0} is already installed in another tenant")]
    WorkspaceTaken(String),
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A tenant's settings.
pub trait SettingsRepo {
    /// The settings, if the tenant has been provisioned.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn get(&self) -> Result<Option<TenantSettings>>;
    /// Replaces the settings.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn put(&self, settings: &TenantSettings) -> Result<()>;
}

/// A tenant's membership table: who holds which role.
pub trait MembershipRepo {
    /// The role of `principal`, if listed.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn role_of(&self, principal: &PrincipalId) -> Result<Option<Role>>;
    /// Sets `principal`'s role; returns the previous one.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn set_role(&self, principal: &PrincipalId, role: Role) -> Result<Option<Role>>;
    /// Removes `principal`; returns the role it held.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn remove(&self, principal: &PrincipalId) -> Result<Option<Role>>;
    /// Every member, ordered by principal.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn list(&self) -> Result<Vec<(PrincipalId, Role)>>;
}

/// A tenant's installation records. Tokens are sealed on the way in and opened on the way out.
pub trait InstallationRepo {
    /// One installation.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure, a corrupt record, or a token that does not open.
    fn get(&self, id: &InstallationId) -> Result<Option<Installation>>;
    /// Inserts or replaces an installation. Its `tenant` must be this repository's tenant.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    ///
    /// # Panics
    /// When the record names another tenant: that is a programming error, never an input.
    fn put(&self, installation: &Installation) -> Result<()>;
    /// Every installation, ordered by id.
    ///
    /// # Errors
    /// As for [`InstallationRepo::get`].
    fn list(&self) -> Result<Vec<Installation>>;
}

/// A tenant's tool grants.
pub trait ToolGrantRepo {
    /// Every grant, ordered by capability.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn list(&self) -> Result<Vec<ToolGrant>>;
    /// Inserts or replaces the grant for its capability.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn put(&self, grant: &ToolGrant) -> Result<()>;
    /// The grant for `capability`, if there is one.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn get(&self, capability: &str) -> Result<Option<ToolGrant>>;
    /// Removes the grant for `capability`; true if there was one.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn remove(&self, capability: &str) -> Result<bool>;
}

/// Live projections kept from the audit log: monthly usage and run states, with the sequence number
/// up to which the log has been folded in.
pub trait ProjectionRepo {
    /// One past the last event folded in.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn projection_head(&self) -> Result<u64>;
    /// Folds in the events before `head`: adds usage deltas by month, sets run states, sets or
    /// removes (`None`) members' roles in order, and moves the head.
    ///
    /// Folding the same events again (after a crash between the writes) changes nothing: each
    /// month's usage record keeps the head of the fold that last wrote it and takes in only the
    /// deltas of later events, and run states and roles are set, not added to. So a store may
    /// write the records one by one, the head last, as long as its recovery keeps a prefix of its
    /// writes; member changes are written in one atomic batch with the head all the same.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn apply_projection(
        &self,
        usage: &UsageDeltas,
        runs: &[(String, RunState)],
        members: &[(PrincipalId, Option<Role>)],
        head: u64,
    ) -> Result<()>;
    /// Usage by month.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn usage(&self) -> Result<BTreeMap<String, Usage>>;
    /// Usage in one month (`YYYY-MM`), zero when nothing was used.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn usage_in(&self, month: &str) -> Result<Usage>;
    /// Run states by run id.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn runs(&self) -> Result<BTreeMap<String, RunState>>;
    /// One run's state, if the log has started it.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn run_state(&self, run_id: &str) -> Result<Option<RunState>>;
    /// The ids of the runs whose state is running, from an index the fold keeps beside the run
    /// states, so that listing them does not read every run the tenant ever had.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn running_runs(&self) -> Result<Vec<String>>;
    /// For a running run, a log position at or before its first event, where the index knows
    /// one (not for runs indexed by the migration from an older store).
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn running_since(&self, run_id: &str) -> Result<Option<u64>>;
}

/// One remembered fact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// The subject it was saved under (normalised: trimmed, lower case).
    pub subject: String,
    /// The fact.
    pub fact: String,
    /// Who saved it.
    pub saved_by: String,
    /// When.
    pub saved_at: chrono::DateTime<chrono::Utc>,
}

/// A tenant's remembered facts, keyed by subject.
pub trait MemoryRepo {
    /// Saves a fact under a subject.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn save_fact(&self, fact: &Fact) -> Result<()>;
    /// The facts saved under a subject, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn recall(&self, subject: &str) -> Result<Vec<Fact>>;
    /// Forgets every fact under a subject; returns how many.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn forget(&self, subject: &str) -> Result<usize>;
}

/// One turn of a conversation, as fed back to the planner.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    /// `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub text: String,
}

/// Conversation history per (principal, conversation), bounded.
pub trait ConversationRepo {
    /// The turns of a conversation, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn history(&self, principal: &str, conversation: &str) -> Result<Vec<Turn>>;
    /// Appends turns, keeping only the last `limit`.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn push_turns(
        &self,
        principal: &str,
        conversation: &str,
        turns: &[Turn],
        limit: usize,
    ) -> Result<()>;
}

/// A tool a tenant admin declared: the gateway POSTs its arguments to `url`, signed with `secret`.
#[derive(Clone, Debug)]
pub struct WebhookTool {
    /// The tool's name; its capability is `webhook.<name>`.
    pub name: String,
    /// What it does, shown to the model.
    pub description: String,
    /// The JSON Schema its arguments must satisfy.
    pub schema: serde_json::Value,
    /// Where to POST.
    pub url: String,
    /// The tenant's signing credential for this tool; sealed at rest.
    pub secret: secrecy::SecretString,
    /// How long a call may take.
    pub timeout_ms: u64,
}

/// A tenant's webhook tools.
pub trait WebhookToolRepo {
    /// Inserts or replaces a tool.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn put_webhook(&self, tool: &WebhookTool) -> Result<()>;
    /// Every tool, by name.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure, a corrupt record or a secret that does not open.
    fn webhooks(&self) -> Result<Vec<WebhookTool>>;
    /// The tool named `name`, if there is one.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure, a corrupt record or a secret that does not open.
    fn webhook(&self, name: &str) -> Result<Option<WebhookTool>>;
    /// Removes a tool; true if there was one.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn remove_webhook(&self, name: &str) -> Result<bool>;
}

/// A tenant's own Cedar policies (text, validated before it is stored).
pub trait PolicyRepo {
    /// The tenant's policy text, if any.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn tenant_policies(&self) -> Result<Option<String>>;
    /// Replaces the tenant's policy text.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn put_tenant_policies(&self, text: &str) -> Result<()>;
}

/// Checkpoints of agent runs, so that a restart resumes each unfinished run from its own last step.
pub trait RunRepo {
    /// Stores a run's checkpoint (opaque bytes of the agent's run state) and whether it is finished,
    /// and returns once it would survive a crash of the process.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn put_run(&self, run_id: &str, state: &[u8], finished: bool) -> Result<()>;
    /// A run's last checkpoint.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn get_run(&self, run_id: &str) -> Result<Option<Vec<u8>>>;
    /// Whether the run is stored as finished.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn is_finished(&self, run_id: &str) -> Result<bool>;
    /// Seals where a run's answer goes (a Slack `response_url`, a Discord interaction token: reply
    /// credentials), bound to the tenant and the run, for the run's checkpoint to keep.
    fn seal_reply(&self, run_id: &str, target: &serde_json::Value) -> String;
    /// Opens what [`RunRepo::seal_reply`] sealed for the same run.
    ///
    /// # Errors
    /// [`StoreError::Sealed`] when it does not open (another key, run or tenant), or
    /// [`StoreError::Corrupt`] when what opens is not JSON.
    fn open_reply(&self, run_id: &str, sealed: &str) -> Result<serde_json::Value>;
    /// The ids of every run with a checkpoint, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn all_runs(&self) -> Result<Vec<String>>;
    /// The ids of runs that are not finished.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn unfinished_runs(&self) -> Result<Vec<String>>;
}

/// Keys seen before, per tenant, such as platform event ids, so that a retried delivery never runs
/// anything twice.
pub trait DedupeRepo {
    /// Claims `key` for a delivery whose command is yet to be recorded, noting the tenant's log
    /// size (`log_size`) when it was claimed: [`SeenClaim::First`] the first time (durable before
    /// it returns), else what an earlier claim left.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn claim(&self, key: &str, log_size: u64) -> Result<SeenClaim>;
    /// Marks a claimed `key` as recorded: its command is on record.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn confirm(&self, key: &str) -> Result<()>;
    /// Forgets `key`, so that the next [`DedupeRepo::claim`] of it is the first again: for a
    /// request whose command could not be recorded after its key was. Durable before it returns.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn forget(&self, key: &str) -> Result<()>;
    /// Removes the keys first seen before `before` (Unix seconds); returns how many. A key kept
    /// without the time it was seen (written before keys had one) is given the current time, so
    /// that it goes in a sweep a whole retention later, never at once.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn sweep(&self, before: i64) -> Result<usize>;
}

/// What [`DedupeRepo::claim`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenClaim {
    /// Never seen: the caller's to record.
    First,
    /// Its command is on record.
    Recorded,
    /// Claimed by a delivery that had not confirmed its record, when the tenant's log held
    /// `log_size` events: if that delivery is gone (a crash), its command is on record only if a
    /// `command.received` of it follows that point.
    Pending {
        /// The log's size when it was claimed.
        log_size: u64,
    },
}

/// An API key as stored: never the secret, only its keyed hash.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiKey {
    /// The key's id, the visible part of the key that names it.
    pub id: String,
    /// A human label.
    pub name: String,
    /// Hex HMAC-SHA256 of the secret under a key derived from the master key.
    pub hash: String,
    /// `admin`, `compliance` or `service`.
    pub role: String,
    /// Extra scopes.
    pub scopes: Vec<String>,
    /// When it was made.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it was (or will be, during a rotation's overlap) revoked.
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A tenant's API keys.
pub trait ApiKeyRepo {
    /// Inserts or replaces a key.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    fn put_key(&self, key: &ApiKey) -> Result<()>;
    /// One key.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn get_key(&self, id: &str) -> Result<Option<ApiKey>>;
    /// Every key.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    fn keys(&self) -> Result<Vec<ApiKey>>;
}

/// Everything one tenant's storage offers; a backend hands these out per tenant.
pub trait TenantRepos:
    SettingsRepo
    + MembershipRepo
    + InstallationRepo
    + ToolGrantRepo
    + ProjectionRepo
    + MemoryRepo
    + ConversationRepo
    + WebhookToolRepo
    + PolicyRepo
    + RunRepo
    + DedupeRepo
    + ApiKeyRepo
    + Send
    + Sync
{
}

/// Where a workspace's installation lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// The tenant.
    pub tenant: TenantId,
    /// The installation.
    pub installation: InstallationId,
}

/// A tenant as the operator's listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantSummary {
    /// The tenant.
    pub id: TenantId,
    /// Its human name.
    pub name: String,
    /// When it was provisioned.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What a storage backend implements. Callers never see it: they go through [`Store`].
pub(crate) trait Backend: Send + Sync {
    /// The repositories of one tenant.
    fn tenant(&self, tenant: &TenantId) -> Result<Arc<dyn TenantRepos>>;
    /// Looks a workspace key up in the installation directory.
    fn lookup(&self, directory_key: &str) -> Result<Option<DirectoryEntry>>;
    /// Binds a workspace key to an installation and registers the tenant, atomically.
    fn bind(
        &self,
        directory_key: &str,
        entry: &DirectoryEntry,
        summary: &TenantSummary,
    ) -> Result<()>;
    /// Every registered tenant.
    fn tenants(&self) -> Result<Vec<TenantSummary>>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;
    /// Flushes, then removes the checkpoint files of the runs finished since the last sweep;
    /// returns how many.
    fn sweep_runs(&self) -> Result<usize>;
    /// Records a one-time nonce (an OAuth state); true the first time it is used.
    fn consume_nonce(&self, nonce: &str) -> Result<bool>;
    /// Removes the nonces used before `before` (Unix seconds); returns how many.
    fn sweep_nonces(&self, before: i64) -> Result<usize>;
    /// Records which tenant an API key id belongs to.
    fn bind_key(&self, key_id: &str, tenant: &TenantId) -> Result<()>;
    /// The tenant an API key id belongs to.
    fn key_tenant(&self, key_id: &str) -> Result<Option<TenantId>>;
}

/// The storage handle. Cheap to clone; every clone shares one backend.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the embedded sled store in `dir`, sealing tokens with `cipher`.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when the directory cannot be opened, for example because another
    /// process holds it.
    pub fn open_embedded(dir: &Path, cipher: Cipher) -> Result<Self> {
        Ok(Store {
            backend: Arc::new(Embedded::open(dir, cipher)?),
        })
    }

    /// The repositories of the context's tenant: the only way to reach tenant data.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when the tenant's storage cannot be opened.
    pub fn for_tenant(&self, ctx: &TenantContext) -> Result<TenantStore> {
        Ok(TenantStore {
            tenant: ctx.tenant_id().clone(),
            repos: self.backend.tenant(ctx.tenant_id())?,
        })
    }

    /// The installation directory. Reviewed admin path: only tenant resolution and provisioning use it.
    pub(crate) fn directory(&self) -> Directory<'_> {
        Directory {
            backend: &*self.backend,
        }
    }

    /// Operator listings across tenants. Reviewed admin path: it returns ids and names, never records.
    pub fn admin(&self) -> Admin<'_> {
        Admin {
            backend: &*self.backend,
        }
    }

    /// Makes everything written so far durable.
    ///
    /// # Errors
    /// [`StoreError::Engine`] on an I/O failure.
    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }

    /// Removes the checkpoint files of runs finished since the last sweep, after one flush that
    /// makes their final states survive a crash; returns how many. A background task calls it.
    ///
    /// # Errors
    /// [`StoreError::Engine`] on an I/O failure; the runs are then kept for the next sweep.
    pub fn sweep_runs(&self) -> Result<usize> {
        self.backend.sweep_runs()
    }

    /// Uses up a one-time nonce, such as an OAuth install state; true only the first time.
    /// Reviewed admin path: nonces belong to no tenant yet (an install has not happened).
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    pub fn consume_nonce(&self, nonce: &str) -> Result<bool> {
        self.backend.consume_nonce(nonce)
    }

    /// Forgets the nonces used before `before` (Unix seconds): the states they came from have
    /// expired, so they can never be offered again, and without this every install ever
    /// completed (anyone may start one) would keep a key. Reviewed admin path, as above.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure.
    pub fn sweep_nonces(&self, before: i64) -> Result<usize> {
        self.backend.sweep_nonces(before)
    }

    /// Records which tenant an API key belongs to. Reviewed admin path, used when a key is made.
    pub(crate) fn bind_key(&self, key_id: &str, tenant: &TenantId) -> Result<()> {
        self.backend.bind_key(key_id, tenant)
    }

    /// The tenant an API key belongs to. Reviewed admin path, used only to authenticate a key.
    pub(crate) fn key_tenant(&self, key_id: &str) -> Result<Option<TenantId>> {
        self.backend.key_tenant(key_id)
    }

    /// Answers when the engine can serve a read, for readiness probes.
    ///
    /// # Errors
    /// [`StoreError`] when it cannot.
    pub fn ping(&self) -> Result<()> {
        self.backend.lookup("ping:readiness").map(|_| ())
    }
}

/// The repositories of one tenant, obtained from a [`TenantContext`] with [`Store::for_tenant`].
#[derive(Clone)]
pub struct TenantStore {
    tenant: TenantId,
    repos: Arc<dyn TenantRepos>,
}

impl TenantStore {
    /// The tenant these repositories are scoped to.
    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }

    /// Settings.
    pub fn settings(&self) -> &dyn SettingsRepo {
        &*self.repos
    }

    /// Memberships and roles.
    pub fn members(&self) -> &dyn MembershipRepo {
        &*self.repos
    }

    /// Installation records.
    pub fn installations(&self) -> &dyn InstallationRepo {
        &*self.repos
    }

    /// Tool grants.
    pub fn grants(&self) -> &dyn ToolGrantRepo {
        &*self.repos
    }

    /// Live projections of the audit log.
    pub fn projections(&self) -> &dyn ProjectionRepo {
        &*self.repos
    }

    /// Remembered facts.
    pub fn memory(&self) -> &dyn MemoryRepo {
        &*self.repos
    }

    /// Conversation histories.
    pub fn conversations(&self) -> &dyn ConversationRepo {
        &*self.repos
    }

    /// Webhook tools.
    pub fn webhooks(&self) -> &dyn WebhookToolRepo {
        &*self.repos
    }

    /// The tenant's own policies.
    pub fn policies(&self) -> &dyn PolicyRepo {
        &*self.repos
    }

    /// Agent run checkpoints.
    pub fn runs(&self) -> &dyn RunRepo {
        &*self.repos
    }

    /// Keys seen before.
    pub fn dedupe(&self) -> &dyn DedupeRepo {
        &*self.repos
    }

    /// API keys.
    pub fn api_keys(&self) -> &dyn ApiKeyRepo {
        &*self.repos
    }
}

/// The cross-tenant installation directory; see [`Store::directory`].
pub(crate) struct Directory<'a> {
    backend: &'a dyn Backend,
}

impl Directory<'_> {
    /// Where a workspace's installation lives.
    pub(crate) fn lookup(&self, directory_key: &str) -> Result<Option<DirectoryEntry>> {
        self.backend.lookup(directory_key)
    }

    /// Binds a workspace to an installation and registers its tenant in one atomic step, so that a
    /// workspace never points at a tenant the registry does not know.
    pub(crate) fn bind(
        &self,
        directory_key: &str,
        entry: &DirectoryEntry,
        summary: &TenantSummary,
    ) -> Result<()> {
        self.backend.bind(directory_key, entry, summary)
    }
}

/// Operator listings; see [`Store::admin`].
pub struct Admin<'a> {
    backend: &'a dyn Backend,
}

impl Admin<'_> {
    /// Every tenant, ordered by id.
    ///
    /// # Errors
    /// [`StoreError`] on an engine failure or a corrupt record.
    pub fn tenants(&self) -> Result<Vec<TenantSummary>> {
        self.backend.tenants()
    }
}
