//! The worker runtime: per-queue fetch loops, lease heartbeats, reclaim of expired leases,
//! cancel notifications, retries with backoff, and draining on shutdown.
//!
//! Invariants: a stream entry is acknowledged only after Postgres holds the run's outcome; every
//! write of a run is fenced by its `attempt`; a fenced-out run stops without writing anything.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use switchyard_queue::{EventBus, Queue};
use switchyard_store::{RunEndWrite, Store, StoreError};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::batcher::Batcher;
use crate::deliver::spawn_batch;
use crate::executor::ExecutorRegistry;
use crate::holds::{Claims, RecentCancels};

/// Tunables of a worker process.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queues: Vec<String>,
    pub concurrency: usize,
    pub lease: Duration,
    /// Consumer name prefix; a random suffix makes it unique.
    pub name: String,
    pub shutdown_grace: Duration,
    /// Longest blocking read on a queue.
    pub fetch_block: Duration,
    /// First retry delay; doubles per attempt (capped at 60 s), with jitter.
    pub retry_base: Duration,
    /// Queues with their own number of slots (e.g. `code`, bounded by CPUs), apart from
    /// `concurrency`, which the other queues share.
    pub queue_concurrency: HashMap<String, usize>,
    /// The configured tenant quotas (`[quotas]`): a run whose tenant has used up today's
    /// quota for it waits for the next day.
    pub quota_defaults: switchyard_core::quota::QuotaLimits,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            queues: switchyard_core::job::known_queues()
                .into_iter()
                .map(String::from)
                .collect(),
            concurrency: 64,
            lease: Duration::from_secs(30),
            name: "worker".into(),
            shutdown_grace: Duration::from_secs(30),
            fetch_block: Duration::from_secs(1),
            retry_base: Duration::from_secs(1),
            queue_concurrency: HashMap::new(),
            quota_defaults: Default::default(),
        }
    }
}

impl Shared {
    /// The slots a queue's jobs take.
    pub(crate) fn slots_for(&self, queue: &str) -> &Arc<Semaphore> {
        self.queue_slots.get(queue).unwrap_or(&self.slots)
    }
}

pub(crate) struct Running {
    pub(crate) beat_now: Arc<Notify>,
    /// The attempt running (a newer one claimed here replaces a stale one's entry).
    pub(crate) attempt: i32,
}

pub(crate) struct Shared {
    pub(crate) id: String,
    pub(crate) store: Store,
    pub(crate) queue: Queue,
    pub(crate) quotas: switchyard_queue::Quotas,
    /// Daily quotas checked before a run starts.
    pub(crate) daily: crate::quota::DailyGate,
    pub(crate) bus: EventBus,
    /// Events of all runs go out in batches (`publisher.rs`).
    pub(crate) publisher: crate::publisher::Publisher,
    /// Deliveries are acknowledged in batches (`acker.rs`).
    pub(crate) acker: crate::acker::Acker,
    pub(crate) client: switchyard_queue::RedisClient,
    pub(crate) executors: ExecutorRegistry,
    pub(crate) opts: WorkerOptions,
    /// Run slots: one shared semaphore, plus one per queue with its own concurrency.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) queue_slots: HashMap<String, Arc<Semaphore>>,
    pub(crate) running: Mutex<HashMap<Uuid, Running>>,
    /// Jobs this worker holds a claim on, from the claim to the end of their run.
    pub(crate) claimed: Claims,
    /// Cancel notices for jobs not (yet) running here.
    pub(crate) recent_cancels: Mutex<RecentCancels>,
    /// Fired after the grace period: runs still going are released to other workers.
    pub(crate) hard_stop: CancellationToken,
    pub(crate) jobs: TaskTracker,
    /// Run ends go through a group-commit task (one UPDATE for many jobs).
    completer: Batcher<CompleteReq>,
}

struct CompleteReq {
    write: RunEndWrite,
    done: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
}

pub struct Worker {
    shared: Arc<Shared>,
}

/// A started worker. `drain` stops fetching, waits for in-flight jobs (up to the grace period)
/// and releases the rest.
pub struct WorkerHandle {
    id: String,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub async fn drain(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }

    /// Completes when the worker stopped (after its stop token fired and it drained).
    pub async fn join(self) {
        let _ = self.done.await;
    }
}

impl Worker {
    pub fn new(
        store: Store,
        queue: Queue,
        bus: EventBus,
        client: switchyard_queue::RedisClient,
        executors: ExecutorRegistry,
        opts: WorkerOptions,
    ) -> Worker {
        let suffix: String = {
            let mut rng = rand::thread_rng();
            (0..8)
                .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)]))
                .collect()
        };
        let id = format!("{}-{}", opts.name, suffix);
        Worker {
            shared: Arc::new(Shared {
                id,
                store,
                quotas: switchyard_queue::Quotas::new(queue.keys().clone(), queue.conn()),
                daily: crate::quota::DailyGate::new(opts.quota_defaults.clone()),
                acker: crate::acker::Acker::new(queue.clone()),
                queue,
                publisher: crate::publisher::Publisher::new(bus.clone()),
                bus,
                client,
                executors,
                slots: Arc::new(Semaphore::new(opts.concurrency)),
                queue_slots: opts
                    .queue_concurrency
                    .iter()
                    .map(|(q, n)| (q.clone(), Arc::new(Semaphore::new((*n).max(1)))))
                    .collect(),
                opts,
                running: Mutex::new(HashMap::new()),
                claimed: Claims::default(),
                recent_cancels: Mutex::new(RecentCancels::default()),
                hard_stop: CancellationToken::new(),
                jobs: TaskTracker::new(),
                completer: Batcher::new(256, 4096),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Starts the loops; `stop` (e.g. SIGTERM) begins the drain.
    pub fn start(self, stop: CancellationToken) -> WorkerHandle {
        let s = self.shared;
        let id = s.id.clone();
        let stop2 = stop.clone();
        let completer_stop = CancellationToken::new();
        let store = s.store.clone();
        let completer = s.completer.start(completer_stop.clone(), move |batch| {
            end_batch(store.clone(), batch)
        });
        let publisher_stop = CancellationToken::new();
        let publisher = s.publisher.start(publisher_stop.clone());
        let acker_stop = CancellationToken::new();
        let acker = s.acker.start(acker_stop.clone());
        let done = tokio::spawn(async move {
            let loops = TaskTracker::new();
            for q in s.opts.queues.clone() {
                loops.spawn(fetch_loop(s.clone(), q, stop2.clone()));
            }
            loops.spawn(crate::reclaim::reclaim_loop(s.clone(), stop2.clone()));
            loops.spawn(cancel_listener(s.clone(), stop2.clone()));
            loops.spawn(crate::registry::report_loop(s.clone(), stop2.clone()));
            loops.close();
            tracing::info!(worker = %s.id, queues = ?s.opts.queues, concurrency = s.opts.concurrency, "worker started");
            stop2.cancelled().await;
            tracing::info!(worker = %s.id, "draining: no new jobs; waiting for in-flight ones");
            loops.wait().await;
            s.jobs.close();
            if tokio::time::timeout(s.opts.shutdown_grace, s.jobs.wait())
                .await
                .is_err()
            {
                tracing::warn!(worker = %s.id, "grace period over: releasing unfinished jobs");
                s.hard_stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), s.jobs.wait()).await;
            }
            completer_stop.cancel();
            if let Some(c) = completer {
                let _ = c.await;
            }
            publisher_stop.cancel();
            if let Some(p) = publisher {
                let _ = p.await;
            }
            acker_stop.cancel();
            if let Some(a) = acker {
                let _ = a.await;
            }
            let _ = s.queue.remove_worker(&s.id).await;
            tracing::info!(worker = %s.id, "worker stopped");
        });
        WorkerHandle { id, stop, done }
    }
}

async fn backoff_sleep(attempt: &mut u32, stop: &CancellationToken) -> bool {
    let ms = (50u64 << (*attempt).min(6)).min(2000);
    *attempt += 1;
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
    }
}

async fn fetch_loop(s: Arc<Shared>, queue: String, stop: CancellationToken) {
    let mut tries = 0;
    let mut conn = loop {
        match s
            .client
            .connect(s.opts.fetch_block + Duration::from_secs(5))
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, queue, "worker: redis connect failed; retrying");
                if !backoff_sleep(&mut tries, &stop).await {
                    return;
                }
            }
        }
    };
    let mut group_ready = false;
    tries = 0;
    while !stop.is_cancelled() {
        if !group_ready {
            match s.queue.ensure_group(&queue).await {
                Ok(()) => group_ready = true,
                Err(e) => {
                    tracing::warn!(error = %e, queue, "worker: cannot create consumer group; retrying");
                    if !backoff_sleep(&mut tries, &stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let slots = s.slots_for(&queue);
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        while permits.len() < 64 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        match s
            .queue
            .try_fetch(&mut conn, &queue, &s.id, permits.len())
            .await
        {
            Ok(got) if got.deliveries.is_empty() => {
                tries = 0;
                // wait for the bell without holding the slots: lease reclaim needs them
                // (an idle worker that held them would never take over stranded entries)
                drop(permits);
                let wait = s
                    .queue
                    .wait_bell(&mut conn, &queue, &got.bell, s.opts.fetch_block);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = wait => if let Err(e) = r {
                        tracing::warn!(error = %e, queue, "worker: waiting for work failed; retrying");
                        if !backoff_sleep(&mut tries, &stop).await {
                            return;
                        }
                    },
                }
            }
            Ok(got) => {
                tries = 0;
                spawn_batch(&s, got.deliveries, &mut permits).await;
            }
            Err(e) if e.code() == Some("NOGROUP") => {
                tracing::warn!(
                    queue,
                    "worker: consumer group missing (redis lost data?); recreating"
                );
                group_ready = false;
                // backed off from the second time in a row: a group recreated through one
                // connection that this one's node does not see yet (a failover) would spin
                if tries > 0 {
                    drop(permits);
                    if !backoff_sleep(&mut tries, &stop).await {
                        return;
                    }
                } else {
                    tries = 1;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, queue, "worker: fetch failed; retrying");
                drop(permits);
                if !backoff_sleep(&mut tries, &stop).await {
                    return;
                }
            }
        }
    }
}

async fn cancel_listener(s: Arc<Shared>, stop: CancellationToken) {
    use futures::StreamExt;
    let channel = s.queue.keys().cancel_channel();
    let mut tries = 0;
    while !stop.is_cancelled() {
        let ps = tokio::select! {
            _ = stop.cancelled() => return,
            ps = s.client.pubsub() => ps,
        };
        let mut ps = match ps {
            Ok(ps) => ps,
            Err(e) => {
                tracing::debug!(error = %e, "cancel listener: connect failed");
                if !backoff_sleep(&mut tries, &stop).await {
                    return;
                }
                continue;
            }
        };
        if ps.subscribe(&channel).await.is_err() {
            if !backoff_sleep(&mut tries, &stop).await {
                return;
            }
            continue;
        }
        tries = 0;
        let mut msgs = ps.on_message();
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = msgs.next() => m,
            };
            let Some(m) = m else { break };
            let Ok(payload) = m.get_payload::<String>() else {
                continue;
            };
            let Ok(job) = Uuid::parse_str(&payload) else {
                continue;
            };
            // the notice is kept under the `running` lock: a run that registers meanwhile
            // either is seen here or finds the notice when it looks (run.rs), never neither
            let Ok(running) = s.running.lock() else {
                continue;
            };
            match running.get(&job) {
                Some(r) => r.beat_now.notify_one(),
                None => {
                    if let Ok(mut recent) = s.recent_cancels.lock() {
                        recent.insert(job, tokio::time::Instant::now());
                    }
                }
            }
            drop(running);
        }
    }
}

/// Retries a store call on transient errors (Postgres down) with backoff, up to ~`limit`.
pub(crate) async fn with_retry<T, F, Fut>(
    what: &str,
    limit: Duration,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match f().await {
            Err(StoreError::Unavailable(e)) if start.elapsed() < limit => {
                tracing::warn!(error = %e, what, "postgres unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Group commit of run ends: everything waiting is written in one fenced UPDATE.
async fn end_batch(store: Store, batch: Vec<CompleteReq>) {
    let writes: Vec<RunEndWrite> = batch.iter().map(|r| r.write.clone()).collect();
    match store.end_runs(&writes).await {
        Ok(done) => {
            let done: std::collections::HashSet<(Uuid, i32)> = done.into_iter().collect();
            for r in batch {
                let ok = done.contains(&(r.write.id, r.write.attempt));
                let _ = r.done.send(Ok(ok));
            }
        }
        Err(StoreError::Unavailable(e)) => {
            tracing::warn!(error = %e, "recording run ends: postgres unavailable");
            for r in batch {
                let _ = r
                    .done
                    .send(Err(StoreError::Unavailable(sqlx_unavailable())));
            }
        }
        Err(e) => {
            // a bad row must not fail the others: write them one by one
            tracing::warn!(error = %e, "batched run ends failed; writing one by one");
            for r in batch {
                let w = &r.write;
                let res = store.end_one(w).await;
                let _ = r.done.send(res);
            }
        }
    }
}

fn sqlx_unavailable() -> sqlx::Error {
    sqlx::Error::PoolTimedOut
}

/// Records the end of a run through the group-commit task.
pub(crate) async fn complete(s: &Shared, write: RunEndWrite) -> Result<bool, StoreError> {
    let (done, rx) = tokio::sync::oneshot::channel();
    s.completer
        .send(CompleteReq { write, done })
        .await
        .map_err(|_| StoreError::Unavailable(sqlx_unavailable()))?;
    rx.await
        .map_err(|_| StoreError::Unavailable(sqlx_unavailable()))?
}
