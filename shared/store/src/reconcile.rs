//! The reconciler's and metrics' queries: jobs never dispatched in the current Redis epoch
//! (under a lock one scheduler holds at a time), running jobs whose lease ran out, counts and
//! queue ages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use switchyard_core::job::DispatchItem;
use uuid::Uuid;

use crate::jobs::millis;
use crate::{Result, Store};

/// Key of the advisory lock that lets one scheduler at a time start Redis epochs and
/// re-dispatch jobs (two would each dispatch the same jobs, and after a Redis loss each start
/// an epoch and dispatch the whole backlog again).
pub const DISPATCH_LOCK: i64 = 0x5357_4450_5441_4348;

/// Held while one scheduler re-dispatches; released with its transaction (when dropped, too).
pub struct DispatchLock(sqlx::Transaction<'static, sqlx::Postgres>);

impl DispatchLock {
    pub async fn release(self) -> Result<()> {
        self.0.commit().await?;
        Ok(())
    }
}

/// Most queued jobs the oldest-age gauge walks per queue and scrape.
const OLDEST_WALK: i64 = 10_000;

impl Store {
    /// Takes [`DISPATCH_LOCK`] unless another scheduler holds it (then `None`).
    pub async fn try_dispatch_lock(&self) -> Result<Option<DispatchLock>> {
        let mut tx = self.pool().begin().await?;
        let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(DISPATCH_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        Ok(mine.then_some(DispatchLock(tx)))
    }

    /// Unfinished jobs not handed to Redis in `epoch` (never dispatched, or Redis lost them),
    /// last written at least `min_age` ago (so a job just submitted or requeued is left to
    /// its own dispatch, not dispatched twice at once), oldest first, at most `limit`; with
    /// each its attempt (for [`Store::mark_redispatched`]).
    pub async fn undispatched(
        &self,
        epoch: i64,
        min_age: Duration,
        limit: i64,
    ) -> Result<Vec<(DispatchItem, i32)>> {
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT id, tenant_id, queue, priority, run_at, attempt FROM jobs
             WHERE status IN ('queued', 'running') AND dispatch_epoch < $1
               AND updated_at < now() - make_interval(secs => $2 / 1000.0)
             ORDER BY dispatch_epoch, id LIMIT $3",
        )
        .bind(epoch)
        .bind(millis(min_age))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, tenant, queue, priority, run_at, attempt)| {
                (to_item((id, tenant, queue, priority, run_at)), attempt)
            })
            .collect())
    }

    /// Per queue, the unfinished jobs marked dispatched in `epoch` that have kept their state
    /// for at least `settle`: Redis should hold an entry for each (in a stream, waiting or
    /// delivered; in a tenant's lane; in the delayed set). See the scheduler's loss check.
    pub async fn settled_dispatched(
        &self,
        epoch: i64,
        settle: Duration,
    ) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT queue, count(*) FROM jobs
             WHERE status IN ('queued', 'running') AND dispatch_epoch = $1
               AND updated_at < now() - make_interval(secs => $2 / 1000.0)
             GROUP BY queue",
        )
        .bind(epoch)
        .bind(millis(settle))
        .fetch_all(self.pool())
        .await?)
    }

    /// Running jobs whose lease ran out more than `grace` ago: their worker is gone and the
    /// stream entry may be gone too. Their lease is pushed forward by `grace` so each pass picks
    /// different jobs (no full rescan of the backlog).
    pub async fn take_expired_leases(
        &self,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<DispatchItem>> {
        let rows: Vec<ItemRow> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = now() - make_interval(secs => 0.001)
             WHERE id IN (
                SELECT id FROM jobs WHERE status = 'running'
                  AND lease_expires_at < now() - make_interval(secs => $1 / 1000.0)
                ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id, tenant_id, queue, priority, run_at",
        )
        .bind(millis(grace))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(to_item).collect())
    }

    /// Whether `queue` has an unfinished job (queued, delayed included, or running): through
    /// the partial indexes `jobs_queued_created` and `jobs_running_lease`.
    pub async fn queue_in_use(&self, queue: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE queue = $1 AND status = 'queued')
                 OR EXISTS (SELECT 1 FROM jobs WHERE queue = $1 AND status = 'running')",
        )
        .bind(queue)
        .fetch_one(self.pool())
        .await?)
    }

    /// The queues schedules' job templates name (paused ones too: they may be resumed).
    pub async fn scheduled_queues(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT job->>'queue' FROM schedules WHERE job->>'queue' IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Unfinished jobs by (kind, status) for metrics, and whether they are estimates: counted
    /// while there are at most `exact_up_to` (an index read of that many at most, whatever the
    /// number of finished ones, counted by `jobs_estimate`), else the planner's estimates (no
    /// scan: a backlog of millions is not read on every scrape).
    pub async fn job_counts(&self, exact_up_to: i64) -> Result<(Vec<(String, String, i64)>, bool)> {
        let counted: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, status, count(*) FROM (
                 SELECT kind, status FROM jobs WHERE status IN ('queued', 'running')
                 LIMIT $1 + 1) unfinished
             GROUP BY kind, status ORDER BY kind, status",
        )
        .bind(exact_up_to)
        .fetch_all(self.pool())
        .await?;
        if counted.iter().map(|c| c.2).sum::<i64>() <= exact_up_to {
            return Ok((counted, false));
        }
        let mut estimated = Vec::new();
        for kind in switchyard_core::JobKind::ALL {
            for status in ["queued", "running"] {
                // both literals come from fixed lists, never from input
                let plan: serde_json::Value = sqlx::query_scalar(&format!(
                    "EXPLAIN (FORMAT JSON) SELECT 1 FROM jobs
                     WHERE kind = '{}' AND status = '{status}'",
                    kind.as_str()
                ))
                .fetch_one(self.pool())
                .await?;
                let rows = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
                estimated.push((kind.as_str().to_string(), status.to_string(), rows as i64));
            }
        }
        Ok((estimated, true))
    }

    /// The planner's estimate of all rows of `jobs` (no scan).
    pub async fn jobs_estimate(&self) -> Result<i64> {
        let n: f64 = sqlx::query_scalar(
            "SELECT GREATEST(reltuples, 0)::float8 FROM pg_class WHERE oid = 'jobs'::regclass",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(n as i64)
    }

    /// Deletes up to `limit` finished jobs past their tenant's retention (`job_retention_days`,
    /// else `default_days`; 0 keeps them), oldest first, with their schedule-run rows and
    /// webhook deliveries; returns the ids (their Redis events are dropped by the caller).
    /// Audit rows stay (their own retention). A job whose webhook is still being delivered waits
    /// for a later pass; a job another transaction holds (a retry requeueing it) is skipped,
    /// and the row is taken only while it is still finished (a job retried meanwhile was
    /// deleted after its retry had answered 202).
    pub async fn prune_finished_jobs(&self, default_days: i32, limit: i64) -> Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            // tenants in a random order: a tenant with a large backlog to prune fills every
            // batch it comes first in, and the others' turn would wait for all of it
            "WITH t AS (
                 SELECT id, COALESCE(job_retention_days, $1) AS days FROM tenants
                 WHERE COALESCE(job_retention_days, $1) > 0
                 ORDER BY random()),
             victims AS (
                 SELECT j.id FROM t CROSS JOIN LATERAL (
                     SELECT id FROM jobs
                     WHERE tenant_id = t.id AND status IN ('succeeded', 'failed', 'cancelled')
                       AND finished_at < now() - make_interval(days => t.days)
                       AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                       WHERE d.job_id = jobs.id AND d.state = 'pending')
                     ORDER BY finished_at LIMIT $2
                     FOR UPDATE SKIP LOCKED) j
                 LIMIT $2),
             runs AS (DELETE FROM schedule_runs WHERE job_id IN (SELECT id FROM victims)),
             hooks AS (DELETE FROM webhook_deliveries WHERE job_id IN (SELECT id FROM victims))
             DELETE FROM jobs WHERE id IN (SELECT id FROM victims)
               AND status IN ('succeeded', 'failed', 'cancelled') RETURNING id",
        )
        .bind(default_days)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Sets (or with `None` clears) a tenant's own job retention in days (0: forever); false
    /// when there is no such tenant.
    pub async fn set_tenant_job_retention(&self, name: &str, days: Option<i32>) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET job_retention_days = $2 WHERE name = $1")
            .bind(name)
            .bind(days)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Per queue, how long the oldest job ready to run has waited: the first queued job (by
    /// creation) that is due, counted from when it became due (its creation, or the time a
    /// retry or a delay set). Delayed jobs and jobs waiting out a backoff are not waiting yet.
    /// (An index walk in creation order per queue, past the delayed jobs at its head, bounded
    /// at [`OLDEST_WALK`] jobs: every scrape runs it, and a queue whose oldest jobs all wait for
    /// later, e.g. deferred to the next day, is reported as having none ready.)
    pub async fn oldest_queued(&self, queues: &[String]) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        for q in queues {
            let age: Option<f64> = sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM now() - GREATEST(created_at, COALESCE(run_at, created_at)))::float8
                 FROM (SELECT created_at, run_at FROM jobs
                       WHERE status = 'queued' AND queue = $1
                       ORDER BY created_at LIMIT $2) oldest
                 WHERE run_at IS NULL OR run_at <= now()
                 ORDER BY created_at LIMIT 1",
            )
            .bind(q)
            .bind(OLDEST_WALK)
            .fetch_optional(self.pool())
            .await?
            .flatten();
            if let Some(a) = age {
                out.push((q.clone(), a.max(0.0)));
            }
        }
        Ok(out)
    }
}

type ItemRow = (Uuid, Uuid, String, i16, Option<DateTime<Utc>>);
/// An [`ItemRow`] and the job's attempt.
type AttemptRow = (Uuid, Uuid, String, i16, Option<DateTime<Utc>>, i32);

fn to_item(r: ItemRow) -> DispatchItem {
    DispatchItem {
        id: r.0,
        tenant_id: r.1,
        queue: r.2,
        priority: r.3,
        run_at: r.4,
    }
}
