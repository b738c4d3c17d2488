//! OpenAI-compatible fake LLM provider served over HTTP, used by `switchyard dev`,
//! `switchyard mock-llm` and tests (providers are faked at the HTTP level).
//!
//! Endpoints:
//! - `POST /v1/chat/completions`: Chat Completions, plain JSON or SSE (`stream: true`).
//! - `GET /v1/models`: lists [`MOCK_MODELS`].
//! - `GET /healthz`: `200 ok`.
//!
//! The reply text is deterministic (see [`expected_text`]). The model name picks
//! a behaviour: any `mock-*` model answers normally, except `mock-error-500`,
//! `mock-error-429` (with `retry-after: 1`), `mock-error-400`, `mock-slow` (uses
//! the slow delays), `mock-stall` (stops after the first token, or never answers
//! when not streaming) and `mock-drop` (aborts the stream after two tokens).
//! Other model names get `404 model_not_found`. The request headers
//! [`TTFT_HEADER`] and [`INTER_TOKEN_HEADER`] override the delays per request.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod server;
mod text;
mod wire;

use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use server::{INTER_TOKEN_HEADER, MOCK_MODELS, TTFT_HEADER};
pub use text::expected_text;

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
}

impl Default for MockLlmConfig {
    fn default() -> Self {
        Self {
            ttft: Duration::ZERO,
            inter_token: Duration::ZERO,
            slow_ttft: Duration::from_millis(200),
            slow_inter_token: Duration::from_millis(50),
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
