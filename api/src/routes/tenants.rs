//! `/v1/tenants`: the platform operator creates tenants (with a first owner key, shown once)
//! and lists them. Tenant keys never reach these routes (the authorization layer).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchyard_core::authz::Role;
use switchyard_core::job::parse_at;
use switchyard_core::{ErrorCode, FieldError};
use switchyard_store::AuditEntry;
use uuid::Uuid;

use super::jobs::json_body;
use crate::authz::{request_id, OperatorCall};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Body of `POST /v1/tenants`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1 to 64 characters: lowercase letters, digits, `-` and `_`.
    pub name: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantView {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// A new tenant and its first owner key (the secret is shown this once).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedTenant {
    #[serde(flatten)]
    pub tenant: TenantView,
    pub owner_key: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantList {
    pub data: Vec<TenantView>,
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Create a tenant (platform operator only).
#[utoipa::path(
    post, path = "/v1/tenants", tag = "tenants",
    request_body = CreateTenant,
    responses(
        (status = 201, body = CreatedTenant),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: a tenant's key", body = ErrorBody),
        (status = 409, description = "conflict: the name is taken", body = ErrorBody),
        (status = 422, description = "invalid_input (with `field`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(_op): Extension<OperatorCall>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let value = json_body(&headers, body)?;
    let req: CreateTenant = parse_at("", &value)?;
    if !valid_name(&req.name) {
        return Err(FieldError::invalid(
            "name",
            "must be 1 to 64 characters: lowercase letters, digits, `-` and `_`",
        )
        .into());
    }
    if state.store.tenant_by_name(&req.name).await?.is_some() {
        return Err(ApiError::field(
            ErrorCode::Conflict,
            "name",
            format!("a tenant named {} exists", req.name),
        ));
    }
    let t = state.store.create_tenant(&req.name).await?;
    let (_, secret) = state
        .store
        .create_scoped_api_key(t.id, "owner", Role::Owner, None, None)
        .await?;
    state
        .audit
        .record(AuditEntry {
            tenant_id: t.id,
            at: Utc::now(),
            actor: "operator".into(),
            action: "POST /v1/tenants".into(),
            target: format!("tenant:{}", t.id),
            outcome: 201,
            request_id: request_id(&headers),
            source: String::new(),
            details: serde_json::json!({"name": t.name}),
        })
        .await;
    let body = CreatedTenant {
        tenant: TenantView {
            id: t.id,
            name: t.name,
            created_at: t.created_at,
        },
        owner_key: secret,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// List tenants (platform operator only).
#[utoipa::path(
    get, path = "/v1/tenants", tag = "tenants",
    responses(
        (status = 200, body = TenantList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: a tenant's key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(_op): Extension<OperatorCall>,
) -> ApiResult<Json<TenantList>> {
    let data = state
        .store
        .list_tenants()
        .await?
        .into_iter()
        .map(|t| TenantView {
            id: t.id,
            name: t.name,
            created_at: t.created_at,
        })
        .collect();
    Ok(Json(TenantList { data }))
}
