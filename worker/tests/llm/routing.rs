//! Routing through the model table: retries with backoff that honour `retry-after`, no retry
//! for errors that cannot pass, fallbacks, restart announcements when output already streamed,
//! and unknown models.

use std::time::{Duration, Instant};

use switchyard_core::config::{Config, LlmConfig};
use switchyard_core::models::ModelConfig;
use switchyard_worker::llm::{Providers, Sink};
use uuid::Uuid;

use crate::support::*;

fn llm(base: &str) -> LlmConfig {
    let mut cfg = Config::for_tests("postgres://x/y", "redis://x", "t").llm;
    cfg.mock_base_url = Some(format!("{base}/v1"));
    cfg.max_retries = 2;
    cfg.retry_base_ms = 10;
    cfg.retry_max_ms = 3_000;
    cfg.request_timeout_s = 2;
    cfg.ttft_timeout_ms = 1_500;
    cfg
}

fn model(provider: &str, upstream: &str, fallbacks: &[&str]) -> ModelConfig {
    let mut m = ModelConfig::on(provider);
    m.model = Some(upstream.to_string());
    m.fallbacks = fallbacks.iter().map(|s| s.to_string()).collect();
    m.input_usd_per_mtok = 1.0;
    m.output_usd_per_mtok = 2.0;
    m
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::now_v7().simple())
}

#[tokio::test]
async fn transient_failures_are_retried_then_succeed() {
    let (base, stop) = mock().await;
    let p = Providers::from_config(&llm(&base));
    let name = unique("mock-fail-first-2");
    let (c, _rx) = ctx();
    let done = p
        .complete(
            &input(&name, "hi there"),
            &[],
            &user("hi there"),
            &Sink::new(&c),
        )
        .await
        .unwrap();
    assert_eq!(done.calls, 3);
    assert_eq!(done.output.text, expected(&user("hi there"), None));
    assert_eq!(stats(&base, &name).await.0, 3);
    stop.cancel();
}

#[tokio::test]
async fn retry_after_is_honoured_and_retries_are_bounded() {
    let (base, stop) = mock().await;
    let mut cfg = llm(&base);
    cfg.max_retries = 1;
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let t0 = Instant::now();
    let e = p
        .complete(
            &input("mock-error-429", "x"),
            &[],
            &user("x"),
            &Sink::new(&c),
        )
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "waited for retry-after: 1"
    );
    assert_eq!(e.code, "provider_rate_limited");
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(
        stats(&base, "mock-error-429").await.0,
        2,
        "one call and one retry"
    );

    // a retry-after beyond the inline cap is left to the job's own retry
    cfg.retry_max_ms = 500;
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let t0 = Instant::now();
    p.complete(
        &input("mock-error-429", "x"),
        &[],
        &user("x"),
        &Sink::new(&c),
    )
    .await
    .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(stats(&base, "mock-error-429").await.0, 3);
    stop.cancel();
}

#[tokio::test]
async fn errors_that_cannot_pass_are_not_retried() {
    let (base, stop) = mock().await;
    let p = Providers::from_config(&llm(&base));
    for (model, code) in [
        ("mock-error-400", "provider_bad_request"),
        ("mock-error-401", "provider_auth"),
        ("mock-error-429-quota", "provider_quota_exhausted"),
        ("mock-context-length", "provider_context_length"),
    ] {
        let (c, _rx) = ctx();
        let e = p
            .complete(&input(model, "x"), &[], &user("x"), &Sink::new(&c))
            .await
            .unwrap_err();
        assert_eq!((e.code.as_str(), e.retryable), (code, false), "{model}");
        assert_eq!(stats(&base, model).await.0, 1, "{model} called once");
        if code == "provider_auth" {
            // the provider's words may quote the operator's key: they stay in the log
            assert!(
                e.message.contains("refused this server's credentials")
                    && !e.message.contains("API key"),
                "{}",
                e.message
            );
        }
    }
    let (c, _rx) = ctx();
    let e = p
        .complete(&input("gpt-nope", "x"), &[], &user("x"), &Sink::new(&c))
        .await
        .unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("unknown_model", false));
    stop.cancel();
}

#[tokio::test]
async fn fallback_to_the_next_model_across_formats() {
    let (base, stop) = mock().await;
    let mut cfg = llm(&base);
    cfg.max_retries = 1;
    cfg.models.insert(
        "primary".into(),
        model("mock", "mock-error-503", &["secondary"]),
    );
    cfg.models.insert(
        "secondary".into(),
        model("mock-anthropic", "mock-overloaded", &["tertiary"]),
    );
    cfg.models
        .insert("tertiary".into(), model("mock-anthropic", "mock-echo", &[]));
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let done = p
        .complete(
            &input("primary", "go now"),
            &[],
            &user("go now"),
            &Sink::new(&c),
        )
        .await
        .unwrap();
    assert_eq!(done.model.alias, "tertiary");
    assert_eq!(done.model.provider, "mock-anthropic");
    assert_eq!(
        done.calls, 5,
        "2 calls to each failing model, then the answer"
    );
    assert_eq!(done.output.text, expected(&user("go now"), None));
    assert_eq!(stats(&base, "mock-error-503").await.0, 2);
    assert_eq!(stats(&base, "mock-overloaded").await.0, 2);

    // no fallback for a bad request: the request itself is wrong
    cfg.models.insert(
        "strict".into(),
        model("mock", "mock-error-400", &["tertiary"]),
    );
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let e = p
        .complete(&input("strict", "x"), &[], &user("x"), &Sink::new(&c))
        .await
        .unwrap_err();
    assert_eq!(e.code, "provider_bad_request");
    // a stalled first token falls back too
    cfg.models
        .insert("stuck".into(), model("mock", "mock-stall", &["tertiary"]));
    cfg.max_retries = 0;
    cfg.ttft_timeout_ms = 300;
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let done = p
        .complete(&input("stuck", "x"), &[], &user("x"), &Sink::new(&c))
        .await
        .unwrap();
    assert_eq!(done.model.alias, "tertiary");
    stop.cancel();
}

/// A fallback the prompt does not fit is never called, and the job reports the failure that
/// passed the chain on (here a retryable 503, so the job is tried again later), not a
/// `context_too_long` that would fail it for good.
#[tokio::test]
async fn a_fallback_too_small_for_the_prompt_keeps_the_first_failure() {
    let (base, stop) = mock().await;
    let mut cfg = llm(&base);
    cfg.max_retries = 0;
    let small = unique("mock-echo");
    cfg.models
        .insert("wide".into(), model("mock", "mock-error-503", &["narrow"]));
    let mut narrow = model("mock", &small, &[]);
    narrow.context_window = 64;
    narrow.max_output_tokens = 16;
    cfg.models.insert("narrow".into(), narrow);
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let long = vec!["word"; 400].join(" ");
    let e = p
        .complete(&input("wide", &long), &[], &user(&long), &Sink::new(&c))
        .await
        .unwrap_err();
    assert!(e.code.starts_with("provider_"), "{e}");
    assert!(e.retryable, "{e}");
    assert_eq!(
        stats(&base, &small).await.0,
        0,
        "the fallback is not called"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_restart_after_streamed_tokens_is_announced_never_spliced() {
    let (base, stop) = mock().await;
    let mut cfg = llm(&base);
    cfg.max_retries = 0;
    cfg.models.insert(
        "flaky".into(),
        model("mock", "mock-midstream-error", &["steady"]),
    );
    cfg.models
        .insert("steady".into(), model("mock-anthropic", "mock-echo", &[]));
    let p = Providers::from_config(&cfg);
    let msgs = user("red green blue yellow");
    let (c, rx) = ctx();
    let done = p
        .complete(
            &input("flaky", "red green blue yellow"),
            &[],
            &msgs,
            &Sink::new(&c),
        )
        .await
        .unwrap();
    drop(c);
    let seen = drain(rx);
    let want = expected(&msgs, None);
    assert_eq!(
        done.output.text, want,
        "the output is the second call's alone"
    );
    let restart = seen
        .iter()
        .position(|s| matches!(s, Seen::Event(k, d) if k == "status" && d["restart"]["discard_output"] == true))
        .expect("a restart status event");
    let Seen::Event(_, d) = &seen[restart] else {
        unreachable!()
    };
    assert_eq!(d["status"], "running");
    assert_eq!(d["restart"]["model"], "steady");
    assert_eq!(d["restart"]["reason"], "provider_stream_error");
    assert!(
        !text_of(&seen[..restart]).is_empty(),
        "tokens streamed before the failure"
    );
    assert_eq!(
        text_of(&seen[restart..]),
        want,
        "after the restart: the new reply only"
    );
    // a reply recorded for the cache but not streamed (`stream: false`) keeps the second
    // call's deltas alone, though no restart was announced
    let (c, rx) = ctx();
    let sink = Sink::recording(&c).silenced(true);
    let done = p
        .complete(&input("flaky", "red green blue yellow"), &[], &msgs, &sink)
        .await
        .unwrap();
    let recorded = sink.recorded();
    drop(sink);
    drop(c);
    assert_eq!(done.output.text, want);
    assert_eq!(recorded.concat(), want, "{recorded:?}");
    assert!(
        text_of(&drain(rx)).is_empty(),
        "a silent sink streams nothing"
    );
    stop.cancel();
}

#[tokio::test]
async fn cost_comes_from_the_model_table() {
    let (base, stop) = mock().await;
    let mut cfg = llm(&base);
    cfg.models
        .insert("priced".into(), model("mock", "mock-echo", &[]));
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let done = p
        .complete(
            &input("priced", "a b c"),
            &[],
            &user("a b c"),
            &Sink::new(&c),
        )
        .await
        .unwrap();
    let u = &done.output.usage;
    let cost = done
        .model
        .config
        .cost_usd(u.prompt_tokens, u.completion_tokens);
    let want = (u.prompt_tokens as f64 * 1.0 + u.completion_tokens as f64 * 2.0) / 1e6;
    assert!(cost > 0.0 && (cost - want).abs() < 1e-15);
    stop.cancel();
}

/// A provider that cannot be reached fails the call with the cause, without the provider's
/// address (the job's error reaches its tenant; the address is the operator's).
#[tokio::test]
async fn an_unreachable_provider_s_address_stays_out_of_the_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cfg = llm(&format!("http://127.0.0.1:{port}"));
    cfg.max_retries = 0;
    let p = Providers::from_config(&cfg);
    let (c, _rx) = ctx();
    let e = p
        .complete(&input("mock-echo", "x"), &[], &user("x"), &Sink::new(&c))
        .await
        .unwrap_err();
    assert_eq!(e.code, "provider_unavailable", "{}", e.message);
    assert!(
        !e.message.contains("127.0.0.1") && !e.message.contains("http"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("provider request failed"),
        "{}",
        e.message
    );
}

/// The job's spent tokens (what its tenant is charged): a call's reported usage once it ends;
/// nothing for calls that failed before they produced anything; the prompt and the streamed
/// text of a call that broke mid-stream (the provider charged it); and the prompt and what had
/// streamed when the call is dropped mid-reply (a cancel, a job time limit).
#[tokio::test]
async fn spent_tokens_count_every_call_that_produced_something() {
    use std::sync::atomic::Ordering::Relaxed;
    let (base, stop) = mock().await;
    let mut cfg = llm(&base);
    cfg.max_retries = 0;
    cfg.models.insert(
        "flaky".into(),
        model("mock", "mock-midstream-error", &["steady"]),
    );
    cfg.models
        .insert("steady".into(), model("mock-anthropic", "mock-echo", &[]));
    let p = Providers::from_config(&cfg);
    let words = "one two three four five six seven eight nine ten";

    // two 500s, then a reply: only the reply is charged
    let mut retrying = llm(&base);
    retrying.max_retries = 2;
    let p2 = Providers::from_config(&retrying);
    let (c, _rx) = ctx();
    let done = p2
        .complete(
            &input(&unique("mock-fail-first-2"), words),
            &[],
            &user(words),
            &Sink::new(&c),
        )
        .await
        .unwrap();
    assert_eq!(done.calls, 3);
    assert!(done.output.usage.total_tokens > 0);
    assert_eq!(c.spent().load(Relaxed), done.output.usage.total_tokens);

    // a reply cut mid-stream, then the fallback's: both are charged
    let (c, _rx) = ctx();
    let done = p
        .complete(&input("flaky", words), &[], &user(words), &Sink::new(&c))
        .await
        .unwrap();
    assert_eq!(done.calls, 2);
    let broken = c.spent().load(Relaxed) - done.output.usage.total_tokens;
    assert!(
        broken > done.output.usage.prompt_tokens,
        "the broken call's prompt and streamed text: {broken}"
    );

    // dropped after its first tokens: the prompt and what streamed stay counted
    let (c, mut rx) = ctx();
    let spent = c.spent();
    let call = async {
        let sink = Sink::new(&c);
        p.complete(&input("mock-slow", words), &[], &user(words), &sink)
            .await
    };
    tokio::select! {
        _ = call => panic!("the slow reply finished first"),
        _ = rx.recv() => {}
    }
    drop(c);
    let prompt_at_least = 10;
    assert!(
        spent.load(Relaxed) > prompt_at_least,
        "prompt and first token: {}",
        spent.load(Relaxed)
    );

    // accepted (a 2xx head), then cut by the first-token limit before any token: the
    // provider bills the prompt, so it stays counted (it used to be taken back)
    let mut strict = llm(&base);
    strict.max_retries = 0;
    strict.ttft_timeout_ms = 50;
    let p3 = Providers::from_config(&strict);
    let (c, _rx) = ctx();
    let e = p3
        .complete(
            &input("mock-slow", words),
            &[],
            &user(words),
            &Sink::new(&c),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "provider_timeout", "{e}");
    assert!(
        c.spent().load(Relaxed) >= prompt_at_least,
        "the accepted call's prompt: {}",
        c.spent().load(Relaxed)
    );
    stop.cancel();
}
