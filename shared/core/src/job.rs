//! Jobs: statuses, kinds (and the queue each kind runs on), request parsing and input validation.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::code::CodeExecInput;
use crate::error::{ErrorCode, FieldError};

pub use crate::chat::*;

/// Lifecycle of a job. `queued` also covers waiting for a retry or a `run_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The job kinds this build knows. Each maps to the named queue its workers serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// An LLM chat completion through a provider (`llm` queue).
    LlmChat,
    /// Does nothing (optionally sleeps, streams or fails): measures the queue alone (`system` queue).
    SystemNoop,
    /// Untrusted code in a sandbox (`code` queue, served only by workers that have sandboxes).
    CodeExec,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [JobKind::LlmChat, JobKind::SystemNoop, JobKind::CodeExec];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::LlmChat => "llm.chat",
            JobKind::SystemNoop => "system.noop",
            JobKind::CodeExec => "code.exec",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The queue a kind is dispatched to.
    pub fn queue(self) -> &'static str {
        match self {
            JobKind::LlmChat => "llm",
            JobKind::SystemNoop => "system",
            JobKind::CodeExec => "code",
        }
    }

    /// Validates `input` for this kind; errors name the field, e.g. `input.messages[0].role`.
    pub fn validate_input(self, input: &Value) -> Result<(), FieldError> {
        if !input.is_object() {
            return Err(FieldError::invalid("input", "must be a JSON object"));
        }
        match self {
            JobKind::LlmChat => {
                let chat: LlmChatInput = parse_at("input", input)?;
                chat.validate()
            }
            JobKind::SystemNoop => {
                let noop: NoopInput = parse_at("input", input)?;
                noop.validate()
            }
            JobKind::CodeExec => {
                let code: CodeExecInput = parse_at("input", input)?;
                code.validate()
            }
        }
    }
}

/// All queue names known to this build.
pub fn known_queues() -> Vec<&'static str> {
    let mut q: Vec<&'static str> = JobKind::ALL.iter().map(|k| k.queue()).collect();
    q.sort_unstable();
    q.dedup();
    q
}

/// The error stored on a failed job (and carried by `failed` events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// Stable code, e.g. `timeout`, `provider_error`, `lease_expired`.
    pub code: String,
    pub message: String,
    /// Whether running the job again could succeed.
    pub retryable: bool,
    /// How long the failing service asked to be left alone (a provider's `retry-after`), in
    /// seconds, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl JobError {
    /// A NUL in `message` (a program's stderr, a provider's words) becomes U+FFFD: the error
    /// is stored in Postgres, which holds none.
    pub fn new(code: &str, message: impl Into<String>, retryable: bool) -> Self {
        let mut message = message.into();
        crate::nul::clean_str(&mut message);
        JobError {
            code: code.to_string(),
            message,
            retryable,
            retry_after_s: None,
        }
    }

    /// With the failing service's `retry-after` (rounded up to whole seconds).
    pub fn retry_after(mut self, wait: Option<std::time::Duration>) -> Self {
        self.retry_after_s = wait.map(|w| w.as_secs_f64().ceil() as u64);
        self
    }
}

/// Job error codes written by the runtime (executors add their own, e.g. `provider_error`).
pub mod job_error_codes {
    /// The attempt ran longer than `timeout_s` (retryable).
    pub const TIMEOUT: &str = "timeout";
    /// A worker lost the job (crash, network) and no attempts were left.
    pub const LEASE_EXPIRED: &str = "lease_expired";
    /// No worker executor is registered for the kind.
    pub const NO_EXECUTOR: &str = "no_executor";
    /// The input failed the executor's own checks.
    pub const INVALID_INPUT: &str = "invalid_input";
    /// An unexpected failure inside the worker.
    pub const INTERNAL: &str = "internal";
}

/// The job as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub queue: String,
    /// 0–9, higher first within a queue.
    pub priority: i16,
    pub status: JobStatus,
    /// Failed for good (out of attempts, or a fatal error): on the dead-letter list
    /// (`GET /v1/jobs?dead=true`) until retried (`POST /v1/jobs/{id}/retry`).
    pub dead: bool,
    /// A queued job does not start before this time (a delay, or a retry's backoff).
    pub run_at: Option<DateTime<Utc>>,
    pub attempt: i32,
    pub max_attempts: i32,
    /// The job's own retry backoff, when it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<crate::queueing::Backoff>,
    /// Where the job's end is posted (its own webhook, or its tenant's at submission).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[schema(value_type = Object)]
    pub input: Value,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub error: Option<JobError>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub timeout_s: Option<i32>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What the queue needs to (re)dispatch a job.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchItem {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub queue: String,
    pub priority: i16,
    /// Not before this time (retry backoff); `None` = now.
    pub run_at: Option<DateTime<Utc>>,
}

/// Limits applied to `POST /v1/jobs`.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
pub const MAX_MAX_ATTEMPTS: i32 = 100;
pub const MAX_TIMEOUT_S: i32 = 86_400;
pub const MAX_METADATA_KEYS: usize = 64;
/// Size of `metadata` as JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Checks a `metadata` value (a JSON object of at most [`MAX_METADATA_KEYS`] keys and
/// [`MAX_METADATA_BYTES`]); `null` or absent is `{}`.
pub fn check_metadata(v: Option<Value>) -> Result<Value, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(Value::Object(Default::default())),
        Some(Value::Object(m)) if m.len() > MAX_METADATA_KEYS => Err(FieldError::invalid(
            "metadata",
            format!("at most {MAX_METADATA_KEYS} keys"),
        )),
        Some(Value::Object(m)) => {
            let v = Value::Object(m);
            if v.to_string().len() > MAX_METADATA_BYTES {
                return Err(FieldError::invalid(
                    "metadata",
                    format!("at most {MAX_METADATA_BYTES} bytes as JSON"),
                ));
            }
            Ok(v)
        }
        Some(_) => Err(FieldError::invalid("metadata", "must be a JSON object")),
    }
}

/// Body of `POST /v1/jobs`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobRequest {
    /// Job kind, e.g. `llm.chat` or `system.noop`.
    pub kind: String,
    /// Kind-specific input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Attempts before the job fails for good (lease expiries count). Default 3.
    pub max_attempts: Option<i32>,
    /// Per-attempt time limit in seconds, counted from `running`.
    pub timeout_s: Option<i32>,
    /// Free-form JSON object stored with the job.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// 0 (default) to 9: within a queue, higher priorities are started first.
    pub priority: Option<i16>,
    /// Start no earlier than this time (RFC 3339; at most a year ahead; a past time runs now).
    pub run_at: Option<DateTime<Utc>>,
    /// Start no earlier than this many seconds from now (instead of `run_at`).
    pub delay_s: Option<u64>,
    /// Named queue (default: the kind's queue: `llm`, `code`, `system`); workers serve the
    /// queues they are configured for, each with its own concurrency.
    pub queue: Option<String>,
    /// Wait between attempts after a retryable failure (default: 1 s doubling to 60 s, jittered).
    pub backoff: Option<crate::queueing::Backoff>,
    /// Receives a signed POST when the job ends (default: the tenant's webhook, if any).
    pub webhook_url: Option<String>,
}

/// Farthest a job may be scheduled ahead.
pub const MAX_DELAY_S: u64 = 365 * 24 * 3600;

/// Highest job priority (`priority` is 0..=MAX_PRIORITY).
pub const MAX_PRIORITY: i16 = 9;

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidJobRequest {
    pub kind: JobKind,
    pub priority: i16,
    /// When it may start (`None`: now).
    pub run_at: Option<DateTime<Utc>>,
    pub input: Value,
    pub max_attempts: i32,
    pub timeout_s: Option<i32>,
    pub metadata: Value,
    /// The job's queue (its kind's, or the named one).
    pub queue: String,
    pub backoff: Option<crate::queueing::Backoff>,
    /// Checked for form by the caller (it knows whether private addresses are allowed).
    pub webhook_url: Option<String>,
}

impl CreateJobRequest {
    /// Parses and validates a request body already known to be JSON.
    /// `kind_enabled` says whether a known kind is switched on here.
    pub fn parse(
        body: Value,
        kind_enabled: impl Fn(JobKind) -> bool,
    ) -> Result<ValidJobRequest, FieldError> {
        if !body.is_object() {
            return Err(FieldError::invalid("body", "must be a JSON object"));
        }
        let req: CreateJobRequest = parse_at("", &body)?;
        let kind = JobKind::parse(&req.kind)
            .filter(|k| kind_enabled(*k))
            .ok_or_else(|| FieldError {
                code: ErrorCode::UnknownKind,
                field: "kind".into(),
                message: format!("unknown or disabled job kind `{}`", req.kind),
            })?;
        kind.validate_input(&req.input)?;
        let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=MAX_MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(FieldError::invalid(
                "max_attempts",
                format!("must be between 1 and {MAX_MAX_ATTEMPTS}"),
            ));
        }
        if let Some(t) = req.timeout_s {
            if !(1..=MAX_TIMEOUT_S).contains(&t) {
                return Err(FieldError::invalid(
                    "timeout_s",
                    format!("must be between 1 and {MAX_TIMEOUT_S}"),
                ));
            }
        }
        let metadata = check_metadata(req.metadata)?;
        let priority = req.priority.unwrap_or(0);
        if !(0..=MAX_PRIORITY).contains(&priority) {
            return Err(FieldError::invalid(
                "priority",
                format!("must be between 0 and {MAX_PRIORITY}"),
            ));
        }
        let now = Utc::now();
        let run_at = match (req.run_at, req.delay_s) {
            (Some(_), Some(_)) => {
                return Err(FieldError::invalid(
                    "delay_s",
                    "give either run_at or delay_s, not both",
                ))
            }
            (None, Some(d)) if d > MAX_DELAY_S => {
                return Err(FieldError::invalid(
                    "delay_s",
                    format!("at most {MAX_DELAY_S} (a year)"),
                ))
            }
            (None, Some(0)) | (None, None) => None,
            (None, Some(d)) => Some(now + chrono::Duration::seconds(d as i64)),
            (Some(t), None) if t > now + chrono::Duration::seconds(MAX_DELAY_S as i64) => {
                return Err(FieldError::invalid("run_at", "at most a year ahead"))
            }
            (Some(t), None) => (t > now).then_some(t),
        };
        let queue = crate::queueing::job_queue(kind, req.queue.as_deref())?;
        if let Some(b) = &req.backoff {
            b.validate()?;
        }
        Ok(ValidJobRequest {
            kind,
            priority,
            run_at,
            input: req.input,
            max_attempts,
            timeout_s: req.timeout_s,
            metadata,
            queue,
            backoff: req.backoff,
            webhook_url: req.webhook_url,
        })
    }
}

/// Deserializes `value` as `T`, turning serde errors into a [`FieldError`] whose field is the
/// JSON path below `prefix` (e.g. `input.messages[0].role`).
pub fn parse_at<T: DeserializeOwned>(prefix: &str, value: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|err| {
        let inner = err.inner().to_string();
        let mut path = err.path().to_string();
        if path == "." {
            path.clear();
        }
        let join = |p: &str, leaf: &str| -> String {
            let base = match (prefix.is_empty(), p.is_empty()) {
                (true, true) => String::new(),
                (true, false) => p.to_string(),
                (false, true) => prefix.to_string(),
                (false, false) => format!("{prefix}.{p}"),
            };
            match (base.is_empty(), leaf.is_empty()) {
                (_, true) => base,
                (true, false) => leaf.to_string(),
                (false, false) => format!("{base}.{leaf}"),
            }
        };
        if let Some(name) = backticked(&inner, "unknown field `") {
            let field = if path.ends_with(&name) {
                join(&path, "")
            } else {
                join(&path, &name)
            };
            return FieldError {
                code: ErrorCode::UnknownField,
                field,
                message: format!("unknown field `{name}`"),
            };
        }
        if let Some(name) = backticked(&inner, "missing field `") {
            return FieldError::invalid(join(&path, &name), format!("missing field `{name}`"));
        }
        let field = join(&path, "");
        let field = if field.is_empty() {
            "body".to_string()
        } else {
            field
        };
        FieldError::invalid(field, strip_position(&inner))
    })
}

fn backticked(msg: &str, lead: &str) -> Option<String> {
    let rest = msg.strip_prefix(lead)?;
    Some(rest.split('`').next()?.to_string())
}

fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Input of `system.noop`: everything optional; used for benchmarks and tests of the runtime.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoopInput {
    /// Sleep this long (cancellable) before finishing; at most 600000.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Emit this many `output.delta` events (at most 10000).
    #[serde(default)]
    pub deltas: u32,
    /// Fail retryably while `attempt <= fail_attempts`.
    #[serde(default)]
    pub fail_attempts: u32,
    /// Fail with a non-retryable error.
    #[serde(default)]
    pub fail_fatal: bool,
}

impl NoopInput {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.sleep_ms > 600_000 {
            return Err(FieldError::invalid(
                "input.sleep_ms",
                "must be at most 600000",
            ));
        }
        if self.deltas > 10_000 {
            return Err(FieldError::invalid("input.deltas", "must be at most 10000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ValidJobRequest, FieldError> {
        CreateJobRequest::parse(v, |_| true)
    }

    #[test]
    fn valid_chat_request() {
        let r = parse(json!({"kind":"llm.chat","input":{"model":"mock-1","messages":[{"role":"user","content":"hi"}]}})).unwrap();
        assert_eq!(r.kind, JobKind::LlmChat);
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.metadata, json!({}));
    }

    #[test]
    fn bad_role_names_the_field() {
        let e = parse(json!({"kind":"llm.chat","input":{"model":"m","messages":[{"role":"user","content":"a"},{"role":"robot","content":"b"}]}})).unwrap_err();
        assert_eq!(e.field, "input.messages[1].role");
        assert_eq!(e.code, ErrorCode::InvalidInput);
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = parse(json!({"kind":"llm.chat","input":{"model":"m","messages":[{"role":"user","content":"a","x":1}]}})).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownField);
        assert_eq!(e.field, "input.messages[0].x");
        let e = parse(json!({"kind":"system.noop","input":{},"colour":1})).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownField);
        assert_eq!(e.field, "colour");
    }

    #[test]
    fn wrong_types_and_missing_fields() {
        let e = parse(json!({"kind":"llm.chat","input":{"model":"m","messages":[{"role":"user","content":5}]}})).unwrap_err();
        assert_eq!(e.field, "input.messages[0].content");
        let e = parse(json!({"kind":"llm.chat","input":{"messages":[]}})).unwrap_err();
        assert_eq!(e.field, "input.model");
        let e = parse(json!({"input":{}})).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = parse(json!([1, 2])).unwrap_err();
        assert_eq!(e.field, "body");
    }

    #[test]
    fn unknown_or_disabled_kind() {
        let e = parse(json!({"kind":"nope","input":{}})).unwrap_err();
        assert_eq!((e.code, e.field.as_str()), (ErrorCode::UnknownKind, "kind"));
        let e = CreateJobRequest::parse(json!({"kind":"system.noop","input":{}}), |k| {
            k != JobKind::SystemNoop
        })
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownKind);
    }

    #[test]
    fn limits() {
        let e = parse(json!({"kind":"system.noop","input":{},"max_attempts":0})).unwrap_err();
        assert_eq!(e.field, "max_attempts");
        let e = parse(json!({"kind":"system.noop","input":{},"timeout_s":0})).unwrap_err();
        assert_eq!(e.field, "timeout_s");
        let e = parse(json!({"kind":"system.noop","input":{},"metadata":[1]})).unwrap_err();
        assert_eq!(e.field, "metadata");
        let e = parse(json!({"kind":"llm.chat","input":{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":3.0}})).unwrap_err();
        assert_eq!(e.field, "input.temperature");
    }

    #[test]
    fn statuses_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert!(JobStatus::Cancelled.is_terminal() && !JobStatus::Running.is_terminal());
    }
}
