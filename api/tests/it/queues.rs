//! Named queues with their own worker concurrency, and per-job retry backoff.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{spawn_app_with, Opts};

const T: Duration = Duration::from_secs(30);

fn id_of(job: &Value) -> Uuid {
    job["id"].as_str().unwrap().parse().unwrap()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_named_queue_runs_on_the_workers_that_serve_it_with_its_own_concurrency(pool: PgPool) {
    a_named_queue_runs_on_the_workers_that_serve_it_with_its_own_concurrency_on(
        pool,
        Opts::default(),
    )
    .await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn a_named_queue_runs_on_the_workers_that_serve_it_with_its_own_concurrency_on(
    pool: PgPool,
    base: Opts,
) {
    let app = spawn_app_with(
        pool,
        Opts {
            configure: Some(Arc::new(|cfg| {
                cfg.worker.queues.push("reports".into());
                cfg.worker.queue_concurrency.insert("reports".into(), 1);
            })),
            ..base
        },
    )
    .await;
    app.wait_epoch().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let job = app
            .submit(json!({"kind": "system.noop", "queue": "reports", "input": {"sleep_ms": 250}}))
            .await;
        assert_eq!(job["queue"], "reports");
        ids.push(id_of(&job));
    }
    // a delayed job of a named queue is moved when due like any other
    let later = app
        .submit(json!({"kind": "system.noop", "queue": "reports", "delay_s": 1, "input": {}}))
        .await;
    ids.push(id_of(&later));
    // a queue no worker serves keeps its job queued, visible as backlog
    let idle = app
        .submit(json!({"kind": "system.noop", "queue": "nobody-serves", "input": {}}))
        .await;
    let mut spans = Vec::new();
    for id in &ids {
        let j = app.wait_status(*id, "succeeded", T).await;
        spans.push((time(&j["started_at"]), time(&j["finished_at"])));
    }
    // one slot: the runs never overlap
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "runs overlap: {spans:?}");
    }
    assert_eq!(app.get_job(id_of(&idle)).await["status"], "queued");
    let backlog = r#"switchyard_queue_backlog{queue="nobody-serves",priority="0"}"#;
    let mut seen = None;
    for _ in 0..100 {
        seen = app.metric(backlog).await;
        if seen.is_some_and(|n| n >= 1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.is_some_and(|n| n >= 1.0), "{seen:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn queue_names_and_backoffs_are_checked(pool: PgPool) {
    let app = spawn_app_with(pool, Opts::default()).await;
    for (body, field) in [
        (
            json!({"kind": "system.noop", "input": {}, "queue": "Bad Name"}),
            "queue",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "queue": ""}),
            "queue",
        ),
        (
            json!({"kind": "code.exec", "input": {"language": "python", "code": "1"}, "queue": "bulk"}),
            "queue",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "backoff": {"type": "linear"}}),
            "backoff.type",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "backoff": {"type": "fixed", "delay_s": -1}}),
            "backoff.delay_s",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "backoff": {"type": "fixed", "max_delay_s": 9}}),
            "backoff.max_delay_s",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "backoff": {"type": "exponential", "delay_s": 10, "max_delay_s": 5}}),
            "backoff.max_delay_s",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "backoff": {"type": "fixed", "colour": 1}}),
            "backoff.colour",
        ),
    ] {
        let r = app
            .auth(app.http.post(app.url("/v1/jobs")))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_client_error(), "{body}: {status} {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_fixed_backoff_spaces_the_retries_as_asked(pool: PgPool) {
    let app = spawn_app_with(pool, Opts::default()).await;
    app.wait_epoch().await;
    let job = app
        .submit(json!({
            "kind": "system.noop",
            "input": {"fail_attempts": 2},
            "max_attempts": 3,
            "backoff": {"type": "fixed", "delay_s": 1.5}
        }))
        .await;
    assert_eq!(job["backoff"], json!({"type": "fixed", "delay_s": 1.5}));
    let id = id_of(&job);
    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    let events = ws.until_terminal(id, T).await;
    assert_eq!(events.last().unwrap()["type"], "succeeded", "{events:#?}");
    let retries: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "status" && !e["data"]["retry_at"].is_null())
        .collect();
    assert_eq!(retries.len(), 2, "{events:#?}");
    for r in retries {
        // fixed, without jitter: retry_at is the failure time plus 1.5 s
        let wait = time(&r["data"]["retry_at"]) - time(&r["ts"]);
        let ms = wait.num_milliseconds();
        assert!((1400..=1600).contains(&ms), "waited {ms} ms: {r}");
    }
    let j = app.get_job(id).await;
    assert_eq!(j["attempt"], 3);
    assert_eq!(j["backoff"]["type"], "fixed");
    app.stop().await;
}

/// Retention: finished jobs older than their tenant's period are pruned with their events;
/// recent ones, and tenants that keep everything, are left alone.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn finished_jobs_are_pruned_after_their_tenants_retention(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            scheduler: false,
            ..Opts::default()
        },
    )
    .await;
    let keep_forever = app.store.create_tenant("archive").await.unwrap();
    assert!(app
        .store
        .set_tenant_job_retention("archive", Some(0))
        .await
        .unwrap());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = app.submit_noop(json!({})).await;
        app.wait_status(id, "succeeded", T).await;
        ids.push(id);
    }
    let (old, recent, forever) = (ids[0], ids[1], ids[2]);
    let backdate = |id: Uuid, days: i32| {
        sqlx::query(
            "UPDATE jobs SET finished_at = finished_at - make_interval(days => $2),
                created_at = created_at - make_interval(days => $2) WHERE id = $1",
        )
        .bind(id)
        .bind(days)
        .execute(app.store.pool())
    };
    backdate(old, 40).await.unwrap();
    backdate(recent, 2).await.unwrap();
    backdate(forever, 400).await.unwrap();
    sqlx::query("UPDATE jobs SET tenant_id = $2 WHERE id = $1")
        .bind(forever)
        .bind(keep_forever.id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let redis = app.redis().await;
    let events_exist = |id: Uuid| {
        let key = app.keys().events(id);
        let mut r = redis.clone();
        async move {
            redis::AsyncCommands::exists::<_, bool>(&mut r, key)
                .await
                .unwrap()
        }
    };
    assert!(events_exist(old).await);

    let opts = switchyard_scheduler::SchedulerOptions {
        job_prune_every: Duration::ZERO,
        ..app.scheduler_opts()
    };
    let sched = app.scheduler(opts).await;
    let report = sched.pass().await.unwrap();
    assert_eq!(report.jobs_pruned, 1, "{report:?}");
    let r = app
        .auth(app.http.get(app.url(&format!("/v1/jobs/{old}"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(!events_exist(old).await, "its events went with it");
    assert_eq!(app.get_job(recent).await["status"], "succeeded");
    assert!(app.store.get_job_unscoped(forever).await.unwrap().is_some());
    app.stop().await;
}

/// Retention skips a job another transaction holds (a retry requeueing it: the job was deleted
/// after its retry had answered 202) and a job whose webhook is still being delivered (until it
/// is delivered); it takes the rest.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn retention_spares_a_job_being_retried_and_one_still_notifying(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(id_of(
            &app.submit(json!({"kind": "system.noop", "input": {}}))
                .await,
        ));
    }
    let (held, notifying, plain) = (ids[0], ids[1], ids[2]);
    // all three failed 40 days ago (past the default 30 days)
    sqlx::query(
        "UPDATE jobs SET status = 'failed', finished_at = now() - interval '40 days'
         WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(app.store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO webhook_deliveries (tenant_id, job_id, url, event)
         VALUES ($1, $2, 'https://example.com/hook', 'job.failed')",
    )
    .bind(app.tenant)
    .bind(notifying)
    .execute(app.store.pool())
    .await
    .unwrap();
    // a retry of `held` is under way
    let mut retry = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(held)
        .execute(&mut *retry)
        .await
        .unwrap();
    // (a hang guard: retention must not wait for the retry)
    let pruned = tokio::time::timeout(T, app.store.prune_finished_jobs(30, 100))
        .await
        .expect("retention waited for a job another transaction holds")
        .unwrap();
    assert_eq!(pruned, vec![plain]);
    sqlx::query("UPDATE jobs SET status = 'queued', finished_at = NULL WHERE id = $1")
        .bind(held)
        .execute(&mut *retry)
        .await
        .unwrap();
    retry.commit().await.unwrap();
    assert!(app
        .store
        .prune_finished_jobs(30, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(app.store.get_job_unscoped(held).await.unwrap().is_some());
    // once its webhook is delivered, the other goes too
    sqlx::query("UPDATE webhook_deliveries SET state = 'delivered' WHERE job_id = $1")
        .bind(notifying)
        .execute(app.store.pool())
        .await
        .unwrap();
    assert_eq!(
        app.store.prune_finished_jobs(30, 100).await.unwrap(),
        vec![notifying]
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    app.stop().await;
}

/// Consumer names of a queue's streams (one per worker start; Redis keeps them until deleted).
async fn consumers(app: &crate::support::TestApp, queue: &str) -> Vec<String> {
    let mut c = app.redis().await;
    let mut names = Vec::new();
    for p in 0..10 {
        let r: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(app.keys().stream(queue, p))
            .arg("workers")
            .query_async(&mut c)
            .await;
        for entry in r.unwrap_or_default() {
            let s = format!("{entry:?}");
            for n in ["c-busy", "c-idle"] {
                if s.contains(n) {
                    names.push(n.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Idle consumers without pending entries are deleted (workers of past deploys piled up in
/// every stream's group); one holding an entry stays, and so do recently active ones.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn idle_stream_consumers_are_pruned_but_not_those_holding_entries(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let queue = app.queue().await;
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    let q = job["queue"].as_str().unwrap().to_string();
    queue.ensure_group(&q).await.unwrap();
    let c = app.redis().await;
    // c-busy holds an entry; c-idle took one and acknowledged it
    let fetch = |name: &'static str| {
        let (queue, q, mut c) = (queue.clone(), q.clone(), c.clone());
        async move {
            for _ in 0..100 {
                let got = queue.try_fetch(&mut c, &q, name, 1).await.unwrap();
                if let Some(d) = got.deliveries.into_iter().next() {
                    return d;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{name} fetched nothing");
        }
    };
    fetch("c-busy").await;
    app.submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    let d = fetch("c-idle").await;
    queue.ack(&d).await.unwrap();
    assert_eq!(consumers(&app, &q).await, ["c-busy", "c-idle"]);
    // recently active: kept
    assert_eq!(
        queue
            .prune_consumers(&q, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert!(queue.prune_consumers(&q, Duration::ZERO).await.unwrap() >= 1);
    assert_eq!(consumers(&app, &q).await, ["c-busy"]);
    // and the scheduler does it on its own
    let opts = switchyard_scheduler::SchedulerOptions {
        consumer_prune_every: Duration::ZERO,
        consumer_idle: Duration::ZERO,
        ..app.scheduler_opts()
    };
    app.submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    let d = fetch("c-idle").await;
    queue.ack(&d).await.unwrap();
    assert_eq!(consumers(&app, &q).await, ["c-busy", "c-idle"]);
    // a dead worker's report in the registry goes with the same pass
    let mut c = app.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(app.keys().workers())
        .arg("dead-worker")
        .arg("{}")
        .query_async(&mut c)
        .await
        .unwrap();
    let sched = app.scheduler(opts).await;
    assert!(sched.pass().await.unwrap().consumers_pruned >= 1);
    assert_eq!(consumers(&app, &q).await, ["c-busy"]);
    let left: bool = redis::cmd("HEXISTS")
        .arg(app.keys().workers())
        .arg("dead-worker")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!left, "a dead worker's report stayed");
    app.stop().await;
}

/// Cancelling a delayed job takes it out of its queue's delayed set at once (its member stayed
/// until its due time, up to a year, then took lane room only to be fetched and dropped).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_cancelled_delayed_job_leaves_the_delayed_set(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}, "delay_s": 86_400}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut c = app.redis().await;
    let key = app.keys().delayed("system");
    let mut delayed = async || -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .unwrap()
    };
    let members = delayed().await;
    assert!(members.iter().any(|m| m.starts_with(&id)), "{members:?}");
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let members = delayed().await;
    assert!(!members.iter().any(|m| m.starts_with(&id)), "{members:?}");
    app.stop().await;
}
