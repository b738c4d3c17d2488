//! OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) for the front door:
//! our API errors and failed jobs mapped onto the statuses and types OpenAI clients expect.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use switchyard_core::{ErrorCode, FieldError};

use crate::error::ApiError;

/// OpenAI's error body, as the OpenAI-compatible routes send it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct OaiErrorBody {
    pub error: OaiErrorDetail,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct OaiErrorDetail {
    pub message: String,
    /// e.g. `invalid_request_error`, `rate_limit_error`, `insufficient_quota`.
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    /// e.g. `invalid_api_key`, `model_not_found`, `rate_limit_exceeded`.
    pub code: Option<String>,
}

#[derive(Debug)]
pub struct OaiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// `Retry-After` of a 429 or 503 (one second when not known).
    pub retry_after: Option<std::time::Duration>,
    /// `x-should-retry`, which OpenAI's SDKs obey over their own rule (they retry 408, 409,
    /// 429 and 5xx): false for a job that ended, whose own retries are spent, so that an SDK
    /// does not run it again as a new job.
    pub should_retry: Option<bool>,
}

impl OaiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        OaiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            should_retry: None,
        }
    }

    /// Backpressure (the tenant's queue is full): OpenAI's rate-limit shape, which clients
    /// retry, not `insufficient_quota`, which they read as an account out of credit.
    pub fn backpressure(e: ApiError) -> Self {
        OaiError {
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded".into()),
            ..OaiError::from(e)
        }
    }

    pub fn code(mut self, code: &str) -> Self {
        self.code = Some(code.to_string());
        self
    }

    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// A failed job's error object (`code`, `message`, `retry_after_s`).
    pub fn from_job_error(e: &serde_json::Value) -> Self {
        let mut out = OaiError::from_job(
            e["code"].as_str().unwrap_or("internal"),
            e["message"].as_str().unwrap_or("the job failed"),
        );
        if let Some(s) = e["retry_after_s"].as_u64() {
            out.retry_after = Some(std::time::Duration::from_secs(s));
        }
        out
    }

    /// A failed (or cancelled) job of the front door, by its job error code.
    pub fn from_job(code: &str, message: &str) -> Self {
        use StatusCode as S;
        let (status, kind, oai_code) = match code {
            "provider_rate_limited" => (
                S::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            "provider_quota_exhausted" => (
                S::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
            ),
            "provider_context_length" | "context_too_long" => (
                S::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
            ),
            "provider_bad_request" | "invalid_input" => {
                (S::BAD_REQUEST, "invalid_request_error", code)
            }
            "unknown_model" => (S::NOT_FOUND, "invalid_request_error", "model_not_found"),
            "provider_timeout" | "timeout" => (S::GATEWAY_TIMEOUT, "timeout", code),
            "provider_overloaded" => (S::SERVICE_UNAVAILABLE, "overloaded_error", code),
            "cancelled" => (S::CONFLICT, "cancelled", code),
            _ => (S::BAD_GATEWAY, "api_error", code),
        };
        let mut e = OaiError::new(status, kind, message).code(oai_code);
        // waiting may help with a provider's rate limit or overload; nothing else that ended a
        // job gets better by running it again at once
        e.should_retry = Some(matches!(
            code,
            "provider_rate_limited" | "provider_overloaded"
        ));
        e
    }
}

impl From<ApiError> for OaiError {
    fn from(e: ApiError) -> Self {
        let (status, kind, code) = match e.code {
            ErrorCode::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "permission_error", None),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            ErrorCode::PayloadTooLarge => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None)
            }
            ErrorCode::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            ErrorCode::QuotaExceeded => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            // OpenAI answers what we call 422 with 400; the rest keep their status (405,
            // 409, 415)
            _ => (
                match e.code.http_status() {
                    422 => StatusCode::BAD_REQUEST,
                    s => StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST),
                },
                "invalid_request_error",
                Some(e.code.as_str()),
            ),
        };
        OaiError {
            status,
            message: e.message,
            kind,
            param: e.field,
            code: code.map(str::to_string),
            retry_after: e.retry_after,
            should_retry: None,
        }
    }
}

impl From<FieldError> for OaiError {
    fn from(e: FieldError) -> Self {
        OaiError::from(ApiError::from(e))
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let retry = matches!(self.status.as_u16(), 429 | 503);
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(r) = self.should_retry {
            resp.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if r { "true" } else { "false" }),
            );
        }
        if retry {
            let secs = self
                .retry_after
                .map_or(1, |w| w.as_secs_f64().ceil().max(1.0) as u64);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_s_wait_reaches_retry_after() {
        let e = serde_json::json!({"code": "provider_rate_limited", "message": "slow down",
            "retryable": true, "retry_after_s": 30});
        let r = OaiError::from_job_error(&e).into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "30");
        // none said: a second
        let e = serde_json::json!({"code": "provider_rate_limited", "message": "slow down"});
        let r = OaiError::from_job_error(&e).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn only_waiting_out_a_provider_may_help_an_ended_job() {
        for code in ["provider_rate_limited", "provider_overloaded"] {
            assert_eq!(
                OaiError::from_job(code, "m").should_retry,
                Some(true),
                "{code}"
            );
        }
        for code in [
            "cancelled",
            "timeout",
            "lease_expired",
            "provider_error",
            "provider_bad_request",
        ] {
            assert_eq!(
                OaiError::from_job(code, "m").should_retry,
                Some(false),
                "{code}"
            );
        }
        let resp = OaiError::from_job("cancelled", "m").into_response();
        assert_eq!(resp.headers()["x-should-retry"], "false");
    }
}
