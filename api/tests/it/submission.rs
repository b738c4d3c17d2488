//! Submission features: `Idempotency-Key` (same job, or batch of jobs, for the same key and
//! body, also under concurrent duplicates; 409 for another body) and `POST /v1/jobs/batch`
//! (all or nothing, errors naming `jobs[i].field`).

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;

use crate::support::{spawn_api_only, spawn_app_with, spawn_without_worker, Opts};

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_idempotency_key_returns_the_same_job(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let body = json!({"kind": "system.noop", "input": {"sleep_ms": 1}});
    let post = |key: &'static str, body: Value| {
        app.auth(app.http.post(app.url("/v1/jobs")))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    // ten concurrent duplicates: one job
    let replies = futures::future::join_all((0..10).map(|_| post("order-42", body.clone()))).await;
    let mut ids = std::collections::HashSet::new();
    let mut replayed = 0;
    for r in replies {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        if r.headers()["idempotent-replayed"] == "true" {
            replayed += 1;
        }
        let j: Value = r.json().await.unwrap();
        ids.insert(j["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(replayed, 9);
    let id = ids.into_iter().next().unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    // the job is dispatched like any other
    let j = app.get_job(id.parse().unwrap()).await;
    assert_eq!(j["status"], "queued");
    // another body under the same key: 409 naming the header
    let r = post(
        "order-42",
        json!({"kind": "system.noop", "input": {"sleep_ms": 2}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "conflict");
    assert_eq!(e["error"]["field"], "Idempotency-Key");
    // keys are per tenant, and a bad key is refused
    let r = post("order-43", body.clone()).await.unwrap();
    let other: Value = r.json().await.unwrap();
    assert_ne!(other["id"], id.as_str());
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .header("idempotency-key", "has space")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // expired keys make a new job
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        .execute(app.store.pool())
        .await
        .unwrap();
    let r = post("order-42", body.clone()).await.unwrap();
    let again: Value = r.json().await.unwrap();
    assert_ne!(again["id"], id.as_str());
    app.stop().await;
}

/// A batch under an `Idempotency-Key`: concurrent duplicates and a repeat get the same jobs
/// (in order) and insert nothing more; another body under the key, or the key of a single
/// job, is 409.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_idempotency_key_returns_the_same_batch(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let batch = |n: u64| {
        json!({"jobs": (0..n).map(|i| json!({"kind": "system.noop", "input": {"sleep_ms": i}}))
            .collect::<Vec<_>>()})
    };
    let post = |key: &'static str, body: Value| {
        app.auth(app.http.post(app.url("/v1/jobs/batch")))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let ids_of = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let replies = futures::future::join_all((0..5).map(|_| post("nightly-42", batch(3)))).await;
    let mut seen = std::collections::HashSet::new();
    let mut replayed = 0;
    for r in replies {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        if r.headers()["idempotent-replayed"] == "true" {
            replayed += 1;
        }
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["jobs"][2]["input"]["sleep_ms"], 2, "in request order");
        seen.insert(ids_of(&v));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(replayed, 4);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 3);
    // another body under the key
    let r = post("nightly-42", batch(2)).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "Idempotency-Key");
    // a single job's key is not a batch's, even for the same job
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .header("idempotency-key", "one-7")
        .json(&json!({"kind": "system.noop", "input": {"sleep_ms": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = post("one-7", batch(1)).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_batch_is_all_or_nothing(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let ok = json!({"kind": "system.noop", "input": {}});
    let mut jobs = vec![ok.clone(); 20];
    jobs[17] = json!({"kind": "llm.chat", "input": {"model": "no-such-model",
        "messages": [{"role": "user", "content": "x"}]}});
    let r = app
        .auth(app.http.post(app.url("/v1/jobs/batch")))
        .json(&json!({ "jobs": jobs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "jobs[17].input.model", "{e}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing accepted");
    for (body, field) in [
        (json!({"jobs": []}), "jobs"),
        (json!({"jobs": vec![ok.clone(); 1001]}), "jobs"),
        (
            json!({"jobs": [ok.clone(), {"kind": "nope", "input": {}}]}),
            "jobs[1].kind",
        ),
        (json!({"jobs": [ok.clone(), 7]}), "jobs[1]"),
        // a field the batch does not have is named, as on every other body
        (json!({"jobs": [ok.clone()], "webhook": "x"}), "webhook"),
    ] {
        let r = app
            .auth(app.http.post(app.url("/v1/jobs/batch")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["field"], field, "{e}");
    }
    // a valid batch: every job accepted in order, queued
    let r = app
        .auth(app.http.post(app.url("/v1/jobs/batch")))
        .json(&json!({ "jobs": vec![ok.clone(); 1000] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let b: Value = r.json().await.unwrap();
    let ids: Vec<&str> = b["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1000);
    let j = app.get_job(ids[999].parse().unwrap()).await;
    assert_eq!(j["status"], "queued");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn higher_priorities_are_fetched_first(pool: PgPool) {
    higher_priorities_are_fetched_first_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn higher_priorities_are_fetched_first_on(pool: PgPool, base: Opts) {
    let app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            ..base
        },
    )
    .await;
    let queue = app.queue().await;
    // once the scheduler set the Redis epoch, each job is dispatched exactly once
    let t = std::time::Instant::now();
    while queue.epoch().await.unwrap().is_none() {
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // low-priority jobs first, then high ones: a worker takes the high ones first
    let mut low = Vec::new();
    for _ in 0..4 {
        low.push(
            app.submit(json!({"kind": "system.noop", "input": {}}))
                .await,
        );
    }
    let mut high = std::collections::HashSet::new();
    for p in [9, 5, 9] {
        let j = app
            .submit(json!({"kind": "system.noop", "input": {}, "priority": p}))
            .await;
        assert_eq!(j["priority"], p);
        high.insert((j["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap(), p));
    }
    assert_eq!(low[0]["priority"], 0);
    queue.ensure_group("system").await.unwrap();
    let mut conn = app.redis().await;
    // dispatch is asynchronous: wait until all seven are in the streams
    let t = std::time::Instant::now();
    while queue.depth("system").await.unwrap().0 < 7 {
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // take one entry at a time; the order in which distinct jobs first appear is the priority
    // order (dispatch is at least once: a job may come twice, claiming dedups)
    let wait = std::time::Duration::from_millis(100);
    let mut order: Vec<uuid::Uuid> = Vec::new();
    let t = std::time::Instant::now();
    while order.len() < 7 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{order:?}"
        );
        for d in queue
            .fetch(&mut conn, "system", "c1", 1, wait)
            .await
            .unwrap()
        {
            if !order.contains(&d.job_id) {
                order.push(d.job_id);
            }
        }
    }
    let prio = |id: &uuid::Uuid| high.iter().find(|h| h.0 == *id).map(|h| h.1).unwrap_or(0);
    let got: Vec<i32> = order.iter().map(prio).collect();
    assert_eq!(got, [9, 9, 5, 0, 0, 0, 0], "{order:?}");
    // out-of-range priorities are refused
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "system.noop", "input": {}, "priority": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "priority");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn dead_jobs_are_listed_and_can_be_retried(pool: PgPool) {
    let app = crate::support::spawn_app(pool).await;
    let t = std::time::Duration::from_secs(30);
    // fails (retryably) on attempts 1-3 but may only make 2: dead
    let j = app
        .submit(json!({"kind": "system.noop", "input": {"fail_attempts": 3}, "max_attempts": 2}))
        .await;
    let id: uuid::Uuid = j["id"].as_str().unwrap().parse().unwrap();
    let j = app.wait_status(id, "failed", t).await;
    assert_eq!(
        (j["dead"].clone(), j["attempt"].clone()),
        (json!(true), json!(2))
    );
    let ok = app.submit_noop(json!({})).await;
    app.wait_status(ok, "succeeded", t).await;
    let page: Value = app.get_json("/v1/jobs?dead=true").await;
    let listed: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [id.to_string().as_str()]);
    // only dead jobs are retried
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{ok}/retry"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = app
        .auth(
            app.http
                .post(app.url(&format!("/v1/jobs/{}/retry", uuid::Uuid::now_v7()))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // the same job again, its attempts continuing: attempt 3 fails, attempt 4 succeeds
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/retry"))))
        .json(&json!({"max_attempts": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let j: Value = r.json().await.unwrap();
    assert_eq!(
        (j["status"].clone(), j["dead"].clone()),
        (json!("queued"), json!(false))
    );
    assert_eq!(j["max_attempts"], 4);
    let j = app.wait_status(id, "succeeded", t).await;
    assert_eq!(j["attempt"], 4);
    assert!(j["error"].is_null());
    // its events, followed from the start, go on past the old `failed` to the new end
    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    let mut kinds = Vec::new();
    let followed = tokio::time::timeout(t, async {
        while kinds.last().map(String::as_str) != Some("succeeded") {
            let Some(f) = ws.next(t).await else { break };
            if let Some(k) = f["type"].as_str() {
                kinds.push(k.to_string());
            }
        }
    })
    .await;
    assert!(followed.is_ok(), "the feed stopped after {kinds:?}");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("succeeded"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "failed"), "{kinds:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn delayed_jobs_stay_queued_until_their_time(pool: PgPool) {
    delayed_jobs_stay_queued_until_their_time_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn delayed_jobs_stay_queued_until_their_time_on(pool: PgPool, base: Opts) {
    let app = spawn_app_with(pool, base).await;
    let t = std::time::Duration::from_secs(20);
    let before = chrono::Utc::now();
    let j = app
        .submit(json!({"kind": "system.noop", "input": {}, "delay_s": 2}))
        .await;
    let id: uuid::Uuid = j["id"].as_str().unwrap().parse().unwrap();
    let run_at: chrono::DateTime<chrono::Utc> = j["run_at"].as_str().unwrap().parse().unwrap();
    assert!(run_at >= before + chrono::Duration::seconds(2), "{j}");
    // far in the future: stays queued (with its run_at) and can be cancelled
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let far = app
        .submit(json!({"kind": "system.noop", "input": {}, "run_at": later}))
        .await;
    let far_id: uuid::Uuid = far["id"].as_str().unwrap().parse().unwrap();
    // the delayed one runs once its time has come, not before
    let done = app.wait_status(id, "succeeded", t).await;
    let started: chrono::DateTime<chrono::Utc> =
        done["started_at"].as_str().unwrap().parse().unwrap();
    assert!(started >= run_at, "started {started} before {run_at}");
    let f = app.get_job(far_id).await;
    assert_eq!(f["status"], "queued");
    assert!(f["run_at"].is_string());
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{far_id}/cancel"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // bad schedules are refused with the field
    for (body, field) in [
        (
            json!({"kind": "system.noop", "input": {}, "delay_s": 5, "run_at": later}),
            "delay_s",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "delay_s": 400 * 86400}),
            "delay_s",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "run_at": "tomorrow"}),
            "run_at",
        ),
        (
            json!({"kind": "system.noop", "input": {},
                   "run_at": chrono::Utc::now() + chrono::Duration::days(400)}),
            "run_at",
        ),
    ] {
        let r = app
            .auth(app.http.post(app.url("/v1/jobs")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["field"], field, "{e}");
    }
    app.stop().await;
}

/// Marking jobs dispatched (the API marks them a moment after its Redis write; a worker's claim
/// or the reconciler may have marked them first) leaves a row that already carries the epoch
/// alone — no new row version — and records a newer epoch.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn marking_jobs_dispatched_leaves_marked_rows_alone(pool: PgPool) {
    // the scheduler sets the Redis epoch the API marks jobs with; no worker claims the job
    let app = spawn_without_worker(pool).await;
    app.wait_epoch().await;
    let id = app.submit_noop(json!({})).await;
    let epoch_of = || async {
        sqlx::query_scalar::<_, i64>("SELECT dispatch_epoch FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(app.store.pool())
            .await
            .unwrap()
    };
    let t = std::time::Instant::now();
    let epoch = loop {
        let e = epoch_of().await;
        if e > 0 {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never marked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let version = || async {
        sqlx::query_as::<_, (String, String)>(
            "SELECT xmin::text, xmax::text FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(app.store.pool())
        .await
        .unwrap()
    };
    let before = version().await;
    app.store.mark_dispatched(&[id], epoch).await.unwrap();
    assert_eq!(
        version().await,
        before,
        "a row already marked was locked or rewritten"
    );
    // a newer epoch (Redis lost its data and the reconciler dispatched it again) is recorded
    app.store.mark_dispatched(&[id], epoch + 1).await.unwrap();
    assert_eq!(epoch_of().await, epoch + 1);
    app.stop().await;
}

/// One scheduler at a time checks the Redis epoch and re-dispatches: a second replica's pass
/// leaves both alone while the first holds the dispatch lock, so after Redis lost its data the
/// backlog is dispatched once, under one new epoch (two replicas had each started an epoch and
/// dispatched everything again).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn one_scheduler_at_a_time_starts_an_epoch_and_redispatches(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let jobs: Vec<_> = (0..40)
        .map(|_| crate::support::new_job(app.tenant))
        .collect();
    app.store.insert_jobs(&jobs).await.unwrap();
    let opts = switchyard_scheduler::SchedulerOptions {
        undispatched_min_age: Duration::ZERO,
        ..app.scheduler_opts()
    };
    let scheduler = || async { app.scheduler(opts.clone()).await };
    let (a, b) = (scheduler().await, scheduler().await);
    let queue = app.queue().await;

    let held = app.store.try_dispatch_lock().await.unwrap().expect("free");
    let skipped = a.pass().await.unwrap();
    assert_eq!((skipped.new_epoch, skipped.redispatched), (None, 0));
    assert_eq!(queue.epoch().await.unwrap(), None, "no epoch started");
    held.release().await.unwrap();
    let first = a.pass().await.unwrap();
    assert_eq!(first.redispatched, 40, "{first:?}");
    let epoch = first.new_epoch.expect("a new epoch");

    // Redis loses its data: both replicas' passes race
    for round in 0..3 {
        let mut c = app.redis().await;
        let _: () = redis::cmd("DEL")
            .arg(app.keys().epoch())
            .query_async(&mut c)
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(a.pass(), b.pass());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            ra.redispatched + rb.redispatched,
            40,
            "round {round}: {ra:?} {rb:?}"
        );
        let started: Vec<i64> = [ra.new_epoch, rb.new_epoch].into_iter().flatten().collect();
        assert_eq!(
            started,
            vec![epoch + 1 + round],
            "round {round}: one new epoch"
        );
        assert_eq!(
            queue.epoch().await.unwrap(),
            Some(app.store.redis_epoch().await.unwrap()),
            "Redis and Postgres agree"
        );
    }
    app.stop().await;
}
