//! Anthropic Messages, native: system prompt apart, tool use and tool results as content
//! blocks, streaming events `message_start` … `message_stop` (with `ping` and mid-stream
//! `error`). The wire format stays private to this module.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use switchyard_core::job::{ChatMessage, FunctionCall, ToolCall};
use tokio::time::Instant;

use super::sse::{body_json, classify, reader, send, Endpoint};
use super::{ChatOutput, Failure, LlmProvider, ProviderError, ProviderRequest, Sink, Usage};

const VERSION: &str = "2023-06-01";

pub struct Anthropic {
    ep: Endpoint,
}

impl Anthropic {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        headers: BTreeMap<String, String>,
        connect_timeout: Duration,
    ) -> Self {
        Anthropic {
            ep: Endpoint::new(base_url, api_key, headers, connect_timeout),
        }
    }
}

/// Our messages in Anthropic's shape: system turns joined into `system`, tool calls as
/// `tool_use` blocks, tool results as `tool_result` blocks in a user turn, consecutive turns of
/// one role merged. A tool call's `input` must be a JSON object: arguments that are not one
/// (a call cut short by `max_tokens`, another provider's or a client's malformed string) go
/// as `{"_raw_arguments": "<the string>"}` rather than failing every later turn of the
/// conversation, or being dropped; empty arguments are `{}`.
fn wire_messages(messages: &[ChatMessage]) -> (Option<String>, Vec<Value>) {
    let mut system: Vec<&str> = Vec::new();
    let mut out: Vec<(String, Vec<Value>)> = Vec::new();
    for m in messages {
        let (role, blocks) = match m.role.as_str() {
            "system" => {
                system.push(&m.content);
                continue;
            }
            "tool" => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": m.tool_call_id.as_deref().unwrap_or_default(),
                    "content": m.content,
                })],
            ),
            "assistant" => {
                let mut b = text_block(&m.content);
                for c in m.tool_calls.iter().flatten() {
                    b.push(
                        json!({"type": "tool_use", "id": c.id, "name": c.function.name,
                                  "input": tool_input(&c.id, &c.function.arguments)}),
                    );
                }
                ("assistant", b)
            }
            _ => ("user", text_block(&m.content)),
        };
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((r, b)) if r == role => b.extend(blocks),
            _ => out.push((role.to_string(), blocks)),
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    let msgs = out
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    (system, msgs)
}

/// A tool call's arguments as Anthropic's `input` object (see [`wire_messages`]).
fn tool_input(id: &str, args: &str) -> Value {
    if args.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(args) {
        Ok(v) if v.is_object() => v,
        _ => {
            tracing::warn!(tool_call = %id, "tool-call arguments are not a JSON object; sent as _raw_arguments");
            json!({ "_raw_arguments": args })
        }
    }
}

/// A text block, or none for empty or blank text (which the Messages API refuses with 400,
/// where OpenAI's accepts it); a turn left without blocks is left out.
fn text_block(text: &str) -> Vec<Value> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    vec![json!({"type": "text", "text": text})]
}

fn wire_tool_choice(c: &Value) -> Option<Value> {
    match c {
        Value::String(s) if s == "auto" => Some(json!({"type": "auto"})),
        Value::String(s) if s == "required" => Some(json!({"type": "any"})),
        Value::String(s) if s == "none" => Some(json!({"type": "none"})),
        Value::Object(_) => c["function"]["name"]
            .as_str()
            .map(|n| json!({"type": "tool", "name": n})),
        _ => None,
    }
}

fn finish_reason(stop: Option<&str>) -> String {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // the reply was cut by the model's window: as cut as by `max_tokens`
        Some("model_context_window_exceeded") => "length",
        // "end_turn", "stop_sequence"
        _ => "stop",
    }
    .to_string()
}

/// Blocks of a streamed reply, by index.
enum Block {
    Text,
    Tool(ToolCall),
    /// The forced call of [`JSON_TOOL`]: its input is the reply's text.
    JsonReply,
}

/// The tool a JSON `response_format` becomes: the Messages API has no JSON mode, so the model
/// is made to call this tool, whose input (a JSON object, by the schema when one is given) is
/// returned as the reply's text.
const JSON_TOOL: &str = "json_reply";

/// The [`JSON_TOOL`] definition when the request asks for JSON; refuses what cannot be
/// emulated (the caller's own tools beside it, a schema whose top level is not an object).
fn json_reply_tool(req: &ProviderRequest<'_>) -> Result<Option<Value>, ProviderError> {
    if !req.sampling.wants_json() {
        return Ok(None);
    }
    let refuse = |why: &str| {
        Err(ProviderError::new(
            Failure::BadRequest,
            format!("response_format on an Anthropic model: {why}"),
        ))
    };
    if !req.tools.is_empty() {
        return refuse("not together with tools (it is emulated with a forced tool call)");
    }
    let format = req
        .sampling
        .response_format
        .as_ref()
        .unwrap_or(&Value::Null);
    let schema = match &format["json_schema"]["schema"] {
        Value::Null => json!({"type": "object"}),
        s if s["type"] == "object" => s.clone(),
        _ => return refuse("the schema's top level must be an object"),
    };
    Ok(Some(json!({
        "name": JSON_TOOL,
        "description": "Reply with a JSON object (the whole answer).",
        "input_schema": schema,
    })))
}

impl Anthropic {
    async fn streamed(
        &self,
        resp: reqwest::Response,
        started: Instant,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
        json_mode: bool,
    ) -> Result<ChatOutput, ProviderError> {
        let mut events = reader(resp, started, req.ttft_timeout, req.idle_timeout);
        let mut text = String::new();
        let mut blocks: BTreeMap<u64, Block> = BTreeMap::new();
        let (mut input_tokens, mut output_tokens) = (0u64, 0u64);
        let mut stop: Option<String> = None;
        let mut stopped = false;
        while let Some(ev) = events.next().await? {
            if ev.data.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&ev.data).map_err(|e| {
                ProviderError::new(Failure::Stream, format!("unparseable stream event: {e}"))
            })?;
            let kind = v["type"].as_str().unwrap_or(ev.event.as_str());
            match kind {
                "message_start" => {
                    let u = &v["message"]["usage"];
                    input_tokens = prompt_tokens(u);
                    output_tokens = u["output_tokens"].as_u64().unwrap_or(0);
                }
                "content_block_start" => {
                    let i = v["index"].as_u64().unwrap_or(0);
                    let b = &v["content_block"];
                    let block = if json_mode && b["name"] == JSON_TOOL {
                        Block::JsonReply
                    } else if b["type"] == "tool_use" {
                        events.token();
                        Block::Tool(ToolCall {
                            id: b["id"].as_str().unwrap_or_default().to_string(),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: b["name"].as_str().unwrap_or_default().to_string(),
                                arguments: String::new(),
                            },
                        })
                    } else {
                        Block::Text
                    };
                    blocks.insert(i, block);
                }
                "content_block_delta" => {
                    let i = v["index"].as_u64().unwrap_or(0);
                    let d = &v["delta"];
                    match (d["type"].as_str(), blocks.get_mut(&i)) {
                        // a forced tool call has no text beside it; keep the reply pure JSON
                        (Some("text_delta"), _) if !json_mode => {
                            let t = d["text"].as_str().unwrap_or_default().to_string();
                            if !t.is_empty() {
                                events.token();
                                text.push_str(&t);
                                sink.text(t).await;
                            }
                        }
                        (Some("input_json_delta"), Some(Block::JsonReply)) => {
                            let t = d["partial_json"].as_str().unwrap_or_default().to_string();
                            if !t.is_empty() {
                                events.token();
                                text.push_str(&t);
                                sink.text(t).await;
                            }
                        }
                        // extended thinking: not the reply, but the call is alive and it is
                        // billed as output
                        (Some("thinking_delta"), _) => {
                            let t = d["thinking"].as_str().unwrap_or_default();
                            if !t.is_empty() {
                                events.token();
                                sink.progress(t);
                            }
                        }
                        (Some("input_json_delta"), Some(Block::Tool(c))) => {
                            events.token();
                            let part = d["partial_json"].as_str().unwrap_or_default();
                            sink.progress(part);
                            c.function.arguments.push_str(part);
                        }
                        _ => {}
                    }
                }
                "message_delta" => {
                    if let Some(s) = v["delta"]["stop_reason"].as_str() {
                        stop = Some(s.to_string());
                    }
                    if let Some(o) = v["usage"]["output_tokens"].as_u64() {
                        output_tokens = o;
                    }
                    // cumulative like the output count; some compatible servers send 0 in
                    // `message_start` and the real prompt count only here
                    input_tokens = input_tokens.max(prompt_tokens(&v["usage"]));
                }
                "message_stop" => {
                    stopped = true;
                    break;
                }
                "error" => return Err(classify(None, &ev.data)),
                _ => {} // ping, content_block_stop, and event types added later
            }
        }
        if !stopped {
            return Err(ProviderError::new(
                Failure::Stream,
                "provider stream ended before message_stop",
            ));
        }
        let calls = tool_calls(blocks);
        for (i, c) in calls.iter().enumerate() {
            sink.tool_call(i, c).await;
        }
        Ok(ChatOutput {
            text,
            finish_reason: reply_finish(stop.as_deref(), json_mode),
            tool_calls: calls,
            usage: Usage::new(input_tokens, output_tokens),
            refusal: None,
        })
    }

    async fn whole(
        &self,
        resp: reqwest::Response,
        started: Instant,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
        json_mode: bool,
    ) -> Result<ChatOutput, ProviderError> {
        let v = body_json(resp, started, req.ttft_timeout).await?;
        let mut text = String::new();
        let mut blocks = BTreeMap::new();
        for (i, b) in v["content"].as_array().into_iter().flatten().enumerate() {
            match b["type"].as_str() {
                Some("text") if !json_mode => text.push_str(b["text"].as_str().unwrap_or_default()),
                Some("tool_use") if json_mode && b["name"] == JSON_TOOL => {
                    text.push_str(&b["input"].to_string())
                }
                Some("tool_use") => {
                    blocks.insert(
                        i as u64,
                        Block::Tool(ToolCall {
                            id: b["id"].as_str().unwrap_or_default().to_string(),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: b["name"].as_str().unwrap_or_default().to_string(),
                                arguments: b["input"].to_string(),
                            },
                        }),
                    );
                }
                _ => {}
            }
        }
        sink.text(text.clone()).await;
        let calls = tool_calls(blocks);
        for (i, c) in calls.iter().enumerate() {
            sink.tool_call(i, c).await;
        }
        let u = &v["usage"];
        Ok(ChatOutput {
            text,
            finish_reason: reply_finish(v["stop_reason"].as_str(), json_mode),
            tool_calls: calls,
            usage: Usage::new(prompt_tokens(u), u["output_tokens"].as_u64().unwrap_or(0)),
            refusal: None,
        })
    }
}

/// The prompt's tokens of a `usage` object: those read from and written to Anthropic's prompt
/// cache are counted apart from `input_tokens`.
fn prompt_tokens(u: &Value) -> u64 {
    [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
    .iter()
    .map(|k| u[*k].as_u64().unwrap_or(0))
    .sum()
}

fn tool_calls(blocks: BTreeMap<u64, Block>) -> Vec<ToolCall> {
    blocks
        .into_values()
        .filter_map(|b| match b {
            Block::Tool(mut c) => {
                if c.function.arguments.is_empty() {
                    c.function.arguments = "{}".into();
                }
                Some(c)
            }
            Block::Text | Block::JsonReply => None,
        })
        .collect()
}

/// The finish reason; the forced [`JSON_TOOL`] call is the reply, not a tool call.
fn reply_finish(stop: Option<&str>, json_mode: bool) -> String {
    match stop {
        Some("tool_use") if json_mode => "stop".into(),
        s => finish_reason(s),
    }
}

#[async_trait]
impl LlmProvider for Anthropic {
    async fn chat(
        &self,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
    ) -> Result<ChatOutput, ProviderError> {
        let json_tool = json_reply_tool(req)?;
        let (system, messages) = wire_messages(req.messages);
        let mut body = json!({
            "model": req.model,
            "max_tokens": req.max_tokens,
            "messages": messages,
            "stream": req.stream,
        });
        if let Some(s) = system {
            body["system"] = s.into();
        }
        if let Some(t) = req.temperature {
            body["temperature"] = t.min(1.0).into();
        }
        // seed, the penalties and reasoning_effort have no counterpart in the Messages API;
        // current Claude models refuse `temperature` and `top_p` together (clients send both,
        // often `top_p: 1`): the temperature wins
        if let Some(p) = req.sampling.top_p.filter(|_| req.temperature.is_none()) {
            body["top_p"] = p.into();
        }
        // Anthropic refuses stop sequences of whitespace only (OpenAI takes "\n")
        let stops: Vec<&String> = req
            .sampling
            .stop
            .iter()
            .filter(|s| !s.trim().is_empty())
            .collect();
        if !stops.is_empty() {
            body["stop_sequences"] = json!(stops);
        }
        if !req.tools.is_empty() {
            body["tools"] = req
                .tools
                .iter()
                .map(|t| {
                    json!({
                        "name": t.function.name,
                        "description": t.function.description.clone().unwrap_or_default(),
                        "input_schema": t.function.parameters.clone()
                            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                    })
                })
                .collect();
            if let Some(c) = req.tool_choice.and_then(wire_tool_choice) {
                body["tool_choice"] = c;
            }
            if req.parallel_tool_calls == Some(false) {
                // Anthropic says it inside the tool choice (which `none` cannot carry)
                if body.get("tool_choice").is_none() {
                    body["tool_choice"] = json!({"type": "auto"});
                }
                if body["tool_choice"]["type"] != "none" {
                    body["tool_choice"]["disable_parallel_tool_use"] = true.into();
                }
            }
        }
        let json_mode = json_tool.is_some();
        if let Some(tool) = json_tool {
            body["tools"] = json!([tool]);
            body["tool_choice"] = json!({"type": "tool", "name": JSON_TOOL});
        }
        let mut http = self
            .ep
            .post("messages", req.headers)
            .header("anthropic-version", VERSION)
            .json(&body);
        if let Some(k) = &self.ep.api_key {
            http = http.header("x-api-key", k.expose_secret());
        }
        let started = Instant::now();
        let resp = send(http, req.ttft_timeout).await?;
        sink.accepted();
        if req.stream {
            self.streamed(resp, started, req, sink, json_mode).await
        } else {
            self.whole(resp, started, req, sink, json_mode).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_in_openai_s_words() {
        let f = |s: &str| finish_reason(Some(s));
        assert_eq!(f("end_turn"), "stop");
        assert_eq!(f("max_tokens"), "length");
        assert_eq!(f("model_context_window_exceeded"), "length", "a cut reply");
        assert_eq!(f("tool_use"), "tool_calls");
        assert_eq!(f("refusal"), "content_filter");
    }

    #[test]
    fn messages_in_anthropic_shape() {
        let mut asst = ChatMessage::new("assistant", "");
        asst.tool_calls = Some(vec![ToolCall {
            id: "t1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "lookup".into(),
                arguments: r#"{"q":"x"}"#.into(),
            },
        }]);
        let mut tool = ChatMessage::new("tool", "42");
        tool.tool_call_id = Some("t1".into());
        let (system, msgs) = wire_messages(&[
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "a"),
            ChatMessage::new("user", "b"),
            asst,
            tool,
        ]);
        assert_eq!(system.as_deref(), Some("be brief"));
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0]["content"].as_array().unwrap().len(), 2);
        assert_eq!(msgs[1]["content"][0]["type"], "tool_use");
        assert_eq!(msgs[1]["content"][0]["input"]["q"], "x");
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"][0]["tool_use_id"], "t1");
    }

    #[test]
    fn tool_call_arguments_that_are_not_an_object_are_kept_raw() {
        let call = |args: &str| {
            let mut asst = ChatMessage::new("assistant", "");
            asst.tool_calls = Some(vec![ToolCall {
                id: "t9".into(),
                kind: "function".into(),
                function: FunctionCall {
                    name: "lookup".into(),
                    arguments: args.into(),
                },
            }]);
            wire_messages(&[ChatMessage::new("user", "a"), asst]).1[1]["content"][0]["input"]
                .clone()
        };
        assert_eq!(call(" "), json!({}));
        assert_eq!(call(r#"{"q": 1}"#), json!({"q": 1}));
        for bad in [r#"{"q": "#, "[1, 2]", "\"x\"", "null"] {
            assert_eq!(call(bad), json!({"_raw_arguments": bad}), "{bad}");
        }
    }

    #[test]
    fn blank_text_is_left_out_and_turns_without_blocks_too() {
        let (_, msgs) = wire_messages(&[
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", " \n"),
            ChatMessage::new("user", ""),
            ChatMessage::new("user", "b"),
        ]);
        assert_eq!(
            msgs,
            [json!({"role": "user", "content": [
                {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})]
        );
    }

    #[test]
    fn prompt_tokens_count_the_cache_s_reads_and_writes() {
        let u = json!({"input_tokens": 5, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20, "output_tokens": 9});
        assert_eq!(prompt_tokens(&u), 125);
        assert_eq!(prompt_tokens(&json!({"input_tokens": 7})), 7);
    }

    #[test]
    fn tool_choice_and_stop_reasons() {
        assert_eq!(
            wire_tool_choice(&json!("required")),
            Some(json!({"type": "any"}))
        );
        assert_eq!(
            wire_tool_choice(&json!({"type": "function", "function": {"name": "f"}})),
            Some(json!({"type": "tool", "name": "f"}))
        );
        assert_eq!(finish_reason(Some("max_tokens")), "length");
        assert_eq!(finish_reason(Some("tool_use")), "tool_calls");
        assert_eq!(finish_reason(Some("end_turn")), "stop");
    }
}
