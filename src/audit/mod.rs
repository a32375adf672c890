//! The audit trail: the closed set of events and the sink every event goes through.
//!
//! Every caller appends through [`AuditSink`], which takes the [`TenantContext`] first so that an event
//! always lands in its own tenant's log: [`log::LogSink`] over [`log::AuditLog`], one durable,
//! Merkle-verified log per tenant with signed checkpoints. [`bundle`] exports a range for regulators
//! and verifies such an export offline.

pub mod bundle;
pub mod canonical;
pub mod checkpoint;
pub mod event;
pub mod keys;
pub mod log;
pub mod merkle;
pub mod nodes;
pub mod projection;
pub mod segment_log;

pub use event::{EventBody, RunTotals};

use crate::store::StoreError;
use crate::tenant::TenantContext;

/// Why an event could not be made durable, or a log could not be read. When an append fails the
/// effect it records must not happen.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store (tree index, tenant records) failed.
    #[error("audit storage: {0}")]
    Store(#[from] StoreError),
    /// The Merkle node index could not be read or written.
    #[error("audit node index: {0}")]
    Nodes(#[from] std::io::Error),
    /// The durable segment log failed.
    #[error("audit segment log: {0}")]
    Segment(#[from] segment_log::Error),
    /// The Merkle tree could not be read or extended.
    #[error("audit tree: {0}")]
    Tree(#[from] merkle::TreeError),
    /// A checkpoint could not be signed or read.
    #[error("audit checkpoint: {0}")]
    Checkpoint(String),
    /// The signing key or the keyring could not be had.
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    /// An export was asked for something the log cannot give (a range beyond it, a foreign
    /// earlier checkpoint).
    #[error("export: {0}")]
    Export(String),
    /// The export bundle could not be written.
    #[error(transparent)]
    Bundle(#[from] bundle::WriteError),
    /// A log does not agree with itself after a restart (its tree, its checkpoint or its records).
    #[error("audit log of tenant {tenant} cannot be recovered: {why}")]
    Recovery {
        /// The tenant.
        tenant: String,
        /// What disagrees.
        why: String,
    },
}

/// Where events go. An append returns only once the event is durable; its sequence number is returned.
#[async_trait::async_trait]
pub trait AuditSink: Send + Sync {
    /// Appends one event to the context's tenant log.
    ///
    /// # Errors
    /// [`AuditError`] when the event could not be made durable; the caller must not perform the effect.
    async fn append(&self, ctx: &TenantContext, body: EventBody) -> Result<u64, AuditError>;

    /// Queues one event and returns before it is durable, for an event whose effect has already
    /// happened inside the process and is not acknowledged to anyone yet: the caller must wait for
    /// it ([`Deferred::durable`]) before any effect that leaves the process. Events of a tenant are
    /// committed in order, so waiting for the last one covers all before it.
    ///
    /// The default waits at once, which is always correct.
    ///
    /// # Errors
    /// [`AuditError`] when the event could not be queued.
    async fn append_deferred(
        &self,
        ctx: &TenantContext,
        body: EventBody,
    ) -> Result<Deferred, AuditError> {
        self.append(ctx, body).await.map(Deferred::ready)
    }
}

/// A queued event that is not yet known to be durable; see [`AuditSink::append_deferred`].
/// Dropping it does not withdraw the event: it is still committed, only nobody waits for it.
#[must_use = "an effect that leaves the process must wait for the event to be durable"]
pub struct Deferred {
    seq: u64,
    wait: Option<Settling>,
}

/// What a [`Deferred`] waits on: the sync, the projection fold and a checkpoint if one is due.
type Settling =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, AuditError>> + Send>>;

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("seq", &self.seq)
            .field("waiting", &self.wait.is_some())
            .finish()
    }
}

impl Deferred {
    /// An event that is durable already.
    pub fn ready(seq: u64) -> Self {
        Deferred { seq, wait: None }
    }

    /// An event that is durable once `wait` resolves.
    pub fn new(
        seq: u64,
        wait: impl std::future::Future<Output = Result<u64, AuditError>> + Send + 'static,
    ) -> Self {
        Deferred {
            seq,
            wait: Some(Box::pin(wait)),
        }
    }

    /// The event's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits until the event is durable.
    ///
    /// # Errors
    /// [`AuditError`] when it could not be made durable.
    pub async fn durable(self) -> Result<u64, AuditError> {
        match self.wait {
            Some(w) => w.await,
            None => Ok(self.seq),
        }
    }
}
