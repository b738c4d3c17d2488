//! Per-job queueing options: the named queue a job goes to and its retry backoff.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::job::JobKind;

/// Longest queue name.
pub const MAX_QUEUE_NAME: usize = 48;
/// Longest retry delay a backoff may ask for.
pub const MAX_BACKOFF_S: f64 = 86_400.0;
/// Cap of an exponential backoff that names none.
pub const DEFAULT_MAX_DELAY_S: f64 = 3_600.0;
/// Jitter spread: a delay is multiplied by a random factor in `1 ± JITTER`.
const JITTER: f64 = 0.2;

/// Checks a queue name (`[a-z0-9][a-z0-9._-]*`, at most 48 bytes) for `field`.
pub fn check_queue_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_QUEUE_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FieldError::invalid(
            field,
            format!(
                "a queue name is 1 to {MAX_QUEUE_NAME} of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
            ),
        ))
    }
}

/// The queue a job of `kind` goes to: its kind's queue, or a named one. `code.exec` jobs need
/// workers with sandboxes, so their queue is `code` or `code.<name>`.
pub fn job_queue(kind: JobKind, named: Option<&str>) -> Result<String, FieldError> {
    let Some(name) = named else {
        return Ok(kind.queue().to_string());
    };
    check_queue_name("queue", name)?;
    let home = kind.queue();
    if kind == JobKind::CodeExec && name != home && !name.starts_with("code.") {
        return Err(FieldError::invalid(
            "queue",
            "code.exec jobs run on workers with sandboxes: their queue is `code` or `code.<name>`",
        ));
    }
    Ok(name.to_string())
}

/// Whether a worker serving `queue` needs sandboxes.
pub fn is_code_queue(queue: &str) -> bool {
    queue == JobKind::CodeExec.queue() || queue.starts_with("code.")
}

/// How a job waits between attempts after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    /// `delay_s`, doubling per attempt, capped by `max_delay_s`.
    Exponential,
    /// `delay_s` every time.
    Fixed,
}

/// Retry backoff of one job (`backoff` on submit). Without one, a job waits 1 s doubling per
/// attempt up to 60 s, with jitter. An executor's own `retry-after` (e.g. a provider's) wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(rename = "type")]
    pub kind: BackoffKind,
    /// Seconds before the first retry (exponential) or every retry (fixed); default 1.
    #[serde(default = "one")]
    pub delay_s: f64,
    /// Exponential only: the longest wait (default 3600, or `delay_s` when that is longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_s: Option<f64>,
    /// Multiply each wait by a random factor in 0.8–1.2 (default: on for exponential, off for
    /// fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<bool>,
}

fn one() -> f64 {
    1.0
}

impl Backoff {
    /// The default policy of jobs without a `backoff`.
    pub fn default_with(base: Duration) -> Backoff {
        Backoff {
            kind: BackoffKind::Exponential,
            delay_s: base.as_secs_f64(),
            max_delay_s: Some(60.0),
            jitter: Some(true),
        }
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        let in_range = |v: f64| v.is_finite() && (0.0..=MAX_BACKOFF_S).contains(&v);
        if !in_range(self.delay_s) {
            return Err(FieldError::invalid(
                "backoff.delay_s",
                format!("must be between 0 and {MAX_BACKOFF_S}"),
            ));
        }
        if let Some(m) = self.max_delay_s {
            if self.kind == BackoffKind::Fixed {
                return Err(FieldError::invalid(
                    "backoff.max_delay_s",
                    "only an exponential backoff has a maximum",
                ));
            }
            if !in_range(m) || m < self.delay_s {
                return Err(FieldError::invalid(
                    "backoff.max_delay_s",
                    format!("must be between delay_s and {MAX_BACKOFF_S}"),
                ));
            }
        }
        Ok(())
    }

    /// The wait after failed attempt number `attempt` (1 = the first).
    pub fn delay(&self, attempt: i32) -> Duration {
        let secs = match self.kind {
            BackoffKind::Fixed => self.delay_s,
            BackoffKind::Exponential => {
                let doublings = (attempt.max(1) - 1).min(60);
                // the default cap never shortens the first wait asked for
                let max = self
                    .max_delay_s
                    .unwrap_or(DEFAULT_MAX_DELAY_S.max(self.delay_s));
                (self.delay_s * 2f64.powi(doublings)).min(max)
            }
        };
        let jitter = self.jitter.unwrap_or(self.kind == BackoffKind::Exponential);
        let factor = if jitter {
            rand::thread_rng().gen_range(1.0 - JITTER..=1.0 + JITTER)
        } else {
            1.0
        };
        Duration::from_secs_f64((secs * factor).clamp(0.0, MAX_BACKOFF_S * (1.0 + JITTER)))
    }
}

/// How often a worker reports to the registry.
pub const WORKER_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// A report older than this is a worker that died.
pub const WORKER_REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// A live worker as `GET /v1/workers` shows it (each worker reports every few seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    /// Consumer name (unique per process).
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    /// Stopping: takes no new jobs, finishing (or releasing) the ones it runs.
    pub draining: bool,
    /// Jobs running now.
    pub running: usize,
    /// Slots shared by the queues without their own.
    pub concurrency: usize,
    pub queues: Vec<WorkerQueue>,
}

/// One queue a worker serves and its load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerQueue {
    pub name: String,
    /// Slots this queue's jobs may take (`shared`: the worker's `concurrency`).
    pub slots: usize,
    /// Slots taken now.
    pub busy: usize,
    /// Whether the slots are shared with other queues.
    pub shared: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        assert_eq!(job_queue(JobKind::LlmChat, None).unwrap(), "llm");
        assert_eq!(job_queue(JobKind::LlmChat, Some("bulk")).unwrap(), "bulk");
        assert_eq!(
            job_queue(JobKind::CodeExec, Some("code.heavy")).unwrap(),
            "code.heavy"
        );
        for bad in ["", "Bulk", "-x", "a b", "q{x}", &"a".repeat(49)] {
            assert_eq!(
                job_queue(JobKind::SystemNoop, Some(bad)).unwrap_err().field,
                "queue",
                "{bad}"
            );
        }
        assert!(job_queue(JobKind::CodeExec, Some("bulk")).is_err());
        assert!(is_code_queue("code.heavy") && !is_code_queue("codex"));
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let b = Backoff {
            kind: BackoffKind::Exponential,
            delay_s: 2.0,
            max_delay_s: Some(10.0),
            jitter: Some(false),
        };
        let d: Vec<u64> = (1..=5).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(d, vec![2, 4, 8, 10, 10]);
        let j = Backoff {
            jitter: None,
            ..b.clone()
        };
        for _ in 0..50 {
            let s = j.delay(1).as_secs_f64();
            assert!((1.6..=2.4).contains(&s), "{s}");
        }
    }

    #[test]
    fn the_default_cap_never_shortens_the_first_wait() {
        let b = Backoff {
            kind: BackoffKind::Exponential,
            delay_s: 7200.0,
            max_delay_s: None,
            jitter: Some(false),
        };
        assert_eq!(b.delay(1).as_secs(), 7200);
        assert_eq!(b.delay(3).as_secs(), 7200);
        let short = Backoff {
            delay_s: 1000.0,
            ..b
        };
        assert_eq!(short.delay(3).as_secs(), 3600);
    }

    #[test]
    fn the_default_grows_and_caps() {
        let b = Backoff::default_with(Duration::from_secs(1));
        assert!(b.delay(1) <= Duration::from_millis(1200));
        assert!(b.delay(3) >= Duration::from_millis(3200));
        assert!(b.delay(30) <= Duration::from_secs(72));
    }

    #[test]
    fn fixed_is_constant_and_validated() {
        let b: Backoff =
            serde_json::from_value(serde_json::json!({"type": "fixed", "delay_s": 3})).unwrap();
        assert_eq!(b.delay(1), b.delay(7));
        assert_eq!(b.delay(4), Duration::from_secs(3));
        let bad = Backoff {
            max_delay_s: Some(5.0),
            ..b.clone()
        };
        assert_eq!(bad.validate().unwrap_err().field, "backoff.max_delay_s");
        let bad = Backoff { delay_s: -1.0, ..b };
        assert_eq!(bad.validate().unwrap_err().field, "backoff.delay_s");
    }
}
