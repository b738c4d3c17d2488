//! A model outside the table has no known window: the whole history goes out, and when its
//! provider refuses the prompt as too long and states its maximum, the prompt is fitted to it
//! and sent again (both provider formats); later calls are fitted before they are sent.

use serde_json::Value;
use switchyard_core::config::Config;
use switchyard_core::job::ChatMessage;
use switchyard_worker::llm::{Providers, Sink};
use uuid::Uuid;

use crate::support::*;

/// `n` words, distinct per message (`tag`).
fn words(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}{i:02}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Eleven turns of 60 words, the last one the user's question.
fn history() -> Vec<ChatMessage> {
    (0..11)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            ChatMessage::new(role, words(&format!("t{i}w"), 60))
        })
        .collect()
}

/// Every text of a recorded request (OpenAI's messages, Anthropic's system and messages).
fn texts(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |v: &Value| match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(blocks) => out.extend(
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str().map(str::to_string)),
        ),
        _ => {}
    };
    push(&body["system"]);
    for m in body["messages"].as_array().into_iter().flatten() {
        push(&m["content"]);
    }
    out
}

/// The test configuration's providers, the mock at `base`.
fn providers(base: &str) -> Providers {
    let mut cfg = Config::for_tests("postgres://x/y", "redis://x", "t").llm;
    cfg.mock_base_url = Some(format!("{base}/v1"));
    Providers::from_config(&cfg)
}

fn word_count(body: &Value) -> usize {
    texts(body)
        .iter()
        .map(|t| t.split_whitespace().count())
        .sum()
}

#[tokio::test]
async fn an_unlisted_model_s_stated_window_is_learned_and_the_prompt_fitted_to_it() {
    let (base, stop) = mock().await;
    let p = providers(&base);
    let head = vec![ChatMessage::new("system", words("sys", 10))];
    let history = history();
    let question = history.last().unwrap().content.clone();
    for provider in ["mock", "mock-anthropic"] {
        // 670 words in all: more than the window of 500 (the estimate counts ~2 tokens a word)
        let upstream = format!("mock-window-500-{}", Uuid::now_v7().simple());
        let model = format!("{provider}/{upstream}");
        let mut input = input(&model, &question);
        input.max_tokens = Some(40);
        let (c, _rx) = ctx();
        let done = p
            .complete(&input, &head, &history, &Sink::new(&c))
            .await
            .unwrap_or_else(|e| panic!("{provider}: {e:?}"));
        assert_eq!(done.calls, 2, "{provider}: refused once, then fitted");
        let sent = requests(&base, &upstream).await;
        assert_eq!(sent.len(), 2, "{provider}");
        let (first, second) = (&sent[0]["body"], &sent[1]["body"]);
        assert_eq!(
            word_count(first),
            670,
            "{provider}: the whole history first"
        );
        let kept = texts(second);
        assert!(
            word_count(second) <= 500,
            "{provider}: {}",
            word_count(second)
        );
        assert_eq!(
            kept.first(),
            Some(&head[0].content),
            "{provider}: the system prompt kept"
        );
        assert_eq!(
            kept.last(),
            Some(&question),
            "{provider}: the question kept"
        );
        // the newest turns that fit, starting at a question: 3 of 11
        assert_eq!(kept.len(), 1 + 3, "{provider}: {kept:?}");
        assert_eq!(kept[1], history[8].content, "{provider}");
        assert_eq!(
            done.output.text,
            expected(&[&head[..], &history[8..]].concat(), Some(40)),
            "{provider}: answered from the fitted prompt"
        );

        // the next call is fitted before it is sent
        let (c, _rx) = ctx();
        let again = p
            .complete(&input, &head, &history, &Sink::new(&c))
            .await
            .unwrap();
        assert_eq!(again.calls, 1, "{provider}: the window was remembered");
        assert_eq!(requests(&base, &upstream).await.len(), 3, "{provider}");
    }
    stop.cancel();
}

#[tokio::test]
async fn a_refusal_the_prompt_cannot_be_fitted_to_ends_the_call() {
    let (base, stop) = mock().await;
    let p = providers(&base);
    // the system prompt alone is larger than the stated window: nothing to drop
    let head = vec![ChatMessage::new("system", words("sys", 500))];
    let upstream = format!("mock-window-400-{}", Uuid::now_v7().simple());
    let model = format!("mock/{upstream}");
    let (c, _rx) = ctx();
    let e = p
        .complete(&input(&model, "hi"), &head, &user("hi"), &Sink::new(&c))
        .await
        .unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("context_too_long", false));
    assert_eq!(stats(&base, &upstream).await.0, 1, "one call, no loop");

    // a provider that refuses again at the window it stated gets no third call
    let (c, _rx) = ctx();
    let e = p
        .complete(
            &input("mock/mock-context-length", "hi"),
            &[],
            &user("hi"),
            &Sink::new(&c),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("provider_context_length", false)
    );
    assert_eq!(
        stats(&base, "mock-context-length").await.0,
        2,
        "refused, fitted, refused"
    );
    stop.cancel();
}
