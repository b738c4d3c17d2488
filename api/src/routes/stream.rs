//! Live job events: `GET /v1/ws` (WebSocket, many jobs per connection) and
//! `GET /v1/jobs/{id}/events` (Server-Sent Events, one job).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use switchyard_core::ErrorCode;
use switchyard_store::Scope;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{still_valid, url_query_param, Auth};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::feed::{Feed, FeedItem};
use crate::AppState;

/// Messages that may wait for one WebSocket client before it counts as too slow.
pub const WS_BUFFER: usize = 1024;
/// Live events that may wait for one subscription before it re-reads history instead.
const LIVE_BUFFER: usize = 256;
const MAX_SUBSCRIPTIONS: usize = 10_000;
const PING_EVERY: Duration = Duration::from_secs(20);
/// An SSE stream checks its credential again before an event once its last check is older.
const EVENT_AUTH_CHECK: Duration = Duration::from_secs(1);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a client at a time. Clients send small control frames; tungstenite zeroes
/// this much of its buffer on every read attempt (its default, 128 KiB, cost ~10 % of the
/// API's CPU when streaming).
const READ_BUFFER: usize = 4 * 1024;
/// Frames written to a client in one flush (one syscall) when several are waiting.
const WRITE_BATCH: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientOp {
    op: String,
    job_id: Option<String>,
    after: Option<u64>,
}

fn error_frame(job_id: Option<Uuid>, err: &ApiError) -> Message {
    let mut body = json!({ "type": "error", "error": err.to_body().error });
    if let Some(j) = job_id {
        body["job_id"] = json!(j);
    }
    Message::Text(body.to_string().into())
}

/// WebSocket stream of job events. Send `{"op":"subscribe","job_id":"...","after":N}` and
/// `{"op":"unsubscribe","job_id":"..."}`; receive event objects, `reset` and `error` frames.
#[utoipa::path(
    get, path = "/v1/ws", tag = "events",
    params(("token" = Option<String>, Query, description = "API key, for clients that cannot set headers")),
    responses(
        (status = 101, description = "WebSocket upgrade"),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "invalid_parameter (not a WebSocket upgrade request)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn ws(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(
                ErrorCode::InvalidParameter,
                format!("expected a WebSocket upgrade: {e}"),
            )
            .into_response()
        }
    };
    let scope = principal.scope();
    // checked again while the connection lives: a revoked key or an expired token ends it
    let credential = crate::auth::presented_credential(&headers, uri.query()).unwrap_or_default();
    upgrade
        .max_message_size(64 * 1024)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| connection(state, principal, scope, credential, socket))
}

async fn connection(
    state: AppState,
    principal: switchyard_store::Principal,
    scope: Scope,
    credential: String,
    socket: WebSocket,
) {
    state.metrics.ws_connections.inc();
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(WS_BUFFER);
    let slow = CancellationToken::new();
    let conn_done = CancellationToken::new();
    let mut subs: HashMap<Uuid, CancellationToken> = HashMap::new();
    // finished subscriptions are pruned when the map doubles, not on every message
    let mut prune_at = 64;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(close(1012, "server restarting; reconnect"))).await;
                break;
            }
            _ = slow.cancelled() => break,
            _ = ping.tick() => {
                if !still_valid(&state, &credential).await {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(close(1008, "credentials revoked or expired"))).await;
                    break;
                }
                if !matches!(tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Ping(Vec::new().into()))).await, Ok(Ok(()))) {
                    break;
                }
            }
            Some(msg) = out_rx.recv() => {
                // a client that stopped reading blocks this send; its buffer filling up meanwhile
                // must still end the connection with 1008 (the frame goes out once it reads again)
                let sent = tokio::select! {
                    r = tokio::time::timeout(SEND_TIMEOUT, send_batch(&mut sink, msg, &mut out_rx)) => matches!(r, Ok(Ok(()))),
                    _ = slow.cancelled() => true,
                };
                if !sent {
                    // blocked for SEND_TIMEOUT: as slow as a full buffer
                    slow.cancel();
                }
                if slow.is_cancelled() {
                    break;
                }
            }
            m = stream.next() => {
                let text = match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let err = ApiError::new(ErrorCode::MalformedJson, "send JSON text frames");
                        let _ = out_tx.try_send(error_frame(None, &err));
                        continue;
                    }
                    Some(Ok(_)) => continue,
                };
                if subs.len() >= prune_at {
                    subs.retain(|_, t| !t.is_cancelled());
                    // at most the cap: above it, finished subscriptions would count against the
                    // cap for good (no prune would come before the refusal)
                    prune_at = (subs.len() * 2).clamp(64, MAX_SUBSCRIPTIONS);
                }
                if !still_valid(&state, &credential).await {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(close(1008, "credentials revoked or expired"))).await;
                    break;
                }
                // every message is a request: held to the credential's and the tenant's rates
                // (each subscription reads Postgres and Redis; only the upgrade was counted)
                if let (_, Err(err)) = state.admission.admit(&principal).await {
                    let _ = out_tx.try_send(error_frame(None, &err));
                    continue;
                }
                if let Err((job, err)) = handle_op(&state, &scope, text.as_str(), &mut subs, &out_tx, &slow, &conn_done) {
                    let _ = out_tx.try_send(error_frame(job, &err));
                }
            }
        }
    }
    if slow.is_cancelled() && !state.shutdown.is_cancelled() {
        state.metrics.ws_slow_disconnects.inc();
        let _ = tokio::time::timeout(
            SEND_TIMEOUT,
            sink.send(close(1008, "client too slow; events dropped")),
        )
        .await;
    }
    conn_done.cancel();
    state.metrics.ws_connections.dec();
}

/// Writes `first` and whatever else is already waiting (up to [`WRITE_BATCH`] frames), then
/// flushes once: one syscall for a burst of events instead of one per event.
async fn send_batch<S>(
    sink: &mut S,
    first: Message,
    rx: &mut mpsc::Receiver<Message>,
) -> Result<(), axum::Error>
where
    S: futures::Sink<Message, Error = axum::Error> + Unpin,
{
    sink.feed(first).await?;
    for _ in 1..WRITE_BATCH {
        match rx.try_recv() {
            Ok(m) => sink.feed(m).await?,
            Err(_) => break,
        }
    }
    sink.flush().await
}

fn handle_op(
    state: &AppState,
    scope: &Scope,
    text: &str,
    subs: &mut HashMap<Uuid, CancellationToken>,
    out: &mpsc::Sender<Message>,
    slow: &CancellationToken,
    conn_done: &CancellationToken,
) -> Result<(), (Option<Uuid>, ApiError)> {
    let op: ClientOp = serde_json::from_str(text).map_err(|e| {
        let code = if e.is_data() {
            ErrorCode::InvalidInput
        } else {
            ErrorCode::MalformedJson
        };
        (None, ApiError::new(code, format!("bad message: {e}")))
    })?;
    let job_id = match op.job_id.as_deref().map(Uuid::parse_str) {
        Some(Ok(id)) => id,
        _ => {
            return Err((
                None,
                ApiError::field(
                    ErrorCode::InvalidInput,
                    "job_id",
                    "a job id (UUID) is required",
                ),
            ))
        }
    };
    match op.op.as_str() {
        "subscribe" => {
            if let Some(old) = subs.remove(&job_id) {
                old.cancel();
            }
            if subs.len() >= MAX_SUBSCRIPTIONS {
                return Err((
                    Some(job_id),
                    ApiError::new(
                        ErrorCode::RateLimited,
                        "too many subscriptions on this connection",
                    ),
                ));
            }
            let token = conn_done.child_token();
            subs.insert(job_id, token.clone());
            let (state, out, slow, scope) =
                (state.clone(), out.clone(), slow.clone(), scope.clone());
            let after = op.after.unwrap_or(0);
            state.tasks.clone().spawn(async move {
                let mut feed = match Feed::open(&state, scope, job_id, after, LIVE_BUFFER).await {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = out.try_send(error_frame(Some(job_id), &e));
                        token.cancel();
                        return;
                    }
                };
                loop {
                    let item = tokio::select! {
                        _ = token.cancelled() => return,
                        i = feed.next() => i,
                    };
                    let Some(item) = item else { break };
                    let text = item.to_text(job_id);
                    // waits for room (a replay of a long history comes faster than any socket
                    // takes it): a client counts as too slow only when the buffer stays full
                    // for SEND_TIMEOUT, not as soon as a burst fills it
                    let sent = tokio::select! {
                        _ = token.cancelled() => return,
                        _ = slow.cancelled() => return,
                        r = tokio::time::timeout(SEND_TIMEOUT, out.send(Message::Text(text.into()))) => r,
                    };
                    if !matches!(sent, Ok(Ok(()))) {
                        slow.cancel();
                        return;
                    }
                    if let FeedItem::Event(e) = &item {
                        state.metrics.observe_delivery(e.ts);
                    }
                }
                token.cancel();
            });
            Ok(())
        }
        "unsubscribe" => {
            if let Some(t) = subs.remove(&job_id) {
                t.cancel();
            }
            Ok(())
        }
        other => Err((
            Some(job_id),
            ApiError::field(
                ErrorCode::InvalidInput,
                "op",
                format!("unknown op `{other}` (use subscribe or unsubscribe)"),
            ),
        )),
    }
}

/// Server-Sent Events of one job: `id: <seq>`, `event: <type>`, `data: <event JSON>`. Resumes
/// after `Last-Event-ID` (or `?after=`); closes after the terminal event.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "events",
    params(
        ("id" = Uuid, Path, description = "job id"),
        ("after" = Option<u64>, Query, description = "only events with a greater seq (Last-Event-ID wins)"),
        ("token" = Option<String>, Query, description = "API key, for EventSource clients"),
    ),
    responses(
        (status = 200, description = "text/event-stream of events", content_type = "text/event-stream"),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 422, description = "invalid_parameter", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn sse(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let id = super::jobs::parse_id(&id)?;
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string());
    let after = match last_id.or_else(|| uri.query().and_then(|q| url_query_param(q, "after"))) {
        None => 0,
        Some(s) if s.is_empty() => 0,
        Some(s) => s.parse::<u64>().map_err(|_| {
            ApiError::field(
                ErrorCode::InvalidParameter,
                "after",
                "must be a non-negative integer",
            )
        })?,
    };
    let feed = Feed::open(&state, principal.scope(), id, after, LIVE_BUFFER).await?;
    // checked again while the stream lives, as a WebSocket's: a revoked key or an expired
    // token ends it (a reconnect then gets 401); on a timer, and before an event when the last
    // check is older than a second
    let credential = crate::auth::presented_credential(&headers, uri.query()).unwrap_or_default();
    let check = std::sync::Arc::new((state.clone(), credential.clone()));
    let ended = {
        let (state, shutdown) = (state.clone(), state.shutdown.clone());
        async move {
            let revoked = async {
                let mut every = tokio::time::interval(PING_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    if !still_valid(&state, &credential).await {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = revoked => {}
            }
        }
    };
    let metrics = state.metrics.clone();
    let checked = tokio::time::Instant::now();
    let stream = futures::stream::unfold((feed, checked), move |(mut f, mut checked)| {
        let (metrics, check) = (metrics.clone(), check.clone());
        async move {
            let item = f.next().await?;
            if checked.elapsed() >= EVENT_AUTH_CHECK {
                if !still_valid(&check.0, &check.1).await {
                    return None;
                }
                checked = tokio::time::Instant::now();
            }
            let data = item.to_text(f.job_id);
            let ev = match &item {
                FeedItem::Event(e) => {
                    metrics.observe_delivery(e.ts);
                    SseEvent::default()
                        .id(e.seq.to_string())
                        .event(e.kind.clone())
                        .data(data)
                }
                FeedItem::Reset => SseEvent::default().event("reset").data(data),
            };
            Some((Ok(ev), (f, checked)))
        }
    })
    .take_until(ended);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
