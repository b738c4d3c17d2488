//! Dead jobs: a job that ended `failed` (out of attempts, or failed for good) is dead; a client
//! may requeue it with the same id, its attempts and event sequence continuing.

use uuid::Uuid;

use crate::{JobRow, Result, Scope, Store};

/// What asking to retry a job did.
#[derive(Debug)]
pub enum RetryOutcome {
    NotFound,
    /// It is not dead (queued, running, succeeded or cancelled).
    NotDead(JobRow),
    /// Queued again; its `queued` event has the row's `event_seq`.
    Requeued(JobRow),
    /// A conversation turn with later turns posted: answered now, its reply would follow
    /// theirs, which were made without it.
    NotLastTurn,
}

impl Store {
    /// Requeues a failed job with `attempts` more attempts (same id; `attempt`, the fencing
    /// token, keeps counting up; `event_seq` continues).
    pub async fn retry_job(
        &self,
        scope: impl Into<Scope>,
        id: Uuid,
        attempts: i32,
    ) -> Result<RetryOutcome> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        // a conversation turn is retried only while it is the last: the conversation's row
        // lock orders this check against a post in flight (which takes it to number its turn)
        let turn: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT input -> 'conversation' ->> 'id', input -> 'conversation' ->> 'turn'
             FROM jobs WHERE id = $1 AND tenant_id = $2 AND status = 'failed'",
        )
        .bind(id)
        .bind(scope.tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((Some(conv), Some(turn))) = turn {
            let (conv, turn) = (conv.parse::<Uuid>().ok(), turn.parse::<i32>().ok());
            if let (Some(conv), Some(turn)) = (conv, turn) {
                let next: Option<i32> = sqlx::query_scalar(
                    "SELECT next_turn FROM conversations WHERE id = $1 FOR UPDATE",
                )
                .bind(conv)
                .fetch_optional(&mut *tx)
                .await?;
                if next.is_some_and(|n| n > turn + 1) {
                    return Ok(RetryOutcome::NotLastTurn);
                }
            }
        }
        let row = sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET status = 'queued', max_attempts = attempt + $3, error = NULL,
                output = NULL, finished_at = NULL, run_at = NULL, cancel_requested_at = NULL,
                lease_owner = NULL, lease_expires_at = NULL, dispatch_epoch = 0,
                event_seq = event_seq + 1, updated_at = now()
             WHERE id = $1 AND tenant_id = $2 AND status = 'failed'
               AND ($4::text IS NULL OR created_by = $4)
             RETURNING {}",
            crate::jobs::JOB_COLUMNS
        ))
        .bind(id)
        .bind(scope.tenant_id)
        .bind(attempts)
        .bind(&scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(row) = row {
            return Ok(RetryOutcome::Requeued(row));
        }
        Ok(match self.get_job(scope, id).await? {
            None => RetryOutcome::NotFound,
            Some(row) => RetryOutcome::NotDead(row),
        })
    }
}
