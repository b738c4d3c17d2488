//! Usage a provider reports late or not at all: what the adapters count then.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use switchyard_worker::llm::{LlmProvider, OpenAi, Sink};

use crate::contract::{adapter, Format};
use crate::support::*;

/// Usage a provider reports late or not at all: an Anthropic-compatible server that sends its
/// prompt count only in `message_delta` (0 in `message_start`), and an OpenAI endpoint without
/// usage whose reply is only a tool call (the estimate counted the reply's text alone: 0).
#[tokio::test]
async fn late_or_missing_usage_still_counts_prompt_and_tool_calls() {
    let anthropic = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":4522,\"output_tokens\":5}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let base = raw_server(vec![(Duration::ZERO, anthropic.to_string())]).await;
    let msgs = user("x");
    let (c, _rx) = ctx();
    let out = adapter(Format::Anthropic, &base)
        .chat(&request("m", &msgs, true), &Sink::new(&c))
        .await
        .unwrap();
    assert_eq!(
        (out.usage.prompt_tokens, out.usage.completion_tokens),
        (4522, 5)
    );

    let args = format!("{{\"path\":\"{}\"}}", "a".repeat(200));
    let call = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1",
        "type": "function", "function": {"name": "read_file", "arguments": args}}]},
        "finish_reason": "tool_calls"}]});
    let base = raw_server(vec![(
        Duration::ZERO,
        format!("data: {call}\n\ndata: [DONE]\n\n"),
    )])
    .await;
    let url = format!("{base}/v1");
    let p = OpenAi::new(&url, None, BTreeMap::new(), Duration::from_secs(2)).stream_usage(false);
    let (c, _rx) = ctx();
    let out = p
        .chat(&request("m", &msgs, true), &Sink::new(&c))
        .await
        .unwrap();
    assert_eq!(out.tool_calls.len(), 1);
    assert!(out.usage.estimated);
    assert!(
        out.usage.completion_tokens >= 50,
        "200 characters of arguments: {:?}",
        out.usage
    );
}
