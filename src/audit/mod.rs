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
    /// The thread writing an export bundle stopped without an answer (it panicked).
    #[error("the export's writer stopped: {0}")]
    ExportWriter(String),
    /// The events are durable, but what follows an append (folding them into the projections,
    /// signing a checkpoint that came due) failed. The events' effects may be taken as recorded;
    /// the projections and the checkpoint catch up at a later append or interval.
    #[error("recorded, but what follows the append failed: {0}")]
    AfterDurable(Box<AuditError>),
    /// A log does not agree with itself after a restart (its tree, its checkpoint or its records).
    #[error("audit log of tenant {tenant} cannot be recovered: {why}")]
    Recovery {
        /// The tenant.
        tenant: String,
        /// What disagrees.
        why: String,
    },
}

/// An append's outcome for a caller whose effect must follow its record once the record is on
/// disk: an append whose events are durable counts as done even when what follows it failed
/// ([`AuditError::AfterDurable`], logged here), so that the effect is not left out while the
/// log says it happened.
///
/// # Errors
/// Any other [`AuditError`]: the events are not on record.
pub fn on_record(appended: Result<u64, AuditError>, what: &str) -> Result<(), AuditError> {
    match appended {
        Ok(_) => Ok(()),
        Err(AuditError::AfterDurable(e)) => {
            tracing::warn!(error = %e, what, "recorded, but what follows the append failed");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Where events go. An append returns only once the event is durable; its sequence number is returned.
#[async_trait::async_trait]
pub trait AuditSink: Send + Sync {
    /// Appends one event to the context's tenant log.
    ///
    /// # Errors
    /// [`AuditError`] when the event could not be made durable; the caller must not perform the effect.
    async fn append(&self, ctx: &TenantContext, body: EventBody) -> Result<u64, AuditError>;

    /// Appends consecutive events to the context's tenant log, committed together (one sync for
    /// all), and returns their sequence numbers once all are durable.
    ///
    /// The default appends them one by one, which is always correct (other events may then come
    /// between them, so the range spans from the first to the last).
    ///
    /// # Errors
    /// [`AuditError`] when they could not be made durable; the caller must not perform the effects.
    async fn append_batch(
        &self,
        ctx: &TenantContext,
        bodies: &[EventBody],
    ) -> Result<std::ops::Range<u64>, AuditError> {
        let mut range: Option<std::ops::Range<u64>> = None;
        for body in bodies {
            let seq = self.append(ctx, body.clone()).await?;
            range = Some(range.map_or(seq..seq + 1, |r| r.start..seq + 1));
        }
        Ok(range.unwrap_or(0..0))
    }
}
