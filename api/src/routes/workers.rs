//! `/v1/workers`: the live workers (platform operator only): their queues, slots, load and
//! last heartbeat, as each worker reports them to Redis every few seconds.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Serialize;
use switchyard_core::queueing::{WorkerInfo, WORKER_REPORT_TTL};
use switchyard_core::ErrorCode;

use crate::authz::OperatorCall;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerList {
    /// Workers that reported in the last 30 s, by id.
    pub data: Vec<WorkerInfo>,
}

/// List live workers (platform operator only).
#[utoipa::path(
    get, path = "/v1/workers", tag = "ops",
    responses(
        (status = 200, body = WorkerList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: a tenant's key", body = ErrorBody),
        (status = 503, description = "unavailable: Redis unreachable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(_op): Extension<OperatorCall>,
) -> ApiResult<Json<WorkerList>> {
    let data = state.queue.workers(WORKER_REPORT_TTL).await.map_err(|e| {
        tracing::warn!(error = %e, "redis unavailable");
        ApiError::new(
            ErrorCode::Unavailable,
            "the worker registry is unavailable; retry later",
        )
    })?;
    Ok(Json(WorkerList { data }))
}
