//! Quotas: a tenant's request rate holds across two API replicas (Redis), each credential's
//! rate per process (governor), daily LLM-token and sandbox quotas refuse new jobs with 429
//! `quota_exceeded` and `Retry-After`, and `GET /v1/quotas` reports limits and use.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::authz::Role;
use switchyard_core::quota::QuotaLimits;

use crate::support::{spawn_app_with, Opts, TestApp};

/// A one-message chat completion through the front door.
async fn front_door_chat(app: &TestApp) -> reqwest::Response {
    app.auth(app.http.post(app.url("/v1/chat/completions")))
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_tenant_rate_holds_across_two_api_replicas(pool: PgPool) {
    let opts = Opts {
        worker: false,
        scheduler: false,
        configure: Some(Arc::new(|cfg| {
            cfg.quotas.requests_per_minute = Some(60);
            cfg.quotas.per_credential_rps = 0;
        })),
        ..Opts::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let second = app.spawn_api_replica().await;
    let (_, key2) = app
        .store
        .create_scoped_api_key(app.tenant, "second", Role::Developer, None, None)
        .await
        .unwrap();
    // 60/min: a burst of 10 at once, then one a second; 40 requests alternate replicas and keys
    let started = std::time::Instant::now();
    let (mut ok, mut refused) = (0u64, 0u64);
    for i in 0..40 {
        let (base, key) = if i % 2 == 0 {
            (&app.base, &app.key)
        } else {
            (&second, &key2)
        };
        let r = app
            .http
            .get(format!("{base}/v1/jobs"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&r, "ratelimit-limit"), Some(60));
        assert!(header(&r, "ratelimit-remaining").is_some());
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert!(header(&r, "retry-after").is_some_and(|s| (1..=2).contains(&s)));
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited");
            }
            s => panic!("unexpected {s}"),
        }
    }
    let allowed = 10 + started.elapsed().as_secs() + 1;
    assert!(ok >= 10, "only {ok} admitted");
    assert!(ok <= allowed, "{ok} admitted, at most {allowed} allowed");
    assert_eq!(ok + refused, 40);
    // another tenant has its own allowance
    let other = app.store.create_tenant("other").await.unwrap();
    let (_, k) = app
        .store
        .create_scoped_api_key(other.id, "o", Role::Owner, None, None)
        .await
        .unwrap();
    let r = app
        .http
        .get(format!("{second}/v1/jobs"))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "ratelimit-remaining"), Some(9));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn each_credential_has_its_own_rate_per_process(pool: PgPool) {
    let opts = Opts {
        worker: false,
        scheduler: false,
        configure: Some(Arc::new(|cfg| {
            cfg.quotas.per_credential_rps = 1;
            cfg.quotas.per_credential_burst = 3;
        })),
        ..Opts::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let (_, other) = app
        .store
        .create_scoped_api_key(app.tenant, "other", Role::Viewer, None, None)
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = app
            .auth(app.http.get(app.url("/v1/jobs")))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    let r = app
        .http
        .get(app.url("/v1/jobs"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another key is not slowed down");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn daily_quotas_refuse_new_jobs_and_are_reported(pool: PgPool) {
    let app = spawn_app_with(pool, Opts::default()).await;
    let limits = QuotaLimits {
        llm_tokens_per_day: Some(5),
        sandbox_cpu_seconds_per_day: Some(1),
        concurrent_jobs: Some(3),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    let q: Value = app.get_json("/v1/quotas").await;
    assert_eq!(q["limits"]["llm_tokens_per_day"], 5, "{q}");
    assert_eq!(
        q["limits"]["requests_per_minute"],
        Value::Null,
        "unlimited: {q}"
    );
    assert_eq!(q["usage"]["llm_tokens_today"], 0);
    // a chat that fails at once (no tokens), to be retried once the quota is used up
    let dead = app
        .submit(
            json!({"kind": "llm.chat", "input": {"model": "mock-error-400",
            "messages": [{"role": "user", "content": "x"}]}}),
        )
        .await;
    let dead: uuid::Uuid = dead["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(dead, "failed", Duration::from_secs(20))
        .await;
    // one chat within the quota; its tokens are charged when it ends
    let job = app
        .submit(json!({"kind": "llm.chat", "input": {"model": "mock-echo",
            "messages": [{"role": "user", "content": "several words to count as tokens"}]}}))
        .await;
    let id = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "succeeded", Duration::from_secs(20))
        .await;
    let mut q = Value::Null;
    for _ in 0..50 {
        q = app.get_json("/v1/quotas").await;
        if q["usage"]["llm_tokens_today"].as_u64().unwrap_or(0) > 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(q["usage"]["llm_tokens_today"].as_u64().unwrap() > 5, "{q}");
    assert_eq!(q["limits"]["llm_tokens_per_day"], 5);
    assert_eq!(q["limits"]["concurrent_jobs"], 3);
    assert!(q["daily_reset_at"].is_string());
    // every way to start an LLM call is refused now, until midnight UTC
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "llm.chat", "input": {"model": "mock-echo",
            "messages": [{"role": "user", "content": "again"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry = header(&r, "retry-after").unwrap();
    assert!((1..=86_400).contains(&retry));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    // a job that is not dead stays a 409, quota or not (429 would invite a retry)
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/retry"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // a retry starts calls like a new job
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{dead}/retry"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let r = front_door_chat(&app).await;
    assert_eq!(r.status(), 429);
    // the wait until midnight, as on the native routes (not OpenAI's default second)
    let oai_retry = header(&r, "retry-after").unwrap();
    assert!(oai_retry.abs_diff(retry) <= 2, "{oai_retry} vs {retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    let conv: Value = app
        .auth(app.http.post(app.url("/v1/conversations")))
        .json(&json!({"model": "mock-echo"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = app
        .auth(app.http.post(app.url(&format!(
            "/v1/conversations/{}/messages",
            conv["id"].as_str().unwrap()
        ))))
        .json(&json!({"content": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // other kinds draw on other quotas
    app.submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    // the sandbox quota: charged by code.exec runs, refused once used up
    let keys = app.keys();
    let (day, _) = switchyard_core::quota::utc_day(chrono::Utc::now());
    switchyard_queue::Quotas::new(keys, app.redis().await)
        .charge(app.tenant, &day, 0, 1500)
        .await
        .unwrap();
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "code.exec", "input": {"language": "python", "code": "print(1)"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sandbox"));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_full_backlog_refuses_new_jobs_until_workers_catch_up(pool: PgPool) {
    let mut app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            ..Opts::default()
        },
    )
    .await;
    let limits = QuotaLimits {
        max_queued_jobs: Some(3),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    let mut ids = Vec::new();
    let keyed = || {
        app.auth(app.http.post(app.url("/v1/jobs")))
            .header("idempotency-key", "full-backlog-1")
            .json(&json!({"kind": "system.noop", "input": {}}))
            .send()
    };
    let first: Value = keyed().await.unwrap().json().await.unwrap();
    ids.push(first["id"].as_str().unwrap().parse().unwrap());
    for _ in 0..2 {
        ids.push(app.submit_noop(json!({})).await);
    }
    // a client repeating a request it got no answer to gets its job, full backlog or not
    let r = keyed().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    let refused = |body: Value, path: &'static str| {
        let r = app.auth(app.http.post(app.url(path))).json(&body).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status(), 429, "{path}");
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
        }
    };
    refused(json!({"kind": "system.noop", "input": {}}), "/v1/jobs").await;
    refused(
        json!({"jobs": [{"kind": "system.noop", "input": {}}]}),
        "/v1/jobs/batch",
    )
    .await;
    // a batch larger than the limit itself never fits: 422 on its field, not a 429 to retry
    let big = json!({"jobs": vec![json!({"kind": "system.noop", "input": {}}); 4]});
    let r = app
        .auth(app.http.post(app.url("/v1/jobs/batch")))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.headers().get("retry-after").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["field"].as_str()),
        (Some("invalid_input"), Some("jobs")),
        "{v}"
    );
    // the front door says so in OpenAI's rate-limit shape (clients retry it), with the wait
    let r = front_door_chat(&app).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some(5));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    let q = app.get_json("/v1/quotas").await;
    assert_eq!(q["usage"]["queued_jobs"], 3, "{q}");
    assert_eq!(q["limits"]["max_queued_jobs"], 3, "{q}");
    // once workers drain the backlog, submissions are accepted again
    app.start_worker().await;
    for id in ids {
        app.wait_status(id, "succeeded", Duration::from_secs(20))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.submit_noop(json!({})).await;
    app.stop().await;
}

/// A job admitted while its tenant had quota left, that comes due after the quota is used up
/// (delayed, or one of a batch admitted on one reading), does not run today: it waits, queued,
/// until 00:00 UTC, and no provider is called. (Only submissions were checked: delayed jobs ran
/// past any daily quota.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_job_due_after_the_quota_is_used_up_waits_for_the_next_day(pool: PgPool) {
    // the day must not end while the test runs (the deferred job would be due at once)
    let (_, left) = switchyard_core::quota::utc_day(chrono::Utc::now());
    if left < Duration::from_secs(60) {
        tokio::time::sleep(left + Duration::from_secs(1)).await;
    }
    let app = spawn_app_with(pool, Opts::default()).await;
    let limits = QuotaLimits {
        llm_tokens_per_day: Some(10),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    let model = format!("mock-q-{}", uuid::Uuid::now_v7().simple());
    let job = app
        .submit(
            json!({"kind": "llm.chat", "delay_s": 1, "input": {"model": model,
            "messages": [{"role": "user", "content": "later"}]}}),
        )
        .await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    // the day's tokens are used up before it comes due
    let (day, left) = switchyard_core::quota::utc_day(chrono::Utc::now());
    let midnight = chrono::Utc::now() + chrono::Duration::from_std(left).unwrap();
    let quotas = switchyard_queue::Quotas::new(app.keys(), app.redis().await);
    quotas.charge(app.tenant, &day, 10, 0).await.unwrap();
    let due = |j: &Value| {
        j["run_at"]
            .as_str()
            .and_then(|r| r.parse::<chrono::DateTime<chrono::Utc>>().ok())
    };
    let t = std::time::Instant::now();
    let j = loop {
        let j = app.get_job(id).await;
        if due(&j).is_some_and(|d| d >= midnight - chrono::Duration::seconds(5)) {
            break j;
        }
        assert!(j["status"] == "queued" || j["status"] == "running", "{j}");
        assert!(t.elapsed() < Duration::from_secs(20), "not deferred: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(j["status"], "queued", "{j}");
    assert!(
        app.mock_requests(&model).await.is_empty(),
        "no provider call"
    );
    app.stop().await;
}

/// Messages on a WebSocket are held to the tenant's request rate like any request (each
/// subscription reads Postgres and Redis): a client looping `subscribe` on one connection gets
/// `rate_limited` frames once the rate is used up (only the upgrade was counted).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_messages_count_against_the_request_rate(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            ..Opts::default()
        },
    )
    .await;
    // (bursts of a sixth of the rate: ten requests)
    let limits = QuotaLimits {
        requests_per_minute: Some(60),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    // a key looked up after the change carries it
    let (_, key) = app
        .store
        .create_scoped_api_key(app.tenant, "ws", Role::Viewer, None, None)
        .await
        .unwrap();
    let mut ws = crate::support::ws_connect(&app.base, &key).await;
    let mut codes = Vec::new();
    for _ in 0..20 {
        ws.subscribe(uuid::Uuid::now_v7(), 0).await;
        let frame = ws.next(Duration::from_secs(10)).await.expect("a frame");
        codes.push(frame["error"]["code"].as_str().unwrap_or("").to_string());
    }
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    assert!(codes.iter().any(|c| c == "not_found"), "{codes:?}");
    app.stop().await;
}

/// The per-credential rate counts an end user per tenant: a tenant minting tokens for another
/// tenant's user ids (its subjects are its own to choose) does not throttle those users.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_end_users_rate_is_counted_in_their_tenant_alone(pool: PgPool) {
    let opts = Opts {
        worker: false,
        scheduler: false,
        configure: Some(Arc::new(|cfg| {
            cfg.quotas.per_credential_rps = 1;
            cfg.quotas.per_credential_burst = 2;
        })),
        ..Opts::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let (sa, sb) = (
        switchyard_core::apikey::random_secret(48),
        switchyard_core::apikey::random_secret(48),
    );
    let (ia, ib) = ("https://a.example/", "https://b.example/");
    assert!(app
        .store
        .set_tenant_jwt("acme", Some((ia, &sa)))
        .await
        .unwrap());
    app.store.create_tenant("tenant-b").await.unwrap();
    assert!(app
        .store
        .set_tenant_jwt("tenant-b", Some((ib, &sb)))
        .await
        .unwrap());
    let a = crate::jwt::hs256(&sa, &crate::jwt::claims(ia, "alice@b.example"));
    let b = crate::jwt::hs256(&sb, &crate::jwt::claims(ib, "alice@b.example"));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(crate::jwt::status_of(&app, &a).await.0.as_u16());
    }
    assert!(seen.contains(&429), "{seen:?}");
    assert_eq!(crate::jwt::status_of(&app, &b).await.0, StatusCode::OK);
    app.stop().await;
}

/// A request refused after the backlog check (a retry of a job that is not dead) gives its
/// place in the backlog count back: the next submission is not refused for it.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_refused_retry_gives_back_its_backlog_place(pool: PgPool) {
    let app = spawn_app_with(pool, Opts::default()).await;
    let done = app.submit_noop(json!({})).await;
    app.wait_status(done, "succeeded", Duration::from_secs(20))
        .await;
    let limits = QuotaLimits {
        max_queued_jobs: Some(2),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    // one job waits (an hour); the count is read now
    app.submit(json!({"kind": "system.noop", "input": {}, "delay_s": 3600}))
        .await;
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{done}/retry"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // room for one more: the refused retry took none
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "system.noop", "input": {}, "delay_s": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    app.stop().await;
}
