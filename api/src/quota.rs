//! Request admission and quotas: each credential's request rate in this process (`governor`),
//! the tenant's requests per minute across all replicas (Redis), and the tenant's daily LLM
//! tokens and sandbox time, checked when a job is submitted. Successful requests carry
//! `RateLimit-*` headers when the tenant has a rate; refusals are 429 with `Retry-After`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use switchyard_core::quota::{utc_day, QuotaConfig, QuotaLimits};
use switchyard_core::ErrorCode;
use switchyard_queue::{Quotas, RateDecision};
use switchyard_store::Principal;
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

/// Credentials tracked at most per process before idle ones are forgotten.
const MAX_CREDENTIALS: usize = 100_000;

/// How long this process trusts a tenant's counted backlog (adding what it accepted since).
const BACKLOG_TTL: Duration = Duration::from_secs(1);

/// Per-credential limiter of one API process, plus the quota defaults.
pub struct Admission {
    per_credential: Option<DefaultKeyedRateLimiter<String>>,
    defaults: QuotaLimits,
    rps: u32,
    pub quotas: Quotas,
    /// Tenant → (when counted, queued jobs then + accepted here since).
    backlog: Mutex<HashMap<Uuid, (Instant, u64)>>,
}

/// `RateLimit-*` headers for a response.
#[derive(Debug, Clone, Copy)]
pub struct RateHeaders {
    limit: u64,
    decision: RateDecision,
}

impl RateHeaders {
    pub fn apply(&self, h: &mut HeaderMap) {
        let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        let mut put = |k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        put("ratelimit-limit", self.limit.to_string());
        put("ratelimit-remaining", self.decision.remaining.to_string());
        put("ratelimit-reset", secs(self.decision.reset).to_string());
        put("ratelimit-policy", format!("{};w=60", self.limit));
    }
}

impl Admission {
    pub fn new(cfg: &QuotaConfig, quotas: Quotas) -> Admission {
        let per_credential = NonZeroU32::new(cfg.per_credential_rps).map(|rps| {
            let burst = NonZeroU32::new(cfg.per_credential_burst).unwrap_or(rps);
            RateLimiter::keyed(Quota::per_second(rps).allow_burst(burst.max(rps)))
        });
        Admission {
            per_credential,
            defaults: cfg.defaults(),
            rps: cfg.per_credential_rps,
            quotas,
            backlog: Mutex::new(HashMap::new()),
        }
    }

    /// The per-credential rate of this process (`None`: unlimited).
    pub fn per_credential_rps(&self) -> Option<u32> {
        self.per_credential.as_ref().map(|_| self.rps)
    }

    /// The tenant's effective limits.
    pub fn limits(&self, p: &Principal) -> QuotaLimits {
        p.quotas.over(&self.defaults)
    }

    /// Admits one request of `p`, or refuses it with 429; the `RateLimit-*` headers to send
    /// either way. Redis trouble admits (the rate is a guard, not a promise; Postgres-backed
    /// work still fails cleanly if Redis is down).
    pub async fn admit(&self, p: &Principal) -> (Option<RateHeaders>, Result<(), ApiError>) {
        if let Some(l) = &self.per_credential {
            if l.len() > MAX_CREDENTIALS {
                l.retain_recent();
            }
            // the tenant in the key: an end user's subject is the tenant's to choose (a tenant
            // minting tokens for another tenant's user ids would throttle those users)
            if let Err(not_until) = l.check_key(&format!("{}/{}", p.tenant_id, p.subject())) {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let e = ApiError::new(
                    ErrorCode::RateLimited,
                    "too many requests from this credential; slow down",
                )
                .retry_after(wait);
                return (None, Err(e));
            }
        }
        let Some(limit) = self.limits(p).requests_per_minute else {
            return (None, Ok(()));
        };
        let decision = match self.quotas.take_request(p.tenant_id, limit).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "tenant rate not checked: redis unavailable");
                return (None, Ok(()));
            }
        };
        let headers = Some(RateHeaders { limit, decision });
        if !decision.allowed {
            let e = ApiError::new(
                ErrorCode::RateLimited,
                format!("the tenant's limit of {limit} requests per minute is reached"),
            )
            .retry_after(decision.retry_after);
            return (headers, Err(e));
        }
        (headers, Ok(()))
    }
}

/// Refuses a new job of `kind` when the daily quota it draws on is used up.
pub async fn check_daily(state: &AppState, p: &Principal, kind: &str) -> Result<(), ApiError> {
    let limits = state.admission.limits(p);
    let (limit, what) = match kind {
        "llm.chat" => (limits.llm_tokens_per_day, "LLM tokens"),
        "code.exec" => (
            limits.sandbox_cpu_seconds_per_day.map(|s| s * 1000),
            "sandbox CPU-seconds",
        ),
        _ => return Ok(()),
    };
    let Some(limit) = limit else { return Ok(()) };
    let (day, left) = utc_day(chrono::Utc::now());
    let used = match state.admission.quotas.daily_use(p.tenant_id, &day).await {
        Ok(u) if kind == "llm.chat" => u.tokens,
        Ok(u) => u.cpu_ms,
        Err(e) => {
            tracing::warn!(error = %e, "daily quota not checked: redis unavailable");
            return Ok(());
        }
    };
    if used >= limit {
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!("the tenant's daily quota of {what} is used up; it resets at 00:00 UTC"),
        )
        .retry_after(left));
    }
    Ok(())
}

/// Backpressure: refuses `n` more jobs when the tenant's queued jobs would pass its
/// `max_queued_jobs` (429 `quota_exceeded` with `Retry-After`). The count comes from Postgres
/// at most once per second per tenant and process, plus what this process accepted since, so
/// replicas together may overshoot by what they accept within that second. One request
/// refreshes a stale count; the others keep using it meanwhile (a burst of submissions used to
/// count the backlog once per request in flight: ~20 counts a second at 100 clients).
pub async fn check_backlog(state: &AppState, p: &Principal, n: u64) -> Result<(), ApiError> {
    let Some(max) = state.admission.limits(p).max_queued_jobs else {
        return Ok(());
    };
    if n > 1 && n > max {
        // no backlog ever takes it: waiting would not help
        return Err(ApiError::field(
            ErrorCode::InvalidInput,
            "jobs",
            format!(
                "{n} jobs in one request, and the tenant may have at most {max} queued \
                 (max_queued_jobs): send them in smaller batches"
            ),
        ));
    }
    // (the count to go by, whether this request refreshes it)
    let (known, refresh) = {
        let mut map = state
            .admission
            .backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&p.tenant_id) {
            Some((at, c)) if at.elapsed() < BACKLOG_TTL => (Some(*c), false),
            Some((at, c)) => {
                // claim the refresh: requests arriving meanwhile see a fresh entry
                *at = Instant::now();
                (Some(*c), true)
            }
            None => (None, true),
        }
    };
    let queued = match (known, refresh) {
        (Some(c), false) => c,
        (known, _) => match state
            .store
            .queued_jobs(p.tenant_id, max.min(i64::MAX as u64) as i64)
            .await
        {
            Ok(c) => c.max(0) as u64,
            Err(_) => match known {
                Some(c) => c,
                // the insert that follows reports Postgres trouble itself
                None => return Ok(()),
            },
        },
    };
    let mut map = state
        .admission
        .backlog
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if map.len() > MAX_CREDENTIALS {
        map.retain(|_, (at, _)| at.elapsed() < BACKLOG_TTL);
    }
    let entry = map.entry(p.tenant_id).or_insert((Instant::now(), queued));
    if refresh {
        *entry = (Instant::now(), queued);
    }
    if queued.saturating_add(n) > max {
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "the tenant has {queued} queued jobs; its limit (max_queued_jobs) is {max}: retry when workers have caught up"
            ),
        )
        .retry_after(Duration::from_secs(5)));
    }
    entry.1 += n;
    Ok(())
}

/// Gives back `n` jobs [`check_backlog`] counted that were not queued after all (a duplicate
/// of an idempotent request answered with the first one's jobs), so they do not refuse
/// other submissions meanwhile.
pub fn return_backlog(state: &AppState, p: &Principal, n: u64) {
    let mut map = state
        .admission
        .backlog
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = map.get_mut(&p.tenant_id) {
        *c = c.saturating_sub(n);
    }
}
