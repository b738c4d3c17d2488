//! The one table of client-facing error codes (HTTP status + stable machine-readable code).

use serde::Serialize;

/// Stable error codes returned to API clients in `{"error": {"code", "message", "field"?}}`.
/// Adding a code is fine; renaming or removing one breaks clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not valid JSON (or not JSON at all).
    MalformedJson,
    /// 401: missing, malformed, unknown or revoked API key.
    Unauthorized,
    /// 403: authenticated, but the key's role or scopes do not allow this action.
    Forbidden,
    /// 404: no such object for this tenant (another tenant's objects are also 404).
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: the job already reached a terminal status.
    JobFinished,
    /// 409: the object conflicts with an existing one (e.g. a taken name).
    Conflict,
    /// 413: the request body is larger than the configured limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: `kind` names no job kind enabled on this server.
    UnknownKind,
    /// 422: a field the schema does not know.
    UnknownField,
    /// 422: a field has a wrong type or value, or a required one is missing.
    InvalidInput,
    /// 422: a query parameter or cursor is invalid.
    InvalidParameter,
    /// 429: too many requests (quota issues extend this).
    RateLimited,
    /// 429: a daily quota of the tenant (LLM tokens, sandbox CPU time) is used up.
    QuotaExceeded,
    /// 503: a backing service (Postgres, Redis) is unreachable; retry later.
    Unavailable,
    /// 500: a bug or unexpected failure; details are logged, never returned.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::MalformedJson,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::JobFinished,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::UnknownKind,
        ErrorCode::UnknownField,
        ErrorCode::InvalidInput,
        ErrorCode::InvalidParameter,
        ErrorCode::RateLimited,
        ErrorCode::QuotaExceeded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::MalformedJson => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::JobFinished | ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::UnknownKind
            | ErrorCode::UnknownField
            | ErrorCode::InvalidInput
            | ErrorCode::InvalidParameter => 422,
            ErrorCode::RateLimited | ErrorCode::QuotaExceeded => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::JobFinished => "job_finished",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "The request body is not valid JSON.",
            ErrorCode::Unauthorized => "Missing, malformed, unknown, expired or revoked API key.",
            ErrorCode::Forbidden => "The key's role or scopes do not allow this action.",
            ErrorCode::Conflict => "The object conflicts with an existing one.",
            ErrorCode::NotFound => {
                "No such object (objects of other tenants are not found either)."
            }
            ErrorCode::MethodNotAllowed => "The route does not accept this method.",
            ErrorCode::JobFinished => "The job already finished; it cannot be cancelled.",
            ErrorCode::PayloadTooLarge => "The request body exceeds the size limit.",
            ErrorCode::UnsupportedMediaType => "The request body must be application/json.",
            ErrorCode::UnknownKind => "The job kind is unknown or disabled on this server.",
            ErrorCode::UnknownField => "The request contains a field the schema does not define.",
            ErrorCode::InvalidInput => "A field is missing or has a wrong type or value.",
            ErrorCode::InvalidParameter => "A query parameter or cursor is invalid.",
            ErrorCode::RateLimited => "Too many requests; retry later.",
            ErrorCode::QuotaExceeded => {
                "A daily quota of the tenant is used up; retry after it resets."
            }
            ErrorCode::Unavailable => "A backing service is unavailable; retry later.",
            ErrorCode::Internal => "Internal error; it was logged.",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validation failure tied to one field, e.g. `input.messages[0].role`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: ErrorCode,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            code: ErrorCode::InvalidInput,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_client_errors_are_4xx() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "duplicate {c}");
            let json = serde_json::to_value(c).unwrap();
            assert_eq!(json, c.as_str());
            if !matches!(c, ErrorCode::Internal | ErrorCode::Unavailable) {
                assert!((400..500).contains(&c.http_status()), "{c}");
            }
        }
    }
}

/// Largest magnitude of a JSON number we store: Postgres keeps jsonb numbers exactly, and values
/// near `f64::MAX` do not read back as `f64`.
pub const MAX_JSON_NUMBER: f64 = 1e300;

/// The path of the first value in `v` that Postgres cannot store or give back intact — a string
/// or object key holding NUL (`\u0000`), or a number beyond ±[`MAX_JSON_NUMBER`] — and why.
/// Such input is refused up front (422 naming the field) rather than failing later, after the
/// job was accepted.
pub fn first_unstorable(v: &serde_json::Value) -> Option<(String, &'static str)> {
    const NUL: &str = "strings must not contain NUL characters (\\u0000)";
    const BIG: &str = "numbers must lie within ±1e300";
    fn walk(v: &serde_json::Value, path: &mut String) -> Option<&'static str> {
        match v {
            serde_json::Value::String(s) => s.contains('\0').then_some(NUL),
            serde_json::Value::Number(n) => n
                .as_f64()
                .is_some_and(|f| f.abs() > MAX_JSON_NUMBER)
                .then_some(BIG),
            serde_json::Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(x, path);
                if found.is_none() {
                    path.truncate(len);
                }
                found
            }),
            serde_json::Value::Object(m) => m.iter().find_map(|(k, x)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                if k.contains('\0') {
                    path.push_str(&k.replace('\0', "\\u0000"));
                    return Some(NUL);
                }
                path.push_str(k);
                let found = walk(x, path);
                if found.is_none() {
                    path.truncate(len);
                }
                found
            }),
            _ => None,
        }
    }
    let mut path = String::new();
    let why = walk(v, &mut path)?;
    Some((if path.is_empty() { "body".into() } else { path }, why))
}

#[cfg(test)]
mod unstorable_tests {
    use super::first_unstorable;

    fn first_nul(v: &serde_json::Value) -> Option<String> {
        first_unstorable(v).map(|(p, _)| p)
    }
    use serde_json::json;

    #[test]
    fn nul_characters_are_found_with_their_path() {
        assert_eq!(first_nul(&json!({"a": ["x", "y"]})), None);
        assert_eq!(
            first_nul(&json!({"input": {"messages": [{"content": "ok"}, {"content": "a\u{0}b"}]}}))
                .as_deref(),
            Some("input.messages[1].content")
        );
        assert_eq!(
            first_nul(&json!({"metadata": {"k\u{0}": 1}})).as_deref(),
            Some("metadata.k\\u0000")
        );
        assert_eq!(first_nul(&json!("\u{0}")).as_deref(), Some("body"));
        assert_eq!(
            first_nul(&json!({"m": [1, -1.7976931348623155e308]})).as_deref(),
            Some("m[1]")
        );
        assert_eq!(first_nul(&json!({"m": [1e300, -1e-300, u64::MAX]})), None);
    }
}
