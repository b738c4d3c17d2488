//! OpenAI route basics: models, plain and streamed answers, delays, the
//! original failure models, shutdown.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_mock_llm::{expected_text, spawn, MockLlmConfig, MOCK_MODELS};

use crate::common::{content_deltas, pairs, post, read_sse, sample_messages};

#[tokio::test]
async fn healthz_and_models() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    assert!(!base.ends_with('/'));
    let resp = reqwest::get(format!("{base}/healthz")).await.expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "ok");

    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, MOCK_MODELS);
    stop.cancel();
}

#[tokio::test]
async fn non_streaming_matches_expected_text() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let messages = sample_messages();
    let resp = post(
        &base,
        json!({ "model": "mock-echo", "messages": messages, "temperature": 0.2, "unknown": [1] }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(text, expected_text(&pairs(&messages), None));
    assert_eq!(text, "Mock reply: Say hello to the world");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "mock-echo");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3 + 5);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 15);
    stop.cancel();
}

#[tokio::test]
async fn non_streaming_truncation_and_ttft_header() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let messages = sample_messages();
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("x-mock-ttft-ms", "150")
        .json(&json!({ "model": "mock-1", "messages": messages, "max_completion_tokens": 3 }))
        .send()
        .await
        .expect("send");
    assert!(started.elapsed() >= Duration::from_millis(150));
    let v: Value = resp.json().await.expect("json");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_text(&pairs(&messages), Some(3))
    );
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply: Say");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    stop.cancel();
}

#[tokio::test]
async fn streaming_matches_expected_text_with_usage() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let messages = sample_messages();
    let resp = post(
        &base,
        json!({
            "model": "mock-echo",
            "messages": messages,
            "stream": true,
            "stream_options": { "include_usage": true }
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().expect("ct"),
        "text/event-stream"
    );
    let (events, errored) = read_sse(resp).await;
    assert!(!errored);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let first: Value = serde_json::from_str(&events[0]).expect("json");
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["choices"][0]["delta"]["content"], "");

    let expected = expected_text(&pairs(&messages), None);
    assert_eq!(content_deltas(&events), expected);

    // role + 7 tokens + finish + usage + [DONE]
    assert_eq!(events.len(), 1 + 7 + 1 + 1 + 1);
    let finish: Value = serde_json::from_str(&events[8]).expect("json");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage: Value = serde_json::from_str(&events[9]).expect("json");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 8);
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    assert_eq!(usage["usage"]["total_tokens"], 15);
    stop.cancel();
}

#[tokio::test]
async fn streaming_truncated_without_usage() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let messages = sample_messages();
    let resp = post(
        &base,
        json!({ "model": "mock-echo", "messages": messages, "stream": true, "max_tokens": 4 }),
    )
    .await;
    let (events, errored) = read_sse(resp).await;
    assert!(!errored);
    assert_eq!(
        content_deltas(&events),
        expected_text(&pairs(&messages), Some(4))
    );
    assert_eq!(events.len(), 1 + 4 + 1 + 1);
    let finish: Value = serde_json::from_str(&events[5]).expect("json");
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(events
        .iter()
        .all(|e| !e.contains("\"usage\":{") || e == "[DONE]"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    stop.cancel();
}

#[tokio::test]
async fn streaming_honours_delay_headers() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("x-mock-ttft-ms", "100")
        .header("x-mock-inter-token-ms", "20")
        .json(&json!({
            "model": "mock-echo",
            "messages": [{ "role": "user", "content": "a b c" }],
            "stream": true
        }))
        .send()
        .await
        .expect("send");
    let (events, _) = read_sse(resp).await;
    // ttft + 4 gaps between the 5 tokens
    assert!(started.elapsed() >= Duration::from_millis(100 + 4 * 20));
    assert_eq!(content_deltas(&events), "Mock reply: a b c");
    stop.cancel();
}

#[tokio::test]
async fn error_models() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let body =
        |model: &str| json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] });

    let resp = post(&base, body("mock-error-500")).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["code"].is_null());

    let resp = post(&base, body("mock-error-429")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    let resp = post(&base, body("mock-error-400")).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let resp = post(&base, body("gpt-4o")).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "model_not_found");

    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    stop.cancel();
}

#[tokio::test]
async fn slow_model_uses_slow_delays() {
    let config = MockLlmConfig {
        slow_ttft: Duration::from_millis(120),
        slow_inter_token: Duration::from_millis(10),
        ..MockLlmConfig::default()
    };
    let (base, stop) = spawn(config).await.expect("spawn");
    let started = Instant::now();
    let resp = post(
        &base,
        json!({ "model": "mock-slow", "messages": [{ "role": "user", "content": "x" }], "stream": true }),
    )
    .await;
    let (events, errored) = read_sse(resp).await;
    assert!(!errored);
    assert!(started.elapsed() >= Duration::from_millis(120 + 2 * 10));
    assert_eq!(content_deltas(&events), "Mock reply: x");
    stop.cancel();
}

#[tokio::test]
async fn drop_model_ends_without_done() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let resp = post(
        &base,
        json!({ "model": "mock-drop", "messages": [{ "role": "user", "content": "one two three" }], "stream": true }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (events, errored) = read_sse(resp).await;
    assert!(errored, "body should end with a transport error");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert!(!events.iter().any(|e| e.contains("finish_reason\":\"")));
    // role chunk + two tokens
    assert_eq!(events.len(), 3);
    assert_eq!(content_deltas(&events), "Mock reply:");
    stop.cancel();
}

#[tokio::test]
async fn stall_model_stalls_until_shutdown() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let resp = post(
        &base,
        json!({ "model": "mock-stall", "messages": [{ "role": "user", "content": "a b" }], "stream": true }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while !buf.contains("\"content\":\"Mock\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("first token in time")
            .expect("body open")
            .expect("chunk");
        buf.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
    // Nothing more arrives...
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.next())
            .await
            .is_err()
    );

    // ...and the non-streaming variant never answers.
    let pending = tokio::spawn({
        let base = base.clone();
        async move {
            post(
                &base,
                json!({ "model": "mock-stall", "messages": [{ "role": "user", "content": "a" }] }),
            )
            .await
            .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());

    // Shutdown ends both promptly.
    stop.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends after shutdown");
    assert!(!matches!(next, Some(Ok(ref b)) if b.windows(6).any(|w| w == b"[DONE]")));
    let status = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("non-streaming request ends after shutdown")
        .expect("join");
    assert_eq!(status, 503);
}

#[tokio::test]
async fn serve_stops_on_cancel() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let token = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(switchyard_mock_llm::serve(
        listener,
        MockLlmConfig::default(),
        token.clone(),
    ));
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns")
        .expect("join")
        .expect("serve ok");
}

#[tokio::test]
async fn a_forced_tool_choice_is_called_by_any_model_and_stop_ends_the_reply() {
    let (base, stop) = spawn(MockLlmConfig::default()).await.expect("spawn");
    let tools = json!([
        {"type": "function", "function": {"name": "first"}},
        {"type": "function", "function": {"name": "second"}}
    ]);
    let v: Value = post(
        &base,
        json!({"model": "mock-echo", "messages": [{"role": "user", "content": "a b"}],
               "tools": tools, "tool_choice": {"type": "function", "function": {"name": "second"}}}),
    )
    .await
    .json()
    .await
    .expect("json");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "second", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    // a tool that is not offered is not called; `auto` leaves mock-echo answering text
    for choice in [
        json!({"type": "function", "function": {"name": "nope"}}),
        json!("auto"),
    ] {
        let v: Value = post(
            &base,
            json!({"model": "mock-echo", "messages": [{"role": "user", "content": "a b"}],
                   "tools": tools, "tool_choice": choice}),
        )
        .await
        .json()
        .await
        .expect("json");
        assert_eq!(
            v["choices"][0]["message"]["content"], "Mock reply: a b",
            "{v}"
        );
    }
    let v: Value = post(
        &base,
        json!({"model": "mock-echo", "messages": [{"role": "user", "content": "a b c"}], "stop": ["b"]}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply: a ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    stop.cancel();
}
