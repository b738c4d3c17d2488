//! Charges a finished job's use to its tenant's daily quota counters in Redis (read by every
//! API replica): LLM tokens of answered calls (a cache hit costs nothing) and sandbox run time.

use serde_json::Value;
use switchyard_store::{JobRow, RunEnd};

use crate::runtime::Shared;

/// What a successful run's output says it used: (tokens, sandbox ms).
pub(crate) fn use_of(kind: &str, output: &Value) -> (u64, u64) {
    match kind {
        "llm.chat" if output["cached"] != Value::Bool(true) => {
            (output["usage"]["total_tokens"].as_u64().unwrap_or(0), 0)
        }
        "code.exec" => (0, output["duration_ms"].as_u64().unwrap_or(0)),
        _ => (0, 0),
    }
}

/// Adds what the run used to its tenant's day (best effort: a Redis error is logged, the job's
/// outcome is already durable).
pub(crate) async fn charge(s: &Shared, row: &JobRow, end: &RunEnd) {
    let RunEnd::Succeeded(output) = end else {
        return;
    };
    let (tokens, cpu_ms) = use_of(&row.kind, output);
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
    fn cache_hits_cost_nothing() {
        let out = json!({"usage": {"total_tokens": 42}, "cached": false});
        assert_eq!(use_of("llm.chat", &out), (42, 0));
        let hit = json!({"usage": {"total_tokens": 42}, "cached": true});
        assert_eq!(use_of("llm.chat", &hit), (0, 0));
        assert_eq!(use_of("code.exec", &json!({"duration_ms": 7})), (0, 7));
        assert_eq!(use_of("system.noop", &json!({})), (0, 0));
    }
}
