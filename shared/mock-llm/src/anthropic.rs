//! `POST /v1/messages`: Anthropic Messages, plain JSON or SSE (`event:` +
//! `data:` lines: `message_start`, `content_block_*`, `ping`, `message_delta`,
//! `message_stop`), including `tool_use` answers and Anthropic's error shape.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::scenario::{Behaviour, ErrorSpec, Failure};
use crate::server::{self, AppState, Route};
use crate::stream::{self, sse_named, BodyPlan, Frame, SseParts};
use crate::text::Reply;
use crate::timing::{Rng, Timing};

const ROUTE: Route = Route::Anthropic;

/// The part of a Messages request the mock looks at; unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    /// A string or an array of `{type:"text",text}` blocks.
    #[serde(default)]
    system: Option<Value>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    /// `[{name, description, input_schema}]`.
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    /// `{"type": "tool", "name": ..}` forces a call of that tool, whatever the model.
    #[serde(default)]
    tool_choice: Option<Value>,
}

/// One message; `content` is a string or an array of blocks.
#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

fn block_type(block: &Value) -> Option<&str> {
    block.get("type").and_then(Value::as_str)
}

/// A string, or the `text` of each `text` block joined by single spaces.
fn blocks_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| block_type(b) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

impl MessagesRequest {
    /// The conversation as the `(role, text)` pairs OpenAI's route would see for
    /// it: `system` first, each `tool_result` block as a `tool` message (before
    /// the text of its user message, if any), the text blocks of a message as
    /// one message.
    fn message_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        if let Some(system) = &self.system {
            pairs.push(("system".to_owned(), blocks_text(system)));
        }
        for m in &self.messages {
            let Value::Array(blocks) = &m.content else {
                pairs.push((m.role.clone(), blocks_text(&m.content)));
                continue;
            };
            let mut results = 0;
            for b in blocks
                .iter()
                .filter(|b| block_type(b) == Some("tool_result"))
            {
                let content = b.get("content").unwrap_or(&Value::Null);
                pairs.push(("tool".to_owned(), blocks_text(content)));
                results += 1;
            }
            let has_text = blocks.iter().any(|b| block_type(b) == Some("text"));
            if m.role != "user" || has_text || results == 0 {
                pairs.push((m.role.clone(), blocks_text(&m.content)));
            }
        }
        pairs
    }

    fn first_tool_name(&self) -> Option<&str> {
        self.tools.as_ref()?.first()?.get("name")?.as_str()
    }

    /// The tool `tool_choice` forces, when it is one of `tools`.
    fn forced_tool(&self) -> Option<&str> {
        let c = self.tool_choice.as_ref()?;
        let name = c.get("name")?.as_str().filter(|_| c["type"] == "tool")?;
        self.tools
            .as_ref()?
            .iter()
            .any(|t| t.get("name").and_then(Value::as_str) == Some(name))
            .then_some(name)
    }

    /// Whether the last message is a user message carrying a `tool_result` block.
    fn ends_with_tool_result(&self) -> bool {
        self.messages.last().is_some_and(|m| {
            m.role == "user"
                && m.content
                    .as_array()
                    .is_some_and(|bs| bs.iter().any(|b| block_type(b) == Some("tool_result")))
        })
    }
}

pub(crate) async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value = match server::receive(&state, ROUTE, &headers, &body) {
        Ok(v) => v,
        Err(failure) => return ROUTE.error(&failure),
    };
    let req: MessagesRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return ROUTE.error(&Failure::Malformed(format!(
                "could not parse request body as a messages request: {e}"
            )))
        }
    };
    let Some(max_tokens) = req.max_tokens else {
        return ROUTE.error(&Failure::Malformed("max_tokens: Field required".to_owned()));
    };
    let pairs = req.message_pairs();
    let call = match server::start_call(&state, &headers, &req.model, &pairs) {
        Ok(c) => c,
        Err(failure) => return ROUTE.error(&failure),
    };
    let tool = match (req.forced_tool(), call.behaviour, req.first_tool_name()) {
        _ if req.ends_with_tool_result() => None,
        (Some(name), _, _) | (None, Behaviour::Tool, Some(name)) => {
            Some((format!("toolu_mock_{}", call.id), name))
        }
        _ => None,
    };
    let limit = match call.behaviour {
        Behaviour::Empty => 0,
        _ => max_tokens,
    };
    let reply = Reply::plan(&pairs, Some(limit), tool).stop_at(&req.stop_sequences);
    let id = format!("msg_mock_{}", call.id);
    let stream = req.stream.unwrap_or(false);
    tracing::debug!(
        model = %req.model,
        stream,
        tokens = reply.completion_tokens(),
        "mock LLM messages"
    );

    if stream {
        let plan = stream_plan(
            &id,
            &req.model,
            &reply,
            call.behaviour,
            &call.timing,
            &state.rng,
        );
        return stream::respond(
            plan,
            stream::EVENT_STREAM,
            call.guard,
            state.shutdown.clone(),
        );
    }
    let body = message_json(&id, &req.model, &reply);
    server::plain(&state, ROUTE, call, body).await
}

fn stop_reason(reply: &Reply) -> &'static str {
    match reply {
        Reply::Text(c) if c.finish_reason == "length" => "max_tokens",
        Reply::Text(c) if c.stop_sequence.is_some() => "stop_sequence",
        Reply::Text(_) => "end_turn",
        Reply::Tool(_) => "tool_use",
    }
}

fn stop_sequence(reply: &Reply) -> Option<&str> {
    match reply {
        Reply::Text(c) => c.stop_sequence.as_deref(),
        Reply::Tool(_) => None,
    }
}

/// The non-streaming `message` object.
fn message_json(id: &str, model: &str, reply: &Reply) -> Value {
    let content = match reply {
        Reply::Text(c) => json!([{ "type": "text", "text": c.text() }]),
        Reply::Tool(t) => {
            json!([{ "type": "tool_use", "id": t.id, "name": t.name, "input": t.input }])
        }
    };
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(reply),
        "stop_sequence": stop_sequence(reply),
        "usage": {
            "input_tokens": reply.prompt_tokens(),
            "output_tokens": reply.completion_tokens(),
        },
    })
}

/// One SSE event whose `event:` name is the payload's `type`.
fn event(payload: &Value) -> Bytes {
    let name = payload.get("type").and_then(Value::as_str).unwrap_or("");
    sse_named(name, payload)
}

/// The SSE body for `reply`, cut as `behaviour` asks.
fn stream_plan(
    id: &str,
    model: &str,
    reply: &Reply,
    behaviour: Behaviour,
    timing: &Timing,
    rng: &Rng,
) -> BodyPlan {
    let start = json!({
        "type": "message_start",
        "message": {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": { "input_tokens": reply.prompt_tokens(), "output_tokens": 1 },
        },
    });
    let (block, deltas): (Value, Vec<Value>) = match reply {
        Reply::Text(c) => (
            json!({ "type": "text", "text": "" }),
            c.tokens
                .iter()
                .map(|t| json!({ "type": "text_delta", "text": t }))
                .collect(),
        ),
        Reply::Tool(t) => (
            json!({ "type": "tool_use", "id": t.id, "name": t.name, "input": {} }),
            t.fragments
                .iter()
                .map(|f| json!({ "type": "input_json_delta", "partial_json": f }))
                .collect(),
        ),
    };
    let head = vec![
        Frame::now(event(&start)),
        Frame::now(event(
            &json!({ "type": "content_block_start", "index": 0, "content_block": block }),
        )),
        Frame::now(event(&json!({ "type": "ping" }))),
    ];
    let tokens = deltas
        .into_iter()
        .enumerate()
        .map(|(i, delta)| {
            let payload = json!({ "type": "content_block_delta", "index": 0, "delta": delta });
            Frame::after(timing.token_delay(i, rng), event(&payload))
        })
        .collect();
    let tail = vec![
        Frame::now(event(&json!({ "type": "content_block_stop", "index": 0 }))),
        Frame::now(event(&json!({
            "type": "message_delta",
            "delta": { "stop_reason": stop_reason(reply), "stop_sequence": stop_sequence(reply) },
            "usage": { "output_tokens": reply.completion_tokens() },
        }))),
        Frame::now(event(&json!({ "type": "message_stop" }))),
    ];
    SseParts {
        head,
        tokens,
        tail,
        error_event: Frame::now(event(&midstream_error_json())),
    }
    .assemble(behaviour)
}

/// The error object `mock-midstream-error` sends in the stream (or as the body
/// of an HTTP 200).
pub(crate) fn midstream_error_json() -> Value {
    json!({
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "mock-midstream-error: Overloaded (simulated error in the middle of the response)",
        },
    })
}

/// An Anthropic-style error response: `{"type":"error","error":{"type","message"}}`.
pub(crate) fn error_response(spec: &ErrorSpec) -> Response {
    let body = json!({
        "type": "error",
        "error": { "type": spec.anthropic_type, "message": spec.anthropic_message },
    });
    let mut resp = (spec.status, Json(body)).into_response();
    if let Some(secs) = spec.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: Value) -> MessagesRequest {
        serde_json::from_value(v).expect("request")
    }

    #[test]
    fn pairs_match_the_openai_view() {
        let r = request(json!({
            "model": "m",
            "max_tokens": 5,
            "system": [{ "type": "text", "text": "be" }, { "type": "text", "text": "brief" }],
            "messages": [
                { "role": "user", "content": [{ "type": "text", "text": "what time" }] },
                { "role": "assistant", "content": [
                    { "type": "text", "text": "let me check" },
                    { "type": "tool_use", "id": "t1", "name": "clock", "input": {} }
                ] },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "t1", "content": "noon" }
                ] }
            ]
        }));
        let pairs = r.message_pairs();
        let p: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            p,
            [
                ("system", "be brief"),
                ("user", "what time"),
                ("assistant", "let me check"),
                ("tool", "noon"),
            ]
        );
        assert!(r.ends_with_tool_result());
        assert_eq!(r.first_tool_name(), None);
    }
}
