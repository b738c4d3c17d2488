//! `GET /v1/models` and `GET /v1/models/{id}`: OpenAI's list shape, our extra fields, 404s and
//! 401s in OpenAI's error shape, and no provider URL or key in any answer.

use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::config::{Config, LlmConfig};
use switchyard_store::Store;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{redis_url, spawn_api_only};

const ENTRY_KEYS: [&str; 9] = [
    "id",
    "object",
    "created",
    "owned_by",
    "context_window",
    "max_output_tokens",
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "fallbacks",
];

async fn get(http: &reqwest::Client, url: String, key: Option<&str>) -> (u16, Value) {
    let mut rb = http.get(url);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn assert_entry_shape(e: &Value) {
    let obj = e.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expect = ENTRY_KEYS.to_vec();
    expect.sort_unstable();
    assert_eq!(keys, expect, "{e}");
    assert_eq!(e["object"], "model");
    assert_eq!(e["created"], 0);
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn lists_the_mock_aliases_in_openai_shape(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let (s, body) = get(&app.http, app.url("/v1/models"), Some(&app.key)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["mock-claude", "mock-echo"]);
    for e in data {
        assert_entry_shape(e);
    }
    assert_eq!(
        data[1],
        json!({
            "id": "mock-echo", "object": "model", "created": 0, "owned_by": "mock",
            "context_window": 8192, "max_output_tokens": 1024,
            "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0, "fallbacks": [],
        })
    );
    assert_eq!(data[0]["owned_by"], "mock-anthropic");
    // the mock's URL is configured, but never shown
    let text = body.to_string();
    assert!(
        !text.contains(&app.mock_url) && !text.contains("base_url"),
        "{text}"
    );

    let (s, one) = get(&app.http, app.url("/v1/models/mock-echo"), Some(&app.key)).await;
    assert_eq!(s, 200);
    assert_eq!(one, data[1]);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn unknown_models_are_404_and_auth_is_required(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    for path in [
        "/v1/models/gpt-nope",
        "/v1/models/mock-other",
        "/v1/models/a/b",
    ] {
        let (s, body) = get(&app.http, app.url(path), Some(&app.key)).await;
        assert_eq!(s, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "model_not_found", "{path}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{path}");
    }
    for path in ["/v1/models", "/v1/models/mock-echo", "/v1/models/gpt-nope"] {
        let (s, body) = get(&app.http, app.url(path), None).await;
        assert_eq!(s, 401, "{path}");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (s, _) = get(&app.http, app.url(path), Some("sy_nope")).await;
        assert_eq!(s, 401, "{path}");
    }
    app.stop().await;
}

/// An API with its own `llm` section (configured providers, prices, fallbacks, secrets).
async fn api_with_llm(pool: PgPool, llm: LlmConfig) -> (String, String, CancellationToken) {
    let prefix = format!("t{}", Uuid::new_v4().simple());
    let mut cfg = Config::for_tests("postgres://unused", &redis_url(), &prefix);
    cfg.llm = llm;
    let store = Store::from_pool(pool);
    let tenant = store.create_tenant("acme").await.unwrap();
    let (_, key) = store.create_api_key(tenant.id, "test", None).await.unwrap();
    let stop = CancellationToken::new();
    let state = switchyard_api::AppState::build(&cfg, store, stop.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(switchyard_api::serve(listener, state));
    (base, key, stop)
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn configured_table_shows_prices_and_fallbacks_but_no_secrets(pool: PgPool) {
    let mut llm = Config::for_tests("postgres://unused", "redis://unused", "x").llm;
    llm.mock_base_url = None;
    llm.openai_api_key = None;
    llm.providers.insert(
        "corp".into(),
        serde_json::from_value(json!({
            "kind": "openai_compatible",
            "base_url": "https://llm.corp.example/v1",
            "api_key": "sk-very-secret",
            "headers": {"x-corp-token": "hdr-secret"},
        }))
        .unwrap(),
    );
    llm.models.insert(
        "fast".into(),
        serde_json::from_value(json!({
            "provider": "corp", "model": "upstream-fast-001",
            "context_window": 128000, "max_output_tokens": 4096,
            "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6,
            "fallbacks": ["team/slow"],
        }))
        .unwrap(),
    );
    llm.models.insert(
        "team/slow".into(),
        serde_json::from_value(json!({"provider": "corp", "input_usd_per_mtok": 2.5})).unwrap(),
    );
    // names a provider that is not configured: not listed
    llm.models.insert(
        "orphan".into(),
        serde_json::from_value(json!({"provider": "nowhere"})).unwrap(),
    );
    let (base, key, stop) = api_with_llm(pool, llm).await;
    let http = reqwest::Client::new();

    let (s, body) = get(&http, format!("{base}/v1/models"), Some(&key)).await;
    assert_eq!(s, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fast", "team/slow"]);
    for e in data {
        assert_entry_shape(e);
    }
    assert_eq!(
        data[0],
        json!({
            "id": "fast", "object": "model", "created": 0, "owned_by": "corp",
            "context_window": 128000, "max_output_tokens": 4096,
            "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6,
            "fallbacks": ["team/slow"],
        })
    );
    let text = body.to_string();
    for secret in [
        "llm.corp.example",
        "sk-very-secret",
        "hdr-secret",
        "upstream-fast-001",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }

    // aliases with a slash are addressable
    let (s, one) = get(&http, format!("{base}/v1/models/team/slow"), Some(&key)).await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one, data[1]);
    assert_eq!(one["input_usd_per_mtok"], 2.5);
    let (s, _) = get(&http, format!("{base}/v1/models/orphan"), Some(&key)).await;
    assert_eq!(s, 404);
    // without the mock configured, its aliases are unknown
    let (s, _) = get(&http, format!("{base}/v1/models/mock-echo"), Some(&key)).await;
    assert_eq!(s, 404);
    stop.cancel();
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_tenant_sees_and_uses_only_its_models(pool: PgPool) {
    let app = crate::support::spawn_app(pool).await;
    let t = app.store.create_tenant("limited").await.unwrap();
    assert!(app
        .store
        .set_tenant_models(
            "limited",
            Some(&["mock-echo".to_string(), "mock-tool*".to_string()])
        )
        .await
        .unwrap());
    let (_, key) = app.store.create_api_key(t.id, "k", None).await.unwrap();
    let (s, list) = get(&app.http, app.url("/v1/models"), Some(&key)).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["mock-echo"],
        "mock-claude is configured but not enabled for this tenant"
    );
    let (s, _) = get(&app.http, app.url("/v1/models/mock-claude"), Some(&key)).await;
    assert_eq!(s, 404);
    // the unrestricted tenant still sees both
    let (_, all) = get(&app.http, app.url("/v1/models"), Some(&app.key)).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 2);

    let job = |model: &str| json!({"kind": "llm.chat", "input": {"model": model, "messages": [{"role": "user", "content": "x"}]}});
    let submit = |body: Value| {
        let (http, url, key) = (app.http.clone(), app.url("/v1/jobs"), key.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(submit(job("mock-echo")).await.0, 202);
    assert_eq!(
        submit(job("mock-tool-x")).await.0,
        202,
        "prefix entries match"
    );
    let (s, v) = submit(job("mock-claude")).await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (422, Some("input.model")),
        "{v}"
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not enabled"));
    // the front door answers like OpenAI for a model the key cannot use
    let r = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "mock-claude", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    app.stop().await;
}

/// A dead job is retried only on a model its tenant may still use: narrowing the tenant's
/// models (a plan downgrade) is not undone by retrying its old jobs.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_retry_is_held_to_the_tenants_models(pool: PgPool) {
    let app = crate::support::spawn_app(pool).await;
    let t = app.store.create_tenant("narrowed").await.unwrap();
    let (_, key) = app.store.create_api_key(t.id, "k", None).await.unwrap();
    let r = app
        .http
        .post(app.url("/v1/jobs"))
        .bearer_auth(&key)
        .json(
            &json!({"kind": "llm.chat", "input": {"model": "mock-error-400",
            "messages": [{"role": "user", "content": "x"}]}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id: uuid::Uuid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let t0 = std::time::Instant::now();
    while app
        .store
        .get_job_unscoped(id)
        .await
        .unwrap()
        .unwrap()
        .status
        != "failed"
    {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(app
        .store
        .set_tenant_models("narrowed", Some(&["mock-echo".to_string()]))
        .await
        .unwrap());
    // a key looked up after the change (a cached one sees it within seconds)
    let (_, key2) = app.store.create_api_key(t.id, "k2", None).await.unwrap();
    let r = app
        .http
        .post(app.url(&format!("/v1/jobs/{id}/retry")))
        .bearer_auth(&key2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "input.model", "{body}");
    app.stop().await;
}
