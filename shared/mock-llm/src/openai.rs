//! `POST /v1/chat/completions`: OpenAI Chat Completions, plain JSON or SSE
//! (`data:` chunks ending with `data: [DONE]`), including tool calls and the
//! `mock-variants` quirks of generic OpenAI-compatible servers.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::json;

use crate::scenario::{Behaviour, Failure};
use crate::server::{self, AppState, Route};
use crate::stream::{self, sse_data, BodyPlan, Frame, SseParts};
use crate::text::Reply;
use crate::timing::{Rng, Timing};
use crate::wire::{self, ChatRequest, ResponseMeta};

const ROUTE: Route = Route::OpenAi;

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value = match server::receive(&state, ROUTE, &headers, &body) {
        Ok(v) => v,
        Err(failure) => return ROUTE.error(&failure),
    };
    let req: ChatRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return ROUTE.error(&Failure::Malformed(format!(
                "could not parse request body as a chat completion request: {e}"
            )))
        }
    };
    let pairs = req.message_pairs();
    let call = match server::start_call(&state, &headers, &req.model, &pairs) {
        Ok(c) => c,
        Err(failure) => return ROUTE.error(&failure),
    };
    let tool = match (req.forced_tool(), call.behaviour, req.first_tool_name()) {
        _ if req.ends_with_tool_result() => None,
        (Some(name), _, _) | (None, Behaviour::Tool, Some(name)) => {
            Some((format!("call_mock_{}", call.id), name))
        }
        _ => None,
    };
    let limit = match call.behaviour {
        Behaviour::Empty => Some(0),
        _ => req.token_limit(),
    };
    let reply = Reply::plan(&pairs, limit, tool).stop_at(&req.stop_list());
    let meta = ResponseMeta {
        id: format!("chatcmpl-mock-{}", call.id),
        created: server::unix_now(),
        model: req.model.clone(),
    };
    tracing::debug!(
        model = %meta.model,
        stream = req.wants_stream(),
        tokens = reply.completion_tokens(),
        "mock LLM chat completion"
    );

    if req.wants_stream() {
        let plan = stream_plan(
            &meta,
            &reply,
            call.behaviour,
            req.include_usage(),
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
    let mut body = wire::completion_json(&meta, &reply);
    if call.behaviour == Behaviour::Refusal {
        let m = &mut body["choices"][0]["message"];
        m["refusal"] = m["content"].take();
    }
    server::plain(&state, ROUTE, call, body).await
}

/// The SSE body for `reply`, cut or decorated as `behaviour` asks.
fn stream_plan(
    meta: &ResponseMeta,
    reply: &Reply,
    behaviour: Behaviour,
    include_usage: bool,
    timing: &Timing,
    rng: &Rng,
) -> BodyPlan {
    let variants = behaviour == Behaviour::Variants;
    let chunk =
        |delta, finish: Option<&str>| sse_data(wire::chunk_json(meta, delta, finish, variants));

    let (head, tokens, finish_reason) = match reply {
        Reply::Text(c) => {
            let head = vec![Frame::now(chunk(
                json!({ "role": "assistant", "content": "" }),
                None,
            ))];
            // one chunk serialized, the token spliced in: a JSON tree per token made the mock
            // the load test's second-largest CPU user
            let field = if behaviour == Behaviour::Refusal {
                "refusal"
            } else {
                "content"
            };
            let token_chunk = TokenChunk::new(&chunk(json!({ field: TOKEN_SLOT }), None));
            let tokens = c
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| Frame::after(timing.token_delay(i, rng), token_chunk.with(t)))
                .collect();
            (head, tokens, c.finish_reason)
        }
        Reply::Tool(t) => {
            // Like OpenAI: the first chunk carries the role and the call's header,
            // then the arguments arrive in fragments.
            let first = json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "index": 0,
                    "id": t.id,
                    "type": "function",
                    "function": { "name": t.name, "arguments": "" },
                }],
            });
            let mut tokens = vec![Frame::after(timing.token_delay(0, rng), chunk(first, None))];
            tokens.extend(t.fragments.iter().enumerate().map(|(i, f)| {
                let delta =
                    json!({ "tool_calls": [{ "index": 0, "function": { "arguments": f } }] });
                Frame::after(timing.token_delay(i + 1, rng), chunk(delta, None))
            }));
            (Vec::new(), tokens, "tool_calls")
        }
    };

    let mut tail = vec![Frame::now(chunk(json!({}), Some(finish_reason)))];
    if include_usage || variants {
        tail.push(Frame::now(sse_data(wire::usage_chunk_json(
            meta, reply, variants,
        ))));
    }
    tail.push(Frame::now(sse_data("[DONE]")));

    let mut plan = SseParts {
        head,
        tokens,
        tail,
        error_event: Frame::now(sse_data(wire::midstream_error_json())),
    }
    .assemble(behaviour);
    if variants {
        plan.frames = with_keep_alives(plan.frames);
    }
    plan
}

const TOKEN_SLOT: &str = "\u{1}token\u{1}";

/// A serialized text chunk with a slot for its token: the same bytes as serializing the chunk
/// with the token in place.
struct TokenChunk {
    head: String,
    tail: String,
}

impl TokenChunk {
    fn new(frame: &[u8]) -> TokenChunk {
        let text = String::from_utf8_lossy(frame);
        let slot = serde_json::to_string(TOKEN_SLOT).unwrap_or_default();
        let (head, tail) = text.split_once(&slot).unwrap_or((&text, ""));
        TokenChunk {
            head: head.to_string(),
            tail: tail.to_string(),
        }
    }

    fn with(&self, token: &str) -> Bytes {
        let quoted = serde_json::to_string(token).unwrap_or_default();
        let mut out = String::with_capacity(self.head.len() + quoted.len() + self.tail.len());
        out.push_str(&self.head);
        out.push_str(&quoted);
        out.push_str(&self.tail);
        Bytes::from(out)
    }
}

/// Puts a `: keep-alive` comment line between consecutive events.
fn with_keep_alives(frames: Vec<Frame>) -> Vec<Frame> {
    let mut out = Vec::with_capacity(frames.len() * 2);
    for frame in frames {
        if !out.is_empty() {
            out.push(Frame::now(Bytes::from_static(b": keep-alive\n\n")));
        }
        out.push(frame);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spliced_token_chunk_is_the_serialized_chunk() {
        let frame =
            |t: &str| sse_data(json!({ "choices": [{ "delta": { "content": t } }], "id": "x" }));
        let chunk = TokenChunk::new(&frame(TOKEN_SLOT));
        for t in [
            "plain",
            " lead",
            "quote\"s",
            "new\nline",
            "tab\t",
            "ünï ✓",
            "\\",
            "",
        ] {
            assert_eq!(chunk.with(t), frame(t), "token {t:?}");
        }
    }
}
