//! What the provider adapters share: the HTTP client, endpoint URLs (Azure-style queries kept),
//! sending with a first-byte deadline, reading SSE with time-to-first-token and idle deadlines,
//! and classifying HTTP errors and error bodies.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use secrecy::SecretString;
use serde_json::Value;
use tokio::time::Instant;

use super::{Failure, ProviderError};

/// Where a provider adapter sends its calls: one HTTP client (pooled), the base URL, the key
/// and the provider's extra headers.
pub(crate) struct Endpoint {
    pub client: reqwest::Client,
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub headers: BTreeMap<String, String>,
}

impl Endpoint {
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        headers: BTreeMap<String, String>,
        connect_timeout: Duration,
    ) -> Self {
        Endpoint {
            client: client(connect_timeout),
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            headers,
        }
    }

    /// A POST to `path` below the base URL with the provider's and the model's headers.
    pub fn post(
        &self,
        path: &str,
        model_headers: &BTreeMap<String, String>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.client.post(endpoint(&self.base_url, path));
        for map in [&self.headers, model_headers] {
            for (k, v) in map {
                req = req.header(k.as_str(), v.as_str());
            }
        }
        req
    }
}

fn client(connect_timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .expect("reqwest client")
}

/// `base` + `/path`, keeping a query string of `base` (`...?api-version=...`) at the end.
pub(crate) fn endpoint(base: &str, path: &str) -> String {
    match base.split_once('?') {
        Some((b, q)) => format!("{}/{path}?{q}", b.trim_end_matches('/')),
        None => format!("{}/{path}", base.trim_end_matches('/')),
    }
}

/// Sends `req`, waiting at most `limit` for the response head; non-2xx answers become errors
/// classified by [`classify`].
pub(crate) async fn send(
    req: reqwest::RequestBuilder,
    limit: Duration,
) -> Result<reqwest::Response, ProviderError> {
    let resp = tokio::time::timeout(limit, req.send())
        .await
        .map_err(|_| ProviderError::new(Failure::Timeout, "no response from the provider in time"))?
        .map_err(|e| {
            let failure = if e.is_timeout() {
                Failure::Timeout
            } else {
                Failure::Network
            };
            // without the URL: the job's error reaches its tenant, the provider's address
            // is the operator's (the cause, e.g. connection refused, is kept)
            ProviderError::new(
                failure,
                format!("provider request failed: {}", causes(&e.without_url())),
            )
        })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let body = tokio::time::timeout(limit, read_limited(resp, MAX_ERROR_BODY))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut e = classify(Some(status.as_u16()), &body);
    e.retry_after = retry_after;
    Err(e)
}

/// Longest `retry-after` believed (a provider's header could say anything).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `retry-after-ms`, or `retry-after` in seconds or as an HTTP date; at most an hour.
pub(crate) fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    parse_retry_after(h).map(|d| d.min(MAX_RETRY_AFTER))
}

fn parse_retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(1e9)));
    }
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or_default())
}

/// Classifies an error from its HTTP status (when there is one) and its body, in either
/// OpenAI's (`{"error":{"type","code","message"}}`) or Anthropic's
/// (`{"type":"error","error":{"type","message"}}`) shape.
pub(crate) fn classify(status: Option<u16>, body: &str) -> ProviderError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let err = if v["error"].is_object() {
        &v["error"]
    } else {
        &v
    };
    let kind = err["type"].as_str().unwrap_or("");
    let code = err["code"].as_str().unwrap_or("");
    let message = err["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(300).collect());
    let lower = message.to_ascii_lowercase();
    // a per-minute limit whose message mentions quota (Azure links "quotaincrease" from its
    // token rate limit; Gemini says "Quota exceeded for metric ... per minute") passes with
    // time: not an exhausted quota
    let rate = lower.contains("rate limit")
        || lower.contains("per minute")
        || lower.contains("retry after")
        || lower.contains("please retry");
    let quota = code == "insufficient_quota"
        || kind == "insufficient_quota"
        || kind == "billing_error"
        || (!rate
            && (lower.contains("quota")
                || lower.contains("credit balance")
                || lower.contains("billing")));
    let context = code == "context_length_exceeded"
        || lower.contains("context length")
        || lower.contains("context window")
        || lower.contains("context limit")
        || lower.contains("context size")
        || lower.contains("prompt is too long");
    let failure = match (status, kind) {
        (_, "overloaded_error") | (Some(529), _) => Failure::Overloaded,
        (Some(429), _) | (_, "rate_limit_error") if quota => Failure::QuotaExhausted,
        (Some(429), _) | (_, "rate_limit_error") => Failure::RateLimited,
        (Some(401 | 403), _) | (_, "authentication_error" | "permission_error") => Failure::Auth,
        (Some(402), _) | (_, "billing_error" | "insufficient_quota") => Failure::QuotaExhausted,
        // Anthropic: 400 "Your credit balance is too low to access the Anthropic API"
        (Some(400), _) if quota => Failure::QuotaExhausted,
        (Some(400 | 413 | 422), _) | (_, "invalid_request_error") if context => {
            Failure::ContextLength
        }
        (Some(408 | 409 | 425), _) => Failure::Server,
        (Some(s), _) if s >= 500 => Failure::Server,
        (Some(_), _) => Failure::BadRequest,
        // an error object inside a 200 stream or body
        (None, "invalid_request_error") => Failure::BadRequest,
        (None, _) => Failure::Stream,
    };
    let status_txt = status.map(|s| format!("{s} ")).unwrap_or_default();
    if failure == Failure::Auth {
        // the provider's words may quote the operator's key ("Incorrect API key provided:
        // sk-...abcd"): they go to the log, the tenant reads that the credentials were refused
        tracing::warn!(status = %status_txt.trim(), message = %message, "the provider refused the configured credentials");
        return ProviderError::new(
            failure,
            format!(
                "provider answered {}: it refused this server's credentials for it",
                status_txt.trim()
            ),
        );
    }
    ProviderError::new(failure, format!("provider answered {status_txt}{message}"))
}

/// An error and its causes, `: `-separated.
fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}

/// An SSE reader with the call's deadlines: before the first token, `ttft` from the start of
/// the call; after it, `idle` between events.
pub(crate) struct SseReader<S> {
    inner: S,
    first_deadline: Instant,
    idle: Duration,
    got_token: bool,
}

pub(crate) fn reader(
    resp: reqwest::Response,
    started: Instant,
    ttft: Duration,
    idle: Duration,
) -> SseReader<impl Stream<Item = Result<Event, EventStreamError<BodyError>>>> {
    let mut guard = Guard::default();
    SseReader {
        inner: resp
            .bytes_stream()
            .map(move |chunk| guard.pass(chunk))
            .eventsource(),
        first_deadline: started + ttft,
        idle,
        got_token: false,
    }
}

/// Longest SSE line, and longest event (its lines up to the blank line that ends it), a
/// provider may send: past them the call fails rather than buffering without bound. (The
/// parser re-reads a line it has not seen the end of on every packet: a line's cost grows
/// with its square, so its bound is the tighter; a whole reply of 1 MiB is ~250k tokens.)
pub(crate) const MAX_SSE_LINE: u64 = 1 << 20;
pub(crate) const MAX_SSE_EVENT: u64 = 8 << 20;
/// Longest non-streamed reply, and longest error body read.
pub(crate) const MAX_BODY: usize = 64 << 20;
const MAX_ERROR_BODY: usize = 64 << 10;

/// Why a provider's body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    Http(reqwest::Error),
    TooLarge(&'static str),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Http(e) => write!(f, "{e}"),
            BodyError::TooLarge(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Checks the raw bytes of an SSE body before the parser sees them: drops a leading UTF-8
/// byte order mark (the parser slices it as if it were one byte and panics) and bounds lines
/// and events (the parser buffers a line until its newline, an event until its blank line).
#[derive(Debug, Default)]
struct Guard {
    /// Bytes seen so far, up to the length of a BOM.
    head: usize,
    line: u64,
    event: u64,
    /// The byte before (a line ending right after another is a blank line: the event ends).
    prev: u8,
    failed: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Guard {
    fn pass(&mut self, chunk: Result<Bytes, reqwest::Error>) -> Result<Bytes, BodyError> {
        if self.failed {
            return Err(BodyError::TooLarge("provider stream broke"));
        }
        let mut bytes = chunk.map_err(BodyError::Http)?;
        // a BOM can only be the body's first three bytes (possibly split across chunks)
        while self.head < BOM.len() && !bytes.is_empty() {
            if bytes[0] != BOM[self.head] {
                self.head = BOM.len();
                break;
            }
            bytes = bytes.slice(1..);
            self.head += 1;
        }
        for &b in bytes.iter() {
            let ending = |c: u8| c == b'\n' || c == b'\r';
            if ending(b) {
                // `\r\n` is one line ending
                if ending(self.prev) && !(self.prev == b'\r' && b == b'\n') {
                    self.event = 0;
                }
                self.line = 0;
            } else {
                self.line += 1;
                self.event += 1;
            }
            self.prev = b;
            if self.line > MAX_SSE_LINE || self.event > MAX_SSE_EVENT {
                self.failed = true;
                return Err(BodyError::TooLarge(
                    "the provider sent a stream event larger than 8 MiB (or a line over 1 MiB)",
                ));
            }
        }
        Ok(bytes)
    }
}

/// Reads a whole body, failing past `max` bytes.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Http)? {
        if out.len() + chunk.len() > max {
            return Err(BodyError::TooLarge("the provider's reply is too large"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

impl<S> SseReader<S>
where
    S: Stream<Item = Result<Event, EventStreamError<BodyError>>> + Unpin,
{
    /// Marks that a token arrived: from now on the idle limit applies.
    pub fn token(&mut self) {
        self.got_token = true;
    }

    /// The next event; `Ok(None)` at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Event>, ProviderError> {
        let deadline = if self.got_token {
            Instant::now() + self.idle
        } else {
            self.first_deadline
        };
        match tokio::time::timeout_at(deadline, self.inner.next()).await {
            Err(_) if self.got_token => Err(ProviderError::new(
                Failure::Timeout,
                format!("provider stream stalled for {:?}", self.idle),
            )),
            Err(_) => Err(ProviderError::new(
                Failure::Timeout,
                "no first token from the provider in time",
            )),
            Ok(None) => Ok(None),
            Ok(Some(Ok(ev))) => Ok(Some(ev)),
            Ok(Some(Err(e))) => Err(ProviderError::new(
                Failure::Stream,
                format!("provider stream broke: {e}"),
            )),
        }
    }
}

/// Reads a whole non-streamed body within the first-token limit.
pub(crate) async fn body_json(
    resp: reqwest::Response,
    started: Instant,
    ttft: Duration,
) -> Result<Value, ProviderError> {
    let body = tokio::time::timeout_at(started + ttft, read_limited(resp, MAX_BODY))
        .await
        .map_err(|_| ProviderError::new(Failure::Timeout, "no reply from the provider in time"))?
        .map_err(|e| ProviderError::new(Failure::Stream, format!("reply body broke: {e}")))?;
    let text = String::from_utf8_lossy(&body);
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        ProviderError::new(Failure::Stream, format!("unparseable provider reply: {e}"))
    })?;
    if v.get("error").is_some_and(|e| !e.is_null()) || v["type"] == "error" {
        return Err(classify(None, &text));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_drops_a_split_mark_and_bounds_events_not_bodies() {
        let mut g = Guard::default();
        let pass = |g: &mut Guard, b: &[u8]| g.pass(Ok(Bytes::copy_from_slice(b)));
        assert_eq!(pass(&mut g, b"\xEF").unwrap(), Bytes::new());
        assert_eq!(
            pass(&mut g, b"\xBB\xBFdata: a\n\n").unwrap(),
            &b"data: a\n\n"[..]
        );
        // a mark later in the body is the body's
        assert_eq!(pass(&mut g, b"\xEF\xBB\xBF").unwrap(), &b"\xEF\xBB\xBF"[..]);
        // many events, each under the bound, with any line endings: fine
        let event = format!("data: {}\r\r", "x".repeat(1000 << 10));
        for _ in 0..40 {
            assert!(pass(&mut g, event.as_bytes()).is_ok());
        }
        let event = format!("data: {}\r\n\r\n", "x".repeat(1000 << 10));
        for _ in 0..40 {
            assert!(pass(&mut g, event.as_bytes()).is_ok());
        }
        // one event of many lines past the event bound: refused, and so is what follows
        let line = format!("data: {}\n", "x".repeat(1000 << 10));
        let refused = (0..20).any(|_| pass(&mut g, line.as_bytes()).is_err());
        assert!(refused);
        assert!(pass(&mut g, b"\n\n").is_err());
    }

    #[test]
    fn endpoints_keep_queries() {
        assert_eq!(endpoint("http://h/v1/", "messages"), "http://h/v1/messages");
        assert_eq!(
            endpoint(
                "https://x.azure.com/openai/deployments/d?api-version=2024-06-01",
                "chat/completions"
            ),
            "https://x.azure.com/openai/deployments/d/chat/completions?api-version=2024-06-01"
        );
    }

    #[test]
    fn classification() {
        let f = |s: Option<u16>, b: &str| classify(s, b).failure;
        assert_eq!(
            f(
                Some(429),
                r#"{"error":{"type":"rate_limit_error","code":"rate_limit_exceeded","message":"slow down"}}"#
            ),
            Failure::RateLimited
        );
        assert_eq!(
            f(
                Some(429),
                r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"x"}}"#
            ),
            Failure::QuotaExhausted
        );
        assert_eq!(
            f(
                Some(429),
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"quota exhausted"}}"#
            ),
            Failure::QuotaExhausted
        );
        assert_eq!(
            f(
                Some(400),
                r#"{"error":{"type":"invalid_request_error","code":"context_length_exceeded","message":"x"}}"#
            ),
            Failure::ContextLength
        );
        assert_eq!(
            f(
                Some(400),
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 9000 tokens > 8192 maximum"}}"#
            ),
            Failure::ContextLength
        );
        // Azure's token rate limit links "quotaincrease"; Gemini's per-minute limit says quota
        assert_eq!(
            f(
                Some(429),
                r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-06-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}"#
            ),
            Failure::RateLimited
        );
        assert_eq!(
            f(
                Some(429),
                r#"[{"error":{"code":429,"message":"Quota exceeded for metric: generate_content_requests, limit: 15 per minute","status":"RESOURCE_EXHAUSTED"}}]"#
            ),
            Failure::RateLimited
        );
        assert_eq!(
            f(
                Some(429),
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#
            ),
            Failure::QuotaExhausted
        );
        // Anthropic's account out of credit is a 400: not the request's fault, fall back
        assert_eq!(
            f(
                Some(400),
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#
            ),
            Failure::QuotaExhausted
        );
        assert_eq!(
            f(
                Some(400),
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"input length and `max_tokens` exceed context limit: 197202 + 8192 > 200000"}}"#
            ),
            Failure::ContextLength
        );
        assert_eq!(
            f(
                Some(400),
                r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#
            ),
            Failure::ContextLength
        );
        assert_eq!(f(Some(400), "{}"), Failure::BadRequest);
        assert_eq!(f(Some(404), "not json"), Failure::BadRequest);
        assert_eq!(f(Some(401), "{}"), Failure::Auth);
        assert_eq!(f(Some(502), "{}"), Failure::Server);
        assert_eq!(
            f(
                Some(529),
                r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#
            ),
            Failure::Overloaded
        );
        assert_eq!(
            f(
                None,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#
            ),
            Failure::Overloaded
        );
        assert_eq!(
            f(
                None,
                r#"{"error":{"type":"server_error","message":"oops"}}"#
            ),
            Failure::Stream
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        h.insert("retry-after-ms", "1e300".parse().unwrap());
        assert_eq!(
            retry_after(&h),
            Some(Duration::from_secs(3600)),
            "absurd values are capped"
        );
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }
}
