//! Fairness across tenants and concurrency limits across workers (`shared/queue/src/fair.rs`):
//! a flooding tenant's backlog waits in its own lane, another tenant's job starts after at
//! most a lane's depth of it, weights widen a lane, and per-tenant and per-queue limits hold
//! over several workers.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::quota::QuotaLimits;
use uuid::Uuid;

use crate::support::{spawn_app_with, Opts, TestApp};

const T: Duration = Duration::from_secs(60);

fn lane_depth(k: u64, base: Opts) -> Opts {
    Opts {
        configure: Some(Arc::new(move |cfg| cfg.queue_lane_depth = k)),
        ..base
    }
}

async fn submit_many(app: &TestApp, key: &str, n: usize, input: Value) -> Vec<Uuid> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let k = (n - ids.len()).min(1000);
        let r = app
            .http
            .post(app.url("/v1/jobs/batch"))
            .bearer_auth(key)
            .json(&json!({"jobs": vec![json!({"kind": "system.noop", "input": input}); k]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        for j in v["jobs"].as_array().unwrap() {
            ids.push(j["id"].as_str().unwrap().parse().unwrap());
        }
    }
    ids
}

/// Runs one scheduler pass now (it writes the queues' limits and weights into Redis).
async fn sync_limits(app: &TestApp) {
    let opts = switchyard_scheduler::SchedulerOptions {
        limits_every: Duration::ZERO,
        ..app.scheduler_opts()
    };
    app.scheduler(opts).await.pass().await.unwrap();
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_flooding_tenant_waits_in_its_lane_and_weights_widen_it(pool: PgPool) {
    let mut opts = lane_depth(8, Opts::default());
    opts.worker = false;
    let app = spawn_app_with(pool, opts).await;
    app.wait_epoch().await;
    let heavy = app.store.create_tenant("heavy").await.unwrap();
    let (_, heavy_key) = app.store.create_api_key(heavy.id, "k", None).await.unwrap();
    assert!(app
        .store
        .set_tenant_queue_weight("heavy", Some(2))
        .await
        .unwrap());
    sync_limits(&app).await;
    submit_many(&app, &app.key, 100, json!({})).await;
    submit_many(&app, &heavy_key, 100, json!({})).await;
    // the rest waits in the tenants' own lanes, and counts as backlog
    let series = r#"switchyard_queue_backlog{queue="system",priority="0"}"#;
    let mut backlog = None;
    for _ in 0..100 {
        backlog = app.metric(series).await;
        if backlog == Some(200.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backlog, Some(200.0));
    let mut redis = app.redis().await;
    let keys = app.keys();
    let stream: Vec<(String, Vec<(String, String)>)> = {
        let reply: redis::streams::StreamRangeReply =
            redis::AsyncCommands::xrange_all(&mut redis, keys.stream("system", 0))
                .await
                .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                let t: String = e.get("t").unwrap();
                (e.id, vec![("t".into(), t)])
            })
            .collect()
    };
    let of = |t: Uuid| {
        stream
            .iter()
            .filter(|(_, f)| f[0].1 == t.to_string())
            .count()
    };
    assert_eq!(
        of(app.tenant),
        8,
        "a lane's depth of each tenant is in the stream"
    );
    assert_eq!(of(heavy.id), 16, "weight 2: twice the depth");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn another_tenants_job_starts_after_at_most_a_lane_of_the_flood(pool: PgPool) {
    another_tenants_job_starts_after_at_most_a_lane_of_the_flood_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn another_tenants_job_starts_after_at_most_a_lane_of_the_flood_on(
    pool: PgPool,
    base: Opts,
) {
    let mut app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            ..lane_depth(8, base)
        },
    )
    .await;
    app.wait_epoch().await;
    // tenant A floods the queue before any worker runs
    let flood = submit_many(&app, &app.key.clone(), 2000, json!({})).await;
    let other = app.store.create_tenant("other").await.unwrap();
    let (_, other_key) = app.store.create_api_key(other.id, "k", None).await.unwrap();
    let b: Uuid = submit_many(&app, &other_key, 1, json!({})).await[0];
    app.start_worker().await;
    let j = {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let row = app.store.get_job_unscoped(b).await.unwrap().unwrap();
            if row.status == "succeeded" {
                break row;
            }
            assert!(tokio::time::Instant::now() < deadline, "B never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let started: DateTime<Utc> = j.started_at.unwrap();
    let before_b: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND started_at < $2")
            .bind(&flood)
            .bind(started)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    // at most the lane (8) plus what the worker's first fetch took (up to 16 slots) started
    // before B; without lanes B would have waited for all 2000
    assert!(
        before_b <= 8 + 16,
        "{before_b} of the flood started before B"
    );
    app.stop().await;
}

/// The largest number of jobs of `ids` running at the same moment (from their run times).
async fn max_overlap(app: &TestApp, ids: &[Uuid]) -> usize {
    let rows: Vec<(DateTime<Utc>, DateTime<Utc>)> =
        sqlx::query_as("SELECT started_at, finished_at FROM jobs WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    let mut points: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for (s, f) in rows {
        points.push((s, 1));
        points.push((f, -1));
    }
    // an end at the same instant as a start frees its slot first
    points.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in points {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

async fn wait_all(app: &TestApp, ids: &[Uuid]) {
    for id in ids {
        app.wait_status(*id, "succeeded", T).await;
    }
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_tenants_concurrency_limit_holds_across_workers(pool: PgPool) {
    a_tenants_concurrency_limit_holds_across_workers_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn a_tenants_concurrency_limit_holds_across_workers_on(pool: PgPool, base: Opts) {
    let mut app = spawn_app_with(pool, base).await;
    app.start_worker().await; // two workers, 16 slots each
    app.wait_epoch().await;
    let limits = QuotaLimits {
        concurrent_jobs: Some(2),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    sync_limits(&app).await;
    let ids = submit_many(&app, &app.key.clone(), 8, json!({"sleep_ms": 300})).await;
    wait_all(&app, &ids).await;
    assert_eq!(max_overlap(&app, &ids).await, 2);
    // every slot was given back
    let mut redis = app.redis().await;
    let left: Option<i64> = redis::AsyncCommands::hget(
        &mut redis,
        app.keys().fair("system"),
        format!("r:{}", app.tenant),
    )
    .await
    .unwrap();
    assert_eq!(left, None);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_queue_limit_holds_across_workers(pool: PgPool) {
    let mut app = spawn_app_with(
        pool,
        Opts {
            configure: Some(Arc::new(|cfg| {
                cfg.worker.queues.push("reports".into());
                cfg.queue_limits.insert("reports".into(), 3);
            })),
            ..Opts::default()
        },
    )
    .await;
    app.start_worker().await;
    app.wait_epoch().await;
    // the queue must be known before its limits are written
    app.queue().await.ensure_group("reports").await.unwrap();
    sync_limits(&app).await;
    let mut ids = Vec::new();
    for _ in 0..9 {
        let j = app
            .submit(json!({"kind": "system.noop", "queue": "reports", "input": {"sleep_ms": 300}}))
            .await;
        ids.push(j["id"].as_str().unwrap().parse().unwrap());
    }
    wait_all(&app, &ids).await;
    assert_eq!(max_overlap(&app, &ids).await, 3);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_batch_of_acknowledgements_frees_each_slot_once_and_moves_waiting_jobs_up(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        lane_depth(
            2,
            Opts {
                worker: false,
                scheduler: false,
                ..Opts::default()
            },
        ),
    )
    .await;
    let queue = app.queue().await;
    queue.ensure_group("system").await.unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let item = |tenant| switchyard_core::job::DispatchItem {
        id: Uuid::now_v7(),
        tenant_id: tenant,
        queue: "system".into(),
        priority: 0,
        run_at: None,
    };
    let mut items: Vec<_> = (0..5).map(|_| item(a)).collect();
    items.push(item(b));
    queue.dispatch(&items).await.unwrap();
    let mut conn = app.redis().await;
    let wait = Duration::from_millis(100);
    let mut fetch = async || {
        queue
            .fetch(&mut conn, "system", "c1", 10, wait)
            .await
            .unwrap()
    };
    // a lane of 2: A's first two and B's one; A's next two move up as they are delivered
    let first = fetch().await;
    assert_eq!(first.len(), 3);
    let mut redis = app.redis().await;
    let fair = app.keys().fair("system");
    let counter = async |redis: &mut switchyard_queue::RedisConn, field: String| -> Option<i64> {
        redis::AsyncCommands::hget(redis, &fair, field)
            .await
            .unwrap()
    };
    assert_eq!(counter(&mut redis, "r:*".into()).await, Some(3));
    // one entry whose stream is broken (a key of another type): it fails alone
    let broken = switchyard_queue::Delivery {
        stream: format!("{}:broken", app.keys().queue_base("system")),
        entry_id: "1-1".into(),
        ..first[0].clone()
    };
    let _: () = redis::AsyncCommands::set(&mut redis, &broken.stream, "x")
        .await
        .unwrap();
    let mut batch: Vec<_> = first.iter().collect();
    batch.push(&broken);
    let acked = queue.ack_many("system", &batch).await.unwrap();
    assert_eq!(acked, [true, true, true, false]);
    assert_eq!(counter(&mut redis, "r:*".into()).await, None);
    assert_eq!(counter(&mut redis, format!("r:{a}")).await, None);
    assert_eq!(counter(&mut redis, format!("r:{b}")).await, None);
    // the same batch again changes nothing
    let acked = queue.ack_many("system", &batch).await.unwrap();
    assert_eq!(acked, [false; 4]);
    assert_eq!(counter(&mut redis, "r:*".into()).await, None);
    // the rest of A's jobs arrive, each once, and nothing waits any more
    let mut rest = fetch().await;
    rest.extend(fetch().await);
    assert_eq!(rest.len(), 3, "{rest:?}");
    let mut seen: Vec<Uuid> = first.iter().chain(&rest).map(|d| d.job_id).collect();
    seen.sort();
    let mut want: Vec<Uuid> = items.iter().map(|i| i.id).collect();
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(counter(&mut redis, format!("o:{a}")).await, None);
    app.stop().await;
}

/// An entry reclaimed from a worker whose lease still runs (its Redis heartbeat failed, its
/// Postgres lease did not) is handed back to it with its slot still taken: acknowledging it
/// freed the running job's slot (a tenant's and the queue's limit then passed by one). A
/// stale second entry of the job is not handed back (it would hold a slot for the whole run).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_reclaimed_entry_handed_back_keeps_its_slot(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            scheduler: false,
            ..Opts::default()
        },
    )
    .await;
    let queue = app.queue().await;
    queue.ensure_group("system").await.unwrap();
    let item = switchyard_core::job::DispatchItem {
        id: Uuid::now_v7(),
        tenant_id: Uuid::new_v4(),
        queue: "system".into(),
        priority: 0,
        run_at: None,
    };
    queue.dispatch(&[item]).await.unwrap();
    let mut conn = app.redis().await;
    let got = queue
        .fetch(&mut conn, "system", "owner", 1, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert!(!got[0].reclaimed);
    let mut redis = app.redis().await;
    let fair = app.keys().fair("system");
    let taken = async |redis: &mut switchyard_queue::RedisConn| -> Option<i64> {
        redis::AsyncCommands::hget(redis, &fair, "r:*")
            .await
            .unwrap()
    };
    assert_eq!(taken(&mut redis).await, Some(1));
    let mut cursor = "0-0".to_string();
    let stolen = queue
        .reclaim("system", 0, "other", Duration::ZERO, &mut cursor, 10)
        .await
        .unwrap();
    assert_eq!(stolen.len(), 1);
    assert!(stolen[0].reclaimed);
    assert!(queue.give_back(&stolen[0], "owner").await.unwrap());
    let owner_of: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(app.keys().stream("system", 0))
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(owner_of.len(), 1);
    assert_eq!(owner_of[0].1, "owner");
    assert_eq!(taken(&mut redis).await, Some(1), "the slot is still taken");
    // the owner's end frees it, once
    queue.ack(&got[0]).await.unwrap();
    assert_eq!(taken(&mut redis).await, None);

    // a stale second entry of a job whose owner runs another one is not handed back
    let item = switchyard_core::job::DispatchItem {
        id: Uuid::now_v7(),
        tenant_id: Uuid::new_v4(),
        queue: "system".into(),
        priority: 0,
        run_at: None,
    };
    queue.dispatch(std::slice::from_ref(&item)).await.unwrap();
    queue.dispatch(&[item]).await.unwrap();
    let stale = queue
        .fetch(&mut conn, "system", "dead", 1, Duration::from_millis(100))
        .await
        .unwrap();
    let running = queue
        .fetch(&mut conn, "system", "owner", 1, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!((stale.len(), running.len()), (1, 1));
    assert_eq!(stale[0].job_id, running[0].job_id);
    let mut cursor = "0-0".to_string();
    let stolen = queue
        .reclaim("system", 0, "other", Duration::ZERO, &mut cursor, 1)
        .await
        .unwrap();
    assert_eq!(stolen[0].entry_id, stale[0].entry_id);
    assert!(!queue.give_back(&stolen[0], "owner").await.unwrap());
    app.stop().await;
}
