//! `/v1/jobs/batch` (up to 1,000 jobs, all or nothing, errors naming `jobs[i].field`) and
//! idempotent submission (`Idempotency-Key` on `POST /v1/jobs` and on batches: the same jobs
//! for 24 h, a different body under the same key is 409).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::job::Job;
use switchyard_core::ErrorCode;
use switchyard_store::{Idempotent, IdempotentBatch, NewJob, Principal};

use super::jobs::{accepted, json_body, new_job, request_trace};
use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Jobs one batch may carry.
pub const MAX_BATCH_JOBS: usize = 1000;
/// Longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /v1/jobs/batch` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1,000 job requests, each as for `POST /v1/jobs`.
    #[schema(value_type = Vec<switchyard_core::job::CreateJobRequest>)]
    pub jobs: Vec<Value>,
}

/// The accepted jobs, in request order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    pub jobs: Vec<Job>,
}

/// The request's `Idempotency-Key`, in the caller's namespace: a tenant's API keys share one,
/// each end user (who sees only what they created) has their own, so one user's key neither
/// replays nor conflicts with another's job.
pub fn idempotency_key(headers: &HeaderMap, p: &Principal) -> ApiResult<Option<String>> {
    Ok(
        raw_idempotency_key(headers)?.map(|key| match p.scope().creator {
            Some(creator) => format!("{creator}\u{1f}{key}"),
            None => key,
        }),
    )
}

/// The header as sent, checked (1–255 visible ASCII characters).
fn raw_idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::field(
            ErrorCode::InvalidParameter,
            "Idempotency-Key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// Submits `job` under `key`: a new key commits it (key and job in one transaction) and
/// dispatches it; a live key with the same body answers with its job (`Idempotent-Replayed`);
/// a different body is 409 `conflict`.
pub async fn submit_idempotent(
    state: &AppState,
    principal: &Principal,
    key: &str,
    digest: [u8; 32],
    job: NewJob,
) -> ApiResult<Response> {
    let outcome = state
        .store
        .insert_job_idempotent(key, &digest, &job)
        .await
        .map_err(|e| {
            // nothing was queued: its place in the backlog count goes back
            crate::quota::return_backlog(state, principal, 1);
            ApiError::from(e)
        })?;
    if outcome == Idempotent::Created {
        let view = job.to_job();
        state.submitter.dispatch(job).await;
        return Ok(accepted(view, Some((REPLAYED, "false".into()))));
    }
    crate::quota::return_backlog(state, principal, 1);
    answer_replay(state, principal, outcome).await
}

/// The answer to a request whose key is already live (its job, or a 409 for another body),
/// looked up before the request is validated and admitted; `None` when the key is new.
pub async fn replay_idempotent(
    state: &AppState,
    principal: &Principal,
    key: &str,
    digest: [u8; 32],
) -> ApiResult<Option<Response>> {
    match state
        .store
        .live_idempotency_key(principal.tenant_id, key, &digest)
        .await?
    {
        None => Ok(None),
        Some(outcome) => answer_replay(state, principal, outcome).await.map(Some),
    }
}

async fn answer_replay(
    state: &AppState,
    principal: &Principal,
    outcome: Idempotent,
) -> ApiResult<Response> {
    match outcome {
        Idempotent::Existing(id) => {
            let row = state
                .store
                .get_job(principal.scope(), id)
                .await?
                .ok_or_else(|| ApiError::not_found("job"))?;
            Ok(accepted(row.to_job(), Some((REPLAYED, "true".into()))))
        }
        Idempotent::Conflict(id) => Err(ApiError::field(
            ErrorCode::Conflict,
            "Idempotency-Key",
            format!("already used with a different request (job {id}) in the last 24 h"),
        )),
        Idempotent::Created => Err(ApiError::internal("an idempotent insert is no replay")),
    }
}

/// Submit up to 1,000 jobs at once: all are accepted or none (an invalid job names its field
/// as `jobs[17].input.model`). Under an `Idempotency-Key` a repeated batch gets the same jobs
/// back for 24 h.
#[utoipa::path(
    post, path = "/v1/jobs/batch", tag = "jobs",
    request_body = BatchRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key returns the same jobs for 24 h (header `Idempotent-Replayed: true`); a different body under it is 409")),
    responses(
        (status = 202, description = "All accepted, in request order", body = BatchResponse),
        (status = 409, description = "conflict: the Idempotency-Key was used with another body", body = ErrorBody),
        (status = 422, description = "invalid_input naming `jobs[i].field`; nothing was accepted", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_batch(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let started = std::time::Instant::now();
    let value = json_body(&headers, body)?;
    let idempotency = idempotency_key(&headers, &principal)?;
    // a batch's digest never equals a single job's: one key cannot stand for both
    let request_digest = idempotency
        .as_ref()
        .map(|_| switchyard_core::apikey::digest(&format!("batch\u{1f}{value}")));
    if let (Some(key), Some(digest)) = (&idempotency, request_digest) {
        if let Some(outcome) = state
            .store
            .live_batch_idempotency_key(principal.tenant_id, key, &digest)
            .await?
        {
            return answer_batch_replay(&state, &principal, outcome).await;
        }
    }
    let req: BatchRequest = switchyard_core::job::parse_at("", &value)?;
    if req.jobs.is_empty() || req.jobs.len() > MAX_BATCH_JOBS {
        return Err(ApiError::field(
            ErrorCode::InvalidInput,
            "jobs",
            format!("must hold 1 to {MAX_BATCH_JOBS} jobs"),
        ));
    }
    let trace = request_trace(&headers);
    let mut jobs = Vec::with_capacity(req.jobs.len());
    for (i, v) in req.jobs.into_iter().enumerate() {
        let job = new_job(&state, &principal, v, &trace).map_err(|mut e| {
            e.field = Some(match e.field.take() {
                Some(f) if f != "body" => format!("jobs[{i}].{f}"),
                _ => format!("jobs[{i}]"),
            });
            e
        })?;
        jobs.push(job);
    }
    // daily quotas once per kind in the batch (a Redis read each; per job, a batch of 1,000
    // waited on 1,000 reads in a row), naming the first job of a refused kind
    let mut kinds: Vec<(usize, &str)> = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if !kinds.iter().any(|(_, k)| *k == j.kind) {
            kinds.push((i, &j.kind));
        }
    }
    for (i, kind) in kinds {
        crate::quota::check_daily(&state, &principal, kind)
            .await
            .map_err(|mut e| {
                e.field = Some(format!("jobs[{i}]"));
                e
            })?;
    }
    let names: Vec<(String, &str)> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (format!("jobs[{i}].queue"), j.queue.as_str()))
        .collect();
    state
        .named_queues
        .admit(&state.queue, principal.tenant_id, &names)
        .await?;
    // once for the whole batch, after it validated (an invalid job counts nothing)
    crate::quota::check_backlog(&state, &principal, jobs.len() as u64).await?;
    // a failed insert queued nothing: the batch's places in the backlog count go back
    let given_back = |e: switchyard_store::StoreError| {
        crate::quota::return_backlog(&state, &principal, jobs.len() as u64);
        ApiError::from(e)
    };
    let replayed = match (idempotency, request_digest) {
        (Some(key), Some(digest)) => {
            match state
                .store
                .insert_batch_idempotent(principal.tenant_id, &key, &digest, &jobs)
                .await
                .map_err(given_back)?
            {
                IdempotentBatch::Created => Some(false),
                // a concurrent request with the key committed first
                outcome => {
                    crate::quota::return_backlog(&state, &principal, jobs.len() as u64);
                    return answer_batch_replay(&state, &principal, outcome).await;
                }
            }
        }
        _ => {
            state
                .store
                .insert_tenant_jobs(principal.tenant_id, &jobs)
                .await
                .map_err(given_back)?;
            None
        }
    };
    let views: Vec<Job> = jobs.iter().map(NewJob::to_job).collect();
    for kind in views.iter().map(|j| j.kind.as_str()) {
        state.metrics.observe_submit(kind, started.elapsed());
    }
    state.submitter.dispatch_many(jobs).await;
    tracing::info!(n = views.len(), "batch accepted");
    let mut resp = (StatusCode::ACCEPTED, Json(BatchResponse { jobs: views })).into_response();
    if let Some(r) = replayed {
        resp.headers_mut().insert(
            REPLAYED,
            HeaderValue::from_static(if r { "true" } else { "false" }),
        );
    }
    Ok(resp)
}

/// The answer to a batch whose key is live: its jobs as they are now, in request order
/// (`Idempotent-Replayed: true`; a job deleted since is left out), or 409 for another body.
async fn answer_batch_replay(
    state: &AppState,
    principal: &Principal,
    outcome: IdempotentBatch,
) -> ApiResult<Response> {
    match outcome {
        IdempotentBatch::Existing(ids) => {
            let jobs = state
                .store
                .get_jobs(principal.scope(), &ids)
                .await?
                .iter()
                .map(|r| r.to_job())
                .collect();
            let mut resp = (StatusCode::ACCEPTED, Json(BatchResponse { jobs })).into_response();
            resp.headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            Ok(resp)
        }
        IdempotentBatch::Conflict(ids) => Err(ApiError::field(
            ErrorCode::Conflict,
            "Idempotency-Key",
            format!(
                "already used with a different request (job {}) in the last 24 h",
                ids.first().map(|i| i.to_string()).unwrap_or_default()
            ),
        )),
        IdempotentBatch::Created => Err(ApiError::internal("an idempotent insert is no replay")),
    }
}
