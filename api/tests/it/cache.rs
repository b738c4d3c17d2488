//! The exact-match LLM response cache: a hit completes at once without a provider call and
//! replays the stored stream as events; it is scoped per tenant, opt-in per request or per
//! tenant, counted in `/metrics`, and identical concurrent requests share one provider call.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

fn chat(model: &str, cache: Option<bool>) -> Value {
    let mut input =
        json!({"model": model, "messages": [{"role": "user", "content": "cache me if you can"}]});
    if let Some(c) = cache {
        input["cache"] = json!(c);
    }
    json!({"kind": "llm.chat", "input": input})
}

async fn calls(app: &TestApp, model: &str) -> u64 {
    let base = app.mock_url.trim_end_matches("/v1");
    let v: Value = reqwest::get(format!("{base}/mock/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["models"][model]["calls"].as_u64().unwrap_or(0)
}

async fn run(app: &TestApp, body: Value) -> Value {
    let job = app.submit(body).await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "succeeded", T).await
}

async fn streamed_text(app: &TestApp, id: Uuid) -> String {
    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    ws.until_terminal(id, T)
        .await
        .iter()
        .filter(|e| e["type"] == "output.delta")
        .map(|e| e["data"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// Submits as another tenant and returns the succeeded job's output.
async fn run_as(app: &TestApp, key: &str, tenant: Uuid, body: Value) -> Value {
    let r = app
        .http
        .post(app.url("/v1/jobs"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let id: Uuid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let row = app.store.get_job(tenant, id).await.unwrap().unwrap();
        if row.status == "succeeded" {
            return row.output.unwrap();
        }
        assert!(t0.elapsed() < T, "job {id} still {}", row.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(app: &TestApp, result: &str) -> u64 {
    let text = app.metrics_text().await;
    let needle = format!("switchyard_llm_cache_lookups{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn hits_replay_the_stream_without_a_provider_call(pool: PgPool) {
    let app = spawn_app(pool).await;
    let model = format!("mock-cache-{}", Uuid::now_v7().simple());
    let first = run(&app, chat(&model, Some(true))).await;
    assert_eq!(first["output"]["cached"], false);
    assert_eq!(calls(&app, &model).await, 1);

    let second = run(&app, chat(&model, Some(true))).await;
    let out = &second["output"];
    assert_eq!(out["cached"], true);
    assert_eq!(out["cost_usd"], 0.0);
    assert_eq!(out["provider_calls"], 0);
    assert_eq!(out["text"], first["output"]["text"]);
    assert_eq!(out["usage"], first["output"]["usage"]);
    assert_eq!(calls(&app, &model).await, 1, "served from the cache");
    let id: Uuid = second["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        streamed_text(&app, id).await,
        first["output"]["text"].as_str().unwrap(),
        "the stored stream is replayed as deltas"
    );
    assert_eq!(metric(&app, "hits").await, 1);
    assert_eq!(metric(&app, "misses").await, 1);

    // not opted in: no cache
    let plain = run(&app, chat(&model, None)).await;
    assert_eq!(plain["output"]["cached"], false);
    assert_eq!(calls(&app, &model).await, 2);
    // a different request is a different entry
    let mut other = chat(&model, Some(true));
    other["input"]["max_tokens"] = json!(3);
    assert_eq!(run(&app, other).await["output"]["cached"], false);
    assert_eq!(calls(&app, &model).await, 3);

    // another tenant never sees this tenant's entries
    let t2 = app.store.create_tenant("other").await.unwrap();
    let (_, key2) = app.store.create_api_key(t2.id, "k", None).await.unwrap();
    let out = run_as(&app, &key2, t2.id, chat(&model, Some(true))).await;
    assert_eq!(out["cached"], false);
    assert_eq!(calls(&app, &model).await, 4);

    // a tenant that opts in caches requests that do not say otherwise (a new key: the API
    // keeps an authenticated principal for 5 s)
    assert!(app.store.set_tenant_llm_cache("other", true).await.unwrap());
    let (_, key3) = app.store.create_api_key(t2.id, "k3", None).await.unwrap();
    assert_eq!(
        run_as(&app, &key3, t2.id, chat(&model, None)).await["cached"],
        true
    );
    let out = run_as(&app, &key3, t2.id, chat(&model, Some(false))).await;
    assert_eq!(out["cached"], false, "a request can opt out");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn identical_concurrent_requests_share_one_provider_call(pool: PgPool) {
    let app = spawn_app(pool).await;
    // mock-slow: 200 ms to the first token, so the requests overlap
    let body = chat("mock-slow", Some(true));
    let jobs = futures::future::join_all((0..6).map(|_| app.submit(body.clone()))).await;
    let mut cached = 0;
    for j in &jobs {
        let id: Uuid = j["id"].as_str().unwrap().parse().unwrap();
        let done = app.wait_status(id, "succeeded", T).await;
        cached += done["output"]["cached"].as_bool().unwrap() as u32;
    }
    assert_eq!(
        calls(&app, "mock-slow").await,
        1,
        "one provider call for six requests"
    );
    assert_eq!(cached, 5);
    assert_eq!(metric(&app, "shared").await + metric(&app, "hits").await, 5);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_front_door_opts_in_by_header_or_field(pool: PgPool) {
    let app = spawn_app(pool).await;
    let model = format!("mock-fd-{}", Uuid::now_v7().simple());
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let post = |cache_header: bool, body: Value| {
        let app = &app;
        async move {
            let mut rb = app
                .auth(app.http.post(app.url("/v1/chat/completions")))
                .json(&body);
            if cache_header {
                rb = rb.header("x-switchyard-cache", "true");
            }
            rb.send().await.unwrap().json::<Value>().await.unwrap()
        }
    };
    assert_eq!(
        post(true, body.clone()).await["switchyard"]["cached"],
        false
    );
    // (the header in any case)
    let r = app
        .auth(app.http.post(app.url("/v1/chat/completions")))
        .header("x-switchyard-cache", "True")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(r["switchyard"]["cached"], true);
    let mut with_field = body.clone();
    with_field["cache"] = json!(true);
    assert_eq!(post(false, with_field).await["switchyard"]["cached"], true);
    assert_eq!(post(false, body).await["switchyard"]["cached"], false);
    assert_eq!(calls(&app, &model).await, 2);
    app.stop().await;
}

/// A reply a fallback model gave (the requested model failed) is not cached under the
/// requested model: the next identical request asks the requested model again instead of
/// getting the fallback's answer for the cache's TTL.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_fallbacks_reply_is_not_cached_for_the_requested_model(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            configure: Some(std::sync::Arc::new(|cfg| {
                cfg.llm.models.insert(
                    "flaky".into(),
                    serde_json::from_value(json!({"provider": "mock", "model": "mock-error-500",
                        "fallbacks": ["mock-echo"]}))
                    .unwrap(),
                );
            })),
            ..Opts::default()
        },
    )
    .await;
    for _ in 0..2 {
        let done = run(&app, chat("flaky", Some(true))).await;
        assert_eq!(done["output"]["model"], "mock-echo", "{done}");
        assert_eq!(done["output"]["cached"], false, "{done}");
    }
    assert_eq!(calls(&app, "mock-echo").await, 2);
    app.stop().await;
}

/// Identical requests wait for the leader's call as long as it runs, also past the global call
/// timeout when the model has a longer one of its own (they gave up after the global timeout
/// and each called the provider).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn identical_requests_wait_for_a_call_longer_than_the_global_timeout(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            configure: Some(std::sync::Arc::new(|cfg| {
                cfg.llm.call_timeout_s = 1;
                cfg.llm.models.insert(
                    "patient".into(),
                    serde_json::from_value(json!({"provider": "mock", "model": "mock-slow",
                        "call_timeout_s": 60}))
                    .unwrap(),
                );
            })),
            ..Opts::default()
        },
    )
    .await;
    // ~45 tokens at 50 ms each: a call of more than 2 s
    let words = vec!["word"; 40].join(" ");
    let body = json!({"kind": "llm.chat", "input": {"model": "patient", "cache": true,
        "messages": [{"role": "user", "content": words}]}});
    let jobs = futures::future::join_all((0..3).map(|_| app.submit(body.clone()))).await;
    for j in &jobs {
        let id: Uuid = j["id"].as_str().unwrap().parse().unwrap();
        app.wait_status(id, "succeeded", Duration::from_secs(60))
            .await;
    }
    assert_eq!(calls(&app, "mock-slow").await, 1, "one provider call");
    app.stop().await;
}

/// A leader whose call left no entry (it failed, or a fallback answered) marks the lock: the
/// requests waiting for it call the provider themselves at once, instead of taking the lock
/// one after another and each running the whole model chain again.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn waiters_call_at_once_when_the_leader_stored_nothing(pool: PgPool) {
    use switchyard_worker::llm::cache::{Lookup, ResponseCache};
    let app = spawn_api_only(pool).await;
    let cache = ResponseCache::new(
        app.redis().await,
        app.keys(),
        std::time::Duration::from_secs(60),
    );
    let (leader, waiter) = (Uuid::now_v7(), Uuid::now_v7());
    let wait = std::time::Duration::from_secs(30);
    assert!(matches!(
        cache.lookup(app.tenant, "fp", leader, wait).await,
        Lookup::Lead
    ));
    cache.unserved(app.tenant, "fp", leader).await;
    let t = std::time::Instant::now();
    assert!(matches!(
        cache.lookup(app.tenant, "fp", waiter, wait).await,
        Lookup::Bypass
    ));
    assert!(t.elapsed() < wait, "the waiter did not wait out the leader");
    app.stop().await;
}

/// A leading call that is cancelled marks its lock unserved at once: the requests waiting for
/// it call the provider themselves instead of waiting out the lock's lifetime.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_cancelled_leader_lets_its_waiters_go(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut body = chat("mock-slow", Some(true));
    let words = vec!["slow"; 200].join(" ");
    body["input"]["messages"] = json!([{"role": "user", "content": words}]);
    let leader = app.submit(body).await;
    let id: Uuid = leader["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "running", T).await;
    let mut redis = app.redis().await;
    let pattern = format!("*{}*:lock", app.tenant);
    let t = std::time::Instant::now();
    let lock = loop {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut redis)
            .await
            .unwrap();
        if let Some(k) = found.into_iter().next() {
            break k;
        }
        assert!(t.elapsed() < T, "the leader took no lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.wait_status(id, "cancelled", T).await;
    let t = std::time::Instant::now();
    loop {
        let holder: Option<String> = redis::cmd("GET")
            .arg(&lock)
            .query_async(&mut redis)
            .await
            .unwrap();
        if holder.as_deref() == Some("!unserved") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the lock still holds the cancelled leader: {holder:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}
