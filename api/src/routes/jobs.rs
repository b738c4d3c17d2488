//! `/v1/jobs`: submit, read, list and cancel jobs.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::job::{CreateJobRequest, Job, JobKind, JobStatus, ValidJobRequest};
use switchyard_core::telemetry::TraceParent;
use switchyard_core::{ErrorCode, Event, FieldError};
use switchyard_store::{CancelOutcome, JobFilter, NewJob, Scope};
use uuid::Uuid;

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Parses a JSON body, mapping every failure to a stable error.
pub fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body exceeds the size limit",
            )
        } else {
            ApiError::new(
                ErrorCode::MalformedJson,
                format!("could not read the body: {rej}"),
            )
        }
    })?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(mime == "application/json" || mime.ends_with("+json")) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::MalformedJson, format!("malformed JSON: {e}")))?;
    if let Some((field, why)) = switchyard_core::error::first_unstorable(&value) {
        return Err(ApiError::field(ErrorCode::InvalidInput, &field, why));
    }
    Ok(value)
}

/// Fills an `llm.chat` input's unset options from the tenant's settings (the response cache).
pub fn tenant_llm_defaults(principal: &switchyard_store::Principal, input: &mut Value) {
    if principal.llm_cache && input.get("cache").is_none_or(Value::is_null) {
        input["cache"] = Value::Bool(true);
    }
}

/// A new `llm.chat` job of the caller's tenant with default limits (conversation turns and
/// the front door build theirs here).
pub fn llm_chat_job(
    principal: &switchyard_store::Principal,
    input: Value,
    metadata: Value,
    trace: &TraceParent,
) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        tenant_id: principal.tenant_id,
        created_by: principal.subject(),
        kind: JobKind::LlmChat.as_str().to_string(),
        queue: JobKind::LlmChat.queue().to_string(),
        priority: 0,
        max_attempts: switchyard_core::job::DEFAULT_MAX_ATTEMPTS,
        timeout_s: None,
        input,
        metadata,
        trace_parent: Some(trace.to_string()),
        created_at: Utc::now(),
        run_at: None,
        backoff: None,
        webhook_url: None,
    }
}

/// The caller's trace context (a child span of its `traceparent`), or a new trace.
pub fn request_trace(headers: &HeaderMap) -> TraceParent {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceParent::generate)
}

/// Validates a job request (fields, kind, model) with the tenant's LLM defaults applied; errors
/// name the field as in the body.
pub fn validate_job(
    state: &AppState,
    principal: &switchyard_store::Principal,
    value: Value,
) -> Result<ValidJobRequest, FieldError> {
    let enable_noop = state.cfg.enable_noop;
    let mut req = CreateJobRequest::parse(value, |k| k != JobKind::SystemNoop || enable_noop)?;
    if let Some(u) = &req.webhook_url {
        switchyard_core::webhook::check_url("webhook_url", u, state.cfg.webhooks_allow_private)?;
    }
    if req.kind == JobKind::LlmChat {
        if req.input.get("conversation").is_some_and(|c| !c.is_null()) {
            return Err(FieldError {
                code: ErrorCode::InvalidInput,
                field: "input.conversation".into(),
                message: "conversation turns are posted with POST /v1/conversations/{id}/messages"
                    .into(),
            });
        }
        tenant_llm_defaults(principal, &mut req.input);
        // the model must be one this deployment routes (its table, `provider/model`, mock-*)
        // and the tenant may use
        let model = req.input["model"].as_str().unwrap_or_default();
        super::models::usable(&state.models, principal, model).map_err(|e| FieldError {
            code: ErrorCode::InvalidInput,
            field: "input.model".into(),
            message: e.message(model),
        })?;
    }
    Ok(req)
}

/// Validates a job request (fields, kind, model, daily quota) and builds the job row; errors
/// name the field as in the body. The caller checks the backlog once for all it submits
/// (`quota::check_backlog`).
pub async fn build_job(
    state: &AppState,
    principal: &switchyard_store::Principal,
    value: Value,
    trace: &TraceParent,
) -> ApiResult<NewJob> {
    let job = new_job(state, principal, value, trace)?;
    crate::quota::check_daily(state, principal, &job.kind).await?;
    Ok(job)
}

/// A validated job, its daily quota not checked (a batch checks once per kind).
pub fn new_job(
    state: &AppState,
    principal: &switchyard_store::Principal,
    value: Value,
    trace: &TraceParent,
) -> ApiResult<NewJob> {
    let req = validate_job(state, principal, value)?;
    Ok(NewJob {
        id: Uuid::now_v7(),
        tenant_id: principal.tenant_id,
        created_by: principal.subject(),
        kind: req.kind.as_str().to_string(),
        queue: req.queue,
        priority: req.priority,
        max_attempts: req.max_attempts,
        timeout_s: req.timeout_s,
        input: req.input,
        metadata: req.metadata,
        trace_parent: Some(trace.to_string()),
        created_at: Utc::now(),
        run_at: req.run_at,
        backoff: req.backoff,
        webhook_url: req.webhook_url,
    })
}

/// Submit a job. It is durable in Postgres before the answer.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = CreateJobRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key returns the same job for 24 h (header `Idempotent-Replayed: true`); a different body under it is 409")),
    responses(
        (status = 409, description = "conflict: the Idempotency-Key was used with a different body", body = ErrorBody),
        (status = 202, description = "Accepted; `Location` points at the job", body = Job),
        (status = 400, description = "malformed_json", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 422, description = "unknown_kind, unknown_field, invalid_input (with `field`)", body = ErrorBody),
        (status = 429, description = "rate_limited, quota_exceeded (with `Retry-After`)", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_job(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let started = std::time::Instant::now();
    let value = json_body(&headers, body)?;
    let idempotency = crate::routes::job_batch::idempotency_key(&headers, &principal)?;
    let request_digest = idempotency
        .as_ref()
        .map(|_| switchyard_core::apikey::digest(&value.to_string()));
    let trace = request_trace(&headers);
    tracing::Span::current().record("trace_id", trace.trace_id.as_str());
    if let (Some(key), Some(digest)) = (&idempotency, request_digest) {
        // a client repeating a request it got no answer to gets its job back, even when a
        // quota or the backlog would refuse a new one now
        if let Some(replay) =
            crate::routes::job_batch::replay_idempotent(&state, &principal, key, digest).await?
        {
            return Ok(replay);
        }
    }
    let job = build_job(&state, &principal, value, &trace).await?;
    state
        .named_queues
        .admit(
            &state.queue,
            principal.tenant_id,
            &[("queue".to_string(), job.queue.as_str())],
        )
        .await?;
    if let Err(refused) = crate::quota::check_backlog(&state, &principal, 1).await {
        // a duplicate of a keyed request that committed meanwhile (the two were admitted one
        // after the other, the first one's job taking the last place) gets that job
        if let (Some(key), Some(digest)) = (&idempotency, request_digest) {
            if let Some(replay) =
                crate::routes::job_batch::replay_idempotent(&state, &principal, key, digest).await?
            {
                return Ok(replay);
            }
        }
        return Err(refused);
    }
    if let (Some(key), Some(digest)) = (idempotency, request_digest) {
        return crate::routes::job_batch::submit_idempotent(&state, &principal, &key, digest, job)
            .await;
    }
    let view = job.to_job();
    if let Err(e) = state.submitter.submit(job).await {
        // not queued after all: its place in the backlog count goes back
        crate::quota::return_backlog(&state, &principal, 1);
        return Err(e.into());
    }
    state.metrics.observe_submit(&view.kind, started.elapsed());
    tracing::info!(job_id = %view.id, kind = %view.kind, traceparent = %trace, "job accepted");
    Ok(accepted(
        view,
        Some((
            header::HeaderName::from_static("traceparent"),
            trace.to_string(),
        )),
    ))
}

/// 202 with the job and `Location: /v1/jobs/{id}` (and `extra`): how every way of queueing a
/// job answers (submit, idempotent replay, retry).
pub fn accepted(job: Job, extra: Option<(header::HeaderName, String)>) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    let mut resp = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(job),
    )
        .into_response();
    if let Some((name, value)) = extra {
        if let Ok(v) = header::HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

/// Read a job.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "job id")),
    responses(
        (status = 200, body = Job),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found (also another tenant's job)", body = ErrorBody),
        (status = 422, description = "invalid_parameter (id is not a UUID)", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Job>> {
    let id = parse_id(&id)?;
    let row = state
        .store
        .get_job(principal.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok(Json(row.to_job()))
}

pub fn parse_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::field(ErrorCode::InvalidParameter, "id", "must be a UUID"))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only jobs in this status.
    pub status: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// `true`: only dead jobs (failed for good; the same as `status=failed`).
    pub dead: Option<String>,
    /// Page size, 1..=200 (default 50).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub data: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Cuts a page fetched with `limit + 1` rows down to `limit`; returns the next page's cursor
/// when there is one.
pub(crate) fn next_page<T>(
    rows: &mut Vec<T>,
    limit: i64,
    id: impl Fn(&T) -> Uuid,
) -> Option<String> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    more.then(|| rows.last().map(|r| encode_cursor(id(r))))
        .flatten()
}

pub(crate) fn encode_cursor(id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{id}"))
}

fn decode_cursor(c: &str) -> ApiResult<Uuid> {
    let bad = || ApiError::field(ErrorCode::InvalidParameter, "cursor", "invalid cursor");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let id = s.strip_prefix("v1:").ok_or_else(bad)?;
    Uuid::parse_str(id).map_err(|_| bad())
}

/// `limit` (1..=200, default 50) and the decoded `cursor` of a list request.
pub(crate) fn page_params(
    limit: Option<&str>,
    cursor: Option<&str>,
) -> ApiResult<(i64, Option<Uuid>)> {
    let limit = match limit {
        None | Some("") => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=200).contains(l))
            .ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidParameter,
                    "limit",
                    "must be an integer from 1 to 200",
                )
            })?,
    };
    let before = match cursor {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c)?),
    };
    Ok((limit, before))
}

/// List jobs, newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, body = JobList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "invalid_parameter (status, kind, limit or cursor)", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    Auth(principal): Auth,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobList>> {
    let Query(p) =
        params.map_err(|e| ApiError::field(ErrorCode::InvalidParameter, "query", e.body_text()))?;
    let status = match p.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidParameter,
                "status",
                "must be one of queued, running, succeeded, failed, cancelled",
            )
        })?),
    };
    let status = match p.dead.as_deref() {
        None | Some("") | Some("false") => status,
        Some("true") if status.is_none_or(|s| s == JobStatus::Failed) => Some(JobStatus::Failed),
        Some("true") => {
            return Err(ApiError::field(
                ErrorCode::InvalidParameter,
                "dead",
                "dead jobs are `failed`; drop the other status",
            ))
        }
        Some(_) => {
            return Err(ApiError::field(
                ErrorCode::InvalidParameter,
                "dead",
                "must be true or false",
            ))
        }
    };
    let kind = match p.kind.as_deref() {
        None | Some("") => None,
        Some(k) => Some(
            JobKind::parse(k)
                .ok_or_else(|| {
                    ApiError::field(ErrorCode::InvalidParameter, "kind", "unknown job kind")
                })?
                .as_str()
                .to_string(),
        ),
    };
    let (limit, before) = page_params(p.limit.as_deref(), p.cursor.as_deref())?;
    let rows = state
        .store
        .list_jobs(
            principal.scope(),
            &JobFilter {
                status,
                kind,
                before,
                limit: limit + 1,
            },
        )
        .await?;
    let has_more = rows.len() as i64 > limit;
    let data: Vec<Job> = rows
        .iter()
        .take(limit as usize)
        .map(|r| r.to_job())
        .collect();
    let next_cursor = if has_more {
        data.last().map(|j| encode_cursor(j.id))
    } else {
        None
    };
    Ok(Json(JobList { data, next_cursor }))
}

/// Cancel a job: a queued job is cancelled at once (200); a running one is cancelled once its
/// worker confirms (202); a finished one is a 409.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "job id")),
    responses(
        (status = 200, description = "cancelled", body = Job),
        (status = 202, description = "cancel requested; the job ends `cancelled` when its worker confirms", body = Job),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 409, description = "job_finished", body = ErrorBody),
        (status = 422, description = "invalid_parameter", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    match cancel(&state, principal.scope(), id).await? {
        CancelOutcome::NotFound => Err(ApiError::not_found("job")),
        CancelOutcome::Finished(row) => Err(ApiError::new(
            ErrorCode::JobFinished,
            format!("job already {}", row.status),
        )),
        CancelOutcome::Cancelled(row) => Ok((StatusCode::OK, Json(row.to_job())).into_response()),
        CancelOutcome::Requested(row) => {
            Ok((StatusCode::ACCEPTED, Json(row.to_job())).into_response())
        }
    }
}

/// Cancels a job: a queued one at once (its `cancelled` event is published), a running one by
/// notifying its worker (it confirms).
pub async fn cancel(
    state: &AppState,
    scope: impl Into<Scope>,
    id: Uuid,
) -> ApiResult<CancelOutcome> {
    let outcome = state.store.cancel_job(scope, id).await?;
    match &outcome {
        CancelOutcome::Cancelled(row) => {
            let ev = Event::terminal(
                row.id,
                row.event_seq as u64,
                row.attempt,
                JobStatus::Cancelled,
                None,
                None,
            );
            // after every event already in the stream: a run that died mid-stream (then
            // retried) left more there than Postgres' seq counts, and an event numbered
            // below them would be refused as stale
            let durable = (row.event_seq as u64).saturating_sub(1);
            if let Err(e) = state.bus.publish_after(&ev, durable).await {
                tracing::warn!(error = %e, "could not publish the cancelled event (clients get it from postgres)");
            }
            if row.run_at.is_some_and(|t| t > chrono::Utc::now()) {
                // (if this fails, the member is dropped when it comes due: the claim skips it)
                if let Err(e) = state.queue.undelay(&row.dispatch_item()).await {
                    tracing::debug!(error = %e, "a cancelled delayed job left in its delayed set");
                }
            }
        }
        CancelOutcome::Requested(_) => {
            if let Err(e) = state.queue.notify_cancel(id).await {
                tracing::warn!(error = %e, "cancel notification failed; the worker sees it at its next heartbeat");
            }
        }
        CancelOutcome::NotFound | CancelOutcome::Finished(_) => {}
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_garbage() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        assert!(decode_cursor("!!").is_err());
        assert!(decode_cursor("eHl6").is_err());
    }
}
