//! Group commit of new jobs: requests queue up while the previous batch is being written, each
//! batch is one INSERT, and a failing batch is retried row by row so one bad row never fails
//! the others. After the commit the batch is dispatched to Redis (queued events first, then the
//! queue entries) and marked with the Redis epoch it went to; the reconciler covers crashes.

use switchyard_core::job::JobStatus;
use switchyard_core::Event;
use switchyard_queue::{events, RedisConn};
use switchyard_store::{NewJob, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

const MAX_BATCH: usize = 512;

struct SubmitReq {
    job: NewJob,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Jobs for the dispatch task, and whether their owners are already in their streams' meta
/// hashes (written beside the group commit; see [`write_owners`]).
type ToDispatch = (Vec<NewJob>, bool);

/// Handle to the group-commit task.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<SubmitReq>,
    dispatch: mpsc::Sender<ToDispatch>,
}

impl Submitter {
    pub fn start(
        store: Store,
        queue: switchyard_queue::Queue,
        redis: RedisConn,
        mark_linger: std::time::Duration,
        tracker: &TaskTracker,
    ) -> Submitter {
        let (tx, rx) = mpsc::channel(8192);
        let (dtx, drx) = mpsc::channel::<ToDispatch>(64);
        let (mtx, mrx) = mpsc::channel::<(Vec<Uuid>, i64)>(64);
        let owners = Owners {
            keys: queue.keys().clone(),
            redis: redis.clone(),
        };
        tracker.spawn(commit_loop(store.clone(), owners, rx, dtx.clone()));
        tracker.spawn(dispatch_loop(queue, redis, drx, mtx));
        tracker.spawn(mark_loop(store, mrx, mark_linger));
        Submitter { tx, dispatch: dtx }
    }

    /// Commits one job; returns once it is durable in Postgres.
    pub async fn submit(&self, job: NewJob) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(SubmitReq { job, done })
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        rx.await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }

    /// Dispatches a job that was committed elsewhere (e.g. with a conversation message). If this
    /// fails, the reconciler dispatches it (its `dispatch_epoch` is 0).
    pub async fn dispatch(&self, job: NewJob) {
        self.dispatch_many(vec![job]).await
    }

    /// Dispatches jobs committed elsewhere (a batch), like [`Submitter::dispatch`]; without
    /// waiting when the dispatch task is backlogged (Redis slow or away): the reconciler
    /// dispatches what it could not take.
    pub async fn dispatch_many(&self, jobs: Vec<NewJob>) {
        if let Err(e) = self.dispatch.try_send((jobs, false)) {
            tracing::warn!(error = %e, "dispatch backlogged or stopped; the reconciler will dispatch the jobs");
        }
    }
}

/// Longest wait for a group commit's INSERT before its requests are answered 503.
const INSERT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// After a commit that failed for want of Postgres, which of `ids` are in (its reply lost on
/// a connection that died after the commit): asked once, briefly; `None` when Postgres is
/// away (then the requests get their 503 about 2 s later than they did).
async fn landed(store: &Store, ids: &[Uuid]) -> Option<Vec<Uuid>> {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(2), store.existing_jobs(ids)).await;
    read.ok()?.ok()
}

/// Longest wait for the owners' write once the INSERT is done: a slow Redis costs a batch at
/// most this; what was not written is written again by the dispatch.
const OWNERS_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Where the commit loop writes the owners of the jobs it commits.
struct Owners {
    keys: switchyard_queue::Keys,
    redis: RedisConn,
}

/// Writes the owners of `jobs` while their INSERT runs: a client follows its job as soon as it
/// has the 202, often before the dispatch, and its follow then finds the owner in Redis rather
/// than reading the job from Postgres. Owners of jobs whose INSERT fails are harmless (no one
/// has those ids; the hash expires). Whether they were written.
async fn write_owners(owners: &Owners, jobs: &[NewJob]) -> bool {
    let mut pipe = redis::pipe();
    for j in jobs {
        events::pipe_owner(&mut pipe, &owners.keys, j.id, j.tenant_id, &j.created_by);
    }
    let mut redis = owners.redis.clone();
    matches!(
        tokio::time::timeout(OWNERS_WAIT, pipe.query_async::<()>(&mut redis)).await,
        Ok(Ok(()))
    )
}

async fn commit_loop(
    store: Store,
    owners: Owners,
    mut rx: mpsc::Receiver<SubmitReq>,
    dispatch: mpsc::Sender<ToDispatch>,
) {
    let mut batch: Vec<SubmitReq> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let jobs: Vec<NewJob> = batch.iter().map(|r| r.job.clone()).collect();
        let mut committed = Vec::with_capacity(jobs.len());
        // bounded: a connection that died silently would hold every submission behind it
        let (inserted, owners_written) = tokio::join!(
            tokio::time::timeout(INSERT_TIMEOUT, store.insert_jobs(&jobs)),
            write_owners(&owners, &jobs)
        );
        let inserted = inserted.unwrap_or(Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
        // the commit's reply may be what was lost (the rows are in): asked again, the jobs
        // that exist are accepted, not answered 503 (a client retrying it made a duplicate)
        let inserted = match inserted {
            Err(StoreError::Unavailable(e)) => {
                let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
                match landed(&store, &ids).await {
                    Some(found) if found.len() == ids.len() => Ok(()),
                    Some(found) if !found.is_empty() => {
                        // some rows only: cannot be one statement's; answer each as it stands
                        for r in batch.drain(..) {
                            if found.contains(&r.job.id) {
                                committed.push(r.job);
                                let _ = r.done.send(Ok(()));
                            } else {
                                let _ = r
                                    .done
                                    .send(Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
                            }
                        }
                        Err(StoreError::Unavailable(e))
                    }
                    _ => Err(StoreError::Unavailable(e)),
                }
            }
            other => other,
        };
        match inserted {
            Ok(()) => {
                for r in batch.drain(..) {
                    committed.push(r.job);
                    let _ = r.done.send(Ok(()));
                }
            }
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, n = batch.len(), "group commit: postgres unavailable");
                // (a batch answered above has no requests left here)
                for r in batch.drain(..) {
                    let _ = r
                        .done
                        .send(Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, n = batch.len(), "group commit failed; retrying rows one by one");
                for r in batch.drain(..) {
                    let res = store.insert_jobs(std::slice::from_ref(&r.job)).await;
                    if res.is_ok() {
                        committed.push(r.job);
                    }
                    let _ = r.done.send(res);
                }
            }
        }
        // handed to the dispatch task without waiting: with Redis slow or away its queue
        // fills, and waiting here would stop the commits (every submission would wait on
        // Redis though Postgres is fine). What does not fit keeps dispatch_epoch = 0: the
        // reconciler dispatches it.
        if !committed.is_empty() {
            match dispatch.try_send((committed, owners_written)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(left)) => tracing::warn!(
                    n = left.0.len(),
                    "dispatch backlogged (redis slow?): the reconciler dispatches these jobs"
                ),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

async fn dispatch_loop(
    queue: switchyard_queue::Queue,
    mut redis: RedisConn,
    mut rx: mpsc::Receiver<ToDispatch>,
    marks: mpsc::Sender<(Vec<Uuid>, i64)>,
) {
    let keys = queue.keys().clone();
    while let Some((mut jobs, written)) = rx.recv().await {
        // per job: whether its owner is still to be written (batches merged below may differ)
        let mut owner_unwritten = vec![!written; jobs.len()];
        // merge batches that are already waiting
        while jobs.len() < 4 * MAX_BATCH {
            match rx.try_recv() {
                Ok((more, written)) => {
                    owner_unwritten.extend(std::iter::repeat_n(!written, more.len()));
                    jobs.extend(more);
                }
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        pipe.get(keys.epoch());
        let now = chrono::Utc::now();
        for (j, &owner_unwritten) in jobs.iter().zip(&owner_unwritten) {
            let data = match j.run_at {
                Some(t) if t > now => serde_json::json!({ "run_at": t }),
                _ => serde_json::json!({}),
            };
            let ev = Event::status(j.id, 1, 0, JobStatus::Queued, data);
            let payload = serde_json::to_string(&ev).unwrap_or_default();
            pipe.cmd("XADD")
                .arg(keys.events(j.id))
                .arg("1-0")
                .arg("e")
                .arg(&payload)
                .ignore();
            pipe.expire(keys.events(j.id), events::LIVE_TTL.as_secs() as i64)
                .ignore();
            if owner_unwritten {
                events::pipe_owner(&mut pipe, &keys, j.id, j.tenant_id, &j.created_by);
            }
            pipe.publish(keys.event_channel(j.id), &payload).ignore();
        }
        let items: Vec<_> = jobs.iter().map(|j| j.dispatch_item()).collect();
        queue.pipe_dispatch(&mut pipe, items.iter(), now);
        let epoch: Option<i64> = match pipe.query_async::<(Option<i64>,)>(&mut redis).await {
            Ok((e,)) => e,
            Err(e) => {
                // left with dispatch_epoch = 0: the reconciler dispatches them
                tracing::warn!(error = %e, n = jobs.len(), "dispatch to redis failed; the reconciler will retry");
                continue;
            }
        };
        if let Some(epoch) = epoch {
            let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
            // marks are hints for the reconciler: dropped rather than waited for
            if let Err(mpsc::error::TrySendError::Closed(_)) = marks.try_send((ids, epoch)) {
                return;
            }
        }
    }
}

/// Marks dispatched jobs with their Redis epoch after `linger` (`dispatch_mark_linger_ms`).
/// Marking is a hint for the reconciler (it re-dispatches unmarked jobs only after its
/// `undispatched_min_age`): a job a worker claims meanwhile is marked by its claim, and the mark
/// then skips it without writing its row again; the others are marked many per statement.
async fn mark_loop(
    store: Store,
    mut rx: mpsc::Receiver<(Vec<Uuid>, i64)>,
    linger: std::time::Duration,
) {
    let mut waiting: Vec<(Vec<Uuid>, i64)> = Vec::new();
    while let Some(first) = rx.recv().await {
        waiting.push(first);
        let until = tokio::time::Instant::now() + linger;
        // an Err is the deadline: mark what came
        while let Ok(Some(more)) = tokio::time::timeout_at(until, rx.recv()).await {
            waiting.push(more);
        }
        // one statement per epoch (one, unless Redis lost its data meanwhile)
        waiting.sort_by_key(|(_, epoch)| *epoch);
        for chunk in waiting.chunk_by(|a, b| a.1 == b.1) {
            let epoch = chunk[0].1;
            let ids: Vec<Uuid> = chunk
                .iter()
                .flat_map(|(ids, _)| ids.iter().copied())
                .collect();
            if let Err(e) = store.mark_dispatched(&ids, epoch).await {
                tracing::warn!(error = %e, "could not mark jobs dispatched (they may be dispatched twice)");
            }
        }
        waiting.clear();
    }
}
