//! One Redis pub/sub connection per process that fans live job events out to local
//! subscribers (WebSocket and SSE streams) over bounded channels. A slow subscriber loses
//! messages (it notices the gap and re-reads history) instead of slowing anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use switchyard_core::Event;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::keys::Keys;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum LiveMsg {
    Event(Arc<Event>),
    /// The pub/sub connection was re-established: messages may have been missed, re-read.
    Resync,
}

type Subs = HashMap<Uuid, Vec<(u64, mpsc::Sender<LiveMsg>)>>;

struct Inner {
    keys: Keys,
    subs: Mutex<Subs>,
    next_id: AtomicU64,
    /// (un)subscribe requests for the connection task.
    ctl: mpsc::Sender<Ctl>,
}

enum Ctl {
    Sub(String),
    Unsub(String),
}

/// Shared fan-out of live events. Cheap to clone.
#[derive(Clone)]
pub struct LiveHub {
    inner: Arc<Inner>,
}

/// A live subscription to one job; unsubscribes when dropped.
pub struct LiveSubscription {
    pub rx: mpsc::Receiver<LiveMsg>,
    hub: LiveHub,
    job: Uuid,
    id: u64,
}

impl Drop for LiveSubscription {
    fn drop(&mut self) {
        self.hub.remove(self.job, self.id);
    }
}

impl LiveHub {
    /// Starts the connection task; it reconnects with backoff until `shutdown`.
    pub fn start(
        client: redis::Client,
        keys: Keys,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> LiveHub {
        let (ctl_tx, ctl_rx) = mpsc::channel(4096);
        let hub = LiveHub {
            inner: Arc::new(Inner {
                keys,
                subs: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                ctl: ctl_tx,
            }),
        };
        let h = hub.clone();
        tracker.spawn(async move { h.run(client, ctl_rx, shutdown).await });
        hub
    }

    /// Subscribes to live events of `job`; `buffer` caps what may queue up for this subscriber.
    pub fn subscribe(&self, job: Uuid, buffer: usize) -> LiveSubscription {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut subs = self.inner.subs.lock().expect("live hub lock");
            let list = subs.entry(job).or_default();
            list.push((id, tx));
            list.len() == 1
        };
        if first {
            let _ = self
                .inner
                .ctl
                .try_send(Ctl::Sub(self.inner.keys.event_channel(job)));
        }
        LiveSubscription {
            rx,
            hub: self.clone(),
            job,
            id,
        }
    }

    /// Number of jobs with local subscribers.
    pub fn watched_jobs(&self) -> usize {
        self.inner.subs.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn remove(&self, job: Uuid, id: u64) {
        let last = {
            let Ok(mut subs) = self.inner.subs.lock() else {
                return;
            };
            let Some(list) = subs.get_mut(&job) else {
                return;
            };
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                subs.remove(&job);
                true
            } else {
                false
            }
        };
        if last {
            let _ = self
                .inner
                .ctl
                .try_send(Ctl::Unsub(self.inner.keys.event_channel(job)));
        }
    }

    fn deliver(&self, job: Uuid, msg: LiveMsg) {
        let subs = self.inner.subs.lock().expect("live hub lock");
        if let Some(list) = subs.get(&job) {
            for (_, tx) in list {
                // full: the subscriber is slow; it will see the seq gap and re-read
                let _ = tx.try_send(msg.clone());
            }
        }
    }

    fn broadcast_resync(&self) {
        let subs = self.inner.subs.lock().expect("live hub lock");
        for list in subs.values() {
            for (_, tx) in list {
                let _ = tx.try_send(LiveMsg::Resync);
            }
        }
    }

    fn channels(&self) -> Vec<String> {
        let subs = self.inner.subs.lock().expect("live hub lock");
        subs.keys()
            .map(|j| self.inner.keys.event_channel(*j))
            .collect()
    }

    async fn run(
        self,
        client: redis::Client,
        mut ctl: mpsc::Receiver<Ctl>,
        shutdown: CancellationToken,
    ) {
        let prefix = self.inner.keys.event_channel_prefix();
        let mut backoff = Duration::from_millis(50);
        let mut connected_before = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = client.get_async_pubsub() => c,
            };
            let (mut sink, mut stream) = match conn {
                Ok(ps) => ps.split(),
                Err(e) => {
                    tracing::warn!(error = %e, "live events: redis pub/sub connect failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            // drain stale control messages, then subscribe to what is watched now
            while ctl.try_recv().is_ok() {}
            let chans = self.channels();
            if !chans.is_empty() && resubscribe(&mut sink, &chans).await.is_err() {
                continue;
            }
            backoff = Duration::from_millis(50);
            if connected_before {
                self.broadcast_resync();
            }
            connected_before = true;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    c = ctl.recv() => {
                        let res = match c {
                            Some(Ctl::Sub(ch)) => sink.subscribe(ch).await,
                            Some(Ctl::Unsub(ch)) => sink.unsubscribe(ch).await,
                            None => return,
                        };
                        if let Err(e) = res {
                            tracing::warn!(error = %e, "live events: pub/sub command failed; reconnecting");
                            break;
                        }
                    }
                    m = stream.next() => {
                        let Some(msg) = m else {
                            tracing::warn!("live events: pub/sub connection closed; reconnecting");
                            break;
                        };
                        let channel = msg.get_channel_name();
                        let Some(job) = channel.strip_prefix(&prefix).and_then(|j| Uuid::parse_str(j).ok()) else {
                            continue;
                        };
                        let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                        match serde_json::from_slice::<Event>(&payload) {
                            Ok(ev) => self.deliver(job, LiveMsg::Event(Arc::new(ev))),
                            Err(e) => tracing::warn!(error = %e, "live events: bad payload"),
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }
}

async fn resubscribe(sink: &mut PubSubSink, chans: &[String]) -> redis::RedisResult<()> {
    for chunk in chans.chunks(512) {
        sink.subscribe(chunk).await?;
    }
    Ok(())
}
