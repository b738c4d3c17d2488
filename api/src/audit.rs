//! Auditing state-changing requests: the authorization layer hands each one (who, tenant,
//! action, target, outcome, request id, source address) to this sink; a background task
//! appends them in batches (one chain-head lock per tenant per batch, never one per request).
//! Bodies — prompts, code, secrets — are never recorded.

use std::time::Duration;

use switchyard_store::{AuditEntry, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Entries waiting at most; a full queue makes requests wait (nothing is dropped).
const QUEUE: usize = 8192;
const BATCH: usize = 512;
/// How long a batch waits for more entries before it is written.
const LINGER: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEntry>,
}

impl AuditSink {
    /// Starts the writer; it drains what is queued when `stop` fires. `stop` is meant to fire
    /// once the server has finished its requests (not with the shutdown signal itself: the
    /// requests still in flight then would find the writer gone and their entries lost).
    pub fn start(
        store: Store,
        stop: CancellationToken,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> AuditSink {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn(writer(store, rx, stop, shutdown));
        AuditSink { tx }
    }

    pub async fn record(&self, e: AuditEntry) {
        if self.tx.send(e).await.is_err() {
            tracing::error!("audit writer stopped; an audit entry was not recorded");
        }
    }
}

/// `shutdown` starts the retry deadline of a failing batch (the server waits for its requests,
/// which may wait on a full queue); `stop` ends the writer once they are done.
async fn writer(
    store: Store,
    mut rx: mpsc::Receiver<AuditEntry>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    // once the API is shutting down, failing batches are retried until then, all together
    let mut give_up_at: Option<tokio::time::Instant> = None;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = stop.cancelled() => {
                // requests still in flight may add more; take what is there
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                write(&store, &mut batch, &shutdown, &mut give_up_at).await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        // the requests do not wait for this: let a few more arrive so that a moderate request
        // rate writes one transaction per LINGER, not one per request
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            let more = tokio::select! {
                r = tokio::time::timeout_at(until, rx.recv_many(&mut batch, room)) => r,
                _ = stop.cancelled() => break,
            };
            match more {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        write(&store, &mut batch, &shutdown, &mut give_up_at).await;
    }
}

/// How long a batch is retried once the API is shutting down (before: as long as it takes,
/// while requests wait on the full queue rather than lose their entries; during a shutdown
/// they must end).
const RETRY_AFTER_STOP: Duration = Duration::from_secs(30);

async fn write(
    store: &Store,
    batch: &mut Vec<AuditEntry>,
    shutdown: &CancellationToken,
    give_up_at: &mut Option<tokio::time::Instant>,
) {
    let mut wait = Duration::from_millis(100);
    loop {
        match store.append_audit(batch.clone()).await {
            Ok(()) => {
                batch.clear();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, n = batch.len(), "audit append failed; retrying");
                if shutdown.is_cancelled() {
                    let until = *give_up_at
                        .get_or_insert_with(|| tokio::time::Instant::now() + RETRY_AFTER_STOP);
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(
        n = batch.len(),
        "audit entries could not be written before the API stopped"
    );
    batch.clear();
}
