//! Submitting, reading, listing and cancelling jobs; llm.chat end to end against the mock.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{spawn_api_only, spawn_app, spawn_app_with, Opts};

const T: Duration = Duration::from_secs(20);

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn submit_is_durable_and_readable(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .json(&json!({"kind": "system.noop", "input": {"sleep_ms": 1}, "metadata": {"team": "x"}, "max_attempts": 5, "timeout_s": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().contains_key("x-request-id"));
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(loc, format!("/v1/jobs/{id}"));
    assert_eq!(job["status"], "queued");
    assert_eq!(job["queue"], "system");
    assert_eq!(job["attempt"], 0);
    assert_eq!(job["max_attempts"], 5);
    assert_eq!(job["metadata"], json!({"team": "x"}));
    assert!(job["created_by"].as_str().unwrap().starts_with("key:"));
    for k in ["output", "error", "started_at", "finished_at"] {
        assert!(job[k].is_null(), "{k}");
    }
    // durable in postgres, with the trace context carried along
    let row = app.store.get_job(app.tenant, id).await.unwrap().unwrap();
    assert!(row
        .trace_parent
        .unwrap()
        .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    let got = app.get_job(id).await;
    assert_eq!(got["id"], job["id"]);
    assert_eq!(got["input"], json!({"sleep_ms": 1}));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn list_is_newest_first_with_filters_and_cursor(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit_noop(json!({})).await);
    }
    let chat = app
        .submit(json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}}))
        .await;
    let list = |q: String| {
        let app = &app;
        async move {
            let r = app
                .auth(app.http.get(app.url(&format!("/v1/jobs?{q}"))))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let all = list(String::new()).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 6);
    assert_eq!(all["data"][0]["id"], chat["id"]);
    assert!(all["next_cursor"].is_null());

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("kind=system.noop&limit=2&cursor={c}"),
            None => "kind=system.noop&limit=2".into(),
        };
        let page = list(q).await;
        for j in page["data"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().parse::<Uuid>().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut expect = ids.clone();
    expect.reverse();
    assert_eq!(seen, expect);

    let queued = list("status=queued".into()).await;
    assert_eq!(queued["data"].as_array().unwrap().len(), 6);
    let done = list("status=succeeded".into()).await;
    assert_eq!(done["data"].as_array().unwrap().len(), 0);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn llm_chat_runs_end_to_end(pool: PgPool) {
    let app = spawn_app(pool).await;
    let job = app
        .submit(
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "tell me about switchyards"}
        ], "max_tokens": 4}}),
        )
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let done = app.wait_status(id, "succeeded", T).await;
    let expected = switchyard_mock_llm::expected_text(
        &[
            ("system".into(), "be brief".into()),
            ("user".into(), "tell me about switchyards".into()),
        ],
        Some(4),
    );
    assert_eq!(done["output"]["text"], expected);
    assert_eq!(done["output"]["finish_reason"], "length");
    assert_eq!(done["output"]["usage"]["completion_tokens"], 4);
    assert_eq!(done["attempt"], 1);
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn provider_failures_are_typed(pool: PgPool) {
    let app = spawn_app(pool).await;
    let chat = |model: &str, attempts: i32| json!({"kind": "llm.chat", "max_attempts": attempts, "input": {"model": model, "messages": [{"role": "user", "content": "x"}]}});
    let bad = app.submit(chat("mock-error-400", 3)).await;
    let bad: Uuid = bad["id"].as_str().unwrap().parse().unwrap();
    let j = app.wait_status(bad, "failed", T).await;
    assert_eq!(j["error"]["code"], "provider_bad_request");
    assert_eq!(j["error"]["retryable"], false);
    assert_eq!(j["attempt"], 1, "non-retryable errors are not retried");

    let down = app.submit(chat("mock-error-500", 2)).await;
    let down: Uuid = down["id"].as_str().unwrap().parse().unwrap();
    let j = app.wait_status(down, "failed", T).await;
    assert_eq!(j["error"]["code"], "provider_error");
    assert_eq!(j["error"]["retryable"], true);
    assert_eq!(j["attempt"], 2, "retryable errors use every attempt");

    let cut = app.submit(chat("mock-drop", 1)).await;
    let cut: Uuid = cut["id"].as_str().unwrap().parse().unwrap();
    let j = app.wait_status(cut, "failed", T).await;
    assert_eq!(j["error"]["code"], "provider_stream_error");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn cancel_queued_running_and_finished(pool: PgPool) {
    cancel_queued_running_and_finished_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn cancel_queued_running_and_finished_on(pool: PgPool, base: Opts) {
    // a 30 s lease heartbeats every 10 s: confirming within 5 s needs the cancel notification
    let mut app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            lease: Duration::from_secs(30),
            ..base
        },
    )
    .await;
    let (http, base, key) = (app.http.clone(), app.base.clone(), app.key.clone());
    let cancel = |id: Uuid| {
        http.post(format!("{base}/v1/jobs/{id}/cancel"))
            .bearer_auth(&key)
            .send()
    };

    // queued: cancelled at once
    let q = app.submit_noop(json!({})).await;
    let r = cancel(q).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "cancelled");
    // finished: 409
    let r = cancel(q).await.unwrap();
    assert_eq!(r.status(), 409);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "job_finished");

    // running: 202, then cancelled once the worker confirms
    app.start_worker().await;
    let long = app.submit_noop(json!({"sleep_ms": 60000})).await;
    app.wait_status(long, "running", T).await;
    let r = cancel(long).await.unwrap();
    assert_eq!(r.status(), 202);
    let j = app
        .wait_status(long, "cancelled", Duration::from_secs(5))
        .await;
    assert!(j["finished_at"].is_string());
    // the cancelled queued job never ran
    let j = app.get_job(q).await;
    assert_eq!(j["status"], "cancelled");
    assert_eq!(j["attempt"], 0);
    // unknown job: 404
    let r = cancel(Uuid::now_v7()).await.unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}
