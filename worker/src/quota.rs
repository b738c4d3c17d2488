//! Charges a finished job's use to its tenant's daily quota counters in Redis (read by every
//! API replica): the LLM tokens its provider calls used, however the run ended (a cache hit
//! costs nothing), and sandbox run time.

use serde_json::Value;
use switchyard_store::JobRow;

use crate::runtime::Shared;

/// Sandbox time a run's output says it used. (LLM tokens are counted as calls stream:
/// [`crate::executor::JobContext::spent`].)
pub(crate) fn sandbox_ms(kind: &str, output: &Value) -> u64 {
    match kind {
        "code.exec" => output["duration_ms"].as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// Adds what the run used, `(tokens, sandbox ms)`, to its tenant's day (best effort: a Redis
/// error is logged, the job's outcome is already durable). Runs that did not succeed are
/// charged too: a reply paid for but not kept (its conversation deleted meanwhile, cut by a
/// cancel or a time limit) was used all the same.
pub(crate) async fn charge(s: &Shared, row: &JobRow, (tokens, cpu_ms): (u64, u64)) {
    if tokens == 0 && cpu_ms == 0 {
        return;
    }
    let (day, _) = switchyard_core::quota::utc_day(chrono::Utc::now());
    if let Err(e) = s.quotas.charge(row.tenant_id, &day, tokens, cpu_ms).await {
        tracing::warn!(error = %e, tokens, cpu_ms, "could not charge the tenant's quota");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sandbox_time_of_code_runs_only() {
        assert_eq!(sandbox_ms("code.exec", &json!({"duration_ms": 7})), 7);
        assert_eq!(sandbox_ms("llm.chat", &json!({"duration_ms": 7})), 0);
        assert_eq!(sandbox_ms("code.exec", &json!({})), 0);
    }
}
