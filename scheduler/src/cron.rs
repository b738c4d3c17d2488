//! Cron schedules: each pass fires the due ones (exactly once per fire time across scheduler
//! replicas, see `Store::fire_due_schedules`), publishes each run's `queued` event and
//! dispatches its job.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use switchyard_core::job::{CreateJobRequest, JobStatus};
use switchyard_core::schedule::CronSpec;
use switchyard_core::telemetry::TraceParent;
use switchyard_core::Event;
use switchyard_queue::{EventBus, Queue};
use switchyard_store::{Firing, NewJob, ScheduleRow, Store};
use uuid::Uuid;

/// The job one run of `s` submits (`None` when its template no longer makes a valid job).
pub fn job_for(s: &ScheduleRow, now: DateTime<Utc>) -> Option<NewJob> {
    let req = match CreateJobRequest::parse(s.job.clone(), |_| true) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(schedule = %s.id, error = %e.message, field = %e.field, "schedule's job template is invalid; run skipped");
            return None;
        }
    };
    Some(NewJob {
        id: Uuid::now_v7(),
        tenant_id: s.tenant_id,
        created_by: s.created_by.clone(),
        kind: req.kind.as_str().to_string(),
        queue: req.queue,
        priority: req.priority,
        max_attempts: req.max_attempts,
        timeout_s: req.timeout_s,
        input: req.input,
        metadata: req.metadata,
        trace_parent: Some(TraceParent::generate().to_string()),
        created_at: now,
        run_at: None,
        backoff: req.backoff,
        webhook_url: req.webhook_url,
    })
}

/// The next fire time of `s` after `now` (a schedule whose expression no longer parses, or
/// never fires again, is pushed a year ahead).
pub fn next_for(s: &ScheduleRow, now: DateTime<Utc>) -> DateTime<Utc> {
    CronSpec::parse(&s.cron, &s.timezone)
        .ok()
        .and_then(|c| c.next_after(now))
        .unwrap_or_else(|| now + chrono::Duration::days(365))
}

/// Fires due schedules in batches; returns how many runs were enqueued.
pub async fn fire(
    store: &Store,
    queue: &Queue,
    batch: i64,
    max_batches: usize,
) -> anyhow::Result<usize> {
    let bus = EventBus::new(
        queue.keys().clone(),
        queue.conn(),
        Duration::from_secs(3600),
    );
    let mut total = 0;
    for _ in 0..max_batches {
        let now = Utc::now();
        let jobs = store
            .fire_due_schedules(batch, |s| Firing {
                job: job_for(s, now),
                next_run_at: next_for(s, now),
            })
            .await?;
        total += jobs.len();
        // marked dispatched only once Redis took them, with the epoch read before: if the
        // dispatch fails they are left to the reconciler, and if Redis loses its data after
        // this read, the new epoch's reconciler dispatches them again (unmarked, a job not
        // claimed within the reconciler's grace would be dispatched a second time)
        let epoch = match queue.epoch().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the redis epoch; the reconciler will dispatch the scheduled jobs");
                None
            }
        };
        for j in &jobs {
            let ev = Event::status(
                j.id,
                1,
                0,
                JobStatus::Queued,
                json!({ "reason": "schedule" }),
            );
            if let Err(e) = bus.publish(&ev).await {
                tracing::warn!(error = %e, "could not publish a scheduled job's queued event");
            }
        }
        let items: Vec<_> = jobs.iter().map(|j| j.dispatch_item()).collect();
        match queue.dispatch(&items).await {
            Ok(_) => {
                if let Some(epoch) = epoch {
                    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
                    if let Err(e) = store.mark_dispatched(&ids, epoch).await {
                        tracing::warn!(error = %e, "could not mark scheduled jobs dispatched (they may be dispatched twice)");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not dispatch scheduled jobs; the reconciler will")
            }
        }
        if (jobs.len() as i64) < batch {
            break;
        }
    }
    Ok(total)
}
