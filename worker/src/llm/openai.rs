//! OpenAI Chat Completions, and OpenAI-compatible servers (Ollama, vLLM, llama.cpp, OpenRouter,
//! Azure-style URLs): streaming with `include_usage` or not, tool calls, and the variants those
//! servers produce (`choices: null`, `:` comment lines, an error object after HTTP 200).
//! The wire format stays private to this module.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::job::{ChatMessage, FunctionCall, Sampling, ToolCall, ToolSpec};
use switchyard_core::models::TokenLimitField;
use tokio::time::Instant;

use super::sse::{body_json, classify, reader, send, Endpoint};
use super::{
    estimate_calls, estimate_prompt, estimate_tokens, ChatOutput, Failure, LlmProvider,
    ProviderError, ProviderRequest, Sink, Usage,
};

/// An OpenAI-format endpoint.
pub struct OpenAi {
    ep: Endpoint,
    /// Where the reply budget goes (`max_tokens` unless set).
    budget_field: TokenLimitField,
    /// Ask for usage in the stream (`stream_options`); servers that refuse the field (Azure
    /// OpenAI's api-versions before 2024-09-01-preview) get none and usage is estimated.
    stream_usage: bool,
}

impl OpenAi {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        headers: BTreeMap<String, String>,
        connect_timeout: Duration,
    ) -> Self {
        OpenAi {
            ep: Endpoint::new(base_url, api_key, headers, connect_timeout),
            budget_field: TokenLimitField::MaxTokens,
            stream_usage: true,
        }
    }

    /// Whether to send `stream_options.include_usage` (see the field).
    pub fn stream_usage(mut self, on: bool) -> Self {
        self.stream_usage = on;
        self
    }

    /// Sends the reply budget in `field` (OpenAI's reasoning models need
    /// `max_completion_tokens`).
    pub fn budget_field(mut self, field: TokenLimitField) -> Self {
        self.budget_field = field;
        self
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(flatten)]
    sampling: &'a Sampling,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: &'a [ToolSpec],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize, Default)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
    /// A reasoning model's thinking (DeepSeek and vLLM: `reasoning_content`; OpenRouter:
    /// `reasoning`; some servers send both): not the reply, but the call is alive (the
    /// first-token limit is met).
    #[serde(default)]
    reasoning_content: Option<Value>,
    #[serde(default)]
    reasoning: Option<Value>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    /// A string of JSON; a server that sends the object itself gets it re-encoded.
    #[serde(default, deserialize_with = "arguments_text")]
    arguments: Option<String>,
}

fn arguments_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

#[derive(Deserialize, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// Most tool calls kept from one reply.
const MAX_TOOL_CALLS: usize = 128;

/// Tool calls assembled from their streamed fragments. A fragment continues the call of its
/// `index` unless it brings a new id: servers that stream parallel calls all under index 0
/// (Ollama, SGLang) start each with its own id. Indexes are only labels (SGLang numbers a
/// call by its tool's position in the request), never positions to fill up to.
#[derive(Default)]
struct ToolCalls {
    calls: Vec<ToolCall>,
    /// The provider's index of each call.
    index: Vec<Option<usize>>,
}

impl ToolCalls {
    fn apply(&mut self, d: ToolCallDelta) {
        let id = d.id.filter(|s| !s.is_empty());
        let new_id = |c: &ToolCall| {
            id.as_ref()
                .is_some_and(|id| !c.id.is_empty() && &c.id != id)
        };
        let slot = match d.index {
            Some(i) => self
                .index
                .iter()
                .rposition(|&x| x == Some(i))
                .filter(|&at| !new_id(&self.calls[at])),
            // servers that leave `index` out (Gemini's compatible endpoint): a fragment
            // with a new id starts the next call, one without continues the last
            None => self
                .calls
                .last()
                .filter(|c| !new_id(c))
                .map(|_| self.calls.len() - 1),
        };
        let slot = match slot {
            Some(at) => at,
            None if self.calls.len() >= MAX_TOOL_CALLS => return, // never grow without bound
            None => {
                self.calls.push(ToolCall {
                    id: String::new(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: String::new(),
                        arguments: String::new(),
                    },
                });
                self.index.push(d.index);
                self.calls.len() - 1
            }
        };
        let c = &mut self.calls[slot];
        if let Some(id) = id {
            c.id = id;
        }
        if let Some(f) = d.function {
            // a name comes whole in one fragment, in pieces, or (some servers) whole again
            // in every fragment: a repeat of the whole name is not appended
            if let Some(n) = f.name.filter(|n| *n != c.function.name) {
                c.function.name.push_str(&n);
            }
            if let Some(a) = f.arguments {
                c.function.arguments.push_str(&a);
            }
        }
    }

    /// The calls that have a name (a fragment of nothing, e.g. an empty first chunk under its
    /// own index, is not a call).
    fn done(self) -> Vec<ToolCall> {
        self.calls
            .into_iter()
            .filter(|c| !c.function.name.is_empty())
            .collect()
    }
}

/// The tool calls of a whole (not streamed) reply, read as leniently as streamed fragments
/// (servers add fields of their own); a list that cannot be read fails the call rather than
/// losing the calls.
fn whole_tool_calls(v: &Value) -> Result<Vec<ToolCall>, ProviderError> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    let parts: Vec<ToolCallDelta> = serde_json::from_value(v.clone()).map_err(|e| {
        ProviderError::new(
            Failure::Stream,
            format!("malformed tool_calls in the reply: {e}"),
        )
    })?;
    let mut calls = ToolCalls::default();
    for (i, mut p) in parts.into_iter().enumerate() {
        p.index = Some(i);
        calls.apply(p);
    }
    Ok(calls.done())
}

fn finish(
    text: String,
    finish: Option<String>,
    tool_calls: Vec<ToolCall>,
    usage: Option<WireUsage>,
    refusal: Option<String>,
    req: &ProviderRequest<'_>,
) -> ChatOutput {
    let usage = match usage {
        Some(u) => Usage::new(u.prompt_tokens, u.completion_tokens),
        // what a provider that reports no usage was sent (tool schemas included) and what it
        // answered (tool calls and refusals too)
        None => {
            let tools = match req.tools {
                [] => 0,
                t => estimate_tokens(&serde_json::to_string(t).unwrap_or_default()),
            };
            let prompt = estimate_prompt(req.messages) + tools;
            let reply = estimate_tokens(&text)
                + estimate_tokens(refusal.as_deref().unwrap_or_default())
                + estimate_calls(&tool_calls);
            Usage {
                estimated: true,
                ..Usage::new(prompt, reply)
            }
        }
    };
    let finish_reason = match finish {
        Some(f) => f,
        None if !tool_calls.is_empty() => "tool_calls".into(),
        None => "stop".into(),
    };
    ChatOutput {
        text,
        finish_reason,
        tool_calls,
        usage,
        refusal: refusal.filter(|r| !r.is_empty()),
    }
}

impl OpenAi {
    async fn streamed(
        &self,
        resp: reqwest::Response,
        started: Instant,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
    ) -> Result<ChatOutput, ProviderError> {
        let mut events = reader(resp, started, req.ttft_timeout, req.idle_timeout);
        let (mut text, mut fin, mut usage) = (String::new(), None, None);
        let mut refusal = String::new();
        let mut calls = ToolCalls::default();
        let mut done = false;
        while let Some(ev) = events.next().await? {
            let data = ev.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
                ProviderError::new(Failure::Stream, format!("unparseable stream chunk: {e}"))
            })?;
            if let Some(err) = chunk.error.filter(|e| !e.is_null()) {
                return Err(classify(
                    None,
                    &serde_json::json!({ "error": err }).to_string(),
                ));
            }
            if let Some(u) = chunk.usage {
                usage = Some(u);
            }
            for c in chunk.choices.unwrap_or_default() {
                if let Some(d) = c.delta {
                    if let Some(t) = d.content.filter(|t| !t.is_empty()) {
                        events.token();
                        text.push_str(&t);
                        sink.text(t).await;
                    }
                    if let Some(r) = d.refusal.filter(|r| !r.is_empty()) {
                        events.token();
                        sink.progress(&r);
                        refusal.push_str(&r);
                    }
                    if [&d.reasoning_content, &d.reasoning].iter().any(|r| {
                        r.as_ref()
                            .is_some_and(|r| r.as_str() != Some("") && !r.is_null())
                    }) {
                        events.token();
                        // thinking is billed as output: counted, though not part of the reply
                        for r in [&d.reasoning_content, &d.reasoning].into_iter().flatten() {
                            if let Some(t) = r.as_str() {
                                sink.progress(t);
                            }
                        }
                    }
                    for tc in d.tool_calls.unwrap_or_default() {
                        events.token();
                        if let Some(a) = tc.function.as_ref().and_then(|f| f.arguments.as_deref()) {
                            sink.progress(a);
                        }
                        calls.apply(tc);
                    }
                }
                if c.finish_reason.is_some() {
                    fin = c.finish_reason;
                }
            }
        }
        if !done && fin.is_none() {
            return Err(ProviderError::new(
                Failure::Stream,
                "provider stream ended before completion",
            ));
        }
        let calls = calls.done();
        if fin.is_none() && text.is_empty() && refusal.is_empty() && calls.is_empty() {
            // `[DONE]` and nothing else: no reply, no finish reason (llama.cpp sends its errors
            // on a 200 stream in an `error:` field, which SSE readers drop)
            return Err(ProviderError::new(
                Failure::Stream,
                "provider stream ended without a reply (an error it sent outside `data:` is lost)",
            ));
        }
        for (i, c) in calls.iter().enumerate() {
            sink.tool_call(i, c).await;
        }
        Ok(finish(text, fin, calls, usage, Some(refusal), req))
    }

    async fn whole(
        &self,
        resp: reqwest::Response,
        started: Instant,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
    ) -> Result<ChatOutput, ProviderError> {
        let v = body_json(resp, started, req.ttft_timeout).await?;
        let choice = &v["choices"][0];
        if choice.is_null() {
            return Err(ProviderError::new(Failure::Stream, "reply without choices"));
        }
        let msg = &choice["message"];
        let text = msg["content"].as_str().unwrap_or("").to_string();
        let calls = whole_tool_calls(&msg["tool_calls"])?;
        let usage: Option<WireUsage> = serde_json::from_value(v["usage"].clone()).ok();
        sink.text(text.clone()).await;
        for (i, c) in calls.iter().enumerate() {
            sink.tool_call(i, c).await;
        }
        let fin = choice["finish_reason"].as_str().map(str::to_string);
        let refusal = msg["refusal"].as_str().map(str::to_string);
        Ok(finish(text, fin, calls, usage, refusal, req))
    }
}

#[async_trait]
impl LlmProvider for OpenAi {
    async fn chat(
        &self,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
    ) -> Result<ChatOutput, ProviderError> {
        let budget = req.max_tokens_explicit.then_some(req.max_tokens);
        let body = WireRequest {
            model: req.model,
            messages: req.messages,
            max_tokens: budget.filter(|_| self.budget_field == TokenLimitField::MaxTokens),
            max_completion_tokens: budget
                .filter(|_| self.budget_field == TokenLimitField::MaxCompletionTokens),
            temperature: req.temperature,
            sampling: &req.sampling,
            tools: req.tools,
            tool_choice: req.tool_choice.filter(|_| !req.tools.is_empty()),
            // OpenAI refuses the flag without tools
            parallel_tool_calls: req.parallel_tool_calls.filter(|_| !req.tools.is_empty()),
            stream: req.stream,
            stream_options: (req.stream && self.stream_usage).then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let mut http = self.ep.post("chat/completions", req.headers).json(&body);
        if let Some(k) = &self.ep.api_key {
            http = http.bearer_auth(k.expose_secret());
        }
        let started = Instant::now();
        let resp = send(http, req.ttft_timeout).await?;
        sink.accepted();
        if req.stream {
            self.streamed(resp, started, req, sink).await
        } else {
            self.whole(resp, started, req, sink).await
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn streamed(fragments: Value) -> Vec<ToolCall> {
        let mut calls = ToolCalls::default();
        for f in serde_json::from_value::<Vec<ToolCallDelta>>(fragments).unwrap() {
            calls.apply(f);
        }
        calls.done()
    }

    fn summary(calls: &[ToolCall]) -> Vec<(&str, &str, &str)> {
        calls
            .iter()
            .map(|c| {
                let f = &c.function;
                (c.id.as_str(), f.name.as_str(), f.arguments.as_str())
            })
            .collect()
    }

    #[test]
    fn streamed_fragments_without_an_index_start_a_call_on_a_new_id() {
        let calls = streamed(json!([
            {"id": "a", "function": {"name": "f", "arguments": "{\"x\""}},
            {"function": {"arguments": ": 1}"}},
            {"id": "b", "function": {"name": "g", "arguments": "{}"}},
            {"id": "b", "function": {"arguments": ""}},
        ]));
        assert_eq!(
            summary(&calls),
            [("a", "f", "{\"x\": 1}"), ("b", "g", "{}")]
        );
        // with indexes, ids do not matter
        let calls = streamed(json!([
            {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}},
            {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}},
            {"index": 0, "function": {"arguments": "}"}},
        ]));
        assert_eq!(summary(&calls), [("a", "f", "{}"), ("b", "g", "{}")]);
    }

    #[test]
    fn parallel_calls_under_one_index_and_repeated_names_stay_apart() {
        // Ollama and SGLang: every parallel call under index 0, each with its own id
        let calls = streamed(json!([
            {"index": 0, "id": "a", "function": {"name": "write", "arguments": "{\"p\":1}"}},
            {"index": 0, "id": "b", "function": {"name": "write", "arguments": "{\"p\":2}"}},
        ]));
        assert_eq!(
            summary(&calls),
            [("a", "write", "{\"p\":1}"), ("b", "write", "{\"p\":2}")]
        );
        // the whole name in every fragment (MiniMax through NIM), names in pieces, and an
        // index that is the tool's position in the request: no empty calls before it
        let calls = streamed(json!([
            {"index": 3, "id": "a", "function": {"name": "read_file", "arguments": "{\"p\""}},
            {"index": 3, "function": {"name": "read_file", "arguments": ":1}"}},
            {"index": 5, "id": "b", "function": {"name": "list_", "arguments": ""}},
            {"index": 5, "function": {"name": "dir", "arguments": "{}"}},
        ]));
        assert_eq!(
            summary(&calls),
            [("a", "read_file", "{\"p\":1}"), ("b", "list_dir", "{}")]
        );
    }

    #[test]
    fn a_whole_reply_s_tool_calls_survive_fields_of_other_servers() {
        let calls = whole_tool_calls(&json!([
            {"index": 0, "id": "a", "type": "function", "extra_content": {"google": {}},
             "function": {"name": "f", "arguments": "{\"x\":1}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": 2}}},
        ]))
        .unwrap();
        assert_eq!(
            summary(&calls),
            [("a", "f", "{\"x\":1}"), ("b", "g", "{\"y\":2}")]
        );
        assert!(whole_tool_calls(&Value::Null).unwrap().is_empty());
        let e = whole_tool_calls(&json!({"not": "a list"})).unwrap_err();
        assert_eq!(e.failure, Failure::Stream);
    }
}
