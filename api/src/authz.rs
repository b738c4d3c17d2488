//! Authorization: the one table of which permission each route needs, and the middleware
//! that authenticates the caller, checks the permission (403 `forbidden` otherwise) and hands
//! the principal to the handler. Handlers never check roles themselves.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use switchyard_core::authz::Permission;
use switchyard_core::ErrorCode;
use switchyard_store::AuditEntry;

use crate::auth::{presented_credential, Auth};
use crate::error::ApiError;
use crate::openai::error::OaiError;
use crate::AppState;

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (health, metrics, the API description).
    Public,
    /// An authenticated caller holding this permission.
    Needs(Permission),
    /// The platform operator (`operator_token` in the configuration), not a tenant's key.
    Operator,
}

/// Every route of the API: method, path (as routed), access. A route missing here is refused
/// (and a test fails).
pub const ROUTES: &[(&str, &str, Access)] = {
    use Access::*;
    use Permission::*;
    &[
        ("POST", "/v1/jobs", Needs(JobsWrite)),
        ("GET", "/v1/jobs", Needs(JobsRead)),
        ("POST", "/v1/jobs/batch", Needs(JobsWrite)),
        ("GET", "/v1/jobs/{id}", Needs(JobsRead)),
        ("POST", "/v1/jobs/{id}/cancel", Needs(JobsWrite)),
        ("POST", "/v1/jobs/{id}/retry", Needs(JobsWrite)),
        ("GET", "/v1/jobs/{id}/events", Needs(JobsRead)),
        ("GET", "/v1/jobs/{id}/deliveries", Needs(JobsRead)),
        ("GET", "/v1/ws", Needs(JobsRead)),
        ("POST", "/v1/conversations", Needs(ConversationsWrite)),
        ("GET", "/v1/conversations", Needs(ConversationsRead)),
        ("GET", "/v1/conversations/{id}", Needs(ConversationsRead)),
        (
            "DELETE",
            "/v1/conversations/{id}",
            Needs(ConversationsWrite),
        ),
        (
            "POST",
            "/v1/conversations/{id}/messages",
            Needs(ConversationsWrite),
        ),
        ("POST", "/v1/chat/completions", Needs(JobsWrite)),
        ("POST", "/v1/schedules", Needs(JobsWrite)),
        ("GET", "/v1/schedules", Needs(JobsRead)),
        ("GET", "/v1/schedules/{id}", Needs(JobsRead)),
        ("PATCH", "/v1/schedules/{id}", Needs(JobsWrite)),
        ("DELETE", "/v1/schedules/{id}", Needs(JobsWrite)),
        ("GET", "/v1/models", Needs(ModelsRead)),
        ("GET", "/v1/models/{*id}", Needs(ModelsRead)),
        ("GET", "/v1/usage", Needs(UsageRead)),
        ("GET", "/v1/quotas", Needs(UsageRead)),
        ("POST", "/v1/api-keys", Needs(KeysManage)),
        ("GET", "/v1/api-keys", Needs(KeysManage)),
        ("GET", "/v1/api-keys/{id}", Needs(KeysManage)),
        ("DELETE", "/v1/api-keys/{id}", Needs(KeysManage)),
        ("GET", "/v1/audit", Needs(AuditRead)),
        ("POST", "/v1/tenants", Operator),
        ("GET", "/v1/tenants", Operator),
        ("GET", "/v1/workers", Operator),
        ("GET", "/healthz", Public),
        ("GET", "/readyz", Public),
        ("GET", "/metrics", Public),
        ("GET", "/openapi.json", Public),
        ("GET", "/docs", Public),
    ]
};

/// The access a route needs (`None`: not in the table).
pub fn access(method: &Method, path: &str) -> Option<Access> {
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && *p == path)
        .map(|(_, _, a)| *a)
}

/// Routes whose errors use OpenAI's shape.
fn openai_shaped(path: &str) -> bool {
    path == "/v1/chat/completions" || path.starts_with("/v1/models")
}

fn refuse(path: &str, e: ApiError) -> Response {
    if openai_shaped(path) {
        OaiError::from(e).into_response()
    } else {
        e.into_response()
    }
}

/// The client's address (absent when the server runs without connect info): the TCP peer,
/// or behind a trusted proxy the client its `X-Forwarded-For` names.
fn peer(app: &AppState, req: &Request) -> Option<IpAddr> {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    if app.trusted_proxies.is_empty() {
        return Some(ip);
    }
    // every line of the header, in order (a proxy may add its own line after the client's)
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = forwarded.join(",");
    Some(
        app.trusted_proxies
            .client(ip, Some(forwarded.as_str()).filter(|f| !f.is_empty())),
    )
}

/// The request's `x-request-id` (set by the request-id layer), for audit rows.
pub fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Operator routes: the operator token (compared by digest), else 403 for a tenant's key and
/// 401 (counted as a failed authentication) for anything else.
async fn operator(app: AppState, mut req: Request, next: Next, path: &str) -> Response {
    let source = peer(&app, &req);
    if let Some(wait) = source.and_then(|s| app.auth_failures.blocked_for(s)) {
        return refuse(path, too_many_failures(wait));
    }
    let presented = presented_credential(req.headers(), req.uri().query());
    if let (Some(p), Some(expected)) = (&presented, app.cfg.operator_digest) {
        if switchyard_core::apikey::digest(p) == expected {
            req.extensions_mut().insert(OperatorCall);
            return next.run(req).await;
        }
    }
    if let Some(p) = &presented {
        if app.auth_cache.authenticate(&app.store, p).await.is_ok() {
            return refuse(
                path,
                ApiError::new(
                    ErrorCode::Forbidden,
                    "only the platform operator manages tenants",
                ),
            );
        }
    }
    tracing::warn!(source = ?source, path, "operator authentication failed");
    if let Some(wait) = source.and_then(|s| app.auth_failures.failed(s)) {
        return refuse(path, too_many_failures(wait));
    }
    refuse(path, ApiError::unauthorized())
}

/// Marks a request the operator token authenticated.
#[derive(Debug, Clone, Copy)]
pub struct OperatorCall;

fn too_many_failures(wait: std::time::Duration) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        "too many failed authentications from this address; retry later",
    )
    .retry_after(wait)
}

/// The middleware (a route layer: it runs once the route is known).
pub async fn authorize(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let needed = match access(req.method(), &path) {
        Some(Access::Public) => return next.run(req).await,
        Some(Access::Operator) => return operator(app, req, next, &path).await,
        Some(Access::Needs(p)) => p,
        None => {
            tracing::error!(method = %req.method(), path, "route missing from the authorization table");
            return refuse(
                &path,
                ApiError::new(ErrorCode::Forbidden, "this route is not open to any role"),
            );
        }
    };
    let source = peer(&app, &req);
    if let Some(wait) = source.and_then(|s| app.auth_failures.blocked_for(s)) {
        return refuse(&path, too_many_failures(wait));
    }
    let presented = presented_credential(req.headers(), req.uri().query());
    let outcome = match &presented {
        None => Err(ApiError::unauthorized()),
        Some(p) => app.auth_cache.authenticate(&app.store, p).await,
    };
    let principal = match outcome {
        Ok(p) => p,
        Err(e) if e.code == ErrorCode::Unauthorized => {
            // logged without the secret: the visible prefix of an API key at most (not of
            // anything else, e.g. the operator token sent to a tenant's route)
            let prefix: String = presented
                .as_deref()
                .filter(|p| p.starts_with(switchyard_core::apikey::KEY_PREFIX))
                .unwrap_or("")
                .chars()
                .take(switchyard_core::apikey::PREFIX_LEN)
                .collect();
            let prefix = switchyard_core::telemetry::printable(&prefix);
            tracing::warn!(source = ?source, key_prefix = %prefix, path, "authentication failed");
            if let Some(wait) = source.and_then(|s| app.auth_failures.failed(s)) {
                return refuse(&path, too_many_failures(wait));
            }
            return refuse(&path, e);
        }
        Err(e) => return refuse(&path, e),
    };
    if let Some(key) = principal.key_id() {
        app.key_usage.used(key);
    }
    let (rate, admitted) = app.admission.admit(&principal).await;
    if let Err(e) = admitted {
        let mut resp = refuse(&path, e);
        if let Some(r) = rate {
            r.apply(resp.headers_mut());
        }
        return resp;
    }
    let audited = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let entry = audited.then(|| AuditEntry {
        tenant_id: principal.tenant_id,
        at: chrono::Utc::now(),
        actor: principal.subject(),
        action: format!("{} {path}", req.method()),
        target: req.uri().path().to_string(),
        outcome: 0,
        request_id: request_id(req.headers()),
        source: source.map(|s| s.to_string()).unwrap_or_default(),
        details: serde_json::json!({}),
    });
    if !principal.can(needed) {
        let resp = refuse(
            &path,
            ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "this key ({} role{}) lacks the `{}` permission",
                    principal.role.as_str(),
                    if principal.scopes.is_some() {
                        ", scoped"
                    } else {
                        ""
                    },
                    needed.as_str()
                ),
            ),
        );
        if let Some(mut e) = entry {
            e.outcome = resp.status().as_u16() as i32;
            app.audit.record(e).await;
        }
        return resp;
    }
    req.extensions_mut().insert(Auth(principal));
    let mut resp = next.run(req).await;
    if let Some(r) = rate {
        r.apply(resp.headers_mut());
    }
    if let Some(mut e) = entry {
        // what it created, where the handler says so (`Location`), else the path itself
        if let Some(loc) = resp
            .headers()
            .get(axum::http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        {
            e.target = loc.to_string();
        }
        e.outcome = resp.status().as_u16() as i32;
        app.audit.record(e).await;
    }
    resp
}
