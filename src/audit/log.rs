//! The per-tenant audit log: a durable segment file per tenant (the source of truth), an RFC 9162
//! Merkle tree over its records (node hashes indexed in the store), and signed checkpoints.
//!
//! An append encodes the event (all but its sequence number and time) and takes its place in the
//! segment log's queue on its own, then leaves it in the tenant's inbox; whoever holds the tenant's
//! lock next assigns the sequence number, fills it in, extends the tree and queues the record, for
//! every waiting append at once, so that queue order is sequence order. The appender then waits,
//! outside the lock, until the record is `fdatasync`ed together with its group. Only then does the
//! caller go on to the effect the event records.
//!
//! On open, the tree index (plain node files, not themselves synced to disk) is reconciled with
//! the segment log: an index behind the log is caught up from the log's records, an index ahead of it
//! is cut back; then the tree must reproduce the root of the last signed checkpoint.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{oneshot, Mutex};

use super::checkpoint::{
    open_checkpoint, sign_checkpoint, Checkpoint, CheckpointError, Keyring, SigningKey,
};
use super::event::{self, Envelope, EventBody};
use super::merkle::{Hash, LeafIndex, Tree, TreeError, TreeSize};
use super::nodes::NodeFiles;
use super::projection::{
    month_of, run_transition, transition_of, usage_delta, usage_of, Facts, Projections, RunState,
    Usage, UsageDeltas,
};
use super::segment_log::{self, Pending, SegmentLog};
use super::{bundle, AuditError, AuditSink};
use crate::store::TenantStore;
use crate::tenant::{PrincipalId, Role, TenantContext, TenantId};

/// How the audit log is laid out and when it signs.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// The directory holding one sub-directory per tenant, the keyring and the dev signing key.
    pub dir: PathBuf,
    /// The prefix of every log's origin line; a tenant's origin is `<prefix>/<tenant id>`.
    pub origin_prefix: String,
    /// Sign a checkpoint once this many events arrived since the last one.
    pub checkpoint_every: u64,
    /// Sign a checkpoint when this much time passed since the last one: covering new events if
    /// there are any, otherwise as a heartbeat that proves nothing was appended meanwhile.
    pub checkpoint_interval: Duration,
    /// Segment file options.
    pub segments: segment_log::Options,
}

/// A tenant log's current head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Durable events.
    pub size: u64,
    /// The Merkle root over them.
    pub root: Hash,
    /// The latest signed checkpoint, as its signed-note text.
    pub checkpoint: Option<String>,
}

struct TreeState {
    tree: Tree<NodeFiles>,
    next_seq: u64,
    /// Events other than `checkpoint.signed` since the last checkpoint.
    since_checkpoint: u64,
    last_signed: Instant,
    /// Set when the tree could not follow the segment log; the log then refuses appends until reopened.
    broken: bool,
}

/// An append waiting in a tenant's inbox for whoever holds the tree's lock next.
struct Request {
    events: Vec<event::Unplaced>,
    /// How many of them count toward the next checkpoint (all but `checkpoint.signed`).
    counted: u64,
    /// For events that affect projections, what the fold needs of each, kept for it.
    keep: Option<Vec<Prefold>>,
    /// The records' place in the segment log's queue, taken before the request was left here.
    slot: segment_log::Slot,
    reply: oneshot::Sender<Result<Queued, AuditError>>,
}

/// A placed request: its first sequence number, what to wait on, whether a checkpoint is due.
struct Queued {
    first: u64,
    pending: Pending,
    due: bool,
}

struct TenantLog {
    tenant: TenantId,
    /// Appends waiting to be placed; see [`AuditLog::enqueue_all`].
    inbox: StdMutex<Vec<Request>>,
    /// Sign a checkpoint once this many events arrived since the last one.
    checkpoint_every: u64,
    /// The tenant's repositories, for the live projections.
    repo: TenantStore,
    /// Serialises folding events into the live projections, so they are folded in log order.
    projector: Mutex<()>,
    /// How far the projections are known to be folded (a lower bound of the stored head), so that
    /// an append whose events someone else already folded neither waits for the projector nor
    /// reads the stored head.
    folded: std::sync::atomic::AtomicU64,
    /// What the fold needs of queued events that affect projections, by the first sequence
    /// number of their append, until they are folded: whoever folds takes every run's events from
    /// here rather than reading them back from the segment files and parsing them. Filled under
    /// the tree's lock, so an event is here before it can be durable.
    unfolded: StdMutex<BTreeMap<u64, Vec<Kept>>>,
    origin: String,
    events: SegmentLog,
    checkpoints: SegmentLog,
    state: Mutex<TreeState>,
    latest: StdMutex<Option<String>>,
}

impl TenantLog {
    /// Drops the kept leaf bytes of the append at `first`, whose events may never become durable
    /// as placed; a fold then reads whatever the files hold instead.
    fn forget_unfolded(&self, first: u64) {
        self.unfolded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&first);
    }

    /// Takes the tree's lock; see [`StateGuard`].
    ///
    /// tokio's mutex hands the lock straight to the next queued waiter, so while that waiter has
    /// not run, appenders' `try_lock` fails and they leave their requests to it. A waiter dropped
    /// before it ran (a proof request whose client went away) hands the lock back without any
    /// `StateGuard`; [`Waiting`] then places what was left, so nothing stays in the inbox.
    async fn lock_state(&self) -> StateGuard<'_> {
        let mut waiting = Waiting {
            log: self,
            lock: Some(Box::pin(self.state.lock())),
        };
        let guard = waiting.lock.as_mut().expect("set above").await;
        waiting.lock = None;
        StateGuard::new(self, guard)
    }

    /// Places every request in the tenant's inbox: assigns sequence numbers, fills them and the
    /// time into the encoded events, extends the tree and queues the records, all under the tree's
    /// lock (which `st` proves) so that queue order is sequence order. Never waits.
    fn place_waiting(&self, st: &mut TreeState) {
        let waiting = std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for req in waiting {
            // The appender went away before its events were placed: they are not appended.
            if req.reply.is_closed() {
                continue;
            }
            let result = self.place(st, req.events, req.counted, req.keep.as_deref(), req.slot);
            let _ = req.reply.send(result);
        }
    }

    fn place(
        &self,
        st: &mut TreeState,
        events: Vec<event::Unplaced>,
        counted: u64,
        keep: Option<&[Prefold]>,
        slot: segment_log::Slot,
    ) -> Result<Queued, AuditError> {
        if st.broken {
            return Err(recovery(
                &self.tenant,
                "the log is out of step with its tree; restart to recover",
            ));
        }
        let first = st.next_seq;
        // Taken under the lock, so that times never go back as sequence numbers go up.
        let now = event::format_time(Utc::now());
        let records: Vec<Vec<u8>> = events
            .iter()
            .enumerate()
            .map(|(i, event)| event.place_at(first + i as u64, &now))
            .collect();
        // Refused before the tree is touched, so an oversized event leaves the log as it was. The
        // bundle verifier's line limit caps it too: an event the log took but no export of it
        // could pass would be worse than one refused.
        let max = self
            .events
            .max_record_bytes()
            .min(u32::try_from(super::bundle::MAX_LINE_BYTES).unwrap_or(u32::MAX));
        if let Some(big) = records.iter().find(|r| r.len() > max as usize) {
            return Err(segment_log::Error::RecordTooLarge {
                len: big.len(),
                max,
            }
            .into());
        }
        for bytes in &records {
            // The tree leads the queue by at most this batch: if queueing fails below, the log is
            // marked broken and refuses appends until a reopen reconciles the two.
            if let Err(e) = st.tree.append(bytes) {
                st.broken = true;
                return Err(e.into());
            }
        }
        if let Some(keep) = keep {
            debug_assert_eq!(keep.len(), records.len());
            let kept = keep
                .iter()
                .zip(&records)
                .map(|(pre, bytes)| pre.placed(&now, bytes))
                .collect();
            self.unfolded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(first, kept);
        }
        let n = records.len() as u64;
        let pending = match slot.enqueue(records) {
            Ok(p) => p,
            Err(e) => {
                st.broken = true;
                self.forget_unfolded(first);
                return Err(e.into());
            }
        };
        st.next_seq += n;
        st.since_checkpoint += counted;
        Ok(Queued {
            first,
            pending,
            due: st.since_checkpoint >= self.checkpoint_every,
        })
    }
}

/// The kept leaf bytes of an append that is not yet known to be durable; dropped before it is,
/// it takes them out of the tenant's `unfolded` map.
struct Unfolded<'a> {
    log: &'a TenantLog,
    first: u64,
    /// Cleared once the append is durable as placed.
    armed: bool,
}

impl Drop for Unfolded<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.log.forget_unfolded(self.first);
        }
    }
}

/// A [`TenantLog::lock_state`] call waiting for the lock. Dropped before it got the lock, it drops
/// its place in the queue first (which gives back the lock if it had just been handed over) and
/// then places whatever appends were left waiting.
struct Waiting<'a> {
    log: &'a TenantLog,
    /// The pending acquisition; `None` once the lock was taken.
    lock: Option<
        std::pin::Pin<
            Box<
                dyn std::future::Future<Output = tokio::sync::MutexGuard<'a, TreeState>>
                    + Send
                    + 'a,
            >,
        >,
    >,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.lock.take().is_none() {
            return;
        }
        let waiting = !self
            .log
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if waiting {
            if let Ok(st) = self.log.state.try_lock() {
                drop(StateGuard::new(self.log, st));
            }
        }
    }
}

/// The tree's lock, held. Letting it go first places the appends waiting in the inbox, and then
/// takes the lock again for any that arrived meanwhile, unless someone else took it (who then does
/// the same). So an append left in the inbox while the lock was held is always placed, without
/// its appender queueing for the lock.
struct StateGuard<'a> {
    log: &'a TenantLog,
    guard: Option<tokio::sync::MutexGuard<'a, TreeState>>,
}

impl<'a> StateGuard<'a> {
    fn new(log: &'a TenantLog, guard: tokio::sync::MutexGuard<'a, TreeState>) -> Self {
        StateGuard {
            log,
            guard: Some(guard),
        }
    }
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = TreeState;
    fn deref(&self) -> &TreeState {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut TreeState {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for StateGuard<'_> {
    /// The loop has no bound, and needs none to end: each round places what arrived during the
    /// one before, at well under 2 µs an event, and an appender has one request in flight at a
    /// time, so the rounds shrink unless appends arrive faster than they can be placed. It cannot
    /// stop early either: an appender that found the lock taken relies on its holder.
    fn drop(&mut self) {
        let log = self.log;
        let mut held = self.guard.take();
        while let Some(mut st) = held {
            log.place_waiting(&mut st);
            drop(st);
            let empty = log
                .inbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            held = if empty {
                None
            } else {
                log.state.try_lock().ok()
            };
        }
    }
}

struct Inner {
    settings: AuditSettings,
    signer: SigningKey,
    keyring: Keyring,
    logs: RwLock<HashMap<TenantId, Arc<TenantLog>>>,
    opening: Mutex<()>,
}

/// The audit log of every tenant. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.inner.settings.dir)
            .finish_non_exhaustive()
    }
}

fn recovery(tenant: &TenantId, why: impl Into<String>) -> AuditError {
    AuditError::Recovery {
        tenant: tenant.to_string(),
        why: why.into(),
    }
}

impl AuditLog {
    /// An audit log over `settings.dir`, signing with `signer` and trusting `keyring` (which must
    /// contain the signer's key) for the checkpoints it reads back.
    pub fn new(settings: AuditSettings, signer: SigningKey, keyring: Keyring) -> Self {
        AuditLog {
            inner: Arc::new(Inner {
                settings,
                signer,
                keyring,
                logs: RwLock::new(HashMap::new()),
                opening: Mutex::new(()),
            }),
        }
    }

    /// The origin line of a tenant's log.
    pub fn origin(&self, tenant: &TenantId) -> String {
        format!("{}/{}", self.inner.settings.origin_prefix, tenant)
    }

    /// The keyring every checkpoint of this deployment verifies against.
    pub fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    /// The directory of the logs, for operators.
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.settings.dir
    }

    fn cached(&self, tenant: &TenantId) -> Option<Arc<TenantLog>> {
        self.inner
            .logs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Opens (recovering if needed) the context's tenant log, so that it is checked and takes part
    /// in heartbeats before its first append.
    ///
    /// # Errors
    /// [`AuditError`] when the log cannot be opened or does not match its last signed checkpoint.
    pub async fn open_tenant(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
    ) -> Result<(), AuditError> {
        self.log_for(ctx.tenant_id(), repo).await.map(|_| ())
    }

    async fn log_for(
        &self,
        tenant: &TenantId,
        repo: TenantStore,
    ) -> Result<Arc<TenantLog>, AuditError> {
        if let Some(log) = self.cached(tenant) {
            return Ok(log);
        }
        let _guard = self.inner.opening.lock().await;
        if let Some(log) = self.cached(tenant) {
            return Ok(log);
        }
        let log = Arc::new(self.open_log(tenant, repo).await?);
        self.inner
            .logs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.clone(), Arc::clone(&log));
        Ok(log)
    }

    async fn open_log(
        &self,
        tenant: &TenantId,
        repo: TenantStore,
    ) -> Result<TenantLog, AuditError> {
        let dir = self.inner.settings.dir.join(tenant.as_str());
        let opts = self.inner.settings.segments.clone();
        let (events, report) = SegmentLog::open(dir.join("events"), opts.clone())?;
        if let Some(torn) = &report.torn_tail {
            tracing::warn!(tenant = %tenant, bytes = torn.bytes_cut, "audit log had a torn tail from a crash; it was cut");
        }
        let (checkpoints, _) = SegmentLog::open(dir.join("checkpoints"), opts)?;
        let origin = self.origin(tenant);
        let durable = events.len();

        // Catch the tree index up with the durable log, or cut it back to it; an index a crash
        // left inconsistent is rebuilt from the log.
        let mut nodes = NodeFiles::open(&dir.join("nodes"))?;
        let start = nodes.leaves()?.min(durable);
        // Nodes past `start` may come from events that never became durable (the tree is extended
        // before a record is synced, and buffered nodes are written in batches): cut them off, or a
        // later crash before the caught-up nodes are written out would leave them to be read back.
        nodes.truncate_to(start)?;
        let size =
            TreeSize::new(start).ok_or_else(|| recovery(tenant, "tree size out of range"))?;
        let (mut tree, start) = match Tree::open(nodes, size) {
            Ok(t) => (t, start),
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "the audit tree index is damaged; rebuilding it from the log");
                let mut nodes = NodeFiles::open(&dir.join("nodes"))?;
                nodes.clear()?;
                (Tree::new(nodes), 0)
            }
        };
        if start < durable {
            tracing::info!(tenant = %tenant, from = start, to = durable, "catching the audit tree index up from the log");
            for rec in events.iter_from(start)? {
                tree.append(&rec?.1)?;
            }
        }
        if let Some(last) = durable.checked_sub(1) {
            let bytes = events.read(last)?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| recovery(tenant, format!("the last event does not parse: {e}")))?;
            if v["seq"] != last || v["tenant"] != tenant.as_str() {
                return Err(recovery(
                    tenant,
                    format!("event {last} names another position or tenant"),
                ));
            }
        }

        // The tree must reproduce the last signed checkpoint, which can only cover durable events.
        let mut latest = None;
        let mut since_checkpoint = durable;
        if let Some(last) = checkpoints.len().checked_sub(1) {
            let note = String::from_utf8(checkpoints.read(last)?)
                .map_err(|_| recovery(tenant, "the last checkpoint is not text"))?;
            let (cp, _) = open_checkpoint(&note, &self.inner.keyring, &origin).map_err(|e| {
                recovery(tenant, format!("the last checkpoint does not verify: {e}"))
            })?;
            if cp.size > durable {
                return Err(recovery(
                    tenant,
                    format!(
                        "the last checkpoint covers {} events but the log holds {durable}",
                        cp.size
                    ),
                ));
            }
            let size = TreeSize::new(cp.size)
                .ok_or_else(|| recovery(tenant, "checkpoint size out of range"))?;
            if tree.root_at(size)? != cp.root {
                return Err(recovery(
                    tenant,
                    format!("the log does not match its checkpoint at size {}", cp.size),
                ));
            }
            // The checkpoint's own `checkpoint.signed` event follows it and does not count.
            since_checkpoint = durable.saturating_sub(cp.size + 1);
            latest = Some(note);
        }
        let log = TenantLog {
            tenant: tenant.clone(),
            inbox: StdMutex::new(Vec::new()),
            checkpoint_every: self.inner.settings.checkpoint_every,
            repo,
            projector: Mutex::new(()),
            folded: std::sync::atomic::AtomicU64::new(0),
            unfolded: StdMutex::new(BTreeMap::new()),
            origin,
            events,
            checkpoints,
            state: Mutex::new(TreeState {
                tree,
                next_seq: durable,
                since_checkpoint,
                last_signed: Instant::now(),
                broken: false,
            }),
            latest: StdMutex::new(latest),
        };
        // Projections may lag the log after a crash; fold in what they missed.
        self.project(&log).await?;
        Ok(log)
    }

    /// Folds the durable events that the live projections have not seen yet into them, in order.
    async fn project(&self, log: &TenantLog) -> Result<(), AuditError> {
        self.project_with(log, None).await
    }

    /// Folds the durable events the projections have not seen yet, at least those below `needed`
    /// (the end of the caller's own append) or, without it, all of them.
    async fn project_with(&self, log: &TenantLog, needed: Option<u64>) -> Result<(), AuditError> {
        use std::sync::atomic::Ordering;
        let needed = needed.unwrap_or_else(|| log.events.len());
        if log.folded.load(Ordering::Acquire) >= needed {
            return Ok(());
        }
        let _order = log.projector.lock().await;
        // Whoever held the projector before may have folded these events already (with many
        // concurrent appenders, usually so): then there is nothing to do.
        if log.folded.load(Ordering::Acquire) >= needed {
            return Ok(());
        }
        let projections = log.repo.projections();
        let head = projections.projection_head()?;
        let end = log.events.len();
        if head >= end.max(needed) {
            log.folded.fetch_max(head, Ordering::AcqRel);
            return Ok(());
        }
        // The kept appends that lie wholly in what is folded now. One reaching past `end` (its
        // records split by a segment roll, half synced) stays for the next fold; those below
        // `head` were folded already.
        let kept: Vec<(u64, Vec<Kept>)> = {
            let mut unfolded = log.unfolded.lock().unwrap_or_else(|e| e.into_inner());
            let later = unfolded.split_off(&end);
            let mut now = std::mem::replace(&mut *unfolded, later);
            if let Some((&first, records)) = now.last_key_value() {
                if first + records.len() as u64 > end {
                    let records = now.remove(&first).expect("just seen");
                    unfolded.insert(first, records);
                }
            }
            now.into_iter()
                .filter(|(first, _)| *first >= head)
                .collect()
        };
        let mut usage = UsageDeltas::default();
        let mut runs = Vec::new();
        let mut members = Vec::new();
        let mut fold = |seq: u64, event: Kept| -> Result<(), AuditError> {
            // A kept event comes read already. Of bytes, the common case reads only the fields it
            // needs, borrowed; anything else (a role event, a field of an unexpected type) goes
            // the general way, which gives the same answer wherever both apply (tested).
            let (f, v) = match event {
                Kept::Folded(f) => (f, None),
                Kept::Bytes(bytes) => match fold_fast(&bytes) {
                    Some(f) => (f, None),
                    None => {
                        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                            recovery(&log.tenant, format!("event {seq} does not parse: {e}"))
                        })?;
                        (fold_value(&v), Some(v))
                    }
                },
            };
            if let Some((month, delta)) = f.usage {
                usage.push(&month, seq, delta);
            }
            if let Some(run) = f.run {
                runs.push(run);
            }
            // Role events always take the general way.
            let Some(v) = v else { return Ok(()) };
            // Memberships are a projection of role events, stored in the same batch as the head.
            match v["type"].as_str() {
                Some("role.granted") => {
                    let (p, r) = role_event(&log.tenant, seq, &v)?;
                    members.push((p, Some(r)));
                }
                Some("role.revoked") => {
                    let (p, _) = role_event(&log.tenant, seq, &v)?;
                    members.push((p, None));
                }
                _ => {}
            }
            Ok(())
        };
        // In sequence order: each kept append from memory, what lies between from the files.
        let mut seq = head;
        let mut kept = kept.into_iter().peekable();
        while seq < end {
            // Appends are disjoint runs of sequence numbers, so none starts inside another; one
            // that did would be skipped here and its events read from the files.
            while kept.next_if(|(first, _)| *first < seq).is_some() {}
            if let Some((first, records)) = kept.next_if(|(first, _)| *first == seq) {
                let n = records.len() as u64;
                for (i, record) in records.into_iter().enumerate() {
                    fold(first + i as u64, record)?;
                }
                seq = first + n;
                continue;
            }
            let stop = kept.peek().map_or(end, |(first, _)| (*first).min(end));
            for rec in log.events.iter_from(seq)?.take((stop - seq) as usize) {
                let (at, bytes) = rec?;
                fold(at, Kept::Bytes(bytes))?;
            }
            seq = stop;
        }
        projections.apply_projection(&usage, &runs, &members, end)?;
        log.folded.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// Rebuilds every projection of the context's tenant from its log and returns each difference
    /// from the live ones (empty when they agree).
    ///
    /// # Errors
    /// [`AuditError`] when the log or the live tables cannot be read.
    pub async fn replay(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
    ) -> Result<Vec<String>, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        self.project(&log).await?;
        let mut rebuilt = Projections::default();
        for rec in log.events.iter_from(0)? {
            let (seq, bytes) = rec?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| recovery(&log.tenant, format!("event {seq} does not parse: {e}")))?;
            rebuilt.apply(&v);
        }
        let live = Projections {
            members: log
                .repo
                .members()
                .list()?
                .into_iter()
                .map(|(p, r)| (p.to_string(), r.to_string()))
                .collect(),
            installations: log
                .repo
                .installations()
                .list()?
                .into_iter()
                .map(|i| {
                    let state = if i.is_active() { "active" } else { "revoked" };
                    (i.id.to_string(), state.to_owned())
                })
                .collect(),
            usage: log.repo.projections().usage()?,
            runs: log.repo.projections().runs()?,
        };
        let mut out = rebuilt.diff(&live);
        // The index of running runs, which a restart reads to find runs it must end.
        let indexed: std::collections::BTreeSet<String> =
            log.repo.projections().running_runs()?.into_iter().collect();
        for (run, state) in &rebuilt.runs {
            if (*state == RunState::Running) != indexed.contains(run) {
                out.push(format!(
                    "running index {run}: the log says {state:?}, live {} it as running",
                    if indexed.contains(run) {
                        "lists"
                    } else {
                        "does not list"
                    }
                ));
            }
        }
        for run in indexed.iter().filter(|r| !rebuilt.runs.contains_key(*r)) {
            out.push(format!(
                "running index {run}: live lists it as running, the log says nothing"
            ));
        }
        Ok(out)
    }

    async fn append_env(
        &self,
        log: &TenantLog,
        env: &Envelope,
        body: &EventBody,
    ) -> Result<u64, AuditError> {
        let projected = affects_projections(body);
        let (seq, pending, due) = self
            .enqueue_all(log, env, std::slice::from_ref(body), projected)
            .await?;
        self.settle(log, seq, pending, due, projected.then_some(seq + 1))
            .await
    }

    /// What follows an append once it is queued: wait for its sync, fold it into the projections
    /// when it affects them, sign a checkpoint when one is due.
    async fn settle(
        &self,
        log: &TenantLog,
        seq: u64,
        pending: Pending,
        due: bool,
        projected: Option<u64>,
    ) -> Result<u64, AuditError> {
        // Kept bytes of an append that failed, was stored elsewhere, or whose caller went away
        // before hearing are dropped, so that they neither pile up in a log whose writer failed
        // nor stand in for what the files hold.
        let mut kept = projected.map(|_| Unfolded {
            log,
            first: seq,
            armed: true,
        });
        self.await_durable(log, seq, pending).await?;
        if let Some(kept) = &mut kept {
            kept.armed = false;
        }
        let after = |e: AuditError| AuditError::AfterDurable(Box::new(e));
        if let Some(end) = projected {
            self.project_with(log, Some(end)).await.map_err(after)?;
        }
        if due {
            self.sign(log, self.inner.settings.checkpoint_every)
                .await
                .map_err(after)?;
        }
        Ok(seq)
    }

    /// Appends without signing; returns the sequence number and whether a checkpoint is due.
    async fn append_raw(
        &self,
        log: &TenantLog,
        env: &Envelope,
        body: &EventBody,
    ) -> Result<(u64, bool), AuditError> {
        let (seq, pending, due) = self.enqueue(log, env, body).await?;
        self.await_durable(log, seq, pending).await?;
        Ok((seq, due))
    }

    /// Assigns the event its sequence number, queues it for the segment log and extends the tree,
    /// all under the tenant's lock so that queue order is sequence order. Returns what to wait on
    /// and whether a checkpoint is due.
    async fn enqueue(
        &self,
        log: &TenantLog,
        env: &Envelope,
        body: &EventBody,
    ) -> Result<(u64, Pending, bool), AuditError> {
        let (seq, pending, due) = self
            .enqueue_all(log, env, std::slice::from_ref(body), false)
            .await?;
        Ok((seq, pending, due))
    }

    /// [`AuditLog::enqueue`] for consecutive events, committed by one sync; returns the first one's
    /// sequence number. With `keep`, the leaf bytes are left in the tenant's `unfolded` map for the
    /// projection fold.
    ///
    /// Appends are combined: each appender encodes its events and takes a place in the segment
    /// log's queue on its own, then leaves the request in the tenant's inbox, and whoever holds the
    /// tree's lock next places every request waiting there, in inbox order. So a burst of appends
    /// passes the lock a few times, not once each, and nothing waits while holding it.
    async fn enqueue_all(
        &self,
        log: &TenantLog,
        env: &Envelope,
        bodies: &[EventBody],
        keep: bool,
    ) -> Result<(u64, Pending, bool), AuditError> {
        let events: Vec<_> = bodies
            .iter()
            .map(|body| event::encode_unplaced(env, body))
            .collect();
        let keep = keep.then(|| bodies.iter().map(|b| Prefold::of(env, b)).collect());
        let counted = bodies
            .iter()
            .filter(|b| !matches!(b, EventBody::CheckpointSigned { .. }))
            .count() as u64;
        let slot = log.events.reserve().await?;
        let (reply, placed) = oneshot::channel();
        log.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Request {
                events,
                counted,
                keep,
                slot,
                reply,
            });
        // Whoever holds the lock places the waiting requests when they let it go (see
        // `StateGuard`); if no one holds it, this appender takes it and does. It never queues for
        // the lock, so a burst does not pass the lock from appender to appender.
        if let Ok(st) = log.state.try_lock() {
            drop(StateGuard::new(log, st));
        }
        let q = placed
            .await
            .map_err(|_| recovery(&log.tenant, "an append was dropped unplaced"))??;
        Ok((q.first, q.pending, q.due))
    }

    /// Waits until the queued event `seq` is durable.
    async fn await_durable(
        &self,
        log: &TenantLog,
        seq: u64,
        pending: Pending,
    ) -> Result<(), AuditError> {
        let durable = pending.durable().await?;
        crate::metrics::inc(&crate::metrics::APPENDS);
        if durable != seq {
            return Err(recovery(
                &log.tenant,
                format!("event {seq} was stored as {durable}"),
            ));
        }
        Ok(())
    }

    /// Signs a checkpoint over the durable events, stores it durably and records it in the log,
    /// when at least `min_new` events arrived since the last one: the checkpoint interval for a
    /// checkpoint that came due, 1 for whatever is unsigned, 0 for a heartbeat (which signs the same
    /// size at a new time). The count is read under the tree's lock, so appenders that all saw a
    /// checkpoint come due sign one between them, not one each.
    async fn sign(&self, log: &TenantLog, min_new: u64) -> Result<Option<String>, AuditError> {
        let (note, new_events) = {
            let mut st = log.lock_state().await;
            if st.since_checkpoint < min_new {
                return Ok(None);
            }
            let size = log.events.len();
            let root = st.tree.root_at(
                TreeSize::new(size).ok_or_else(|| recovery(&log.tenant, "size out of range"))?,
            )?;
            let mut cp = Checkpoint::new(log.origin.clone(), size, root);
            cp.extensions
                .push(format!("time {}", event::format_time(Utc::now())));
            let note = sign_checkpoint(&cp, &[&self.inner.signer])?;
            // The index on disk keeps up with the signed checkpoints (it is derived, never synced).
            st.tree.store_mut().flush()?;
            // Synced under the tree's lock. Syncing it outside (letting appends go on) was
            // measured slower at 64 writers: the two logs' syncs then contend for the disk.
            log.checkpoints.append(note.clone().into_bytes()).await?;
            let new_events = st.since_checkpoint > 0;
            st.since_checkpoint = 0;
            st.last_signed = Instant::now();
            *log.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(note.clone());
            (note, new_events.then_some(cp))
        };
        if let Some(cp) = new_events {
            self.append_raw(
                log,
                &Envelope::system(&log.tenant),
                &EventBody::CheckpointSigned {
                    size: cp.size,
                    root: hex::encode(cp.root),
                },
            )
            .await?;
        }
        Ok(Some(note))
    }

    /// Signs a checkpoint for the context's tenant now, even if nothing changed, and returns it.
    ///
    /// # Errors
    /// [`AuditError`] when the log cannot be opened or the checkpoint cannot be stored.
    pub async fn checkpoint_now(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
    ) -> Result<String, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        Ok(self.sign(&log, 0).await?.expect("a heartbeat always signs"))
    }

    /// One pass of the checkpointer: every open log that has new events, or has been silent for the
    /// interval, gets a checkpoint. Returns how many were signed.
    ///
    /// # Errors
    /// The first log that failed; the others are still tried.
    pub async fn tick(&self) -> Result<usize, AuditError> {
        let logs: Vec<Arc<TenantLog>> = self
            .inner
            .logs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let interval = self.inner.settings.checkpoint_interval;
        let mut signed = 0;
        let mut first_err = None;
        for log in logs {
            let elapsed = log.lock_state().await.last_signed.elapsed();
            if elapsed < interval {
                continue;
            }
            match self.sign(&log, 0).await {
                Ok(Some(_)) => signed += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(tenant = %log.tenant, error = %e, "checkpoint failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(signed),
        }
    }

    /// Runs [`AuditLog::tick`] until `shutdown` completes, then signs a final checkpoint for every
    /// log with unsigned events and closes the logs.
    pub async fn run_checkpointer(self, shutdown: impl std::future::Future<Output = ()>) {
        let period = (self.inner.settings.checkpoint_interval / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut ticker = tokio::time::interval(period);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::error!(error = %e, "checkpointer pass failed");
                    }
                }
                () = &mut shutdown => break,
            }
        }
        if let Err(e) = self.close().await {
            tracing::error!(error = %e, "closing the audit logs failed");
        }
    }

    /// Seconds since the stalest open log last signed, for `/metrics`.
    pub fn checkpoint_age_secs(&self) -> Option<u64> {
        let logs: Vec<Arc<TenantLog>> = self
            .inner
            .logs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        logs.iter()
            .filter_map(|l| {
                l.state
                    .try_lock()
                    .ok()
                    .map(|st| st.last_signed.elapsed().as_secs())
            })
            .max()
    }

    /// Signs a final checkpoint for every log with unsigned events and closes every log.
    ///
    /// # Errors
    /// The first failure; every log is still closed.
    pub async fn close(&self) -> Result<(), AuditError> {
        let logs: Vec<Arc<TenantLog>> = self
            .inner
            .logs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        let mut first_err = None;
        for log in logs {
            if let Err(e) = self.sign(&log, 1).await {
                first_err.get_or_insert(e);
            }
            if let Err(e) = self.project(&log).await {
                first_err.get_or_insert(e);
            }
            if let Err(e) = log.lock_state().await.tree.store_mut().flush() {
                first_err.get_or_insert(e.into());
            }
            for l in [&log.events, &log.checkpoints] {
                if let Err(e) = l.close().await {
                    first_err.get_or_insert(e.into());
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The number of durable events in the context's tenant log, without its root: no lock is
    /// taken and no tree node read, so it costs nothing on a request's path.
    ///
    /// # Errors
    /// [`AuditError`] when the log cannot be opened.
    pub async fn durable_size(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
    ) -> Result<u64, AuditError> {
        Ok(self.log_for(ctx.tenant_id(), repo).await?.events.len())
    }

    /// The head of the context's tenant log.
    ///
    /// # Errors
    /// [`AuditError`] when the log cannot be opened or read.
    pub async fn head(&self, ctx: &TenantContext, repo: TenantStore) -> Result<Head, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        let st = log.lock_state().await;
        let size = log.events.len();
        let root = st
            .tree
            .root_at(TreeSize::new(size).expect("a stored size is in range"))?;
        let checkpoint = log.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(Head {
            size,
            root,
            checkpoint,
        })
    }

    /// The events `[from, to)` of the context's tenant, as their exact leaf bytes.
    ///
    /// # Errors
    /// [`AuditError`] when the range is not within the durable log, or on a read failure.
    pub async fn read_range(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        from: u64,
        to: u64,
    ) -> Result<Vec<Vec<u8>>, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        Ok(log.events.read_range(from, to)?)
    }

    /// The inclusion proof of event `seq` in the tree of `size` events.
    ///
    /// # Errors
    /// [`AuditError::Tree`] when `seq` or `size` is out of range.
    pub async fn inclusion_proof(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        seq: u64,
        size: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        let st = log.lock_state().await;
        let (leaf, size) = leaf_and_size(seq, size.min(log.events.len()))?;
        Ok(st.tree.inclusion_proof(leaf, size)?)
    }

    /// The consistency proof between two sizes of the context's tenant log.
    ///
    /// # Errors
    /// [`AuditError::Tree`] when the sizes are out of range or decreasing.
    pub async fn consistency_proof(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        size1: u64,
        size2: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        let st = log.lock_state().await;
        let s1 = TreeSize::new(size1).ok_or(TreeError::SizeOutOfRange {
            requested: size1,
            current: log.events.len(),
        })?;
        let s2 = checked_size(size2, log.events.len())?;
        Ok(st.tree.consistency_proof(s1, s2)?)
    }

    /// The range proof of events `[from, to)` in the tree of `size` events.
    ///
    /// # Errors
    /// [`AuditError::Tree`] when the range or size is out of range.
    pub async fn range_proof(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        from: u64,
        to: u64,
        size: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        let st = log.lock_state().await;
        let size = checked_size(size, log.events.len())?;
        Ok(st.tree.range_proof(from, to, size)?)
    }

    /// Appends an event for the context's tenant through an already-scoped repository.
    ///
    /// # Errors
    /// As [`AuditSink::append`].
    pub async fn append_with(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        body: EventBody,
    ) -> Result<u64, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        self.append_env(&log, &Envelope::from_ctx(ctx), &body).await
    }

    /// Appends consecutive events for the context's tenant, committed by one sync, and returns
    /// their sequence numbers once all are durable.
    ///
    /// # Errors
    /// As [`AuditSink::append`]; none of the events' effects may happen.
    pub async fn append_batch_with(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        bodies: &[EventBody],
    ) -> Result<std::ops::Range<u64>, AuditError> {
        if bodies.is_empty() {
            return Ok(0..0);
        }
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        let projected = bodies.iter().any(affects_projections);
        let (first, pending, due) = self
            .enqueue_all(&log, &Envelope::from_ctx(ctx), bodies, projected)
            .await?;
        let end = first + bodies.len() as u64;
        self.settle(&log, first, pending, due, projected.then_some(end))
            .await?;
        Ok(first..first + bodies.len() as u64)
    }
}

impl AuditLog {
    /// Exports events `[from, to)` (to the end when `to` is `None`) of the context's tenant into a
    /// bundle directory `out`. The export is recorded first (`export.created`), then a checkpoint is
    /// signed that covers the whole log including that record, and the bundle proves the exported
    /// events against it. With `since` (a checkpoint from an earlier export), the bundle also proves
    /// that the log only grew since then.
    ///
    /// Nothing is recorded when the range, `since` (its signature, size and root) or `out` (it must
    /// not exist or be empty) is refused, and the bundle is written beside `out` and renamed into
    /// place, so that a failed or interrupted export leaves no partial bundle at `out`.
    ///
    /// # Errors
    /// [`AuditError::Export`] for a range outside the log or a `since` checkpoint that is not this
    /// log's; [`AuditError::Bundle`] for an unusable `out`; write and log failures.
    pub async fn export(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        from: u64,
        to: Option<u64>,
        since: Option<&str>,
        out: &std::path::Path,
    ) -> Result<bundle::Manifest, AuditError> {
        self.export_with_progress(ctx, repo, from, to, since, out, None)
            .await
    }

    /// [`AuditLog::export`], telling `progress` how many events are written so far, every
    /// [`bundle::PROGRESS_EVERY`] events.
    ///
    /// # Errors
    /// As [`AuditLog::export`].
    #[allow(clippy::too_many_arguments)] // the export's own arguments, and where to report
    pub async fn export_with_progress(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        from: u64,
        to: Option<u64>,
        since: Option<&str>,
        out: &std::path::Path,
        progress: Option<std::sync::Arc<dyn Fn(u64) + Send + Sync>>,
    ) -> Result<bundle::Manifest, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        let size = log.events.len();
        let to = to.unwrap_or(size);
        if from >= to || to > size {
            return Err(AuditError::Export(format!(
                "range {from}..{to} is not within the log's {size} events"
            )));
        }
        let since = match since {
            None => None,
            Some(note) => {
                let (cp, _) =
                    open_checkpoint(note, &self.inner.keyring, &log.origin).map_err(|e| {
                        AuditError::Export(format!("the earlier checkpoint is not this log's: {e}"))
                    })?;
                Some((note, cp))
            }
        };
        // Everything that can be checked is checked before the export is recorded, so that a
        // refused export leaves the log as it was: the earlier checkpoint must be of this very
        // history (a consistency proof from it could not verify otherwise), and the bundle's
        // directory must be usable.
        if let Some((_, old)) = &since {
            if old.size > size {
                return Err(AuditError::Export(format!(
                    "the earlier checkpoint's size {} is beyond the log's {size} events",
                    old.size
                )));
            }
            let root = {
                let st = log.lock_state().await;
                st.tree.root_at(checked_size(old.size, log.events.len())?)?
            };
            if root != old.root {
                return Err(AuditError::Export(format!(
                    "the earlier checkpoint's root is not this log's root at size {}: it signs another history",
                    old.size
                )));
            }
        }
        // A few directory operations: not worth a blocking thread of their own.
        let staging = bundle::stage(out)?;
        self.append_env(
            &log,
            &Envelope::from_ctx(ctx),
            &EventBody::ExportCreated { from, to },
        )
        .await?;
        let note = self.sign(&log, 0).await?.expect("a heartbeat always signs");
        let (cp, _) = open_checkpoint(&note, &self.inner.keyring, &log.origin)?;
        let (range, consistency) = {
            let st = log.lock_state().await;
            let tree_size = checked_size(cp.size, log.events.len())?;
            let range = st.tree.range_proof(from, to, tree_size)?;
            let consistency = match &since {
                None => None,
                Some((_, old)) => Some(
                    st.tree
                        .consistency_proof(checked_size(old.size, cp.size)?, tree_size)?,
                ),
            };
            (range, consistency)
        };
        // Writing the bundle reads every exported event and writes twice as much: seconds for a
        // large tenant, so it runs on a blocking thread, not on one of the runtime's workers,
        // streaming one event at a time.
        let audit = self.clone();
        let since = since.map(|(n, old)| (n.to_owned(), old.size));
        tokio::task::spawn_blocking(move || {
            let mut events = log
                .events
                .iter_range(from, to)?
                .map(|r| r.map(|(_, payload)| payload).map_err(Into::into));
            let contents = bundle::Contents {
                tenant: log.tenant.as_str(),
                origin: &log.origin,
                from,
                to,
                events: &mut events,
                checkpoint: &note,
                tree_size: cp.size,
                keyring: &audit.inner.keyring,
                range_proof: &range,
                since: since
                    .as_ref()
                    .zip(consistency.as_deref())
                    .map(|((n, size), p)| (n.as_str(), *size, p)),
                progress: progress.as_deref().map(|p| p as bundle::Progress<'_>),
            };
            Ok(staging.write(contents)?)
        })
        .await
        .map_err(|e| AuditError::ExportWriter(e.to_string()))?
    }

    /// The C2SP tlog-proof of event `seq`: its inclusion proof in the latest checkpoint (signed now
    /// when the latest one does not cover it yet).
    ///
    /// # Errors
    /// [`AuditError::Tree`] when `seq` is not in the log.
    pub async fn tlog_proof(
        &self,
        ctx: &TenantContext,
        repo: TenantStore,
        seq: u64,
    ) -> Result<String, AuditError> {
        let log = self.log_for(ctx.tenant_id(), repo).await?;
        if seq >= log.events.len() {
            return Err(TreeError::LeafOutOfRange {
                leaf: seq,
                size: log.events.len(),
            }
            .into());
        }
        let latest = log.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let covering = match latest {
            Some(note)
                if open_checkpoint(&note, &self.inner.keyring, &log.origin)?
                    .0
                    .size
                    > seq =>
            {
                note
            }
            _ => self.sign(&log, 0).await?.expect("a heartbeat always signs"),
        };
        let (cp, _) = open_checkpoint(&covering, &self.inner.keyring, &log.origin)?;
        let hashes = {
            let st = log.lock_state().await;
            let (leaf, size) = leaf_and_size(seq, cp.size)?;
            st.tree.inclusion_proof(leaf, size)?
        };
        Ok(super::checkpoint::TlogProof {
            extra: None,
            index: seq,
            hashes,
            checkpoint_note: covering,
        }
        .to_text())
    }
}

/// What the fold needs of an event that affects projections, known before it is placed: what it
/// does to usage and runs, taken from the event itself rather than parsed back from its bytes
/// (parsing was 4% of the agent loop's CPU at 8 concurrent runs). Role events are kept as bytes
/// and take the general way. The `prefold_reads_what_the_fold_reads_from_the_bytes` test holds
/// this equal to [`fold_fast`] over every event type.
enum Prefold {
    Facts {
        usage: Option<Usage>,
        run: Option<(String, RunState)>,
    },
    Bytes,
}

impl Prefold {
    fn of(env: &Envelope, body: &EventBody) -> Prefold {
        let (tokens_in, tokens_out, cost_microcents) = match body {
            EventBody::RoleGranted { .. } | EventBody::RoleRevoked { .. } => return Prefold::Bytes,
            EventBody::ModelCalled {
                tokens_in,
                tokens_out,
                cost_microcents,
                ..
            } => (*tokens_in, *tokens_out, *cost_microcents),
            EventBody::ToolInvoked {
                cost_microcents, ..
            } => (0, 0, *cost_microcents),
            _ => (0, 0, 0),
        };
        let ty = body.type_name();
        Prefold::Facts {
            usage: usage_of(&Facts {
                ty,
                tokens_in,
                tokens_out,
                cost_microcents,
            }),
            run: transition_of(ty).map(|s| (env.run_id().to_owned(), s)),
        }
    }

    /// What is kept of the event placed at `time` (as formatted into it) with leaf `bytes`.
    fn placed(&self, time: &str, bytes: &[u8]) -> Kept {
        match self {
            Prefold::Facts { usage, run } => Kept::Folded(Folded {
                usage: usage.map(|u| (month_of(time).to_owned(), u)),
                run: run.clone(),
            }),
            Prefold::Bytes => Kept::Bytes(bytes.to_vec()),
        }
    }
}

/// One event for the fold: from the tenant's `unfolded` map, or (as bytes) from the files.
#[derive(Debug, PartialEq, Eq)]
enum Kept {
    Folded(Folded),
    Bytes(Vec<u8>),
}

/// What one event does to the usage and run projections.
#[derive(Debug, PartialEq, Eq)]
struct Folded {
    /// The month and what the event adds to its usage.
    usage: Option<(String, Usage)>,
    /// The run and the state the event moves it to.
    run: Option<(String, RunState)>,
}

/// [`Folded`] from the event's bytes, without building a `Value`; `None` for a role event or an
/// event of unexpected shape, which [`fold_value`] takes.
fn fold_fast(bytes: &[u8]) -> Option<Folded> {
    // An object only (a derived reading would take an array too, by position).
    if bytes.first() != Some(&b'{') {
        return None;
    }
    let view = serde_json::from_slice::<FoldView<'_>>(bytes).ok()?;
    if view.ty.starts_with("role.") {
        return None;
    }
    let facts = Facts {
        ty: &view.ty,
        tokens_in: view.data.tokens_in,
        tokens_out: view.data.tokens_out,
        cost_microcents: view.data.cost_microcents,
    };
    Some(Folded {
        usage: usage_of(&facts).map(|d| (month_of(&view.time).to_owned(), d)),
        run: transition_of(&view.ty)
            .map(|s| (view.run_id.as_deref().unwrap_or_default().to_owned(), s)),
    })
}

/// [`Folded`] from the parsed event.
fn fold_value(v: &serde_json::Value) -> Folded {
    Folded {
        usage: usage_delta(v).map(|d| {
            (
                month_of(v["time"].as_str().unwrap_or_default()).to_owned(),
                d,
            )
        }),
        run: run_transition(v).map(|s| (v["run_id"].as_str().unwrap_or_default().to_owned(), s)),
    }
}

/// The fields of an event the usage and run projections read, borrowed from its bytes where it
/// can be: parsing every event into a `serde_json::Value` was most of the fold's cost. Unknown
/// fields are skipped; a field of another type fails the parse, and the fold then takes the
/// `Value` way.
#[derive(serde::Deserialize)]
struct FoldView<'a> {
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    time: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    run_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    data: FoldData,
}

/// The usage fields of an event's data (0 when absent, as in `Facts::of`). Read from a JSON
/// object only: a derived reading would also take an array, by position, where the `Value`
/// reading finds no field.
#[derive(Default)]
struct FoldData {
    tokens_in: u64,
    tokens_out: u64,
    cost_microcents: u64,
}

impl<'de> serde::Deserialize<'de> for FoldData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = FoldData;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<FoldData, A::Error> {
                let mut out = FoldData::default();
                // A repeated key: the last one wins, as in a `Value`.
                while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "tokens_in" => out.tokens_in = m.next_value()?,
                        "tokens_out" => out.tokens_out = m.next_value()?,
                        "cost_microcents" => out.cost_microcents = m.next_value()?,
                        _ => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Fields)
    }
}

/// The principal and role of a role event.
fn role_event(
    tenant: &TenantId,
    seq: u64,
    v: &serde_json::Value,
) -> Result<(PrincipalId, Role), AuditError> {
    let bad = |why: String| recovery(tenant, format!("event {seq}: {why}"));
    let p = v["data"]["principal"]
        .as_str()
        .unwrap_or_default()
        .parse::<PrincipalId>()
        .map_err(|e| bad(e.to_string()))?;
    let r = v["data"]["role"]
        .as_str()
        .unwrap_or_default()
        .parse::<Role>()
        .map_err(|e| bad(e.to_string()))?;
    Ok((p, r))
}

/// True for the events that change a projection (usage, runs, memberships); others only move the
/// projection head, which the next projecting append or the next open catches up.
fn affects_projections(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::RoleGranted { .. }
            | EventBody::RoleRevoked { .. }
            | EventBody::RunStarted { .. }
            | EventBody::ModelCalled { .. }
            | EventBody::ToolInvoked { .. }
            | EventBody::RunCompleted { .. }
            | EventBody::RunFailed { .. }
    )
}

fn checked_size(size: u64, durable: u64) -> Result<TreeSize, TreeError> {
    if size > durable {
        return Err(TreeError::SizeOutOfRange {
            requested: size,
            current: durable,
        });
    }
    TreeSize::new(size).ok_or(TreeError::SizeOutOfRange {
        requested: size,
        current: durable,
    })
}

fn leaf_and_size(seq: u64, size: u64) -> Result<(LeafIndex, TreeSize), TreeError> {
    let ts = checked_size(size, size)?;
    let leaf = LeafIndex::new(seq)
        .filter(|_| seq < size)
        .ok_or(TreeError::LeafOutOfRange { leaf: seq, size })?;
    Ok((leaf, ts))
}

/// The sink that writes to the per-tenant logs; it needs the store to reach each tenant's tree index.
#[derive(Clone, Debug)]
pub struct LogSink {
    log: AuditLog,
    store: crate::store::Store,
}

impl LogSink {
    /// A sink over `log`, reaching tree indexes through `store`.
    pub fn new(log: AuditLog, store: crate::store::Store) -> Self {
        LogSink { log, store }
    }
}

#[async_trait::async_trait]
impl AuditSink for LogSink {
    async fn append(&self, ctx: &TenantContext, body: EventBody) -> Result<u64, AuditError> {
        let repo = self.store.for_tenant(ctx)?;
        self.log.append_with(ctx, repo, body).await
    }

    async fn append_batch(
        &self,
        ctx: &TenantContext,
        bodies: &[EventBody],
    ) -> Result<std::ops::Range<u64>, AuditError> {
        let repo = self.store.for_tenant(ctx)?;
        self.log.append_batch_with(ctx, repo, bodies).await
    }
}

impl From<CheckpointError> for AuditError {
    fn from(e: CheckpointError) -> Self {
        AuditError::Checkpoint(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Services;

    /// A number field of an event: mostly absent or a whole number (so that the fast reading often
    /// answers), sometimes a value of another JSON type.
    fn number() -> impl proptest::strategy::Strategy<Value = Option<serde_json::Value>> {
        use proptest::prelude::*;
        use serde_json::json;
        prop_oneof![
            3 => Just(None),
            3 => Just(Some(json!(7))),
            2 => Just(Some(json!(u64::MAX))),
            1 => Just(Some(json!(null))),
            1 => Just(Some(json!(-3))),
            1 => Just(Some(json!(2.5))),
            1 => Just(Some(json!("7"))),
            1 => Just(Some(json!({"nested": [1, {"x": "y"}]}))),
        ]
    }

    /// A text field of an event: mostly a string (with escapes, sometimes), sometimes not.
    fn text() -> impl proptest::strategy::Strategy<Value = Option<serde_json::Value>> {
        use proptest::prelude::*;
        use serde_json::json;
        prop_oneof![
            3 => Just(Some(json!("2026-05-01T00:00:00Z"))),
            2 => Just(Some(json!("r\"\u{e9}\\1"))),
            2 => Just(None),
            1 => Just(Some(json!(null))),
            1 => Just(Some(json!(7))),
            1 => Just(Some(json!([]))),
        ]
    }

    proptest::proptest! {
        /// The fold's borrowed reading gives what the `Value` reading gives, whenever it answers.
        #[test]
        fn the_fast_fold_agrees_with_the_value_fold(
            ty in proptest::sample::select(vec![
                "run.started", "model.called", "tool.invoked", "run.completed", "run.failed",
                "tool.refused", "command.received", "role.granted", "budget.exceeded",
            ]),
            time in text(), run_id in text(), tokens_in in number(), tokens_out in number(),
            cost in number(), extra in text(),
            data_shape in proptest::sample::select(vec![0u8, 0, 0, 0, 0, 0, 1, 2]),
            top_level_array in proptest::bool::weighted(0.1),
        ) {
            let mut data = serde_json::Map::new();
            for (k, v) in [("tokens_in", tokens_in), ("tokens_out", tokens_out),
                           ("cost_microcents", cost), ("other", extra.clone())] {
                if let Some(v) = v {
                    data.insert(k.into(), v);
                }
            }
            let mut event = serde_json::Map::new();
            event.insert("type".into(), ty.into());
            for (k, v) in [("time", time), ("run_id", run_id), ("seq", extra)] {
                if let Some(v) = v {
                    event.insert(k.into(), v);
                }
            }
            // Mostly an object; sometimes null, or an array of the same values (which a reading
            // by position would take for the fields).
            let data = match data_shape {
                0 => serde_json::Value::Object(data),
                1 => serde_json::Value::Null,
                _ => serde_json::Value::Array(data.into_iter().map(|(_, v)| v).collect()),
            };
            event.insert("data".into(), data);
            let event = if top_level_array {
                serde_json::Value::Array(event.into_iter().map(|(_, v)| v).collect())
            } else {
                serde_json::Value::Object(event)
            };
            let bytes = serde_json::to_vec(&event).unwrap();
            if let Some(fast) = fold_fast(&bytes) {
                proptest::prop_assert_eq!(fast, fold_value(&event));
            }
        }
    }

    proptest::proptest! {
        /// What the fold keeps of an event before it is placed is what it would read from the
        /// placed bytes: the fast reading for every event type (a batch that affects projections
        /// keeps all of its events), the bytes themselves for role events; and the fast reading
        /// answers for every one of them.
        #[test]
        fn prefold_reads_what_the_fold_reads_from_the_bytes(
            a in proptest::num::u64::ANY, b in proptest::num::u64::ANY,
            c in proptest::num::u64::ANY, secs in 0i64..253_402_300_799,
            seq in proptest::num::u64::ANY, text in "[a-z\"\\\n é]{0,12}",
        ) {
            let bodies = event::one_of_every_type(a, b, c, &text);
            let tenant = TenantId::generate();
            let env = Envelope::system(&tenant);
            let time = event::format_time(chrono::DateTime::from_timestamp(secs, 0).unwrap());
            for body in &bodies {
                let bytes = event::encode_unplaced(&env, body).place_at(seq, &time);
                let kept = Prefold::of(&env, body).placed(&time, &bytes);
                let expected = match fold_fast(&bytes) {
                    Some(f) => Kept::Folded(f),
                    None => {
                        proptest::prop_assert!(body.type_name().starts_with("role."));
                        Kept::Bytes(bytes.clone())
                    }
                };
                proptest::prop_assert_eq!(kept, expected, "{}", body.type_name());
            }
        }
    }

    #[test]
    fn the_fast_fold_answers_for_the_events_the_product_writes() {
        let started = br#"{"data":{"prompt_sha256":"ab"},"run_id":"R1","time":"2026-05-01T00:00:00.000000Z","type":"run.started"}"#;
        let called = br#"{"data":{"cost_microcents":5,"model":"m","tokens_in":3,"tokens_out":4},"run_id":"R1","time":"2026-06-01T00:00:00.000000Z","type":"model.called"}"#;
        for bytes in [&started[..], &called[..]] {
            let fast = fold_fast(bytes).expect("answers");
            assert_eq!(fast, fold_value(&serde_json::from_slice(bytes).unwrap()));
        }
        let fast = fold_fast(called).unwrap();
        assert_eq!(fast.usage.unwrap().1.tokens_out, 4);
        assert_eq!(
            fold_fast(started).unwrap().run,
            Some(("R1".into(), RunState::Running))
        );
        assert_eq!(
            fold_fast(br#"{"data":{},"time":"t","type":"role.granted"}"#),
            None
        );
    }
    use crate::config::AuditOptions;
    use crate::installation::{InstallSource, NewInstallation, Workspace};
    use secrecy::SecretString;

    /// Services over `dir` with one tenant, and that tenant's open log.
    async fn one_tenant(
        dir: &std::path::Path,
    ) -> (AuditLog, TenantContext, TenantStore, Arc<TenantLog>) {
        one_tenant_with(dir, segment_log::Options::default()).await
    }

    /// As [`one_tenant`], with these segment file options.
    async fn one_tenant_with(
        dir: &std::path::Path,
        segments: segment_log::Options,
    ) -> (AuditLog, TenantContext, TenantStore, Arc<TenantLog>) {
        let master = SecretString::from("42".repeat(32));
        let services = Services::open_with_segments(
            dir,
            Some(&master),
            &AuditOptions::default(),
            Default::default(),
            segments,
        )
        .unwrap();
        let install = NewInstallation {
            workspace: Workspace::slack_team(None, "T0LOCK").unwrap(),
            app_id: "A0TEST".into(),
            bot_user_id: None,
            bot_token: Some("xoxb-test".to_owned().into()),
            refresh_token: None,
            token_expires_at: None,
            scopes: vec![],
            installer: PrincipalId::qualified("slack", "U0OWNER").unwrap(),
            source: InstallSource::OAuth,
        };
        let tenant = services
            .tenants
            .install(install, "lock test", None)
            .await
            .unwrap()
            .tenant;
        let ctx = services.tenants.operator_context(&tenant).unwrap();
        let repo = services.store.for_tenant(&ctx).unwrap();
        let log = services
            .audit
            .log_for(ctx.tenant_id(), repo.clone())
            .await
            .unwrap();
        (services.audit, ctx, repo, log)
    }

    fn command() -> EventBody {
        EventBody::CommandReceived {
            platform: "slack".into(),
            kind: "slash_command".into(),
            text_sha256: "00".repeat(32),
        }
    }

    fn model(tokens: u64) -> EventBody {
        EventBody::ModelCalled {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            tokens_in: tokens,
            tokens_out: 1,
            cost_microcents: tokens * 3,
        }
    }

    fn tokens(repo: &TenantStore) -> u64 {
        let usage = repo.projections().usage().unwrap();
        usage.values().map(|m| m.tokens_in + m.tokens_out).sum()
    }

    fn inbox_len(log: &TenantLog) -> usize {
        log.inbox.lock().unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_left_while_the_lock_is_held_are_placed_when_it_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, ctx, repo, log) = one_tenant(dir.path()).await;
        let before = log.events.len();

        // A reader holds the lock (as a proof or a checkpoint would) while 64 appends arrive.
        let guard = log.lock_state().await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (audit, ctx, repo) = (audit.clone(), ctx.clone(), repo.clone());
            tasks.spawn(async move { audit.append_with(&ctx, repo, command()).await });
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while inbox_len(&log) < 64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("every append leaves its request in the inbox");
        assert!(
            tasks.try_join_next().is_none(),
            "nothing placed under a held lock"
        );
        assert_eq!(log.events.len(), before);

        // Letting the lock go places them all, in one dense run, without anyone queueing for it.
        drop(guard);
        let mut seqs = Vec::new();
        while let Some(done) = tokio::time::timeout(Duration::from_secs(10), tasks.join_next())
            .await
            .expect("every append completes")
        {
            seqs.push(done.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (before..before + 64).collect::<Vec<_>>());
        assert_eq!(inbox_len(&log), 0);
        assert_eq!(log.events.len(), before + 64);
    }

    /// tokio hands a released lock to the next queued waiter; if that waiter is dropped before it
    /// runs, an append that found the lock taken in between must still be placed.
    #[tokio::test(flavor = "current_thread")]
    async fn appends_left_to_a_waiter_that_went_away_are_placed() {
        use futures_util::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (audit, ctx, repo, log) = one_tenant(dir.path()).await;
        let before = log.events.len();

        let guard = log.lock_state().await;
        // A reader queues for the lock.
        let queued = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let _st = log.lock_state().await;
            })
        };
        tokio::task::yield_now().await;
        // The lock goes to the reader, which cannot run before this task yields (one thread).
        drop(guard);
        // An append arrives now: the lock is the reader's, so it leaves its request and waits.
        let mut append = Box::pin(audit.append_with(&ctx, repo, command()));
        assert!((&mut append).now_or_never().is_none());
        assert_eq!(inbox_len(&log), 1);
        // The reader goes away without running.
        queued.abort();
        let seq = tokio::time::timeout(Duration::from_secs(5), append)
            .await
            .expect("the append is placed although the waiter left")
            .unwrap();
        assert_eq!(seq, before);
        assert!(queued.await.unwrap_err().is_cancelled());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_event_is_refused_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, ctx, repo, log) = one_tenant(dir.path()).await;
        let before = log.events.len();
        let huge = EventBody::RoleGranted {
            principal: "x".repeat(log.events.max_record_bytes() as usize),
            role: "member".into(),
        };
        let err = audit
            .append_with(&ctx, repo.clone(), huge)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::Segment(segment_log::Error::RecordTooLarge { .. })
            ),
            "{err:?}"
        );
        // Nothing was appended, the sequence number was not spent, and the log is not broken.
        assert_eq!(log.events.len(), before);
        assert_eq!(
            audit.append_with(&ctx, repo, command()).await.unwrap(),
            before
        );
    }

    /// A segment limit raised past what the bundle verifier reads does not let through an event
    /// that no export of it could pass.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_event_is_taken_that_a_bundle_could_not_carry() {
        let dir = tempfile::tempdir().unwrap();
        let segments = segment_log::Options {
            max_record_bytes: 64 << 20,
            ..segment_log::Options::default()
        };
        let (audit, ctx, repo, log) = one_tenant_with(dir.path(), segments).await;
        let before = log.events.len();
        let huge = EventBody::RoleGranted {
            principal: "x".repeat(super::super::bundle::MAX_LINE_BYTES),
            role: "member".into(),
        };
        let err = audit
            .append_with(&ctx, repo.clone(), huge)
            .await
            .unwrap_err();
        let AuditError::Segment(segment_log::Error::RecordTooLarge { max, .. }) = err else {
            panic!("{err:?}");
        };
        assert_eq!(max as usize, super::super::bundle::MAX_LINE_BYTES);
        assert_eq!(log.events.len(), before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_dropped_before_it_is_placed_is_not_appended() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, ctx, repo, log) = one_tenant(dir.path()).await;
        let before = log.events.len();

        let guard = log.lock_state().await;
        let mut append = Box::pin(audit.append_with(&ctx, repo.clone(), command()));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut append)
                .await
                .is_err(),
            "the append waits for the lock's holder"
        );
        assert_eq!(inbox_len(&log), 1);
        drop(append);
        drop(guard);
        assert_eq!(inbox_len(&log), 0, "the holder let the request go");
        assert_eq!(log.events.len(), before, "and did not append it");
        // The next append takes the sequence number the dropped one would have had.
        assert_eq!(
            audit.append_with(&ctx, repo, command()).await.unwrap(),
            before
        );
    }

    /// Many appenders at once, some of whose events affect the projections and some not: whoever
    /// folds takes the others' kept events from memory and reads the rest from the files, and the
    /// live projections come out as a replay of the whole log computes them, with nothing left
    /// kept once all is folded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_folds_agree_with_a_replay_and_keep_nothing_back() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments, so that batches are split by rolls and some folds end inside one.
        let segments = segment_log::Options {
            segment_bytes: 1500,
            ..segment_log::Options::default()
        };
        let (audit, ctx, repo, log) = one_tenant_with(dir.path(), segments).await;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..32u64 {
            let (audit, ctx, repo) = (audit.clone(), ctx.clone(), repo.clone());
            tasks.spawn(async move {
                for i in 0..20u64 {
                    if (t + i) % 3 == 0 {
                        audit.append_with(&ctx, repo.clone(), command()).await?;
                    } else {
                        let batch = [command(), model(t * 100 + i), model(1)];
                        audit.append_batch_with(&ctx, repo.clone(), &batch).await?;
                    }
                }
                Ok::<_, AuditError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
        assert_eq!(
            audit.replay(&ctx, repo.clone()).await.unwrap(),
            Vec::<String>::new()
        );
        let expected: u64 = (0..32u64)
            .flat_map(|t| (0..20u64).map(move |i| (t, i)))
            .filter(|(t, i)| (t + i) % 3 != 0)
            .map(|(t, i)| t * 100 + i + 1 + 2)
            .sum();
        assert_eq!(tokens(&repo), expected);
        assert!(log.unfolded.lock().unwrap().is_empty());
    }

    /// An append that fails after it was placed (here its writer panics on it) takes its kept
    /// bytes out of the map, so that no fold could take them for what the files hold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_that_fails_after_it_was_placed_leaves_no_kept_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, ctx, repo, log) = one_tenant(dir.path()).await;
        audit
            .append_batch_with(&ctx, repo.clone(), &[model(4)])
            .await
            .unwrap();
        let before = (log.events.len(), tokens(&repo));
        let marker = String::from_utf8(segment_log::tests::PANIC_PAYLOAD.to_vec()).unwrap();
        let doomed = EventBody::ModelCalled {
            provider: "openai".into(),
            model: marker,
            tokens_in: 100,
            tokens_out: 1,
            cost_microcents: 1,
        };
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            audit.append_batch_with(&ctx, repo.clone(), &[command(), doomed]),
        )
        .await
        .expect("the failed append is answered")
        .unwrap_err();
        assert!(matches!(err, AuditError::Segment(_)), "{err:?}");
        assert!(log.unfolded.lock().unwrap().is_empty());
        assert_eq!((log.events.len(), tokens(&repo)), before);
    }

    /// An append whose caller stops waiting before it is durable takes its kept bytes out of the
    /// map; its events, durable all the same, are folded from the files by the next fold.
    #[tokio::test(flavor = "current_thread")]
    async fn an_append_whose_caller_goes_away_leaves_no_kept_bytes() {
        use futures_util::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (audit, ctx, repo, log) = one_tenant(dir.path()).await;
        let before = tokens(&repo);
        let batch = [command(), model(7)];
        // One poll places the events and waits for their sync, which this thread cannot see
        // answered before it polls again.
        assert!(audit
            .append_batch_with(&ctx, repo.clone(), &batch)
            .now_or_never()
            .is_none());
        assert!(log.unfolded.lock().unwrap().is_empty());
        audit
            .append_batch_with(&ctx, repo.clone(), &[model(5)])
            .await
            .unwrap();
        assert_eq!(tokens(&repo), before + 8 + 6);
        assert_eq!(
            audit.replay(&ctx, repo.clone()).await.unwrap(),
            Vec::<String>::new()
        );
        assert!(log.unfolded.lock().unwrap().is_empty());
    }
}
