//! Failure scenarios and quirks chosen by model name, on both routes.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{
    anthropic_events, anthropic_text, content_deltas, names, post, post_anthropic, read_raw,
    read_sse, start,
};

fn openai_body(model: &str, stream: bool) -> Value {
    json!({ "model": model, "stream": stream, "messages": [{ "role": "user", "content": "one two three" }] })
}

fn anthropic_body(model: &str, stream: bool) -> Value {
    json!({ "model": model, "max_tokens": 100, "stream": stream, "messages": [{ "role": "user", "content": "one two three" }] })
}

/// `model status retry-after openai-type openai-code anthropic-type`, `-` for none.
const ERRORS: &[&str] = &[
    "mock-error-429       429 1 rate_limit_error      rate_limit_exceeded     rate_limit_error",
    "mock-error-429-quota 429 - insufficient_quota    insufficient_quota      rate_limit_error",
    "mock-error-400       400 - invalid_request_error -                       invalid_request_error",
    "mock-context-length  400 - invalid_request_error context_length_exceeded invalid_request_error",
    "mock-error-401       401 - invalid_request_error invalid_api_key         authentication_error",
    "mock-error-500       500 - server_error          -                       api_error",
    "mock-error-502       502 - server_error          -                       api_error",
    "mock-error-503       503 - server_error          -                       api_error",
    "mock-overloaded      529 - overloaded_error      -                       overloaded_error",
    "gpt-4o               404 - invalid_request_error model_not_found         not_found_error",
];

#[tokio::test]
async fn error_models_on_both_routes() {
    let mock = start().await;
    for case in ERRORS {
        let f: Vec<&str> = case.split_whitespace().collect();
        let opt = |s: &'static str| (s != "-").then_some(s);
        let [model, status, retry, o_type, o_code, a_type] = f[..] else {
            panic!("bad case {case}");
        };
        let (status, retry, o_code) = (
            status.parse::<u16>().expect("status"),
            opt(retry),
            opt(o_code),
        );
        for stream in [false, true] {
            let resp = post(&mock.base, openai_body(model, stream)).await;
            assert_eq!(resp.status().as_u16(), status, "openai {model}");
            let got_retry = resp
                .headers()
                .get("retry-after")
                .map(|h| h.to_str().expect("ascii").to_owned());
            assert_eq!(got_retry.as_deref(), retry, "openai {model}");
            let v: Value = resp.json().await.expect("json");
            let e = &v["error"];
            assert_eq!(e["type"], o_type, "openai {model}: {v}");
            assert_eq!(e["code"].as_str(), o_code, "openai {model}: {v}");
            assert!(
                e["param"].is_null() && e["message"].is_string(),
                "openai {model}: {v}"
            );

            let resp = post_anthropic(&mock.base, anthropic_body(model, stream)).await;
            assert_eq!(resp.status().as_u16(), status, "anthropic {model}");
            let got_retry = resp
                .headers()
                .get("retry-after")
                .map(|h| h.to_str().expect("ascii").to_owned());
            assert_eq!(got_retry.as_deref(), retry, "anthropic {model}");
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["type"], "error", "anthropic {model}: {v}");
            assert_eq!(v["error"]["type"], a_type, "anthropic {model}: {v}");
            assert!(v["error"]["message"].is_string(), "anthropic {model}: {v}");
        }
    }
}

#[tokio::test]
async fn quota_and_context_length_messages() {
    let mock = start().await;
    let v: Value = post_anthropic(&mock.base, anthropic_body("mock-error-429-quota", false))
        .await
        .json()
        .await
        .expect("json");
    assert!(v["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("quota exhausted"));

    // 3 prompt words: N = 8192 + 3.
    let v: Value = post(&mock.base, openai_body("mock-context-length", false))
        .await
        .json()
        .await
        .expect("json");
    let msg = v["error"]["message"].as_str().expect("msg");
    assert!(
        msg.starts_with("This model's maximum context length is 8192 tokens. However, your messages resulted in 8195 tokens."),
        "{msg}"
    );
    let v: Value = post_anthropic(&mock.base, anthropic_body("mock-context-length", false))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["error"]["message"],
        "prompt is too long: 8195 tokens > 8192 maximum"
    );
}

#[tokio::test]
async fn midstream_error() {
    let mock = start().await;
    let (events, errored) =
        read_sse(post(&mock.base, openai_body("mock-midstream-error", true)).await).await;
    assert!(!errored);
    // role chunk, 2 tokens, error
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(content_deltas(&events[..3]), "Mock reply:");
    let err: Value = serde_json::from_str(&events[3]).expect("json");
    assert_eq!(err["error"]["type"], "server_error");
    assert!(err["error"]["code"].is_null() && err["error"]["message"].is_string());
    assert!(!events.iter().any(|e| e == "[DONE]"));

    let (raw, errored) =
        read_raw(post_anthropic(&mock.base, anthropic_body("mock-midstream-error", true)).await)
            .await;
    assert!(!errored);
    let events = anthropic_events(&raw);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(anthropic_text(&events), "Mock reply:");
    assert_eq!(events[5].1["error"]["type"], "overloaded_error");

    // Non-streaming: HTTP 200 carrying the error object.
    let resp = post(&mock.base, openai_body("mock-midstream-error", false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v.get("choices").is_none());
    let resp = post_anthropic(&mock.base, anthropic_body("mock-midstream-error", false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn cut_ends_cleanly_without_finish() {
    let mock = start().await;
    let (events, errored) = read_sse(post(&mock.base, openai_body("mock-cut", true)).await).await;
    assert!(!errored, "a cut body ends cleanly");
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(content_deltas(&events), "Mock reply:");
    assert!(!events
        .iter()
        .any(|e| e == "[DONE]" || e.contains("finish_reason\":\"")));

    let (raw, errored) =
        read_raw(post_anthropic(&mock.base, anthropic_body("mock-cut", true)).await).await;
    assert!(!errored);
    let events = anthropic_events(&raw);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta"
        ]
    );

    // Non-streaming: a JSON body cut in half.
    let resp = post(&mock.base, openai_body("mock-cut", false)).await;
    assert_eq!(resp.status(), 200);
    let (raw, errored) = read_raw(resp).await;
    assert!(!errored);
    assert!(
        raw.starts_with('{') && serde_json::from_str::<Value>(&raw).is_err(),
        "{raw}"
    );
}

#[tokio::test]
async fn reset_and_drop_abort_the_body() {
    let mock = start().await;
    for stream in [true, false] {
        let resp = post(&mock.base, openai_body("mock-reset", stream)).await;
        assert_eq!(resp.status(), 200);
        let (raw, errored) = read_raw(resp).await;
        assert!(errored && raw.is_empty(), "openai stream={stream}: {raw:?}");
        let resp = post_anthropic(&mock.base, anthropic_body("mock-reset", stream)).await;
        assert_eq!(resp.status(), 200);
        let (raw, errored) = read_raw(resp).await;
        assert!(
            errored && raw.is_empty(),
            "anthropic stream={stream}: {raw:?}"
        );
    }

    let (raw, errored) =
        read_raw(post_anthropic(&mock.base, anthropic_body("mock-drop", true)).await).await;
    assert!(errored);
    let events = anthropic_events(&raw);
    assert_eq!(names(&events).len(), 5);
    assert_eq!(anthropic_text(&events), "Mock reply:");

    let (raw, errored) = read_raw(post(&mock.base, openai_body("mock-drop", false)).await).await;
    assert!(errored, "non-streaming drop aborts mid-body: {raw}");
}

#[tokio::test]
async fn stall_on_the_anthropic_route() {
    let mock = start().await;
    let resp = post_anthropic(&mock.base, anthropic_body("mock-stall", true)).await;
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while !buf.contains("\"text\":\"Mock\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("first token in time")
            .expect("body open")
            .expect("chunk");
        buf.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn fail_every_and_fail_first_count_per_model() {
    let mock = start().await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        // Alternate routes: the count is per model name, across routes.
        let resp = if i % 2 == 0 {
            post(&mock.base, openai_body("mock-fail-every-3-a", false)).await
        } else {
            post_anthropic(&mock.base, anthropic_body("mock-fail-every-3-a", false)).await
        };
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 500, 200, 200, 500]);
    // Another suffix counts separately.
    assert_eq!(
        post(&mock.base, openai_body("mock-fail-every-3-b", false))
            .await
            .status(),
        200
    );

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            post(&mock.base, openai_body("mock-fail-first-2", false))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [503, 503, 200, 200]);
    let resp = post_anthropic(&mock.base, anthropic_body("mock-fail-first-1-x", true)).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "api_error");
    let resp = post_anthropic(&mock.base, anthropic_body("mock-fail-first-1-x", true)).await;
    assert_eq!(resp.status(), 200);
    let (raw, _) = read_raw(resp).await;
    assert_eq!(
        anthropic_text(&anthropic_events(&raw)),
        "Mock reply: one two three"
    );
}

fn tool_body(model: &str, stream: bool, messages: Value) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "stream_options": { "include_usage": true },
        "tools": [
            { "type": "function", "function": { "name": "lookup", "parameters": { "type": "object" } } },
            { "type": "function", "function": { "name": "other", "parameters": { "type": "object" } } }
        ],
        "messages": messages
    })
}

const QUESTION: &str = "find \"the\" answer\nplease, in ünïcode";

#[tokio::test]
async fn openai_tool_calls() {
    let mock = start().await;
    let expected_args = serde_json::to_string(&json!({ "text": QUESTION })).expect("ser");
    let msgs =
        json!([{ "role": "system", "content": "s" }, { "role": "user", "content": QUESTION }]);

    let v: Value = post(&mock.base, tool_body("mock-tool", false, msgs.clone()))
        .await
        .json()
        .await
        .expect("json");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().expect("id").starts_with("call_mock_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(call["function"]["arguments"], expected_args.as_str());
    assert!(v["usage"]["completion_tokens"].as_u64().expect("n") > 0);

    let (events, errored) =
        read_sse(post(&mock.base, tool_body("mock-tool-s", true, msgs)).await).await;
    assert!(!errored);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["index"], 0);
    assert!(first["id"].as_str().expect("id").starts_with("call_mock_"));
    assert_eq!(first["type"], "function");
    assert_eq!(first["function"]["name"], "lookup");
    assert_eq!(first["function"]["arguments"], "");
    let fragments: Vec<&str> = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert!(fragments.len() >= 2, "{fragments:?}");
    assert_eq!(fragments.concat(), expected_args);
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
    let usage = chunks.last().expect("usage chunk");
    assert!(usage["usage"]["completion_tokens"].as_u64().expect("n") > 0);

    // After a tool result: text from the last user message.
    let msgs = json!([
        { "role": "user", "content": "what is it" },
        { "role": "assistant", "content": null, "tool_calls": [call] },
        { "role": "tool", "tool_call_id": call["id"], "content": "42" }
    ]);
    let v: Value = post(&mock.base, tool_body("mock-tool", false, msgs))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Mock reply: what is it"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn variants_quirks() {
    let mock = start().await;
    let resp = post(&mock.base, openai_body("mock-variants", true)).await;
    let (raw, errored) = read_raw(resp).await;
    assert!(!errored);
    assert!(raw.contains(": keep-alive\n\n"), "{raw}");
    let payloads: Vec<&str> = raw
        .split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| e.strip_prefix("data: ").expect("data event"))
        .collect();
    assert_eq!(payloads.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("json"))
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c.get("object").is_none() && c.get("created").is_none()));
    let usage = chunks.last().expect("usage");
    assert!(usage["choices"].is_null() && usage.get("choices").is_some());
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let owned: Vec<String> = payloads.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(
        content_deltas(&owned[..owned.len() - 2]),
        "Mock reply: one two three"
    );

    // Normal on the Anthropic route.
    let (raw, _) =
        read_raw(post_anthropic(&mock.base, anthropic_body("mock-variants", true)).await).await;
    let events = anthropic_events(&raw);
    assert_eq!(names(&events).last(), Some(&"message_stop"));
    assert_eq!(anthropic_text(&events), "Mock reply: one two three");
}
