//! `/v1/quotas`: the caller's tenant limits and what it uses now (requests this minute are
//! shown by the `RateLimit-*` headers of every response).

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Timelike, Utc};
use serde::Serialize;
use switchyard_core::quota::{utc_day, QuotaLimits};

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Current use against the limits.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QuotaUse {
    /// Jobs of the tenant running now.
    pub concurrent_jobs: i64,
    /// Jobs of the tenant waiting in queues (counted up to `max_queued_jobs`, or 10,000,000).
    pub queued_jobs: i64,
    /// LLM tokens used today (UTC).
    pub llm_tokens_today: u64,
    /// Sandbox time used today (UTC), in seconds.
    pub sandbox_cpu_seconds_today: f64,
}

/// The tenant's limits (`null`: unlimited) and use.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QuotaReport {
    pub limits: QuotaLimits,
    pub usage: QuotaUse,
    /// When the daily counters start again (00:00 UTC).
    pub daily_reset_at: DateTime<Utc>,
    /// Requests per second one credential may make to one API replica (`null`: unlimited).
    pub per_credential_rps: Option<u32>,
}

#[utoipa::path(
    get, path = "/v1/quotas", tag = "usage",
    responses(
        (status = 200, body = QuotaReport),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_quotas(
    State(state): State<AppState>,
    Auth(principal): Auth,
) -> ApiResult<Json<QuotaReport>> {
    let now = Utc::now();
    let (day, left) = utc_day(now);
    let running = state.store.running_jobs(principal.tenant_id).await?;
    let limits = state.admission.limits(&principal);
    let cap = limits.max_queued_jobs.unwrap_or(10_000_000).min(10_000_000) as i64;
    let queued = state.store.queued_jobs(principal.tenant_id, cap).await?;
    let daily = state
        .admission
        .quotas
        .daily_use(principal.tenant_id, &day)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "redis unavailable");
            ApiError::new(
                switchyard_core::ErrorCode::Unavailable,
                "quota counters are unavailable; retry later",
            )
        })?;
    let reset = now + chrono::Duration::from_std(left).unwrap_or_default();
    Ok(Json(QuotaReport {
        limits,
        usage: QuotaUse {
            concurrent_jobs: running,
            queued_jobs: queued,
            llm_tokens_today: daily.tokens,
            sandbox_cpu_seconds_today: daily.cpu_ms as f64 / 1000.0,
        },
        daily_reset_at: reset.with_nanosecond(0).unwrap_or(reset),
        per_credential_rps: state.admission.per_credential_rps(),
    }))
}
