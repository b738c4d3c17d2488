//! Job events: the ordered, per-job log streamed to clients over WebSocket and SSE.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::job::{JobError, JobStatus};

/// Event types emitted by the spine. Types are open: later issues add more (`stdout`, ...),
/// and clients ignore the ones they do not know.
pub mod types {
    /// A status transition; a new attempt announces itself with `{"status":"running","attempt":n}`.
    pub const STATUS: &str = "status";
    /// Streamed output (LLM tokens): `{"text": "..."}`.
    pub const OUTPUT_DELTA: &str = "output.delta";
    /// A completed tool call of an LLM reply:
    /// `{"index", "id", "type": "function", "function": {"name", "arguments"}}`.
    pub const OUTPUT_TOOL_CALL: &str = "output.tool_call";
    /// Output of a `code.exec` program while it runs: `{"text": "..."}`.
    pub const STDOUT: &str = "stdout";
    pub const STDERR: &str = "stderr";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    /// Sent instead of history when the history is gone: re-read `GET /v1/jobs/{id}`.
    pub const RESET: &str = "reset";
}

/// One event of a job. `seq` starts at 1 and grows by one per event of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub job_id: Uuid,
    pub seq: u64,
    pub attempt: i32,
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub data: Value,
    /// When the event was published (worker clock).
    pub ts: DateTime<Utc>,
}

impl Event {
    pub fn new(job_id: Uuid, seq: u64, attempt: i32, kind: &str, data: Value) -> Self {
        Event {
            job_id,
            seq,
            attempt,
            kind: kind.to_string(),
            data,
            ts: Utc::now(),
        }
    }

    pub fn is_terminal(&self) -> bool {
        is_terminal_type(&self.kind)
    }

    pub fn status(job_id: Uuid, seq: u64, attempt: i32, status: JobStatus, extra: Value) -> Self {
        let mut data = serde_json::json!({ "status": status.as_str(), "attempt": attempt });
        if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
            d.extend(e);
        }
        Event::new(job_id, seq, attempt, types::STATUS, data)
    }

    /// The terminal event for a finished job, built from its durable state.
    pub fn terminal(
        job_id: Uuid,
        seq: u64,
        attempt: i32,
        status: JobStatus,
        output: Option<&Value>,
        error: Option<&JobError>,
    ) -> Self {
        let data = match status {
            JobStatus::Succeeded => serde_json::json!({ "output": output }),
            JobStatus::Failed => serde_json::json!({ "error": error }),
            _ => serde_json::json!({}),
        };
        Event::new(job_id, seq, attempt, status.as_str(), data)
    }
}

pub fn is_terminal_type(kind: &str) -> bool {
    matches!(kind, types::SUCCEEDED | types::FAILED | types::CANCELLED)
}
