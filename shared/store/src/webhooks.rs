//! Webhook deliveries: rows written by the `jobs_webhook` trigger when a job with a webhook
//! ends, claimed by schedulers with `SKIP LOCKED` (a claim pushes `next_attempt_at` out as a
//! lease), and their outcomes; tenants' webhook URL and signing secret.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde_json::Value;
use switchyard_core::webhook::WebhookDelivery;
use uuid::Uuid;

use crate::jobs::JOB_COLUMNS;
use crate::{JobRow, Result, Scope, Store};

/// A delivery to attempt now.
#[derive(Debug, Clone)]
pub struct DeliveryTask {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub job_id: Uuid,
    pub url: String,
    pub event: String,
    /// This attempt's number (1 = the first).
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub job: Option<JobRow>,
    pub secret: Option<String>,
    /// The secret before the last rotation, for 24 h after it (deliveries are signed with both).
    pub previous_secret: Option<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum DeliveryOutcome {
    Delivered,
    Retry { at: DateTime<Utc> },
    GiveUp,
}

type ClaimedRow = (
    Uuid,
    Uuid,
    Uuid,
    String,
    String,
    i32,
    DateTime<Utc>,
    Option<Value>,
);

/// The job row the trigger kept when the job ended; `None` (the delivery gives up as for a
/// job that is gone) if it cannot be read, which is logged.
fn snapshot_row(delivery: Uuid, v: Value) -> Option<JobRow> {
    serde_json::from_value(v)
        .map_err(|e| tracing::error!(%delivery, error = %e, "unreadable job snapshot"))
        .ok()
}

type DeliveryRow = (
    Uuid,
    String,
    String,
    String,
    i32,
    Option<i32>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Value,
);

impl Store {
    /// Claims up to `limit` due deliveries, at most `per_tenant` of any one tenant, the
    /// tenants in a random order (a tenant whose receiver is down or slow fills no more than
    /// its share of a round, however many of its deliveries are due); another scheduler sees
    /// them again only after `lease_s`, should this one die mid-attempt. A due delivery that already used
    /// `max_attempts` claims (its last attempt's scheduler died before recording an outcome,
    /// e.g. killed while sending it) is given up instead of claimed again: else a delivery that
    /// kills its scheduler would be retried for ever.
    pub async fn claim_deliveries(
        &self,
        limit: i64,
        per_tenant: i64,
        lease_s: f64,
        max_attempts: i32,
    ) -> Result<Vec<DeliveryTask>> {
        let spent = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'failed',
                 last_error = 'given up: its attempts ran out, the last one without an outcome'
             WHERE state = 'pending' AND next_attempt_at <= now() AND attempts >= $1",
        )
        .bind(max_attempts)
        .execute(self.pool())
        .await?;
        if spent.rows_affected() > 0 {
            tracing::warn!(
                n = spent.rows_affected(),
                "webhook deliveries given up: attempts used up without an outcome"
            );
        }
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH t AS (SELECT id FROM tenants ORDER BY random()),
             due AS (
                 SELECT w.id FROM t CROSS JOIN LATERAL (
                     SELECT id FROM webhook_deliveries
                     WHERE tenant_id = t.id AND state = 'pending' AND next_attempt_at <= now()
                       AND attempts < $3
                     ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED) w
                 LIMIT $1)
             UPDATE webhook_deliveries d SET attempts = d.attempts + 1,
                 next_attempt_at = now() + make_interval(secs => $2)
             FROM due WHERE d.id = due.id
             RETURNING d.id, d.tenant_id, d.job_id, d.url, d.event, d.attempts, d.created_at,
                 d.job",
        )
        .bind(limit)
        .bind(lease_s)
        .bind(max_attempts)
        .bind(per_tenant)
        .fetch_all(self.pool())
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // rows from before snapshots: the job as it is now
        let job_ids: Vec<Uuid> = rows.iter().filter(|r| r.7.is_none()).map(|r| r.2).collect();
        let tenant_ids: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
        let jobs = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1)"
        ))
        .bind(&job_ids)
        .fetch_all(self.pool())
        .await?;
        let secrets: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
            "SELECT id, webhook_secret, CASE WHEN webhook_secret_previous_until > now()
                                        THEN webhook_secret_previous END
             FROM tenants WHERE id = ANY($1)",
        )
        .bind(&tenant_ids)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, tenant_id, job_id, url, event, attempt, created_at, snapshot)| DeliveryTask {
                    id,
                    tenant_id,
                    job_id,
                    url,
                    event,
                    attempt,
                    created_at,
                    job: match snapshot {
                        Some(s) => snapshot_row(id, s),
                        None => jobs.iter().find(|j| j.id == job_id).cloned(),
                    },
                    secret: secrets
                        .iter()
                        .find(|(t, ..)| *t == tenant_id)
                        .map(|(_, s, _)| s.clone()),
                    previous_secret: secrets
                        .iter()
                        .find(|(t, ..)| *t == tenant_id)
                        .and_then(|(.., p)| p.clone()),
                },
            )
            .collect())
    }

    /// Gives claimed deliveries back unattempted (a scheduler stopping): due at once, the
    /// claim's attempt not counted. Fenced like an outcome: a delivery claimed again since
    /// (its lease ran out) is left to the newer claim.
    pub async fn release_deliveries(&self, claims: &[(Uuid, i32)]) -> Result<()> {
        let (ids, attempts): (Vec<Uuid>, Vec<i32>) = claims.iter().copied().unzip();
        sqlx::query(
            "UPDATE webhook_deliveries d SET attempts = d.attempts - 1, next_attempt_at = now()
             FROM unnest($1::uuid[], $2::int4[]) AS c(id, attempt)
             WHERE d.id = c.id AND d.attempts = c.attempt AND d.state = 'pending'",
        )
        .bind(&ids)
        .bind(&attempts)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records attempt `attempt` (`status` and/or `error`, appended to the log) and what
    /// follows, fenced by the attempt: when the claim's lease ran out and another scheduler
    /// claimed the delivery again, or it already ended, this late attempt only joins the log
    /// (its outcome would overwrite the newer one's). Returns whether the outcome was written.
    pub async fn record_delivery(
        &self,
        id: Uuid,
        attempt: i32,
        status: Option<i32>,
        error: Option<&str>,
        entry: &Value,
        outcome: &DeliveryOutcome,
    ) -> Result<bool> {
        let (state, next) = match outcome {
            DeliveryOutcome::Delivered => ("delivered", None),
            DeliveryOutcome::Retry { at } => ("pending", Some(*at)),
            DeliveryOutcome::GiveUp => ("failed", None),
        };
        let written = sqlx::query(
            "UPDATE webhook_deliveries SET state = $2, last_status = $3, last_error = $4,
                 log = log || jsonb_build_array($5::jsonb),
                 next_attempt_at = COALESCE($6, next_attempt_at),
                 delivered_at = CASE WHEN $2 = 'delivered' THEN now() END
             WHERE id = $1 AND attempts = $7 AND state = 'pending'",
        )
        .bind(id)
        .bind(state)
        .bind(status)
        .bind(error)
        .bind(entry)
        .bind(next)
        .bind(attempt)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1;
        if !written {
            sqlx::query(
                "UPDATE webhook_deliveries SET log = log || jsonb_build_array($2::jsonb)
                 WHERE id = $1",
            )
            .bind(id)
            .bind(entry)
            .execute(self.pool())
            .await?;
        }
        Ok(written)
    }

    /// The deliveries of a job in the scope, oldest first.
    pub async fn list_deliveries(
        &self,
        scope: impl Into<Scope>,
        job_id: Uuid,
    ) -> Result<Vec<WebhookDelivery>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT id, url, event, state, attempts, last_status, last_error, next_attempt_at,
                 created_at, delivered_at, log
             FROM webhook_deliveries WHERE job_id = $1 AND tenant_id = $2
             ORDER BY created_at, id",
        )
        .bind(job_id)
        .bind(scope.tenant_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|r| WebhookDelivery {
                id: r.0,
                url: r.1,
                event: r.2,
                next_attempt_at: (r.3 == "pending").then_some(r.7),
                state: r.3,
                attempts: r.4,
                last_status: r.5,
                last_error: r.6,
                created_at: r.8,
                delivered_at: r.9,
                log: r.10,
            })
            .collect())
    }

    /// Sets (or with `None` removes) a tenant's webhook, used by its jobs submitted from now
    /// on that name none; false when there is no such tenant.
    pub async fn set_tenant_webhook(&self, name: &str, url: Option<&str>) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET webhook_url = $2 WHERE name = $1")
            .bind(name)
            .bind(url)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A new signing secret for the tenant's deliveries (returned once); `None` when there is
    /// no such tenant. The old one keeps signing too for 24 h (see [`DeliveryTask`]).
    pub async fn rotate_webhook_secret(&self, name: &str) -> Result<Option<String>> {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret = format!("whsec_{}", hex::encode(bytes));
        let r = sqlx::query(
            "UPDATE tenants SET webhook_secret_previous = webhook_secret,
                 webhook_secret_previous_until = now() + interval '24 hours', webhook_secret = $2
             WHERE name = $1",
        )
        .bind(name)
        .bind(&secret)
        .execute(self.pool())
        .await?;
        Ok((r.rows_affected() == 1).then_some(secret))
    }

    /// The tenant's signing secret (for tests and the admin CLI).
    pub async fn webhook_secret(&self, tenant_id: Uuid) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT webhook_secret FROM tenants WHERE id = $1")
                .bind(tenant_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }
}
