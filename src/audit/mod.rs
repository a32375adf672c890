//! The audit trail: the closed set of events and the sink every event goes through.
//!
//! Every caller appends through [`AuditSink`], which takes the [`TenantContext`] first so that an event
//! always lands in its own tenant's log. [`StoreSink`] is the interim sink over the store's per-tenant
//! event list; the per-tenant Merkle log implements the same trait.

pub mod checkpoint;
pub mod event;
pub mod merkle;

use std::sync::Arc;

use chrono::Utc;

pub use event::{EventBody, RunTotals};

use crate::store::{Store, StoreError};
use crate::tenant::TenantContext;

/// Why an event could not be made durable. The effect it records must then not happen.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The underlying storage failed.
    #[error("audit storage: {0}")]
    Store(#[from] StoreError),
}

/// Where events go. An append returns only once the event is stored; its sequence number is returned.
#[async_trait::async_trait]
pub trait AuditSink: Send + Sync {
    /// Appends one event to the context's tenant log.
    ///
    /// # Errors
    /// [`AuditError`] when the event could not be stored; the caller must not perform the effect.
    async fn append(&self, ctx: &TenantContext, body: EventBody) -> Result<u64, AuditError>;
}

/// The interim sink: events in the store's per-tenant event list, in their canonical encoding.
#[derive(Clone, Debug)]
pub struct StoreSink {
    store: Store,
}

impl StoreSink {
    /// A sink over `store`.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(StoreSink { store })
    }
}

#[async_trait::async_trait]
impl AuditSink for StoreSink {
    async fn append(&self, ctx: &TenantContext, body: EventBody) -> Result<u64, AuditError> {
        let now = Utc::now();
        let repos = self.store.for_tenant(ctx)?;
        let seq = repos
            .events()
            .append(&|seq| event::encode(ctx, seq, now, &body))?;
        Ok(seq)
    }
}
