//! Writes each queue's concurrency limits and tenant weights into Redis (`{P:q:<queue>}:limits`,
//! read by the fairness scripts, `shared/queue/src/fair.rs`): the queue's own limit from the
//! configuration, every tenant's `concurrent_jobs` (its own, else the configured default) and
//! queue weight. Rewritten every few seconds, so a Redis that lost its data gets them back.

use std::collections::BTreeMap;

use switchyard_queue::Queue;
use switchyard_store::Store;

/// The limits of `queue` as `(field, value)` pairs.
pub fn entries(
    queue: &str,
    queue_limits: &BTreeMap<String, u64>,
    tenant_default: Option<u64>,
    shares: &[(uuid::Uuid, Option<i64>, Option<i32>)],
) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Some(n) = queue_limits.get(queue) {
        out.push(("queue".to_string(), *n));
    }
    if let Some(n) = tenant_default {
        out.push(("t:*".to_string(), n));
    }
    for (tenant, limit, weight) in shares {
        if let Some(l) = limit.filter(|l| *l > 0) {
            out.push((format!("t:{tenant}"), l as u64));
        }
        if let Some(w) = weight.filter(|w| *w > 0) {
            out.push((format!("w:{tenant}"), w as u64));
        }
    }
    out
}

/// Rewrites the limits of every known queue.
pub async fn sync(
    store: &Store,
    queue: &Queue,
    queue_limits: &BTreeMap<String, u64>,
    tenant_default: Option<u64>,
) -> anyhow::Result<()> {
    let shares = store.queue_shares().await?;
    for q in queue.queues().await? {
        queue
            .set_limits(&q, &entries(&q, queue_limits, tenant_default, &shares))
            .await?;
    }
    Ok(())
}
