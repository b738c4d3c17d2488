//! `POST /v1/jobs/{id}/retry`: requeues a dead job (one that ended `failed`) with the same id;
//! its attempts and event sequence continue. The dead-letter list is `GET /v1/jobs?dead=true`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use switchyard_core::job::{Job, JobKind, JobStatus, DEFAULT_MAX_ATTEMPTS, MAX_MAX_ATTEMPTS};
use switchyard_core::{ErrorCode, Event};
use switchyard_store::RetryOutcome;

use super::jobs::{accepted, json_body, parse_id};
use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Optional body of a retry.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// More attempts the job gets (default 3).
    pub max_attempts: Option<i32>,
}

/// Requeue a dead job.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = Uuid, Path, description = "job id")),
    request_body(content = Option<RetryRequest>, description = "optional"),
    responses(
        (status = 202, description = "queued again (same id; `attempt` and event `seq` continue)", body = Job),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 409, description = "conflict: the job is not dead, or is a conversation turn that is no longer the last", body = ErrorBody),
        (status = 429, description = "the tenant's daily quota or queue is full", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry_job(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let empty = matches!(&body, Ok(b) if b.is_empty());
    let req: RetryRequest = if empty {
        RetryRequest::default()
    } else {
        switchyard_core::job::parse_at("", &json_body(&headers, body)?)?
    };
    let attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=MAX_MAX_ATTEMPTS).contains(&attempts) {
        return Err(ApiError::field(
            ErrorCode::InvalidInput,
            "max_attempts",
            format!("must be between 1 and {MAX_MAX_ATTEMPTS}"),
        ));
    }
    // a retry starts calls and holds a queue slot like a new job: the same limits apply
    let Some(dead) = state.store.get_job(principal.scope(), id).await? else {
        return Err(ApiError::not_found("job"));
    };
    if dead.status() != JobStatus::Failed {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("only failed jobs are retried; this one is {}", dead.status),
        ));
    }
    // the model must still be one the tenant may use (its allow-list may have narrowed since)
    if dead.kind == JobKind::LlmChat.as_str() {
        let model = dead.input["model"].as_str().unwrap_or_default();
        crate::routes::models::usable(&state.models, &principal, model).map_err(|e| {
            ApiError::field(ErrorCode::InvalidInput, "input.model", e.message(model))
        })?;
    }
    crate::quota::check_daily(&state, &principal, &dead.kind).await?;
    crate::quota::check_backlog(&state, &principal, 1).await?;
    let retried = state.store.retry_job(principal.scope(), id, attempts).await;
    if !matches!(retried, Ok(RetryOutcome::Requeued(_))) {
        // nothing requeued (every other outcome answers an error): the place goes back
        crate::quota::return_backlog(&state, &principal, 1);
    }
    let row = match retried? {
        RetryOutcome::NotFound => return Err(ApiError::not_found("job")),
        RetryOutcome::NotDead(row) => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("only failed jobs are retried; this one is {}", row.status),
            ))
        }
        RetryOutcome::Requeued(row) => row,
        // answered after later turns, its reply would follow theirs, made without it
        RetryOutcome::NotLastTurn => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "this conversation turn is no longer the last one; post its message again instead",
            ));
        }
    };
    let ev = Event::status(
        row.id,
        row.event_seq as u64,
        row.attempt,
        JobStatus::Queued,
        json!({ "reason": "retry" }),
    );
    // after every event of the runs before (a run that died mid-stream left more in the
    // stream than Postgres' seq counts)
    let durable = (row.event_seq as u64).saturating_sub(1);
    if let Err(e) = state.bus.publish_after(&ev, durable).await {
        tracing::warn!(error = %e, "could not publish the retry's queued event");
    }
    // marked dispatched (with the epoch read before) only once Redis took it: if the dispatch
    // fails, or Redis loses it, the reconciler dispatches it; unmarked, the reconciler would
    // give it a second entry after a few seconds in a backlog
    let epoch = state.queue.epoch().await.ok().flatten();
    match state.queue.dispatch(&[row.dispatch_item()]).await {
        Ok(()) => {
            if let Some(epoch) = epoch {
                if let Err(e) = state
                    .store
                    .mark_redispatched(&[(row.id, row.attempt)], epoch)
                    .await
                {
                    tracing::debug!(error = %e, "a retried job not marked dispatched");
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not dispatch the retried job; the reconciler will")
        }
    }
    Ok(accepted(row.to_job(), None))
}
