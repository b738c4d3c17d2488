//! Event publication for the worker's runs: one task sends the events that are waiting, from
//! every running job, in one Redis pipeline. A streaming job has one event in flight at a time,
//! so a thousand streams made a thousand round trips where now a burst makes one.

use std::sync::Mutex;

use switchyard_core::Event;
use switchyard_queue::events::Published;
use switchyard_queue::EventBus;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most events sent in one pipeline.
const MAX_BATCH: usize = 256;

struct Req {
    ev: Event,
    done: oneshot::Sender<Published>,
}

pub(crate) struct Publisher {
    bus: EventBus,
    tx: mpsc::Sender<Req>,
    rx: Mutex<Option<mpsc::Receiver<Req>>>,
}

impl Publisher {
    pub(crate) fn new(bus: EventBus) -> Publisher {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        Publisher {
            bus,
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Starts the batching task (once); it ends when `stop` fires, after sending what waits.
    pub(crate) fn start(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.rx.lock().ok().and_then(|mut r| r.take())?;
        Some(tokio::spawn(publish_loop(self.bus.clone(), rx, stop)))
    }

    /// Publishes `ev` with the next batch. Live events are best effort (the durable state is in
    /// Postgres): a failure is logged and answered `Stale`.
    pub(crate) async fn publish(&self, ev: Event) -> Published {
        let (done, rx) = oneshot::channel();
        let seq = ev.seq;
        if self.tx.send(Req { ev, done }).await.is_err() {
            tracing::warn!(seq, "event publisher stopped; event not published");
            return Published::Stale;
        }
        rx.await.unwrap_or(Published::Stale)
    }
}

async fn publish_loop(bus: EventBus, mut rx: mpsc::Receiver<Req>, stop: CancellationToken) {
    let mut batch: Vec<Req> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.cancelled() => { rx.close(); rx.recv().await }
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (events, replies): (Vec<Event>, Vec<_>) =
            batch.drain(..).map(|r| (r.ev, r.done)).unzip();
        let results = bus.publish_many(&events).await;
        for ((ev, done), r) in events.iter().zip(replies).zip(results) {
            let p = r.unwrap_or_else(|e| {
                tracing::warn!(error = %e, seq = ev.seq, "event publish failed");
                Published::Stale
            });
            let _ = done.send(p);
        }
    }
}
