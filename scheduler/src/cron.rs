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

/// What a pass knows of one tenant: its use today and its queued jobs (counted before the
/// schedules are locked, plus the runs this pass enqueued); `None`: not known (admitted).
#[derive(Default)]
struct TenantUse {
    tokens: Option<u64>,
    cpu_ms: Option<u64>,
    queued: Option<u64>,
}

/// How long one Redis read of a tenant's daily use may take before the pass goes on without.
const USE_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Holds each due run to its tenant's limits, as the API holds a submission. The use of the
/// tenants with due schedules is read first ([`Gate::read_use`]), so the transaction that
/// holds the schedules' rows waits for no Redis or Postgres round trip.
pub struct Gate<'a> {
    store: &'a Store,
    quotas: Quotas,
    defaults: &'a QuotaLimits,
    day: String,
    /// Redis failed or was slow this pass: daily use is not read again.
    redis_down: bool,
    tenants: HashMap<Uuid, TenantUse>,
}

impl<'a> Gate<'a> {
    pub fn new(store: &'a Store, queue: &Queue, defaults: &'a QuotaLimits) -> Gate<'a> {
        Gate {
            store,
            quotas: Quotas::new(queue.keys().clone(), queue.conn()),
            defaults,
            day: utc_day(Utc::now()).0,
            redis_down: false,
            tenants: HashMap::new(),
        }
    }

    /// Reads the daily use and queued jobs of the tenants of up to `limit` due schedules (those
    /// not read yet this pass). Trouble leaves a tenant's use unknown: its runs are admitted,
    /// as the API admits a submission when Redis is down.
    pub async fn read_use(&mut self, limit: i64) -> anyhow::Result<()> {
        for (tenant, quotas) in self.store.due_schedule_tenants(limit).await? {
            if self.tenants.contains_key(&tenant) {
                continue;
            }
            let limits = quotas.over(self.defaults);
            let mut u = TenantUse::default();
            if !self.redis_down
                && (limits.llm_tokens_per_day.is_some()
                    || limits.sandbox_cpu_seconds_per_day.is_some())
            {
                match tokio::time::timeout(
                    USE_READ_TIMEOUT,
                    self.quotas.daily_use(tenant, &self.day),
                )
                .await
                {
                    Ok(Ok(d)) => (u.tokens, u.cpu_ms) = (Some(d.tokens), Some(d.cpu_ms)),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cron runs' daily quotas not checked this pass: redis unavailable");
                        self.redis_down = true;
                    }
                    Err(_) => {
                        tracing::warn!(
                            "cron runs' daily quotas not checked this pass: redis too slow"
                        );
                        self.redis_down = true;
                    }
                }
            }
            if let Some(max) = limits.max_queued_jobs {
                u.queued = self
                    .store
                    .queued_jobs(tenant, max.min(i64::MAX as u64) as i64)
                    .await
                    .ok()
                    .map(|c| c.max(0) as u64);
            }
            self.tenants.insert(tenant, u);
        }
        Ok(())
    }

    /// Whether the use of `tenant` was read this pass (a schedule that came due after
    /// [`Gate::read_use`], or that another scheduler left, waits for the next pass).
    pub fn knows(&self, tenant: Uuid) -> bool {
        self.tenants.contains_key(&tenant)
    }

    /// Why the run of `d` with `job` may not be enqueued now (`None`: it may; counted as
    /// queued).
    pub fn refusal(&mut self, d: &DueSchedule, job: &NewJob) -> Option<RunSkipped> {
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
                    format!("the credential (API key or end-user token) that created this schedule {what}"),
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
        let t = self.tenants.get_mut(&job.tenant_id)?;
        let daily = match job.kind.as_str() {
            "llm.chat" => limits
                .llm_tokens_per_day
                .map(|l| (l, t.tokens, "LLM tokens")),
            "code.exec" => limits
                .sandbox_cpu_seconds_per_day
                .map(|s| (s.saturating_mul(1000), t.cpu_ms, "sandbox CPU-seconds")),
            _ => None,
        };
        if let Some((limit, Some(used), what)) = daily {
            if used >= limit {
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
        gate.read_use(batch).await?;
        let batch_due = store.due_schedules(batch).await?;
        let due = batch_due.due.len();
        let mut firings = Vec::with_capacity(batch_due.due.len());
        for d in &batch_due.due {
            if !gate.knows(d.row.tenant_id) {
                firings.push(None);
                continue;
            }
            let job = match job_for(&d.row, now) {
                Ok(job) => match gate.refusal(d, &job) {
                    None => Ok(job),
                    Some(skip) => {
                        tracing::info!(schedule = %d.row.id, tenant = %d.row.tenant_id,
                            code = %skip.code, reason = %skip.message, "cron run skipped");
                        Err(skip)
                    }
                },
                Err(skip) => Err(skip),
            };
            firings.push(Some(Firing {
                job,
                next_run_at: next_for(&d.row, now),
            }));
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
