//! The end of a run in Postgres: its outcome written fenced by its attempt, one by one or many
//! per statement (the worker's group commit), with the tokens the attempt was charged.

use chrono::{DateTime, Utc};
use serde_json::Value;
use switchyard_core::job::{JobError, JobStatus};
use uuid::Uuid;

use crate::jobs::{error_json, LOCK_IN_ORDER};
use crate::{Result, RunEnd, Store};

impl Store {
    /// Writes the end of a run, fenced by `attempt`; `seq` is the seq of the event announcing it.
    /// Returns false if this run was fenced out (its write is ignored).
    pub async fn end_run(&self, id: Uuid, attempt: i32, end: &RunEnd, seq: u64) -> Result<bool> {
        self.end_one(&RunEndWrite {
            id,
            attempt,
            end: end.clone(),
            seq,
            tokens: 0,
        })
        .await
    }

    /// [`Store::end_run`] of a [`RunEndWrite`], its charged tokens included.
    pub async fn end_one(&self, w: &RunEndWrite) -> Result<bool> {
        let (status, output, error, run_at, grant) = split_end(&w.end);
        let finished = status.is_terminal();
        let res = sqlx::query(
            "UPDATE jobs SET status = $3, output = $4, error = $5, run_at = $6,
                max_attempts = max_attempts + $9,
                finished_at = CASE WHEN $7 THEN now() ELSE NULL END,
                lease_owner = NULL, lease_expires_at = NULL, event_seq = GREATEST(event_seq, $8),
                updated_at = now(), charged_tokens = charged_tokens + $10,
                -- requeued: undispatched until the reconciler sees it (as in `end_runs`)
                dispatch_epoch = CASE WHEN $3 = 'queued' THEN 0 ELSE dispatch_epoch END
             WHERE id = $1 AND attempt = $2 AND status = 'running'
               AND NOT ($3 IN ('queued', 'failed') AND cancel_requested_at IS NOT NULL)",
        )
        .bind(w.id)
        .bind(w.attempt)
        .bind(status.as_str())
        .bind(output)
        .bind(error.map(error_json))
        .bind(run_at)
        .bind(finished)
        .bind(w.seq as i64)
        .bind(grant)
        .bind(tokens_i64(w.tokens))
        .execute(self.pool())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Whether `w` is what the job holds: a write refused as fenced may be this run's own,
    /// committed by an earlier try whose reply was lost (then the run goes on as written).
    pub async fn run_end_landed(&self, w: &RunEndWrite) -> Result<bool> {
        let (status, _, error, _, _) = split_end(&w.end);
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND attempt = $2 AND event_seq = $3
                AND status = $4 AND (error ->> 'code') IS NOT DISTINCT FROM $5)",
        )
        .bind(w.id)
        .bind(w.attempt)
        .bind(w.seq as i64)
        .bind(status.as_str())
        .bind(error.map(|e| e.code.as_str()))
        .fetch_one(self.pool())
        .await?)
    }

    /// Writes the ends of many runs in one statement, each fenced by its own attempt; returns
    /// the (id, attempt) of each write that took effect (the others were fenced out): two runs
    /// of one job in a batch, a stale one and the current one, are told apart by attempt.
    pub async fn end_runs(&self, ends: &[RunEndWrite]) -> Result<Vec<(Uuid, i32)>> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let n = ends.len();
        let (mut ids, mut attempts, mut statuses) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut outputs, mut errors, mut run_ats, mut seqs) = (
            Vec::<Option<Value>>::with_capacity(n),
            Vec::<Option<Value>>::with_capacity(n),
            Vec::<Option<DateTime<Utc>>>::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut grants, mut tokens) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for w in ends {
            tokens.push(tokens_i64(w.tokens));
            let (status, output, error, run_at, grant) = split_end(&w.end);
            grants.push(grant);
            ids.push(w.id);
            attempts.push(w.attempt);
            statuses.push(status.as_str());
            outputs.push(output);
            errors.push(error.map(error_json));
            run_ats.push(run_at);
            seqs.push(w.seq as i64);
        }
        let done: Vec<(Uuid, i32)> = sqlx::query_as(&format!(
            "UPDATE jobs j SET status = v.status, output = v.output, error = v.error, run_at = v.run_at,
                finished_at = CASE WHEN v.status IN ('succeeded', 'failed', 'cancelled') THEN now() ELSE NULL END,
                lease_owner = NULL, lease_expires_at = NULL, event_seq = GREATEST(j.event_seq, v.seq),
                max_attempts = j.max_attempts + v.given_back, updated_at = now(),
                charged_tokens = j.charged_tokens + v.tokens,
                -- a requeued job counts as undispatched until the reconciler has seen it in
                -- Redis: if the worker's own re-dispatch never happens (it died, or this
                -- commit's reply was lost), the job is not stranded
                dispatch_epoch = CASE WHEN v.status = 'queued' THEN 0 ELSE j.dispatch_epoch END
             FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::jsonb[], $5::jsonb[], $6::timestamptz[], $7::int8[], $8::int4[], $9::int8[])
                AS v(id, attempt, status, output, error, run_at, seq, given_back, tokens)
             WHERE j.id = v.id AND j.id = ANY({LOCK_IN_ORDER})
               AND j.attempt = v.attempt AND j.status = 'running'
               -- a job whose cancel was asked for is not requeued, nor failed (the run ends
               -- cancelled, as the cancel promised: see `RunEnd::requeued_at`)
               AND NOT (v.status IN ('queued', 'failed') AND j.cancel_requested_at IS NOT NULL)
             RETURNING j.id, v.attempt"
        ))
        .bind(&ids)
        .bind(&attempts)
        .bind(&statuses)
        .bind(&outputs)
        .bind(&errors)
        .bind(&run_ats)
        .bind(&seqs)
        .bind(&grants)
        .bind(&tokens)
        .fetch_all(self.batch_pool())
        .await?;
        Ok(done)
    }
}

/// One run end for [`Store::end_runs`].
#[derive(Debug, Clone)]
pub struct RunEndWrite {
    pub id: Uuid,
    pub attempt: i32,
    pub end: RunEnd,
    /// Seq of the event announcing the end.
    pub seq: u64,
    /// LLM tokens the attempt used (charged to the tenant's day however it ended): added to
    /// the job's `charged_tokens`.
    pub tokens: u64,
}

fn tokens_i64(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// Status, output, error, due time and attempts given back of a run end.
type EndParts<'a> = (
    JobStatus,
    Option<Value>,
    Option<&'a JobError>,
    Option<DateTime<Utc>>,
    i32,
);

fn split_end(end: &RunEnd) -> EndParts<'_> {
    match end {
        RunEnd::Succeeded(v) => {
            // Postgres refuses NUL in jsonb: a job's result is never lost over one
            let mut v = v.clone();
            switchyard_core::nul::clean_json(&mut v);
            (JobStatus::Succeeded, Some(v), None, None, 0)
        }
        RunEnd::Failed(e) => (JobStatus::Failed, None, Some(e), None, 0),
        RunEnd::Cancelled => (JobStatus::Cancelled, None, None, None, 0),
        RunEnd::Retry { error, run_at } => (JobStatus::Queued, None, Some(error), Some(*run_at), 0),
        RunEnd::Defer { run_at } => (JobStatus::Queued, None, None, Some(*run_at), 1),
        RunEnd::Released { error, run_at } => {
            (JobStatus::Queued, None, Some(error), Some(*run_at), 1)
        }
    }
}
