//! `GET /v1/audit`: the tenant's audit trail (admins), oldest first, filtered and paged by seq.

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchyard_core::ErrorCode;
use switchyard_store::{AuditFilter, AuditRow};

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only rows after this seq (the cursor; default 0).
    pub after_seq: Option<String>,
    /// Rows per page, 1..=1000 (default 100).
    pub limit: Option<String>,
    /// Only this action, e.g. `POST /v1/jobs`.
    pub action: Option<String>,
    /// Only this actor, e.g. `key:<id>`.
    pub actor: Option<String>,
    /// Only rows at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only rows before this time (RFC 3339).
    pub until: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub data: Vec<AuditRow>,
    /// Pass as `after_seq` for the next page; null when this page is not full.
    pub next_after_seq: Option<i64>,
}

fn bad(field: &str, msg: &str) -> ApiError {
    ApiError::field(ErrorCode::InvalidParameter, field, msg)
}

fn time(v: Option<&str>, field: &str) -> ApiResult<Option<DateTime<Utc>>> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| bad(field, "must be an RFC 3339 time"))
    })
    .transpose()
}

/// The tenant's audit trail.
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit",
    params(AuditParams),
    responses(
        (status = 200, body = AuditPage),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: needs `audit:read`", body = ErrorBody),
        (status = 422, description = "invalid_parameter (with `field`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Query(p): Query<AuditParams>,
) -> ApiResult<Json<AuditPage>> {
    let after_seq = match p.after_seq.as_deref() {
        None => 0,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| bad("after_seq", "must be a non-negative integer"))?,
    };
    let limit = match p.limit.as_deref() {
        None => 100,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| bad("limit", "must be 1..=1000"))?,
    };
    // free text compared in Postgres, whose text can never hold NUL
    for (field, v) in [("action", &p.action), ("actor", &p.actor)] {
        if v.as_deref()
            .is_some_and(|v| v.contains('\0') || v.len() > 512)
        {
            return Err(bad(
                field,
                "must be at most 512 bytes without NUL characters",
            ));
        }
    }
    let filter = AuditFilter {
        after_seq,
        limit,
        action: p.action,
        actor: p.actor,
        since: time(p.since.as_deref(), "since")?,
        until: time(p.until.as_deref(), "until")?,
    };
    let data = state.store.list_audit(principal.tenant_id, &filter).await?;
    let next_after_seq = (data.len() as i64 == limit)
        .then(|| data.last().map(|r| r.seq))
        .flatten();
    Ok(Json(AuditPage {
        data,
        next_after_seq,
    }))
}
