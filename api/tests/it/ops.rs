//! Health, readiness, metrics and the OpenAPI document.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::support::spawn_api_only;

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn health_ready_metrics(pool: PgPool) {
    health_ready_metrics_on(pool, crate::support::Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn health_ready_metrics_on(pool: PgPool, base: crate::support::Opts) {
    // the scheduler creates the consumer groups the backlog is read from
    let app = crate::support::spawn_app_with(
        pool,
        crate::support::Opts {
            worker: false,
            ..base
        },
    )
    .await;
    let queue = app.queue().await;
    let t = std::time::Instant::now();
    while queue.epoch().await.unwrap().is_none() {
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["postgres"], "ok");
    assert_eq!(body["redis"], "ok");
    app.submit_noop(json!({})).await;
    app.submit(json!({"kind": "system.noop", "input": {}, "priority": 7}))
        .await;
    // a gauge's value by its exact series name
    let value = |text: &str, series: &str| -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let p7 = r#"switchyard_queue_backlog{queue="system",priority="7"}"#;
    let p0 = r#"switchyard_queue_backlog{queue="system",priority="0"}"#;
    let mut text = String::new();
    for _ in 0..100 {
        text = app.metrics_text().await;
        if value(&text, p7).unwrap_or(0) >= 1 && value(&text, p0).unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // (dispatch is at least once: under load the reconciler may have sent a job twice)
    assert!(value(&text, p7).unwrap_or(0) >= 1, "{text}");
    assert!(value(&text, p0).unwrap_or(0) >= 1, "{text}");
    let in_flight = r#"switchyard_queue_in_flight{queue="system",priority="0"}"#;
    assert_eq!(
        value(&text, in_flight),
        Some(0),
        "no worker: nothing in flight"
    );
    for name in [
        "switchyard_jobs{",
        "switchyard_queue_depth{",
        "switchyard_oldest_queued_age_seconds{",
        "switchyard_submit_latency_seconds_bucket",
        "switchyard_event_delivery_latency_seconds",
        "switchyard_ws_connections",
        "switchyard_jobs_estimate",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        text.contains(r#"switchyard_jobs{kind="system.noop",status="queued"} 2"#),
        "{text}"
    );
    assert!(text.contains("switchyard_jobs_estimated 0"), "{text}");
    // past the number counted on a scrape, the counts are the planner's estimates (a backlog
    // of millions is not read on every scrape)
    let (exact, estimated) = app.store.job_counts(1000).await.unwrap();
    assert!(!estimated);
    assert!(
        exact.contains(&("system.noop".into(), "queued".into(), 2)),
        "{exact:?}"
    );
    let (guessed, estimated) = app.store.job_counts(1).await.unwrap();
    assert!(estimated);
    assert_eq!(
        guessed.len(),
        6,
        "every kind, queued and running: {guessed:?}"
    );
    assert!(guessed.iter().all(|(_, _, n)| *n >= 0), "{guessed:?}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn openapi_documents_every_route_and_error(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/events",
        "/v1/ws",
        "/v1/models",
        "/v1/models/{id}",
        "/v1/usage",
        "/v1/chat/completions",
        "/v1/conversations",
        "/v1/conversations/{id}",
        "/v1/conversations/{id}/messages",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    // the rendered reference names every operation of the document
    let r = app.http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let shown = format!("<span class=\"m {method}\">{method}</span> <code>{path}</code>");
            assert!(html.contains(&shown), "/docs lacks {method} {path}");
        }
    }
    for (path, ops) in paths {
        if !path.starts_with("/v1/") {
            continue;
        }
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.contains_key("401"),
                "{method} {path} documents 401"
            );
        }
    }
    let desc = doc["info"]["description"].as_str().unwrap();
    for c in switchyard_core::ErrorCode::ALL {
        assert!(
            desc.contains(&format!("`{}`", c.as_str())),
            "{c} missing from the error table"
        );
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    app.stop().await;
}

/// The worker registry: live workers with their queues and load, for the operator only; a
/// drained worker leaves it.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn workers_are_listed_for_the_operator(pool: PgPool) {
    workers_are_listed_for_the_operator_on(pool, crate::support::Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn workers_are_listed_for_the_operator_on(
    pool: PgPool,
    base: crate::support::Opts,
) {
    use crate::support::OPERATOR_TOKEN;
    let mut app = crate::support::spawn_app_with(
        pool,
        crate::support::Opts {
            configure: Some(std::sync::Arc::new(|cfg| {
                cfg.worker.queues.push("reports".into());
                cfg.worker.queue_concurrency.insert("reports".into(), 2);
            })),
            ..base
        },
    )
    .await;
    let (http, url) = (app.http.clone(), app.url("/v1/workers"));
    let list = |token: &'static str| http.get(&url).bearer_auth(token).send();
    let mut workers = Value::Null;
    for _ in 0..100 {
        workers = list(OPERATOR_TOKEN).await.unwrap().json().await.unwrap();
        if workers["data"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let w = &workers["data"][0];
    assert_eq!(w["draining"], false, "{workers}");
    assert_eq!(w["concurrency"], 16);
    assert_eq!(w["pid"], std::process::id());
    let reports = w["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "reports")
        .expect("the named queue is listed");
    assert_eq!(reports["slots"], 2);
    assert_eq!(reports["shared"], false);
    // a tenant's key may not see it
    let key: &'static str = Box::leak(app.key.clone().into_boxed_str());
    assert_eq!(list(key).await.unwrap().status(), 403);
    // a stopped worker is gone from the list
    app.stop_workers().await;
    let after: Value = list(OPERATOR_TOKEN).await.unwrap().json().await.unwrap();
    assert_eq!(after["data"], json!([]), "{after}");
    app.stop().await;
}

/// `/metrics` leaves out what it could not read instead of repeating its last value (an
/// autoscaler would act on a stale backlog), says so in `metrics_source_up`, and does not wait
/// on a source that is down once one read failed; the age of
/// the oldest queued job counts only jobs ready to run (a job delayed an hour is not waiting).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn metrics_leave_out_what_they_cannot_read(pool: PgPool) {
    let mut redis = switchyard_queue::testing::PrivateRedis::start();
    let app = crate::support::spawn_app_with(
        pool,
        crate::support::Opts {
            worker: false,
            redis_url: redis.url(),
            ..Default::default()
        },
    )
    .await;
    let oldest = r#"switchyard_oldest_queued_age_seconds{queue="system"}"#;
    app.submit(json!({"kind": "system.noop", "input": {}, "delay_s": 3600}))
        .await;
    let text = app.metrics_text().await;
    assert!(
        !text.contains(oldest),
        "a delayed job is not waiting:\n{text}"
    );
    assert!(
        text.contains(r#"switchyard_metrics_source_up{source="redis"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"switchyard_queue_depth{queue="system"}"#),
        "{text}"
    );
    app.submit_noop(json!({})).await;
    let text = app.metrics_text().await;
    assert!(text.contains(oldest), "{text}");

    redis.stop();
    let t = std::time::Instant::now();
    let text = app.metrics_text().await;
    // within Prometheus' default scrape timeout (it took ~30 s: every read waited out Redis)
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    assert!(
        text.contains(r#"switchyard_metrics_source_up{source="redis"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"switchyard_metrics_source_up{source="postgres"} 1"#),
        "{text}"
    );
    assert!(!text.contains("switchyard_queue_depth{"), "stale:\n{text}");
    assert!(text.contains(oldest), "postgres still answers:\n{text}");
    let _back = switchyard_queue::testing::PrivateRedis::start_on(redis.port);
    app.stop().await;
}

/// With `metrics_token` set, `/metrics` (which names tenants' queues) answers only that bearer
/// token or the operator's.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn metrics_may_ask_for_a_token(pool: PgPool) {
    const TOKEN: &str = "metrics-token-0123456789";
    let app = crate::support::spawn_app_with(
        pool,
        crate::support::Opts {
            worker: false,
            configure: Some(std::sync::Arc::new(|cfg| {
                cfg.metrics_token = Some(TOKEN.to_string().into());
            })),
            ..Default::default()
        },
    )
    .await;
    let get = |token: Option<&str>| {
        let mut r = app.http.get(app.url("/metrics"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(
        get(Some("wrong-token-0123456789")).await.unwrap().status(),
        401
    );
    assert_eq!(
        get(Some(&app.key)).await.unwrap().status(),
        401,
        "a tenant's key"
    );
    let r = get(Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("switchyard_jobs_estimate"));
    let r = get(Some(crate::support::OPERATOR_TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200, "the operator's token");
    app.stop().await;
}

/// Warm-pool reports of workers that are gone are deleted by a scrape: every worker process
/// adds fields of its own, which piled up for ever (each scrape read them all).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn stale_warm_pool_reports_are_deleted(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let mut c = app.redis().await;
    let key = app.keys().code_pool();
    let now = chrono::Utc::now().timestamp();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("gone-worker|python")
        .arg("3|1000")
        .arg("live-worker|python")
        .arg(format!("2|{now}"))
        .query_async(&mut c)
        .await
        .unwrap();
    let text = app.metrics_text().await;
    assert!(
        text.contains(r#"switchyard_code_pool_ready{language="python"} 2"#),
        "{text}"
    );
    let left: Vec<String> = redis::cmd("HKEYS")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(left, ["live-worker|python"]);
    app.stop().await;
}

/// Migrating rebuilds an index a failed concurrent build left invalid (a re-run of its
/// migration, `IF NOT EXISTS`, took it for done, and queries went back to scanning).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn migrating_rebuilds_an_index_left_invalid(pool: PgPool) {
    sqlx::query(
        "UPDATE pg_index SET indisvalid = false
         WHERE indexrelid = 'schedule_runs_job'::regclass",
    )
    .execute(&pool)
    .await
    .unwrap();
    let store = switchyard_store::Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let valid: bool = sqlx::query_scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'schedule_runs_job'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(valid);
}
