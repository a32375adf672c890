//! Transports: the only code that knows Slack or Discord wire formats. Each adapter verifies a
//! request's signature on its raw bytes, resolves the workspace to a `TenantContext`, records the
//! command, hands its text to the agent loop and delivers the reply back to its platform.

pub mod discord;
pub mod install_state;
pub mod retry;
pub mod slack;

use std::sync::Arc;

use serde_json::Value;

use sha2::{Digest, Sha256};

use crate::agent::{Agent, CommandOnRecord, ReplySink, RunOutcome, RunRequest};
use crate::audit::{AuditError, AuditSink, EventBody};
use crate::store::{SeenClaim, Store, StoreError};
use crate::tenant::TenantContext;

/// Why a command with a platform request id was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Whether the request was seen before could not be read or recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The command could not be recorded; it may be sent again.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Whether an earlier delivery's command was recorded could not be read from the log.
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
}

/// What [`accept_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The command was recorded and is running.
    Started,
    /// The platform's request id was seen before (a retry, a redelivery or a replay): nothing ran.
    AlreadySeen,
    /// The request id is being recorded by an earlier delivery in this process, which may still
    /// fail: nothing ran, and a platform that retries should be asked to retry again later.
    InFlight,
}

/// How long a platform request id is remembered, in seconds. A signed request is accepted for
/// five minutes, Slack retries an event for about an hour at most, and the Discord Gateway
/// replays only what a resumed session missed; a day covers all of them with room to spare, and
/// after it an id is forgotten (the gateway's sweeper), so that the record does not grow with
/// every command ever received.
pub const SEEN_TTL_SECS: i64 = 24 * 60 * 60;

/// Platform request ids seen before, per tenant, as the store's durable record (`DedupeRepo`)
/// keeps them. An id whose command could not be recorded after it was marked is forgotten again,
/// durably, so that the platform's retry is not taken for a duplicate of a command that never ran
/// (before or after a restart).
///
/// The ids whose first delivery is still being recorded are also known to this process, so that a
/// retry arriving meanwhile is told to come back (the first may yet fail and be released) rather
/// than taken for a duplicate.
#[derive(Clone)]
pub struct Dedupe {
    store: Store,
    in_flight: Arc<std::sync::Mutex<std::collections::HashSet<(crate::tenant::TenantId, String)>>>,
}

/// What claiming a request id found.
enum Claim {
    /// The first delivery: it is this caller's to record.
    First,
    /// Recorded before.
    Seen,
    /// Being recorded by an earlier delivery right now.
    InFlight,
    /// Claimed by an earlier delivery that is no longer in flight here and did not confirm its
    /// record (the process died in between), when the log held `log_size` events. Now in flight
    /// for this caller, which finds out whether that command was recorded.
    Unconfirmed {
        /// The log's size at that claim.
        log_size: u64,
    },
}

impl Dedupe {
    /// Ids seen before, as recorded in `store`.
    pub fn new(store: Store) -> Self {
        Dedupe {
            store,
            in_flight: Arc::default(),
        }
    }

    /// Claims `key` in the context's tenant, whose log holds `log_size` events: first the first
    /// time, or when it was released since.
    fn claim(&self, ctx: &TenantContext, key: &str, log_size: u64) -> Result<Claim, StoreError> {
        // Marked in flight before the store is asked, so that a first delivery is in flight
        // before anyone else can find its id seen; unmarked again if it was not the first.
        let fresh = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((ctx.tenant_id().clone(), key.to_owned()));
        if !fresh {
            return Ok(Claim::InFlight);
        }
        let found = self
            .store
            .for_tenant(ctx)
            .and_then(|repo| repo.dedupe().claim(key, log_size));
        let claim = match found {
            Ok(SeenClaim::First) => Claim::First,
            Ok(SeenClaim::Pending { log_size }) => Claim::Unconfirmed { log_size },
            Ok(SeenClaim::Recorded) => Claim::Seen,
            Err(e) => {
                self.settle(ctx, key);
                return Err(e);
            }
        };
        if matches!(claim, Claim::Seen) {
            self.settle(ctx, key);
        }
        Ok(claim)
    }

    /// Marks `key` as recorded (its command is on record). If that fails, the claim stays
    /// pending, and a later delivery looks for the command in the log.
    fn confirm(&self, ctx: &TenantContext, key: &str) {
        let confirmed = self
            .store
            .for_tenant(ctx)
            .and_then(|repo| repo.dedupe().confirm(key));
        if let Err(e) = confirmed {
            tracing::warn!(tenant = %ctx.tenant_id(), error = %e, "could not confirm a recorded request id; a retry of it looks in the log");
        }
    }

    /// The first delivery of `key` is recorded, or released: no longer in flight.
    fn settle(&self, ctx: &TenantContext, key: &str) {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(ctx.tenant_id().clone(), key.to_owned()));
    }

    /// Lets a claimed key be claimed once more. If even that fails, the platform's retry is
    /// acknowledged without running; the failure is logged for the operator.
    fn release(&self, ctx: &TenantContext, key: &str) {
        let forgotten = self
            .store
            .for_tenant(ctx)
            .and_then(|repo| repo.dedupe().forget(key));
        if let Err(e) = forgotten {
            tracing::error!(tenant = %ctx.tenant_id(), error = %e, "could not release a request id whose command was not recorded; a retry of it will not run");
        }
    }
}

/// As [`accept`], at most once per platform request id `key` (an event id, a trigger id, an
/// interaction or message id): a request whose id was seen before runs nothing. When the command
/// cannot be recorded, its id is released, so that the platform's retry of it can still run.
///
/// # Errors
/// [`AcceptError`]; then nothing runs and the caller must not acknowledge it as accepted.
pub async fn accept_once(
    seen: &Dedupe,
    key: &str,
    sink: &Arc<dyn AuditSink>,
    agent: &Agent,
    ctx: TenantContext,
    cmd: Command,
    reply_to: Value,
) -> Result<Accepted, AcceptError> {
    let log_size = agent.log_size(&ctx).await?;
    let unconfirmed = match seen.claim(&ctx, key, log_size)? {
        Claim::First => None,
        Claim::Seen => return Ok(Accepted::AlreadySeen),
        Claim::InFlight => return Ok(Accepted::InFlight),
        Claim::Unconfirmed { log_size } => Some(log_size),
    };
    // Until the command is on record the id is this delivery's; however this ends (an error, a
    // panic, the task dropped), the guard gives it back, so a retry can run it. An earlier
    // delivery's pending claim is given back only once the log shows its command never ran.
    let mut claimed = Claimed {
        seen,
        ctx: ctx.clone(),
        key,
        recorded: false,
        release: unconfirmed.is_none(),
    };
    if let Some(from) = unconfirmed {
        // An earlier delivery claimed the id and died before confirming its record. Its command
        // ran if the log shows its run beginning after the claim; recorded but never begun (the
        // process died in between), or not recorded, it is this delivery's to record and run. A
        // request without a correlation id cannot be looked for, and is taken as run.
        let on_record = match ctx.audit().correlation_id.as_ref() {
            Some(c) => {
                agent
                    .command_on_record_since(&ctx, from, c.as_str())
                    .await?
            }
            None => CommandOnRecord::Started,
        };
        if on_record == CommandOnRecord::Started {
            seen.confirm(&ctx, key);
            claimed.recorded = true;
            return Ok(Accepted::AlreadySeen);
        }
        claimed.release = true;
    }
    accept(sink, agent, ctx.clone(), cmd, reply_to).await?;
    // Confirmed while still in flight, so that no retry meanwhile finds it pending.
    seen.confirm(&ctx, key);
    claimed.recorded = true;
    Ok(Accepted::Started)
}

/// A delivery's hold on its request id: on drop the id is no longer in flight, and unless its
/// command was recorded, it is released in the store as well (if `release`: not while the log is
/// still to say whether an earlier delivery's command ran).
struct Claimed<'a> {
    seen: &'a Dedupe,
    ctx: TenantContext,
    key: &'a str,
    recorded: bool,
    release: bool,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.release {
            self.seen.release(&self.ctx, self.key);
        }
        self.seen.settle(&self.ctx, self.key);
    }
}

/// The time, injectable so that signature freshness can be tested with published examples.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        chrono::Utc::now().timestamp()
    }
}

/// A clock stopped at one instant, for tests.
#[derive(Clone, Copy, Debug)]
pub struct FixedClock(pub i64);

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        self.0
    }
}

/// A command a transport received, in neutral form.
#[derive(Clone, Debug)]
pub struct Command {
    /// The platform, as audited (`slack`, `discord`).
    pub platform: &'static str,
    /// The kind of request (`slash_command`, `app_mention`, `mention`, `interaction`).
    pub kind: &'static str,
    /// The user's text.
    pub text: String,
    /// The conversation it belongs to, e.g. `slack:C024BE91L` or `slack:C024BE91L:1700000000.000100`.
    pub conversation: String,
}

/// Records the command in the tenant's log (durable before the caller acknowledges it), then runs
/// it in the background; the answer goes to `reply_to` through the agent's reply sink, also if the
/// run only finishes after a restart.
///
/// # Errors
/// [`AuditError`] when the command could not be recorded; then nothing runs and the caller must not
/// acknowledge it as accepted.
pub async fn accept(
    sink: &Arc<dyn AuditSink>,
    agent: &Agent,
    ctx: TenantContext,
    cmd: Command,
    reply_to: Value,
) -> Result<(), AuditError> {
    let recorded = sink
        .append(
            &ctx,
            EventBody::CommandReceived {
                platform: cmd.platform.into(),
                kind: cmd.kind.into(),
                text_sha256: hex::encode(Sha256::digest(cmd.text.as_bytes())),
            },
        )
        .await;
    // On record even if what follows the append failed: the command runs, and its id stays
    // claimed, or the platform's retry would record and run it a second time.
    crate::audit::on_record(recorded, "command.received")?;
    let agent = agent.clone();
    tokio::spawn(async move {
        let text = if cmd.text.trim().is_empty() {
            "help".to_owned()
        } else {
            cmd.text
        };
        let req = RunRequest {
            text,
            conversation: cmd.conversation,
        };
        if let Err(e) = agent
            .run_with_reply(&ctx, req, Some(reply_to.clone()))
            .await
        {
            tracing::error!(tenant = %ctx.tenant_id(), run = %ctx.audit().run_id, error = %e, "run failed");
            let failed = RunOutcome::Failed(
                "Something went wrong on our side; the command was not completed.".into(),
            );
            agent.deliver(&ctx, &reply_to, &failed).await;
        }
    });
    Ok(())
}

/// Delivers answers for every configured platform; set as the agent's reply sink at start.
pub struct Replies {
    /// Slack, when configured.
    pub slack: Option<slack::SlackState>,
    /// Discord, when configured.
    pub discord: Option<discord::DiscordState>,
}

#[async_trait::async_trait]
impl ReplySink for Replies {
    async fn deliver(&self, ctx: &TenantContext, target: &Value, outcome: &RunOutcome) {
        let delivered = match target["platform"].as_str() {
            Some("slack") => match &self.slack {
                Some(s) => slack::deliver(s, ctx, target, outcome.text()).await,
                None => Err("Slack is not configured".to_owned()),
            },
            Some("discord") => match &self.discord {
                Some(d) => discord::deliver(d, target, outcome.text()).await,
                None => Err("Discord is not configured".to_owned()),
            },
            _ => Err("the reply target names no platform".to_owned()),
        };
        if let Err(e) = delivered {
            tracing::warn!(tenant = %ctx.tenant_id(), run = %ctx.audit().run_id, error = %e, "an answer could not be delivered");
        }
    }
}
