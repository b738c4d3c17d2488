//! One Redis pub/sub connection per process that fans live job events out to local
//! subscribers (WebSocket and SSE streams) over bounded channels. A slow subscriber loses
//! messages (it notices the gap and re-reads history) instead of slowing anyone else.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use switchyard_core::Event;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::keys::Keys;

/// How often the pub/sub connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(15);
/// How long a connect, a (un)subscribe or a ping may take before the connection counts as
/// dead (and is made again: subscribers re-read history).
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum LiveMsg {
    Event(Arc<Event>),
    /// Re-read history: the subscription just took effect, or the pub/sub connection was
    /// re-established (messages may have been missed).
    Resync,
}

/// A subscriber: its id, its bounded channel, and a flag raised when a message was dropped
/// because the channel was full (the subscriber then re-reads history).
type Sub = (u64, mpsc::Sender<LiveMsg>, Arc<AtomicBool>);
type Subs = HashMap<Uuid, Vec<Sub>>;

struct Inner {
    keys: Keys,
    subs: Mutex<Subs>,
    next_id: AtomicU64,
    /// Jobs whose channel subscription may need to change; the connection task reconciles
    /// them with what is subscribed, in batches (one SUBSCRIBE for many channels).
    dirty: Mutex<HashSet<Uuid>>,
    wake: Notify,
    /// Bumped on every credentials announcement, and on every reconnection (announcements
    /// may have been missed meanwhile).
    credentials: tokio::sync::watch::Sender<u64>,
}

/// Shared fan-out of live events. Cheap to clone.
#[derive(Clone)]
pub struct LiveHub {
    inner: Arc<Inner>,
}

/// A live subscription to one job; unsubscribes when dropped.
pub struct LiveSubscription {
    pub rx: mpsc::Receiver<LiveMsg>,
    /// The job's channel was not subscribed yet: a `Resync` follows once it is.
    pub activating: bool,
    lagged: Arc<AtomicBool>,
    hub: LiveHub,
    job: Uuid,
    id: u64,
}

impl LiveSubscription {
    /// Whether messages were dropped since the last call (the buffer was full): re-read history.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

impl Drop for LiveSubscription {
    fn drop(&mut self) {
        self.hub.remove(self.job, self.id);
    }
}

impl LiveHub {
    /// Starts the connection task; it reconnects with backoff until `shutdown`.
    pub fn start(
        client: crate::RedisClient,
        keys: Keys,
        shutdown: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> LiveHub {
        let hub = LiveHub {
            inner: Arc::new(Inner {
                keys,
                subs: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                dirty: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                credentials: tokio::sync::watch::Sender::new(0),
            }),
        };
        let h = hub.clone();
        tracker.spawn(async move { h.run(client, shutdown).await });
        hub
    }

    /// Subscribes to live events of `job`; `buffer` caps what may queue up for this subscriber.
    pub fn subscribe(&self, job: Uuid, buffer: usize) -> LiveSubscription {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(AtomicBool::new(false));
        let first = {
            let mut subs = self.inner.subs.lock().expect("live hub lock");
            let list = subs.entry(job).or_default();
            list.push((id, tx, lagged.clone()));
            list.len() == 1
        };
        if first {
            self.mark_dirty(job);
        }
        LiveSubscription {
            rx,
            activating: first,
            lagged,
            hub: self.clone(),
            job,
            id,
        }
    }

    /// Changes whenever credentials or tenant settings may have changed elsewhere (see
    /// [`Keys::credentials_channel`]): what a cache of credential lookups listens to.
    pub fn credential_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.credentials.subscribe()
    }

    fn credentials_changed(&self) {
        self.inner
            .credentials
            .send_modify(|n| *n = n.wrapping_add(1));
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
            list.retain(|(i, _, _)| *i != id);
            if list.is_empty() {
                subs.remove(&job);
                true
            } else {
                false
            }
        };
        if last {
            self.mark_dirty(job);
        }
    }

    fn mark_dirty(&self, job: Uuid) {
        if let Ok(mut d) = self.inner.dirty.lock() {
            d.insert(job);
        }
        self.inner.wake.notify_one();
    }

    fn deliver(&self, job: Uuid, msg: LiveMsg) {
        let subs = self.inner.subs.lock().expect("live hub lock");
        if let Some(list) = subs.get(&job) {
            for (_, tx, lagged) in list {
                if tx.try_send(msg.clone()).is_err() {
                    // full: the subscriber is slow; it re-reads history when it catches up
                    lagged.store(true, Ordering::Release);
                }
            }
        }
    }

    fn broadcast_resync(&self) {
        let subs = self.inner.subs.lock().expect("live hub lock");
        for list in subs.values() {
            for (_, tx, lagged) in list {
                if tx.try_send(LiveMsg::Resync).is_err() {
                    lagged.store(true, Ordering::Release);
                }
            }
        }
    }

    async fn run(self, client: crate::RedisClient, shutdown: CancellationToken) {
        let prefix = self.inner.keys.event_channel_prefix();
        let mut backoff = Duration::from_millis(50);
        let mut connected_before = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(LIVENESS_TIMEOUT, client.pubsub()) => c,
            };
            let conn = conn.unwrap_or_else(|_| {
                Err((redis::ErrorKind::IoError, "pub/sub connect timed out").into())
            });
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
            // a new connection: subscribe to everything watched now
            let mut active: HashSet<Uuid> = HashSet::new();
            if let Ok(mut d) = self.inner.dirty.lock() {
                d.clear();
            }
            let watched: Vec<Uuid> = self.watched();
            let credentials = self.inner.keys.credentials_channel();
            let synced = tokio::time::timeout(LIVENESS_TIMEOUT, async {
                sink.subscribe(&credentials).await?;
                self.sync(&mut sink, &mut active, watched).await
            })
            .await
            .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "subscribe timed out").into()));
            if let Err(e) = synced {
                // not at once again: a SUBSCRIBE that keeps failing would spin
                tracing::warn!(error = %e, "live events: subscribing failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            backoff = Duration::from_millis(50);
            if connected_before {
                self.broadcast_resync();
                self.credentials_changed();
            }
            connected_before = true;
            // a connection that died without a word (a NAT or load balancer dropping it, a
            // half-open socket after a failover) is noticed by a ping, not waited on for ever
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ping.tick() => {
                        let pong = tokio::time::timeout(LIVENESS_TIMEOUT, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            tracing::warn!("live events: pub/sub connection unresponsive; reconnecting");
                            break;
                        }
                    }
                    _ = self.inner.wake.notified() => {
                        let dirty: Vec<Uuid> = match self.inner.dirty.lock() {
                            Ok(mut d) => d.drain().collect(),
                            Err(_) => return,
                        };
                        let synced = tokio::time::timeout(
                            LIVENESS_TIMEOUT,
                            self.sync(&mut sink, &mut active, dirty),
                        )
                        .await
                        .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "(un)subscribe timed out").into()));
                        if let Err(e) = synced {
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
                        if channel == credentials {
                            self.credentials_changed();
                            continue;
                        }
                        let Some(job) = channel.strip_prefix(&prefix).and_then(|j| Uuid::parse_str(j).ok()) else {
                            continue;
                        };
                        match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
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

    fn watched(&self) -> Vec<Uuid> {
        let subs = self.inner.subs.lock().expect("live hub lock");
        subs.keys().copied().collect()
    }

    /// Brings the subscribed channels of `jobs` in line with who watches them (batched), then
    /// tells the new subscribers to re-read history: anything published before the
    /// subscription took effect is in the history by now.
    async fn sync(
        &self,
        sink: &mut PubSubSink,
        active: &mut HashSet<Uuid>,
        jobs: Vec<Uuid>,
    ) -> redis::RedisResult<()> {
        let (mut add, mut del, mut again) = (Vec::new(), Vec::new(), Vec::new());
        {
            let subs = self.inner.subs.lock().expect("live hub lock");
            for j in jobs {
                match (subs.contains_key(&j), active.contains(&j)) {
                    (true, false) => add.push(j),
                    (false, true) => del.push(j),
                    // marked because its subscribers came and went before this ran: the
                    // channel is still subscribed, but a new first subscriber waits for a
                    // resync before it reads history
                    (true, true) => again.push(j),
                    _ => {}
                }
            }
        }
        for j in again {
            self.deliver(j, LiveMsg::Resync);
        }
        let keys = &self.inner.keys;
        for chunk in del.chunks(512) {
            let chans: Vec<String> = chunk.iter().map(|j| keys.event_channel(*j)).collect();
            sink.unsubscribe(&chans).await?;
            for j in chunk {
                active.remove(j);
            }
        }
        for chunk in add.chunks(512) {
            let chans: Vec<String> = chunk.iter().map(|j| keys.event_channel(*j)).collect();
            sink.subscribe(&chans).await?;
            for j in chunk {
                active.insert(*j);
                self.deliver(*j, LiveMsg::Resync);
            }
        }
        Ok(())
    }
}
