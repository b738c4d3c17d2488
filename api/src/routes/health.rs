//! Liveness, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

/// Alive (the process answers).
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready: Postgres and Redis are reachable.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "ready"),
    (status = 503, description = "a dependency is unreachable"),
))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let timeout = std::time::Duration::from_secs(2);
    let pg = matches!(
        tokio::time::timeout(timeout, state.store.ping()).await,
        Ok(Ok(()))
    );
    let redis = matches!(
        tokio::time::timeout(timeout, state.queue.ping()).await,
        Ok(Ok(()))
    );
    let draining = state.shutdown.is_cancelled();
    let ok = pg && redis && !draining;
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "postgres": if pg { "ok" } else { "unreachable" },
        "redis": if redis { "ok" } else { "unreachable" },
        "draining": draining,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Prometheus metrics. With `metrics_token` configured, only for that bearer token (or the
/// operator's).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses(
    (status = 200, description = "OpenMetrics text format", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    (status = 401, description = "unauthorized (`metrics_token` is set and was not presented)", body = crate::error::ErrorBody),
))]
pub async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(expected) = state.cfg.metrics_digest {
        let presented = crate::auth::presented_credential(&headers, None)
            .map(|p| switchyard_core::apikey::digest(&p));
        let ok = presented.is_some_and(|d| d == expected || Some(d) == state.cfg.operator_digest);
        if !ok {
            return crate::error::ApiError::unauthorized().into_response();
        }
    }
    let text = state.metrics.render(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "OpenAPI 3.1 document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}
