//! Shared helpers: starting the mock, posting to either route, reading SSE bodies
//! and the observation endpoints.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_mock_llm::{spawn, MockLlmConfig};
use tokio_util::sync::CancellationToken;

/// A running mock, stopped when dropped.
pub struct Mock {
    pub base: String,
    stop: CancellationToken,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start() -> Mock {
    start_with(MockLlmConfig::default()).await
}

pub async fn start_with(config: MockLlmConfig) -> Mock {
    let (base, stop) = spawn(config).await.expect("spawn");
    Mock { base, stop }
}

pub fn pairs(messages: &Value) -> Vec<(String, String)> {
    messages
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

pub fn sample_messages() -> Value {
    json!([
        { "role": "system", "content": "You are terse." },
        { "role": "user", "content": "Say  hello to\nthe world" }
    ])
}

/// `POST /v1/chat/completions`.
pub async fn post(base: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// `POST /v1/messages` with the headers Anthropic clients send.
pub async fn post_anthropic(base: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// Reads a body to the end (or until a body error); returns the text and
/// whether the body ended with an error.
pub async fn read_raw(resp: reqwest::Response) -> (String, bool) {
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => buf.push_str(std::str::from_utf8(&bytes).expect("utf8")),
            Err(_) => return (buf, true),
        }
    }
    (buf, false)
}

/// Reads an SSE body; returns the `data:` payloads in order and whether the
/// body ended with an error. Every event must be a single `data:` line.
pub async fn read_sse(resp: reqwest::Response) -> (Vec<String>, bool) {
    let (buf, errored) = read_raw(resp).await;
    let events = buf
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without data prefix: {e:?}"))
                .to_owned()
        })
        .collect();
    (events, errored)
}

/// The content deltas of OpenAI chunks, concatenated.
pub fn content_deltas(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).expect("chunk json");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Parses an Anthropic SSE body into `(event name, data)` pairs, checking that
/// each event's name equals its data's `type`.
pub fn anthropic_events(raw: &str) -> Vec<(String, Value)> {
    raw.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name_line, data_line) = e
                .split_once('\n')
                .unwrap_or_else(|| panic!("event with one line: {e:?}"));
            let name = name_line
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no event line: {e:?}"));
            let data = data_line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no data line: {e:?}"));
            let v: Value = serde_json::from_str(data).expect("event json");
            assert_eq!(v["type"], name, "event name and data type differ");
            (name.to_owned(), v)
        })
        .collect()
}

pub fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

/// The `text_delta` texts of Anthropic events, concatenated.
pub fn anthropic_text(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(n, v)| n == "content_block_delta" && v["delta"]["type"] == "text_delta")
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect()
}

pub async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// `GET /mock/stats` counters of one model (`{}` when it has none).
pub async fn model_stats(base: &str, model: &str) -> Value {
    let v = get_json(&format!("{base}/mock/stats")).await;
    v["models"][model].clone()
}

/// Polls `/mock/stats` until `model`'s `field` equals `want`; panics after 5s.
pub async fn wait_for_stat(base: &str, model: &str, field: &str, want: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = model_stats(base, model).await;
        if s[field].as_u64() == Some(want) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{model}.{field} never reached {want}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /mock/requests?model=<model>`.
pub async fn recorded(base: &str, model: &str) -> Vec<Value> {
    let v = get_json(&format!("{base}/mock/requests?model={model}")).await;
    v["requests"].as_array().expect("requests").clone()
}
