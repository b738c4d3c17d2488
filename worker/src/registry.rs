//! The worker's entry in the registry (`GET /v1/workers`): its queues, slots and load,
//! reported every few seconds, marked draining on stop and removed once it stopped.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use switchyard_core::queueing::{WorkerInfo, WorkerQueue, WORKER_REPORT_EVERY};
use tokio_util::sync::CancellationToken;

use crate::runtime::Shared;

fn info(s: &Shared, started_at: DateTime<Utc>, draining: bool) -> WorkerInfo {
    let busy = |sem: &tokio::sync::Semaphore, n: usize| n.saturating_sub(sem.available_permits());
    let queues = s
        .opts
        .queues
        .iter()
        .map(|q| match s.queue_slots.get(q) {
            Some(sem) => {
                let n = s.opts.queue_concurrency.get(q).copied().unwrap_or(1).max(1);
                WorkerQueue {
                    name: q.clone(),
                    slots: n,
                    busy: busy(sem, n),
                    shared: false,
                }
            }
            None => WorkerQueue {
                name: q.clone(),
                slots: s.opts.concurrency,
                busy: busy(&s.slots, s.opts.concurrency),
                shared: true,
            },
        })
        .collect();
    WorkerInfo {
        id: s.id.clone(),
        host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at,
        heartbeat_at: Utc::now(),
        draining,
        running: s.running.lock().map(|r| r.len()).unwrap_or(0),
        concurrency: s.opts.concurrency,
        queues,
    }
}

/// Reports until `stop`, then once more as draining.
pub(crate) async fn report_loop(s: Arc<Shared>, stop: CancellationToken) {
    let started_at = Utc::now();
    let mut tick = tokio::time::interval(WORKER_REPORT_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                if let Err(e) = s.queue.report_worker(&info(&s, started_at, false)).await {
                    tracing::debug!(error = %e, "worker report failed");
                }
            }
        }
    }
    let _ = s.queue.report_worker(&info(&s, started_at, true)).await;
}
