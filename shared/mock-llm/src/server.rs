//! The router, its state, `/v1/models` and `/healthz`, and the request flow both
//! completion routes share: record, count, pick the scenario, answer plainly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::scenario::{self, Behaviour, Failure, MOCK_MODELS};
use crate::stats::{self, CallGuard, Observer};
use crate::stream::{self, BodyPlan};
use crate::text;
use crate::timing::{pause, Rng, Timing};
use crate::{anthropic, openai, wire, MockLlmConfig};

/// Everything the handlers share; cloned per request.
#[derive(Clone)]
pub(crate) struct AppState {
    pub config: Arc<MockLlmConfig>,
    pub shutdown: CancellationToken,
    pub next_id: Arc<AtomicU64>,
    pub observer: Arc<Observer>,
    pub rng: Arc<Rng>,
}

/// Builds the router; `shutdown` ends streams and stalled requests early.
pub(crate) fn build_router(config: MockLlmConfig, shutdown: CancellationToken) -> Router {
    let state = AppState {
        config: Arc::new(config),
        shutdown,
        next_id: Arc::new(AtomicU64::new(1)),
        observer: Arc::new(Observer::default()),
        rng: Arc::new(Rng::from_clock()),
    };
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(list_models))
        .route("/mock/stats", get(stats::stats))
        .route("/mock/requests", get(stats::requests))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

/// OpenAI's model list, or Anthropic's when the client sends `anthropic-version`.
async fn list_models(headers: HeaderMap) -> Json<Value> {
    if headers.contains_key("anthropic-version") {
        let data: Vec<Value> = MOCK_MODELS
            .iter()
            .map(|id| {
                json!({
                    "type": "model",
                    "id": id,
                    "display_name": id,
                    "created_at": "2024-01-01T00:00:00Z",
                })
            })
            .collect();
        return Json(json!({
            "data": data,
            "has_more": false,
            "first_id": MOCK_MODELS.first(),
            "last_id": MOCK_MODELS.last(),
        }));
    }
    let data: Vec<Value> = MOCK_MODELS
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "switchyard-mock" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    OpenAi,
    Anthropic,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::OpenAi => "openai",
            Route::Anthropic => "anthropic",
        }
    }

    /// `failure` in this route's error shape.
    pub fn error(self, failure: &Failure) -> Response {
        let spec = failure.spec();
        tracing::debug!(route = self.name(), status = %spec.status, "mock LLM error response");
        match self {
            Route::OpenAi => wire::error_response(&spec),
            Route::Anthropic => anthropic::error_response(&spec),
        }
    }

    /// The error object `mock-midstream-error` sends.
    fn midstream_error(self) -> Value {
        match self {
            Route::OpenAi => wire::midstream_error_json(),
            Route::Anthropic => anthropic::midstream_error_json(),
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses the body as JSON and records the request (unparseable bodies are
/// recorded as a string and refused with a 400).
pub(crate) fn receive(
    state: &AppState,
    route: Route,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Value, Failure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            state.observer.record(route, headers, v.clone());
            Ok(v)
        }
        Err(e) => {
            let raw = String::from_utf8_lossy(body).into_owned();
            state.observer.record(route, headers, Value::String(raw));
            Err(Failure::Malformed(format!(
                "could not parse the request body as JSON: {e}"
            )))
        }
    }
}

/// A counted request that gets an answer.
pub(crate) struct Call {
    /// Unique per server; numbers the response and tool-call ids.
    pub id: u64,
    pub behaviour: Behaviour,
    pub timing: Timing,
    pub guard: CallGuard,
}

/// Counts the call and resolves its scenario; a refused call comes back as the
/// failure to answer with.
pub(crate) fn start_call(
    state: &AppState,
    headers: &HeaderMap,
    model: &str,
    pairs: &[(String, String)],
) -> Result<Call, Failure> {
    let (n, mut guard) = state.observer.begin(model);
    match scenario::resolve(model, n, text::prompt_tokens(pairs)) {
        Err(failure) => {
            guard.settle();
            Err(failure)
        }
        Ok(behaviour) => Ok(Call {
            id: state.next_id.fetch_add(1, Ordering::Relaxed),
            behaviour,
            timing: Timing::for_request(&state.config, headers, behaviour == Behaviour::Slow),
            guard,
        }),
    }
}

/// Answers `call` with the non-streaming `body`, after the time to first token
/// (or never, for `mock-stall`), applying the scenario's breakage.
pub(crate) async fn plain(state: &AppState, route: Route, call: Call, body: Value) -> Response {
    let Call {
        behaviour,
        timing,
        mut guard,
        ..
    } = call;
    if behaviour == Behaviour::Stall {
        // Never answer; only shutdown (or the client dropping the request, which
        // drops this future and counts it as aborted) ends this.
        state.shutdown.cancelled().await;
        guard.settle();
        return route.error(&Failure::ShuttingDown);
    }
    if !pause(timing.token_delay(0, &state.rng), &state.shutdown).await {
        guard.settle();
        return route.error(&Failure::ShuttingDown);
    }
    if behaviour == Behaviour::MidstreamError {
        guard.settle();
        return (StatusCode::OK, Json(route.midstream_error())).into_response();
    }
    if let Some(plan) = BodyPlan::broken_json(&body, behaviour) {
        return stream::respond(plan, stream::JSON, guard, state.shutdown.clone());
    }
    guard.complete();
    Json(body).into_response()
}
