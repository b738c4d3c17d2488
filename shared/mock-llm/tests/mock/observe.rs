//! Observation endpoints (`/mock/stats`, `/mock/requests`) and jitter.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_mock_llm::{MockLlmConfig, JITTER_HEADER};

use crate::common::{
    get_json, model_stats, post, post_anthropic, read_raw, read_sse, recorded, start, start_with,
    wait_for_stat,
};

fn user(model: &str, stream: bool) -> Value {
    json!({ "model": model, "stream": stream, "messages": [{ "role": "user", "content": "a b c" }] })
}

fn anthropic_user(model: &str, stream: bool) -> Value {
    json!({ "model": model, "max_tokens": 10, "stream": stream, "messages": [{ "role": "user", "content": "a b c" }] })
}

#[tokio::test]
async fn stats_count_calls_and_completions() {
    let mock = start().await;
    assert_eq!(
        get_json(&format!("{}/mock/stats", mock.base)).await,
        json!({ "models": {} })
    );
    let (_, errored) = read_sse(post(&mock.base, user("mock-echo", true)).await).await;
    assert!(!errored);
    assert_eq!(
        post(&mock.base, user("mock-echo", false)).await.status(),
        200
    );
    let (_, errored) =
        read_raw(post_anthropic(&mock.base, anthropic_user("mock-echo", true)).await).await;
    assert!(!errored);
    assert_eq!(
        post(&mock.base, user("mock-error-500", false))
            .await
            .status(),
        500
    );
    let (_, errored) = read_raw(post(&mock.base, user("mock-drop", true)).await).await;
    assert!(errored);

    let stats = get_json(&format!("{}/mock/stats", mock.base)).await;
    assert_eq!(
        stats,
        json!({ "models": {
            "mock-echo": { "calls": 3, "completed": 3, "aborted": 0 },
            "mock-error-500": { "calls": 1, "completed": 0, "aborted": 0 },
            "mock-drop": { "calls": 1, "completed": 0, "aborted": 0 },
        } })
    );
}

/// Reads from `resp` until `needle` shows up, then drops the response.
async fn read_until_then_drop(resp: reqwest::Response, needle: &str) {
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while !buf.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("data in time")
            .expect("body open")
            .expect("chunk");
        buf.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
}

#[tokio::test]
async fn client_dropping_a_slow_stream_counts_as_aborted() {
    let config = MockLlmConfig {
        slow_ttft: Duration::from_millis(50),
        slow_inter_token: Duration::from_secs(10),
        ..MockLlmConfig::default()
    };
    let mock = start_with(config).await;
    let resp = post(&mock.base, user("mock-slow", true)).await;
    read_until_then_drop(resp, "\"content\":\"Mock\"").await;
    let s = wait_for_stat(&mock.base, "mock-slow", "aborted", 1).await;
    assert_eq!(s, json!({ "calls": 1, "completed": 0, "aborted": 1 }));

    let resp = post_anthropic(&mock.base, anthropic_user("mock-stall", true)).await;
    read_until_then_drop(resp, "\"text\":\"Mock\"").await;
    let s = wait_for_stat(&mock.base, "mock-stall", "aborted", 1).await;
    assert_eq!(s["completed"], 0);
}

#[tokio::test]
async fn client_dropping_a_waiting_request_counts_as_aborted() {
    let mock = start().await;
    for model in ["mock-stall", "mock-slow"] {
        let base = mock.base.clone();
        let pending = tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{base}/v1/chat/completions"))
                .header("x-mock-ttft-ms", "60000")
                .json(&user(model, false))
                .send()
                .await
        });
        wait_for_stat(&mock.base, model, "calls", 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(model_stats(&mock.base, model).await["aborted"], 0);
        pending.abort();
        let s = wait_for_stat(&mock.base, model, "aborted", 1).await;
        assert_eq!(s["completed"], 0, "{model}");
    }
}

#[tokio::test]
async fn requests_are_recorded_with_headers_and_body() {
    let mock = start().await;
    let openai_body = json!({
        "model": "mock-rec",
        "messages": [{ "role": "system", "content": "sys" }, { "role": "user", "content": "hi" }],
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_tokens": 7
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.base))
        .bearer_auth("sk-openai")
        .header("x-request-tag", "t1")
        .header("user-agent", "not-recorded")
        .json(&openai_body)
        .send()
        .await
        .expect("send");
    read_raw(resp).await;
    let anthropic_body = json!({
        "model": "mock-rec",
        "max_tokens": 9,
        "system": "sys",
        "tools": [{ "name": "t", "description": "d", "input_schema": { "type": "object" } }],
        "messages": [{ "role": "user", "content": "hi" }]
    });
    post_anthropic(&mock.base, anthropic_body.clone()).await;
    post(&mock.base, user("mock-other", false)).await;

    let reqs = recorded(&mock.base, "mock-rec").await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0]["route"], "openai");
    assert_eq!(reqs[0]["body"], openai_body);
    let h = reqs[0]["headers"].as_object().expect("headers");
    assert_eq!(h["authorization"], "Bearer sk-openai");
    assert_eq!(h["x-request-tag"], "t1");
    assert_eq!(h["content-type"], "application/json");
    assert!(!h.contains_key("user-agent") && !h.contains_key("x-api-key"));

    assert_eq!(reqs[1]["route"], "anthropic");
    assert_eq!(reqs[1]["body"], anthropic_body);
    let h = reqs[1]["headers"].as_object().expect("headers");
    assert_eq!(h["x-api-key"], "sk-ant-test");
    assert_eq!(h["anthropic-version"], "2023-06-01");
    assert!(!h.contains_key("authorization"));

    let all = get_json(&format!("{}/mock/requests", mock.base)).await;
    assert_eq!(all["requests"].as_array().map(Vec::len), Some(3));
    assert_eq!(recorded(&mock.base, "mock-none").await, Vec::<Value>::new());
}

#[tokio::test]
async fn request_log_keeps_the_latest_200() {
    let mock = start().await;
    for i in 0..205 {
        let body = json!({ "model": "mock-echo", "messages": [{ "role": "user", "content": format!("n{i}") }] });
        assert_eq!(post(&mock.base, body).await.status(), 200);
    }
    let reqs = recorded(&mock.base, "mock-echo").await;
    assert_eq!(reqs.len(), 200);
    assert_eq!(reqs[0]["body"]["messages"][0]["content"], "n5");
    assert_eq!(reqs[199]["body"]["messages"][0]["content"], "n204");
}

#[tokio::test]
async fn jitter_header_overrides_config() {
    // A huge configured jitter would make this test hang; the header turns it off.
    let config = MockLlmConfig {
        jitter: Duration::from_secs(60),
        ..MockLlmConfig::default()
    };
    let mock = start_with(config).await;
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.base))
        .header(JITTER_HEADER, "0")
        .json(&user("mock-echo", true))
        .send()
        .await
        .expect("send");
    let (events, _) = read_sse(resp).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(crate::common::content_deltas(&events), "Mock reply: a b c");

    // A jitter of 40ms over 5 delays adds some time, but not more than 5 × 40ms.
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", mock.base))
        .header("x-api-key", "k")
        .header("anthropic-version", "2023-06-01")
        .header(JITTER_HEADER, "40")
        .json(&anthropic_user("mock-echo", true))
        .send()
        .await
        .expect("send");
    let (raw, errored) = read_raw(resp).await;
    let elapsed = started.elapsed();
    assert!(!errored && raw.contains("message_stop"));
    assert!(elapsed >= Duration::from_millis(5), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(5 * 40 + 1500),
        "{elapsed:?}"
    );
}
