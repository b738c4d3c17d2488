//! Contract suite for `LlmProvider` implementations, run against the mock provider over real
//! HTTP. A new provider adapter must pass the same suite against its own fake.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard_core::job::{JobKind, LlmChatInput};
use switchyard_worker::executor::{Emit, JobContext, JobMeta};
use switchyard_worker::llm::{LlmProvider, OpenAiCompatible};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn input(model: &str, content: &str, max_tokens: Option<u32>) -> LlmChatInput {
    serde_json::from_value(json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }))
    .unwrap()
}

fn ctx() -> (JobContext, mpsc::Receiver<Emit>) {
    let (tx, rx) = mpsc::channel(1024);
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

fn deltas(mut rx: mpsc::Receiver<Emit>) -> String {
    let mut s = String::new();
    while let Ok(e) = rx.try_recv() {
        if let Emit::Delta(t) = e {
            s.push_str(&t);
        }
    }
    s
}

/// The contract: streamed text, finish reasons, usage, and error classification.
async fn provider_contract(p: Arc<dyn LlmProvider>) {
    let (c, rx) = ctx();
    let out = p
        .chat(&input("mock-echo", "alpha beta gamma", None), &c)
        .await
        .unwrap();
    let expected =
        switchyard_mock_llm::expected_text(&[("user".into(), "alpha beta gamma".into())], None);
    assert_eq!(out.text, expected);
    assert_eq!(out.finish_reason, "stop");
    assert_eq!(out.usage.completion_tokens, 5);
    assert_eq!(out.usage.prompt_tokens, 3);
    drop(c);
    assert_eq!(deltas(rx), expected, "streamed deltas add up to the text");

    let (c, _rx) = ctx();
    let out = p
        .chat(&input("mock-echo", "a b c d e f", Some(2)), &c)
        .await
        .unwrap();
    assert_eq!(out.finish_reason, "length");
    assert_eq!(out.usage.completion_tokens, 2);

    let cases = [
        ("mock-error-500", "provider_error", true),
        ("mock-error-429", "provider_rate_limited", true),
        ("mock-error-400", "provider_bad_request", false),
        ("not-a-model", "provider_bad_request", false),
        ("mock-drop", "provider_error", true),
        ("mock-stall", "provider_timeout", true),
    ];
    for (model, code, retryable) in cases {
        let (c, _rx) = ctx();
        let e = p.chat(&input(model, "x y", None), &c).await.unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.retryable),
            (code, retryable),
            "{model}: {e}"
        );
        if model == "mock-error-429" {
            assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        }
    }
}

#[tokio::test]
async fn openai_compatible_passes_the_contract() {
    let (base, stop) = switchyard_mock_llm::spawn(Default::default())
        .await
        .unwrap();
    // "not-a-model" reaches the mock too (it answers 404), like a real provider would
    let p = OpenAiCompatible::new(&format!("{base}/v1"), None, Duration::from_millis(800));
    provider_contract(Arc::new(p)).await;
    stop.cancel();
}
