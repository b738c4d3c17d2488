//! Dispatch marks: which Redis epoch holds each job's stream entry (`jobs.dispatch_epoch`), so
//! that the reconciler re-dispatches only what Redis does not hold.

use std::sync::LazyLock;

use uuid::Uuid;

use crate::{Result, Store};

/// Like `jobs::LOCK_IN_ORDER` but skipping rows another statement holds: marking jobs dispatched
/// never waits for a worker's claim (the claim records the epoch itself, since the worker just
/// read the job from Redis). Rows that already carry the epoch (claimed meanwhile) are left
/// alone: neither locked nor written; so are rows whose attempt is no longer the one
/// dispatched (`{attempt}`: a condition on `attempt`): a job claimed and requeued since is its
/// worker's to dispatch again, and a late mark would hide it from the reconciler if that
/// dispatch failed. The ids select the rows by primary key (a join with the id list made the
/// planner, without nested loops on the batch pool, scan the whole table).
fn unmarked_in_order(attempt: &str) -> String {
    format!(
        "ARRAY(SELECT id FROM jobs WHERE id = ANY($1) AND dispatch_epoch < $2 AND {attempt} \
         ORDER BY id FOR UPDATE SKIP LOCKED)"
    )
}

/// The two marks (new jobs; re-dispatched ones), built once.
static MARK_SQL: LazyLock<[String; 2]> = LazyLock::new(|| {
    let update = |attempt: &str| {
        format!(
            "UPDATE jobs SET dispatch_epoch = $2 WHERE id = ANY({}) AND dispatch_epoch < $2",
            unmarked_in_order(attempt)
        )
    };
    [
        update("attempt = 0"),
        update("(id, attempt) IN (SELECT * FROM unnest($1::uuid[], $3::int4[]))"),
    ]
});

impl Store {
    /// The statements of [`Store::mark_dispatched`] and [`Store::mark_redispatched`] (their
    /// plans are checked by a test).
    #[doc(hidden)]
    pub fn mark_statements() -> &'static [String; 2] {
        &MARK_SQL
    }

    /// Records that these new jobs (attempt 0) were handed to Redis in `epoch`. Rows locked by
    /// a concurrent claim are skipped: the claim sets the epoch itself.
    pub async fn mark_dispatched(&self, ids: &[Uuid], epoch: i64) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(&MARK_SQL[0])
            .bind(ids)
            .bind(epoch)
            .execute(self.batch_pool())
            .await?;
        Ok(())
    }

    /// Records that these jobs, each at the attempt given, were handed to Redis in `epoch`
    /// (see [`unmarked_in_order`]).
    pub async fn mark_redispatched(&self, jobs: &[(Uuid, i32)], epoch: i64) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let (ids, attempts): (Vec<Uuid>, Vec<i32>) = jobs.iter().copied().unzip();
        sqlx::query(&MARK_SQL[1])
            .bind(ids)
            .bind(epoch)
            .bind(attempts)
            .execute(self.batch_pool())
            .await?;
        Ok(())
    }
}
