//! Acknowledgements of the worker's deliveries: one task removes the entries that are waiting,
//! from every run, with one script call per queue instead of one per job. An entry is
//! acknowledged only after Postgres holds its run's outcome (the callers wait for that first).

use std::collections::BTreeMap;
use std::time::Duration;

use switchyard_queue::{Delivery, Queue};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::batcher::Batcher;

/// Most entries acknowledged in one batch.
const MAX_BATCH: usize = 256;
/// Tries of a batch while Redis fails, with doubling delays from 50 ms (about 13 s in all).
const TRIES: u32 = 8;

struct Req {
    d: Delivery,
    done: oneshot::Sender<()>,
}

pub(crate) struct Acker {
    queue: Queue,
    batcher: Batcher<Req>,
}

impl Acker {
    pub(crate) fn new(queue: Queue) -> Acker {
        Acker {
            queue,
            batcher: Batcher::new(MAX_BATCH, 4 * MAX_BATCH),
        }
    }

    /// Starts the batching task (once); it ends when `stop` fires, after sending what waits.
    pub(crate) fn start(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let queue = self.queue.clone();
        self.batcher
            .start(stop, move |batch| ack_batch(queue.clone(), batch))
    }

    /// Acknowledges `d` with the next batch and waits for it. If Redis stays unreachable the
    /// entry stays pending: it is reclaimed after its lease, and the claim then finds the job
    /// finished and drops it.
    pub(crate) async fn ack(&self, d: &Delivery) {
        let (done, rx) = oneshot::channel();
        if let Err(req) = self.batcher.send(Req { d: d.clone(), done }).await {
            // stopped: acknowledge on our own
            ack_queue(&self.queue, &req.d.queue, &[&req.d]).await;
            return;
        }
        let _ = rx.await;
    }
}

async fn ack_batch(queue: Queue, batch: Vec<Req>) {
    let mut by_queue: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for r in &batch {
        by_queue.entry(r.d.queue.as_str()).or_default().push(&r.d);
    }
    // queues side by side: one queue's trouble does not hold up the others
    futures::future::join_all(by_queue.iter().map(|(q, ds)| ack_queue(&queue, q, ds))).await;
    for r in batch {
        let _ = r.done.send(());
    }
}

/// Acknowledges entries of one queue, retrying while Redis is unreachable (a repeated
/// acknowledgement changes nothing, so a batch whose reply was lost may be sent again). An
/// error Redis answered (a script error) is not retried.
async fn ack_queue(queue: &Queue, q: &str, ds: &[&Delivery]) {
    let mut delay = Duration::from_millis(50);
    for _ in 0..TRIES {
        match queue.ack_many(q, ds).await {
            Ok(_) => return,
            Err(e) if !transient(&e) => {
                tracing::warn!(error = %e, n = ds.len(), "ack failed; the entries will be reclaimed");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, n = ds.len(), "ack failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    tracing::warn!(n = ds.len(), "ack abandoned; the entries will be reclaimed");
}

/// Whether a failed call may succeed if sent again: the connection failed, or the server
/// asked to retry (loading, busy, cluster changes).
fn transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY")
        )
}
