//! `llm.chat` input: messages, tool calls and tools (OpenAI's shapes), a conversation
//! reference, and their validation with field paths.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::FieldError;

/// Input of `llm.chat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmChatInput {
    /// A model alias from `GET /v1/models`, `<provider>/<model>`, or a `mock-*` name.
    pub model: String,
    /// The prompt; empty when `conversation` names the history instead.
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Up to 4 sequences that end the reply where they would appear (a string or an array).
    #[serde(
        default,
        deserialize_with = "string_or_list",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<Vec<String>>)]
    pub stop: Option<Vec<String>>,
    /// Best-effort deterministic sampling (OpenAI-format providers; Anthropic has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// -2 to 2 (OpenAI-format providers; Anthropic has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// -2 to 2 (OpenAI-format providers; Anthropic has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {"name",
    /// "schema"?, "strict"?}}` (OpenAI's shape; on Anthropic models a forced tool call whose
    /// input is the reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// How hard a reasoning model thinks: `minimal`, `low`, `medium`, `high`, ... as the
    /// provider names them (OpenAI-format providers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// Functions the model may call (OpenAI's shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolSpec>>,
    /// `auto`, `none`, `required`, or `{"type":"function","function":{"name":..}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `false`: at most one tool call per reply (sent only with `tools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Answer turn `turn` of a stored conversation: the worker reads the history and fits it
    /// into the model's window, then appends the reply (set by
    /// `POST /v1/conversations/{id}/messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationRef>,
    /// Use the exact-match response cache (default: the tenant's setting). A hit completes at
    /// once, replays the stored reply as events and costs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    /// Stream the reply while it is written: `output.delta` and `output.tool_call` events
    /// (default `true`). With `false` the job's events are its status changes and the terminal
    /// event, whose `output` holds the whole reply — what a client that waits for the result
    /// needs (a non-streamed `POST /v1/chat/completions` sets it), without a Redis write and a
    /// relay per burst of tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversationRef {
    pub id: Uuid,
    pub turn: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// One of `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// Text (`null` is read as empty, e.g. an assistant turn that only calls tools).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// Tool calls made by an `assistant` turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` turn answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// `"x"` or `["x", "y"]` as a list (OpenAI's `stop`).
pub fn string_or_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(s)) => Some(vec![s]),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

/// The generation parameters of a call beyond the prompt, the reply budget and the
/// temperature, handed to the provider as given (OpenAI's names; each adapter maps what its
/// API has).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sampling {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
}

impl Sampling {
    /// The reply must be JSON (`response_format` of type `json_object` or `json_schema`).
    pub fn wants_json(&self) -> bool {
        self.response_format
            .as_ref()
            .is_some_and(|f| f["type"] != "text")
    }
}

/// Most stop sequences one request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A tool call (OpenAI's shape; `arguments` is a JSON text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text of the arguments.
    pub arguments: String,
}

/// A tool the model may call (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

fn function_type() -> String {
    "function".to_string()
}

pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
/// Messages one request may carry.
pub const MAX_MESSAGES: usize = 4096;
/// Characters of one message's content (also a conversation turn's, and a system prompt's).
pub const MAX_MESSAGE_CHARS: usize = 1_000_000;

impl LlmChatInput {
    /// The input's [`Sampling`] parameters.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            top_p: self.top_p,
            stop: self.stop.clone().unwrap_or_default(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            response_format: self.response_format.clone(),
            reasoning_effort: self.reasoning_effort.clone(),
        }
    }

    fn validate_sampling(&self) -> Result<(), FieldError> {
        let ranges = [
            ("input.top_p", self.top_p, 0.0, 1.0),
            ("input.presence_penalty", self.presence_penalty, -2.0, 2.0),
            ("input.frequency_penalty", self.frequency_penalty, -2.0, 2.0),
        ];
        for (field, v, lo, hi) in ranges {
            if v.is_some_and(|v| !(lo..=hi).contains(&v)) {
                return Err(FieldError::invalid(
                    field,
                    format!("must be between {lo} and {hi}"),
                ));
            }
        }
        let stop = self.stop.as_deref().unwrap_or_default();
        if stop.len() > MAX_STOP {
            return Err(FieldError::invalid(
                "input.stop",
                format!("at most {MAX_STOP} sequences"),
            ));
        }
        for (i, s) in stop.iter().enumerate() {
            if s.is_empty() || s.len() > 256 {
                return Err(FieldError::invalid(
                    format!("input.stop[{i}]"),
                    "must be 1 to 256 bytes",
                ));
            }
        }
        if let Some(e) = &self.reasoning_effort {
            if e.is_empty() || e.len() > 16 || !e.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(FieldError::invalid(
                    "input.reasoning_effort",
                    "must be a lowercase word such as `low`, `medium` or `high`",
                ));
            }
        }
        if let Some(f) = &self.response_format {
            match f["type"].as_str() {
                Some("text" | "json_object") => {}
                Some("json_schema") => {
                    let name = f["json_schema"]["name"].as_str().unwrap_or("");
                    if name.is_empty() || name.len() > 64 {
                        return Err(FieldError::invalid(
                            "input.response_format.json_schema.name",
                            "must be 1 to 64 characters",
                        ));
                    }
                    let schema = &f["json_schema"]["schema"];
                    if !(schema.is_null() || schema.is_object()) {
                        return Err(FieldError::invalid(
                            "input.response_format.json_schema.schema",
                            "must be a JSON Schema object",
                        ));
                    }
                }
                _ => {
                    return Err(FieldError::invalid(
                        "input.response_format.type",
                        "must be `text`, `json_object` or `json_schema`",
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.model.trim().is_empty() || self.model.len() > 200 {
            return Err(FieldError::invalid(
                "input.model",
                "must be 1 to 200 characters",
            ));
        }
        match (&self.conversation, self.messages.is_empty()) {
            (None, true) => return Err(FieldError::invalid("input.messages", "must not be empty")),
            (Some(_), false) => {
                return Err(FieldError::invalid(
                    "input.messages",
                    "must be empty when `conversation` names the history",
                ))
            }
            _ => {}
        }
        if self.messages.len() > MAX_MESSAGES {
            return Err(FieldError::invalid(
                "input.messages",
                format!("at most {MAX_MESSAGES} messages"),
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            // cheap bound first: a char is at most 4 bytes
            if m.content.len() > MAX_MESSAGE_CHARS && m.content.chars().count() > MAX_MESSAGE_CHARS
            {
                return Err(FieldError::invalid(
                    format!("input.messages[{i}].content"),
                    format!("at most {MAX_MESSAGE_CHARS} characters"),
                ));
            }
            if !CHAT_ROLES.contains(&m.role.as_str()) {
                return Err(FieldError::invalid(
                    format!("input.messages[{i}].role"),
                    format!("must be one of {}", CHAT_ROLES.join(", ")),
                ));
            }
            if m.tool_calls.is_some() && m.role != "assistant" {
                return Err(FieldError::invalid(
                    format!("input.messages[{i}].tool_calls"),
                    "only assistant messages carry tool calls",
                ));
            }
            if m.role == "tool" && m.tool_call_id.as_deref().unwrap_or("").is_empty() {
                return Err(FieldError::invalid(
                    format!("input.messages[{i}].tool_call_id"),
                    "a tool message needs the id of the call it answers",
                ));
            }
        }
        if let Some(t) = self.max_tokens {
            if t == 0 || t > 1_000_000 {
                return Err(FieldError::invalid(
                    "input.max_tokens",
                    "must be between 1 and 1000000",
                ));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(FieldError::invalid(
                    "input.temperature",
                    "must be between 0 and 2",
                ));
            }
        }
        self.validate_sampling()?;
        for (i, t) in self.tools.iter().flatten().enumerate() {
            if t.kind != "function" {
                return Err(FieldError::invalid(
                    format!("input.tools[{i}].type"),
                    "must be `function`",
                ));
            }
            if t.function.name.is_empty() || t.function.name.len() > 64 {
                return Err(FieldError::invalid(
                    format!("input.tools[{i}].function.name"),
                    "must be 1 to 64 characters",
                ));
            }
        }
        if let Some(c) = &self.tool_choice {
            let ok = match c {
                Value::String(s) => ["auto", "none", "required"].contains(&s.as_str()),
                Value::Object(_) => c["function"]["name"].is_string(),
                _ => false,
            };
            if !ok {
                return Err(FieldError::invalid(
                    "input.tool_choice",
                    "must be `auto`, `none`, `required` or {\"type\":\"function\",\"function\":{\"name\":..}}",
                ));
            }
        }
        Ok(())
    }
}
