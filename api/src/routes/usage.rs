//! `/v1/usage`: the caller's tokens and cost of finished `llm.chat` jobs in a time window,
//! grouped by model or by UTC day.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use switchyard_core::ErrorCode;
use switchyard_store::{UsageGroup, UsageSums};

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// The default window: the 30 days before `to`.
pub const DEFAULT_WINDOW_DAYS: i64 = 30;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Start of the window, inclusive (RFC 3339; default `to` − 30 days).
    pub from: Option<String>,
    /// End of the window, exclusive (RFC 3339; default now).
    pub to: Option<String>,
    /// `model` (default) or `day` (UTC).
    pub group_by: Option<String>,
}

/// Sums over a set of jobs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageTotals {
    /// Succeeded `llm.chat` jobs (a conversation summary a turn wrote adds its tokens and cost
    /// under the summary's model, not a request).
    pub requests: i64,
    /// `llm.chat` jobs that ended failed or cancelled (under the model they asked for).
    pub failed_requests: i64,
    /// Of succeeded replies (and summaries), as the providers reported them.
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Cost in USD at the prices of the model table when each job ran.
    pub cost_usd: f64,
    /// What every attempt of these jobs counted against the daily token quota, whatever it
    /// ended as: a reply cut by a cancel or a time limit, a failed or retried attempt, a
    /// summary written by an attempt that then failed (a cache hit counts nothing). It can
    /// exceed `total_tokens`, which counts succeeded replies only.
    pub charged_tokens: i64,
}

impl From<UsageSums> for UsageTotals {
    fn from(s: UsageSums) -> Self {
        UsageTotals {
            requests: s.requests,
            failed_requests: s.failed_requests,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            total_tokens: s.total_tokens,
            cost_usd: s.cost_usd,
            charged_tokens: s.charged_tokens,
        }
    }
}

/// One group: `model` (with `group_by=model`) or `day` (with `group_by=day`), and its sums.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageEntry {
    /// The alias that served the calls or wrote the summaries (`group_by=model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The UTC day, `YYYY-MM-DD` (`group_by=day`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(flatten)]
    pub sums: UsageTotals,
}

/// Usage in `[from, to)`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// `model` or `day`.
    pub group_by: String,
    /// Sorted by model, or by day ascending.
    pub data: Vec<UsageEntry>,
    /// Over the whole window (the sum of `data`).
    pub total: UsageTotals,
}

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::field(ErrorCode::InvalidParameter, field, message)
}

fn timestamp(field: &str, v: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| {
                invalid(
                    field,
                    "must be an RFC 3339 timestamp, e.g. 2026-12-01T00:00:00Z",
                )
            }),
    }
}

/// Usage of the caller's tenant: `llm.chat` jobs that finished in `[from, to)` (succeeded ones'
/// tokens and cost, failed and cancelled ones counted, every attempt's charged tokens).
/// It sums the jobs that are kept: finished jobs past the tenant's job retention (default 30
/// days) are pruned and no longer count.
#[utoipa::path(
    get, path = "/v1/usage", tag = "usage",
    params(UsageParams),
    responses(
        (status = 200, body = UsageReport),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "invalid_parameter (from, to or group_by; from must be before to)", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_usage(
    State(state): State<AppState>,
    Auth(principal): Auth,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> ApiResult<Json<UsageReport>> {
    let Query(p) = params.map_err(|e| invalid("query", &e.body_text()))?;
    let group = match p.group_by.as_deref() {
        None | Some("") => UsageGroup::Model,
        Some(g) => {
            UsageGroup::parse(g).ok_or_else(|| invalid("group_by", "must be `model` or `day`"))?
        }
    };
    let to = timestamp("to", p.to.as_deref())?.unwrap_or_else(Utc::now);
    let from = match timestamp("from", p.from.as_deref())? {
        Some(f) => f,
        None => to
            .checked_sub_signed(Duration::days(DEFAULT_WINDOW_DAYS))
            .ok_or_else(|| invalid("to", "out of range"))?,
    };
    if from >= to {
        return Err(invalid("from", "must be before `to`"));
    }
    let report = state
        .store
        .usage(principal.scope(), from, to, group)
        .await?;
    let data = report
        .rows
        .into_iter()
        .map(|r| {
            let (model, day) = match group {
                UsageGroup::Model => (Some(r.key), None),
                UsageGroup::Day => (None, Some(r.key)),
            };
            UsageEntry {
                model,
                day,
                sums: r.sums.into(),
            }
        })
        .collect();
    Ok(Json(UsageReport {
        from,
        to,
        group_by: group.as_str().to_string(),
        data,
        total: report.total.into(),
    }))
}
