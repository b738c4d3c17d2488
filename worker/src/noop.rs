//! `system.noop`: measures the queue alone; can sleep, stream deltas and fail on request.

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard_core::job::{parse_at, NoopInput};

use crate::executor::{ExecError, Executor, JobContext};

pub struct NoopExecutor;

#[async_trait]
impl Executor for NoopExecutor {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError> {
        let input: NoopInput = parse_at("input", &ctx.input)
            .map_err(|e| ExecError::fatal("invalid_input", e.to_string()))?;
        for i in 0..input.deltas {
            ctx.delta(format!("d{i} ")).await;
        }
        if input.sleep_ms > 0 {
            tokio::select! {
                _ = ctx.cancel.cancelled() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(input.sleep_ms)) => {}
            }
        }
        if input.fail_fatal {
            return Err(ExecError::fatal(
                "noop_failed",
                "failed as requested (fail_fatal)",
            ));
        }
        if ctx.attempt <= input.fail_attempts as i32 {
            return Err(ExecError::retryable(
                "noop_failed",
                format!(
                    "attempt {} failed as requested (fail_attempts)",
                    ctx.attempt
                ),
            ));
        }
        Ok(json!({ "ok": true, "attempt": ctx.attempt }))
    }
}
