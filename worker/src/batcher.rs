//! A batching task: requests from many runs queue on a bounded channel, and one task takes
//! whatever is waiting (up to a maximum) and handles it as one batch. The group commit of run
//! ends, the publisher and the acker are built on it.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) struct Batcher<T> {
    tx: mpsc::Sender<T>,
    rx: Mutex<Option<mpsc::Receiver<T>>>,
    max: usize,
}

impl<T: Send + 'static> Batcher<T> {
    /// A batcher of at most `max` requests per batch, with room for `queued` waiting ones.
    pub(crate) fn new(max: usize, queued: usize) -> Batcher<T> {
        let (tx, rx) = mpsc::channel(queued.max(1));
        Batcher {
            tx,
            rx: Mutex::new(Some(rx)),
            max,
        }
    }

    /// Queues a request; gives it back if the task has stopped.
    pub(crate) async fn send(&self, req: T) -> Result<(), T> {
        self.tx.send(req).await.map_err(|e| e.0)
    }

    /// Starts the task (once): it hands each batch to `handle`, and ends when `stop` fires,
    /// after handling what waits.
    pub(crate) fn start<F, Fut>(
        &self,
        stop: CancellationToken,
        mut handle: F,
    ) -> Option<tokio::task::JoinHandle<()>>
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let mut rx = self.rx.lock().ok().and_then(|mut r| r.take())?;
        let max = self.max;
        Some(tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    r = rx.recv() => r,
                    _ = stop.cancelled() => { rx.close(); rx.recv().await }
                };
                let Some(first) = first else { return };
                let mut batch = Vec::with_capacity(max);
                batch.push(first);
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                handle(batch).await;
            }
        }))
    }
}
