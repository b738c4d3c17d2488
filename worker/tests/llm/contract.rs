//! The contract every `LlmProvider` adapter passes against the mock, in its own wire format,
//! streaming and not: text, finish reasons, usage, tool calls, and the classification of every
//! failure scenario.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_core::job::{ChatMessage, Sampling, ToolSpec};
use switchyard_core::models::TokenLimitField;
use switchyard_worker::llm::{Anthropic, Failure, LlmProvider, OpenAi, Sink};

use crate::support::*;

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Format {
    OpenAi,
    Anthropic,
}

pub(crate) fn adapter(format: Format, base: &str) -> Arc<dyn LlmProvider> {
    let url = format!("{base}/v1");
    let t = Duration::from_secs(2);
    match format {
        Format::OpenAi => Arc::new(OpenAi::new(&url, None, BTreeMap::new(), t)),
        Format::Anthropic => Arc::new(Anthropic::new(&url, None, BTreeMap::new(), t)),
    }
}

async fn contract(format: Format) {
    let (base, stop) = mock().await;
    let p = adapter(format, &base);
    for stream in [true, false] {
        // text, deltas, usage
        let msgs = vec![
            ChatMessage::new("system", "be terse"),
            ChatMessage::new("user", "alpha beta gamma"),
        ];
        let (c, rx) = ctx();
        let out = p
            .chat(&request("mock-echo", &msgs, stream), &Sink::new(&c))
            .await
            .unwrap();
        let want = expected(&msgs, None);
        assert_eq!(out.text, want, "{format:?} stream={stream}");
        assert_eq!(out.finish_reason, "stop");
        assert!(out.usage.prompt_tokens > 0 && !out.usage.estimated);
        assert_eq!(
            out.usage.completion_tokens,
            want.split_whitespace().count() as u64
        );
        drop(c);
        assert_eq!(
            text_of(&drain(rx)),
            want,
            "streamed deltas add up to the text"
        );

        // a reply budget cuts the reply
        let msgs = user("a b c d e f");
        let (c, _rx) = ctx();
        let mut req = request("mock-echo", &msgs, stream);
        req.max_tokens = 2;
        req.max_tokens_explicit = true;
        let out = p.chat(&req, &Sink::new(&c)).await.unwrap();
        assert_eq!(out.finish_reason, "length", "{format:?} stream={stream}");
        assert_eq!(out.usage.completion_tokens, 2);

        // a stop sequence ends the reply before it (not part of the text)
        let msgs = user("alpha beta gamma delta");
        let (c, rx) = ctx();
        let mut req = request("mock-echo", &msgs, stream);
        req.sampling.stop = vec![" gamma".into(), "zzz".into()];
        let out = p.chat(&req, &Sink::new(&c)).await.unwrap();
        assert_eq!(
            out.text, "Mock reply: alpha beta",
            "{format:?} stream={stream}"
        );
        assert_eq!(out.finish_reason, "stop");
        drop(c);
        assert_eq!(text_of(&drain(rx)), out.text);

        // tool calls
        let tools: Vec<ToolSpec> = serde_json::from_value(json!([
            {"type": "function", "function": {"name": "lookup", "description": "find", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "other"}}
        ]))
        .unwrap();
        let msgs = user("find the weather");
        let (c, rx) = ctx();
        let mut req = request("mock-tool", &msgs, stream);
        req.tools = &tools;
        let out = p.chat(&req, &Sink::new(&c)).await.unwrap();
        assert_eq!(
            out.finish_reason, "tool_calls",
            "{format:?} stream={stream}"
        );
        assert_eq!(out.tool_calls.len(), 1);
        let call = &out.tool_calls[0];
        assert_eq!(call.function.name, "lookup");
        assert!(!call.id.is_empty());
        let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
        assert_eq!(args, json!({"text": "find the weather"}));
        drop(c);
        let seen = drain(rx);
        assert!(
            seen.iter().any(|s| matches!(s, Seen::Event(k, d) if k == "output.tool_call" && d["function"]["name"] == "lookup")),
            "{seen:?}"
        );
    }

    // every failure scenario, classified
    let midstream = match format {
        Format::OpenAi => Failure::Stream,
        Format::Anthropic => Failure::Overloaded,
    };
    let cases = [
        ("mock-error-500", Failure::Server),
        ("mock-error-502", Failure::Server),
        ("mock-error-503", Failure::Server),
        ("mock-error-429", Failure::RateLimited),
        ("mock-error-429-quota", Failure::QuotaExhausted),
        ("mock-error-400", Failure::BadRequest),
        ("mock-context-length", Failure::ContextLength),
        ("mock-error-401", Failure::Auth),
        ("mock-overloaded", Failure::Overloaded),
        ("mock-midstream-error", midstream),
        ("mock-cut", Failure::Stream),
        ("mock-drop", Failure::Stream),
        ("mock-reset", Failure::Stream),
        ("mock-stall", Failure::Timeout),
        ("not-a-model", Failure::BadRequest),
    ];
    for (model, failure) in cases {
        let msgs = user("x y");
        let (c, rx) = ctx();
        let mut req = request(model, &msgs, true);
        req.ttft_timeout = Duration::from_millis(1500);
        let e = p.chat(&req, &Sink::new(&c)).await.unwrap_err();
        assert_eq!(e.failure, failure, "{format:?} {model}: {e}");
        if model == "mock-error-429" {
            assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        }
        if model == "mock-midstream-error" {
            drop(c);
            assert!(
                !text_of(&drain(rx)).is_empty(),
                "tokens came before the error"
            );
        }
    }
    // an error object after HTTP 200, not streamed
    let msgs = user("x y");
    let (c, _rx) = ctx();
    let e = p
        .chat(
            &request("mock-midstream-error", &msgs, false),
            &Sink::new(&c),
        )
        .await
        .unwrap_err();
    assert_eq!(e.failure, midstream, "{format:?}: {e}");

    // time to first token: a slow first token fails the call, whatever the idle limit
    let msgs = user("x y");
    let (c, _rx) = ctx();
    let mut headers = BTreeMap::new();
    headers.insert("x-mock-ttft-ms".to_string(), "3000".to_string());
    let mut req = request("mock-echo", &msgs, true);
    req.headers = &headers;
    req.ttft_timeout = Duration::from_millis(300);
    req.idle_timeout = Duration::from_secs(10);
    let e = p.chat(&req, &Sink::new(&c)).await.unwrap_err();
    assert_eq!(e.failure, Failure::Timeout, "{e}");
    assert!(e.message.contains("first token"), "{e}");
    stop.cancel();
}

#[tokio::test]
async fn openai_passes_the_contract() {
    contract(Format::OpenAi).await;
}

#[tokio::test]
async fn anthropic_passes_the_contract() {
    contract(Format::Anthropic).await;
}

#[tokio::test]
async fn openai_compatible_variants_are_tolerated() {
    let (base, stop) = mock().await;
    let p = adapter(Format::OpenAi, &base);
    let msgs = user("one two three");
    let (c, _rx) = ctx();
    let out = p
        .chat(&request("mock-variants", &msgs, true), &Sink::new(&c))
        .await
        .unwrap();
    assert_eq!(out.text, expected(&msgs, None));
    assert!(
        !out.usage.estimated,
        "usage read from the `choices: null` chunk"
    );
    assert_eq!(
        out.usage.completion_tokens, 5,
        "Mock, reply:, one, two, three"
    );
    stop.cancel();
}

/// A refusal (OpenAI's `refusal`, streamed or whole) is kept apart from the text, never
/// streamed as output.
#[tokio::test]
async fn openai_refusals_are_kept_apart_from_the_text() {
    let (base, stop) = mock().await;
    let p = adapter(Format::OpenAi, &base);
    let msgs = user("one two three");
    for stream in [true, false] {
        let (c, rx) = ctx();
        let out = p
            .chat(&request("mock-refusal", &msgs, stream), &Sink::new(&c))
            .await
            .unwrap();
        drop(c);
        assert_eq!(out.text, "", "stream={stream}");
        assert_eq!(out.refusal.as_deref(), Some(expected(&msgs, None).as_str()));
        assert_eq!(text_of(&drain(rx)), "", "stream={stream}");
        // an ordinary reply has none
        let (c, _rx) = ctx();
        let out = p
            .chat(&request("mock-echo", &msgs, stream), &Sink::new(&c))
            .await
            .unwrap();
        assert_eq!(out.refusal, None);
    }
    stop.cancel();
}

/// OpenAI's generation parameters the Messages API has no field of that name for.
const NOT_ON_ANTHROPIC: [&str; 6] = [
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "reasoning_effort",
];

#[tokio::test]
async fn wire_requests_carry_what_each_format_needs() {
    let (base, stop) = mock().await;
    let key = Some("sk-test-123".to_string().into());
    let url = format!("{base}/v1");
    let oa = OpenAi::new(&url, key.clone(), BTreeMap::new(), Duration::from_secs(2));
    let an = Anthropic::new(&url, key, BTreeMap::new(), Duration::from_secs(2));
    let msgs = vec![
        ChatMessage::new("system", "sys"),
        ChatMessage::new("user", "hi"),
    ];
    let (c, _rx) = ctx();
    oa.chat(&request("mock-wire-oa", &msgs, true), &Sink::new(&c))
        .await
        .unwrap();
    an.chat(&request("mock-wire-an", &msgs, true), &Sink::new(&c))
        .await
        .unwrap();
    let r = &requests(&base, "mock-wire-oa").await[0];
    assert_eq!(r["headers"]["authorization"], "Bearer sk-test-123");
    assert_eq!(r["body"]["stream_options"]["include_usage"], true);
    // a server that refuses `stream_options` gets none (its usage is estimated)
    let quiet =
        OpenAi::new(&url, None, BTreeMap::new(), Duration::from_secs(2)).stream_usage(false);
    let out = quiet
        .chat(&request("mock-wire-quiet", &msgs, true), &Sink::new(&c))
        .await
        .unwrap();
    let q = &requests(&base, "mock-wire-quiet").await[0];
    assert!(q["body"].get("stream_options").is_none(), "{q}");
    assert!(out.usage.estimated && out.usage.completion_tokens > 0);
    assert_eq!(r["body"]["messages"][0]["role"], "system");
    assert!(
        r["body"].get("max_tokens").is_none(),
        "no budget unless asked"
    );
    let r = &requests(&base, "mock-wire-an").await[0];
    assert_eq!(r["headers"]["x-api-key"], "sk-test-123");
    assert_eq!(r["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(r["body"]["system"], "sys");
    assert_eq!(r["body"]["max_tokens"], 1024);
    assert_eq!(r["body"]["messages"].as_array().unwrap().len(), 1);

    // the reply budget's field: `max_tokens` unless the provider wants OpenAI's current name
    let current = OpenAi::new(&url, None, BTreeMap::new(), Duration::from_secs(2))
        .budget_field(TokenLimitField::MaxCompletionTokens);
    for (p, model) in [(&oa, "mock-budget-old"), (&current, "mock-budget-new")] {
        let mut req = request(model, &msgs, false);
        req.max_tokens = 7;
        req.max_tokens_explicit = true;
        p.chat(&req, &Sink::new(&c)).await.unwrap();
    }
    let old = &requests(&base, "mock-budget-old").await[0]["body"];
    assert_eq!(
        (old["max_tokens"].clone(), old.get("max_completion_tokens")),
        (json!(7), None)
    );
    let new = &requests(&base, "mock-budget-new").await[0]["body"];
    assert_eq!(
        (new["max_completion_tokens"].clone(), new.get("max_tokens")),
        (json!(7), None)
    );

    // one tool call at a time: OpenAI's flag (only with tools), Anthropic's inside tool_choice
    let tools: Vec<ToolSpec> =
        serde_json::from_value(json!([{"type": "function", "function": {"name": "f"}}])).unwrap();
    let required = json!("required");
    for (with_tools, choice, model) in [
        (true, None, "mock-par-1"),
        (false, None, "mock-par-2"),
        (true, Some(&required), "mock-par-3"),
    ] {
        let mut req = request(model, &msgs, false);
        req.parallel_tool_calls = Some(false);
        req.tool_choice = choice;
        if with_tools {
            req.tools = &tools;
        }
        oa.chat(&req, &Sink::new(&c)).await.unwrap();
        let b = &requests(&base, model).await[0]["body"];
        assert_eq!(
            b.get("parallel_tool_calls").cloned(),
            with_tools.then_some(json!(false)),
            "{model}"
        );
        let an_model = format!("{model}-an");
        req.model = &an_model;
        an.chat(&req, &Sink::new(&c)).await.unwrap();
        let b = &requests(&base, &an_model).await[0]["body"];
        let want = match (with_tools, choice) {
            (false, _) => Value::Null,
            (true, None) => json!({"type": "auto", "disable_parallel_tool_use": true}),
            (true, Some(_)) => json!({"type": "any", "disable_parallel_tool_use": true}),
        };
        assert_eq!(b["tool_choice"], want, "{an_model}");
    }

    // generation parameters: OpenAI's names as given; Anthropic's for what it has
    let sampling = Sampling {
        top_p: Some(0.25),
        stop: vec!["END".into(), "\n\n".into()],
        seed: Some(42),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(-0.5),
        response_format: Some(json!({"type": "json_object"})),
        reasoning_effort: Some("low".into()),
    };
    let mut req = request("mock-sampling-oa", &msgs, false);
    req.sampling = sampling.clone();
    oa.chat(&req, &Sink::new(&c)).await.unwrap();
    let b = &requests(&base, "mock-sampling-oa").await[0]["body"];
    assert_eq!(b["top_p"], 0.25);
    assert_eq!(b["stop"], json!(["END", "\n\n"]));
    assert_eq!(b["seed"], 42);
    assert_eq!(
        (
            b["presence_penalty"].clone(),
            b["frequency_penalty"].clone()
        ),
        (json!(0.5), json!(-0.5))
    );
    assert_eq!(b["response_format"], json!({"type": "json_object"}));
    assert_eq!(b["reasoning_effort"], "low");
    let r = &requests(&base, "mock-wire-oa").await[0];
    for k in std::iter::once("top_p").chain(NOT_ON_ANTHROPIC) {
        assert!(r["body"].get(k).is_none(), "{k} only when given");
    }

    let mut req = request("mock-sampling-an", &msgs, false);
    req.sampling = Sampling {
        response_format: Some(json!({"type": "text"})),
        ..sampling
    };
    an.chat(&req, &Sink::new(&c)).await.unwrap();
    let b = &requests(&base, "mock-sampling-an").await[0]["body"];
    assert_eq!(b["top_p"], 0.25);
    // a stop sequence of whitespace only is refused by Anthropic: left out
    assert_eq!(b["stop_sequences"], json!(["END"]));
    for k in NOT_ON_ANTHROPIC {
        assert!(b.get(k).is_none(), "Anthropic has no {k}");
    }
    // with a temperature, top_p is left out (current Claude models refuse both)
    req.model = "mock-sampling-an-2";
    req.temperature = Some(0.5);
    req.sampling.stop = vec!["\n".into()];
    an.chat(&req, &Sink::new(&c)).await.unwrap();
    let b = &requests(&base, "mock-sampling-an-2").await[0]["body"];
    assert_eq!(b["temperature"], 0.5);
    assert!(b.get("top_p").is_none(), "{b}");
    assert!(b.get("stop_sequences").is_none(), "{b}");
    stop.cancel();
}

#[tokio::test]
async fn anthropic_json_mode_is_a_forced_tool_call_whose_input_is_the_reply() {
    let (base, stop) = mock().await;
    let an = adapter(Format::Anthropic, &base);
    let msgs = user("find the weather");
    let schema = json!({"type": "object", "properties": {"text": {"type": "string"}}});
    for (stream, format) in [
        (true, json!({"type": "json_object"})),
        (
            false,
            json!({"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}),
        ),
    ] {
        let model = format!("mock-json-{stream}");
        let (c, rx) = ctx();
        let mut req = request(&model, &msgs, stream);
        req.sampling.response_format = Some(format.clone());
        let out = an.chat(&req, &Sink::new(&c)).await.unwrap();
        let reply: Value = serde_json::from_str(&out.text).unwrap();
        assert_eq!(
            reply,
            json!({"text": "find the weather"}),
            "stream={stream}"
        );
        assert_eq!(out.finish_reason, "stop");
        assert!(out.tool_calls.is_empty());
        drop(c);
        let seen = drain(rx);
        assert_eq!(text_of(&seen), out.text, "the JSON streams as text");
        assert!(
            !seen.iter().any(|s| matches!(s, Seen::Event(..))),
            "{seen:?}"
        );
        let sent = &requests(&base, &model).await[0]["body"];
        assert_eq!(
            sent["tool_choice"],
            json!({"type": "tool", "name": "json_reply"})
        );
        let want = if stream {
            json!({"type": "object"})
        } else {
            schema.clone()
        };
        assert_eq!(sent["tools"][0]["input_schema"], want);
        assert!(sent.get("response_format").is_none());
    }
    // what cannot be emulated is refused before any request
    let tools: Vec<ToolSpec> =
        serde_json::from_value(json!([{"type": "function", "function": {"name": "f"}}])).unwrap();
    let (c, _rx) = ctx();
    let mut req = request("mock-json-refused", &msgs, false);
    req.sampling.response_format = Some(json!({"type": "json_object"}));
    req.tools = &tools;
    let e = an.chat(&req, &Sink::new(&c)).await.unwrap_err();
    assert_eq!(e.failure, Failure::BadRequest, "{e}");
    req.tools = &[];
    req.sampling.response_format = Some(
        json!({"type": "json_schema", "json_schema": {"name": "l", "schema": {"type": "array"}}}),
    );
    let e = an.chat(&req, &Sink::new(&c)).await.unwrap_err();
    assert!(e.message.contains("object"), "{e}");
    assert!(requests(&base, "mock-json-refused").await.is_empty());
    stop.cancel();
}

/// llama.cpp sends an error on a 200 stream in an `error:` field, which SSE readers drop, then
/// `[DONE]`: a stream that carried no reply at all fails instead of answering empty text.
#[tokio::test]
async fn a_stream_without_a_reply_fails_rather_than_answering_nothing() {
    let body = "error: {\"code\":400,\"message\":\"the request exceeds the available context size\",\"type\":\"exceed_context_size_error\"}\n\ndata: [DONE]\n\n";
    let base = raw_server(vec![(Duration::ZERO, body.to_string())]).await;
    let p = adapter(Format::OpenAi, &base);
    let msgs = user("x");
    let (c, _rx) = ctx();
    let e = p
        .chat(&request("m", &msgs, true), &Sink::new(&c))
        .await
        .unwrap_err();
    assert_eq!(e.failure, Failure::Stream, "{}", e.message);
}

/// A reasoning model's thinking (`reasoning_content`) is not the reply, but it shows the call
/// is alive: the first-token limit does not cut a model that thinks longer than it.
#[tokio::test]
async fn thinking_keeps_a_call_alive_before_its_first_token() {
    let chunk = |delta: Value, fin: Value| {
        let c = json!({"choices": [{"index": 0, "delta": delta, "finish_reason": fin}]});
        format!("data: {c}\n\n")
    };
    let step = Duration::from_millis(300);
    // OpenRouter's field, DeepSeek's, and both at once (some servers send both)
    let fields = [
        json!({"reasoning": "a"}),
        json!({"reasoning_content": "b"}),
        json!({"reasoning": "c", "reasoning_content": "c"}),
    ];
    let mut parts: Vec<(Duration, String)> = (0..6)
        .map(|i| (step, chunk(fields[i % 3].clone(), Value::Null)))
        .collect();
    parts.push((step, chunk(json!({"content": "answer"}), json!("stop"))));
    parts.push((Duration::ZERO, "data: [DONE]\n\n".to_string()));
    let base = raw_server(parts).await;
    let p = adapter(Format::OpenAi, &base);
    let msgs = user("x");
    let mut req = request("m", &msgs, true);
    // 2.1 s of thinking against a 1 s first-token limit (and 0.8 s between events)
    req.ttft_timeout = Duration::from_secs(1);
    let (c, _rx) = ctx();
    let out = p.chat(&req, &Sink::new(&c)).await.unwrap();
    assert_eq!(out.text, "answer", "the thinking is not the reply");
    assert_eq!(out.finish_reason, "stop");
}

/// A body that starts with a UTF-8 byte order mark (some proxies add one) is read like any
/// other: the SSE parser sliced the mark as one byte and panicked, in both formats. And a
/// provider that sends a line without end fails the call once the line passes its bound,
/// before its time limit, instead of being buffered without bound.
#[tokio::test]
async fn a_byte_order_mark_is_skipped_and_endless_lines_are_refused() {
    let openai = "\u{feff}data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    let anthropic = concat!(
        "\u{feff}event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    for (format, body) in [(Format::OpenAi, openai), (Format::Anthropic, anthropic)] {
        // the mark in a packet of its own
        let (a, b) = body.split_at(3);
        let base = raw_server(vec![
            (Duration::ZERO, a.to_string()),
            (Duration::from_millis(20), b.to_string()),
        ])
        .await;
        let p = adapter(format, &base);
        let msgs = user("x");
        let (c, _rx) = ctx();
        let out = p
            .chat(&request("m", &msgs, true), &Sink::new(&c))
            .await
            .unwrap();
        assert_eq!(out.text, "hi", "{format:?}");
    }

    let endless = format!("data: {}", "x".repeat(3 << 20));
    let base = raw_server(vec![(Duration::ZERO, endless)]).await;
    let p = adapter(Format::OpenAi, &base);
    let msgs = user("x");
    let mut req = request("m", &msgs, true);
    req.ttft_timeout = Duration::from_secs(60);
    let (c, _rx) = ctx();
    let e = p.chat(&req, &Sink::new(&c)).await.unwrap_err();
    assert_eq!(e.failure, Failure::Stream, "{}", e.message);
    assert!(e.message.contains("larger than"), "{}", e.message);
}
