//! Charges a finished job's use to its tenant's daily quota counters in Redis (read by every
//! API replica): LLM tokens of answered calls (a cache hit costs nothing) and sandbox run time.

use serde_json::Value;
use switchyard_store::JobRow;

use crate::runtime::Shared;

/// Tokens of a usage object: `total_tokens`, else prompt + completion.
fn tokens(usage: &Value) -> u64 {
    usage["total_tokens"].as_u64().unwrap_or_else(|| {
        usage["prompt_tokens"].as_u64().unwrap_or(0)
            + usage["completion_tokens"].as_u64().unwrap_or(0)
    })
}

/// What a run's output says it used: (tokens, sandbox ms). A conversation summary the turn
/// wrote counts too, even when the reply itself came from the cache.
pub(crate) fn use_of(kind: &str, output: &Value) -> (u64, u64) {
    match kind {
        "llm.chat" => {
            let reply = if output["cached"] == Value::Bool(true) {
                0
            } else {
                tokens(&output["usage"])
            };
            (reply + tokens(&output["summary"]["usage"]), 0)
        }
        "code.exec" => (0, output["duration_ms"].as_u64().unwrap_or(0)),
        _ => (0, 0),
    }
}

/// Adds what the run used, `(tokens, sandbox ms)`, to its tenant's day (best effort: a Redis
/// error is logged, the job's outcome is already durable). Runs that did not succeed are
/// charged too: a reply paid for but not kept (its conversation deleted meanwhile, a cancel
/// that came after it) was used all the same.
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
    fn cache_hits_cost_nothing() {
        let out = json!({"usage": {"total_tokens": 42}, "cached": false});
        assert_eq!(use_of("llm.chat", &out), (42, 0));
        let hit = json!({"usage": {"total_tokens": 42}, "cached": true});
        assert_eq!(use_of("llm.chat", &hit), (0, 0));
        assert_eq!(use_of("code.exec", &json!({"duration_ms": 7})), (0, 7));
        assert_eq!(use_of("system.noop", &json!({})), (0, 0));
        // a summary the turn wrote is charged, even beside a cached reply
        let summary = json!({"prompt_tokens": 30, "completion_tokens": 5});
        let hit =
            json!({"usage": {"total_tokens": 42}, "cached": true, "summary": {"usage": summary}});
        assert_eq!(use_of("llm.chat", &hit), (35, 0));
        let miss = json!({"usage": {"prompt_tokens": 2, "completion_tokens": 1}, "summary": {"usage": summary}});
        assert_eq!(use_of("llm.chat", &miss), (38, 0));
    }
}
