//! Anthropic Messages route: plain and streamed answers, the event sequence,
//! equivalence with the OpenAI route, request validation, tools.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_mock_llm::expected_text;

use crate::common::{
    anthropic_events, anthropic_text, get_json, names, post, post_anthropic, read_raw, start,
};

/// The same conversation in both APIs' shapes.
fn conversation() -> (Value, Value) {
    let anthropic = json!({
        "model": "mock-echo",
        "max_tokens": 100,
        "system": [{ "type": "text", "text": "You are" }, { "type": "text", "text": "terse." }],
        "messages": [
            { "role": "user", "content": "first question here" },
            { "role": "assistant", "content": [{ "type": "text", "text": "an answer" }] },
            { "role": "user", "content": [
                { "type": "text", "text": "Say  hello" },
                { "type": "text", "text": "to\nthe world" }
            ] }
        ],
        "temperature": 0.5,
        "metadata": { "user_id": "u1" }
    });
    let openai = json!({
        "model": "mock-echo",
        "max_tokens": 100,
        "messages": [
            { "role": "system", "content": "You are terse." },
            { "role": "user", "content": "first question here" },
            { "role": "assistant", "content": "an answer" },
            { "role": "user", "content": "Say  hello to\nthe world" }
        ]
    });
    (anthropic, openai)
}

#[tokio::test]
async fn non_streaming_matches_the_openai_route() {
    let mock = start().await;
    let (a_body, o_body) = conversation();
    let resp = post_anthropic(&mock.base, a_body).await;
    assert_eq!(resp.status(), 200);
    let a: Value = resp.json().await.expect("json");
    let o: Value = post(&mock.base, o_body).await.json().await.expect("json");

    let text = a["content"][0]["text"].as_str().expect("text");
    assert_eq!(text, "Mock reply: Say hello to the world");
    assert_eq!(text, o["choices"][0]["message"]["content"]);
    let id = a["id"].as_str().expect("id");
    assert!(id.starts_with("msg_mock_"), "{id}");
    assert_eq!(a["type"], "message");
    assert_eq!(a["role"], "assistant");
    assert_eq!(a["model"], "mock-echo");
    assert_eq!(a["content"][0]["type"], "text");
    assert_eq!(a["content"].as_array().map(Vec::len), Some(1));
    assert_eq!(a["stop_reason"], "end_turn");
    assert!(a["stop_sequence"].is_null());
    // system 3 + 3 + 2 + 5 words
    assert_eq!(a["usage"]["input_tokens"], 13);
    assert_eq!(a["usage"]["input_tokens"], o["usage"]["prompt_tokens"]);
    assert_eq!(a["usage"]["output_tokens"], 7);
    assert_eq!(a["usage"]["output_tokens"], o["usage"]["completion_tokens"]);
}

#[tokio::test]
async fn streaming_event_sequence() {
    let mock = start().await;
    let (body, openai) = conversation();
    let mut body = body;
    body["stream"] = json!(true);
    let resp = post_anthropic(&mock.base, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (raw, errored) = read_raw(resp).await;
    assert!(!errored);
    let events = anthropic_events(&raw);
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 7]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names(&events), expected);

    let start = &events[0].1["message"];
    assert!(start["id"].as_str().expect("id").starts_with("msg_mock_"));
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["model"], "mock-echo");
    assert_eq!(start["usage"]["input_tokens"], 13);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        events[1].1,
        json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } })
    );
    assert!(events[3..10].iter().all(|(_, v)| v["index"] == 0));
    let messages = crate::common::pairs(&openai["messages"]);
    assert_eq!(anthropic_text(&events), expected_text(&messages, None));
    assert_eq!(
        events[10].1,
        json!({ "type": "content_block_stop", "index": 0 })
    );
    let delta = &events[11].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 7);
}

#[tokio::test]
async fn max_tokens_truncates() {
    let mock = start().await;
    let body = |stream: bool| {
        json!({
            "model": "mock-1",
            "max_tokens": 3,
            "stream": stream,
            "messages": [{ "role": "user", "content": "one two three" }]
        })
    };
    let v: Value = post_anthropic(&mock.base, body(false))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["content"][0]["text"], "Mock reply: one");
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 3);

    let (raw, _) = read_raw(post_anthropic(&mock.base, body(true)).await).await;
    let events = anthropic_events(&raw);
    assert_eq!(anthropic_text(&events), "Mock reply: one");
    let delta = events
        .iter()
        .find(|(n, _)| n == "message_delta")
        .expect("message_delta");
    assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta.1["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn delay_headers_apply() {
    let mock = start().await;
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", mock.base))
        .header("x-mock-ttft-ms", "100")
        .header("x-mock-inter-token-ms", "20")
        .json(&json!({
            "model": "mock-echo",
            "max_tokens": 50,
            "stream": true,
            "messages": [{ "role": "user", "content": "a b c" }]
        }))
        .send()
        .await
        .expect("send");
    let (raw, _) = read_raw(resp).await;
    assert!(started.elapsed() >= Duration::from_millis(100 + 4 * 20));
    assert_eq!(anthropic_text(&anthropic_events(&raw)), "Mock reply: a b c");
}

#[tokio::test]
async fn invalid_requests_get_anthropic_errors() {
    let mock = start().await;
    let no_max = json!({ "model": "mock-echo", "messages": [{ "role": "user", "content": "hi" }] });
    let resp = post_anthropic(&mock.base, no_max).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .expect("message")
        .contains("max_tokens"));

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", mock.base))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let resp = post_anthropic(
        &mock.base,
        json!({ "model": "claude-3-opus", "max_tokens": 5, "messages": [] }),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn models_list_in_anthropic_shape() {
    let mock = start().await;
    let v: Value = reqwest::Client::new()
        .get(format!("{}/v1/models", mock.base))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(v["data"][0]["id"], "mock-echo");
    assert_eq!(v["has_more"], false);
    let openai = get_json(&format!("{}/v1/models", mock.base)).await;
    assert_eq!(openai["object"], "list");
}

fn tool_request(model: &str, stream: bool, messages: Value) -> Value {
    json!({
        "model": model,
        "max_tokens": 200,
        "stream": stream,
        "tools": [
            { "name": "lookup", "description": "Look it up", "input_schema": { "type": "object" } },
            { "name": "other", "description": "Unused", "input_schema": { "type": "object" } }
        ],
        "messages": messages
    })
}

const TOOL_QUESTION: &str = "find \"the\" answer\nplease";

#[tokio::test]
async fn tool_use_non_streaming() {
    let mock = start().await;
    let msgs = json!([{ "role": "user", "content": [{ "type": "text", "text": TOOL_QUESTION }] }]);
    let v: Value = post_anthropic(&mock.base, tool_request("mock-tool", false, msgs))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["stop_reason"], "tool_use");
    let block = &v["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "lookup");
    assert!(block["id"].as_str().expect("id").starts_with("toolu_mock_"));
    assert_eq!(block["input"], json!({ "text": TOOL_QUESTION }));
    assert!(v["usage"]["output_tokens"].as_u64().expect("tokens") > 0);

    // After the tool result: a normal text answer from the last user text.
    let msgs = json!([
        { "role": "user", "content": "what is it" },
        { "role": "assistant", "content": [block.clone()] },
        { "role": "user", "content": [
            { "type": "tool_result", "tool_use_id": block["id"], "content": [{ "type": "text", "text": "42" }] }
        ] }
    ]);
    let v: Value = post_anthropic(&mock.base, tool_request("mock-tool-x", false, msgs))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["content"][0]["text"], "Mock reply: what is it");

    // No tools: text.
    let mut no_tools = tool_request(
        "mock-tool",
        false,
        json!([{ "role": "user", "content": "x" }]),
    );
    no_tools.as_object_mut().expect("obj").remove("tools");
    let v: Value = post_anthropic(&mock.base, no_tools)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["content"][0]["text"], "Mock reply: x");
}

#[tokio::test]
async fn tool_use_streaming() {
    let mock = start().await;
    let msgs = json!([{ "role": "user", "content": TOOL_QUESTION }]);
    let resp = post_anthropic(&mock.base, tool_request("mock-tool", true, msgs)).await;
    let (raw, errored) = read_raw(resp).await;
    assert!(!errored);
    let events = anthropic_events(&raw);
    let n = events.len();
    assert!(n >= 3 + 2 + 3, "{raw}");
    assert_eq!(
        names(&events)[..3],
        ["message_start", "content_block_start", "ping"]
    );
    assert_eq!(
        names(&events)[n - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let block = &events[1].1["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "lookup");
    assert_eq!(block["input"], json!({}));
    assert!(block["id"].as_str().expect("id").starts_with("toolu_mock_"));
    let fragments: Vec<&str> = events[3..n - 3]
        .iter()
        .map(|(name, v)| {
            assert_eq!(name, "content_block_delta");
            assert_eq!(v["delta"]["type"], "input_json_delta");
            v["delta"]["partial_json"].as_str().expect("partial_json")
        })
        .collect();
    assert!(fragments.len() >= 2);
    let args = fragments.concat();
    assert_eq!(
        args,
        serde_json::to_string(&json!({ "text": TOOL_QUESTION })).expect("ser")
    );
    assert_eq!(events[n - 2].1["delta"]["stop_reason"], "tool_use");
    assert!(
        events[n - 2].1["usage"]["output_tokens"]
            .as_u64()
            .expect("n")
            > 0
    );
}
