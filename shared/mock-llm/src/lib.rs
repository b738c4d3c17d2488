//! Fake LLM provider served over HTTP (OpenAI Chat Completions and Anthropic
//! Messages), used by `switchyard dev`, `switchyard mock-llm` and tests: providers
//! are faked at the HTTP level.
//!
//! # Endpoints
//!
//! | Route | What |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI Chat Completions, JSON or SSE (`stream: true`, `stream_options.include_usage`), tools. |
//! | `POST /v1/messages` | Anthropic Messages, JSON or SSE (`event:`/`data:` lines), `system`, content blocks, tools. `max_tokens` is required, as on the real API. |
//! | `GET /v1/models` | Lists [`MOCK_MODELS`] (Anthropic's list shape when the request has an `anthropic-version` header). |
//! | `GET /mock/stats` | `{"models":{"<model>":{"calls":n,"completed":n,"aborted":n}}}` (see below). |
//! | `GET /mock/requests?model=<name>` | `{"requests":[{"route":"openai"\|"anthropic","headers":{..},"body":<request JSON>}]}`, oldest first. |
//! | `GET /healthz` | `200 ok`. |
//!
//! # Replies
//!
//! The reply text is deterministic (see [`expected_text`]) and identical on both
//! routes for the same conversation: Anthropic's `system` counts as a leading
//! `("system", text)` message, a `tool_result` block as a `("tool", text)` message
//! and the text blocks of a message as one message (joined by spaces). Token
//! counts are whitespace-separated words: prompt tokens over every message,
//! completion tokens per emitted token (Anthropic's `input_tokens` and
//! `output_tokens` are the same numbers). `max_tokens` (or OpenAI's
//! `max_completion_tokens`) truncates the reply (`finish_reason: "length"`,
//! `stop_reason: "max_tokens"`). OpenAI's `stop` (a string or a list) and Anthropic's
//! `stop_sequences` end the reply before the first sequence it contains
//! (`finish_reason: "stop"`, `stop_reason: "stop_sequence"` with `stop_sequence` set).
//! A forced `tool_choice` (OpenAI's `{"type": "function", "function": {"name": ..}}`,
//! Anthropic's `{"type": "tool", "name": ..}`) makes any model call that tool.
//!
//! # Scenarios (by model name, on both routes)
//!
//! Errors use the route's own shape: OpenAI `{"error":{"message","type","param","code"}}`,
//! Anthropic `{"type":"error","error":{"type","message"}}`.
//!
//! | Model | Behaviour |
//! |---|---|
//! | `mock-echo` (and any other `mock-*`) | Normal answer. |
//! | `mock-slow` | Normal, with [`MockLlmConfig::slow_ttft`] / [`MockLlmConfig::slow_inter_token`] delays. |
//! | `mock-stall` | Streaming: stalls after the first token. Non-streaming: never answers. Only the client leaving or shutdown ends it. |
//! | `mock-drop` | Streaming: the body aborts (connection error) after 2 tokens. Non-streaming: aborts mid-body. |
//! | `mock-reset` | The body aborts right after the response headers, before any token. |
//! | `mock-cut` | Streaming: 2 tokens, then the body ends cleanly with no finish chunk / `[DONE]` (OpenAI) or `message_delta`/`message_stop` (Anthropic). Non-streaming: 200 with a JSON body cut in half. |
//! | `mock-midstream-error` | Streaming: 2 tokens, then an error event, then the body ends (OpenAI `data: {"error":{..,"type":"server_error"}}`, Anthropic `event: error` with `overloaded_error`). Non-streaming: HTTP 200 whose body is the error object. |
//! | `mock-empty` (and `mock-empty-*`) | 200 with no text at all and finish reason `length` / `max_tokens` (a reasoning model that spent its whole budget thinking). |
//! | `mock-error-400` | 400, `invalid_request_error`. |
//! | `mock-error-401` | 401; OpenAI code `invalid_api_key`, Anthropic `authentication_error`. |
//! | `mock-error-429` | 429 with `retry-after: 1`; OpenAI `rate_limit_error` / `rate_limit_exceeded`, Anthropic `rate_limit_error`. |
//! | `mock-error-429-quota` | 429 without `retry-after`: quota exhausted. OpenAI `insufficient_quota` (type and code), Anthropic `rate_limit_error` whose message contains "quota exhausted". |
//! | `mock-context-length` | 400. OpenAI `invalid_request_error` / `context_length_exceeded` ("This model's maximum context length is 8192 tokens. However, your messages resulted in N tokens. ..."), Anthropic `invalid_request_error` ("prompt is too long: N tokens > 8192 maximum"). N is 8192 plus the request's prompt tokens (at least 1), so always over the limit. |
//! | `mock-window-<N>[-<anything>]` | A model with a window of N prompt tokens (words): a prompt of at most N is answered normally, a longer one gets `mock-context-length`'s 400 quoting N as the maximum. |
//! | `mock-error-500`, `mock-error-502`, `mock-error-503` | That status; OpenAI `server_error`, Anthropic `api_error`. |
//! | `mock-overloaded` | 529; `overloaded_error` on both routes. |
//! | `mock-fail-every-<N>[-<anything>]` | Counting per exact model name, calls N, 2N, 3N, ... fail with 500; the others answer normally. |
//! | `mock-fail-first-<N>[-<anything>]` | Counting per exact model name, the first N calls fail with 503; later ones answer normally. |
//! | `mock-tool[-<anything>]` | With `tools` and a last message that is not a tool result (OpenAI role `tool`, Anthropic a user message with a `tool_result` block): one call to the first tool with arguments `{"text":"<last user message>"}`, id `call_mock_N` / `toolu_mock_N`, `finish_reason: "tool_calls"` / `stop_reason: "tool_use"`; streamed as the tool call header then the arguments in at least 2 fragments. Otherwise a normal answer. |
//! | `mock-variants` | OpenAI streaming only: generic OpenAI-compatible server quirks: `: keep-alive` comment lines between events, chunks without `object`/`created`, and a final usage chunk (always sent) with `"choices": null` before `[DONE]`. Same text as `mock-echo`; normal on the Anthropic route and when not streaming. |
//! | any other name | 404; OpenAI code `model_not_found`, Anthropic `not_found_error`. |
//!
//! # Timing
//!
//! [`MockLlmConfig`] sets the time to first token, the inter-token delay and a
//! random jitter (each delay gets a uniform extra in `0..=jitter`). The request
//! headers [`TTFT_HEADER`], [`INTER_TOKEN_HEADER`] and [`JITTER_HEADER`] (all in
//! milliseconds) override them per request on both routes. A non-streaming answer
//! waits for the time to first token only.
//!
//! # Observation
//!
//! `GET /mock/stats` counts per model name: `calls` (every parsed request on both
//! routes, failures included), `completed` (responses fully sent) and `aborted`
//! (requests the client abandoned before the response was complete: a streaming
//! body dropped early, or a non-streaming request dropped while it waited).
//! Intentional failures (errors, `mock-drop`, `mock-cut`, ...) count as neither.
//! `GET /mock/requests` keeps the most recent 200 requests of both routes, with
//! the `authorization`, `x-api-key`, `anthropic-version` and `content-type`
//! headers and every `x-*` header; `?model=` filters by the body's `model`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod anthropic;
mod openai;
mod scenario;
mod server;
mod stats;
mod stream;
mod text;
mod timing;
mod wire;

use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use scenario::MOCK_MODELS;
pub use text::expected_text;
pub use timing::{INTER_TOKEN_HEADER, JITTER_HEADER, TTFT_HEADER};

/// Timing knobs for the mock provider.
#[derive(Clone, Debug)]
pub struct MockLlmConfig {
    /// Delay before the first token (and before a non-streaming answer).
    pub ttft: Duration,
    /// Delay between consecutive streamed tokens.
    pub inter_token: Duration,
    /// Time to first token used by the `mock-slow` model.
    pub slow_ttft: Duration,
    /// Inter-token delay used by the `mock-slow` model.
    pub slow_inter_token: Duration,
    /// Upper bound of the uniform random extra added to every delay.
    pub jitter: Duration,
}

impl Default for MockLlmConfig {
    fn default() -> Self {
        Self {
            ttft: Duration::ZERO,
            inter_token: Duration::ZERO,
            slow_ttft: Duration::from_millis(200),
            slow_inter_token: Duration::from_millis(50),
            jitter: Duration::ZERO,
        }
    }
}

/// The mock's router. Streams and stalled requests served by it only end when
/// they complete or the client goes away; use [`serve`] for a shutdown that also
/// ends them.
pub fn router(config: MockLlmConfig) -> axum::Router {
    server::build_router(config, CancellationToken::new())
}

/// Serves the mock on `listener` until `shutdown` is cancelled, then shuts down
/// gracefully. In-flight streams (including stalled ones) are aborted on shutdown
/// so that it completes promptly.
pub async fn serve(
    listener: TcpListener,
    config: MockLlmConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = server::build_router(config, shutdown.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("mock LLM server failed")
}

/// Starts the mock on `127.0.0.1:0` in a background task.
///
/// Returns the base URL (like `http://127.0.0.1:PORT`, no trailing slash and
/// without `/v1`) and the token that stops the server.
pub async fn spawn(config: MockLlmConfig) -> anyhow::Result<(String, CancellationToken)> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding mock LLM listener")?;
    let addr = listener
        .local_addr()
        .context("reading mock LLM listener address")?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, config, token).await {
            tracing::error!(error = %format!("{e:#}"), "mock LLM server stopped with an error");
        }
    });
    tracing::debug!(%addr, "mock LLM listening");
    Ok((format!("http://{addr}"), shutdown))
}
