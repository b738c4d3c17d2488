//! `/v1/jobs/{id}/deliveries`: the webhook deliveries of a job (each attempt's status or
//! error, what is pending and when it is tried next).

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use switchyard_core::webhook::WebhookDelivery;

use super::jobs::parse_id;
use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// Oldest first (a job retried after it ended has one delivery per ending).
    pub data: Vec<WebhookDelivery>,
}

/// List a job's webhook deliveries.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/deliveries", tag = "jobs",
    params(("id" = Uuid, Path, description = "job id")),
    responses(
        (status = 200, body = DeliveryList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryList>> {
    let id = parse_id(&id)?;
    // the job must be visible to the caller (another tenant's or end user's is a 404)
    state
        .store
        .get_job(principal.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let data = state.store.list_deliveries(principal.scope(), id).await?;
    Ok(Json(DeliveryList { data }))
}
