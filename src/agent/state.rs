//! A run's checkpoint: everything needed to resume it after a crash from its last step, stored per
//! (tenant, run id) after every step.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::budget::RunUsage;
use super::planner::{Message, ToolCall};

/// Where a run stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Still going.
    Running,
    /// Answered.
    Completed {
        /// The answer.
        answer: String,
    },
    /// Stopped by a budget or quota.
    Stopped {
        /// The message for the user.
        message: String,
    },
    /// Failed (a provider error, too many steps).
    Failed {
        /// The message for the user.
        message: String,
    },
}

/// The checkpoint of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Record version.
    pub v: u32,
    /// The run id.
    pub run_id: String,
    /// Who runs it.
    pub principal: String,
    /// The conversation it belongs to.
    pub conversation: String,
    /// The platform's request id.
    pub correlation_id: Option<String>,
    /// When it started (wall time ceilings count from here, across restarts).
    pub started_at: DateTime<Utc>,
    /// The user's text for this run.
    pub text: String,
    /// The transcript: history, this turn, and everything planned and called since.
    pub messages: Vec<Message>,
    /// Planning steps taken.
    pub step: u32,
    /// Tool calls of the current step still to make.
    pub pending: Vec<ToolCall>,
    /// The index into `pending` of the next call.
    pub next_call: usize,
    /// The idempotency key of a call that was started and not finished: after a crash it is not
    /// sent again (the receiver may have acted on it), and the planner is told its outcome is unknown.
    pub in_flight: Option<String>,
    /// What the run used.
    pub usage: RunUsage,
    /// Where it stands.
    pub status: Status,
    /// Where its answer goes, written by the transport that accepted the command.
    #[serde(default)]
    pub reply_to: Option<serde_json::Value>,
    /// The sequence number of the last event this run appended before this checkpoint. A run
    /// resumed after it reached its end looks for its end event only after this point.
    #[serde(default)]
    pub last_seq: Option<u64>,
}
