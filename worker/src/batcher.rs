//! A batching task: requests from many runs queue on a bounded channel, and one task takes
//! whatever is waiting (up to a maximum) and handles it as one batch. The group commit of run
//! ends, the publisher and the acker are built on it.

use std::future::Future;
use std::sync::Mutex;

use futures::stream::{FuturesUnordered, StreamExt};
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

    /// Starts the task (once): it hands each batch to `handle`, one batch at a time, and ends
    /// when `stop` fires, after handling what waits.
    pub(crate) fn start<F, Fut>(
        &self,
        stop: CancellationToken,
        handle: F,
    ) -> Option<tokio::task::JoinHandle<()>>
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.start_overlapped(stop, 1, handle)
    }

    /// Like [`Batcher::start`], with up to `in_flight` batches handled at once: the next batch
    /// is taken while earlier ones wait on their round trip. Only for requests whose order
    /// across batches does not matter (each sender awaits its request before the next).
    pub(crate) fn start_overlapped<F, Fut>(
        &self,
        stop: CancellationToken,
        in_flight: usize,
        mut handle: F,
    ) -> Option<tokio::task::JoinHandle<()>>
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut rx = self.rx.lock().ok().and_then(|mut r| r.take())?;
        let max = self.max;
        let in_flight = in_flight.max(1);
        Some(tokio::spawn(async move {
            let mut running = FuturesUnordered::new();
            let mut stopping = false;
            loop {
                // a free slot: wait for the next request (handling finished batches meanwhile)
                let first = if running.len() < in_flight {
                    tokio::select! {
                        r = rx.recv() => r,
                        Some(()) = running.next(), if !running.is_empty() => continue,
                        _ = stop.cancelled(), if !stopping => {
                            stopping = true;
                            rx.close();
                            continue;
                        }
                    }
                } else {
                    running.next().await;
                    continue;
                };
                let Some(first) = first else { break };
                let mut batch = Vec::with_capacity(max);
                batch.push(first);
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                running.push(handle(batch));
            }
            // the channel is closed and empty: finish the batches still in flight
            while running.next().await.is_some() {}
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;

    /// Overlapped batches: at most `in_flight` run at once, every request is handled exactly
    /// once, and stopping finishes the batches in flight and what still waits.
    #[tokio::test]
    async fn overlapped_batches_stay_within_the_limit_and_lose_nothing() {
        let batcher = Arc::new(Batcher::<usize>::new(4, 64));
        let gate = Arc::new(Semaphore::new(0));
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = {
            let (gate, now, peak, seen) = (gate.clone(), now.clone(), peak.clone(), seen.clone());
            batcher
                .start_overlapped(stop.clone(), 3, move |batch: Vec<usize>| {
                    let (gate, now, peak, seen) =
                        (gate.clone(), now.clone(), peak.clone(), seen.clone());
                    async move {
                        let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(running, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        seen.lock().unwrap().extend(batch);
                        now.fetch_sub(1, Ordering::SeqCst);
                    }
                })
                .unwrap()
        };
        // the second start is refused: one task per batcher
        assert!(batcher.start(stop.clone(), |_| async {}).is_none());
        for i in 0..40 {
            batcher.send(i).await.unwrap();
            tokio::task::yield_now().await;
        }
        // three batches are blocked on the gate; nothing more runs until one finishes
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(now.load(Ordering::SeqCst), 3);
        stop.cancel();
        gate.add_permits(1000);
        task.await.unwrap();
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
    }
}
