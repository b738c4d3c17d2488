//! Nothing lost: retries, timeouts, attempt fencing, lease expiry, Redis data loss, jobs
//! committed but never dispatched, draining.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use switchyard_core::event::Event;
use switchyard_queue::events::Published;
use switchyard_queue::testing::PrivateRedis;
use switchyard_store::{ClaimOutcome, NewJob, RunEnd};
use uuid::Uuid;

use crate::support::{
    new_job, spawn_api_only, spawn_app, spawn_app_with, spawn_without_worker, Opts,
};

const T: Duration = Duration::from_secs(30);

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn retryable_failures_retry_then_succeed(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut ws = app.ws().await;
    let id = app.submit_noop(json!({"fail_attempts": 2})).await;
    ws.subscribe(id, 0).await;
    let j = app.wait_status(id, "succeeded", T).await;
    assert_eq!(j["attempt"], 3);
    assert_eq!(j["output"]["attempt"], 3);
    let events = ws.until_terminal(id, T).await;
    crate::support::assert_contiguous(&events, 0);
    let retries: Vec<_> = events
        .iter()
        .filter(|e| {
            e["type"] == "status"
                && e["data"]["status"] == "queued"
                && e["data"]["retry_at"].is_string()
        })
        .collect();
    assert_eq!(retries.len(), 2, "{events:#?}");
    let attempts: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "status" && e["data"]["status"] == "running")
        .map(|e| e["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, vec![1, 2, 3], "each new attempt announces itself");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn fatal_errors_and_timeouts_fail(pool: PgPool) {
    let app = spawn_app(pool).await;
    let fatal = app.submit_noop(json!({"fail_fatal": true})).await;
    let j = app.wait_status(fatal, "failed", T).await;
    assert_eq!(j["error"]["code"], "noop_failed");
    assert_eq!(j["error"]["retryable"], false);
    assert_eq!(j["attempt"], 1);
    let slow = app
        .submit(json!({"kind": "system.noop", "input": {"sleep_ms": 30000}, "timeout_s": 1, "max_attempts": 2}))
        .await;
    let slow: Uuid = slow["id"].as_str().unwrap().parse().unwrap();
    let j = app.wait_status(slow, "failed", T).await;
    assert_eq!(j["error"]["code"], "timeout");
    assert_eq!(j["error"]["retryable"], true);
    assert_eq!(j["attempt"], 2);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_stale_worker_cannot_overwrite_its_successor(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let id = app.submit_noop(json!({})).await;
    let lease = Duration::from_secs(30);
    let ClaimOutcome::Claimed(first) = app.store.claim(id, "old", lease).await.unwrap() else {
        panic!("first claim")
    };
    assert_eq!(first.attempt, 1);
    // while the lease is live nobody else can claim
    assert!(matches!(
        app.store.claim(id, "new", lease).await.unwrap(),
        ClaimOutcome::Held(ref r) if r.lease_owner.as_deref() == Some("old")
    ));
    // the old worker stalls; its lease runs out
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let ClaimOutcome::Claimed(second) = app.store.claim(id, "new", lease).await.unwrap() else {
        panic!("second claim")
    };
    assert_eq!(second.attempt, 2);
    let bus = app.bus().await;
    assert!(bus.begin_attempt(id, 2).await.unwrap().is_some());

    // every write of the stale run is refused
    let stale = RunEnd::Succeeded(json!({"from": "old"}));
    assert!(!app.store.end_run(id, 1, &stale, 10).await.unwrap());
    assert_eq!(app.store.heartbeat(id, 1, lease).await.unwrap(), None);
    let ev = Event::new(id, 50, 1, "output.delta", json!({"text": "stale"}));
    assert_eq!(bus.publish(&ev).await.unwrap(), Published::Fenced);
    assert_eq!(bus.begin_attempt(id, 1).await.unwrap(), None);

    // the successor's writes count
    assert_eq!(
        app.store.heartbeat(id, 2, lease).await.unwrap(),
        Some(false)
    );
    let ev = Event::new(id, 2, 2, "status", json!({"status": "running"}));
    assert_eq!(bus.publish(&ev).await.unwrap(), Published::Ok);
    assert!(app
        .store
        .end_run(id, 2, &RunEnd::Succeeded(json!({"from": "new"})), 3)
        .await
        .unwrap());
    let j = app.get_job(id).await;
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["output"], json!({"from": "new"}));
    // and a late write of the old run after the end changes nothing either
    assert!(!app
        .store
        .end_run(id, 1, &RunEnd::Cancelled, 4)
        .await
        .unwrap());
    assert_eq!(app.get_job(id).await["status"], "succeeded");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_dead_workers_job_is_reclaimed_after_its_lease(pool: PgPool) {
    let mut app = spawn_without_worker(pool).await;
    let id = app.submit_noop(json!({})).await;
    let exhausted = app
        .submit(json!({"kind": "system.noop", "input": {}, "max_attempts": 1}))
        .await;
    let exhausted: Uuid = exhausted["id"].as_str().unwrap().parse().unwrap();
    // a "worker" fetches both jobs, claims them, and dies without a word
    let queue = app.queue().await;
    queue.ensure_group("system").await.unwrap();
    let mut conn = app.redis().await;
    // (a fresh Redis epoch may dispatch a job twice; claiming dedups, so count distinct jobs)
    let mut got = std::collections::HashSet::new();
    for _ in 0..20 {
        for d in queue
            .fetch(&mut conn, "system", "ghost", 10, Duration::from_millis(200))
            .await
            .unwrap()
        {
            got.insert(d.job_id);
        }
        if got.len() >= 2 {
            break;
        }
    }
    assert_eq!(got, [id, exhausted].into_iter().collect());
    for job in &got {
        assert!(matches!(
            app.store
                .claim(*job, "ghost", app.opts.lease)
                .await
                .unwrap(),
            ClaimOutcome::Claimed(_)
        ));
    }
    // the ghost streamed output before it died: events Postgres' seq knows nothing of
    let bus = app.bus().await;
    for seq in 2..=9 {
        let ev = Event::new(exhausted, seq, 1, "output.delta", json!({"text": "x"}));
        assert_eq!(bus.publish(&ev).await.unwrap(), Published::Ok);
    }
    app.start_worker().await;
    let j = app.wait_status(id, "succeeded", T).await;
    assert_eq!(j["attempt"], 2, "the lost attempt counts");
    let j = app.wait_status(exhausted, "failed", T).await;
    assert_eq!(j["error"]["code"], "lease_expired");
    // its end still reaches subscribers, numbered after the ghost's events
    let mut ws = app.ws().await;
    ws.subscribe(exhausted, 0).await;
    let evs = ws.until_terminal(exhausted, T).await;
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "failed", "{evs:?}");
    assert!(last["seq"].as_u64().unwrap() > 9, "{last}");
    // and a retry's `queued` after it, then the new run to its end
    let r = app
        .auth(
            app.http
                .post(app.url(&format!("/v1/jobs/{exhausted}/retry"))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut ws = app.ws().await;
    ws.subscribe(exhausted, last["seq"].as_u64().unwrap()).await;
    let evs = ws.until_terminal(exhausted, T).await;
    assert_eq!(evs[0]["data"]["status"], "queued", "{evs:?}");
    assert!(evs[0]["seq"].as_u64() > last["seq"].as_u64(), "{evs:?}");
    assert_eq!(evs.last().unwrap()["type"], "succeeded", "{evs:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_idle_worker_reclaims_an_entry_a_dead_worker_fetched_but_never_claimed(pool: PgPool) {
    an_idle_worker_reclaims_an_entry_a_dead_worker_fetched_but_never_claimed_on(
        pool,
        Opts::default(),
    )
    .await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn an_idle_worker_reclaims_an_entry_a_dead_worker_fetched_but_never_claimed_on(
    pool: PgPool,
    base: Opts,
) {
    // the job stays `queued` in its current epoch: only lease reclaim can bring it back (a
    // worker whose idle fetch loops held every slot while waiting never reclaimed it)
    let mut app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            ..base
        },
    )
    .await;
    let id = app.submit_noop(json!({})).await;
    let queue = app.queue().await;
    queue.ensure_group("system").await.unwrap();
    let mut conn = app.redis().await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.extend(
            queue
                .fetch(&mut conn, "system", "ghost", 10, Duration::from_millis(200))
                .await
                .unwrap(),
        );
        if !got.is_empty() {
            break;
        }
    }
    assert!(got.iter().any(|d| d.job_id == id));
    app.start_worker().await;
    let j = app.wait_status(id, "succeeded", T).await;
    assert_eq!(j["attempt"], 1, "the ghost never claimed it");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn jobs_committed_but_never_dispatched_still_run(pool: PgPool) {
    jobs_committed_but_never_dispatched_still_run_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn jobs_committed_but_never_dispatched_still_run_on(pool: PgPool, base: Opts) {
    let app = spawn_app_with(pool, base).await;
    // the API died between its commit and its XADD: the row exists, Redis never heard of it
    let jobs: Vec<NewJob> = (0..25).map(|_| new_job(app.tenant)).collect();
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    app.store.insert_jobs(&jobs).await.unwrap();
    for id in ids {
        app.wait_status(id, "succeeded", T).await;
    }
    let undispatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE dispatch_epoch = 0")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(undispatched, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn redis_flushall_loses_nothing(pool: PgPool) {
    let redis = PrivateRedis::start();
    let mut app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            redis_url: redis.url(),
            ..Opts::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(app.submit_noop(json!({"deltas": i % 3})).await);
    }
    // wait until the API dispatched them all to Redis...
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE dispatch_epoch > 0")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        if n == 30 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs were not dispatched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...then Redis loses everything
    let mut c = app.redis().await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    app.start_worker().await;
    for id in &ids {
        app.wait_status(*id, "succeeded", T).await;
    }
    // clients still get a terminal event for every job (from Postgres: the stream is gone)
    let mut ws = app.ws().await;
    ws.subscribe(ids[0], 0).await;
    let evs = ws.until_terminal(ids[0], T).await;
    assert_eq!(evs.last().unwrap()["type"], "succeeded");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn draining_finishes_in_flight_jobs(pool: PgPool) {
    let mut app = spawn_app(pool).await;
    let id = app.submit_noop(json!({"sleep_ms": 800})).await;
    app.wait_status(id, "running", T).await;
    app.stop_workers().await;
    let j = app.get_job(id).await;
    assert_eq!(j["status"], "succeeded", "drain waits for in-flight jobs");
    // a job submitted after the drain stays queued, nothing picks it up
    let later = app.submit_noop(json!({})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(app.get_job(later).await["status"], "queued");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn jobs_still_running_after_the_grace_period_are_released(pool: PgPool) {
    let mut app = spawn_without_worker(pool).await;
    app.start_worker_with_grace(Duration::from_millis(300))
        .await;
    // its only attempt: a release is not the job's failure, so the attempt is given back
    let job = app
        .submit(json!({"kind": "system.noop", "input": {"sleep_ms": 3000}, "max_attempts": 1}))
        .await;
    let id = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "running", T).await;
    app.stop_workers().await;
    let j = app.get_job(id).await;
    assert_eq!(j["status"], "queued", "released back to the queue: {j}");
    assert_eq!(j["error"]["code"], "worker_shutdown");
    assert_eq!(j["max_attempts"], 2, "{j}");
    app.start_worker().await;
    let j = app.wait_status(id, "succeeded", T).await;
    assert_eq!(j["attempt"], 2);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_redis_restart_without_data_kills_nothing(pool: PgPool) {
    let mut redis = PrivateRedis::start();
    let app = spawn_app_with(
        pool,
        Opts {
            redis_url: redis.url(),
            ..Opts::default()
        },
    )
    .await;
    let before = app.submit_noop(json!({})).await;
    app.wait_status(before, "succeeded", T).await;
    // Redis goes away: submissions still commit (dispatch is retried by the reconciler)
    redis.stop();
    let during = app.submit_noop(json!({"deltas": 2})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // and comes back empty on the same port
    redis = PrivateRedis::start_on(redis.port);
    let after = app.submit_noop(json!({})).await;
    for id in [during, after] {
        app.wait_status(id, "succeeded", T).await;
    }
    // live streaming works again through the reconnected pub/sub hub
    let mut ws = app.ws().await;
    let live = app.submit_noop(json!({"deltas": 3, "sleep_ms": 200})).await;
    ws.subscribe(live, 0).await;
    let evs = ws.until_terminal(live, T).await;
    assert_eq!(evs.last().unwrap()["type"], "succeeded");
    app.stop().await;
    drop(redis);
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn one_bad_row_never_fails_its_batch(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let tracker = tokio_util::task::TaskTracker::new();
    let submitter = switchyard_api::submit::Submitter::start(
        app.store.clone(),
        app.queue().await,
        app.redis().await,
        Duration::from_millis(app.cfg.dispatch_mark_linger_ms),
        &tracker,
    );
    // 40 good rows and, in their midst, one whose tenant does not exist (a foreign-key error)
    let mut jobs: Vec<NewJob> = (0..40).map(|_| new_job(app.tenant)).collect();
    let bad = new_job(Uuid::now_v7());
    jobs.insert(20, bad.clone());
    let results =
        futures::future::join_all(jobs.iter().cloned().map(|j| submitter.submit(j))).await;
    for (j, r) in jobs.iter().zip(&results) {
        if j.id == bad.id {
            assert!(r.is_err(), "the bad row fails");
        } else {
            assert!(r.is_ok(), "a good row never fails with its batch: {r:?}");
            assert!(app.store.get_job(app.tenant, j.id).await.unwrap().is_some());
        }
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn lost_history_of_a_running_job_is_a_reset_then_the_terminal_event(pool: PgPool) {
    let redis = PrivateRedis::start();
    let app = spawn_app_with(
        pool,
        Opts {
            redis_url: redis.url(),
            ..Opts::default()
        },
    )
    .await;
    let id = app
        .submit_noop(json!({"sleep_ms": 5000, "deltas": 2}))
        .await;
    app.wait_status(id, "running", T).await;
    // a run that just started may not have written its stream yet; this one has
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut c = app.redis().await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let mut ws = app.ws().await;
    ws.subscribe(id, 3).await;
    let first = ws.next(T).await.unwrap();
    assert_eq!(first["type"], "reset", "{first}");
    // the run goes on; its terminal event still arrives
    let rest = ws.until_terminal(id, T).await;
    assert_eq!(rest.last().unwrap()["type"], "succeeded", "{rest:#?}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn batched_updates_of_overlapping_jobs_never_deadlock(pool: PgPool) {
    // dispatch marks and batched claims of the same jobs in opposite orders, concurrently: they
    // lock rows in one order, so none is aborted as a deadlock (Postgres would, after 1 s)
    let app = spawn_api_only(pool).await;
    let jobs: Vec<NewJob> = (0..300).map(|_| new_job(app.tenant)).collect();
    app.store.insert_jobs(&jobs).await.unwrap();
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let mut tasks = Vec::new();
    for round in 0..4i64 {
        let (store, mut fwd) = (app.store.clone(), ids.clone());
        let mut rev = ids.clone();
        rev.reverse();
        if round % 2 == 1 {
            fwd.rotate_left(150);
        }
        let s2 = app.store.clone();
        tasks.push(tokio::spawn(async move {
            for epoch in 0..10 {
                store.mark_dispatched(&fwd, round * 10 + epoch + 1).await?;
            }
            Ok::<_, switchyard_store::StoreError>(())
        }));
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                s2.claim_many(&rev, "w", Duration::from_secs(30)).await?;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("no batched update fails (deadlock)");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn run_ends_are_written_in_one_batch(pool: PgPool) {
    // the batched statement itself must work (its row-by-row fallback would hide a broken one)
    let app = spawn_api_only(pool).await;
    let jobs: Vec<NewJob> = (0..4).map(|_| new_job(app.tenant)).collect();
    app.store.insert_jobs(&jobs).await.unwrap();
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let claimed = app
        .store
        .claim_many(&ids, "w", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    let now = chrono::Utc::now();
    let ends = [
        RunEnd::Succeeded(json!({"ok": true})),
        RunEnd::Failed(switchyard_core::JobError::new("x", "x", false)),
        RunEnd::Retry {
            error: switchyard_core::JobError::new("y", "y", true),
            run_at: now,
        },
        RunEnd::Defer { run_at: now },
    ];
    let writes: Vec<switchyard_store::RunEndWrite> = ids
        .iter()
        .zip(ends)
        .map(|(id, end)| switchyard_store::RunEndWrite {
            id: *id,
            attempt: 1,
            end,
            seq: 2,
            tokens: 0,
        })
        .collect();
    let done = app
        .store
        .end_runs(&writes)
        .await
        .expect("one batched statement");
    assert_eq!(done.len(), 4);
    let deferred = app
        .store
        .get_job(app.tenant, ids[3])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (deferred.status.as_str(), deferred.max_attempts),
        ("queued", 4),
        "a deferral gives the attempt back"
    );
    let retried = app
        .store
        .get_job(app.tenant, ids[2])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (retried.status.as_str(), retried.max_attempts),
        ("queued", 3)
    );
    app.stop().await;
}
