//! Quotas: per-tenant limits kept in Redis and enforced across every API replica (requests per
//! minute, LLM tokens and sandbox CPU-seconds per UTC day, concurrent running jobs), and the
//! per-credential request rate each API process enforces on its own.

use serde::{Deserialize, Serialize};

/// A tenant's limits; `None` means unlimited. A tenant's own settings (`tenants.quotas`)
/// override the configured defaults field by field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaLimits {
    /// Requests per minute over all the tenant's credentials (sustained rate; bursts of up to
    /// a sixth of it on top).
    pub requests_per_minute: Option<u64>,
    /// Jobs running at once in one queue, over all workers; more wait in the tenant's lane
    /// (enforced by the queue's fairness scripts).
    pub concurrent_jobs: Option<u64>,
    /// LLM tokens (prompt + completion) per UTC day.
    pub llm_tokens_per_day: Option<u64>,
    /// Sandbox time per UTC day, in seconds (a run is charged its duration: an upper bound of
    /// its CPU time, since a sandbox gets at most one core).
    pub sandbox_cpu_seconds_per_day: Option<u64>,
    /// Jobs waiting in queues (status `queued`); submissions beyond it get 429 with
    /// `Retry-After` (backpressure).
    pub max_queued_jobs: Option<u64>,
}

impl QuotaLimits {
    /// `self`'s settings where present, else `defaults`'.
    pub fn over(&self, defaults: &QuotaLimits) -> QuotaLimits {
        QuotaLimits {
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            concurrent_jobs: self.concurrent_jobs.or(defaults.concurrent_jobs),
            llm_tokens_per_day: self.llm_tokens_per_day.or(defaults.llm_tokens_per_day),
            sandbox_cpu_seconds_per_day: self
                .sandbox_cpu_seconds_per_day
                .or(defaults.sandbox_cpu_seconds_per_day),
            max_queued_jobs: self.max_queued_jobs.or(defaults.max_queued_jobs),
        }
    }
}

/// `[quotas]` in the configuration (`SWITCHYARD_QUOTAS__...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// Every tenant's limits unless it has its own (see [`QuotaLimits`]).
    pub requests_per_minute: Option<u64>,
    pub concurrent_jobs: Option<u64>,
    pub llm_tokens_per_day: Option<u64>,
    pub sandbox_cpu_seconds_per_day: Option<u64>,
    /// Default 1,000,000.
    pub max_queued_jobs: Option<u64>,
    /// Requests per second one API key or end user may make to one API process
    /// (0: unlimited).
    pub per_credential_rps: u32,
    /// Burst allowed on top of `per_credential_rps`.
    pub per_credential_burst: u32,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            requests_per_minute: None,
            concurrent_jobs: None,
            llm_tokens_per_day: None,
            sandbox_cpu_seconds_per_day: None,
            max_queued_jobs: Some(1_000_000),
            per_credential_rps: 1000,
            per_credential_burst: 2000,
        }
    }
}

impl QuotaConfig {
    /// The limits of a tenant without its own.
    pub fn defaults(&self) -> QuotaLimits {
        QuotaLimits {
            requests_per_minute: self.requests_per_minute,
            concurrent_jobs: self.concurrent_jobs,
            llm_tokens_per_day: self.llm_tokens_per_day,
            sandbox_cpu_seconds_per_day: self.sandbox_cpu_seconds_per_day,
            max_queued_jobs: self.max_queued_jobs,
        }
    }
}

/// The current UTC day as `YYYYMMDD` (the daily counters' suffix) and the time until it ends.
pub fn utc_day(now: chrono::DateTime<chrono::Utc>) -> (String, std::time::Duration) {
    let day = now.format("%Y%m%d").to_string();
    let midnight = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let left = (midnight - now).to_std().unwrap_or_default();
    (day, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_settings_override_defaults_field_by_field() {
        let d = QuotaLimits {
            requests_per_minute: Some(600),
            llm_tokens_per_day: Some(1_000_000),
            ..Default::default()
        };
        let t = QuotaLimits {
            requests_per_minute: Some(60),
            ..Default::default()
        };
        let e = t.over(&d);
        assert_eq!(e.requests_per_minute, Some(60));
        assert_eq!(e.llm_tokens_per_day, Some(1_000_000));
        assert_eq!(e.concurrent_jobs, None);
    }

    #[test]
    fn days_end_at_utc_midnight() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-12-02T23:59:30Z")
            .unwrap()
            .to_utc();
        let (day, left) = utc_day(t);
        assert_eq!(day, "20261202");
        assert_eq!(left.as_secs(), 30);
    }
}
