//! `/v1/api-keys`: a tenant's admins create (the secret is shown once), list, read and revoke
//! the tenant's keys, each with a role, optional scopes and an optional expiry.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchyard_core::authz::{Permission, Role};
use switchyard_core::job::parse_at;
use switchyard_core::{ErrorCode, FieldError};
use switchyard_store::ApiKeyRecord;
use uuid::Uuid;

use super::jobs::{json_body, parse_id};
use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Longest key lifetime a request may ask for (10 years).
const MAX_EXPIRES_IN_S: u64 = 10 * 365 * 86_400;

/// Body of `POST /v1/api-keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// A label for humans (at most 200 characters).
    #[serde(default)]
    pub name: String,
    /// `owner`, `admin`, `developer` (default) or `viewer`; at most the caller's own role.
    pub role: Option<Role>,
    /// Narrow the role to these permissions (e.g. `["jobs:read"]`); default: all it grants.
    pub scopes: Option<Vec<String>>,
    /// Seconds until the key stops working (default: never).
    pub expires_in_s: Option<u64>,
}

/// An API key as listed (never its secret).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub name: String,
    /// The visible start of the key (`sy_xxxxxxxx`), for humans and logs.
    pub prefix: String,
    pub role: String,
    pub scopes: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Last use, to within a minute.
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKeyView {
    fn from(r: ApiKeyRecord) -> Self {
        ApiKeyView {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            role: r.role,
            scopes: r.scopes,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
        }
    }
}

/// The answer to `POST /v1/api-keys`: the key with its secret, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// The whole key (`sy_...`): store it now, it cannot be shown again.
    pub secret: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyList {
    pub data: Vec<ApiKeyView>,
}

/// Create an API key for the caller's tenant.
#[utoipa::path(
    post, path = "/v1/api-keys", tag = "api-keys",
    request_body = CreateApiKey,
    responses(
        (status = 201, body = CreatedApiKey),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: needs `keys:manage`, or a role above the caller's", body = ErrorBody),
        (status = 422, description = "unknown_field, invalid_input (with `field`)", body = ErrorBody),
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
    let req: CreateApiKey = parse_at("", &value)?;
    if req.name.chars().count() > 200 {
        return Err(FieldError::invalid("name", "must be at most 200 characters").into());
    }
    let role = req.role.unwrap_or(Role::Developer);
    if role > principal.role {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "a {} key cannot create a key with the {} role",
                principal.role.as_str(),
                role.as_str()
            ),
        ));
    }
    let scopes = match &req.scopes {
        None => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                let p = Permission::parse(s).ok_or_else(|| {
                    FieldError::invalid(
                        format!("scopes[{i}]"),
                        format!(
                            "unknown permission; one of {}",
                            Permission::ALL
                                .iter()
                                .map(|p| p.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
                // a key never gets what its creator does not have
                if !principal.can(p) {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        format!("the calling key lacks `{s}` and cannot grant it"),
                    ));
                }
                out.push(p);
            }
            Some(out)
        }
    };
    // no scopes asked: all the role grants, narrowed to what the creator holds (a key scoped
    // to `keys:manage` made an unscoped admin key before)
    let scopes = match scopes {
        Some(asked) => Some(asked),
        None => match narrowed(role, &principal) {
            Some(held) if held.is_empty() => {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "the calling key holds none of the {} role's permissions",
                        role.as_str()
                    ),
                ))
            }
            other => other,
        },
    };
    let expires_at = match req.expires_in_s {
        None => None,
        Some(0) => return Err(FieldError::invalid("expires_in_s", "must be at least 1").into()),
        Some(s) if s > MAX_EXPIRES_IN_S => {
            return Err(FieldError::invalid(
                "expires_in_s",
                format!("must be at most {MAX_EXPIRES_IN_S} (10 years)"),
            )
            .into())
        }
        Some(s) => Some(Utc::now() + chrono::Duration::seconds(s as i64)),
    };
    // nor does a key outlive the credential that made it (an hour's key, a user's token)
    let expires_at = match (expires_at, principal.expires_at) {
        (Some(asked), Some(limit)) => Some(asked.min(limit)),
        (asked, limit) => asked.or(limit),
    };
    let (rec, secret) = state
        .store
        .create_scoped_api_key(
            principal.tenant_id,
            &req.name,
            role,
            scopes.as_deref(),
            expires_at,
        )
        .await?;
    let location = format!("/v1/api-keys/{}", rec.id);
    let body = CreatedApiKey {
        key: rec.into(),
        secret,
    };
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

/// List the tenant's API keys (revoked ones included).
#[utoipa::path(
    get, path = "/v1/api-keys", tag = "api-keys",
    responses(
        (status = 200, body = ApiKeyList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: needs `keys:manage`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
) -> ApiResult<Json<ApiKeyList>> {
    let keys = state.store.list_api_keys(principal.tenant_id).await?;
    Ok(Json(ApiKeyList {
        data: keys.into_iter().map(Into::into).collect(),
    }))
}

/// One API key of the tenant.
#[utoipa::path(
    get, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = Uuid, Path, description = "key id")),
    responses(
        (status = 200, body = ApiKeyView),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: needs `keys:manage`", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<ApiKeyView>> {
    let id = parse_id(&id)?;
    match state
        .store
        .get_tenant_api_key(principal.tenant_id, id)
        .await?
    {
        Some(k) => Ok(Json(k.into())),
        None => Err(ApiError::not_found("API key")),
    }
}

/// Revoke an API key of the tenant (it stops working on every replica within seconds).
#[utoipa::path(
    delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = Uuid, Path, description = "key id")),
    responses(
        (status = 200, body = ApiKeyView),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: needs `keys:manage`, or the key's role is above the caller's", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<ApiKeyView>> {
    let id = parse_id(&id)?;
    let Some(key) = state
        .store
        .get_tenant_api_key(principal.tenant_id, id)
        .await?
    else {
        return Err(ApiError::not_found("API key"));
    };
    // the revoker holds every permission of the key (a key scoped to `keys:manage` could
    // revoke unscoped admin keys before)
    let lacks = |key: &ApiKeyRecord| {
        let Some(role) = Role::parse(&key.role) else {
            return true;
        };
        let scopes: Option<Vec<Permission>> = key
            .scopes
            .as_ref()
            .map(|l| l.iter().filter_map(|s| Permission::parse(s)).collect());
        Permission::ALL.iter().any(|&p| {
            switchyard_core::authz::allows(role, scopes.as_deref(), p) && !principal.can(p)
        })
    };
    if Role::parse(&key.role).is_none_or(|r| r > principal.role) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "a {} key cannot revoke a {} key",
                principal.role.as_str(),
                key.role
            ),
        ));
    }
    if lacks(&key) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the calling key cannot revoke a key that holds permissions it lacks",
        ));
    }
    let rec = state
        .store
        .revoke_tenant_api_key(principal.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    // this replica stops accepting it at once, the others when they hear of it (or when their
    // cached lookup expires, should the announcement not reach them)
    state.auth_cache.clear();
    if let Err(e) = state.queue.announce_credentials_change().await {
        tracing::warn!(error = %e, "key revoked; other replicas drop it when their cache expires");
    }
    Ok(Json(rec.into()))
}

/// The scopes of a key of `role` made by `creator` without asking for any: `None` (all the role
/// grants) when the creator holds all of them, else the part it holds.
fn narrowed(role: Role, creator: &switchyard_store::Principal) -> Option<Vec<Permission>> {
    let grants: Vec<Permission> = Permission::ALL
        .iter()
        .copied()
        .filter(|&p| role.grants(p))
        .collect();
    if grants.iter().all(|&p| creator.can(p)) {
        None
    } else {
        Some(grants.into_iter().filter(|&p| creator.can(p)).collect())
    }
}
