//! OpenAI Chat Completions wire types: the request subset the mock reads, and
//! builders for responses, stream chunks and error bodies.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::scenario::ErrorSpec;
use crate::text::Reply;

/// The part of a chat completion request the mock looks at; unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// A string or an array of strings.
    #[serde(default)]
    pub stop: Option<Value>,
    /// `{"type": "function", "function": {"name": ..}}` forces a call of that tool.
    #[serde(default)]
    pub tool_choice: Option<Value>,
}

impl ChatRequest {
    /// The stop sequences (`stop` as a string or an array).
    pub fn stop_list(&self) -> Vec<String> {
        match &self.stop {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The effective token limit (`max_completion_tokens` wins over `max_tokens`).
    pub fn token_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The name of the first tool (`tools[0].function.name`).
    pub fn first_tool_name(&self) -> Option<&str> {
        self.tools
            .as_ref()?
            .first()?
            .get("function")?
            .get("name")?
            .as_str()
    }

    /// The tool `tool_choice` forces, when it is one of `tools`.
    pub fn forced_tool(&self) -> Option<&str> {
        let name = self
            .tool_choice
            .as_ref()?
            .get("function")?
            .get("name")?
            .as_str()?;
        self.tools
            .as_ref()?
            .iter()
            .any(|t| t["function"]["name"].as_str() == Some(name))
            .then_some(name)
    }

    /// Whether the last message is a tool result (role `tool`).
    pub fn ends_with_tool_result(&self) -> bool {
        self.messages.last().is_some_and(|m| m.role == "tool")
    }

    /// Messages flattened to `(role, text)` pairs.
    pub fn message_pairs(&self) -> Vec<(String, String)> {
        self.messages
            .iter()
            .map(|m| (m.role.clone(), content_text(m.content.as_ref())))
            .collect()
    }
}

/// One chat message; `content` may be a string, an array of content parts, or null.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Text of a message's content: a plain string, or the `text` of each content
/// part joined by single spaces; anything else counts as empty.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Fields shared by every response object of one completion.
#[derive(Debug, Clone)]
pub(crate) struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub(crate) fn usage_json(r: &Reply) -> Value {
    let prompt = r.prompt_tokens();
    let completion = r.completion_tokens();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    })
}

/// The non-streaming `chat.completion` object.
pub(crate) fn completion_json(meta: &ResponseMeta, r: &Reply) -> Value {
    let (message, finish_reason) = match r {
        Reply::Text(c) => (
            json!({ "role": "assistant", "content": c.text() }),
            c.finish_reason,
        ),
        Reply::Tool(t) => (
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": t.id,
                    "type": "function",
                    "function": { "name": t.name, "arguments": t.arguments },
                }],
            }),
            "tool_calls",
        ),
    };
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage_json(r),
    })
}

/// A `chat.completion.chunk` with a single choice; `bare` leaves out `object`
/// and `created`, as some OpenAI-compatible servers do.
pub(crate) fn chunk_json(
    meta: &ResponseMeta,
    delta: Value,
    finish_reason: Option<&str>,
    bare: bool,
) -> Value {
    let mut chunk = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
    });
    if bare {
        if let Some(o) = chunk.as_object_mut() {
            o.remove("object");
            o.remove("created");
        }
    }
    chunk
}

/// The trailing usage chunk: `choices: []` as OpenAI sends it when
/// `stream_options.include_usage` is true, or `bare` (`choices: null`, no
/// `object`/`created`) as some compatible servers send it.
pub(crate) fn usage_chunk_json(meta: &ResponseMeta, r: &Reply, bare: bool) -> Value {
    if bare {
        return json!({
            "id": meta.id,
            "model": meta.model,
            "choices": null,
            "usage": usage_json(r),
        });
    }
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage_json(r),
    })
}

/// The error object `mock-midstream-error` sends in the stream (or as the
/// body of an HTTP 200).
pub(crate) fn midstream_error_json() -> Value {
    json!({
        "error": {
            "message": "mock-midstream-error: simulated server error in the middle of the response",
            "type": "server_error",
            "param": null,
            "code": null,
        }
    })
}

/// An OpenAI-style error response: `{"error":{"message","type","param","code"}}`.
pub(crate) fn error_response(spec: &ErrorSpec) -> Response {
    let body = json!({
        "error": {
            "message": spec.openai_message,
            "type": spec.openai_type,
            "param": null,
            "code": spec.openai_code,
        }
    });
    let mut resp = (spec.status, Json(body)).into_response();
    if let Some(secs) = spec.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}
