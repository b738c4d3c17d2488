//! What a run's end writes: results Postgres could not hold (NUL characters) are kept with the
//! NUL replaced instead of being lost, a requeued job counts as undispatched whichever path
//! wrote its end until its worker has dispatched it again, a run whose event count fell
//! behind its stream still publishes its end, an executor's panic fails its job, a claim
//! whose reply was lost is run by its worker, a cancel that races a retryable failure ends
//! the job, and a cancel's event follows every event already in the stream.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use switchyard_core::job::JobError;
use switchyard_store::{ClaimOutcome, RunEnd, RunEndWrite};
use uuid::Uuid;

use crate::support::{spawn_api_only, TestApp};

const LEASE: Duration = Duration::from_secs(30);

async fn claimed(app: &TestApp) -> Uuid {
    let id = app.submit_noop(json!({})).await;
    let ClaimOutcome::Claimed(row) = app.store.claim(id, "w1", LEASE).await.unwrap() else {
        panic!("claim")
    };
    assert_eq!(row.attempt, 1);
    id
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn nul_characters_in_results_are_replaced_not_lost(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    // one run end at a time
    let one = claimed(&app).await;
    let out = json!({"stdout": "a\u{0}b", "k\u{0}": ["\u{0}"]});
    assert!(app
        .store
        .end_run(one, 1, &RunEnd::Succeeded(out), 2)
        .await
        .unwrap());
    let j = app.get_job(one).await;
    assert_eq!(j["status"], "succeeded");
    assert_eq!(
        j["output"],
        json!({"stdout": "a\u{FFFD}b", "k\u{FFFD}": ["\u{FFFD}"]})
    );

    // many in one statement, a failure's message among them
    let (a, b) = (claimed(&app).await, claimed(&app).await);
    let err = JobError {
        code: "exit_1".into(),
        message: "stderr: \u{0}".into(),
        retryable: false,
        retry_after_s: None,
    };
    let writes = [
        RunEndWrite {
            id: a,
            attempt: 1,
            end: RunEnd::Succeeded(json!("x\u{0}")),
            seq: 2,
            tokens: 0,
        },
        RunEndWrite {
            id: b,
            attempt: 1,
            end: RunEnd::Failed(err),
            seq: 2,
            tokens: 0,
        },
    ];
    let mut done = app.store.end_runs(&writes).await.unwrap();
    done.sort();
    let mut want = vec![(a, 1), (b, 1)];
    want.sort();
    assert_eq!(done, want, "both written in the batch");
    assert_eq!(app.get_job(a).await["output"], json!("x\u{FFFD}"));
    let failed = app.get_job(b).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["message"], "stderr: \u{FFFD}");
    // an error built the usual way is clean from the start
    assert_eq!(JobError::new("c", "a\u{0}", false).message, "a\u{FFFD}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_requeue_written_alone_leaves_the_job_undispatched(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let id = claimed(&app).await;
    sqlx::query("UPDATE jobs SET dispatch_epoch = 7 WHERE id = $1")
        .bind(id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let retry = RunEnd::Retry {
        error: JobError::new("boom", "try again", true),
        run_at: chrono::Utc::now(),
    };
    assert!(app.store.end_run(id, 1, &retry, 2).await.unwrap());
    let (status, epoch): (String, i64) =
        sqlx::query_as("SELECT status, dispatch_epoch FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    // if the worker's own re-dispatch is lost, the reconciler finds it
    assert_eq!((status.as_str(), epoch), ("queued", 0));
    // the mark of the submission's dispatch, arriving late, does not hide it again
    app.store.mark_dispatched(&[id], 8).await.unwrap();
    let epoch: i64 = sqlx::query_scalar("SELECT dispatch_epoch FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(epoch, 0);
    app.store.mark_redispatched(&[(id, 1)], 8).await.unwrap();
    let epoch: i64 = sqlx::query_scalar("SELECT dispatch_epoch FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(epoch, 8, "its worker's re-dispatch marks it");
    app.stop().await;
}

/// A run whose count of events fell behind its stream (here an event appended behind its back,
/// as a dead run's deltas are after an announcement that failed) still publishes its end:
/// after the stream's head, not refused as stale (subscribers waited for Postgres instead).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_run_behind_its_stream_publishes_its_end_after_the_head(pool: PgPool) {
    let app = crate::support::spawn_app(pool).await;
    let id = app
        .submit_noop(json!({"deltas": 2, "sleep_ms": 1500}))
        .await;
    let bus = app.bus().await;
    // the run streams its deltas, then sleeps
    let t = std::time::Instant::now();
    let attempt = loop {
        let h = bus.read(id, 0, 100).await.unwrap();
        if let Some(d) = h.events.iter().find(|e| e.kind == "output.delta") {
            break d.attempt;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no delta");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ahead = switchyard_core::Event::new(id, 50, attempt, "output.delta", json!({"text": "x"}));
    assert_eq!(
        bus.publish(&ahead).await.unwrap(),
        switchyard_queue::events::Published::Ok
    );
    app.wait_status(id, "succeeded", Duration::from_secs(20))
        .await;
    let t = std::time::Instant::now();
    loop {
        let h = bus.read(id, 50, 100).await.unwrap();
        if let Some(end) = h.events.first() {
            assert_eq!((end.seq, end.kind.as_str()), (51, "succeeded"), "{end:?}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the end never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}

/// A run end whose commit went through but whose reply was lost is refused when retried (the
/// job no longer runs): the run recognises its own write and goes on (publishes its end, is
/// charged) instead of taking it for a newer attempt's.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_run_recognises_its_own_end_written_by_a_lost_reply(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let id = claimed(&app).await;
    let write = |end: RunEnd, seq: u64| RunEndWrite {
        id,
        attempt: 1,
        end,
        seq,
        tokens: 0,
    };
    let failed = |code: &str| RunEnd::Failed(JobError::new(code, "x", false));
    let mine = write(failed("boom"), 3);
    assert!(app.store.end_run(id, 1, &mine.end, 3).await.unwrap());
    // the retried write is refused...
    assert!(!app.store.end_run(id, 1, &mine.end, 3).await.unwrap());
    // ...and recognised as this run's own
    assert!(app.store.run_end_landed(&mine).await.unwrap());
    // an end that differs in seq, status, code or attempt is someone else's
    assert!(!app
        .store
        .run_end_landed(&write(failed("boom"), 4))
        .await
        .unwrap());
    assert!(!app
        .store
        .run_end_landed(&write(failed("other"), 3))
        .await
        .unwrap());
    let ok = write(RunEnd::Succeeded(json!({})), 3);
    assert!(!app.store.run_end_landed(&ok).await.unwrap());
    let older = RunEndWrite {
        attempt: 0,
        ..write(failed("boom"), 3)
    };
    assert!(!app.store.run_end_landed(&older).await.unwrap());
    app.stop().await;
}

/// A job the worker requeued (a retry waiting for its backoff) and re-dispatched itself is
/// marked dispatched in the current epoch: the reconciler left it undispatched and gave it a
/// second stream entry when it waited longer than 5 s. (No scheduler loop runs here: only the
/// worker can mark it.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_job_requeued_by_its_worker_is_marked_dispatched(pool: PgPool) {
    let app = crate::support::spawn_app_with(
        pool,
        crate::support::Opts {
            scheduler: false,
            ..Default::default()
        },
    )
    .await;
    let sched = app.scheduler(app.scheduler_opts()).await;
    let epoch = sched
        .pass()
        .await
        .unwrap()
        .new_epoch
        .expect("a first epoch");
    let job = app
        .submit(
            json!({"kind": "system.noop", "input": {"fail_attempts": 1}, "max_attempts": 2,
                       "backoff": {"type": "fixed", "delay_s": 600}}),
        )
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let t = std::time::Instant::now();
    loop {
        let (status, attempt, marked): (String, i32, i64) =
            sqlx::query_as("SELECT status, attempt, dispatch_epoch FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(app.store.pool())
                .await
                .unwrap();
        if status == "queued" && attempt == 1 && marked == epoch {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{status} attempt {attempt} dispatch_epoch {marked} (epoch {epoch})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// On a Redis Cluster one shard can lose its data while the epoch, on another shard, survives:
/// each queue's slot carries the epoch mark, and a mark gone missing starts a new epoch, which
/// re-dispatches the queue's jobs from Postgres (here the queue's keys are deleted, as a shard
/// restarting empty would lose them).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_queue_losing_its_data_alone_is_redispatched(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let opts = switchyard_scheduler::SchedulerOptions {
        undispatched_min_age: Duration::ZERO,
        ..app.scheduler_opts()
    };
    let sched = app.scheduler(opts).await;
    let first = sched.pass().await.unwrap();
    let epoch = first.new_epoch.expect("a first epoch");
    // the slots carry a new epoch as it starts (not a pass later)
    let mut c = app.redis().await;
    let mark: Option<i64> = redis::cmd("GET")
        .arg(app.keys().queue_epoch("system"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(mark, Some(epoch));
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    let q = job["queue"].as_str().unwrap().to_string();
    let queue = app.queue().await;
    let pending = |queue: switchyard_queue::Queue, q: String| async move {
        queue
            .depth(&q)
            .await
            .map(|(undelivered, _)| undelivered)
            .unwrap()
    };
    let t = std::time::Instant::now();
    while pending(queue.clone(), q.clone()).await == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "never dispatched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // a quiet pass marks the queues' slots
    assert_eq!(sched.pass().await.unwrap().new_epoch, None);
    assert_eq!(sched.pass().await.unwrap().new_epoch, None);
    // the queue's shard restarts empty; the epoch's shard does not
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", app.keys().queue_base(&q)))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending(queue.clone(), q.clone()).await, 0);
    let after = sched.pass().await.unwrap();
    assert_eq!(after.new_epoch, Some(epoch + 1), "{after:?}");
    assert!(after.redispatched >= 1, "{after:?}");
    assert_eq!(pending(queue, q).await, 1);
    app.stop().await;
}

/// A dead job requeued by `POST /v1/jobs/{id}/retry` is marked dispatched once Redis took it
/// (unmarked, the reconciler gave it a second stream entry after a few seconds in a backlog).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_retried_dead_job_is_marked_dispatched(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let sched = app.scheduler(app.scheduler_opts()).await;
    let epoch = sched
        .pass()
        .await
        .unwrap()
        .new_epoch
        .expect("a first epoch");
    let id = app.submit_noop(json!({})).await;
    sqlx::query(
        "UPDATE jobs SET status = 'failed', attempt = max_attempts, finished_at = now(),
             dispatch_epoch = 0 WHERE id = $1",
    )
    .bind(id)
    .execute(app.store.pool())
    .await
    .unwrap();
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/retry"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let marked: i64 = sqlx::query_scalar("SELECT dispatch_epoch FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(marked, epoch);
    app.stop().await;
}

/// An executor that panics fails its attempt (`internal`): its run ends, and with it the
/// heartbeat that kept the job's lease alive (the job stayed `running` forever). The worker
/// goes on running other jobs.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_executor_that_panics_fails_its_job(pool: PgPool) {
    use std::sync::Arc;
    use switchyard_core::job::JobKind;
    use switchyard_worker::executor::{ExecError, Executor, JobContext};

    struct Panics;
    #[async_trait::async_trait]
    impl Executor for Panics {
        async fn execute(&self, ctx: &JobContext) -> Result<serde_json::Value, ExecError> {
            // (noop's input is checked on submit: a chosen sleep says "panic")
            if ctx.input["sleep_ms"] == 7 {
                panic!("byte index 1 is not a char boundary");
            }
            Ok(json!({"ok": true}))
        }
    }
    let opts = crate::support::Opts {
        executors: Some(Arc::new(|reg| {
            reg.register(JobKind::SystemNoop, Arc::new(Panics));
        })),
        ..Default::default()
    };
    let app = crate::support::spawn_app_with(pool, opts).await;
    let bad = app.submit_noop(json!({"sleep_ms": 7})).await;
    let j = app
        .wait_status(bad, "failed", Duration::from_secs(20))
        .await;
    assert_eq!(j["error"]["code"], "internal", "{j}");
    assert!(
        !j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("char boundary"),
        "the detail stays in the worker's log: {j}"
    );
    let good = app.submit_noop(json!({})).await;
    let j = app
        .wait_status(good, "succeeded", Duration::from_secs(20))
        .await;
    assert_eq!(j["output"]["ok"], true);
    app.stop().await;
}

/// A worker's claim that committed but whose reply was lost (Postgres restarting): the next
/// try finds the job held by the worker's own id. The worker runs it (before, it dropped the
/// delivery as a duplicate; the job waited for its lease to end and, with one attempt, failed
/// `lease_expired` without ever running).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_claim_whose_reply_was_lost_is_run_by_its_worker(pool: PgPool) {
    let mut app = crate::support::spawn_without_worker(pool).await;
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}, "max_attempts": 1}))
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let w = app.new_worker(Duration::from_secs(5)).await;
    // the claim as it committed; its reply never reached the worker
    let rows = app
        .store
        .claim_many(&[id], w.id(), Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    app.run_worker(w);
    let j = app
        .wait_status(id, "succeeded", Duration::from_secs(20))
        .await;
    assert_eq!(j["attempt"], 1, "{j}");
    app.stop().await;
}

/// A cancel asked for between two heartbeats of a run that then fails retryably: the job ends
/// `cancelled` at once. (The retry was written: the job sat `queued` for its whole backoff,
/// here an hour, though the cancel had answered 202.) A run that fails for good meanwhile ends
/// `cancelled` too.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_cancel_that_races_a_retryable_failure_ends_the_job(pool: PgPool) {
    // heartbeats every 10 s: the worker learns of the cancel only from its run's end
    let opts = crate::support::Opts {
        lease: LEASE,
        ..Default::default()
    };
    let app = crate::support::spawn_app_with(pool, opts).await;
    let job = app
        .submit(
            json!({"kind": "system.noop", "input": {"sleep_ms": 1500, "fail_attempts": 1},
            "max_attempts": 3, "backoff": {"type": "fixed", "delay_s": 3600}}),
        )
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "running", Duration::from_secs(20))
        .await;
    // straight to the store: no notice reaches the worker
    let asked = app.store.cancel_job(app.tenant, id).await.unwrap();
    assert!(matches!(
        asked,
        switchyard_store::CancelOutcome::Requested(_)
    ));
    let j = app
        .wait_status(id, "cancelled", Duration::from_secs(20))
        .await;
    assert_eq!(j["attempt"], 1, "{j}");
    // and a failure for good: the cancel's promise wins
    let fatal = app
        .submit_noop(json!({"sleep_ms": 1500, "fail_fatal": true}))
        .await;
    app.wait_status(fatal, "running", Duration::from_secs(20))
        .await;
    let asked = app.store.cancel_job(app.tenant, fatal).await.unwrap();
    assert!(matches!(
        asked,
        switchyard_store::CancelOutcome::Requested(_)
    ));
    let j = app
        .wait_status(fatal, "cancelled", Duration::from_secs(20))
        .await;
    assert!(j["error"].is_null(), "{j}");
    app.stop().await;
}

/// Cancelling a queued job whose stream holds more events than Postgres counts (a run died
/// mid-stream, then the job was retried): the `cancelled` event follows them. (It was
/// numbered from Postgres' count, refused as stale without a word, and followers got a
/// `reset` instead of the end.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_cancel_is_published_after_every_event_in_the_stream(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let id = app.submit_noop(json!({})).await;
    let bus = app.bus().await;
    for seq in 2..=10 {
        let ev = switchyard_core::Event::new(id, seq, 0, "output.delta", json!({"text": "x"}));
        assert_eq!(
            bus.publish(&ev).await.unwrap(),
            switchyard_queue::events::Published::Ok
        );
    }
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = bus.read(id, 10, 100).await.unwrap();
    let end = h.events.first().expect("the cancelled event in the stream");
    assert_eq!((end.seq, end.kind.as_str()), (11, "cancelled"), "{end:?}");
    app.stop().await;
}

/// A queue's slot that loses some writes but keeps its epoch mark (a replica promoted before
/// it had them): the scheduler finds Redis holding fewer jobs than were dispatched on two
/// checks in a row, and a new epoch dispatches them again. (They waited for ever: the epoch
/// check sees only whole slots lost.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_queue_losing_some_writes_is_redispatched(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let opts = switchyard_scheduler::SchedulerOptions {
        undispatched_min_age: Duration::ZERO,
        loss_check_every: Duration::ZERO,
        loss_settle: Duration::ZERO,
        ..app.scheduler_opts()
    };
    let sched = app.scheduler(opts).await;
    let epoch = sched
        .pass()
        .await
        .unwrap()
        .new_epoch
        .expect("a first epoch");
    let id = app.submit_noop(json!({})).await;
    let t = std::time::Instant::now();
    loop {
        let marked: i64 = sqlx::query_scalar("SELECT dispatch_epoch FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        if marked == epoch {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never marked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let quiet = sched.pass().await.unwrap();
    assert_eq!((quiet.new_epoch, quiet.lost_queues), (None, 0), "{quiet:?}");
    // the queue's data goes, its epoch mark stays
    let mut c = app.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", app.keys().queue_base("system")))
        .query_async(&mut c)
        .await
        .unwrap();
    let mark = app.keys().queue_epoch("system");
    let gone: Vec<&String> = keys.iter().filter(|k| **k != mark).collect();
    assert!(!gone.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&gone)
        .query_async(&mut c)
        .await
        .unwrap();
    let first = sched.pass().await.unwrap();
    assert_eq!(
        (first.new_epoch, first.lost_queues),
        (None, 0),
        "checked again first: {first:?}"
    );
    let second = sched.pass().await.unwrap();
    assert_eq!(second.lost_queues, 1, "{second:?}");
    let third = sched.pass().await.unwrap();
    assert_eq!(third.new_epoch, Some(epoch + 1), "{third:?}");
    assert!(third.redispatched >= 1, "{third:?}");
    let queue = app.queue().await;
    assert!(queue.held("system").await.unwrap() >= 1);
    app.stop().await;
}
