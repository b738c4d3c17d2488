//! Model name → scenario: the failure or streaming quirk a request gets, and the
//! route-independent description of every error the mock answers with.

use axum::http::StatusCode;

/// Model names advertised by `GET /v1/models`. Any other `mock-` name behaves
/// like `mock-echo`, except the `mock-fail-every-<N>`, `mock-fail-first-<N>` and
/// `mock-tool-<suffix>` families.
pub const MOCK_MODELS: &[&str] = &[
    "mock-echo",
    "mock-slow",
    "mock-stall",
    "mock-drop",
    "mock-reset",
    "mock-cut",
    "mock-midstream-error",
    "mock-error-500",
    "mock-error-502",
    "mock-error-503",
    "mock-error-429",
    "mock-error-429-quota",
    "mock-error-400",
    "mock-error-401",
    "mock-context-length",
    "mock-overloaded",
    "mock-tool",
    "mock-variants",
    "mock-refusal",
    "mock-empty",
];

/// The context window the `mock-context-length` errors quote.
pub(crate) const CONTEXT_WINDOW: u64 = 8192;

/// How a request that is answered (not refused) is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    Normal,
    Slow,
    Stall,
    Drop,
    Reset,
    Cut,
    MidstreamError,
    Variants,
    Tool,
    /// The reply comes as a refusal (OpenAI's `refusal` instead of `content`; OpenAI route).
    Refusal,
    /// No text at all, finish reason `length` (a reasoning model that spent its whole budget
    /// thinking).
    Empty,
}

/// Every error response the mock sends, before it is put in a route's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    RateLimited,
    QuotaExhausted,
    BadRequest,
    /// The prompt's `tokens` exceed the quoted `window`.
    ContextLength {
        tokens: u64,
        window: u64,
    },
    Unauthorized,
    Internal,
    BadGateway,
    Unavailable,
    Overloaded,
    FailEvery {
        every: u64,
        call: u64,
    },
    FailFirst {
        first: u64,
        call: u64,
    },
    NotFound {
        model: String,
    },
    Malformed(String),
    ShuttingDown,
}

/// A failure described for both routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorSpec {
    pub status: StatusCode,
    pub retry_after: Option<u32>,
    pub openai_type: &'static str,
    pub openai_code: Option<&'static str>,
    pub openai_message: String,
    pub anthropic_type: &'static str,
    pub anthropic_message: String,
}

/// The non-standard status Anthropic uses for "overloaded".
fn status_529() -> StatusCode {
    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

impl Failure {
    /// The status, types, codes and messages of this failure on both routes.
    pub fn spec(&self) -> ErrorSpec {
        use Failure as F;
        let (status, openai_type, anthropic_type) = match self {
            F::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_error",
            ),
            F::QuotaExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "rate_limit_error",
            ),
            F::BadRequest | F::ContextLength { .. } | F::Malformed(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request_error",
            ),
            F::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "authentication_error",
            ),
            F::Internal | F::FailEvery { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "api_error",
            ),
            F::BadGateway => (StatusCode::BAD_GATEWAY, "server_error", "api_error"),
            F::Unavailable | F::FailFirst { .. } | F::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "api_error")
            }
            F::Overloaded => (status_529(), "overloaded_error", "overloaded_error"),
            F::NotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found_error",
            ),
        };
        let openai_code = match self {
            F::RateLimited => Some("rate_limit_exceeded"),
            F::QuotaExhausted => Some("insufficient_quota"),
            F::ContextLength { .. } => Some("context_length_exceeded"),
            F::Unauthorized => Some("invalid_api_key"),
            F::NotFound { .. } => Some("model_not_found"),
            _ => None,
        };
        let message = self.message();
        let (openai_message, anthropic_message) = match self {
            F::ContextLength { tokens, window } => (
                format!(
                    "This model's maximum context length is {window} tokens. However, your \
                     messages resulted in {tokens} tokens. Please reduce the length of the \
                     messages."
                ),
                format!("prompt is too long: {tokens} tokens > {window} maximum"),
            ),
            F::NotFound { model } => (
                format!("The model `{model}` does not exist or you do not have access to it."),
                format!("model: {model}"),
            ),
            _ => (message.clone(), message),
        };
        ErrorSpec {
            status,
            retry_after: matches!(self, F::RateLimited).then_some(1),
            openai_type,
            openai_code,
            openai_message,
            anthropic_type,
            anthropic_message,
        }
    }

    fn message(&self) -> String {
        use Failure as F;
        match self {
            F::RateLimited => "mock-error-429: simulated rate limit, retry after 1s".to_owned(),
            F::QuotaExhausted => "mock-error-429-quota: quota exhausted; you exceeded your \
                                  current quota, retrying will not help"
                .to_owned(),
            F::BadRequest => "mock-error-400: simulated invalid request".to_owned(),
            F::Unauthorized => "mock-error-401: invalid API key".to_owned(),
            F::Internal => "mock-error-500: simulated internal server error".to_owned(),
            F::BadGateway => "mock-error-502: simulated bad gateway".to_owned(),
            F::Unavailable => "mock-error-503: simulated service unavailable".to_owned(),
            F::Overloaded => "mock-overloaded: Overloaded".to_owned(),
            F::FailEvery { every, call } => {
                format!("mock-fail-every-{every}: call {call} fails (every {every}th call fails)")
            }
            F::FailFirst { first, call } => {
                format!("mock-fail-first-{first}: call {call} fails (the first {first} calls fail)")
            }
            F::Malformed(m) => m.clone(),
            F::ShuttingDown => "mock LLM server is shutting down".to_owned(),
            F::ContextLength { .. } | F::NotFound { .. } => String::new(),
        }
    }
}

/// `N` of `<prefix><N>` or `<prefix><N>-<anything>`.
fn counter_param(model: &str, prefix: &str) -> Option<u64> {
    let rest = model.strip_prefix(prefix)?;
    let digits = rest.split('-').next().unwrap_or_default();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What the `call`-th request (1-based, counted per exact model name) for
/// `model` gets; `prompt_tokens` feeds the context-length error.
pub(crate) fn resolve(model: &str, call: u64, prompt_tokens: u32) -> Result<Behaviour, Failure> {
    if let Some(every) = counter_param(model, "mock-fail-every-") {
        return if every > 0 && call.is_multiple_of(every) {
            Err(Failure::FailEvery { every, call })
        } else {
            Ok(Behaviour::Normal)
        };
    }
    if let Some(window) = counter_param(model, "mock-window-") {
        let tokens = u64::from(prompt_tokens);
        return if tokens > window {
            Err(Failure::ContextLength { tokens, window })
        } else {
            Ok(Behaviour::Normal)
        };
    }
    if let Some(first) = counter_param(model, "mock-fail-first-") {
        return if call <= first {
            Err(Failure::FailFirst { first, call })
        } else {
            Ok(Behaviour::Normal)
        };
    }
    match model {
        "mock-error-429" => Err(Failure::RateLimited),
        "mock-error-429-quota" => Err(Failure::QuotaExhausted),
        "mock-error-400" => Err(Failure::BadRequest),
        "mock-error-401" => Err(Failure::Unauthorized),
        "mock-error-500" => Err(Failure::Internal),
        "mock-error-502" => Err(Failure::BadGateway),
        "mock-error-503" => Err(Failure::Unavailable),
        "mock-overloaded" => Err(Failure::Overloaded),
        "mock-context-length" => Err(Failure::ContextLength {
            tokens: CONTEXT_WINDOW + u64::from(prompt_tokens.max(1)),
            window: CONTEXT_WINDOW,
        }),
        "mock-slow" => Ok(Behaviour::Slow),
        "mock-stall" => Ok(Behaviour::Stall),
        "mock-drop" => Ok(Behaviour::Drop),
        "mock-reset" => Ok(Behaviour::Reset),
        "mock-cut" => Ok(Behaviour::Cut),
        "mock-midstream-error" => Ok(Behaviour::MidstreamError),
        "mock-variants" => Ok(Behaviour::Variants),
        "mock-refusal" => Ok(Behaviour::Refusal),
        m if m == "mock-empty" || m.starts_with("mock-empty-") => Ok(Behaviour::Empty),
        m if m == "mock-tool" || m.starts_with("mock-tool-") => Ok(Behaviour::Tool),
        m if m.starts_with("mock-") => Ok(Behaviour::Normal),
        m => Err(Failure::NotFound {
            model: m.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(model: &str) -> Option<u16> {
        resolve(model, 1, 3).err().map(|f| f.spec().status.as_u16())
    }

    #[test]
    fn model_routing() {
        let ok = |m: &str| resolve(m, 1, 0).ok();
        assert_eq!(ok("mock-echo"), Some(Behaviour::Normal));
        assert_eq!(ok("mock-1"), Some(Behaviour::Normal));
        assert_eq!(ok("mock-slow"), Some(Behaviour::Slow));
        assert_eq!(ok("mock-stall"), Some(Behaviour::Stall));
        assert_eq!(ok("mock-drop"), Some(Behaviour::Drop));
        assert_eq!(ok("mock-reset"), Some(Behaviour::Reset));
        assert_eq!(ok("mock-cut"), Some(Behaviour::Cut));
        assert_eq!(ok("mock-midstream-error"), Some(Behaviour::MidstreamError));
        assert_eq!(ok("mock-variants"), Some(Behaviour::Variants));
        assert_eq!(ok("mock-tool"), Some(Behaviour::Tool));
        assert_eq!(ok("mock-tool-abc"), Some(Behaviour::Tool));
        assert_eq!(ok("mock-toolbox"), Some(Behaviour::Normal));
        assert_eq!(status("mock-error-500"), Some(500));
        assert_eq!(status("mock-error-502"), Some(502));
        assert_eq!(status("mock-error-503"), Some(503));
        assert_eq!(status("mock-error-429"), Some(429));
        assert_eq!(status("mock-error-429-quota"), Some(429));
        assert_eq!(status("mock-error-400"), Some(400));
        assert_eq!(status("mock-error-401"), Some(401));
        assert_eq!(status("mock-context-length"), Some(400));
        assert_eq!(status("mock-overloaded"), Some(529));
        assert_eq!(status("gpt-4o"), Some(404));
    }

    #[test]
    fn every_listed_model_is_a_mock() {
        for m in MOCK_MODELS {
            assert!(m.starts_with("mock-"));
            assert!(!matches!(resolve(m, 1, 0), Err(Failure::NotFound { .. })));
        }
    }

    #[test]
    fn counting_families() {
        assert_eq!(
            counter_param("mock-fail-every-3", "mock-fail-every-"),
            Some(3)
        );
        assert_eq!(
            counter_param("mock-fail-every-3-x-y", "mock-fail-every-"),
            Some(3)
        );
        assert_eq!(
            counter_param("mock-fail-every-3x", "mock-fail-every-"),
            None
        );
        assert_eq!(counter_param("mock-fail-every-", "mock-fail-every-"), None);
        let every: Vec<bool> = (1..=6)
            .map(|c| resolve("mock-fail-every-3-a", c, 0).is_err())
            .collect();
        assert_eq!(every, [false, false, true, false, false, true]);
        let first: Vec<bool> = (1..=4)
            .map(|c| resolve("mock-fail-first-2", c, 0).is_err())
            .collect();
        assert_eq!(first, [true, true, false, false]);
        assert_eq!(resolve("mock-fail-every-0", 5, 0), Ok(Behaviour::Normal));
        assert_eq!(status("mock-fail-every-1"), Some(500));
        assert_eq!(status("mock-fail-first-1"), Some(503));
        assert_eq!(resolve("mock-fail-every-x", 1, 0), Ok(Behaviour::Normal));
        assert_eq!(resolve("mock-window-40-a", 1, 40), Ok(Behaviour::Normal));
        let refused = resolve("mock-window-40-a", 1, 41).unwrap_err();
        assert_eq!(
            refused,
            Failure::ContextLength {
                tokens: 41,
                window: 40
            }
        );
        assert!(refused
            .spec()
            .openai_message
            .contains("maximum context length is 40 tokens"));
        assert!(refused
            .spec()
            .anthropic_message
            .contains("41 tokens > 40 maximum"));
    }

    #[test]
    fn specs() {
        let s = Failure::RateLimited.spec();
        assert_eq!(s.retry_after, Some(1));
        assert_eq!(s.openai_code, Some("rate_limit_exceeded"));
        let q = Failure::QuotaExhausted.spec();
        assert_eq!(q.retry_after, None);
        assert_eq!(q.openai_type, "insufficient_quota");
        assert!(q.anthropic_message.contains("quota exhausted"));
        let c = resolve("mock-context-length", 1, 5).unwrap_err().spec();
        assert_eq!(
            c.anthropic_message,
            "prompt is too long: 8197 tokens > 8192 maximum"
        );
        assert!(c
            .openai_message
            .starts_with("This model's maximum context length is 8192 tokens. However, your messages resulted in 8197 tokens."));
    }
}
