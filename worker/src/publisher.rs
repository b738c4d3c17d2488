//! Event publication for the worker's runs: one task sends the events that are waiting, from
//! every running job, in one Redis pipeline. A streaming job has one event in flight at a time,
//! so a thousand streams made a thousand round trips where now a burst makes one, with a few
//! pipelines in flight at once.

use switchyard_core::Event;
use switchyard_queue::events::Published;
use switchyard_queue::EventBus;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::batcher::Batcher;
use crate::runtime::Shared;

/// Most events sent in one pipeline.
const MAX_BATCH: usize = 256;

/// Pipelines in flight at once. With one, a thousand streams kept every pipeline full and
/// events queued behind it for tens of milliseconds (the worker's encoding and Redis' work of
/// a pipeline ran one after the other); a run's own events stay in order because it awaits
/// each before sending the next.
const IN_FLIGHT: usize = 4;

struct Req {
    ev: Event,
    done: oneshot::Sender<Option<Published>>,
}

pub(crate) struct Publisher {
    bus: EventBus,
    batcher: Batcher<Req>,
}

impl Publisher {
    pub(crate) fn new(bus: EventBus) -> Publisher {
        Publisher {
            bus,
            batcher: Batcher::new(MAX_BATCH, 4 * MAX_BATCH),
        }
    }

    /// Starts the batching task (once); it ends when `stop` fires, after sending what waits.
    pub(crate) fn start(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let bus = self.bus.clone();
        self.batcher
            .start_overlapped(stop, IN_FLIGHT, move |batch| {
                publish_batch(bus.clone(), batch)
            })
    }

    /// Publishes `ev` with the next batch. Live events are best effort (the durable state is in
    /// Postgres): `None` when it is not known whether it was published (a Redis error, logged,
    /// after which it may or may not be in the stream; or the publisher stopped).
    pub(crate) async fn publish(&self, ev: Event) -> Option<Published> {
        let (done, rx) = oneshot::channel();
        let seq = ev.seq;
        if self.batcher.send(Req { ev, done }).await.is_err() {
            tracing::warn!(seq, "event publisher stopped; event not published");
            return None;
        }
        rx.await.ok().flatten()
    }
}

async fn publish_batch(bus: EventBus, batch: Vec<Req>) {
    let (events, replies): (Vec<Event>, Vec<_>) = batch.into_iter().map(|r| (r.ev, r.done)).unzip();
    let results = bus.publish_many(&events).await;
    for ((ev, done), r) in events.iter().zip(replies).zip(results) {
        let p = r
            .map_err(|e| tracing::warn!(error = %e, seq = ev.seq, "event publish failed"))
            .ok();
        let _ = done.send(p);
    }
}

/// Publishes a run's next event, numbered `*seq + 1`, and counts it in `seq`. When the stream
/// is ahead of the run's count (a dead run's deltas Postgres never counted, after an
/// announcement that failed), the event goes after the stream's head; when it is not known
/// whether it went out (a Redis error), the count is read back from the stream, and an event
/// that did not land is sent again (a Redis blip, e.g. a reconnect): the next event neither
/// reuses a taken seq (and is dropped as a repeat) nor leaves a gap, and none is skipped
/// unseen. Only when Redis stays away through the retries is the event given up (`Stale`).
pub(crate) async fn publish_next(s: &Shared, ev: Event, seq: &mut u64) -> Published {
    match s.publisher.publish(ev.clone()).await {
        Some(Published::Ok) => {
            *seq = ev.seq;
            Published::Ok
        }
        Some(Published::Fenced) => Published::Fenced,
        Some(Published::Stale) => republish(s, &ev, seq, false).await,
        None => republish(s, &ev, seq, true).await,
    }
}

/// Waits before each try of [`republish`].
const REPUBLISH_WAITS_MS: [u64; 5] = [0, 50, 200, 800, 2_000];

/// Sends `ev` after the stream's head, retried while Redis answers with errors. `unknown`:
/// an earlier send may have landed, so the stream is read first.
async fn republish(s: &Shared, ev: &Event, seq: &mut u64, unknown: bool) -> Published {
    let mut check = unknown;
    for wait in REPUBLISH_WAITS_MS {
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        if check {
            match s.bus.begin_attempt(ev.job_id, ev.attempt).await {
                // it went out (or the stream is ahead anyway): go on after the head
                Ok(Some(last)) if last >= ev.seq => {
                    *seq = last;
                    return Published::Ok;
                }
                // not there: send it (again)
                Ok(Some(_)) => {}
                Ok(None) => return Published::Fenced,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the stream's head failed; retrying");
                    continue;
                }
            }
        }
        match s.bus.publish_after(ev, *seq).await {
            Ok(Some(n)) => {
                *seq = n;
                return Published::Ok;
            }
            Ok(None) => return Published::Fenced,
            Err(e) => {
                tracing::debug!(error = %e, "publishing after the stream's head failed; retrying");
                // it may have landed before the error: read the head before sending again
                check = true;
            }
        }
    }
    tracing::warn!(
        seq = ev.seq,
        "event given up: redis unavailable through the retries"
    );
    Published::Stale
}
