//! A run's checkpoint: everything needed to resume it after a crash from its last step, stored per
//! (tenant, run id) after every step.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

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
    pub messages: Transcript,
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
    /// Where its answer goes, in the clear, as checkpoints written before reply targets were
    /// sealed keep it; read for those, never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<serde_json::Value>,
    /// Where its answer goes, written by the transport that accepted the command, sealed by the
    /// store for this tenant and run (`RunRepo::seal_reply`): it holds reply credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_sealed: Option<String>,
    /// The sequence number of the last event this run appended before this checkpoint. A run
    /// resumed after it reached its end looks for its end event only after this point.
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// The last log position whose usage a resume counted into `usage` from events after
    /// `last_seq` (a call in flight at a crash, a step the checkpoint did not know of), so that a
    /// later resume does not count them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_through: Option<u64>,
}

/// A run's messages, which only ever grow, with their JSON kept as they are added: a run is
/// checkpointed after every step, and serialising its whole transcript again each time made the
/// cost of a step grow with the run (string escaping of every earlier tool result; 9% of the agent
/// loop's CPU at 8 concurrent ten-call runs). Checkpoints are JSON: serialised any other way, the
/// messages come out as serde_json's raw-value marker.
#[derive(Default)]
pub struct Transcript {
    messages: Vec<Message>,
    /// The JSON of each message serialised so far (a prefix of `messages`), and its digest.
    json: std::sync::Mutex<Kept>,
}

/// A transcript's messages serialised so far, and the SHA-256 of the JSON array they open (`[`,
/// then the messages with `,` between them), kept as they are added so that the hash of the
/// transcript sent with each model call costs only its new messages.
#[derive(Clone)]
struct Kept {
    raw: Vec<Box<RawValue>>,
    digest: Sha256,
}

impl Default for Kept {
    fn default() -> Self {
        let mut digest = Sha256::new();
        digest.update(b"[");
        Kept {
            raw: Vec::new(),
            digest,
        }
    }
}

impl Transcript {
    /// Adds a message at the end (the only change a transcript takes).
    pub fn push(&mut self, m: Message) {
        self.messages.push(m);
    }

    /// The messages, oldest first.
    pub fn as_slice(&self) -> &[Message] {
        &self.messages
    }

    /// The JSON of every message, serialising only those added since the last call. Why one
    /// raw value a message and not one joined array: `RawValue::from_string` parses what it is
    /// given again to check it, and the joined array was copied each time (together 3% of the
    /// loop's CPU at 8 runs); `to_raw_value` wraps what serde_json itself just wrote.
    fn json(&self) -> Result<std::sync::MutexGuard<'_, Kept>, serde_json::Error> {
        let mut kept = self
            .json
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let done = kept.raw.len();
        for m in &self.messages[done..] {
            let raw = serde_json::value::to_raw_value(m)?;
            if !kept.raw.is_empty() {
                kept.digest.update(b",");
            }
            kept.digest.update(raw.get().as_bytes());
            kept.raw.push(raw);
        }
        Ok(kept)
    }

    /// The SHA-256, in hex, of the transcript's JSON (exactly what a checkpoint stores as the
    /// run's `messages`): what `model.requested` records of the prompt.
    ///
    /// # Errors
    /// When a message cannot be serialised (it always can: they are strings and JSON values).
    pub fn sha256_hex(&self) -> Result<String, serde_json::Error> {
        let kept = self.json()?;
        let mut digest = kept.digest.clone();
        digest.update(b"]");
        Ok(hex::encode(digest.finalize()))
    }
}

impl std::fmt::Debug for Transcript {
    // The messages only: the kept JSON says the same again.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.messages).finish()
    }
}

impl From<Vec<Message>> for Transcript {
    fn from(messages: Vec<Message>) -> Self {
        Transcript {
            messages,
            json: Default::default(),
        }
    }
}

impl std::ops::Deref for Transcript {
    type Target = [Message];

    fn deref(&self) -> &[Message] {
        &self.messages
    }
}

impl Clone for Transcript {
    fn clone(&self) -> Self {
        let json = self
            .json
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Transcript {
            messages: self.messages.clone(),
            json: std::sync::Mutex::new(json),
        }
    }
}

impl PartialEq for Transcript {
    fn eq(&self, other: &Self) -> bool {
        self.messages == other.messages
    }
}

impl Serialize for Transcript {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let kept = self.json().map_err(serde::ser::Error::custom)?;
        s.collect_seq(kept.raw.iter())
    }
}

impl<'de> Deserialize<'de> for Transcript {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Message>::deserialize(d).map(Transcript::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(i: usize) -> Message {
        Message::Tool {
            call_id: format!("c{i}"),
            name: "budget.status".into(),
            content: format!("{{\"left\": {i}, \"note\": \"quote \\\" and \\\\ and \\n\"}}"),
        }
    }

    /// Serialised after every push, the kept JSON gives exactly what serialising the messages
    /// afresh gives, and a clone grows on its own.
    #[test]
    fn the_kept_json_is_the_messages_json_after_every_push() {
        let mut t = Transcript::from(vec![Message::User { text: "hi".into() }]);
        let fresh = |t: &Transcript| serde_json::to_string(t.as_slice()).unwrap();
        let hashed = |t: &Transcript| hex::encode(Sha256::digest(fresh(t).as_bytes()));
        assert_eq!(serde_json::to_string(&t).unwrap(), fresh(&t));
        assert_eq!(t.sha256_hex().unwrap(), hashed(&t));
        for i in 0..5 {
            t.push(Message::Assistant {
                text: None,
                tool_calls: vec![ToolCall {
                    id: format!("c{i}"),
                    name: "budget.status".into(),
                    arguments: serde_json::json!({"i": i}),
                }],
            });
            // Hashed between the two pushes too, so the digest is taken of a transcript whose
            // JSON was kept only in part.
            assert_eq!(t.sha256_hex().unwrap(), hashed(&t), "after {i}");
            t.push(tool(i));
            assert_eq!(serde_json::to_string(&t).unwrap(), fresh(&t), "after {i}");
            assert_eq!(t.sha256_hex().unwrap(), hashed(&t), "after {i}");
        }
        let mut other = t.clone();
        other.push(tool(99));
        assert_eq!(serde_json::to_string(&other).unwrap(), fresh(&other));
        assert_eq!(other.sha256_hex().unwrap(), hashed(&other));
        assert_eq!(t.sha256_hex().unwrap(), hashed(&t));
        assert_eq!(serde_json::to_string(&t).unwrap(), fresh(&t));
        assert_ne!(other, t);
        let back: Transcript =
            serde_json::from_str(&serde_json::to_string(&other).unwrap()).unwrap();
        assert_eq!(back, other);
        assert_eq!(serde_json::to_string(&back).unwrap(), fresh(&other));
        // Empty, too.
        let empty = Transcript::default();
        assert_eq!(serde_json::to_string(&empty).unwrap(), "[]");
        assert_eq!(empty.sha256_hex().unwrap(), hashed(&empty));
    }
}
