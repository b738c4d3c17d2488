//! Cron schedules: tenant-scoped CRUD, and firing due runs exactly once: the run's
//! `(schedule, fire time)` row and its job (or the reason it was skipped) are inserted in one
//! transaction over rows taken with `FOR UPDATE SKIP LOCKED`, so scheduler replicas never
//! enqueue a run twice.

use chrono::{DateTime, Utc};
use serde_json::Value;
use switchyard_core::quota::QuotaLimits;
use switchyard_core::schedule::{RunSkipped, Schedule, ScheduleRun};
use uuid::Uuid;

use crate::{NewJob, Result, Scope, Store};

const COLS: &str = "id, tenant_id, created_by, name, cron, timezone, job, paused, next_run_at, \
    last_run_at, created_at";

/// Runs shown with a schedule; also the skipped runs a schedule keeps.
const RECENT_RUNS: i64 = 20;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub created_by: String,
    pub name: Option<String>,
    pub cron: String,
    pub timezone: String,
    pub job: Value,
    pub paused: bool,
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl ScheduleRow {
    pub fn to_schedule(&self, runs: Option<Vec<ScheduleRun>>) -> Schedule {
        Schedule {
            id: self.id,
            name: self.name.clone(),
            cron: self.cron.clone(),
            timezone: self.timezone.clone(),
            job: self.job.clone(),
            paused: self.paused,
            next_run_at: self.next_run_at,
            last_run_at: self.last_run_at,
            created_by: self.created_by.clone(),
            created_at: self.created_at,
            runs,
        }
    }
}

/// A due schedule with what the scheduler checks before it enqueues the run: what a
/// `POST /v1/jobs` by its creator would be checked against now.
#[derive(Debug, Clone)]
pub struct DueSchedule {
    pub row: ScheduleRow,
    /// The tenant's own quotas (unset fields: the configured defaults).
    pub quotas: QuotaLimits,
    /// The models the tenant may use (`None`: all).
    pub allowed_models: Option<Vec<String>>,
    /// The credential that created the schedule: for an API key `ok`, `revoked`, `expired` or
    /// `missing`; for an end user's token `expired` once past its expiry (else `None`).
    pub creator_key: Option<String>,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    #[sqlx(flatten)]
    row: ScheduleRow,
    quotas: Option<Value>,
    allowed_models: Option<Vec<String>>,
    creator_key: Option<String>,
}

/// What the scheduler does with one due schedule.
pub struct Firing {
    /// The run's job, or why the run is skipped (recorded with the fire time; no job).
    pub job: std::result::Result<NewJob, RunSkipped>,
    /// The schedule's next fire time after now (one catch-up run after downtime, not one per
    /// missed time).
    pub next_run_at: DateTime<Utc>,
}

impl Store {
    pub async fn create_schedule(
        &self,
        row: &ScheduleRow,
        creator_expires_at: Option<DateTime<Utc>>,
    ) -> Result<ScheduleRow> {
        let mut tx = self.tenant_tx(row.tenant_id).await?;
        let out = sqlx::query_as::<_, ScheduleRow>(&format!(
            "INSERT INTO schedules (id, tenant_id, created_by, name, cron, timezone, job, paused,
                next_run_at, created_at, creator_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), $10) RETURNING {COLS}"
        ))
        .bind(row.id)
        .bind(row.tenant_id)
        .bind(&row.created_by)
        .bind(&row.name)
        .bind(&row.cron)
        .bind(&row.timezone)
        .bind(&row.job)
        .bind(row.paused)
        .bind(row.next_run_at)
        .bind(creator_expires_at)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The schedule with its recent runs (newest first).
    pub async fn get_schedule(
        &self,
        scope: impl Into<Scope>,
        id: Uuid,
    ) -> Result<Option<(ScheduleRow, Vec<ScheduleRun>)>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let row = sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLS} FROM schedules WHERE id = $1 AND tenant_id = $2
               AND ($3::text IS NULL OR created_by = $3)"
        ))
        .bind(id)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let runs: Vec<RunRow> = sqlx::query_as(
            "SELECT fire_at, job_id, skipped_code, skipped_message FROM schedule_runs
             WHERE schedule_id = $1 ORDER BY fire_at DESC LIMIT $2",
        )
        .bind(id)
        .bind(RECENT_RUNS)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let runs = runs
            .into_iter()
            .map(|(fire_at, job_id, code, message)| ScheduleRun {
                fire_at,
                job_id,
                skipped: code.map(|code| RunSkipped {
                    code,
                    message: message.unwrap_or_default(),
                }),
            })
            .collect();
        Ok(Some((row, runs)))
    }

    /// Newest first; `before` is the cursor.
    pub async fn list_schedules(
        &self,
        scope: impl Into<Scope>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ScheduleRow>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let rows = sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLS} FROM schedules WHERE tenant_id = $1
               AND ($2::uuid IS NULL OR id < $2) AND ($4::text IS NULL OR created_by = $4)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(scope.tenant_id)
        .bind(before)
        .bind(limit)
        .bind(&scope.creator)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Deletes a schedule (its jobs stay); false when there is none in the scope.
    pub async fn delete_schedule(&self, scope: impl Into<Scope>, id: Uuid) -> Result<bool> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let n = sqlx::query(
            "DELETE FROM schedules WHERE id = $1 AND tenant_id = $2
               AND ($3::text IS NULL OR created_by = $3)",
        )
        .bind(id)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Pauses or resumes; a resumed schedule next fires at `next_run_at`.
    pub async fn set_schedule_paused(
        &self,
        scope: impl Into<Scope>,
        id: Uuid,
        paused: bool,
        next_run_at: DateTime<Utc>,
    ) -> Result<Option<ScheduleRow>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let row = sqlx::query_as::<_, ScheduleRow>(&format!(
            "UPDATE schedules SET paused = $4,
                next_run_at = CASE WHEN $4 OR NOT paused THEN next_run_at ELSE $5 END,
                updated_at = now()
             WHERE id = $1 AND tenant_id = $2 AND ($3::text IS NULL OR created_by = $3)
             RETURNING {COLS}"
        ))
        .bind(id)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .bind(paused)
        .bind(next_run_at)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// The tenants of up to `limit` due schedules, with their own quotas (read without locks:
    /// the scheduler reads their use before it takes the schedules; same order as
    /// [`Store::due_schedules`], so both see the same schedules unless another scheduler holds
    /// some).
    pub async fn due_schedule_tenants(&self, limit: i64) -> Result<Vec<(Uuid, QuotaLimits)>> {
        let rows: Vec<(Uuid, Option<Value>)> = sqlx::query_as(
            "SELECT id, quotas FROM tenants WHERE id IN (
                 SELECT tenant_id FROM schedules WHERE NOT paused AND next_run_at <= now()
                 ORDER BY next_run_at, id LIMIT $1)",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, q)| (id, crate::tenants::parse_quotas(q)))
            .collect())
    }

    /// Takes up to `limit` due schedules (rows another scheduler holds are skipped) in a
    /// transaction that [`DueBatch::commit`] ends: the scheduler decides each run in between.
    pub async fn due_schedules(&self, limit: i64) -> Result<DueBatch> {
        let mut tx = self.pool().begin().await?;
        let cols = COLS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let due = sqlx::query_as::<_, DueRow>(&format!(
            "SELECT {cols}, t.quotas, t.allowed_models,
                    CASE WHEN s.created_by ~ '^key:[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$'
                    THEN COALESCE(
                        (SELECT CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked'
                                     WHEN k.expires_at <= now() THEN 'expired'
                                     ELSE 'ok' END
                         FROM api_keys k
                         WHERE k.id = substr(s.created_by, 5)::uuid AND k.tenant_id = s.tenant_id),
                        'missing')
                    WHEN s.created_by LIKE 'key:%' THEN 'missing'
                    WHEN s.creator_expires_at <= now() THEN 'expired' END AS creator_key
             FROM schedules s JOIN tenants t ON t.id = s.tenant_id
             WHERE NOT s.paused AND s.next_run_at <= now()
             ORDER BY s.next_run_at, s.id LIMIT $1 FOR UPDATE OF s SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let due = due
            .into_iter()
            .map(|d| DueSchedule {
                row: d.row,
                quotas: crate::tenants::parse_quotas(d.quotas),
                allowed_models: d.allowed_models,
                creator_key: d.creator_key,
            })
            .collect();
        Ok(DueBatch { tx, due })
    }
}

/// Due schedules held (`FOR UPDATE`) until their runs are committed.
pub struct DueBatch {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub due: Vec<DueSchedule>,
}

impl DueBatch {
    /// Commits one firing per due schedule (in order): the run row `(schedule, fire time)`
    /// with its job or skip reason, the job, and the schedule's advance, together; `None`
    /// leaves a schedule due (a later pass fires it). Returns the jobs inserted (to dispatch).
    pub async fn commit(self, firings: Vec<Option<Firing>>) -> Result<Vec<NewJob>> {
        let DueBatch { mut tx, due } = self;
        let mut jobs = Vec::new();
        for (d, firing) in due.iter().zip(firings) {
            let Some(firing) = firing else { continue };
            let s = &d.row;
            let (job_id, skipped) = match &firing.job {
                Ok(job) => (Some(job.id), None),
                Err(skip) => (None, Some(skip)),
            };
            let fresh = sqlx::query(
                "INSERT INTO schedule_runs
                     (schedule_id, fire_at, tenant_id, job_id, skipped_code, skipped_message)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(s.id)
            .bind(s.next_run_at)
            .bind(s.tenant_id)
            .bind(job_id)
            .bind(skipped.map(|k| &k.code))
            .bind(skipped.map(|k| &k.message))
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            match firing.job {
                Ok(job) if fresh => jobs.push(job),
                Ok(_) => {}
                Err(_) => {
                    // a schedule keeps its recent skipped runs only
                    sqlx::query(
                        "DELETE FROM schedule_runs WHERE schedule_id = $1 AND job_id IS NULL
                           AND fire_at < (SELECT min(fire_at) FROM (
                               SELECT fire_at FROM schedule_runs
                               WHERE schedule_id = $1 AND job_id IS NULL
                               ORDER BY fire_at DESC LIMIT $2) recent)",
                    )
                    .bind(s.id)
                    .bind(RECENT_RUNS)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            sqlx::query(
                "UPDATE schedules SET next_run_at = $2, last_run_at = $3, updated_at = now()
                 WHERE id = $1",
            )
            .bind(s.id)
            .bind(firing.next_run_at)
            .bind(s.next_run_at)
            .execute(&mut *tx)
            .await?;
        }
        crate::insert::insert_jobs_with(&mut *tx, &jobs).await?;
        tx.commit().await?;
        Ok(jobs)
    }
}

type RunRow = (DateTime<Utc>, Option<Uuid>, Option<String>, Option<String>);
