//! The OpenAI-compatible front door: `POST /v1/chat/completions`, streaming (SSE) and not.
//! A request becomes an `llm.chat` job through the same group commit, queue, limits and
//! accounting as any job; a worker runs it and this handler relays the job's events in OpenAI's
//! chunk format (or waits for the outcome). A client that goes away cancels its job.

pub(crate) mod error;
mod wire;

pub use error::OaiError;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures::Stream;
use serde_json::{json, Value};
use switchyard_core::event::types;
use switchyard_core::Event;
use uuid::Uuid;

use crate::auth::{Auth, CredentialWatch};
use crate::error::ApiError;
use crate::feed::{Feed, FeedItem};
use crate::routes::jobs::{cancel, json_body, llm_chat_job, request_trace};
use crate::AppState;

const LIVE_BUFFER: usize = 1024;
/// How often a request waiting for its reply checks its credential again.
const AUTH_RECHECK: Duration = Duration::from_secs(2);
const JOB_HEADER: &str = "x-switchyard-job-id";
/// Request header opting in (`true`) or out (`false`) of the response cache.
pub const CACHE_HEADER: &str = "x-switchyard-cache";

/// Cancels the job when dropped while armed (the client went away before the end).
struct CancelOnDrop {
    state: AppState,
    tenant: Uuid,
    job: Uuid,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (state, tenant, job) = (self.state.clone(), self.tenant, self.job);
        tracing::info!(job_id = %job, "front-door client went away; cancelling its job");
        self.state.tasks.spawn(async move {
            // a client gone while its job was in the group commit: the job is not there yet
            for wait in [0, 250, 1000, 4000] {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                match cancel(&state, tenant, job).await {
                    Ok(switchyard_store::CancelOutcome::NotFound) => continue,
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(job_id = %job, error = ?e, "could not cancel an abandoned job");
                        return;
                    }
                }
            }
        });
    }
}

/// Chat completion in OpenAI's API shape (`base_url=<switchyard>/v1` and a Switchyard key work
/// with OpenAI's SDKs): runs as an `llm.chat` job; `stream: true` relays its tokens as
/// `chat.completion.chunk`s. Fields we do not model are ignored; errors use OpenAI's shape.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai",
    request_body(content = Object, description = "OpenAI chat completion request"),
    responses(
        (status = 200, description = "`chat.completion`, or `text/event-stream` of `chat.completion.chunk` when streaming; header `x-switchyard-job-id`"),
        (status = 400, description = "invalid_request_error (with `param`), context_length_exceeded"),
        (status = 401, description = "invalid_api_key"),
        (status = 404, description = "model_not_found"),
        (status = 429, description = "rate_limit_exceeded, insufficient_quota (from the provider)"),
        (status = 502, description = "the provider failed"),
        (status = 504, description = "the provider timed out"),
    ),
    security(("bearer" = []))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // the credential the request was admitted with (a header, or `?token=`), checked again
    // while it waits for its reply
    let credential = crate::auth::presented_credential(&headers, uri.query());
    match run(state, auth, headers, credential, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(
    state: AppState,
    auth: Result<Auth, ApiError>,
    headers: HeaderMap,
    credential: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OaiError> {
    let Auth(principal) = auth?;
    let value = json_body(&headers, body)?;
    let mut req = wire::parse(&value)?;
    if let Some(v) = headers.get(CACHE_HEADER).and_then(|v| v.to_str().ok()) {
        // any case; a value that is neither leaves the tenant's default
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" => req.input.cache = Some(true),
            "0" | "false" | "off" | "no" => req.input.cache = Some(false),
            _ => {}
        }
    }
    if req.input.cache.is_none() && principal.llm_cache {
        req.input.cache = Some(true);
    }
    if let Err(e) = crate::routes::models::usable(&state.models, &principal, &req.input.model) {
        let mut err = OaiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{}` does not exist or you do not have access to it ({}).",
                req.input.model,
                e.message(&req.input.model)
            ),
        )
        .code("model_not_found");
        err.param = Some("model".into());
        return Err(err);
    }
    crate::quota::check_daily(&state, &principal, "llm.chat").await?;
    crate::quota::check_backlog(&state, &principal, 1)
        .await
        .map_err(OaiError::backpressure)?;
    let trace = request_trace(&headers);
    let input =
        serde_json::to_value(&req.input).map_err(|e| OaiError::from(ApiError::internal(e)))?;
    let job = llm_chat_job(
        &principal,
        input,
        json!({ "source": "chat.completions" }),
        &trace,
    );
    let job_id = job.id;
    // armed before the commit: a client gone while it runs leaves no job running for nobody
    let mut guard = CancelOnDrop {
        state: state.clone(),
        tenant: principal.tenant_id,
        job: job_id,
        armed: true,
    };
    if let Err(e) = state.submitter.submit(job).await {
        guard.armed = false;
        return Err(ApiError::from(e).into());
    }
    let feed = Feed::open_submitted(&state, job_id, LIVE_BUFFER).await;
    // checked again while the reply comes: a revoked key or an expired token ends the request
    // and cancels its job, as it ends a WebSocket or an SSE stream
    let watch = CredentialWatch::start(&state, credential, AUTH_RECHECK);
    let meta = wire::Meta {
        id: format!("chatcmpl-{}", job_id.simple()),
        created: Utc::now().timestamp(),
        model: req.input.model.clone(),
    };
    let job_header = (
        HeaderName::from_static(JOB_HEADER),
        HeaderValue::from_str(&job_id.to_string()).map_err(ApiError::internal)?,
    );
    if req.stream {
        let relay = Relay {
            feed,
            meta,
            include_usage: req.include_usage,
            sent_output: false,
            output_attempt: None,
            sent_text: String::new(),
            sent_calls: 0,
            pending: VecDeque::new(),
            done: false,
            guard,
            shutdown: state.shutdown.clone(),
            watch,
        };
        let mut relay = relay.started();
        if let Some(e) = relay.prime(PRIME_WAIT).await {
            return Err(e);
        }
        let stream = relay.into_stream();
        let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
        return Ok(([job_header], sse).into_response());
    }
    let mut feed = feed;
    loop {
        // on shutdown the client is told to retry and the job (its guard still armed) is
        // cancelled; the feed itself would wait for the job however long it takes
        let item = tokio::select! {
            // the job's end first: a reply that came is answered, whatever came with it
            biased;
            i = feed.next() => i,
            _ = state.shutdown.cancelled() => None,
            // (the guard, still armed, cancels the job)
            _ = watch.revoked.cancelled() => return Err(revoked()),
        };
        let Some(item) = item else { break };
        let FeedItem::Event(ev) = item else { continue };
        match ev.kind.as_str() {
            types::SUCCEEDED => {
                guard.armed = false;
                let body = wire::completion(&meta, &job_id.to_string(), &ev.data["output"]);
                return Ok(([job_header], Json(body)).into_response());
            }
            types::FAILED => {
                guard.armed = false;
                return Err(OaiError::from_job_error(&ev.data["error"]));
            }
            types::CANCELLED => {
                guard.armed = false;
                return Err(OaiError::from_job("cancelled", "the request was cancelled"));
            }
            // (the guard, still armed, cancels the job)
            types::STATUS => {
                if let Some(e) = quota_deferral(&ev) {
                    return Err(e);
                }
            }
            _ => {}
        }
    }
    Err(ApiError::new(
        switchyard_core::ErrorCode::Unavailable,
        "the server is shutting down",
    )
    .into())
}

/// The request's credential was revoked or expired while its reply came.
fn revoked() -> OaiError {
    ApiError::new(
        switchyard_core::ErrorCode::Unauthorized,
        "the API key was revoked or the token expired",
    )
    .into()
}

/// The job was put off to the next day because its tenant's daily quota ran out after the
/// request was admitted: the request gets the 429 it would have got a moment later (it would
/// wait until 00:00 UTC), and its job is cancelled.
fn quota_deferral(ev: &Event) -> Option<OaiError> {
    let d = &ev.data;
    if d["reason"] != "deferred" || d["code"] != "quota_exceeded" {
        return None;
    }
    let wait = d["retry_at"]
        .as_str()
        .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
        .and_then(|t| (t - chrono::Utc::now()).to_std().ok())
        .unwrap_or(Duration::from_secs(60));
    Some(
        ApiError::new(
            switchyard_core::ErrorCode::QuotaExceeded,
            "the tenant's daily quota of LLM tokens is used up; it resets at 00:00 UTC",
        )
        .retry_after(wait)
        .into(),
    )
}

/// Relays a job's events as `chat.completion.chunk`s.
struct Relay {
    feed: Feed,
    meta: wire::Meta,
    include_usage: bool,
    /// Output already went to the client: a restart cannot be hidden any more.
    sent_output: bool,
    /// The attempt whose output went out: output of another one would splice two replies
    /// (its announcement, a `status` event, is best effort and may be missing).
    output_attempt: Option<i32>,
    /// The text sent, held against the reply's `output.text` at the end.
    sent_text: String,
    /// Tool calls sent.
    sent_calls: usize,
    pending: VecDeque<String>,
    done: bool,
    guard: CancelOnDrop,
    shutdown: tokio_util::sync::CancellationToken,
    watch: CredentialWatch,
}

/// How long a streamed request waits for its reply to start before it answers 200: a failure
/// within it (a provider's 400, a refused key, a prompt too long) is answered with its status,
/// as OpenAI answers such requests, so that SDKs raise their typed errors (`BadRequestError`,
/// `RateLimitError`...) instead of an error inside a 200 stream.
const PRIME_WAIT: Duration = Duration::from_secs(3);

impl Relay {
    /// Reads the job's events until its output starts, it ends or `wait` passed; the error to
    /// answer with when it failed (or was cancelled) before any output.
    async fn prime(&mut self, wait: Duration) -> Option<OaiError> {
        let until = tokio::time::Instant::now() + wait;
        while !self.sent_output && !self.done {
            let item = tokio::select! {
                biased;
                r = tokio::time::timeout_at(until, self.feed.next()) => r.ok()?,
                _ = self.shutdown.cancelled() => return None,
                // (the guard, still armed, cancels the job)
                _ = self.watch.revoked.cancelled() => return Some(revoked()),
            };
            match item? {
                FeedItem::Event(ev) => {
                    let failure = match ev.kind.as_str() {
                        types::FAILED => Some(OaiError::from_job_error(&ev.data["error"])),
                        types::CANCELLED => {
                            Some(OaiError::from_job("cancelled", "the request was cancelled"))
                        }
                        _ => None,
                    };
                    if failure.is_some() {
                        self.guard.armed = false;
                        return failure;
                    }
                    // (the guard, still armed, cancels the job)
                    if let Some(e) = quota_deferral(&ev) {
                        return Some(e);
                    }
                    self.on_event(&ev);
                }
                FeedItem::Reset => {}
            }
        }
        None
    }

    /// Queues the first chunk (the assistant role), sent before any token.
    fn started(mut self) -> Self {
        self.pending.push_back(
            wire::chunk(
                &self.meta,
                json!({"role": "assistant", "content": ""}),
                None,
            )
            .to_string(),
        );
        self
    }

    fn error(&mut self, e: OaiError) {
        self.pending.push_back(e.body().to_string());
        self.finish();
    }

    /// Ends the stream with an error and leaves the job to be cancelled (its reply can no
    /// longer reach this client, which is told to retry).
    fn abandon(&mut self, e: OaiError) {
        self.pending.push_back(e.body().to_string());
        self.done = true;
    }

    fn finish(&mut self) {
        self.done = true;
        self.guard.armed = false;
    }

    /// Output of `attempt` may go out: false (and the stream is abandoned) when output of
    /// another attempt already did.
    fn output_of(&mut self, attempt: i32) -> bool {
        match self.output_attempt {
            Some(a) if a != attempt => {
                self.abandon(OaiError::from_job(
                    "provider_stream_error",
                    "the reply restarted after part of it was sent; retry the request",
                ));
                false
            }
            _ => {
                self.output_attempt = Some(attempt);
                self.sent_output = true;
                true
            }
        }
    }

    /// What the stored reply holds beyond what was streamed (a provider that does not
    /// stream, a cache entry without chunks, deltas lost on the way): sent before the end.
    /// An error when the streamed text is not the start of the reply.
    fn catch_up(&mut self, out: &Value) -> Result<(), OaiError> {
        let text = out["text"].as_str().unwrap_or_default();
        // the stored reply has each NUL replaced (Postgres holds none); the deltas do not
        switchyard_core::nul::clean_str(&mut self.sent_text);
        let Some(rest) = text.strip_prefix(self.sent_text.as_str()) else {
            return Err(OaiError::from_job(
                "provider_stream_error",
                "the streamed reply differs from the stored one; retry the request",
            ));
        };
        if !rest.is_empty() {
            self.pending
                .push_back(wire::chunk(&self.meta, json!({ "content": rest }), None).to_string());
        }
        let calls = out["tool_calls"]
            .as_array()
            .map_or(&[][..], |c| c.as_slice());
        for (i, c) in calls.iter().enumerate().skip(self.sent_calls) {
            let mut c = c.clone();
            c["index"] = json!(i);
            self.pending
                .push_back(wire::chunk(&self.meta, wire::tool_call_delta(&c), None).to_string());
        }
        Ok(())
    }

    fn on_event(&mut self, ev: &Event) {
        let (kind, data) = (ev.kind.as_str(), &ev.data);
        let job_id = self.guard.job.to_string();
        match kind {
            types::OUTPUT_DELTA => {
                if let Some(t) = data["text"].as_str() {
                    if self.output_of(ev.attempt) {
                        self.sent_text.push_str(t);
                        self.pending.push_back(
                            wire::chunk(&self.meta, json!({ "content": t }), None).to_string(),
                        );
                    }
                }
            }
            types::OUTPUT_TOOL_CALL if self.output_of(ev.attempt) => {
                self.sent_calls += 1;
                self.pending.push_back(
                    wire::chunk(&self.meta, wire::tool_call_delta(data), None).to_string(),
                );
            }
            types::STATUS if quota_deferral(ev).is_some() => {
                if let Some(e) = quota_deferral(ev) {
                    self.abandon(e);
                }
            }
            types::STATUS => {
                // a new attempt, or a provider restart inside one, after output went out:
                // the reply would be spliced from two calls, so the stream ends with an error.
                // A requeue (a retry after a backoff, a worker that drained) ends it at once:
                // waiting would hold the client through the backoff only to fail then, after
                // the next attempt's call started (the guard cancels the job while queued)
                let restart = data.get("restart").is_some()
                    || data["status"] == "queued"
                    || (data["status"] == "running" && data["attempt"].as_i64() > Some(1));
                if restart && self.sent_output {
                    self.abandon(OaiError::from_job(
                        "provider_stream_error",
                        "the provider failed mid-reply and the reply restarted; retry the request",
                    ));
                }
            }
            // the end of another attempt than the one whose output went out (its own events
            // lost): its tool calls or text would be spliced onto the first attempt's
            types::SUCCEEDED if !self.output_of(ev.attempt) => {}
            types::SUCCEEDED => {
                let out = &data["output"];
                if let Err(e) = self.catch_up(out) {
                    self.abandon(e);
                    return;
                }
                if let Some(r) = out["refusal"].as_str() {
                    // refusals are not streamed as tokens: the whole of it, before the end
                    self.pending.push_back(
                        wire::chunk(&self.meta, json!({ "refusal": r }), None).to_string(),
                    );
                }
                let fin = out["finish_reason"].as_str().unwrap_or("stop");
                self.pending
                    .push_back(wire::chunk(&self.meta, json!({}), Some(fin)).to_string());
                if self.include_usage {
                    self.pending
                        .push_back(wire::usage_chunk(&self.meta, &job_id, out).to_string());
                }
                self.pending.push_back("[DONE]".to_string());
                self.finish();
            }
            types::FAILED => {
                self.error(OaiError::from_job_error(&data["error"]));
            }
            types::CANCELLED => {
                self.error(OaiError::from_job("cancelled", "the request was cancelled"));
            }
            _ => {}
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        futures::stream::unfold(self, |mut r| async move {
            loop {
                if let Some(data) = r.pending.pop_front() {
                    return Some((Ok(SseEvent::default().data(data)), r));
                }
                if r.done {
                    return None;
                }
                let item = tokio::select! {
                    biased;
                    i = r.feed.next() => i,
                    _ = r.watch.revoked.cancelled() => {
                        r.abandon(revoked());
                        continue;
                    }
                    _ = r.shutdown.cancelled() => {
                        r.abandon(OaiError::new(
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "server_error",
                            "the server is shutting down; retry the request",
                        ));
                        continue;
                    }
                };
                match item {
                    Some(FeedItem::Event(ev)) => r.on_event(&ev),
                    Some(FeedItem::Reset) if r.sent_output => r.abandon(OaiError::from_job(
                        "provider_stream_error",
                        "the reply's stream was lost; retry the request",
                    )),
                    Some(FeedItem::Reset) => {}
                    None => r.abandon(OaiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the reply's stream ended early; retry the request",
                    )),
                }
            }
        })
    }
}
