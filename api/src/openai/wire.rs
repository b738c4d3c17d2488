//! OpenAI Chat Completions wire format of the front door: the request (lenient: fields we do
//! not model are accepted and ignored) turned into an `llm.chat` input, and the response
//! objects (`chat.completion`, `chat.completion.chunk`) built from a job's output and events.

use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_core::job::{
    parse_at, string_or_list, ChatMessage, FunctionCall, LlmChatInput, ToolCall, ToolSpec,
};
use switchyard_core::FieldError;

/// The fields of a chat completion request we use; everything else (`user`, `n`, `logprobs`,
/// `logit_bias`, ...) is accepted and ignored.
#[derive(Debug, Deserialize)]
struct Request {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default, deserialize_with = "string_or_list")]
    stop: Option<Vec<String>>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<String>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    /// Our extension (`extra_body={"cache": true}` in OpenAI's SDKs).
    #[serde(default)]
    cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    id: String,
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct Tool {
    #[serde(rename = "type", default = "function")]
    kind: String,
    function: ToolFunction,
}

#[derive(Debug, Deserialize)]
struct ToolFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

fn function() -> String {
    "function".into()
}

/// A parsed front-door request.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub input: LlmChatInput,
    pub stream: bool,
    pub include_usage: bool,
}

/// Text of a message's content: a string, or the text parts of an array.
fn content_text(i: usize, content: Option<Value>) -> Result<String, FieldError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => out.push(t.to_string()),
                    _ => {
                        return Err(FieldError::invalid(
                            format!("messages[{i}].content[{j}]"),
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
        Some(_) => Err(FieldError::invalid(
            format!("messages[{i}].content"),
            "must be a string or an array of content parts",
        )),
    }
}

/// Parses and validates a request body; errors name the offending parameter.
pub fn parse(body: &Value) -> Result<Parsed, FieldError> {
    if !body.is_object() {
        return Err(FieldError::invalid("body", "must be a JSON object"));
    }
    let req: Request = parse_at("", body)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system".to_string(),
            r => r.to_string(),
        };
        let mut msg = ChatMessage::new(&role, content_text(i, m.content)?);
        msg.tool_call_id = m.tool_call_id;
        msg.tool_calls = m.tool_calls.map(|calls| {
            calls
                .into_iter()
                .map(|c| ToolCall {
                    id: c.id,
                    kind: "function".into(),
                    function: FunctionCall {
                        name: c.function.name,
                        arguments: c.function.arguments,
                    },
                })
                .collect()
        });
        messages.push(msg);
    }
    let tools: Option<Vec<ToolSpec>> = req.tools.map(|ts| {
        ts.into_iter()
            .map(|t| ToolSpec {
                kind: t.kind,
                function: switchyard_core::job::FunctionSpec {
                    name: t.function.name,
                    description: t.function.description,
                    parameters: t.function.parameters,
                    strict: t.function.strict,
                },
            })
            .collect()
    });
    let stream = req.stream.unwrap_or(false);
    let input = LlmChatInput {
        model: req.model,
        messages,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        response_format: req.response_format,
        reasoning_effort: req.reasoning_effort,
        tools: tools.filter(|t| !t.is_empty()),
        tool_choice: req.tool_choice,
        parallel_tool_calls: req.parallel_tool_calls,
        conversation: None,
        cache: req.cache,
        // a client waiting for the whole reply needs no token events
        stream: (!stream).then_some(false),
    };
    input.validate().map_err(|mut e| {
        e.field = e.field.trim_start_matches("input.").to_string();
        e
    })?;
    Ok(Parsed {
        input,
        stream,
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Fields every response object of one completion shares.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: i64,
    pub model: String,
}

fn usage(output: &Value) -> Value {
    let u = &output["usage"];
    let p = u["prompt_tokens"].as_u64().unwrap_or(0);
    let c = u["completion_tokens"].as_u64().unwrap_or(0);
    json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c })
}

/// The `chat.completion` object for a succeeded job's output.
pub fn completion(meta: &Meta, job_id: &str, output: &Value) -> Value {
    let calls = output.get("tool_calls").filter(|c| c.is_array());
    let text = output["text"].as_str().unwrap_or("");
    let content = if text.is_empty() && calls.is_some() {
        Value::Null
    } else {
        Value::String(text.to_string())
    };
    let refusal = output.get("refusal").filter(|r| r.is_string()).cloned();
    let content = match (&refusal, content) {
        // a refusal has no content, as OpenAI answers it
        (Some(_), Value::String(s)) if s.is_empty() => Value::Null,
        (_, c) => c,
    };
    let mut message = json!({
        "role": "assistant", "content": content, "refusal": refusal.unwrap_or(Value::Null),
    });
    if let Some(c) = calls {
        message["tool_calls"] = c.clone();
    }
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": output["finish_reason"].as_str().unwrap_or("stop"),
        }],
        "usage": usage(output),
        "switchyard": extension(job_id, output),
    })
}

/// Our extra fields (clients that do not know them ignore them).
fn extension(job_id: &str, output: &Value) -> Value {
    json!({
        "job_id": job_id,
        "model": output["model"],
        "provider": output["provider"],
        "cost_usd": output["cost_usd"],
        "cached": output.get("cached").cloned().unwrap_or(Value::Bool(false)),
    })
}

/// A `chat.completion.chunk` with one choice.
pub fn chunk(meta: &Meta, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
    })
}

/// The trailing usage chunk (`stream_options.include_usage`).
pub fn usage_chunk(meta: &Meta, job_id: &str, output: &Value) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [],
        "usage": usage(output),
        "switchyard": extension(job_id, output),
    })
}

/// A streamed tool call (`output.tool_call` event data) as a chunk delta.
pub fn tool_call_delta(call: &Value) -> Value {
    json!({ "tool_calls": [{
        "index": call["index"].as_u64().unwrap_or(0),
        "id": call["id"],
        "type": "function",
        "function": { "name": call["function"]["name"], "arguments": call["function"]["arguments"] },
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_parse_maps_roles_parts_and_limits() {
        let p = parse(&json!({
            "model": "m", "user": "u-1", "seed": 7, "n": 1, "logprobs": false,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
            ],
            "max_completion_tokens": 5, "max_tokens": 9, "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(p.input.messages[0].role, "system");
        assert_eq!(p.input.messages[1].content, "a\nb");
        assert_eq!(p.input.max_tokens, Some(5));
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn errors_name_the_parameter() {
        let e = parse(&json!({"model": "m"})).unwrap_err();
        assert_eq!(e.field, "messages");
        let e = parse(&json!({"model": "m", "messages": []})).unwrap_err();
        assert_eq!(e.field, "messages");
        let e = parse(&json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})).unwrap_err();
        assert_eq!(e.field, "messages[0].content[0]");
        let e = parse(&json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5})).unwrap_err();
        assert_eq!(e.field, "temperature");
    }
}
