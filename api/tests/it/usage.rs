//! `GET /v1/usage`: exact sums per model and per UTC day, the `[from, to)` window, tenant scoping,
//! parameter errors, and a real `llm.chat` run counted.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_store::Store;
use uuid::Uuid;

use crate::support::{spawn_api_only, spawn_app, TestApp};

fn ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Writes a finished job directly (as a worker would have left it).
async fn insert_job(
    store: &Store,
    tenant: Uuid,
    kind: &str,
    status: &str,
    input: Value,
    output: Value,
    finished_at: DateTime<Utc>,
) {
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, attempt, max_attempts,
                           input, output, created_at, started_at, finished_at)
         VALUES ($1, $2, 'key:test', $3, 'llm', $4, 1, 3, $5, $6, $7, $7, $7)",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(kind)
    .bind(status)
    .bind(input)
    .bind(output)
    .bind(finished_at)
    .execute(store.pool())
    .await
    .unwrap();
}

async fn chat(store: &Store, tenant: Uuid, output: Value, finished_at: &str) {
    let input = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    insert_job(
        store,
        tenant,
        "llm.chat",
        "succeeded",
        input,
        output,
        ts(finished_at),
    )
    .await;
}

fn out(model: Option<&str>, p: u64, c: u64, cost: Option<f64>) -> Value {
    let mut o = json!({
        "text": "x", "finish_reason": "stop", "requested_model": "fast", "provider": "mock",
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    });
    if let Some(m) = model {
        o["model"] = json!(m);
    }
    if let Some(c) = cost {
        o["cost_usd"] = json!(c);
    }
    o
}

async fn usage_as(app: &TestApp, key: &str, query: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(&format!("/v1/usage{query}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

async fn usage(app: &TestApp, query: &str) -> Value {
    let (s, body) = usage_as(app, &app.key, query).await;
    assert_eq!(s, 200, "{query}: {body}");
    body
}

fn sums(requests: i64, p: i64, c: i64, t: i64, cost: f64) -> Value {
    json!({"requests": requests, "failed_requests": 0, "prompt_tokens": p, "completion_tokens": c,
           "total_tokens": t, "cost_usd": cost, "charged_tokens": 0})
}

/// `s` with failed requests and charged tokens.
fn charged(mut s: Value, failed: i64, tokens: i64) -> Value {
    s["failed_requests"] = json!(failed);
    s["charged_tokens"] = json!(tokens);
    s
}

fn with(key: &str, value: &str, mut s: Value) -> Value {
    s[key] = json!(value);
    s
}

/// Tenant `acme` gets four counted jobs on 2026-11-30 and 2026-12-01 plus decoys outside the
/// window, of another kind, not succeeded, and of another tenant.
async fn seed(app: &TestApp) -> (Uuid, String) {
    let s = &app.store;
    let t = app.tenant;
    chat(
        s,
        t,
        out(Some("gpt-a"), 10, 5, Some(0.0012)),
        "2026-11-30T10:00:00Z",
    )
    .await;
    chat(
        s,
        t,
        out(Some("claude-b"), 100, 50, Some(0.25)),
        "2026-11-30T23:59:59.999Z",
    )
    .await;
    chat(
        s,
        t,
        out(Some("gpt-a"), 20, 10, Some(0.003)),
        "2026-12-01T23:59:59Z",
    )
    .await;
    // an old job: no `model`, no `cost_usd`, no `total_tokens` in its output
    let old = json!({"text": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 3}});
    insert_job(
        s,
        t,
        "llm.chat",
        "succeeded",
        json!({"model": "mock-echo", "messages": []}),
        old,
        ts("2026-12-01T00:00:00Z"),
    )
    .await;
    // decoys: at `to` (exclusive), before `from`, another kind
    chat(
        s,
        t,
        out(Some("gpt-a"), 1000, 1000, Some(1.0)),
        "2026-12-02T00:00:00Z",
    )
    .await;
    chat(
        s,
        t,
        out(Some("gpt-a"), 1000, 1000, Some(1.0)),
        "2026-11-29T23:59:59Z",
    )
    .await;
    // a failed job: a failed request under the model it asked for, its output (one it could
    // not keep) not counted, the tokens its attempts were charged counted
    let failed = out(Some("gpt-a"), 1000, 1000, Some(1.0));
    insert_job(
        s,
        t,
        "llm.chat",
        "failed",
        json!({"model": "gpt-a"}),
        failed,
        ts("2026-12-01T12:00:00Z"),
    )
    .await;
    sqlx::query("UPDATE jobs SET charged_tokens = 2500 WHERE status = 'failed'")
        .execute(s.pool())
        .await
        .unwrap();
    let noop = out(Some("gpt-a"), 1000, 1000, Some(1.0));
    insert_job(
        s,
        t,
        "system.noop",
        "succeeded",
        json!({}),
        noop,
        ts("2026-12-01T12:00:00Z"),
    )
    .await;
    // another tenant, inside the window
    let other = s.create_tenant("other").await.unwrap();
    let (_, other_key) = s.create_api_key(other.id, "k", None).await.unwrap();
    chat(
        s,
        other.id,
        out(Some("gpt-a"), 500, 500, Some(0.5)),
        "2026-12-01T12:00:00Z",
    )
    .await;
    (other.id, other_key)
}

const WINDOW: &str = "from=2026-11-30T00:00:00Z&to=2026-12-02T00:00:00Z";

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn sums_by_model_and_by_day_exactly(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let (_, other_key) = seed(&app).await;
    let total = charged(sums(4, 137, 68, 205, 0.2542), 1, 2500);

    let by_model = usage(&app, &format!("?{WINDOW}&group_by=model")).await;
    assert_eq!(
        by_model,
        json!({
            "from": "2026-11-30T00:00:00Z",
            "to": "2026-12-02T00:00:00Z",
            "group_by": "model",
            "data": [
                with("model", "claude-b", sums(1, 100, 50, 150, 0.25)),
                with("model", "gpt-a", charged(sums(2, 30, 15, 45, 0.0042), 1, 2500)),
                with("model", "mock-echo", sums(1, 7, 3, 10, 0.0)),
            ],
            "total": total,
        })
    );
    // model is the default grouping
    assert_eq!(usage(&app, &format!("?{WINDOW}")).await, by_model);

    let by_day = usage(&app, &format!("?{WINDOW}&group_by=day")).await;
    assert_eq!(
        by_day,
        json!({
            "from": "2026-11-30T00:00:00Z",
            "to": "2026-12-02T00:00:00Z",
            "group_by": "day",
            "data": [
                with("day", "2026-11-30", sums(2, 110, 55, 165, 0.2512)),
                with("day", "2026-12-01", charged(sums(2, 27, 13, 40, 0.003), 1, 2500)),
            ],
            "total": total,
        })
    );

    // offsets are accepted: this is the same window
    let shifted = usage(
        &app,
        "?from=2026-11-30T01:00:00%2B01:00&to=2026-12-01T19:00:00-05:00&group_by=day",
    )
    .await;
    assert_eq!(shifted["data"], by_day["data"]);
    assert_eq!(shifted["from"], "2026-11-30T00:00:00Z");

    // a narrower window: only 2026-12-01
    let day2 = usage(&app, "?from=2026-12-01T00:00:00Z&to=2026-12-02T00:00:00Z").await;
    assert_eq!(day2["total"], charged(sums(2, 27, 13, 40, 0.003), 1, 2500));

    // the other tenant sees only its own job
    let (s, theirs) = usage_as(&app, &other_key, &format!("?{WINDOW}")).await;
    assert_eq!(s, 200);
    assert_eq!(
        theirs["data"],
        json!([with("model", "gpt-a", sums(1, 500, 500, 1000, 0.5))])
    );
    assert_eq!(theirs["total"], sums(1, 500, 500, 1000, 0.5));

    // an empty window has no rows and a zero total
    let empty = usage(&app, "?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z").await;
    assert_eq!(empty["data"], json!([]));
    assert_eq!(empty["total"], sums(0, 0, 0, 0, 0.0));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn default_window_is_the_last_30_days(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let now = Utc::now();
    let at = |d: chrono::Duration| (now - d).to_rfc3339();
    chat(
        &app.store,
        app.tenant,
        out(Some("m"), 1, 2, Some(0.5)),
        &at(chrono::Duration::hours(1)),
    )
    .await;
    chat(
        &app.store,
        app.tenant,
        out(Some("m"), 3, 4, Some(0.25)),
        &at(chrono::Duration::days(29)),
    )
    .await;
    chat(
        &app.store,
        app.tenant,
        out(Some("m"), 100, 100, Some(1.0)),
        &at(chrono::Duration::days(31)),
    )
    .await;

    let before = Utc::now();
    let body = usage(&app, "").await;
    let after = Utc::now();
    assert_eq!(body["group_by"], "model");
    let to = ts(body["to"].as_str().unwrap());
    let from = ts(body["from"].as_str().unwrap());
    assert!(before <= to && to <= after, "to = {to}");
    assert_eq!(to - from, chrono::Duration::days(30));
    assert_eq!(
        body["data"],
        json!([with("model", "m", sums(2, 4, 6, 10, 0.75))])
    );

    // only `to` given: 30 days before it
    let body = usage(&app, "?to=2026-03-31T00:00:00Z").await;
    assert_eq!(body["from"], "2026-03-01T00:00:00Z");
    // only `from` given: until now
    let body = usage(
        &app,
        &format!(
            "?from={}",
            at(chrono::Duration::days(40)).replace('+', "%2B")
        ),
    )
    .await;
    assert_eq!(body["total"]["requests"], 3);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn bad_parameters_are_422_naming_the_field(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let cases = [
        ("?group_by=week", "group_by"),
        ("?group_by=MODEL", "group_by"),
        ("?from=yesterday", "from"),
        ("?from=2026-12-01", "from"),
        ("?to=2026-12-01T00:00:00", "to"),
        ("?to=1733011200", "to"),
        ("?from=2026-12-01T00:00:00Z&to=2026-12-01T00:00:00Z", "from"),
        ("?from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z", "from"),
    ];
    for (q, field) in cases {
        let (s, body) = usage_as(&app, &app.key, q).await;
        assert_eq!(s, 422, "{q}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{q}");
        assert_eq!(body["error"]["field"], field, "{q}");
    }
    let r = app.http.get(app.url("/v1/usage")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_real_chat_job_is_counted(pool: PgPool) {
    let app = spawn_app(pool).await;
    let job = app
        .submit(
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "max_tokens": 4,
            "messages": [{"role": "user", "content": "count me in the usage report"}]}}),
        )
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let done = app
        .wait_status(id, "succeeded", Duration::from_secs(20))
        .await;
    let o = &done["output"];
    let p = o["usage"]["prompt_tokens"].as_i64().unwrap();
    let c = o["usage"]["completion_tokens"].as_i64().unwrap();
    assert!(p > 0 && c == 4, "{o}");
    let t = o["usage"]["total_tokens"].as_i64().unwrap_or(p + c);
    let cost = o["cost_usd"].as_f64().unwrap_or(0.0);

    let body = usage(&app, "").await;
    assert_eq!(
        body["data"],
        json!([with(
            "model",
            "mock-echo",
            charged(sums(1, p, c, t, cost), 0, t)
        )]),
        "{o}"
    );
    let by_day = usage(&app, "?group_by=day").await;
    let finished = ts(done["finished_at"].as_str().unwrap())
        .format("%Y-%m-%d")
        .to_string();
    assert_eq!(by_day["data"][0]["day"], finished);
    assert_eq!(by_day["total"], body["total"]);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_turn_s_summary_call_counts_under_its_own_model(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let s = &app.store;
    // a turn of 0.05 in all: its reply (gpt-a) 0.04, the summary it wrote (cheap) 0.01
    let mut turn = out(Some("gpt-a"), 100, 20, Some(0.05));
    turn["summary"] = json!({"model": "cheap", "cost_usd": 0.01,
        "usage": {"prompt_tokens": 900, "completion_tokens": 60, "total_tokens": 960}});
    chat(s, app.tenant, turn, "2026-12-01T10:00:00Z").await;
    chat(
        s,
        app.tenant,
        out(Some("gpt-a"), 10, 5, Some(0.002)),
        "2026-12-01T11:00:00Z",
    )
    .await;
    // a summary of an older shape (no total_tokens, no cost) still counts its tokens
    let mut old = out(Some("cheap"), 1, 1, Some(0.0));
    old["summary"] =
        json!({"model": "cheap", "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
    chat(s, app.tenant, old, "2026-12-01T12:00:00Z").await;
    // a non-object `summary` (a stray string) is no summary
    let mut odd = out(Some("gpt-a"), 1, 1, Some(0.0));
    odd["summary"] = json!("text");
    chat(s, app.tenant, odd, "2026-12-01T13:00:00Z").await;

    let by_model = usage(&app, &format!("?{WINDOW}")).await;
    assert_eq!(
        by_model["data"],
        json!([
            with("model", "cheap", sums(1, 904, 65, 969, 0.01)),
            with("model", "gpt-a", sums(3, 111, 26, 137, 0.042)),
        ]),
        "{by_model}"
    );
    let total = sums(4, 1015, 91, 1106, 0.052);
    assert_eq!(by_model["total"], total);
    let by_day = usage(&app, &format!("?{WINDOW}&group_by=day")).await;
    assert_eq!(
        by_day["data"],
        json!([with("day", "2026-12-01", total.clone())])
    );
    assert_eq!(by_day["total"], total);
    app.stop().await;
}
