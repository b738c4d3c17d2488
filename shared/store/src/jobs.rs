//! Jobs in Postgres: group-committed inserts, tenant-scoped reads, and the fenced state machine
//! (every write of a run names its `attempt` and is ignored once a newer attempt exists).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
pub use switchyard_core::job::DispatchItem;
use switchyard_core::job::{job_error_codes, Job, JobError, JobStatus};
use switchyard_core::queueing::Backoff;
use uuid::Uuid;

use crate::{NewJob, Result, Scope, Store};

pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, created_by, kind, queue, priority, status, attempt, \
    max_attempts, timeout_s, input, output, error, metadata, trace_parent, created_at, started_at, \
    finished_at, run_at, lease_owner, lease_expires_at, cancel_requested_at, dispatch_epoch, event_seq, \
    backoff, webhook_url";

/// A job row as stored (also read from a row's `to_jsonb`, as webhook deliveries keep it).
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct JobRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub created_by: String,
    pub kind: String,
    pub queue: String,
    pub priority: i16,
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_s: Option<i32>,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub metadata: Value,
    pub trace_parent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub run_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub dispatch_epoch: i64,
    pub event_seq: i64,
    pub backoff: Option<Value>,
    pub webhook_url: Option<String>,
}

impl JobRow {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn job_error(&self) -> Option<JobError> {
        self.error
            .as_ref()
            .and_then(|e| serde_json::from_value(e.clone()).ok())
    }

    /// The client-facing representation.
    pub fn to_job(&self) -> Job {
        Job {
            id: self.id,
            kind: self.kind.clone(),
            queue: self.queue.clone(),
            priority: self.priority,
            status: self.status(),
            dead: self.status() == JobStatus::Failed,
            run_at: self.run_at,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            backoff: self.backoff(),
            webhook_url: self.webhook_url.clone(),
            input: self.input.clone(),
            output: self.output.clone(),
            error: self.job_error(),
            metadata: self.metadata.clone(),
            timeout_s: self.timeout_s,
            created_by: self.created_by.clone(),
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        }
    }

    /// The job's own retry backoff, if it set one (and it still parses).
    pub fn backoff(&self) -> Option<Backoff> {
        serde_json::from_value(self.backoff.clone()?).ok()
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

/// Filters of `GET /v1/jobs`.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    /// Only jobs with an id below this one (the cursor).
    pub before: Option<Uuid>,
    pub limit: i64,
}

#[derive(Debug)]
pub enum CancelOutcome {
    NotFound,
    /// Was queued: now cancelled; the `cancelled` event has this seq.
    Cancelled(JobRow),
    /// Is running: a durable cancel request was recorded; the worker confirms.
    Requested(JobRow),
    /// Already terminal.
    Finished(JobRow),
}

#[derive(Debug)]
pub enum ClaimOutcome {
    /// This worker now runs `attempt` (the fencing token) of the job.
    Claimed(JobRow),
    /// Nothing to run: the job is gone or finished.
    Skip(&'static str),
    /// A live lease holds the job (its `lease_owner` runs it).
    Held(JobRow),
    /// The job waits for `run_at`: park it in the delayed set.
    NotDue(JobRow),
    /// The claim finished the job instead (cancel requested, attempts exhausted): publish its
    /// terminal event (`event_seq`).
    Finalized(JobRow),
}

/// How a run ended, as written by the worker for its attempt.
#[derive(Debug, Clone)]
pub enum RunEnd {
    Succeeded(Value),
    Failed(JobError),
    Cancelled,
    /// Retry later: back to `queued` with `run_at`.
    Retry {
        error: JobError,
        run_at: DateTime<Utc>,
    },
    /// Not runnable yet (e.g. an earlier conversation turn is pending): back to `queued` with
    /// `run_at`, and the attempt is given back (`max_attempts + 1`; `attempt` itself only grows).
    Defer {
        run_at: DateTime<Utc>,
    },
    /// The worker shut down before the run ended: back to `queued` with the reason as its
    /// error, and the attempt is given back like a deferral's (the job did not fail; on its
    /// last attempt it still runs again).
    Released {
        error: JobError,
        run_at: DateTime<Utc>,
    },
}

impl RunEnd {
    /// When a run that goes back to the queue is due. (Such an end, or a failure, is refused
    /// once the job's cancel was asked for: its run ends `cancelled` instead, as the cancel
    /// promised, never waiting out a backoff.)
    pub fn requeued_at(&self) -> Option<DateTime<Utc>> {
        match self {
            RunEnd::Retry { run_at, .. }
            | RunEnd::Defer { run_at }
            | RunEnd::Released { run_at, .. } => Some(*run_at),
            _ => None,
        }
    }
}

/// The rows of the ids in `$1`, locked in id order first: every statement that updates many
/// jobs at once (dispatch marks, batched claims, batched run ends) takes its row locks in the
/// same order, so two of them never deadlock (Postgres would abort one after
/// `deadlock_timeout`, a 1 s stall measured under load before this).
pub(crate) const LOCK_IN_ORDER: &str =
    "ARRAY(SELECT id FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE)";

pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Store {
    /// Which of `ids` are jobs (a commit whose reply was lost: were its rows written?).
    pub async fn existing_jobs(&self, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(self.pool())
            .await?)
    }

    /// Inserts a batch in one statement (group commit). On failure the caller retries rows one by
    /// one so one bad row never fails the others.
    pub async fn insert_jobs(&self, jobs: &[NewJob]) -> Result<()> {
        crate::insert::insert_jobs_with(self.pool(), jobs).await
    }

    /// The jobs of `ids` in the scope, in the order of `ids` (those not found left out).
    pub async fn get_jobs(&self, scope: impl Into<Scope>, ids: &[Uuid]) -> Result<Vec<JobRow>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let rows = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1) AND tenant_id = $2
               AND ($3::text IS NULL OR created_by = $3)"
        ))
        .bind(ids)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_id: std::collections::HashMap<Uuid, JobRow> =
            rows.into_iter().map(|r| (r.id, r)).collect();
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    /// A job in the scope (another tenant's job, or another end user's, is `None`, like a
    /// missing one).
    pub async fn get_job(&self, scope: impl Into<Scope>, id: Uuid) -> Result<Option<JobRow>> {
        let scope = scope.into();
        // one statement: the function sets the tenant for row-level security itself, local
        // to the statement's transaction (migration 22), instead of BEGIN; SET LOCAL; ...; COMMIT
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM switchyard_job_scoped($1, $2, $3)"
        ))
        .bind(scope.tenant_id)
        .bind(id)
        .bind(scope.creator)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Internal lookup, any tenant (workers, reconciler).
    pub async fn get_job_unscoped(&self, id: Uuid) -> Result<Option<JobRow>> {
        Ok(
            sqlx::query_as::<_, JobRow>(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Newest first; `filter.before` is the cursor.
    pub async fn list_jobs(
        &self,
        scope: impl Into<Scope>,
        filter: &JobFilter,
    ) -> Result<Vec<JobRow>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let rows = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE tenant_id = $1
               AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR kind = $3)
               AND ($4::uuid IS NULL OR id < $4)
               AND ($6::text IS NULL OR created_by = $6)
             ORDER BY id DESC LIMIT $5"
        ))
        .bind(scope.tenant_id)
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.kind.as_deref())
        .bind(filter.before)
        .bind(filter.limit)
        .bind(scope.creator)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Cancels a queued job at once, or records a cancel request for a running one.
    pub async fn cancel_job(&self, scope: impl Into<Scope>, id: Uuid) -> Result<CancelOutcome> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let cancelled = sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
                cancel_requested_at = COALESCE(cancel_requested_at, now()), event_seq = event_seq + 1,
                lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND tenant_id = $2 AND status = 'queued'
               AND ($3::text IS NULL OR created_by = $3)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = cancelled {
            tx.commit().await?;
            return Ok(CancelOutcome::Cancelled(row));
        }
        let requested = sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now()
             WHERE id = $1 AND tenant_id = $2 AND status = 'running'
               AND ($3::text IS NULL OR created_by = $3)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(row) = requested {
            return Ok(CancelOutcome::Requested(row));
        }
        match self.get_job(&scope, id).await? {
            None => Ok(CancelOutcome::NotFound),
            Some(row) if row.status().is_terminal() => Ok(CancelOutcome::Finished(row)),
            // it changed state between our statements (e.g. was just claimed): try again
            Some(_) => Box::pin(self.cancel_job(scope, id)).await,
        }
    }

    /// Claims a job for a run: increments `attempt` (the fencing token) and takes the lease.
    /// Jobs that cannot run any more are finalized here (cancel requested, attempts exhausted).
    pub async fn claim(&self, id: Uuid, worker: &str, lease: Duration) -> Result<ClaimOutcome> {
        let claimed = self.claim_many(&[id], worker, lease).await?.pop();
        if let Some(row) = claimed {
            return Ok(ClaimOutcome::Claimed(row));
        }
        let Some(row) = self.get_job_unscoped(id).await? else {
            return Ok(ClaimOutcome::Skip("missing"));
        };
        let status = row.status();
        if status.is_terminal() {
            return Ok(ClaimOutcome::Skip("finished"));
        }
        let lease_live =
            status == JobStatus::Running && row.lease_expires_at.is_some_and(|t| t >= Utc::now());
        if lease_live {
            return Ok(ClaimOutcome::Held(row));
        }
        // what the claim left alone was not claimable by Postgres' clock: a running job whose
        // lease this host's clock (ahead of Postgres') or the moment since calls expired is
        // still held, never dropped as raced (its entry would be acknowledged while it runs)
        let held = |row: JobRow| {
            if row.status() == JobStatus::Running {
                ClaimOutcome::Held(row)
            } else {
                ClaimOutcome::Skip("raced")
            }
        };
        if row.cancel_requested_at.is_some() {
            if let Some(done) = self
                .finalize_unowned(id, row.attempt, JobStatus::Cancelled, None)
                .await?
            {
                return Ok(ClaimOutcome::Finalized(done));
            }
            return Ok(held(row));
        }
        if row.attempt >= row.max_attempts {
            let err = JobError::new(
                job_error_codes::LEASE_EXPIRED,
                format!(
                    "the worker running attempt {} stopped responding and no attempts are left",
                    row.attempt
                ),
                true,
            );
            if let Some(done) = self
                .finalize_unowned(id, row.attempt, JobStatus::Failed, Some(&err))
                .await?
            {
                return Ok(ClaimOutcome::Finalized(done));
            }
            return Ok(held(row));
        }
        // a queued job with a start time that the claim did not take was not due by
        // Postgres' clock; this host's clock may be ahead of it, so never drop it as raced
        // (the reconciler re-dispatches only jobs of an older dispatch epoch): it goes back to
        // the delayed set and is tried again when due
        if status == JobStatus::Queued && row.run_at.is_some() {
            return Ok(ClaimOutcome::NotDue(row));
        }
        Ok(held(row))
    }

    /// Claims many jobs in one statement (the fast path of a fetched batch). Returns the rows it
    /// claimed; the others go through [`Store::claim`] to learn why not.
    pub async fn claim_many(
        &self,
        ids: &[Uuid],
        worker: &str,
        lease: Duration,
    ) -> Result<Vec<JobRow>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET attempt = attempt + 1, status = 'running',
                started_at = COALESCE(started_at, now()), lease_owner = $2,
                lease_expires_at = now() + make_interval(secs => $3 / 1000.0),
                run_at = NULL, updated_at = now(),
                dispatch_epoch = GREATEST(dispatch_epoch,
                    (SELECT value FROM system_state WHERE key = 'redis_epoch'))
             WHERE id = ANY({LOCK_IN_ORDER}) AND cancel_requested_at IS NULL AND attempt < max_attempts
               AND ((status = 'queued' AND (run_at IS NULL OR run_at <= now()))
                 OR (status = 'running' AND lease_expires_at < now()))
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(ids)
        .bind(worker)
        .bind(millis(lease))
        .fetch_all(self.batch_pool())
        .await?)
    }

    /// Ends a job nobody holds a live lease on (used by claim and the reconciler).
    async fn finalize_unowned(
        &self,
        id: Uuid,
        attempt: i32,
        status: JobStatus,
        error: Option<&JobError>,
    ) -> Result<Option<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET status = $3, error = $4, finished_at = now(), updated_at = now(),
                event_seq = event_seq + 1, lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND attempt = $2 AND status IN ('queued', 'running')
               AND (status = 'queued' OR lease_expires_at IS NULL OR lease_expires_at < now())
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(id)
        .bind(attempt)
        .bind(status.as_str())
        .bind(error.map(error_json))
        .fetch_optional(self.pool())
        .await?)
    }

    /// Extends the lease of a run. `None`: the run was fenced out (a newer attempt exists or the
    /// job ended); `Some(true)`: a cancel was requested.
    pub async fn heartbeat(&self, id: Uuid, attempt: i32, lease: Duration) -> Result<Option<bool>> {
        let row: Option<(bool,)> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3 / 1000.0)
             WHERE id = $1 AND attempt = $2 AND status = 'running'
             RETURNING cancel_requested_at IS NOT NULL",
        )
        .bind(id)
        .bind(attempt)
        .bind(millis(lease))
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.0))
    }
}

/// A job error as stored (a NUL in a message built elsewhere than [`JobError::new`] too).
pub(crate) fn error_json(e: &JobError) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    switchyard_core::nul::clean_json(&mut v);
    v
}
