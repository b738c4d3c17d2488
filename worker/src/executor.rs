//! The executor seam: one implementation per job kind; executors return typed errors with
//! `retryable`, and the runtime decides between retry and final failure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use switchyard_core::job::{JobError, JobKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Failure of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
    /// A hint from the failing service (e.g. `retry-after`).
    pub retry_after: Option<Duration>,
    /// Not a failure: the job cannot run yet; it goes back to the queue for `retry_after`
    /// without using up an attempt.
    pub defer: bool,
}

impl ExecError {
    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        ExecError {
            code: code.into(),
            message: message.into(),
            retryable: true,
            retry_after: None,
            defer: false,
        }
    }

    /// The job cannot run yet: run it again after `after`, without counting this attempt.
    pub fn defer(code: &str, message: impl Into<String>, after: Duration) -> Self {
        ExecError {
            retry_after: Some(after),
            defer: true,
            ..ExecError::retryable(code, message)
        }
    }

    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        ExecError {
            code: code.into(),
            message: message.into(),
            retryable: false,
            retry_after: None,
            defer: false,
        }
    }

    /// A fault of ours (a task that panicked, JSON that would not encode): logged with its
    /// detail; the job's error (which its tenant reads) says only that it was internal.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error in an executor");
        ExecError::fatal(
            "internal",
            "internal error (the worker's log has the detail)",
        )
    }

    pub fn to_job_error(&self) -> JobError {
        JobError::new(&self.code, self.message.clone(), self.retryable)
            .retry_after(self.retry_after)
    }
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Something an executor streams while it runs.
#[derive(Debug, Clone)]
pub enum Emit {
    /// Output text (tokens): coalesced into `output.delta` events.
    Delta(String),
    /// Any other event type (open set).
    Event { kind: String, data: Value },
}

/// What an executor gets for one attempt.
pub struct JobContext {
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    pub kind: JobKind,
    pub input: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    /// Cancelled when the job is cancelled, times out or the run is fenced out.
    pub cancel: CancellationToken,
    emit: mpsc::Sender<Emit>,
    /// LLM tokens the attempt has used so far (see [`JobContext::spent`]).
    spent: Arc<AtomicU64>,
    /// Sandbox milliseconds the attempt has used so far (see [`JobContext::sandbox_ms`]).
    sandbox_ms: Arc<AtomicU64>,
}

/// Identity and input of one attempt, for [`JobContext::new`].
#[derive(Debug, Clone)]
pub struct JobMeta {
    pub job_id: Uuid,
    pub tenant_id: Uuid,
    pub kind: JobKind,
    pub input: Value,
    pub attempt: i32,
    pub max_attempts: i32,
}

impl JobContext {
    pub fn new(meta: JobMeta, cancel: CancellationToken, emit: mpsc::Sender<Emit>) -> Self {
        JobContext {
            job_id: meta.job_id,
            tenant_id: meta.tenant_id,
            kind: meta.kind,
            input: meta.input,
            attempt: meta.attempt,
            max_attempts: meta.max_attempts,
            cancel,
            emit,
            spent: Arc::new(AtomicU64::new(0)),
            sandbox_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The attempt's sandbox time in milliseconds, charged to its tenant's day however the run
    /// ends (a run cut by a cancel or the job's `timeout_s` used the sandbox all the same).
    pub fn sandbox_ms(&self) -> Arc<AtomicU64> {
        self.sandbox_ms.clone()
    }

    /// The attempt's running count of LLM tokens, charged to its tenant's day however the
    /// run ends (a reply cut by a cancel or a timeout, or not kept, was paid for all the
    /// same). Provider calls add to it as they stream ([`crate::llm::Sink`]); the runtime
    /// reads it after the executor's future is gone, so it outlives the context.
    pub fn spent(&self) -> Arc<AtomicU64> {
        self.spent.clone()
    }

    /// Adds `tokens` to the attempt's count.
    pub fn add_spent(&self, tokens: u64) {
        self.spent.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Takes back `tokens` counted ahead of what a call turned out to use.
    pub fn refund_spent(&self, tokens: u64) {
        let _ = self
            .spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(tokens))
            });
    }

    /// Streams output text; waits if the publisher is behind (bounded buffer).
    pub async fn delta(&self, text: impl Into<String>) {
        let _ = self.emit.send(Emit::Delta(text.into())).await;
    }

    /// Streams an event of another type.
    pub async fn event(&self, kind: &str, data: Value) {
        let _ = self
            .emit
            .send(Emit::Event {
                kind: kind.to_string(),
                data,
            })
            .await;
    }
}

/// Runs jobs of one kind.
#[async_trait]
pub trait Executor: Send + Sync {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError>;
}

/// Executors by kind.
#[derive(Clone, Default)]
pub struct ExecutorRegistry {
    map: HashMap<&'static str, Arc<dyn Executor>>,
}

impl ExecutorRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, kind: JobKind, exec: Arc<dyn Executor>) -> &mut Self {
        self.map.insert(kind.as_str(), exec);
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Executor>> {
        self.map.get(kind).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_error_keeps_the_service_s_wait() {
        let mut e = ExecError::retryable("provider_rate_limited", "slow down");
        assert_eq!(e.to_job_error().retry_after_s, None);
        e.retry_after = Some(Duration::from_millis(29_200));
        assert_eq!(e.to_job_error().retry_after_s, Some(30));
        let json = serde_json::to_value(ExecError::fatal("x", "y").to_job_error()).unwrap();
        assert!(
            json.get("retry_after_s").is_none(),
            "left out when unknown: {json}"
        );
    }
}
