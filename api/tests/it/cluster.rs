//! The queue and event-stream contract on a Redis Cluster: each test starts a private
//! three-primary cluster (`redis-server --cluster-enabled yes` on three free ports, joined by
//! `redis-cli --cluster create`) and runs tests of the other modules against it through a
//! `redis+cluster://` URL. Queues, job event streams and tenants hash to slots on different
//! primaries, so every script, pipeline and multi-key command has to stay within its slot.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{spawn_app_with, Opts};

use switchyard_queue::testing::PrivateCluster;

fn opts(c: &PrivateCluster) -> Opts {
    Opts {
        redis_url: c.url.clone(),
        ..Opts::default()
    }
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn priorities_hold_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::submission::higher_priorities_are_fetched_first_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn delayed_jobs_run_on_time_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::submission::delayed_jobs_stay_queued_until_their_time_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn fairness_holds_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::fairness::another_tenants_job_starts_after_at_most_a_lane_of_the_flood_on(
        pool,
        opts(&c),
    )
    .await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn tenant_concurrency_limits_hold_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::fairness::a_tenants_concurrency_limit_holds_across_workers_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_streams_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::streaming::websocket_streams_tokens_in_order_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn sse_resumes_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::streaming::sse_streams_and_resumes_with_last_event_id_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn named_queues_run_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::queues::a_named_queue_runs_on_the_workers_that_serve_it_with_its_own_concurrency_on(
        pool,
        opts(&c),
    )
    .await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_reconciler_dispatches_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::reliability::jobs_committed_but_never_dispatched_still_run_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn lease_reclaim_works_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::reliability::an_idle_worker_reclaims_an_entry_a_dead_worker_fetched_but_never_claimed_on(
        pool,
        opts(&c),
    )
    .await;
}

/// One batch whose jobs go to queues on every primary: the API's single dispatch pipeline
/// (queued events, dispatch scripts, epoch read) is split per slot, and every job runs and
/// keeps its whole event history. No scheduler runs, so nothing but that pipeline dispatches.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn one_batch_spread_over_every_shard_runs_whole(pool: PgPool) {
    let c = PrivateCluster::start();
    let mut app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            scheduler: false,
            ..opts(&c)
        },
    )
    .await;
    // named queues until one lives on each primary
    let mut queues: Vec<String> = Vec::new();
    let mut nodes = std::collections::HashSet::new();
    for i in 0..200 {
        let q = format!("shard{i}");
        if nodes.insert(c.node_of(&app.keys().fair(&q))) {
            queues.push(q);
        }
        if nodes.len() == 3 {
            break;
        }
    }
    assert_eq!(nodes.len(), 3, "no queue name hashed to some primary");
    app.cfg.worker.queues.extend(queues.iter().cloned());
    app.start_worker().await;
    let mut jobs = Vec::new();
    for (i, q) in queues.iter().cycle().take(30).enumerate() {
        jobs.push(json!({"kind": "system.noop", "queue": q, "input": {}, "priority": i % 10}));
    }
    let r = app
        .auth(app.http.post(app.url("/v1/jobs/batch")))
        .json(&json!({ "jobs": jobs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    let mut redis = app.redis().await;
    for j in v["jobs"].as_array().unwrap() {
        let id: Uuid = j["id"].as_str().unwrap().parse().unwrap();
        app.wait_status(id, "succeeded", Duration::from_secs(30))
            .await;
        let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(app.keys().events(id))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(
            first.first().map(|e| e.0.as_str()),
            Some("1-0"),
            "{id}: the queued event"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn readiness_and_backlog_metrics_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::ops::health_ready_metrics_on(pool, opts(&c)).await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_worker_registry_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::ops::workers_are_listed_for_the_operator_on(pool, opts(&c)).await;
}

/// Cancel notices travel over pub/sub, which a cluster broadcasts to every node.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn cancellation_on_a_cluster(pool: PgPool) {
    let c = PrivateCluster::start();
    crate::jobs::cancel_queued_running_and_finished_on(pool, opts(&c)).await;
}
