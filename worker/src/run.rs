//! One claimed run: announce the attempt, heartbeat (Postgres lease + stream entry, cancel
//! notices), execute under the job's timeout while publishing its output as events, then decide
//! the outcome (success, retry with backoff, failure, cancellation, release), record it fenced by
//! the attempt, publish the terminal event and acknowledge the entry.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use serde_json::{json, Value};
use switchyard_core::event::types;
use switchyard_core::job::{job_error_codes, JobError, JobKind, JobStatus};
use switchyard_core::queueing::Backoff;
use switchyard_core::telemetry::TraceParent;
use switchyard_core::Event;
use switchyard_queue::events::Published;
use switchyard_queue::Delivery;
use switchyard_store::{JobRow, RunEnd, RunEndWrite, StoreError};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::deliver::ack;
use crate::executor::{Emit, ExecError, JobContext, JobMeta};
use crate::publisher::publish_next;
use crate::runtime::{complete, with_retry, Running, Shared};

/// A job is deferred at most this many times (its attempts then count again).
const MAX_DEFERRALS: i32 = 1000;

enum Interrupt {
    Cancelled,
    Fenced,
    Released,
}

pub(crate) async fn run_claimed(s: &Shared, d: Delivery, row: JobRow) {
    let id = row.id;
    let attempt = row.attempt;
    // join the submitter's trace: the job span carries its trace id and parent span id
    let span = tracing::Span::current();
    span.record("attempt", attempt);
    if let Some(tp) = row.trace_parent.as_deref().and_then(TraceParent::parse) {
        span.record("trace_id", tp.trace_id.as_str());
        span.record("parent_span_id", tp.parent_id.as_str());
        crate::trace::join(&span, &tp);
    }
    tracing::debug!("running");
    // fence older attempts and announce this one (`status: running`) in one round trip; the
    // executor starts meanwhile (its first provider request overlaps the round trip) and its
    // output waits in the channel until the announcement is out, so it is never published
    // before it
    let durable = row.event_seq.max(0) as u64;
    let running = Event::status(id, 0, attempt, JobStatus::Running, json!({}));
    let begin = async move {
        match s.bus.begin_attempt_with(&running, durable).await {
            Ok(Some(seq)) => seq,
            Ok(None) => {
                tracing::warn!(
                    "a newer attempt already owns this job in redis; postgres fences this run"
                );
                durable
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not announce the attempt (live events are best effort)");
                durable
            }
        }
    };

    let beat_now = Arc::new(Notify::new());
    if let Ok(mut r) = s.running.lock() {
        r.insert(
            id,
            Running {
                beat_now: beat_now.clone(),
                attempt,
            },
        );
    }
    // a cancel notice that arrived between the claim and the registration above
    let noticed = s
        .recent_cancels
        .lock()
        .is_ok_and(|mut recent| recent.take(id, tokio::time::Instant::now()));
    if noticed {
        beat_now.notify_one();
    }
    let cancel_req = CancellationToken::new();
    let fenced = CancellationToken::new();
    let run_token = CancellationToken::new();

    // heartbeat: extends the lease in Postgres and Redis, and notices cancel requests
    let hb = {
        let (store, queue, lease) = (s.store.clone(), s.queue.clone(), s.opts.lease);
        let (cancel_req, fenced, run_token, beat_now) = (
            cancel_req.clone(),
            fenced.clone(),
            run_token.clone(),
            beat_now.clone(),
        );
        let consumer = s.id.clone();
        let d = d.clone();
        // what is left of the lease the claim took: a claim whose reply was lost (taken up
        // later, or by a retry) may have committed long before this run starts
        let left = row
            .lease_expires_at
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .unwrap_or_default()
            .min(lease);
        async move {
            let every = lease / 3;
            // as if renewed when the claim's lease began, and first renewed while half of
            // what is left remains
            let mut renewed = std::time::Instant::now()
                .checked_sub(lease - left)
                .unwrap_or_else(std::time::Instant::now);
            let mut wait = every.min(left / 2);
            loop {
                tokio::select! {
                    _ = run_token.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = beat_now.notified() => {}
                }
                wait = every;
                // the lease runs from when the renewal was sent; a renewal that hangs counts
                // as failed
                let sent = std::time::Instant::now();
                let beat = tokio::time::timeout(every, store.heartbeat(id, attempt, lease))
                    .await
                    .unwrap_or_else(|_| {
                        Err(switchyard_store::StoreError::Unavailable(
                            sqlx::Error::PoolTimedOut,
                        ))
                    });
                match beat {
                    Ok(None) => {
                        tracing::warn!("fenced out: a newer attempt owns this job; stopping");
                        fenced.cancel();
                        run_token.cancel();
                        return;
                    }
                    Ok(Some(true)) => {
                        cancel_req.cancel();
                        run_token.cancel();
                        return;
                    }
                    Ok(Some(false)) => renewed = sent,
                    // the lease ran out in Postgres: the job may be claimed again (or ended)
                    // meanwhile, so this run stops as if fenced — it must not go on streaming
                    // (or keep its Redis entry alive) beside its successor; its entry is
                    // reclaimed and the job runs again unless it ended
                    Err(e) if renewed.elapsed() >= lease => {
                        tracing::warn!(error = %e, "lease not renewed in postgres for a whole lease; stopping");
                        fenced.cancel();
                        run_token.cancel();
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat to postgres failed"),
                }
                if let Err(e) = queue.heartbeat(&d, &consumer).await {
                    tracing::warn!(error = %e, "heartbeat to redis failed");
                }
            }
        }
    };

    let (tx, rx) = mpsc::channel::<Emit>(256);
    let kind = JobKind::parse(&row.kind);
    let ctx = JobContext::new(
        JobMeta {
            job_id: id,
            tenant_id: row.tenant_id,
            kind: kind.unwrap_or(JobKind::SystemNoop),
            input: row.input.clone(),
            attempt,
            max_attempts: row.max_attempts,
        },
        run_token.clone(),
        tx,
    );
    let (spent, sandbox_ms) = (ctx.spent(), ctx.sandbox_ms());
    let exec = s.executors.get(&row.kind);
    let timeout = row.timeout_s.map(|t| Duration::from_secs(t as u64));
    // a run that would draw on a daily quota its tenant has used up waits for the next day
    let refused = s.daily.refuse(s, &row).await;
    let exec_fut = async move {
        let run = async {
            if let Some(e) = refused {
                return Err(e);
            }
            match exec {
                None => Err(ExecError::fatal(
                    job_error_codes::NO_EXECUTOR,
                    format!(
                        "this worker has no executor for kind `{}`",
                        ctx.kind.as_str()
                    ),
                )),
                Some(e) => match timeout {
                    Some(t) => match tokio::time::timeout(t, e.execute(&ctx)).await {
                        Ok(r) => r,
                        Err(_) => Err(ExecError::retryable(
                            job_error_codes::TIMEOUT,
                            format!("attempt exceeded timeout_s ({}s)", t.as_secs()),
                        )),
                    },
                    None => e.execute(&ctx).await,
                },
            }
        };
        // an executor that panics (a bug, or a library's on odd input) fails its attempt: the
        // run still ends, and its heartbeat stops with it (else the lease was renewed forever)
        let r = std::panic::AssertUnwindSafe(run)
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(ExecError::internal(format!(
                    "the executor panicked: {what}"
                )))
            });
        drop(ctx);
        r
    };
    let guarded = {
        let run_token = run_token.clone();
        let hard_stop = s.hard_stop.clone();
        async move {
            tokio::select! {
                r = exec_fut => Some(r),
                _ = run_token.cancelled() => None,
                _ = hard_stop.cancelled() => None,
            }
        }
    };
    let publisher = publish_emits(s, id, attempt, begin, rx, fenced.clone(), run_token.clone());
    let hb_task = tokio::spawn(hb);
    let (result, seq) = tokio::join!(guarded, publisher);
    run_token.cancel();
    let _ = hb_task.await;
    if let Ok(mut r) = s.running.lock() {
        // unless a newer attempt claimed here took over meanwhile
        if r.get(&id).is_some_and(|r| r.attempt == attempt) {
            r.remove(&id);
        }
    }

    let interrupt = if fenced.is_cancelled() {
        Some(Interrupt::Fenced)
    } else if cancel_req.is_cancelled() {
        Some(Interrupt::Cancelled)
    } else if result.is_none() && s.hard_stop.is_cancelled() {
        Some(Interrupt::Released)
    } else {
        None
    };

    // what the run used, whatever its end (a reply it could not keep, or that a cancel or a
    // time limit cut, was paid for)
    let used = (
        spent.load(std::sync::atomic::Ordering::Relaxed),
        sandbox_ms.load(std::sync::atomic::Ordering::Relaxed),
    );
    let (end, event) = match (interrupt, result) {
        (Some(Interrupt::Fenced), _) => return,
        (Some(Interrupt::Cancelled), _) => (
            RunEnd::Cancelled,
            Event::terminal(id, seq + 1, attempt, JobStatus::Cancelled, None, None),
        ),
        (Some(Interrupt::Released), _) | (None, None) => {
            let err = JobError::new(
                "worker_shutdown",
                "the worker shut down; the job runs again",
                true,
            );
            let ev = Event::status(
                id,
                seq + 1,
                attempt,
                JobStatus::Queued,
                json!({ "reason": "released", "error": err }),
            );
            (
                RunEnd::Released {
                    error: err,
                    run_at: Utc::now(),
                },
                ev,
            )
        }
        (None, Some(Ok(mut output))) => {
            // what Postgres can store, and the terminal event says the same
            if switchyard_core::nul::clean_json(&mut output) {
                tracing::debug!("NUL characters in the output replaced");
            }
            (
                RunEnd::Succeeded(output.clone()),
                Event::terminal(
                    id,
                    seq + 1,
                    attempt,
                    JobStatus::Succeeded,
                    Some(&output),
                    None,
                ),
            )
        }
        (None, Some(Err(e))) if e.defer && attempt < MAX_DEFERRALS => {
            let delay = e.retry_after.unwrap_or(Duration::from_secs(1));
            let run_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
            tracing::debug!(reason = %e, ?delay, "deferred");
            let ev = Event::status(
                id,
                seq + 1,
                attempt,
                JobStatus::Queued,
                json!({ "retry_at": run_at, "reason": "deferred", "code": e.code, "detail": e.message }),
            );
            (RunEnd::Defer { run_at }, ev)
        }
        (None, Some(Err(e))) => {
            let err = e.to_job_error();
            if e.retryable && attempt < row.max_attempts {
                let delay = e
                    .retry_after
                    .unwrap_or_else(|| retry_delay(&row, s.opts.retry_base, attempt));
                let run_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                tracing::info!(error = %e, ?delay, "attempt failed; will retry");
                let ev = Event::status(
                    id,
                    seq + 1,
                    attempt,
                    JobStatus::Queued,
                    json!({ "retry_at": run_at, "error": err }),
                );
                (RunEnd::Retry { error: err, run_at }, ev)
            } else {
                tracing::info!(error = %e, "job failed");
                (
                    RunEnd::Failed(err.clone()),
                    Event::terminal(id, seq + 1, attempt, JobStatus::Failed, None, Some(&err)),
                )
            }
        }
    };
    let (mut end, mut event) = (end, event);
    let mut write = RunEndWrite {
        id,
        attempt,
        end: end.clone(),
        seq: seq + 1,
        tokens: used.0,
    };
    let mut written = write_end_kept(s, &d, &write).await;
    let refusable = end.requeued_at().is_some() || matches!(end, RunEnd::Failed(_));
    if matches!(written, Ok(false)) && refusable && cancel_asked(s, id, attempt).await {
        // a cancel asked for while the run ended (between heartbeats): the job is not
        // requeued nor failed (the write refuses both), it ends cancelled now
        end = RunEnd::Cancelled;
        event = Event::terminal(id, seq + 1, attempt, JobStatus::Cancelled, None, None);
        write.end = end.clone();
        written = write_end_kept(s, &d, &write).await;
    }
    match written {
        Ok(true) => crate::quota::charge(s, &row, used).await,
        Ok(false) => {
            tracing::warn!("fenced out at the end of the run; outcome discarded");
            return;
        }
        Err(e) => {
            // not acknowledged: the lease expires and the job runs again (at-least-once)
            tracing::error!(error = %e, "could not record the outcome");
            return;
        }
    }
    // `ts` is the publication time: stamp it now, after the durable write
    event.ts = Utc::now();
    let mut last = seq;
    publish_next(s, event, &mut last).await;
    if let Some(run_at) = end.requeued_at() {
        let mut item = row.dispatch_item();
        item.run_at = Some(run_at);
        // the epoch is read before the dispatch (if Redis loses its data after, the mark is
        // stale and the reconciler dispatches the job again)
        let epoch = s.queue.epoch().await.ok().flatten();
        match s.queue.delay(&item).await {
            // marked, or the reconciler would dispatch it a second time while it waits
            Ok(_) => {
                if let Some(epoch) = epoch {
                    if let Err(e) = s
                        .store
                        .mark_redispatched(&[(row.id, row.attempt)], epoch)
                        .await
                    {
                        tracing::debug!(error = %e, "a requeued job not marked dispatched");
                    }
                }
            }
            // left unmarked (the run end reset its dispatch epoch): the reconciler finds it
            Err(e) => tracing::warn!(error = %e, "could not re-dispatch for retry"),
        }
    }
    ack(s, &d).await;
}

/// Records a run's end (group-committed, retried while Postgres is away); `Ok(false)` when
/// the write was refused (fenced out, or a requeue of a job whose cancel was asked for).
async fn write_end(s: &Shared, write: &RunEndWrite) -> Result<bool, StoreError> {
    match with_retry("end run", s.opts.lease, || complete(s, write.clone())).await {
        // refused as fenced: or an earlier try committed it and its reply was lost (a check
        // that fails is retried like the write: read as fenced, a committed end published no
        // terminal event and re-dispatched nothing)
        Ok(false) => with_retry("end check", s.opts.lease, || s.store.run_end_landed(write)).await,
        other => other,
    }
}

/// [`write_end`] while the run's lease and stream entry are kept alive: the heartbeat has
/// stopped with the run, and a write that waits for Postgres (retried up to a lease) let the
/// entry be reclaimed meanwhile, the job run again or failed `lease_expired`, and this
/// outcome discarded.
async fn write_end_kept(s: &Shared, d: &Delivery, write: &RunEndWrite) -> Result<bool, StoreError> {
    let every = s.opts.lease / 3;
    let keep = async {
        loop {
            tokio::time::sleep(every).await;
            let beat = s.store.heartbeat(write.id, write.attempt, s.opts.lease);
            if let Ok(Err(e)) = tokio::time::timeout(every, beat).await {
                tracing::debug!(error = %e, "lease not extended while the outcome is written");
            }
            if let Err(e) = s.queue.heartbeat(d, &s.id).await {
                tracing::debug!(error = %e, "entry not kept while the outcome is written");
            }
        }
    };
    tokio::select! {
        w = write_end(s, write) => w,
        _ = keep => unreachable!("the keep-alive loop never ends"),
    }
}

/// Whether this attempt still runs the job and a cancel of it was asked for.
async fn cancel_asked(s: &Shared, id: Uuid, attempt: i32) -> bool {
    match s.store.get_job_unscoped(id).await {
        Ok(Some(row)) => {
            row.attempt == attempt
                && row.status() == JobStatus::Running
                && row.cancel_requested_at.is_some()
        }
        _ => false,
    }
}

/// Publishes executor output as events, coalescing deltas that are already waiting, once
/// `begin` (the attempt's announcement) has given the last seq before them.
async fn publish_emits(
    s: &Shared,
    id: Uuid,
    attempt: i32,
    begin: impl Future<Output = u64>,
    mut rx: mpsc::Receiver<Emit>,
    fenced: CancellationToken,
    run_token: CancellationToken,
) -> u64 {
    let mut seq = begin.await;
    let mut batch: Vec<Emit> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut text = String::new();
        let mut events: Vec<(String, Value)> = Vec::new();
        for m in batch.drain(..) {
            match m {
                Emit::Delta(t) => text.push_str(&t),
                Emit::Event { kind, data } => {
                    if !text.is_empty() {
                        events.push((
                            types::OUTPUT_DELTA.into(),
                            json!({ "text": std::mem::take(&mut text) }),
                        ));
                    }
                    events.push((kind, data));
                }
            }
        }
        if !text.is_empty() {
            events.push((types::OUTPUT_DELTA.into(), json!({ "text": text })));
        }
        for (kind, data) in events {
            if fenced.is_cancelled() {
                continue;
            }
            let ev = Event::new(id, seq + 1, attempt, &kind, data);
            match publish_next(s, ev, &mut seq).await {
                Published::Ok => {}
                Published::Fenced => {
                    tracing::warn!("fenced out by a newer attempt while streaming; stopping");
                    fenced.cancel();
                    run_token.cancel();
                }
                Published::Stale => {}
            }
        }
    }
    seq
}

/// The wait before the next attempt: the job's own backoff, else the worker's default
/// (`base` doubling per attempt up to 60 s, jittered).
fn retry_delay(row: &JobRow, base: Duration, attempt: i32) -> Duration {
    row.backoff()
        .unwrap_or_else(|| Backoff::default_with(base))
        .delay(attempt)
}
