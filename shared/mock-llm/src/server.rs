//! HTTP handlers: `/v1/chat/completions` (plain and SSE), `/v1/models`, `/healthz`,
//! and the per-model failure behaviours.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::text::Completion;
use crate::wire::{self, ApiError, ChatRequest, ResponseMeta};
use crate::MockLlmConfig;

/// Request header overriding the time to first token, in milliseconds.
pub const TTFT_HEADER: &str = "x-mock-ttft-ms";
/// Request header overriding the delay between tokens, in milliseconds.
pub const INTER_TOKEN_HEADER: &str = "x-mock-inter-token-ms";

/// Model names advertised by `GET /v1/models`. Any other `mock-` name behaves
/// like `mock-echo`.
pub const MOCK_MODELS: &[&str] = &[
    "mock-echo",
    "mock-slow",
    "mock-stall",
    "mock-drop",
    "mock-error-500",
    "mock-error-429",
    "mock-error-400",
];

#[derive(Clone)]
struct AppState {
    config: MockLlmConfig,
    shutdown: CancellationToken,
    next_id: Arc<AtomicU64>,
}

/// Builds the router; `shutdown` ends streams and stalled requests early.
pub(crate) fn build_router(config: MockLlmConfig, shutdown: CancellationToken) -> Router {
    let state = AppState {
        config,
        shutdown,
        next_id: Arc::new(AtomicU64::new(1)),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn list_models() -> Json<Value> {
    let data: Vec<Value> = MOCK_MODELS
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "switchyard-mock" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// What a model name asks the mock to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Normal,
    Slow,
    Stall,
    Drop,
}

fn behaviour_for(model: &str) -> Result<Behaviour, ApiError> {
    match model {
        "mock-error-500" => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "mock-error-500: simulated internal server error",
        )),
        "mock-error-429" => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "mock-error-429: simulated rate limit, retry after 1s",
        )
        .with_retry_after(1)),
        "mock-error-400" => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "mock-error-400: simulated invalid request",
        )),
        "mock-slow" => Ok(Behaviour::Slow),
        "mock-stall" => Ok(Behaviour::Stall),
        "mock-drop" => Ok(Behaviour::Drop),
        m if m.starts_with("mock-") => Ok(Behaviour::Normal),
        m => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{m}` does not exist or you do not have access to it."),
        )
        .with_code("model_not_found")),
    }
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let raw = headers.get(name)?;
    match raw.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(ms) => Some(Duration::from_millis(ms)),
        None => {
            tracing::warn!(header = name, value = ?raw, "ignoring unparseable mock delay header");
            None
        }
    }
}

/// Sleeps for `d` unless shutdown comes first; returns false on shutdown.
/// A zero duration returns immediately without sleeping or yielding.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    if d.is_zero() {
        return !shutdown.is_cancelled();
    }
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "mock LLM server is shutting down",
    )
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("could not parse request body as a chat completion request: {e}"),
            )
            .into_response();
        }
    };
    let behaviour = match behaviour_for(&req.model) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(model = %req.model, status = %e.status, "mock LLM error response");
            return e.into_response();
        }
    };

    let (default_ttft, default_inter) = match behaviour {
        Behaviour::Slow => (state.config.slow_ttft, state.config.slow_inter_token),
        _ => (state.config.ttft, state.config.inter_token),
    };
    let ttft = header_ms(&headers, TTFT_HEADER).unwrap_or(default_ttft);
    let inter_token = header_ms(&headers, INTER_TOKEN_HEADER).unwrap_or(default_inter);

    let completion = Completion::plan(&req.message_pairs(), req.token_limit());
    let meta = ResponseMeta {
        id: format!(
            "chatcmpl-mock-{}",
            state.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_now(),
        model: req.model.clone(),
    };
    tracing::debug!(
        model = %meta.model,
        stream = req.wants_stream(),
        tokens = completion.tokens.len(),
        "mock LLM completion"
    );

    if req.wants_stream() {
        let plan = StreamPlan {
            meta,
            completion,
            include_usage: req.include_usage(),
            cut: match behaviour {
                Behaviour::Stall => Some(Cut::Stall { after: 1 }),
                Behaviour::Drop => Some(Cut::Drop { after: 2 }),
                Behaviour::Normal | Behaviour::Slow => None,
            },
            ttft,
            inter_token,
            shutdown: state.shutdown.clone(),
        };
        return sse_response(plan);
    }

    if behaviour == Behaviour::Stall {
        // Never answer; only shutdown (or the client dropping the request) ends this.
        state.shutdown.cancelled().await;
        return shutting_down().into_response();
    }
    if !pause(ttft, &state.shutdown).await {
        return shutting_down().into_response();
    }
    Json(wire::completion_json(&meta, &completion)).into_response()
}

/// Where a failure-mode stream stops.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// After `after` tokens, send nothing more but keep the connection open.
    Stall { after: usize },
    /// After `after` tokens, abort the body (no finish chunk, no `[DONE]`).
    Drop { after: usize },
}

impl Cut {
    fn after(self) -> usize {
        match self {
            Cut::Stall { after } | Cut::Drop { after } => after,
        }
    }
}

struct StreamPlan {
    meta: ResponseMeta,
    completion: Completion,
    include_usage: bool,
    cut: Option<Cut>,
    ttft: Duration,
    inter_token: Duration,
    shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Role,
    /// About to emit token `i` (or the finish chunk once all tokens are out).
    Token(usize),
    Usage,
    Done,
    End,
}

struct StreamState {
    plan: StreamPlan,
    phase: Phase,
}

type Chunk = Result<Bytes, io::Error>;

fn sse_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn aborted(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, msg.to_owned())
}

impl StreamState {
    /// Produces the next body chunk, or `None` when the body is complete.
    async fn step(mut self) -> Option<(Chunk, Self)> {
        let p = &self.plan;
        let item = match self.phase {
            Phase::End => return None,
            Phase::Role => {
                self.phase = Phase::Token(0);
                sse_event(&wire::chunk_json(
                    &p.meta,
                    json!({ "role": "assistant", "content": "" }),
                    None,
                ))
            }
            Phase::Token(i) => {
                let n = p.completion.tokens.len();
                if let Some(cut) = p.cut {
                    if i >= cut.after().min(n) {
                        return self.cut(cut).await;
                    }
                }
                match p.completion.tokens.get(i) {
                    Some(token) => {
                        let delay = if i == 0 { p.ttft } else { p.inter_token };
                        if !pause(delay, &p.shutdown).await {
                            return self.abort("mock LLM server is shutting down");
                        }
                        let chunk = sse_event(&wire::chunk_json(
                            &p.meta,
                            json!({ "content": token }),
                            None,
                        ));
                        self.phase = Phase::Token(i + 1);
                        chunk
                    }
                    None => {
                        let chunk = sse_event(&wire::chunk_json(
                            &p.meta,
                            json!({}),
                            Some(p.completion.finish_reason),
                        ));
                        self.phase = if p.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                        chunk
                    }
                }
            }
            Phase::Usage => {
                self.phase = Phase::Done;
                sse_event(&wire::usage_chunk_json(&p.meta, &p.completion))
            }
            Phase::Done => {
                self.phase = Phase::End;
                Bytes::from_static(b"data: [DONE]\n\n")
            }
        };
        Some((Ok(item), self))
    }

    async fn cut(self, cut: Cut) -> Option<(Chunk, Self)> {
        match cut {
            Cut::Stall { .. } => {
                // Hold the connection open; dropping the body (client gone) cancels this.
                self.plan.shutdown.cancelled().await;
                self.abort("mock LLM server is shutting down")
            }
            Cut::Drop { .. } => {
                // Give the server a chance to flush the tokens already produced
                // before the body error tears the connection down.
                tokio::task::yield_now().await;
                self.abort("mock-drop: simulated dropped connection")
            }
        }
    }

    /// Ends the body with an error so the connection is closed mid-stream.
    fn abort(mut self, msg: &str) -> Option<(Chunk, Self)> {
        self.phase = Phase::End;
        Some((Err(aborted(msg)), self))
    }
}

fn sse_response(plan: StreamPlan) -> Response {
    let state = StreamState {
        plan,
        phase: Phase::Role,
    };
    let stream = futures::stream::unfold(state, StreamState::step);
    let mut resp = Body::from_stream(stream).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_routing() {
        assert_eq!(behaviour_for("mock-echo").ok(), Some(Behaviour::Normal));
        assert_eq!(behaviour_for("mock-1").ok(), Some(Behaviour::Normal));
        assert_eq!(behaviour_for("mock-slow").ok(), Some(Behaviour::Slow));
        assert_eq!(behaviour_for("mock-stall").ok(), Some(Behaviour::Stall));
        assert_eq!(behaviour_for("mock-drop").ok(), Some(Behaviour::Drop));
        let status = |m: &str| behaviour_for(m).err().map(|e| e.status);
        assert_eq!(
            status("mock-error-500"),
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(
            status("mock-error-429"),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(status("mock-error-400"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("gpt-4o"), Some(StatusCode::NOT_FOUND));
    }

    #[test]
    fn delay_headers() {
        let mut h = HeaderMap::new();
        h.insert(TTFT_HEADER, HeaderValue::from_static(" 25 "));
        h.insert(INTER_TOKEN_HEADER, HeaderValue::from_static("nope"));
        assert_eq!(header_ms(&h, TTFT_HEADER), Some(Duration::from_millis(25)));
        assert_eq!(header_ms(&h, INTER_TOKEN_HEADER), None);
    }
}
