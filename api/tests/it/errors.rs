//! Authentication and every client-error code of the table.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::support::{spawn_api_only, spawn_app_with, Opts};

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error bodies are JSON");
    (status, body["error"].clone())
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn missing_bad_and_revoked_keys_are_401(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let url = app.url("/v1/jobs");
    let (s, e) = error_of(app.http.get(&url).send().await.unwrap()).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthorized")));
    let (s, e) = error_of(
        app.http
            .get(&url)
            .bearer_auth("sy_nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthorized")));
    let (s, _) = error_of(
        app.http
            .get(&url)
            .header("authorization", "Basic abc")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    // a well-formed key nobody issued
    let fake = switchyard_core::apikey::generate().full;
    let (s, _) = error_of(app.http.get(&url).bearer_auth(&fake).send().await.unwrap()).await;
    assert_eq!(s, 401);
    // a revoked key
    let (rec, key) = app
        .store
        .create_api_key(app.tenant, "temp", None)
        .await
        .unwrap();
    assert_eq!(app.store.revoke_api_key(&rec.prefix).await.unwrap(), 1);
    let (s, _) = error_of(app.http.get(&url).bearer_auth(&key).send().await.unwrap()).await;
    assert_eq!(s, 401);
    // ?token= works where headers cannot be set
    let r = app
        .http
        .get(format!("{url}?token={}", app.key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn validation_errors_name_the_field(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let post = |body: String| {
        app.auth(app.http.post(app.url("/v1/jobs")))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (s, e) = error_of(post("{not json".into()).await.unwrap()).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("malformed_json")));

    let cases = [
        (json!({"kind": "nope", "input": {}}), "unknown_kind", "kind"),
        (json!({"input": {}}), "invalid_input", "kind"),
        (
            json!({"kind": "system.noop", "input": {}, "extra": 1}),
            "unknown_field",
            "extra",
        ),
        (
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "robot", "content": "x"}]}}),
            "invalid_input",
            "input.messages[0].role",
        ),
        (
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": "x", "name": "n"}]}}),
            "unknown_field",
            "input.messages[0].name",
        ),
        (
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": []}}),
            "invalid_input",
            "input.messages",
        ),
        (
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}}),
            "invalid_input",
            "input.max_tokens",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "max_attempts": 0}),
            "invalid_input",
            "max_attempts",
        ),
        (
            json!({"kind": "system.noop", "input": {}, "timeout_s": -1}),
            "invalid_input",
            "timeout_s",
        ),
        (
            json!({"kind": "system.noop", "input": []}),
            "invalid_input",
            "input",
        ),
        (json!([1, 2]), "invalid_input", "body"),
    ];
    for (body, code, field) in cases {
        let (s, e) = error_of(post(body.to_string()).await.unwrap()).await;
        assert_eq!(s, 422, "{body}: {e}");
        assert_eq!(e["code"], code, "{body}: {e}");
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    // nothing was stored
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn size_type_route_and_method_errors(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            scheduler: false,
            max_body_bytes: 1024,
            ..Opts::default()
        },
    )
    .await;
    let big = json!({"kind": "system.noop", "input": {}, "metadata": {"x": "a".repeat(4096)}});
    let (s, e) = error_of(
        app.auth(app.http.post(app.url("/v1/jobs")))
            .json(&big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (413, Some("payload_too_large")));

    let (s, e) = error_of(
        app.auth(app.http.post(app.url("/v1/jobs")))
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    let (s, e) = error_of(
        app.auth(app.http.get(app.url("/v1/nothing")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (404, Some("not_found")));
    let (s, e) = error_of(
        app.auth(app.http.delete(app.url("/v1/jobs")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (405, Some("method_not_allowed")));
    let (s, e) = error_of(
        app.auth(app.http.get(app.url("/v1/jobs/not-a-uuid")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["field"].as_str()),
        (422, Some("invalid_parameter"), Some("id"))
    );
    for q in [
        "status=weird",
        "limit=0",
        "limit=abc",
        "cursor=%%%",
        "kind=x.y",
    ] {
        let (s, e) = error_of(
            app.auth(app.http.get(app.url(&format!("/v1/jobs?{q}"))))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (s, e["code"].as_str()),
            (422, Some("invalid_parameter")),
            "{q}"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn noop_is_off_unless_enabled(pool: PgPool) {
    let app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            scheduler: false,
            enable_noop: false,
            ..Opts::default()
        },
    )
    .await;
    let (s, e) = error_of(
        app.auth(app.http.post(app.url("/v1/jobs")))
            .json(&json!({"kind": "system.noop", "input": {}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["field"].as_str()),
        (422, Some("unknown_kind"), Some("kind"))
    );
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn other_tenants_jobs_are_404(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let id = app.submit_noop(json!({})).await;
    let other = app.store.create_tenant("other").await.unwrap();
    let (_, key) = app.store.create_api_key(other.id, "k", None).await.unwrap();
    for (method, path) in [
        ("GET", format!("/v1/jobs/{id}")),
        ("POST", format!("/v1/jobs/{id}/cancel")),
        ("GET", format!("/v1/jobs/{id}/events")),
    ] {
        let rb = if method == "GET" {
            app.http.get(app.url(&path))
        } else {
            app.http.post(app.url(&path))
        };
        let (s, e) = error_of(rb.bearer_auth(&key).send().await.unwrap()).await;
        assert_eq!(
            (s, e["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
    let list: Value = app
        .http
        .get(app.url("/v1/jobs"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    // over WebSocket too
    let mut ws = crate::support::ws_connect(&app.base, &key).await;
    ws.subscribe(id, 0).await;
    let f = ws.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(f["type"], "error");
    assert_eq!(f["error"]["code"], "not_found");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn counts_and_sizes_inside_a_body_are_limited_per_field(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let post = |path: &str, body: Value| app.auth(app.http.post(app.url(path))).json(&body).send();
    let msg = json!({"role": "user", "content": "x"});
    let many = vec![msg.clone(); switchyard_core::chat::MAX_MESSAGES + 1];
    // ASCII, so the body stays under the 1 MiB limit of non-job routes
    let long = "a".repeat(switchyard_core::chat::MAX_MESSAGE_CHARS + 1);
    let big_meta: serde_json::Map<String, Value> = (0..10)
        .map(|i| (format!("k{i}"), json!("v".repeat(2000))))
        .collect();
    let cases = [
        (
            "/v1/jobs",
            json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": many}}),
            "input.messages",
        ),
        (
            "/v1/jobs",
            json!({"kind": "llm.chat", "input": {"model": "mock-echo",
                "messages": [msg, {"role": "user", "content": long}]}}),
            "input.messages[1].content",
        ),
        (
            "/v1/jobs",
            json!({"kind": "system.noop", "input": {}, "metadata": big_meta}),
            "metadata",
        ),
        (
            "/v1/conversations",
            json!({"model": "mock-echo", "metadata": big_meta}),
            "metadata",
        ),
        (
            "/v1/conversations",
            json!({"model": "mock-echo", "system": long}),
            "system",
        ),
        // what Postgres cannot store or give back intact (found by the fuzz run)
        (
            "/v1/jobs",
            json!({"kind": "system.noop", "input": {"note": "a\u{0}b"}}),
            "input.note",
        ),
        (
            "/v1/conversations",
            json!({"model": "mock-echo", "metadata": {"k": [1, -1.7976931348623155e308]}}),
            "metadata.k[1]",
        ),
    ];
    for (path, body, field) in cases {
        let (status, e) = error_of(post(path, body).await.unwrap()).await;
        assert_eq!(status, 422, "{path} {field}: {e}");
        assert_eq!(e["field"], field, "{e}");
    }
    app.stop().await;
}
