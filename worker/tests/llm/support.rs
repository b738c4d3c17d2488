//! Shared pieces: a job context whose emitted events can be read back, mock helpers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_core::job::{ChatMessage, JobKind, LlmChatInput};
use switchyard_worker::executor::{Emit, JobContext, JobMeta};
use switchyard_worker::llm::ProviderRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn ctx() -> (JobContext, mpsc::Receiver<Emit>) {
    let (tx, rx) = mpsc::channel(4096);
    let meta = JobMeta {
        job_id: Uuid::now_v7(),
        tenant_id: Uuid::now_v7(),
        kind: JobKind::LlmChat,
        input: json!({}),
        attempt: 1,
        max_attempts: 3,
    };
    (JobContext::new(meta, CancellationToken::new(), tx), rx)
}

/// What the context received, in order: text deltas merged between other events.
#[derive(Debug, PartialEq)]
pub enum Seen {
    Text(String),
    Event(String, Value),
}

pub fn drain(mut rx: mpsc::Receiver<Emit>) -> Vec<Seen> {
    let mut out: Vec<Seen> = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            Emit::Delta(t) => match out.last_mut() {
                Some(Seen::Text(s)) => s.push_str(&t),
                _ => out.push(Seen::Text(t)),
            },
            Emit::Event { kind, data } => out.push(Seen::Event(kind, data)),
        }
    }
    out
}

pub fn text_of(seen: &[Seen]) -> String {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

pub fn user(content: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", content)]
}

pub fn expected(messages: &[ChatMessage], max_tokens: Option<u32>) -> String {
    let pairs: Vec<(String, String)> = messages
        .iter()
        .map(|m| (m.role.clone(), m.content.clone()))
        .collect();
    switchyard_mock_llm::expected_text(&pairs, max_tokens)
}

pub fn input(model: &str, content: &str) -> LlmChatInput {
    serde_json::from_value(json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
    }))
    .unwrap()
}

pub static NO_HEADERS: BTreeMap<String, String> = BTreeMap::new();

pub fn request<'a>(
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
) -> ProviderRequest<'a> {
    ProviderRequest {
        model,
        messages,
        max_tokens: 1024,
        max_tokens_explicit: false,
        temperature: None,
        sampling: Default::default(),
        tools: &[],
        tool_choice: None,
        parallel_tool_calls: None,
        stream,
        headers: &NO_HEADERS,
        ttft_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_millis(800),
    }
}

pub async fn mock() -> (String, CancellationToken) {
    switchyard_mock_llm::spawn(Default::default())
        .await
        .unwrap()
}

/// The mock's counters for one model: (calls, completed, aborted).
pub async fn stats(base: &str, model: &str) -> (u64, u64, u64) {
    let v: Value = reqwest::get(format!("{base}/mock/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &v["models"][model];
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    (n("calls"), n("completed"), n("aborted"))
}

/// The requests the mock recorded for one model.
pub async fn requests(base: &str, model: &str) -> Vec<Value> {
    let v: Value = reqwest::get(format!("{base}/mock/requests?model={model}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["requests"].as_array().cloned().unwrap_or_default()
}

/// A one-request HTTP server answering 200 with `parts` (exact bytes, each after its delay, the
/// connection closed after the last): a provider's wire quirks the mock does not play.
/// Returns its base URL.
pub async fn raw_server(parts: Vec<(Duration, String)>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        // the request: its head, then as many bytes as its content-length says
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                break;
            }
        }
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for (wait, part) in parts {
            tokio::time::sleep(wait).await;
            if s.write_all(part.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = s.shutdown().await;
    });
    base
}
