//! The front door's stream guarantees: a reply never spliced from two attempts nor short of
//! the stored one, a waiting request ended by the API's shutdown, and the retry advice given
//! to OpenAI's SDKs for ended jobs.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::chat_completions::{chat, joined, sse_chunks, sse_data, user};
use crate::support::*;

const T: Duration = Duration::from_secs(20);

/// Publishes `ev` into a job's stream as a worker would.
async fn publish(app: &TestApp, ev: switchyard_core::Event) {
    let r = app.bus().await.publish(&ev).await.unwrap();
    assert_eq!(r, switchyard_queue::events::Published::Ok, "{ev:?}");
}

/// A streamed request with no worker: the test plays the worker. Returns the response and the
/// job id once the job's `queued` event is in its stream.
async fn streamed_without_worker(app: &TestApp) -> (reqwest::Response, Uuid) {
    let r = chat(
        app,
        json!({"model": "mock-echo", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let id: Uuid = r.headers()["x-switchyard-job-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bus = app.bus().await;
    let t = std::time::Instant::now();
    while bus.read(id, 0, 10).await.unwrap().events.is_empty() {
        assert!(t.elapsed() < T, "no queued event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (r, id)
}

/// The first job matching `predicate` (SQL over `jobs`), once there is one.
async fn job_where(app: &TestApp, predicate: &str) -> Uuid {
    let t = std::time::Instant::now();
    loop {
        let found: Option<Uuid> =
            sqlx::query_scalar(&format!("SELECT id FROM jobs WHERE {predicate} LIMIT 1"))
                .fetch_optional(app.store.pool())
                .await
                .unwrap();
        if let Some(id) = found {
            return id;
        }
        assert!(t.elapsed() < T, "no job with {predicate}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delta(id: Uuid, seq: u64, attempt: i32, text: &str) -> switchyard_core::Event {
    switchyard_core::Event::new(id, seq, attempt, "output.delta", json!({ "text": text }))
}

fn succeeded(id: Uuid, seq: u64, attempt: i32, output: Value) -> switchyard_core::Event {
    switchyard_core::Event::terminal(
        id,
        seq,
        attempt,
        switchyard_core::JobStatus::Succeeded,
        Some(&output),
        None,
    )
}

/// Output of a second attempt after the first one's (its announcement lost) ends the stream
/// with an error instead of splicing the two replies; the relay also holds what it streamed
/// against the stored reply and sends what the stream missed.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_streamed_reply_is_never_spliced_and_never_short(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let reply = |text: &str| json!({"text": text, "finish_reason": "stop", "usage": {}});

    let (r, id) = streamed_without_worker(&app).await;
    publish(&app, delta(id, 2, 1, "Hello")).await;
    publish(&app, delta(id, 3, 2, "Hi")).await;
    publish(&app, succeeded(id, 4, 2, reply("Hi"))).await;
    let data = sse_data(r).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "provider_stream_error", "{data:?}");
    assert!(!data.iter().any(|d| d.contains("\"Hi\"")), "{data:?}");

    // deltas lost on the way (or a provider that does not stream): the rest comes at the end
    let (r, id) = streamed_without_worker(&app).await;
    publish(&app, delta(id, 2, 1, "a")).await;
    publish(&app, succeeded(id, 3, 1, reply("abc"))).await;
    let chunks = sse_chunks(r).await;
    assert_eq!(joined(&chunks, "content"), "abc", "{chunks:?}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // a stored reply that does not start with what was streamed is an error, not a mix
    let (r, id) = streamed_without_worker(&app).await;
    publish(&app, delta(id, 2, 1, "xyz")).await;
    publish(&app, succeeded(id, 3, 1, reply("abc"))).await;
    let data = sse_data(r).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "provider_stream_error", "{data:?}");
    app.stop().await;
}

/// A non-streamed request waiting for its job when the API shuts down answers 503 (and its
/// job is cancelled) instead of holding the shutdown until the job ends, if ever.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_waiting_request_ends_when_the_api_shuts_down(pool: PgPool) {
    let app = spawn_app(pool).await;
    let req = app
        .auth(app.http.post(app.url("/v1/chat/completions")))
        .json(&json!({"model": "mock-stall", "messages": user("wait")}))
        .send();
    let pending = tokio::spawn(req);
    let id = job_where(&app, "status = 'running'").await;
    app.shut_down_api();
    let r = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the request ends with the shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    let t = std::time::Instant::now();
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        if status == "cancelled" {
            break;
        }
        assert!(t.elapsed() < T, "the job was not cancelled: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// Answers for a job that ended tell OpenAI's SDKs not to run it again as a new job (they
/// retry 409 and 5xx by default; which codes may be retried: `openai::error`'s unit tests).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn ended_jobs_tell_sdks_not_to_run_them_again(pool: PgPool) {
    let app = spawn_app(pool).await;
    let r = chat(
        &app,
        json!({"model": "mock-error-400", "messages": user("x")}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap()),
        Some("false")
    );
    // errors of the request itself carry no such advice
    let r = chat(&app, json!({"model": "gpt-nope", "messages": user("x")})).await;
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("x-should-retry").is_none());
    app.stop().await;
}

/// After part of a reply went out, a requeue of the job (its attempt failed and waits out a
/// backoff) ends the stream with an error at once: the client was held through the backoff,
/// and the next attempt's provider call started, before the stream gave up. And the end of
/// another attempt than the one whose output went out is not spliced onto it (tool calls
/// streamed by attempt 1, the stored reply's calls from attempt 2).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_requeue_or_another_attempts_end_after_output_ends_the_stream(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let (r, id) = streamed_without_worker(&app).await;
    publish(&app, delta(id, 2, 1, "Hel")).await;
    let retry_at = chrono::Utc::now() + chrono::Duration::seconds(300);
    let requeued = switchyard_core::Event::status(
        id,
        3,
        1,
        switchyard_core::JobStatus::Queued,
        json!({"retry_at": retry_at, "error": {"code": "provider_error", "message": "502", "retryable": true}}),
    );
    publish(&app, requeued).await;
    let data = tokio::time::timeout(Duration::from_secs(60), sse_data(r))
        .await
        .expect("the stream ends without waiting out the backoff");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "provider_stream_error", "{data:?}");

    let (r, id) = streamed_without_worker(&app).await;
    let call = |id: &str, index: u64| {
        json!({"index": index, "id": id, "type": "function",
            "function": {"name": "f", "arguments": "{}"}})
    };
    let first = switchyard_core::Event::new(id, 2, 1, "output.tool_call", call("call_A", 0));
    publish(&app, first).await;
    let out = json!({"text": "", "finish_reason": "tool_calls", "usage": {},
        "tool_calls": [call("call_B", 0), call("call_C", 1)]});
    publish(&app, succeeded(id, 3, 2, out)).await;
    let data = sse_data(r).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "provider_stream_error", "{data:?}");
    assert!(!data.iter().any(|d| d.contains("call_C")), "{data:?}");
    app.stop().await;
}

/// A request admitted just before its tenant's daily quota ran out, whose job the worker then
/// puts off to the next day: the request gets the 429 it would have got a moment later, and
/// the job is cancelled (the request waited until 00:00 UTC, or until the client gave up).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_request_whose_quota_runs_out_before_it_runs_gets_429(pool: PgPool) {
    let mut app = spawn_without_worker(pool).await;
    let limits = switchyard_core::quota::QuotaLimits {
        llm_tokens_per_day: Some(10),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    let (http, url, key) = (
        app.http.clone(),
        app.url("/v1/chat/completions"),
        app.key.clone(),
    );
    let pending = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(key)
            .json(&json!({"model": "mock-echo", "messages": user("hello")}))
            .send()
            .await
            .unwrap()
    });
    // admitted and queued; then the day's tokens go
    let id = job_where(&app, "status = 'queued'").await;
    let (day, _) = switchyard_core::quota::utc_day(chrono::Utc::now());
    let quotas = switchyard_queue::Quotas::new(app.keys(), app.redis().await);
    quotas.charge(app.tenant, &day, 10, 0).await.unwrap();
    app.start_worker().await;
    let r = tokio::time::timeout(T, pending)
        .await
        .expect("answered, not held until midnight")
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    app.wait_status(id, "cancelled", T).await;
    app.stop().await;
}

/// A front-door request outlives neither its key nor its token, as a WebSocket or an SSE
/// stream does not: revoking the key mid-reply ends the stream with `invalid_api_key` (and
/// a waiting non-streamed request with a 401), and the job is cancelled.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_front_door_request_ends_when_its_key_is_revoked(pool: PgPool) {
    let app = spawn_app(pool).await;
    for stream in [true, false] {
        let (key_id, key) = app.developer_key("front door").await;
        let req = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "mock-stall", "messages": user("wait"), "stream": stream}))
            .send();
        let pending = tokio::spawn(req);
        // the job runs (and, streamed, its first token went out) before the key goes
        // (a streamed request's job has no `stream` field; a waiting one's is false)
        let id = job_where(
            &app,
            &format!("status = 'running' AND (input ? 'stream') <> {stream}"),
        )
        .await;
        let t = std::time::Instant::now();
        if stream {
            let bus = app.bus().await;
            while !bus
                .read(id, 0, 100)
                .await
                .unwrap()
                .events
                .iter()
                .any(|e| e.kind == "output.delta")
            {
                assert!(t.elapsed() < T, "no token");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        app.revoke_key(key_id).await;
        let r = tokio::time::timeout(T, pending)
            .await
            .expect("the request ends with its key")
            .unwrap()
            .unwrap();
        if stream {
            assert_eq!(r.status(), 200);
            let data = tokio::time::timeout(T, sse_data(r))
                .await
                .expect("the stream ends with its key");
            let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
            assert_eq!(last["error"]["code"], "invalid_api_key", "{data:?}");
        } else {
            assert_eq!(r.status(), 401);
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
        }
        app.wait_status(id, "cancelled", T).await;
    }
    app.stop().await;
}

/// A front-door request let in with `?token=` (where headers are impossible) keeps that
/// credential while its reply comes: a reply slower than the credential's re-check arrives.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_front_door_request_with_a_query_token_gets_its_slow_reply(pool: PgPool) {
    let app = spawn_app(pool).await;
    // ~60 tokens 50 ms apart: about 3 s, past the 2 s re-check
    let words = vec!["slow"; 60].join(" ");
    for stream in [false, true] {
        let r = app
            .http
            .post(app.url(&format!("/v1/chat/completions?token={}", app.key)))
            .json(&json!({"model": "mock-slow", "messages": user(&words), "stream": stream}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if stream {
            let data = tokio::time::timeout(T, sse_data(r)).await.unwrap();
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
        } else {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        }
    }
    app.stop().await;
}
