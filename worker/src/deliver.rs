//! From a delivery to a run: the batched claim of a fetched batch, the one-by-one claim, and
//! what each claim outcome means for the delivery (run it, drop it, hand it back, delay it).

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_core::Event;
use switchyard_queue::Delivery;
use switchyard_store::{ClaimOutcome, JobRow};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;
use uuid::Uuid;

use crate::runtime::{with_retry, Shared};

/// Claims a fetched batch in one statement, then runs each delivery in its own task.
pub(crate) async fn spawn_batch(
    s: &Arc<Shared>,
    deliveries: Vec<Delivery>,
    permits: &mut Vec<OwnedSemaphorePermit>,
) {
    // held before the claim is sent: another delivery of one of these jobs (a duplicate, the
    // reclaim loop's) that finds it held by this worker's id meanwhile must not take that
    // for a lost reply and run the same attempt beside this one
    let ids: Vec<Uuid> = s.claimed.hold_many(
        deliveries
            .iter()
            .map(|d| d.job_id)
            .filter(|id| !id.is_nil()),
    );
    let mut claimed: HashMap<Uuid, JobRow> =
        match s.store.claim_many(&ids, &s.id, s.opts.lease).await {
            Ok(rows) => rows.into_iter().map(|r| (r.id, r)).collect(),
            Err(e) => {
                // each delivery then takes the one-by-one path (which retries)
                tracing::warn!(error = %e, "batched claim failed");
                HashMap::new()
            }
        };
    // what was not claimed is let go (its delivery goes the one-by-one way, holding anew)
    for id in &ids {
        match claimed.get(id) {
            Some(row) => s.claimed.running(*id, row.attempt),
            None => s.claimed.release(*id),
        }
    }
    for d in deliveries {
        // a blocking fetch can bring one more than asked (one per priority): wait for a slot
        let permit = match permits.pop() {
            Some(p) => p,
            None => match s.slots_for(&d.queue).clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let row = claimed.remove(&d.job_id);
        let s2 = s.clone();
        let span = tracing::info_span!(
            "job",
            job_id = %d.job_id,
            queue = %d.queue,
            worker = %s.id,
            attempt = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        s.jobs.spawn(
            async move {
                match row {
                    Some(row) => run_holding(&s2, d, row).await,
                    None => handle_delivery(&s2, d).await,
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Runs a job this worker claimed, holding it as this attempt's, then lets go of the claim
/// (unless a newer attempt claimed here took over).
async fn run_holding(s: &Shared, d: Delivery, row: JobRow) {
    let (id, attempt) = (row.id, row.attempt);
    s.claimed.running(id, attempt);
    crate::run::run_claimed(s, d, row).await;
    s.claimed.finished(id, attempt);
}

pub(crate) async fn ack(s: &Shared, d: &Delivery) {
    s.acker.ack(d).await;
}

async fn handle_delivery(s: &Shared, d: Delivery) {
    if d.job_id.is_nil() {
        ack(s, &d).await;
        return;
    }
    // held before the claim, as in `spawn_batch`; `false`: another task of this worker is
    // claiming or running the job, so this delivery is a duplicate whatever the claim says
    let mine = s.claimed.hold(d.job_id);
    let claim = with_retry("claim", s.opts.lease, || {
        s.store.claim(d.job_id, &s.id, s.opts.lease)
    })
    .await;
    match claim {
        // (not `mine`: a newer attempt than the one running here, which is fenced out; this
        // one takes over the hold, so the stale run's end does not let go of it)
        Ok(ClaimOutcome::Claimed(row)) => run_holding(s, d, row).await,
        // held by this worker's id but not running here: the claim committed and its reply
        // was lost (or a retried claim found its first try done); nobody else will run it
        // before its lease ends, and then at the cost of an attempt
        Ok(ClaimOutcome::Held(row))
            if mine
                && row.lease_owner.as_deref() == Some(s.id.as_str())
                && s.claimed.adopt(row.id, row.attempt) =>
        {
            tracing::info!("running a claim of this worker whose reply was lost");
            run_holding(s, d, row).await;
        }
        other => {
            if mine {
                s.claimed.release(d.job_id);
            }
            settle(s, d, other).await;
        }
    }
}

/// What a delivery whose job this worker does not run becomes.
async fn settle(
    s: &Shared,
    d: Delivery,
    claim: Result<ClaimOutcome, switchyard_store::StoreError>,
) {
    match claim {
        Err(e) => {
            // leave the entry pending: it is reclaimed once its idle time passes the lease
            tracing::error!(error = %e, "claim failed");
        }
        Ok(ClaimOutcome::Skip(reason)) => {
            tracing::debug!(reason, "nothing to run");
            ack(s, &d).await;
        }
        Ok(ClaimOutcome::Held(row)) => match row.lease_owner.as_deref() {
            // a reclaimed entry of a job whose lease still runs: the running worker's own
            // entry (its Redis heartbeat failed, its lease did not) goes back to it, slot and
            // all (acknowledging it would free its slot while it runs; ours stays ours); a
            // stale duplicate (the owner holds another entry of the job) is dropped
            Some(owner) if d.reclaimed => match s.queue.give_back(&d, owner).await {
                Ok(true) => {}
                Ok(false) => ack(s, &d).await,
                Err(e) => {
                    tracing::debug!(error = %e, "could not hand an entry back to its owner")
                }
            },
            // a second entry of a job that runs elsewhere: drop it
            _ => ack(s, &d).await,
        },
        Ok(ClaimOutcome::NotDue(row)) => {
            if s.queue.delay(&row.dispatch_item()).await.is_ok() {
                ack(s, &d).await;
            }
        }
        Ok(ClaimOutcome::Finalized(row)) => {
            let ev = Event::terminal(
                row.id,
                row.event_seq as u64,
                row.attempt,
                row.status(),
                row.output.as_ref(),
                row.job_error().as_ref(),
            );
            // after whatever the dead run streamed (Postgres' seq does not count its deltas)
            let durable = (row.event_seq as u64).saturating_sub(1);
            if let Err(e) = s.bus.publish_after(&ev, durable).await {
                tracing::warn!(error = %e, "could not publish a finalized job's end");
            }
            ack(s, &d).await;
        }
        Ok(ClaimOutcome::Claimed(row)) => crate::run::run_claimed(s, d, row).await,
    }
}
