//! Named queues are bounded: `max_named_queues` for the deployment, and
//! `max_named_queues_per_tenant` for the queues one tenant named first; the scheduler drops
//! those nothing uses, freeing their places, and deletes their keys.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::job::DispatchItem;
use uuid::Uuid;

use crate::schedules::{post, post_as};
use crate::support::{spawn_app_with, Opts, TestApp};

const T: Duration = Duration::from_secs(30);

fn id_of(job: &Value) -> Uuid {
    job["id"].as_str().unwrap().parse().unwrap()
}

fn later(queue: &str) -> Value {
    json!({"kind": "system.noop", "queue": queue, "delay_s": 3600, "input": {}})
}

/// Named queues are capped (`max_named_queues`): a job naming a new one past the cap is
/// refused naming its field, alone, in a batch or in a schedule, while existing, configured
/// and the kinds' own queues take jobs. The scheduler drops named queues nothing uses (empty
/// in Redis, no unfinished job, no schedule naming them, no live worker serving them), which
/// frees their places.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn named_queues_are_capped_and_unused_ones_dropped(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            scheduler: false,
            configure: Some(Arc::new(|cfg| {
                cfg.max_named_queues = 4;
                cfg.worker.queues.push("served".into());
            })),
            ..Opts::default()
        },
    )
    .await;
    // "served" is registered by its worker; "a" and "b" by their jobs (waiting an hour),
    // "sched" by its schedule
    let t = std::time::Instant::now();
    while !app
        .queue()
        .await
        .queues()
        .await
        .unwrap()
        .contains(&"served".to_string())
    {
        assert!(t.elapsed() < T, "the worker never registered its queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hourly = |queue: &str| json!({"cron": "0 * * * *", "job": {"kind": "system.noop", "queue": queue, "input": {}}});
    let a = app.submit(later("a")).await;
    app.submit(later("b")).await;
    let (s, e) = post(&app, "/v1/schedules", hourly("sched")).await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = post(&app, "/v1/jobs", later("c")).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["error"]["field"], "queue", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_named_queues"),
        "{e}"
    );
    let batch = json!({"jobs": [later("a"), later("c")]});
    let (s, e) = post(&app, "/v1/jobs/batch", batch).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["error"]["field"], "jobs[1].queue", "{e}");
    let (s, e) = post(&app, "/v1/schedules", hourly("c")).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["error"]["field"], "job.queue", "{e}");
    // queues the registry holds, and the kinds' own, still take jobs
    app.submit(later("a")).await;
    app.submit(later("served")).await;
    app.submit(json!({"kind": "system.noop", "input": {}}))
        .await;

    // nothing is unused yet: "a" and "b" hold waiting jobs, "sched" has a schedule, "served"
    // a live worker
    let sched = app.scheduler(app.scheduler_opts()).await;
    assert!(sched.prune_queue_registry().await.unwrap().is_empty());
    // with their jobs cancelled, "a" holds nothing: it is dropped, and "c" fits
    let waiting: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE queue = 'a'")
        .fetch_all(app.store.pool())
        .await
        .unwrap();
    assert_eq!(waiting.len(), 2);
    assert!(waiting.contains(&id_of(&a)));
    for id in waiting {
        let (s, e) = post(&app, &format!("/v1/jobs/{id}/cancel"), json!({})).await;
        assert_eq!(s, 200, "{e}");
    }
    assert_eq!(sched.prune_queue_registry().await.unwrap(), ["a"]);
    let queues = app.queue().await.queues().await.unwrap();
    assert!(!queues.contains(&"a".to_string()), "{queues:?}");
    assert!(queues.contains(&"served".to_string()), "{queues:?}");
    assert!(queues.contains(&"sched".to_string()), "{queues:?}");
    until_admitted(&app, "c", "a dropped queue's place was not freed").await;
    app.stop().await;
}

/// Submits a job naming `queue` until it is admitted (422 meanwhile): the API trusts its last
/// read of the registry for a few seconds.
async fn until_admitted(app: &TestApp, queue: &str, what: &str) {
    let t = std::time::Instant::now();
    loop {
        let (s, e) = post(app, "/v1/jobs", later(queue)).await;
        if s == 202 {
            break;
        }
        assert_eq!(s, 422, "{e}");
        assert!(t.elapsed() < T, "{what}: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One tenant names at most `max_named_queues_per_tenant` of the named queues: past its share
/// its new names get 422, while another tenant still makes queues of its own and uses the
/// first one's; a queue the scheduler drops gives its place back to the tenant that named it.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn one_tenant_names_at_most_its_share_of_queues(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            scheduler: false,
            configure: Some(Arc::new(|cfg| {
                cfg.max_named_queues = 10;
                cfg.max_named_queues_per_tenant = 2;
            })),
            ..Opts::default()
        },
    )
    .await;
    let a1 = app.submit(later("a1")).await;
    app.submit(later("a2")).await;
    let (s, e) = post(&app, "/v1/jobs", later("a3")).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["error"]["field"], "queue", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_named_queues_per_tenant"),
        "{e}"
    );
    // the tenant's own queues still take its jobs
    app.submit(later("a2")).await;

    let other = app.store.create_tenant("other").await.unwrap();
    let (_, key) = app.store.create_api_key(other.id, "k", None).await.unwrap();
    for q in ["b1", "b2", "a1"] {
        let (s, e) = post_as(&app, &key, "/v1/jobs", later(q)).await;
        assert_eq!(s, 202, "{q}: {e}");
    }
    let (s, e) = post_as(&app, &key, "/v1/jobs", later("b3")).await;
    assert_eq!(s, 422, "{e}");

    // "a1" emptied (its jobs cancelled) and dropped: its namer may name a new queue
    let waiting: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs WHERE queue = 'a1'")
        .fetch_all(app.store.pool())
        .await
        .unwrap();
    assert_eq!(waiting.len(), 2);
    assert!(waiting.contains(&id_of(&a1)));
    for id in waiting {
        // one is the other tenant's
        for k in [app.key.as_str(), key.as_str()] {
            let (s, _) = post_as(&app, k, &format!("/v1/jobs/{id}/cancel"), json!({})).await;
            if s == 200 {
                break;
            }
            assert_eq!(s, 404);
        }
    }
    let sched = app.scheduler(app.scheduler_opts()).await;
    assert_eq!(sched.prune_queue_registry().await.unwrap(), ["a1"]);
    until_admitted(&app, "a3", "a dropped queue's place was not given back").await;
    app.stop().await;
}

/// A dropped queue's Redis keys go with it (its streams with their group, bell, fairness and
/// limit hashes, epoch mark): every queue name ever used would otherwise keep a dozen keys.
/// Keys of a queue with a job in flight stay. A job dispatched to the queue afterwards is
/// delivered once a worker creates the group again (as at its start, or on its fetch's
/// `NOGROUP`).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_dropped_queue_leaves_no_keys_behind_and_works_again(pool: PgPool) {
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
    let q = "gone";
    let item = |id| DispatchItem {
        id,
        tenant_id: Uuid::new_v4(),
        queue: q.into(),
        priority: 3,
        run_at: None,
    };
    let mut redis = app.redis().await;
    let pattern = format!("{}*", app.keys().queue_base(q));
    let keys = async |redis: &mut switchyard_queue::RedisConn| -> Vec<String> {
        redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(redis)
            .await
            .unwrap()
    };
    // served for a while: groups made, a job dispatched and fetched, limits written, the
    // queue's slot marked with the epoch
    queue.ensure_group(q).await.unwrap();
    queue.dispatch(&[item(Uuid::now_v7())]).await.unwrap();
    let mut conn = app.redis().await;
    let got = queue
        .fetch(&mut conn, q, "w", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    queue.set_limits(q, &[("queue".into(), 5)]).await.unwrap();
    queue.check_queue_epochs(1).await.unwrap();
    let marked = async |redis: &mut switchyard_queue::RedisConn| -> Option<i64> {
        redis::cmd("HGET")
            .arg(app.keys().queue_marks())
            .arg(q)
            .query_async(redis)
            .await
            .unwrap()
    };
    assert_eq!(marked(&mut redis).await, Some(1));

    // in flight: the keys stay, and so does the record of the epoch mark
    assert!(!queue.delete_queue_keys(q).await.unwrap());
    assert_eq!(marked(&mut redis).await, Some(1));
    let held = keys(&mut redis).await;
    queue.ack(&got[0]).await.unwrap();
    // 10 priority streams, bell, fairness (in flight) and limit hashes, epoch mark
    assert!(held.len() >= 14, "{held:?}");

    let sched = app.scheduler(app.scheduler_opts()).await;
    assert_eq!(sched.prune_queue_registry().await.unwrap(), [q]);
    assert_eq!(keys(&mut redis).await, Vec::<String>::new());
    assert_eq!(
        marked(&mut redis).await,
        None,
        "no record of a mark that is gone"
    );

    // used again
    let id = Uuid::now_v7();
    queue.dispatch(&[item(id)]).await.unwrap();
    assert!(queue.queues().await.unwrap().contains(&q.to_string()));
    let e = queue
        .fetch(&mut conn, q, "w", 10, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("NOGROUP"), "{e}");
    queue.ensure_group(q).await.unwrap();
    let got = queue
        .fetch(&mut conn, q, "w", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(got.iter().map(|d| d.job_id).collect::<Vec<_>>(), [id]);
    app.stop().await;
}
