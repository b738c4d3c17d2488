//! New jobs: the row to insert ([`NewJob`]) and the group-commit INSERT (one statement for a
//! batch), usable on the pool or inside a transaction (a conversation turn stores its message
//! and its job together).

use chrono::{DateTime, Utc};
use serde_json::Value;
use switchyard_core::job::{DispatchItem, Job, JobStatus};
use switchyard_core::queueing::Backoff;
use uuid::Uuid;

use crate::Result;

/// A job to insert. `event_seq` is 1: the `queued` status event.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub created_by: String,
    pub kind: String,
    pub queue: String,
    pub priority: i16,
    pub max_attempts: i32,
    pub timeout_s: Option<i32>,
    pub input: Value,
    pub metadata: Value,
    pub trace_parent: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Not before this time (a delayed job stays `queued` until then).
    pub run_at: Option<DateTime<Utc>>,
    pub backoff: Option<Backoff>,
    /// The job's own webhook (the tenant's, if any, is filled in by the insert).
    pub webhook_url: Option<String>,
}

impl NewJob {
    /// The row as it is right after insertion (saves a read-back).
    pub fn to_job(&self) -> Job {
        Job {
            id: self.id,
            kind: self.kind.clone(),
            queue: self.queue.clone(),
            priority: self.priority,
            status: JobStatus::Queued,
            dead: false,
            run_at: self.run_at,
            attempt: 0,
            max_attempts: self.max_attempts,
            backoff: self.backoff.clone(),
            webhook_url: self.webhook_url.clone(),
            input: self.input.clone(),
            output: None,
            error: None,
            metadata: self.metadata.clone(),
            timeout_s: self.timeout_s,
            created_by: self.created_by.clone(),
            created_at: self.created_at,
            started_at: None,
            finished_at: None,
        }
    }

    pub fn dispatch_item(&self) -> DispatchItem {
        DispatchItem {
            id: self.id,
            tenant_id: self.tenant_id,
            queue: self.queue.clone(),
            priority: self.priority,
            run_at: self.run_at,
        }
    }
}

/// Inserts jobs in one statement, on a pool or inside a transaction.
pub(crate) async fn insert_jobs_with<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    jobs: &[NewJob],
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(jobs.len());
    let mut tenants = Vec::with_capacity(jobs.len());
    let mut created_by = Vec::with_capacity(jobs.len());
    let mut kinds = Vec::with_capacity(jobs.len());
    let mut queues = Vec::with_capacity(jobs.len());
    let mut priorities = Vec::with_capacity(jobs.len());
    let mut max_attempts = Vec::with_capacity(jobs.len());
    let mut timeouts: Vec<Option<i32>> = Vec::with_capacity(jobs.len());
    let mut inputs = Vec::with_capacity(jobs.len());
    let mut metadata = Vec::with_capacity(jobs.len());
    let mut traces: Vec<Option<String>> = Vec::with_capacity(jobs.len());
    let mut created = Vec::with_capacity(jobs.len());
    let mut run_at = Vec::with_capacity(jobs.len());
    let mut backoff: Vec<Option<serde_json::Value>> = Vec::with_capacity(jobs.len());
    let mut webhooks: Vec<Option<String>> = Vec::with_capacity(jobs.len());
    for j in jobs {
        ids.push(j.id);
        tenants.push(j.tenant_id);
        created_by.push(j.created_by.clone());
        kinds.push(j.kind.clone());
        queues.push(j.queue.clone());
        priorities.push(j.priority);
        max_attempts.push(j.max_attempts);
        timeouts.push(j.timeout_s);
        inputs.push(j.input.clone());
        metadata.push(j.metadata.clone());
        traces.push(j.trace_parent.clone());
        created.push(j.created_at);
        run_at.push(j.run_at);
        backoff.push(
            j.backoff
                .as_ref()
                .and_then(|b| serde_json::to_value(b).ok()),
        );
        webhooks.push(j.webhook_url.clone());
    }
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, created_by, kind, queue, priority, status, max_attempts,
            timeout_s, input, metadata, trace_parent, created_at, event_seq, run_at, backoff,
            webhook_url)
         SELECT t.id, t.tenant_id, t.created_by, t.kind, t.queue, t.priority, 'queued',
            t.max_attempts, t.timeout_s, t.input, t.metadata, t.trace_parent, t.created_at, 1,
            t.run_at, t.backoff, COALESCE(t.webhook_url, tn.webhook_url)
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int2[],
            $7::int4[], $8::int4[], $9::jsonb[], $10::jsonb[], $11::text[], $12::timestamptz[],
            $13::timestamptz[], $14::jsonb[], $15::text[])
         AS t(id, tenant_id, created_by, kind, queue, priority, max_attempts, timeout_s, input,
            metadata, trace_parent, created_at, run_at, backoff, webhook_url)
         LEFT JOIN tenants tn ON tn.id = t.tenant_id",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&created_by)
    .bind(&kinds)
    .bind(&queues)
    .bind(&priorities)
    .bind(&max_attempts)
    .bind(&timeouts)
    .bind(&inputs)
    .bind(&metadata)
    .bind(&traces)
    .bind(&created)
    .bind(&run_at)
    .bind(&backoff)
    .bind(&webhooks)
    .execute(db)
    .await?;
    Ok(())
}
