//! `/v1/schedules`: cron schedules that submit a job at each fire time (create, list, read with
//! recent runs, pause/resume, delete). The scheduler role fires them (`scheduler/src/cron.rs`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchyard_core::job::{parse_at, ValidJobRequest};
use switchyard_core::schedule::{
    nest_field, CreateScheduleRequest, CronSpec, Schedule, UpdateScheduleRequest,
};
use switchyard_core::ErrorCode;
use switchyard_store::ScheduleRow;
use uuid::Uuid;

use super::jobs::{json_body, next_page, page_params, parse_id, validate_job};
use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScheduleList {
    pub data: Vec<Schedule>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1..=200 (default 50).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The stored template: the validated job as a `POST /v1/jobs` body (tenant defaults applied).
/// When a schedule's creator stops vouching for it: an end user's token expiry (an API key is
/// checked live when each run fires: revoked or expired, the run is skipped).
fn creator_end(p: &switchyard_store::Principal) -> Option<chrono::DateTime<Utc>> {
    match p.credential {
        switchyard_store::Credential::Token { .. } => p.expires_at,
        switchyard_store::Credential::Key(_) => None,
    }
}

fn template(req: &ValidJobRequest) -> Value {
    let mut t = json!({
        "kind": req.kind.as_str(),
        "input": req.input,
        "queue": req.queue,
        "priority": req.priority,
        "max_attempts": req.max_attempts,
        "metadata": req.metadata,
    });
    if let Some(s) = req.timeout_s {
        t["timeout_s"] = json!(s);
    }
    if let Some(b) = &req.backoff {
        t["backoff"] = json!(b);
    }
    if let Some(u) = &req.webhook_url {
        t["webhook_url"] = json!(u);
    }
    t
}

/// Create a schedule. Its first run is the first fire time after now.
#[utoipa::path(
    post, path = "/v1/schedules", tag = "schedules",
    request_body = CreateScheduleRequest,
    responses(
        (status = 201, body = Schedule),
        (status = 400, description = "malformed_json", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "unknown_field, invalid_input (`cron`, `timezone`, `job.…`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let value = json_body(&headers, body)?;
    let (req, spec) = CreateScheduleRequest::parse(&value)?;
    let job =
        validate_job(&state, &principal, req.job.clone()).map_err(|e| nest_field("job", e))?;
    state
        .named_queues
        .admit(
            &state.queue,
            principal.tenant_id,
            &[("job.queue".to_string(), job.queue.as_str())],
        )
        .await?;
    // counted from now on (the scheduler keeps a schedule's queue in the registry)
    state.named_queues.register(&state.queue, &job.queue).await;
    let next_run_at = spec
        .next_after(Utc::now())
        .ok_or_else(|| ApiError::field(ErrorCode::InvalidInput, "cron", "never fires"))?;
    let row = state
        .store
        .create_schedule(
            &ScheduleRow {
                id: Uuid::now_v7(),
                tenant_id: principal.tenant_id,
                created_by: principal.subject(),
                name: req.name,
                cron: req.cron.trim().to_string(),
                timezone: req.timezone.unwrap_or_else(|| "UTC".into()),
                job: template(&job),
                paused: req.paused,
                next_run_at,
                last_run_at: None,
                created_at: Utc::now(),
            },
            creator_end(&principal),
        )
        .await?;
    let location = format!("/v1/schedules/{}", row.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(row.to_schedule(None)),
    )
        .into_response())
}

/// List schedules, newest first.
#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules",
    params(ListParams),
    responses(
        (status = 200, body = ScheduleList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "invalid_parameter (limit or cursor)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ScheduleList>> {
    let Query(p) =
        params.map_err(|e| ApiError::field(ErrorCode::InvalidParameter, "query", e.body_text()))?;
    let (limit, before) = page_params(p.limit.as_deref(), p.cursor.as_deref())?;
    let mut rows = state
        .store
        .list_schedules(principal.scope(), before, limit + 1)
        .await?;
    let next_cursor = next_page(&mut rows, limit, |s| s.id);
    Ok(Json(ScheduleList {
        data: rows.iter().map(|r| r.to_schedule(None)).collect(),
        next_cursor,
    }))
}

/// Read a schedule with its recent runs (fire time and job, newest first).
#[utoipa::path(
    get, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path, description = "schedule id")),
    responses(
        (status = 200, body = Schedule),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Schedule>> {
    let id = parse_id(&id)?;
    let (row, runs) = state
        .store
        .get_schedule(principal.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    Ok(Json(row.to_schedule(Some(runs))))
}

/// Pause or resume a schedule (a resumed schedule next fires at its first fire time from now).
#[utoipa::path(
    patch, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path, description = "schedule id")),
    request_body = UpdateScheduleRequest,
    responses(
        (status = 200, body = Schedule),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 422, description = "unknown_field, invalid_input", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Schedule>> {
    let id = parse_id(&id)?;
    let value = json_body(&headers, body)?;
    let req: UpdateScheduleRequest = parse_at("", &value)?;
    let (current, _) = state
        .store
        .get_schedule(principal.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    let now = Utc::now();
    let next = CronSpec::parse(&current.cron, &current.timezone)
        .ok()
        .and_then(|c| c.next_after(now))
        .unwrap_or(current.next_run_at);
    let row = state
        .store
        .set_schedule_paused(principal.scope(), id, req.paused, next)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    Ok(Json(row.to_schedule(None)))
}

/// Delete a schedule (the jobs it submitted stay).
#[utoipa::path(
    delete, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path, description = "schedule id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id)?;
    if state.store.delete_schedule(principal.scope(), id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("schedule"))
    }
}
