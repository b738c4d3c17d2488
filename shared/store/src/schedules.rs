//! Cron schedules: tenant-scoped CRUD, and firing due runs exactly once: the run's
//! `(schedule, fire time)` row and its job are inserted in one transaction over rows taken
//! with `FOR UPDATE SKIP LOCKED`, so scheduler replicas never enqueue a run twice.

use chrono::{DateTime, Utc};
use serde_json::Value;
use switchyard_core::schedule::{Schedule, ScheduleRun};
use uuid::Uuid;

use crate::{NewJob, Result, Scope, Store};

const COLS: &str = "id, tenant_id, created_by, name, cron, timezone, job, paused, next_run_at, \
    last_run_at, created_at";

/// Runs shown with a schedule.
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

/// What the scheduler does with one due schedule.
pub struct Firing {
    /// The run's job (`None`: the template no longer makes a valid job; the run is skipped).
    pub job: Option<NewJob>,
    /// The schedule's next fire time after now (one catch-up run after downtime, not one per
    /// missed time).
    pub next_run_at: DateTime<Utc>,
}

impl Store {
    pub async fn create_schedule(&self, row: &ScheduleRow) -> Result<ScheduleRow> {
        let mut tx = self.tenant_tx(row.tenant_id).await?;
        let out = sqlx::query_as::<_, ScheduleRow>(&format!(
            "INSERT INTO schedules (id, tenant_id, created_by, name, cron, timezone, job, paused,
                next_run_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now()) RETURNING {COLS}"
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
        let runs: Vec<(DateTime<Utc>, Uuid)> = sqlx::query_as(
            "SELECT fire_at, job_id FROM schedule_runs WHERE schedule_id = $1
             ORDER BY fire_at DESC LIMIT $2",
        )
        .bind(id)
        .bind(RECENT_RUNS)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let runs = runs
            .into_iter()
            .map(|(fire_at, job_id)| ScheduleRun { fire_at, job_id })
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

    /// Fires up to `limit` due schedules: for each, `decide` builds the run's job and the next
    /// fire time; the run row `(schedule, fire time)`, the job and the schedule's advance commit
    /// together. Rows another scheduler holds are skipped. Returns the jobs inserted (to
    /// dispatch).
    pub async fn fire_due_schedules(
        &self,
        limit: i64,
        decide: impl Fn(&ScheduleRow) -> Firing,
    ) -> Result<Vec<NewJob>> {
        let mut tx = self.pool().begin().await?;
        let due = sqlx::query_as::<_, ScheduleRow>(&format!(
            "SELECT {COLS} FROM schedules WHERE NOT paused AND next_run_at <= now()
             ORDER BY next_run_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::new();
        for s in &due {
            let firing = decide(s);
            if let Some(job) = firing.job {
                let fresh = sqlx::query(
                    "INSERT INTO schedule_runs (schedule_id, fire_at, tenant_id, job_id)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(s.id)
                .bind(s.next_run_at)
                .bind(s.tenant_id)
                .bind(job.id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if fresh {
                    jobs.push(job);
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
