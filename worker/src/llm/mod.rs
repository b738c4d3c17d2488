//! `llm.chat`: the provider seam (`LlmProvider`), the provider adapters (OpenAI, Anthropic,
//! OpenAI-compatible), routing through the model table with retries and fallbacks (`call`),
//! and the executor.

mod anthropic;
pub mod cache;
mod call;
pub mod context;
mod conversation;
mod executor;
mod openai;
mod sse;
mod summarize;
mod window;

pub use anthropic::Anthropic;
pub use call::{CallPolicy, Providers};
pub use executor::LlmChatExecutor;
pub use openai::OpenAi;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use switchyard_core::job::{ChatMessage, Sampling, ToolCall, ToolSpec};

use crate::executor::JobContext;

/// Token counts of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Counted by us (the provider reported none).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

impl Usage {
    pub fn new(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            estimated: false,
        }
    }
}

/// What one provider call produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatOutput {
    pub text: String,
    /// `stop`, `length`, `tool_calls` or `content_filter`.
    pub finish_reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    /// The model declined (OpenAI's `refusal`, e.g. under a JSON schema): its words, apart
    /// from `text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// One call as a provider adapter sees it (the model table already resolved).
#[derive(Debug, Clone)]
pub struct ProviderRequest<'a> {
    /// The provider's model name.
    pub model: &'a str,
    pub messages: &'a [ChatMessage],
    /// Reply budget (Anthropic requires one; the table's `max_output_tokens` by default).
    pub max_tokens: u32,
    /// Whether the client asked for a reply budget (OpenAI gets `max_tokens` only then).
    pub max_tokens_explicit: bool,
    pub temperature: Option<f64>,
    /// `top_p`, `stop`, `seed`, penalties and `response_format`.
    pub sampling: Sampling,
    pub tools: &'a [ToolSpec],
    pub tool_choice: Option<&'a Value>,
    /// `Some(false)`: at most one tool call per reply.
    pub parallel_tool_calls: Option<bool>,
    /// Stream from the provider (the table's `stream`).
    pub stream: bool,
    /// Extra headers (the model's).
    pub headers: &'a BTreeMap<String, String>,
    /// Longest wait for the first token (or the whole reply when not streaming).
    pub ttft_timeout: Duration,
    /// Longest silence between two stream events once tokens flow.
    pub idle_timeout: Duration,
}

/// Where a provider streams its tokens: the job's event stream, through [`JobContext`].
pub struct Sink<'a> {
    ctx: &'a JobContext,
    streamed: AtomicBool,
    /// The text deltas of the current call, kept when the reply will be cached.
    recorded: Option<Mutex<Vec<String>>>,
    /// Emit nothing (an internal call, e.g. a summary).
    silent: bool,
    /// The provider call in flight, as counted into the job's spent tokens.
    meter: Mutex<Meter>,
}

/// What a provider call in flight has added to its job's spent tokens
/// ([`JobContext::spent`]): its prompt once sent, then an estimate of the text it streamed;
/// the call's reported usage replaces the estimate when it ends.
#[derive(Debug, Default)]
struct Meter {
    active: bool,
    /// The provider accepted the request (a 2xx head arrived): it bills the prompt.
    accepted: bool,
    prompt: u64,
    /// ASCII bytes and other characters streamed (see [`estimate_tokens`]).
    ascii: u64,
    other: u64,
    /// What this call has added so far.
    counted: u64,
}

impl Meter {
    fn completion(&self) -> u64 {
        self.ascii.div_ceil(ASCII_PER_TOKEN) + self.other
    }
}

impl<'a> Sink<'a> {
    pub fn new(ctx: &'a JobContext) -> Self {
        Sink {
            ctx,
            streamed: AtomicBool::new(false),
            recorded: None,
            silent: false,
            meter: Mutex::new(Meter::default()),
        }
    }

    /// A sink that streams nothing to the client.
    pub fn silent(ctx: &'a JobContext) -> Self {
        Sink::new(ctx).silenced(true)
    }

    /// A sink that also keeps the deltas (for the response cache).
    pub fn recording(ctx: &'a JobContext) -> Self {
        Sink {
            recorded: Some(Mutex::new(Vec::new())),
            ..Sink::new(ctx)
        }
    }

    /// The same sink, streaming nothing when `silent` (a job whose input says `stream: false`).
    pub fn silenced(self, silent: bool) -> Self {
        Sink {
            silent: self.silent || silent,
            ..self
        }
    }

    /// A provider call starts with a prompt of `prompt_tokens`: they count as spent until the
    /// call ends (a call cancelled meanwhile was paid for).
    pub fn begin_call(&self, prompt_tokens: u64) {
        let mut m = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        *m = Meter {
            active: true,
            prompt: prompt_tokens,
            counted: prompt_tokens,
            ..Meter::default()
        };
        self.ctx.add_spent(prompt_tokens);
    }

    /// The provider accepted the call in flight (its answer's head was a 2xx): from now on a
    /// failure keeps the prompt counted (the provider bills it, e.g. a reply cut by a time
    /// limit before anything streamed, or a reply that is not streamed at all).
    pub fn accepted(&self) {
        let mut m = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        if m.active {
            m.accepted = true;
        }
    }

    /// Counts generated output that is not reply text (reasoning, tool-call arguments, a
    /// refusal) toward the call in flight, as [`Sink::text`] counts text.
    pub fn progress(&self, generated: &str) {
        self.meter(generated);
    }

    /// The call ended: with its usage, which replaces what was counted for it; or failed
    /// (`None`), which keeps what was counted once the provider accepted the call or it
    /// streamed something (the provider charged for it), and takes back the prompt of a call
    /// refused before it started (an error status, no connection).
    pub fn end_call(&self, usage: Option<&Usage>) {
        let mut m = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        if !m.active {
            return;
        }
        let keep = match usage {
            Some(u) => u.total_tokens.max(u.prompt_tokens + u.completion_tokens),
            None if m.accepted || m.completion() > 0 => m.counted,
            None => m.counted - m.prompt,
        };
        if keep >= m.counted {
            self.ctx.add_spent(keep - m.counted);
        } else {
            self.ctx.refund_spent(m.counted - keep);
        }
        *m = Meter::default();
    }

    /// Counts streamed text toward the call in flight.
    fn meter(&self, text: &str) {
        let mut m = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        if !m.active {
            return;
        }
        let before = m.completion();
        m.ascii += text.bytes().filter(u8::is_ascii).count() as u64;
        m.other += text.chars().filter(|c| !c.is_ascii()).count() as u64;
        let added = m.completion() - before;
        m.counted += added;
        self.ctx.add_spent(added);
    }

    /// Streams output text.
    pub async fn text(&self, delta: String) {
        if delta.is_empty() {
            return;
        }
        self.meter(&delta);
        if let Some(r) = &self.recorded {
            if let Ok(mut r) = r.lock() {
                r.push(delta.clone());
            }
        }
        if !self.silent {
            // only output a client saw can need a restart announced
            self.streamed.store(true, Ordering::Relaxed);
            self.ctx.delta(delta).await;
        }
    }

    /// The deltas recorded since the last reset.
    pub fn recorded(&self) -> Vec<String> {
        self.recorded
            .as_ref()
            .and_then(|r| r.lock().ok().map(|r| r.clone()))
            .unwrap_or_default()
    }

    /// Streams a completed tool call (`output.tool_call`).
    pub async fn tool_call(&self, index: usize, call: &ToolCall) {
        self.meter(&call.function.name);
        self.meter(&call.function.arguments);
        if self.silent {
            return;
        }
        self.streamed.store(true, Ordering::Relaxed);
        let mut data = serde_json::to_value(call).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut data {
            m.insert("index".into(), index.into());
        }
        self.ctx
            .event(switchyard_core::event::types::OUTPUT_TOOL_CALL, data)
            .await;
    }

    /// Whether anything reached the client through this sink.
    pub fn streamed(&self) -> bool {
        self.streamed.load(Ordering::Relaxed)
    }

    /// Forgets what streamed (after a restart was announced).
    pub fn reset(&self) {
        self.streamed.store(false, Ordering::Relaxed);
        self.discard_recorded();
    }

    /// Forgets the recorded deltas of a call that failed: the next call's reply is recorded
    /// alone, whether or not the failed one reached the client.
    pub fn discard_recorded(&self) {
        if let Some(r) = &self.recorded {
            if let Ok(mut r) = r.lock() {
                r.clear();
            }
        }
    }

    pub fn ctx(&self) -> &JobContext {
        self.ctx
    }
}

/// How a provider call failed; decides retry, fallback and the job's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 429 that may pass (`provider_rate_limited`).
    RateLimited,
    /// 429 because the account is out of quota or credit (`provider_quota_exhausted`).
    QuotaExhausted,
    /// 400 and other 4xx (`provider_bad_request`).
    BadRequest,
    /// The prompt does not fit the model (`provider_context_length`).
    ContextLength,
    /// 401/403 (`provider_auth`).
    Auth,
    /// 5xx (`provider_error`).
    Server,
    /// 529 or an `overloaded_error` (`provider_overloaded`).
    Overloaded,
    /// Time to first token, idle stream or whole call exceeded (`provider_timeout`).
    Timeout,
    /// Connection refused or reset before a reply (`provider_unavailable`).
    Network,
    /// The stream broke, was cut or carried an error after tokens (`provider_stream_error`).
    Stream,
}

impl Failure {
    /// The job error code.
    pub fn code(self) -> &'static str {
        match self {
            Failure::RateLimited => "provider_rate_limited",
            Failure::QuotaExhausted => "provider_quota_exhausted",
            Failure::BadRequest => "provider_bad_request",
            Failure::ContextLength => "provider_context_length",
            Failure::Auth => "provider_auth",
            Failure::Server => "provider_error",
            Failure::Overloaded => "provider_overloaded",
            Failure::Timeout => "provider_timeout",
            Failure::Network => "provider_unavailable",
            Failure::Stream => "provider_stream_error",
        }
    }

    /// Worth calling the same model again (now, within the attempt, or as a later attempt).
    pub fn transient(self) -> bool {
        matches!(
            self,
            Failure::RateLimited
                | Failure::Server
                | Failure::Overloaded
                | Failure::Timeout
                | Failure::Network
                | Failure::Stream
        )
    }

    /// Worth trying the next model of the chain: timeouts, 5xx, overload, broken connections,
    /// rate limits, and account problems of this provider (quota, auth). A bad request or a
    /// prompt that is too long would fail the same way elsewhere.
    pub fn falls_back(self) -> bool {
        self.transient() || matches!(self, Failure::QuotaExhausted | Failure::Auth)
    }
}

/// A failed provider call.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    pub failure: Failure,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        let message: String = message.into();
        ProviderError {
            failure,
            // provider text reaches logs and job errors: no terminal control sequences
            message: switchyard_core::telemetry::printable(&message).into_owned(),
            retry_after: None,
        }
    }
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.failure.code(), self.message)
    }
}

/// An LLM provider adapter. Implementations keep their wire format private, stream text and
/// tool calls through the [`Sink`], and classify failures.
#[async_trait]
pub trait LlmProvider: Send + Sync {
    async fn chat(
        &self,
        req: &ProviderRequest<'_>,
        sink: &Sink<'_>,
    ) -> Result<ChatOutput, ProviderError>;
}

pub use switchyard_core::tokens::estimate_tokens;
use switchyard_core::tokens::ASCII_PER_TOKEN;

pub(crate) fn estimate_prompt(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| {
            let calls = m.tool_calls.as_deref().unwrap_or_default();
            4 + estimate_tokens(&m.content) + estimate_calls(calls)
        })
        .sum()
}

/// Tool calls' names and arguments, estimated like text.
pub(crate) fn estimate_calls(calls: &[ToolCall]) -> u64 {
    calls
        .iter()
        .map(|c| estimate_tokens(&c.function.name) + estimate_tokens(&c.function.arguments))
        .sum()
}
