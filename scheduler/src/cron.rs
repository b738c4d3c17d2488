//! Cron schedules: each pass fires the due ones (exactly once per fire time across scheduler
//! replicas, see `Store::due_schedules`), publishes each run's `queued` event and
//! dispatches its job. A run is held to what a `POST /v1/jobs` by the schedule's creator would
//! be held to at that moment (daily quotas, `max_queued_jobs`, the tenant's models, the
//! creating key still valid); a refused run is recorded as skipped, with the reason.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use switchyard_core::job::{CreateJobRequest, JobStatus};
use switchyard_core::quota::{utc_day, QuotaLimits};
use switchyard_core::schedule::{CronSpec, RunSkipped};
use switchyard_core::telemetry::TraceParent;
use switchyard_core::{ErrorCode, Event};
use switchyard_queue::{EventBus, Queue, Quotas};
use switchyard_store::{model_allowed, DueSchedule, Firing, NewJob, ScheduleRow, Store};
use uuid::Uuid;

fn skipped(code: ErrorCode, message: String) -> RunSkipped {
    RunSkipped {
        code: code.as_str().to_string(),
        message,
    }
}

/// The job one run of `s` submits (an error when its template no longer makes a valid job).
pub fn job_for(s: &ScheduleRow, now: DateTime<Utc>) -> Result<NewJob, RunSkipped> {
    let req = match CreateJobRequest::parse(s.job.clone(), |_| true) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(schedule = %s.id, error = %e.message, field = %e.field, "schedule's job template is invalid; run skipped");
            return Err(skipped(
                ErrorCode::InvalidInput,
                format!(
                    "the job template is no longer valid: {} (`{}`)",
                    e.message, e.field
                ),
            ));
        }
    };
    Ok(NewJob {
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

/// What a pass knows of one tenant: its use today and its queued jobs (counted once per pass,
/// plus the runs this pass enqueued).
struct TenantUse {
    tokens: Option<u64>,
    cpu_ms: Option<u64>,
    queued: Option<u64>,
}

/// Holds each due run to its tenant's limits, as the API holds a submission.
pub struct Gate<'a> {
    store: &'a Store,
    quotas: Quotas,
    defaults: &'a QuotaLimits,
    day: String,
    tenants: HashMap<Uuid, TenantUse>,
}

impl<'a> Gate<'a> {
    pub fn new(store: &'a Store, queue: &Queue, defaults: &'a QuotaLimits) -> Gate<'a> {
        Gate {
            store,
            quotas: Quotas::new(queue.keys().clone(), queue.conn()),
            defaults,
            day: utc_day(Utc::now()).0,
            tenants: HashMap::new(),
        }
    }

    /// Why the run of `d` with `job` may not be enqueued now (`None`: it may; counted as
    /// queued). Redis or Postgres trouble admits, as on the API (the insert that follows
    /// reports Postgres trouble itself).
    pub async fn refusal(&mut self, d: &DueSchedule, job: &NewJob) -> Option<RunSkipped> {
        match d.creator_key.as_deref() {
            None | Some("ok") => {}
            Some(state) => {
                let what = match state {
                    "revoked" => "was revoked",
                    "expired" => "has expired",
                    _ => "no longer exists",
                };
                return Some(skipped(
                    ErrorCode::Forbidden,
                    format!("the API key that created this schedule {what}"),
                ));
            }
        }
        let model = job.input.get("model").and_then(|m| m.as_str());
        if let (Some(model), "llm.chat") = (model, job.kind.as_str()) {
            if !model_allowed(d.allowed_models.as_deref(), model) {
                return Some(skipped(
                    ErrorCode::Forbidden,
                    format!("model `{model}` is not enabled for this tenant"),
                ));
            }
        }
        let limits = d.quotas.over(self.defaults);
        let daily = match job.kind.as_str() {
            "llm.chat" => limits.llm_tokens_per_day.map(|l| (l, "LLM tokens")),
            "code.exec" => limits
                .sandbox_cpu_seconds_per_day
                .map(|s| (s.saturating_mul(1000), "sandbox CPU-seconds")),
            _ => None,
        };
        let tenant = job.tenant_id;
        if !self.tenants.contains_key(&tenant) {
            let used = match self.quotas.daily_use(tenant, &self.day).await {
                Ok(u) => (Some(u.tokens), Some(u.cpu_ms)),
                Err(e) => {
                    tracing::warn!(error = %e, "a cron run's daily quota not checked: redis unavailable");
                    (None, None)
                }
            };
            let queued = match limits.max_queued_jobs {
                Some(max) => self
                    .store
                    .queued_jobs(tenant, max.min(i64::MAX as u64) as i64)
                    .await
                    .ok()
                    .map(|c| c.max(0) as u64),
                None => None,
            };
            self.tenants.insert(
                tenant,
                TenantUse {
                    tokens: used.0,
                    cpu_ms: used.1,
                    queued,
                },
            );
        }
        let t = self.tenants.get_mut(&tenant)?;
        if let Some((limit, what)) = daily {
            let used = if job.kind == "llm.chat" {
                t.tokens
            } else {
                t.cpu_ms
            };
            if used.is_some_and(|u| u >= limit) {
                return Some(skipped(
                    ErrorCode::QuotaExceeded,
                    format!("the tenant's daily quota of {what} is used up"),
                ));
            }
        }
        if let (Some(max), Some(queued)) = (limits.max_queued_jobs, t.queued.as_mut()) {
            if *queued >= max {
                return Some(skipped(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "the tenant has {queued} queued jobs; its limit (max_queued_jobs) is {max}"
                    ),
                ));
            }
            *queued += 1;
        }
        None
    }
}

/// Fires due schedules in batches; returns how many runs were enqueued.
pub async fn fire(
    store: &Store,
    queue: &Queue,
    defaults: &QuotaLimits,
    batch: i64,
    max_batches: usize,
) -> anyhow::Result<usize> {
    let bus = EventBus::new(
        queue.keys().clone(),
        queue.conn(),
        Duration::from_secs(3600),
    );
    let mut total = 0;
    let mut gate = Gate::new(store, queue, defaults);
    for _ in 0..max_batches {
        let now = Utc::now();
        let batch_due = store.due_schedules(batch).await?;
        let due = batch_due.due.len();
        let mut firings = Vec::with_capacity(batch_due.due.len());
        for d in &batch_due.due {
            let job = match job_for(&d.row, now) {
                Ok(job) => match gate.refusal(d, &job).await {
                    None => Ok(job),
                    Some(skip) => {
                        tracing::info!(schedule = %d.row.id, tenant = %d.row.tenant_id,
                            code = %skip.code, reason = %skip.message, "cron run skipped");
                        Err(skip)
                    }
                },
                Err(skip) => Err(skip),
            };
            firings.push(Firing {
                job,
                next_run_at: next_for(&d.row, now),
            });
        }
        let jobs = batch_due.commit(firings).await?;
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
        if (due as i64) < batch {
            break;
        }
    }
    Ok(total)
}
