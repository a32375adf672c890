//! The embedded sled backend: one sled tree per tenant, plus the directory and tenant registry trees.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::records::{
    decode, encode, DirectoryRecord, InstallationRecord, MemberRecord, TenantRecord,
};
use super::run_files::RunFiles;
use super::{
    ApiKey, ApiKeyRepo, Backend, ConversationRepo, DedupeRepo, DirectoryEntry, Fact,
    InstallationRepo, MembershipRepo, MemoryRepo, PolicyRepo, ProjectionRepo, Result, RunRepo,
    SeenClaim, SettingsRepo, StoreError, TenantRepos, TenantSummary, ToolGrantRepo, Turn,
    WebhookTool, WebhookToolRepo,
};
use crate::audit::projection::{RunState, Usage, UsageDeltas};
use crate::crypto::Cipher;
use crate::installation::{Installation, InstallationId};
use crate::tenant::{PrincipalId, Role, TenantId, TenantSettings, ToolGrant};

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

const DIRECTORY_TREE: &str = "directory";
const TENANTS_TREE: &str = "tenants";

/// The sled-backed store.
pub struct Embedded {
    db: sled::Db,
    directory: sled::Tree,
    tenants: sled::Tree,
    cipher: Cipher,
    /// Checkpoints of unfinished runs, beside sled (see `run_files` for why).
    runs: Arc<RunFiles>,
    /// Each tenant's [`Projected`], shared by every handle on that tenant while any is held (the
    /// audit log holds one for as long as it keeps the tenant's log open); then it goes.
    folded: Mutex<HashMap<TenantId, Weak<Projected>>>,
}

/// A tenant's kept projection values, and the lock that keeps its folds one at a time.
#[derive(Default)]
struct Projected {
    values: Mutex<Folded>,
    /// Held across a whole `apply_projection`; readers never take it. The audit log folds under
    /// its own lock already; this keeps the kept values right even if two folds ever met (two
    /// logs of one tenant opened around a close, say).
    fold: Mutex<()>,
}

/// What the projection fold last wrote of one tenant: its head and the usage of the months it
/// wrote. The quota check reads a month's usage before every model and tool call and the fold
/// reads it and the head once a fold; from sled each read was a lookup and a JSON decode (5% of
/// the agent loop's CPU at 8 concurrent runs).
///
/// It never says what sled does not hold: it is filled from sled (a reader holds its lock from
/// the lookup to the fill) or from a fold's writes once sled took them all, and it is emptied
/// when a write fails. Only the fold writes these keys, and one at a time, so its update, made
/// after its writes, is the last word: a reader that refilled a value from sled meanwhile read
/// either the value before the fold or the one the fold is about to put there.
#[derive(Default)]
struct Folded {
    head: Option<u64>,
    /// By month: the usage and the head of the fold that wrote it.
    usage: HashMap<String, (Usage, u64)>,
}

impl Embedded {
    /// Opens or creates the database in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when sled cannot open it (missing permissions, held by another process).
    pub fn open(dir: &Path, cipher: Cipher) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir.join("store"))
            .open()
            .map_err(engine)?;
        index_running_runs(&db)?;
        Ok(Embedded {
            directory: db.open_tree(DIRECTORY_TREE).map_err(engine)?,
            tenants: db.open_tree(TENANTS_TREE).map_err(engine)?,
            db,
            cipher,
            runs: Arc::new(RunFiles::new(dir.join("runs"))),
            folded: Mutex::default(),
        })
    }
}

/// Marks a tenant tree whose index of running runs covers every run state in it.
const RUNNING_INDEXED: &str = "meta/running-index";

/// Migration: builds the index of running runs (`<tenant>/running/<run>`) from the run states of
/// every tenant tree not marked as indexed (stores written before the fold kept it), so that a
/// restart finds the runs it must end. Once per tree: the fold keeps the index from then on (a
/// tree made since the last open is indexed by its folds already, and their entries, which say
/// where each run's events begin, are kept).
fn index_running_runs(db: &sled::Db) -> Result<()> {
    for name in db.tree_names() {
        let Some(tenant) = name.strip_prefix(b"tenant/".as_slice()) else {
            continue;
        };
        let prefix = format!("{}/", String::from_utf8_lossy(tenant));
        let tree = db.open_tree(&name).map_err(engine)?;
        let marker = format!("{prefix}{RUNNING_INDEXED}");
        if tree.contains_key(&marker).map_err(engine)? {
            continue;
        }
        let states = format!("{prefix}run/");
        let mut batch = sled::Batch::default();
        for kv in tree.scan_prefix(states.as_bytes()) {
            let (k, v) = kv.map_err(engine)?;
            let rec: Versioned<RunState> = decode(&k, &v)?;
            if rec.value == RunState::Running {
                let run = &k[states.len()..];
                let mut key = format!("{prefix}running/").into_bytes();
                key.extend_from_slice(run);
                // An entry the fold wrote knows where the run's events begin; keep it.
                if !tree.contains_key(&key).map_err(engine)? {
                    batch.insert(key, Vec::new());
                }
            }
        }
        batch.insert(marker.as_bytes(), Vec::new());
        tree.apply_batch(batch).map_err(engine)?;
    }
    Ok(())
}

impl Embedded {
    /// The tenant's kept projection values: those of its live handles, or new ones, which start
    /// empty and read sled.
    fn projected(&self, tenant: &TenantId) -> Arc<Projected> {
        let mut all = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = all.get(tenant).and_then(Weak::upgrade) {
            return live;
        }
        // Rare (a tenant's first handle since its last went), so this sweep is cheap overall.
        all.retain(|_, kept| kept.strong_count() > 0);
        let new = Arc::new(Projected::default());
        all.insert(tenant.clone(), Arc::downgrade(&new));
        new
    }
}

impl Backend for Embedded {
    fn tenant(&self, tenant: &TenantId) -> Result<Arc<dyn TenantRepos>> {
        let tree = self
            .db
            .open_tree(format!("tenant/{tenant}"))
            .map_err(engine)?;
        Ok(Arc::new(SledTenant {
            prefix: format!("{tenant}/"),
            tenant: tenant.clone(),
            tree,
            cipher: self.cipher.clone(),
            runs: Arc::clone(&self.runs),
            folded: self.projected(tenant),
        }))
    }

    fn lookup(&self, directory_key: &str) -> Result<Option<DirectoryEntry>> {
        match self.directory.get(directory_key).map_err(engine)? {
            None => Ok(None),
            Some(bytes) => {
                let rec: DirectoryRecord = decode(directory_key.as_bytes(), &bytes)?;
                rec.into_entry(directory_key).map(Some)
            }
        }
    }

    fn bind(
        &self,
        directory_key: &str,
        entry: &DirectoryEntry,
        summary: &TenantSummary,
    ) -> Result<()> {
        let dir_bytes = encode(&DirectoryRecord::from_entry(entry));
        let tenant_bytes = encode(&TenantRecord::from_summary(summary));
        let tenant_key = summary.id.to_string();
        let res = (&self.directory, &self.tenants).transaction(|(dir, tenants)| {
            if let Some(existing) = dir.get(directory_key)? {
                let rec: DirectoryRecord = serde_json::from_slice(&existing)
                    .map_err(|_| ConflictableTransactionError::Abort(()))?;
                let same = DirectoryRecord::from_entry(entry);
                if encode(&rec) != encode(&same) {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            dir.insert(directory_key.as_bytes(), dir_bytes.as_slice())?;
            if tenants.get(tenant_key.as_bytes())?.is_none() {
                tenants.insert(tenant_key.as_bytes(), tenant_bytes.as_slice())?;
            }
            Ok(())
        });
        match res {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => {
                Err(StoreError::WorkspaceTaken(directory_key.to_owned()))
            }
            Err(TransactionError::Storage(e)) => Err(engine(e)),
        }
    }

    fn tenants(&self) -> Result<Vec<TenantSummary>> {
        self.tenants
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(engine)?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let rec: TenantRecord = decode(&k, &v)?;
                rec.into_summary(&key)
            })
            .collect()
    }

    fn flush(&self) -> Result<()> {
        // A sweep flushes when it has runs to remove (and must flush after taking its list, so
        // that a run finished meanwhile is not removed unflushed).
        if self.sweep_runs()? == 0 {
            self.db.flush().map_err(engine)?;
        }
        Ok(())
    }

    fn sweep_runs(&self) -> Result<usize> {
        self.runs
            .sweep(|| self.db.flush().map(|_| ()).map_err(engine))
    }

    fn bind_key(&self, key_id: &str, tenant: &TenantId) -> Result<()> {
        let tree = self.db.open_tree(KEYS_TREE).map_err(engine)?;
        tree.insert(key_id.as_bytes(), tenant.as_str().as_bytes())
            .map_err(engine)?;
        tree.flush().map_err(engine)?;
        Ok(())
    }

    fn key_tenant(&self, key_id: &str) -> Result<Option<TenantId>> {
        let tree = self.db.open_tree(KEYS_TREE).map_err(engine)?;
        match tree.get(key_id.as_bytes()).map_err(engine)? {
            None => Ok(None),
            Some(v) => String::from_utf8_lossy(&v).parse().map(Some).map_err(
                |e: crate::tenant::IdError| StoreError::Corrupt {
                    key: format!("{KEYS_TREE}/{key_id}"),
                    why: e.to_string(),
                },
            ),
        }
    }

    fn consume_nonce(&self, nonce: &str) -> Result<bool> {
        let tree = self.db.open_tree(NONCES_TREE).map_err(engine)?;
        let stamp = chrono::Utc::now().timestamp().to_be_bytes();
        let first = tree
            .compare_and_swap(nonce.as_bytes(), None as Option<&[u8]>, Some(&stamp[..]))
            .map_err(engine)?
            .is_ok();
        tree.flush().map_err(engine)?;
        Ok(first)
    }

    fn sweep_nonces(&self, before: i64) -> Result<usize> {
        let tree = self.db.open_tree(NONCES_TREE).map_err(engine)?;
        let mut n = 0;
        for kv in tree.iter() {
            let (k, v) = kv.map_err(engine)?;
            // A stamp that is not 8 bytes was not written by `consume_nonce`: it goes too.
            let used = <[u8; 8]>::try_from(v.as_ref()).map_or(i64::MIN, i64::from_be_bytes);
            if used < before {
                tree.remove(k).map_err(engine)?;
                n += 1;
            }
        }
        // Not flushed: a removal lost to a crash is made again by the next sweep.
        Ok(n)
    }
}

const NONCES_TREE: &str = "nonces";
const KEYS_TREE: &str = "api-keys";

impl ApiKeyRepo for SledTenant {
    fn put_key(&self, key: &ApiKey) -> Result<()> {
        self.put_bytes(
            &self.key("api-key", &key.id),
            encode(&Versioned { v: 1, value: key }),
        )?;
        self.tree.flush().map_err(engine)?;
        Ok(())
    }

    fn get_key(&self, id: &str) -> Result<Option<ApiKey>> {
        Ok(self
            .get_json::<Versioned<ApiKey>>(&self.key("api-key", id))?
            .map(|r| r.value))
    }

    fn keys(&self) -> Result<Vec<ApiKey>> {
        self.scan("api-key")
            .map(|kv| {
                let (id, v) = kv?;
                let rec: Versioned<ApiKey> = decode(self.key("api-key", &id).as_bytes(), &v)?;
                Ok(rec.value)
            })
            .collect()
    }
}

impl DedupeRepo for SledTenant {
    fn claim(&self, key: &str, log_size: u64) -> Result<SeenClaim> {
        let k = self.key(&Self::text_key("seen", key), "");
        // The value starts with when the key was first seen (for `sweep`); a pending claim adds
        // `P` and the log's size then. A recorded one is the time alone (as every key was before
        // claims were pending), or a single byte (before keys had a time).
        let mut pending = chrono::Utc::now().timestamp().to_be_bytes().to_vec();
        pending.push(b'P');
        pending.extend_from_slice(&log_size.to_be_bytes());
        let found = self
            .tree
            .compare_and_swap(k.as_bytes(), None as Option<&[u8]>, Some(&pending[..]))
            .map_err(engine)?;
        self.tree.flush().map_err(engine)?;
        Ok(match found {
            Ok(()) => SeenClaim::First,
            Err(e) => match e.current.as_deref() {
                Some(v) if v.len() == 17 && v[8] == b'P' => SeenClaim::Pending {
                    log_size: u64::from_be_bytes(v[9..17].try_into().expect("8 bytes")),
                },
                _ => SeenClaim::Recorded,
            },
        })
    }

    fn confirm(&self, key: &str) -> Result<()> {
        let k = self.key(&Self::text_key("seen", key), "");
        // Not flushed: a confirmation a crash loses leaves the claim pending, and the next
        // delivery finds its command on record.
        self.tree
            .fetch_and_update(k.as_bytes(), |v| {
                v.map(|v| v.get(..8).map_or_else(|| v.to_vec(), <[u8]>::to_vec))
            })
            .map_err(engine)?;
        Ok(())
    }

    fn forget(&self, key: &str) -> Result<()> {
        let k = self.key(&Self::text_key("seen", key), "");
        self.tree.remove(k.as_bytes()).map_err(engine)?;
        self.tree.flush().map_err(engine)?;
        Ok(())
    }

    fn sweep(&self, before: i64) -> Result<usize> {
        let prefix = self.key("seen", "");
        let now = chrono::Utc::now().timestamp().to_be_bytes();
        let mut n = 0;
        for kv in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(engine)?;
            // The time a key was first seen is its first 8 bytes, recorded or pending.
            match v.get(..8).map(|b| <[u8; 8]>::try_from(b).expect("8 bytes")) {
                Some(seen) if i64::from_be_bytes(seen) < before => {
                    // Only if unchanged: a key forgotten and seen again meanwhile stays.
                    if self
                        .tree
                        .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                        .map_err(engine)?
                        .is_ok()
                    {
                        n += 1;
                    }
                }
                Some(_) => {}
                None => {
                    let _ = self
                        .tree
                        .compare_and_swap(&k, Some(&v), Some(&now[..]))
                        .map_err(engine)?;
                }
            }
        }
        // Not flushed: a removal lost to a crash is made again by the next sweep, and a key a
        // crash keeps unstamped is stamped again.
        Ok(n)
    }
}

/// A month's usage and the head of the fold that last wrote it: every event before `through` is
/// in `value`. Records written before `through` existed read as 0, which is right: they hold only
/// events before the projection head, where every fold starts.
#[derive(Default, Serialize, Deserialize)]
struct UsageRecord {
    v: u32,
    value: Usage,
    #[serde(default)]
    through: u64,
}

/// A versioned wrapper for records that are plain serde values.
#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    value: T,
}

/// One tenant's repositories over its own sled tree.
struct SledTenant {
    tenant: TenantId,
    /// `t_…/`: every key starts with it, so that a record names its tenant even outside its tree.
    prefix: String,
    tree: sled::Tree,
    cipher: Cipher,
    runs: Arc<RunFiles>,
    folded: Arc<Projected>,
}

impl SledTenant {
    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}{kind}/{rest}", self.prefix)
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        self.tree
            .get(key)
            .map_err(engine)?
            .map(|bytes| decode(key.as_bytes(), &bytes))
            .transpose()
    }

    fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<Option<sled::IVec>> {
        self.tree.insert(key, bytes).map_err(engine)
    }

    fn scan(&self, kind: &str) -> impl Iterator<Item = Result<(String, sled::IVec)>> + '_ {
        let prefix = self.key(kind, "");
        let strip = prefix.len();
        self.tree.scan_prefix(prefix.as_bytes()).map(move |kv| {
            let (k, v) = kv.map_err(engine)?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let rest = key.get(strip..).unwrap_or_default().to_owned();
            Ok((rest, v))
        })
    }
}

impl TenantRepos for SledTenant {}

impl SettingsRepo for SledTenant {
    fn get(&self) -> Result<Option<TenantSettings>> {
        Ok(self
            .get_json::<Versioned<TenantSettings>>(&self.key("settings", "current"))?
            .map(|r| r.value))
    }

    fn put(&self, settings: &TenantSettings) -> Result<()> {
        let rec = Versioned {
            v: 1,
            value: settings,
        };
        self.put_bytes(&self.key("settings", "current"), encode(&rec))?;
        Ok(())
    }
}

impl MembershipRepo for SledTenant {
    fn role_of(&self, principal: &PrincipalId) -> Result<Option<Role>> {
        Ok(self
            .get_json::<MemberRecord>(&self.key("member", principal.as_str()))?
            .map(|r| r.role))
    }

    fn set_role(&self, principal: &PrincipalId, role: Role) -> Result<Option<Role>> {
        let key = self.key("member", principal.as_str());
        let old = self.put_bytes(&key, encode(&MemberRecord { v: 1, role }))?;
        old.map(|b| decode::<MemberRecord>(key.as_bytes(), &b).map(|r| r.role))
            .transpose()
    }

    fn remove(&self, principal: &PrincipalId) -> Result<Option<Role>> {
        let key = self.key("member", principal.as_str());
        let old = self.tree.remove(&key).map_err(engine)?;
        old.map(|b| decode::<MemberRecord>(key.as_bytes(), &b).map(|r| r.role))
            .transpose()
    }

    fn list(&self) -> Result<Vec<(PrincipalId, Role)>> {
        self.scan("member")
            .map(|kv| {
                let (rest, v) = kv?;
                let principal =
                    rest.parse()
                        .map_err(|e: crate::tenant::IdError| StoreError::Corrupt {
                            key: self.key("member", &rest),
                            why: e.to_string(),
                        })?;
                let rec: MemberRecord = decode(rest.as_bytes(), &v)?;
                Ok((principal, rec.role))
            })
            .collect()
    }
}

impl InstallationRepo for SledTenant {
    fn get(&self, id: &InstallationId) -> Result<Option<Installation>> {
        let key = self.key("installation", id.as_str());
        self.get_json::<InstallationRecord>(&key)?
            .map(|rec| rec.open(&key, &self.cipher, &self.tenant, id.as_str()))
            .transpose()
    }

    fn put(&self, installation: &Installation) -> Result<()> {
        assert_eq!(
            installation.tenant, self.tenant,
            "an installation record was written through another tenant's repository"
        );
        let key = self.key("installation", installation.id.as_str());
        self.put_bytes(
            &key,
            encode(&InstallationRecord::seal(installation, &self.cipher)),
        )?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<Installation>> {
        self.scan("installation")
            .map(|kv| {
                let (rest, v) = kv?;
                let key = self.key("installation", &rest);
                let rec: InstallationRecord = decode(key.as_bytes(), &v)?;
                rec.open(&key, &self.cipher, &self.tenant, &rest)
            })
            .collect()
    }
}

impl ToolGrantRepo for SledTenant {
    fn list(&self) -> Result<Vec<ToolGrant>> {
        self.scan("grant")
            .map(|kv| {
                let (rest, v) = kv?;
                let rec: Versioned<ToolGrant> = decode(self.key("grant", &rest).as_bytes(), &v)?;
                Ok(rec.value)
            })
            .collect()
    }

    fn put(&self, grant: &ToolGrant) -> Result<()> {
        let rec = Versioned { v: 1, value: grant };
        self.put_bytes(&self.key("grant", &grant.capability), encode(&rec))?;
        Ok(())
    }

    fn get(&self, capability: &str) -> Result<Option<ToolGrant>> {
        Ok(self
            .get_json::<Versioned<ToolGrant>>(&self.key("grant", capability))?
            .map(|r| r.value))
    }

    fn remove(&self, capability: &str) -> Result<bool> {
        Ok(self
            .tree
            .remove(self.key("grant", capability))
            .map_err(engine)?
            .is_some())
    }
}

impl SledTenant {
    fn folded(&self) -> MutexGuard<'_, Folded> {
        let values = &self.folded.values;
        values.lock().unwrap_or_else(|poisoned| {
            // A panic while it was held may have left it half updated: start again from sled.
            let mut folded = poisoned.into_inner();
            *folded = Folded::default();
            values.clear_poison();
            folded
        })
    }

    fn head_in(&self, folded: &mut Folded) -> Result<u64> {
        if let Some(head) = folded.head {
            return Ok(head);
        }
        let key = self.key("projection-head", "");
        let head =
            match self.tree.get(&key).map_err(engine)? {
                None => 0,
                Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        key,
                        why: "the projection head is not 8 bytes".into(),
                    }
                })?,
            };
        folded.head = Some(head);
        Ok(head)
    }

    /// A month's usage and the head of the fold that wrote it.
    fn usage_record(&self, folded: &mut Folded, month: &str) -> Result<(Usage, u64)> {
        if let Some(kept) = folded.usage.get(month) {
            return Ok(*kept);
        }
        let kept = self
            .get_json::<UsageRecord>(&self.key("usage", month))?
            .map(|r| (r.value, r.through))
            .unwrap_or_default();
        folded.usage.insert(month.to_owned(), kept);
        Ok(kept)
    }

    /// Writes a fold to sled, given the usage records of its months as they stand; returns the
    /// months' new usage.
    fn write_projection(
        &self,
        prior: Vec<(String, Usage, u64)>,
        usage: &UsageDeltas,
        runs: &[(String, RunState)],
        members: &[(PrincipalId, Option<Role>)],
        (from, head): (u64, u64),
    ) -> Result<Vec<(String, Usage)>> {
        let mut writes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        let mut months = Vec::new();
        for (month, mut total, through) in prior {
            if through >= head {
                continue;
            }
            total.add(&usage.since(&month, through));
            let rec = UsageRecord {
                v: 1,
                value: total,
                through: head,
            };
            writes.push((self.key("usage", &month), Some(encode(&rec))));
            months.push((month, total));
        }
        for (run, state) in runs {
            let rec = encode(&Versioned { v: 1, value: state });
            writes.push((self.key("run", run), Some(rec)));
            // The index of running runs, set and cleared with the state (a later write of the
            // same run in this fold wins, as for the state). Its value is where this fold began,
            // so the run's events all lie at or after it.
            let running = (*state == RunState::Running).then(|| from.to_be_bytes().to_vec());
            writes.push((self.key("running", run), running));
        }
        for (principal, role) in members {
            let key = self.key("member", principal.as_str());
            writes.push((key, role.map(|role| encode(&MemberRecord { v: 1, role }))));
        }
        writes.push((
            self.key("projection-head", ""),
            Some(head.to_be_bytes().to_vec()),
        ));
        if members.is_empty() {
            // Why not one batch: sled seals and writes out its log buffer for every batch (on one
            // of its own I/O threads, with a `sync_file_range`), which cost a third of the CPU of
            // a lone agent run, one fold a step. Single writes stay in the buffer until sled's
            // own flush, and its recovery keeps a prefix of them, so the head (written last) never
            // runs ahead of what it covers, and a usage record written again is not counted twice
            // (see `ProjectionRepo::apply_projection`).
            for (key, value) in writes {
                #[cfg(test)]
                assert!(
                    !key.ends_with(tests::PANIC_RUN),
                    "test: a fold's write panics here"
                );
                match value {
                    Some(v) => self.tree.insert(key.as_bytes(), v).map_err(engine)?,
                    None => self.tree.remove(key.as_bytes()).map_err(engine)?,
                };
            }
        } else {
            // Role changes are rare and decide access: all of them with the head, or none. A
            // batch keeps the last write of each key, so a later change of the same member wins.
            let mut batch = sled::Batch::default();
            for (key, value) in writes {
                match value {
                    Some(v) => batch.insert(key.as_bytes(), v),
                    None => batch.remove(key.as_bytes()),
                }
            }
            self.tree.apply_batch(batch).map_err(engine)?;
        }
        Ok(months)
    }
}

/// Empties a tenant's kept projection values when dropped still holding it.
struct EmptyOnDrop<'a>(Option<&'a SledTenant>);

impl Drop for EmptyOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            *t.folded() = Folded::default();
        }
    }
}

impl ProjectionRepo for SledTenant {
    fn projection_head(&self) -> Result<u64> {
        self.head_in(&mut self.folded())
    }

    fn apply_projection(
        &self,
        usage: &UsageDeltas,
        runs: &[(String, RunState)],
        members: &[(PrincipalId, Option<Role>)],
        head: u64,
    ) -> Result<()> {
        // The audit log folds events in under its own lock, so read-modify-write here is not
        // racing another fold. The kept values' lock is not held across the writes, so that no
        // quota check waits for them: meanwhile readers see the usage from before this fold
        // (whose reservations are still held) or, refilling a value from sled, after it; either
        // way the update below comes last.
        let _one_fold = self.folded.fold.lock().unwrap_or_else(|e| e.into_inner());
        let (prior, from) = {
            let mut folded = self.folded();
            let prior = usage
                .months()
                .map(|month| {
                    let (total, through) = self.usage_record(&mut folded, month)?;
                    Ok((month.to_owned(), total, through))
                })
                .collect::<Result<Vec<_>>>()?;
            (prior, self.head_in(&mut folded)?)
        };
        // Some writes may land and others not, if one fails or panics: then the kept values are
        // emptied, and read from sled again next time.
        let mut unsure = EmptyOnDrop(Some(self));
        let months = self.write_projection(prior, usage, runs, members, (from, head))?;
        unsure.0 = None;
        let mut folded = self.folded();
        for (month, total) in months {
            folded.usage.insert(month, (total, head));
        }
        folded.head = Some(head);
        Ok(())
    }

    fn usage_in(&self, month: &str) -> Result<Usage> {
        Ok(self.usage_record(&mut self.folded(), month)?.0)
    }

    fn usage(&self) -> Result<std::collections::BTreeMap<String, Usage>> {
        self.scan("usage")
            .map(|kv| {
                let (month, v) = kv?;
                let rec: Versioned<Usage> = decode(self.key("usage", &month).as_bytes(), &v)?;
                Ok((month, rec.value))
            })
            .collect()
    }

    fn runs(&self) -> Result<std::collections::BTreeMap<String, RunState>> {
        self.scan("run")
            .map(|kv| {
                let (run, v) = kv?;
                let rec: Versioned<RunState> = decode(self.key("run", &run).as_bytes(), &v)?;
                Ok((run, rec.value))
            })
            .collect()
    }

    fn run_state(&self, run_id: &str) -> Result<Option<RunState>> {
        Ok(self
            .get_json::<Versioned<RunState>>(&self.key("run", run_id))?
            .map(|rec| rec.value))
    }

    fn running_runs(&self) -> Result<Vec<String>> {
        self.scan("running").map(|kv| Ok(kv?.0)).collect()
    }

    fn running_since(&self, run_id: &str) -> Result<Option<u64>> {
        let v = self.tree.get(self.key("running", run_id)).map_err(engine)?;
        Ok(v.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }
}

#[derive(Serialize, Deserialize)]
struct FactRecord {
    v: u32,
    subject: String,
    fact: String,
    saved_by: String,
    saved_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Serialize, Deserialize)]
struct WebhookRecord {
    v: u32,
    name: String,
    description: String,
    schema: serde_json::Value,
    url: String,
    /// Sealed under the master key, bound to tenant, tool and field.
    secret_sealed: String,
    timeout_ms: u64,
}

impl SledTenant {
    /// Key segments made of user text are hex-encoded, so that no text can reach into another
    /// segment's prefix (a subject `a/b` must not be found by a scan for `a`).
    fn text_key(kind: &str, text: &str) -> String {
        format!("{kind}/{}", hex::encode(text.as_bytes()))
    }

    /// The webhook tool stored under `name`, its secret opened. The name it carries must be the
    /// one it is stored under (as with installations): a record copied under another name would
    /// otherwise open there and appear twice, with another tool's URL and secret.
    fn open_webhook(&self, name: &str, bytes: &[u8]) -> Result<WebhookTool> {
        let key = self.key("webhook", name);
        let rec: WebhookRecord = decode(key.as_bytes(), bytes)?;
        if rec.name != name {
            return Err(StoreError::Corrupt {
                key,
                why: "the webhook record names another tool".into(),
            });
        }
        let secret = self
            .cipher
            .open(&self.webhook_seal_context(name), &rec.secret_sealed)
            .map_err(|source| StoreError::Sealed {
                key: key.clone(),
                source,
            })?;
        Ok(WebhookTool {
            name: rec.name,
            description: rec.description,
            schema: rec.schema,
            url: rec.url,
            secret,
            timeout_ms: rec.timeout_ms,
        })
    }

    fn webhook_seal_context(&self, name: &str) -> String {
        format!("{}/webhook/{name}/secret", self.tenant)
    }
}

impl MemoryRepo for SledTenant {
    fn save_fact(&self, fact: &Fact) -> Result<()> {
        let key = self.key(
            &Self::text_key("memory", &fact.subject),
            &ulid::Ulid::new().to_string(),
        );
        let rec = FactRecord {
            v: 1,
            subject: fact.subject.clone(),
            fact: fact.fact.clone(),
            saved_by: fact.saved_by.clone(),
            saved_at: fact.saved_at,
        };
        self.put_bytes(&key, encode(&rec))?;
        Ok(())
    }

    fn recall(&self, subject: &str) -> Result<Vec<Fact>> {
        self.scan(&Self::text_key("memory", subject))
            .map(|kv| {
                let (rest, v) = kv?;
                let rec: FactRecord = decode(rest.as_bytes(), &v)?;
                Ok(Fact {
                    subject: rec.subject,
                    fact: rec.fact,
                    saved_by: rec.saved_by,
                    saved_at: rec.saved_at,
                })
            })
            .collect()
    }

    fn forget(&self, subject: &str) -> Result<usize> {
        let prefix = self.key(&Self::text_key("memory", subject), "");
        let keys: Vec<sled::IVec> = self
            .tree
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(engine)?;
        let mut batch = sled::Batch::default();
        for k in &keys {
            batch.remove(k.clone());
        }
        self.tree.apply_batch(batch).map_err(engine)?;
        Ok(keys.len())
    }
}

impl ConversationRepo for SledTenant {
    fn history(&self, principal: &str, conversation: &str) -> Result<Vec<Turn>> {
        let key = self.key(
            &Self::text_key("conversation", principal),
            &hex::encode(conversation),
        );
        Ok(self
            .get_json::<Versioned<Vec<Turn>>>(&key)?
            .map(|r| r.value)
            .unwrap_or_default())
    }

    fn push_turns(
        &self,
        principal: &str,
        conversation: &str,
        turns: &[Turn],
        limit: usize,
    ) -> Result<()> {
        let key = self.key(
            &Self::text_key("conversation", principal),
            &hex::encode(conversation),
        );
        let mut all = self.history(principal, conversation)?;
        all.extend_from_slice(turns);
        let drop = all.len().saturating_sub(limit);
        all.drain(..drop);
        self.put_bytes(&key, encode(&Versioned { v: 1, value: all }))?;
        Ok(())
    }
}

impl WebhookToolRepo for SledTenant {
    fn put_webhook(&self, tool: &WebhookTool) -> Result<()> {
        let rec = WebhookRecord {
            v: 1,
            name: tool.name.clone(),
            description: tool.description.clone(),
            schema: tool.schema.clone(),
            url: tool.url.clone(),
            secret_sealed: self
                .cipher
                .seal(&self.webhook_seal_context(&tool.name), &tool.secret),
            timeout_ms: tool.timeout_ms,
        };
        self.put_bytes(&self.key("webhook", &tool.name), encode(&rec))?;
        Ok(())
    }

    fn webhooks(&self) -> Result<Vec<WebhookTool>> {
        self.scan("webhook")
            .map(|kv| {
                let (name, v) = kv?;
                self.open_webhook(&name, &v)
            })
            .collect()
    }

    fn webhook(&self, name: &str) -> Result<Option<WebhookTool>> {
        self.tree
            .get(self.key("webhook", name))
            .map_err(engine)?
            .map(|v| self.open_webhook(name, &v))
            .transpose()
    }

    fn remove_webhook(&self, name: &str) -> Result<bool> {
        Ok(self
            .tree
            .remove(self.key("webhook", name))
            .map_err(engine)?
            .is_some())
    }
}

impl PolicyRepo for SledTenant {
    fn tenant_policies(&self) -> Result<Option<String>> {
        Ok(self
            .get_json::<Versioned<String>>(&self.key("policies", "current"))?
            .map(|r| r.value))
    }

    fn put_tenant_policies(&self, text: &str) -> Result<()> {
        self.put_bytes(
            &self.key("policies", "current"),
            encode(&Versioned { v: 1, value: text }),
        )?;
        Ok(())
    }
}

impl SledTenant {
    fn reply_seal_context(&self, run_id: &str) -> String {
        format!("{}/run/{run_id}/reply_to", self.tenant)
    }
}

impl RunRepo for SledTenant {
    fn seal_reply(&self, run_id: &str, target: &serde_json::Value) -> String {
        self.cipher.seal(
            &self.reply_seal_context(run_id),
            &secrecy::SecretString::from(target.to_string()),
        )
    }

    fn open_reply(&self, run_id: &str, sealed: &str) -> Result<serde_json::Value> {
        use secrecy::ExposeSecret;
        let key = self.reply_seal_context(run_id);
        let text = self
            .cipher
            .open(&key, sealed)
            .map_err(|source| StoreError::Sealed {
                key: key.clone(),
                source,
            })?;
        serde_json::from_str(text.expose_secret()).map_err(|e| StoreError::Corrupt {
            key,
            why: e.to_string(),
        })
    }

    fn put_run(&self, run_id: &str, state: &[u8], finished: bool) -> Result<()> {
        if finished {
            // One write, not a batch: sled writes out its buffer for every batch. The state is
            // also in the run's files until a flush has made this write survive a crash.
            self.tree
                .insert(self.key("run-state", run_id).as_bytes(), state)
                .map_err(engine)?;
            // Unfinished runs of earlier versions were marked in sled. The mark goes after the
            // state, so a crash between the two leaves a finished state beside it, which
            // `unfinished_runs` takes over the mark.
            let open = self.key("run-open", run_id);
            if self.tree.contains_key(open.as_bytes()).map_err(engine)? {
                self.tree.remove(open.as_bytes()).map_err(engine)?;
            }
        }
        // Survives a crash of the process once written, finished or not; see `run_files`.
        self.runs.put(&self.tenant, run_id, state, finished)
    }

    fn get_run(&self, run_id: &str) -> Result<Option<Vec<u8>>> {
        // A finished state in sled wins over any checkpoint file a crash may have left behind.
        if let Some(v) = self
            .tree
            .get(self.key("run-state", run_id))
            .map_err(engine)?
        {
            return Ok(Some(v.to_vec()));
        }
        Ok(self
            .runs
            .get(&self.tenant, run_id)?
            .map(|saved| saved.state))
    }

    fn is_finished(&self, run_id: &str) -> Result<bool> {
        // A finished state is in sled (restored there from the journal after a crash).
        self.tree
            .contains_key(self.key("run-state", run_id))
            .map_err(engine)
    }

    fn all_runs(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .scan("run-state")
            .map(|kv| Ok(kv?.0))
            .collect::<Result<_>>()?;
        ids.extend(self.runs.runs(&self.tenant)?);
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn unfinished_runs(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = Vec::new();
        for kv in self.scan("run-open") {
            let id = kv?.0;
            // An earlier version's mark left beside a finished state (see `put_run`).
            if !self
                .tree
                .contains_key(self.key("run-state", &id).as_bytes())
                .map_err(engine)?
            {
                ids.push(id);
            }
        }
        for id in self.runs.runs(&self.tenant)? {
            // Finished, as far as sled knows: whatever file is left (a crash between the files'
            // writes) is not resumed, and goes at the next sweep.
            if self
                .tree
                .contains_key(self.key("run-state", &id).as_bytes())
                .map_err(engine)?
            {
                ids.retain(|r| r != &id);
                self.runs.queue_removal(&self.tenant, &id);
                continue;
            }
            match self.runs.get(&self.tenant, &id)? {
                // A crash after a run finished and before the sweep: sled's copy of the final
                // state may not have reached the disk, so restore it from the file and let the
                // next sweep remove the files.
                Some(saved) if saved.finished => {
                    self.tree
                        .insert(self.key("run-state", &id).as_bytes(), saved.state)
                        .map_err(engine)?;
                    self.tree
                        .remove(self.key("run-open", &id).as_bytes())
                        .map_err(engine)?;
                    ids.retain(|r| r != &id);
                    self.runs.queue_removal(&self.tenant, &id);
                }
                Some(_) => ids.push(id),
                // The files went between the listing and the read (a sweep removed a run that
                // finished meanwhile), or hold no frame at all (a crash before the first save, so
                // the run had done nothing): either way there is nothing to resume.
                None => self.runs.queue_removal(&self.tenant, &id),
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    /// A store in a fresh temporary directory (kept alive by the first half).
    fn open() -> (tempfile::TempDir, Embedded) {
        let dir = tempfile::tempdir().unwrap();
        let cipher = Cipher::new(&MasterKey::parse(&"33".repeat(32)).unwrap());
        let store = Embedded::open(dir.path(), cipher).unwrap();
        (dir, store)
    }

    #[test]
    fn a_corrupt_installation_record_is_a_typed_error() {
        let (_dir, store) = open();
        let tenant = TenantId::generate();
        let repos = store.tenant(&tenant).unwrap();
        let id = InstallationId::generate();
        let sled_tenant = SledTenant {
            prefix: format!("{tenant}/"),
            tenant: tenant.clone(),
            tree: store.db.open_tree(format!("tenant/{tenant}")).unwrap(),
            cipher: store.cipher.clone(),
            runs: Arc::clone(&store.runs),
            folded: Arc::default(),
        };
        sled_tenant
            .tree
            .insert(
                sled_tenant.key("installation", id.as_str()),
                &b"{not json"[..],
            )
            .unwrap();
        assert!(matches!(
            InstallationRepo::get(&*repos, &id),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            InstallationRepo::list(&*repos),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// A whole installation record copied into another tenant's tree (or under another id) does
    /// not open there: its tokens would, as they are sealed for the names the record carries.
    #[test]
    fn an_installation_record_opens_only_where_it_was_written() {
        let (_dir, store) = open();
        let a = TenantId::generate();
        let b = TenantId::generate();
        let id = InstallationId::generate();
        let installation = Installation {
            id: id.clone(),
            tenant: a.clone(),
            workspace: crate::installation::Workspace::slack_team(None, "T0COPIED").unwrap(),
            app_id: "A0".into(),
            bot_user_id: None,
            bot_token: Some("xoxb-copied".to_owned().into()),
            refresh_token: None,
            token_expires_at: None,
            scopes: vec![],
            installer: "slack:U0".parse().unwrap(),
            installed_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            status: crate::installation::InstallationStatus::Active,
            source: crate::installation::InstallSource::OAuth,
        };
        let repos_a = store.tenant(&a).unwrap();
        InstallationRepo::put(&*repos_a, &installation).unwrap();
        let bytes = store
            .db
            .open_tree(format!("tenant/{a}"))
            .unwrap()
            .get(format!("{a}/installation/{id}"))
            .unwrap()
            .unwrap();
        assert!(InstallationRepo::get(&*repos_a, &id).unwrap().is_some());

        let other = InstallationId::generate();
        let tree_b = store.db.open_tree(format!("tenant/{b}")).unwrap();
        tree_b
            .insert(format!("{b}/installation/{id}"), bytes.clone())
            .unwrap();
        let repos_b = store.tenant(&b).unwrap();
        for result in [
            InstallationRepo::get(&*repos_b, &id).map(|_| ()),
            InstallationRepo::list(&*repos_b).map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(StoreError::Corrupt { .. })),
                "{result:?}"
            );
        }
        tree_b.clear().unwrap();
        // Under another id of the same tenant.
        store
            .db
            .open_tree(format!("tenant/{a}"))
            .unwrap()
            .insert(format!("{a}/installation/{other}"), bytes)
            .unwrap();
        assert!(matches!(
            InstallationRepo::get(&*repos_a, &other),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// Swept nonces are those used before the time given; a swept nonce could be used again, but
    /// only by a state that has expired, which the install refuses first.
    #[test]
    fn nonces_used_before_a_time_are_swept() {
        let (_dir, store) = open();
        assert!(store.consume_nonce("slack:old").unwrap());
        let now = chrono::Utc::now().timestamp();
        assert_eq!(
            store.sweep_nonces(now - 600).unwrap(),
            0,
            "none is that old"
        );
        assert!(!store.consume_nonce("slack:old").unwrap(), "still used");
        assert_eq!(store.sweep_nonces(now + 1).unwrap(), 1);
        assert!(store.consume_nonce("slack:old").unwrap(), "swept");
        assert_eq!(store.sweep_nonces(now - 600).unwrap(), 0);
    }

    /// A forgotten request id is new again, also after the store is opened again, and in no
    /// other tenant was it ever seen.
    #[test]
    fn a_forgotten_request_id_is_new_again_after_a_restart() {
        let (dir, store) = open();
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let repos = store.tenant(&a).unwrap();
        assert_eq!(repos.claim("slack-event:Ev1", 0).unwrap(), SeenClaim::First);
        assert_ne!(repos.claim("slack-event:Ev1", 0).unwrap(), SeenClaim::First);
        assert_eq!(repos.claim("slack-event:Ev2", 0).unwrap(), SeenClaim::First);
        DedupeRepo::forget(&*repos, "slack-event:Ev1").unwrap();
        drop((repos, store));
        let cipher = Cipher::new(&MasterKey::parse(&"33".repeat(32)).unwrap());
        let store = Embedded::open(dir.path(), cipher).unwrap();
        let repos = store.tenant(&a).unwrap();
        assert_eq!(
            repos.claim("slack-event:Ev1", 0).unwrap(),
            SeenClaim::First,
            "forgotten"
        );
        assert_ne!(
            repos.claim("slack-event:Ev2", 0).unwrap(),
            SeenClaim::First,
            "still seen"
        );
        assert_eq!(
            store
                .tenant(&b)
                .unwrap()
                .claim("slack-event:Ev2", 0)
                .unwrap(),
            SeenClaim::First
        );
    }

    /// A claim is pending, with the log size it was made at, until it is confirmed; then it is
    /// recorded. A pending claim is swept by its time like a recorded one.
    #[test]
    fn a_claimed_request_id_is_pending_until_confirmed() {
        let (_dir, store) = open();
        let repos = store.tenant(&TenantId::generate()).unwrap();
        assert_eq!(repos.claim("k", 41).unwrap(), SeenClaim::First);
        assert_eq!(
            repos.claim("k", 99).unwrap(),
            SeenClaim::Pending { log_size: 41 },
            "the first claim's size is kept"
        );
        repos.confirm("k").unwrap();
        assert_eq!(repos.claim("k", 99).unwrap(), SeenClaim::Recorded);
        assert_eq!(repos.claim("j", 1).unwrap(), SeenClaim::First);
        repos.confirm("j").unwrap();
        assert_eq!(repos.claim("j", 1).unwrap(), SeenClaim::Recorded);
        assert_eq!(repos.claim("p", 7).unwrap(), SeenClaim::First);
        let now = chrono::Utc::now().timestamp();
        assert_eq!(DedupeRepo::sweep(&*repos, now - 600).unwrap(), 0);
        assert_eq!(
            repos.claim("p", 8).unwrap(),
            SeenClaim::Pending { log_size: 7 }
        );
        assert_eq!(DedupeRepo::sweep(&*repos, now + 2).unwrap(), 3);
        assert_eq!(repos.claim("p", 8).unwrap(), SeenClaim::First, "swept");
    }

    /// Request ids go once they are older than the cutoff, in the tenant swept only; an id kept
    /// from before ids had a time is stamped by its first sweep, not removed.
    #[test]
    fn request_ids_seen_before_a_time_are_swept_in_their_tenant_only() {
        let (_dir, store) = open();
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let (ra, rb) = (store.tenant(&a).unwrap(), store.tenant(&b).unwrap());
        assert_eq!(ra.claim("slack-event:Ev1", 0).unwrap(), SeenClaim::First);
        assert_eq!(rb.claim("slack-event:Ev1", 0).unwrap(), SeenClaim::First);
        let old_key = format!("{a}/{}/", SledTenant::text_key("seen", "slack-event:Old"));
        store
            .db
            .open_tree(format!("tenant/{a}"))
            .unwrap()
            .insert(old_key.as_bytes(), &[1u8][..])
            .unwrap();
        let now = chrono::Utc::now().timestamp();
        assert_eq!(
            DedupeRepo::sweep(&*ra, now - 600).unwrap(),
            0,
            "none is that old"
        );
        assert_ne!(
            ra.claim("slack-event:Ev1", 0).unwrap(),
            SeenClaim::First,
            "still seen"
        );
        assert_ne!(
            ra.claim("slack-event:Old", 0).unwrap(),
            SeenClaim::First,
            "stamped, still seen"
        );
        assert_eq!(DedupeRepo::sweep(&*ra, now + 2).unwrap(), 2);
        assert_eq!(
            ra.claim("slack-event:Ev1", 0).unwrap(),
            SeenClaim::First,
            "swept"
        );
        assert_eq!(
            ra.claim("slack-event:Old", 0).unwrap(),
            SeenClaim::First,
            "swept once stamped"
        );
        assert_ne!(
            rb.claim("slack-event:Ev1", 0).unwrap(),
            SeenClaim::First,
            "the other tenant keeps its own"
        );
    }

    #[test]
    fn a_finished_run_whose_sled_copy_was_lost_is_restored_from_its_file() {
        let (dir, store) = open();
        let tenant = TenantId::generate();
        let repos = store.tenant(&tenant).unwrap();
        repos.put_run("r1", b"step one", false).unwrap();
        // As after a crash between the final frame and sled's flush: the file says finished, sled
        // has nothing.
        store.runs.put(&tenant, "r1", b"final", true).unwrap();
        drop((repos, store));
        let cipher = Cipher::new(&MasterKey::parse(&"33".repeat(32)).unwrap());
        let store = Embedded::open(dir.path(), cipher).unwrap();
        let repos = store.tenant(&tenant).unwrap();
        assert_eq!(repos.get_run("r1").unwrap().as_deref(), Some(&b"final"[..]));
        assert_eq!(repos.unfinished_runs().unwrap(), Vec::<String>::new());
        assert_eq!(store.sweep_runs().unwrap(), 1);
        assert_eq!(store.runs.runs(&tenant).unwrap(), Vec::<String>::new());
        assert_eq!(repos.get_run("r1").unwrap().as_deref(), Some(&b"final"[..]));
        assert_eq!(repos.all_runs().unwrap(), vec!["r1"]);
    }

    #[test]
    fn an_earlier_versions_open_mark_is_unfinished_until_its_run_finishes() {
        let (_dir, store) = open();
        let tenant = TenantId::generate();
        let repos = store.tenant(&tenant).unwrap();
        let tree = store.db.open_tree(format!("tenant/{tenant}")).unwrap();
        for run in ["r1", "r2"] {
            tree.insert(format!("{tenant}/run-open/{run}").as_bytes(), &[1u8][..])
                .unwrap();
        }
        assert_eq!(repos.unfinished_runs().unwrap(), vec!["r1", "r2"]);
        repos.put_run("r1", b"final", true).unwrap();
        assert!(!tree
            .contains_key(format!("{tenant}/run-open/r1").as_bytes())
            .unwrap());
        // A crash between the finished state and the removal of the mark: the state wins.
        tree.insert(format!("{tenant}/run-state/r2").as_bytes(), &b"final"[..])
            .unwrap();
        assert_eq!(repos.unfinished_runs().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_checkpoint_left_beside_a_finished_state_is_not_resumed() {
        let (_dir, store) = open();
        let tenant = TenantId::generate();
        let repos = store.tenant(&tenant).unwrap();
        repos.put_run("r1", b"step one", false).unwrap();
        // As a crash between the files' writes could leave it: sled has the finished state, and
        // a file still holds the checkpoint before it.
        let tree = store.db.open_tree(format!("tenant/{tenant}")).unwrap();
        tree.insert(format!("{tenant}/run-state/r1").as_bytes(), &b"final"[..])
            .unwrap();
        assert_eq!(repos.unfinished_runs().unwrap(), Vec::<String>::new());
        assert_eq!(repos.get_run("r1").unwrap().as_deref(), Some(&b"final"[..]));
    }

    #[test]
    fn usage_in_reads_one_month_and_zero_for_none() {
        let (_dir, store) = open();
        let repos = store.tenant(&TenantId::generate()).unwrap();
        let may = Usage {
            tool_calls: 3,
            ..Usage::default()
        };
        let mut first = UsageDeltas::default();
        first.push("2026-05", 6, may);
        let mut second = UsageDeltas::default();
        second.push("2026-05", 8, may);
        repos.apply_projection(&first, &[], &[], 7).unwrap();
        repos.apply_projection(&second, &[], &[], 9).unwrap();
        assert_eq!(repos.usage_in("2026-05").unwrap().tool_calls, 6);
        assert_eq!(repos.usage_in("2026-06").unwrap(), Usage::default());
        assert_eq!(repos.usage().unwrap()["2026-05"].tool_calls, 6);
    }

    /// A sealed reply target opens only for the run and tenant it was sealed for, and a blob that
    /// is not one is refused, never read as a target.
    #[test]
    fn a_sealed_reply_target_opens_only_for_its_own_run_and_tenant() {
        let (_dir, store) = open();
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let ra = store.tenant(&a).unwrap();
        let rb = store.tenant(&b).unwrap();
        let target =
            serde_json::json!({"kind": "response_url", "url": "https://hooks.slack.com/x"});
        let sealed = ra.seal_reply("RUN1", &target);
        assert!(!sealed.contains("hooks.slack.com"));
        assert_eq!(ra.open_reply("RUN1", &sealed).unwrap(), target);
        assert!(matches!(
            ra.open_reply("RUN2", &sealed),
            Err(StoreError::Sealed { .. })
        ));
        assert!(matches!(
            rb.open_reply("RUN1", &sealed),
            Err(StoreError::Sealed { .. })
        ));
        assert!(ra.open_reply("RUN1", "not sealed at all").is_err());
        // Sealed text that is not JSON is refused too.
        let text = store.cipher.seal(
            &format!("{a}/run/RUN3/reply_to"),
            &secrecy::SecretString::from("not json".to_owned()),
        );
        assert!(matches!(
            ra.open_reply("RUN3", &text),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// The fold keeps the index of running runs with their states, in one fold or across folds;
    /// a store written before the index existed gets it built from its run states when opened.
    #[test]
    fn the_running_index_follows_run_states_and_is_built_for_older_stores() {
        let dir = tempfile::tempdir().unwrap();
        let cipher = Cipher::new(&MasterKey::parse(&"33".repeat(32)).unwrap());
        let tenant = TenantId::generate();
        let store = Embedded::open(dir.path(), cipher.clone()).unwrap();
        let repos = store.tenant(&tenant).unwrap();
        let run = |id: &str, s: RunState| (id.to_owned(), s);
        repos
            .apply_projection(
                &UsageDeltas::default(),
                &[
                    run("A", RunState::Running),
                    run("B", RunState::Running),
                    run("B", RunState::Completed),
                    run("C", RunState::Running),
                ],
                &[],
                4,
            )
            .unwrap();
        assert_eq!(repos.running_runs().unwrap(), ["A", "C"]);
        // The member change takes the batch path.
        let admin = PrincipalId::qualified("slack", "U0ADMIN").unwrap();
        repos
            .apply_projection(
                &UsageDeltas::default(),
                &[run("C", RunState::Failed), run("D", RunState::Running)],
                &[(admin, Some(Role::Admin))],
                6,
            )
            .unwrap();
        assert_eq!(repos.running_runs().unwrap(), ["A", "D"]);
        // Each entry says where the fold that started the run began.
        assert_eq!(repos.running_since("A").unwrap(), Some(0));
        assert_eq!(repos.running_since("D").unwrap(), Some(4));
        assert_eq!(repos.running_since("C").unwrap(), None);
        drop(repos);
        // As an older store has it: run states, no index entry for A, no marker (a tree made
        // since the store was opened has no marker either, and keeps the entries it has).
        let tree = store.db.open_tree(format!("tenant/{tenant}")).unwrap();
        let key = format!("{tenant}/running/A");
        assert!(tree.remove(key.as_bytes()).unwrap().is_some(), "{key}");
        tree.remove(format!("{tenant}/{RUNNING_INDEXED}").as_bytes())
            .unwrap();
        drop((tree, store));
        let store = Embedded::open(dir.path(), cipher).unwrap();
        let repos = store.tenant(&tenant).unwrap();
        assert_eq!(repos.running_runs().unwrap(), ["A", "D"]);
        assert_eq!(repos.running_since("A").unwrap(), None, "not known");
        assert_eq!(repos.running_since("D").unwrap(), Some(4), "kept");
    }

    #[test]
    fn folding_events_again_after_a_crash_counts_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let cipher = Cipher::new(&MasterKey::parse(&"33".repeat(32)).unwrap());
        let tenant = TenantId::generate();
        let one = Usage {
            tool_calls: 1,
            ..Usage::default()
        };
        let deltas = |seqs: std::ops::Range<u64>| {
            let mut d = UsageDeltas::default();
            for seq in seqs {
                d.push("2026-05", seq, one);
                d.push("2026-06", seq, one);
            }
            d
        };
        let head_key = format!("{tenant}/projection-head/");
        // A crash after a fold's usage records were written, before its head: the process ends
        // with the head at `head` on disk, and a new one opens the store.
        let crash_with_head = |store: Embedded, head: u64| {
            let tree = store.db.open_tree(format!("tenant/{tenant}")).unwrap();
            tree.insert(head_key.as_bytes(), &head.to_be_bytes())
                .unwrap();
            drop((tree, store));
            Embedded::open(dir.path(), cipher.clone()).unwrap()
        };
        let store = Embedded::open(dir.path(), cipher.clone()).unwrap();
        let repos = store.tenant(&tenant).unwrap();
        repos.apply_projection(&deltas(0..5), &[], &[], 5).unwrap();
        repos.apply_projection(&deltas(5..7), &[], &[], 7).unwrap();
        drop(repos);
        // The next fold takes the events from 5 again, in a longer range.
        let store = crash_with_head(store, 5);
        let repos = store.tenant(&tenant).unwrap();
        assert_eq!(repos.projection_head().unwrap(), 5);
        repos.apply_projection(&deltas(5..9), &[], &[], 9).unwrap();
        assert_eq!(repos.usage_in("2026-05").unwrap().tool_calls, 9);
        assert_eq!(repos.usage_in("2026-06").unwrap().tool_calls, 9);
        drop(repos);
        // And a fold that repeats only events a record already has leaves it alone.
        let store = crash_with_head(store, 7);
        let repos = store.tenant(&tenant).unwrap();
        repos.apply_projection(&deltas(7..9), &[], &[], 9).unwrap();
        assert_eq!(repos.usage_in("2026-05").unwrap().tool_calls, 9);
        assert_eq!(repos.projection_head().unwrap(), 9);
    }

    /// A run id whose projection write panics, standing in for a failure inside sled.
    pub(super) const PANIC_RUN: &str = "test-panics-on-write";

    /// A fold whose writes stop half way (here a panic after its usage landed in sled, before its
    /// head) leaves no kept value behind that differs from sled: the next read goes to sled.
    #[test]
    fn a_fold_that_stops_half_way_leaves_no_kept_value_behind() {
        let (_dir, store) = open();
        let repos = store.tenant(&TenantId::generate()).unwrap();
        let one = Usage {
            tool_calls: 1,
            ..Usage::default()
        };
        let mut first = UsageDeltas::default();
        first.push("2026-05", 0, one);
        repos.apply_projection(&first, &[], &[], 1).unwrap();
        assert_eq!(repos.usage_in("2026-05").unwrap().tool_calls, 1);
        let mut second = UsageDeltas::default();
        second.push("2026-05", 1, one);
        let runs = [(PANIC_RUN.to_owned(), RunState::Running)];
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            repos.apply_projection(&second, &runs, &[], 2)
        }));
        assert!(stopped.is_err());
        // sled took the usage record and not the head; the kept values must say the same.
        assert_eq!(repos.usage_in("2026-05").unwrap().tool_calls, 2);
        assert_eq!(repos.projection_head().unwrap(), 1);
    }

    /// Every handle on a tenant sees a fold made through another at once, including one that read
    /// the same month before it (the quota check holds no handle of the fold's).
    #[test]
    fn a_fold_through_one_handle_is_seen_through_every_other() {
        let (_dir, store) = open();
        let tenant = TenantId::generate();
        let reader = store.tenant(&tenant).unwrap();
        let other_tenant = store.tenant(&TenantId::generate()).unwrap();
        assert_eq!(reader.usage_in("2026-05").unwrap(), Usage::default());
        assert_eq!(reader.projection_head().unwrap(), 0);
        let mut d = UsageDeltas::default();
        let two = Usage {
            tokens_in: 2,
            ..Usage::default()
        };
        d.push("2026-05", 0, two);
        store
            .tenant(&tenant)
            .unwrap()
            .apply_projection(&d, &[], &[], 1)
            .unwrap();
        assert_eq!(reader.usage_in("2026-05").unwrap(), two);
        assert_eq!(reader.projection_head().unwrap(), 1);
        // Another tenant's fold and kept values are its own.
        assert_eq!(other_tenant.usage_in("2026-05").unwrap(), Usage::default());
        assert_eq!(other_tenant.projection_head().unwrap(), 0);
        // Once no handle holds them, a tenant's kept values go, and a new handle reads sled.
        drop((reader, other_tenant));
        let again = store.tenant(&tenant).unwrap();
        assert_eq!(
            store.folded.lock().unwrap().len(),
            1,
            "the other tenant's entry went"
        );
        assert_eq!(again.usage_in("2026-05").unwrap(), two);
        assert_eq!(again.projection_head().unwrap(), 1);
    }

    #[test]
    fn member_changes_in_one_projection_batch_apply_in_order() {
        let (_dir, store) = open();
        let repos = store.tenant(&TenantId::generate()).unwrap();
        let p = PrincipalId::qualified("slack", "U0P").unwrap();
        let q = PrincipalId::qualified("slack", "U0Q").unwrap();
        let changes = [
            (p.clone(), Some(Role::Admin)),
            (q.clone(), Some(Role::Member)),
            (p.clone(), None),
            (q.clone(), Some(Role::Viewer)),
        ];
        repos
            .apply_projection(&Default::default(), &[], &changes, 4)
            .unwrap();
        assert_eq!(repos.role_of(&p).unwrap(), None, "granted, then revoked");
        assert_eq!(
            repos.role_of(&q).unwrap(),
            Some(Role::Viewer),
            "the later role wins"
        );
        assert_eq!(repos.projection_head().unwrap(), 4);
    }
}
