//! Daily quotas on the worker's side: a run that would draw on a quota its tenant has used up
//! today waits for the next day (the API checks only when a job is submitted: a delayed job,
//! or a batch admitted on one reading, ran past it); and a finished run's use is charged to
//! the tenant's day in Redis (read by every API replica): the LLM tokens its provider calls
//! used, however the run ended (a cache hit costs nothing), and sandbox run time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use switchyard_core::quota::{utc_day, QuotaLimits};
use switchyard_store::JobRow;
use tokio::time::Instant;
use uuid::Uuid;

use crate::executor::ExecError;
use crate::runtime::Shared;

/// How long a tenant's limits read from Postgres are used before they are read again.
const LIMITS_TTL: Duration = Duration::from_secs(10);
/// Longest wait for a tenant's use today (Redis); past it the run is admitted.
const USE_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Tenants whose limits are kept (beyond it, the stale ones are dropped).
const MAX_TENANTS: usize = 10_000;

/// The tenants' daily limits, read from Postgres at most every [`LIMITS_TTL`].
pub(crate) struct DailyGate {
    defaults: QuotaLimits,
    limits: Mutex<HashMap<Uuid, (Instant, QuotaLimits)>>,
}

impl DailyGate {
    pub(crate) fn new(defaults: QuotaLimits) -> DailyGate {
        DailyGate {
            defaults,
            limits: Mutex::new(HashMap::new()),
        }
    }

    async fn limits(&self, s: &Shared, tenant: Uuid) -> Option<QuotaLimits> {
        let now = Instant::now();
        if let Ok(map) = self.limits.lock() {
            if let Some((at, l)) = map.get(&tenant) {
                if now.duration_since(*at) < LIMITS_TTL {
                    return Some(l.clone());
                }
            }
        }
        let read = s.store.tenant_settings(&tenant.to_string()).await;
        let limits = match read {
            Ok(Some(t)) => t.quotas.over(&self.defaults),
            Ok(None) => self.defaults.clone(),
            Err(e) => {
                tracing::warn!(error = %e, "tenant limits not read: daily quota not checked");
                return None;
            }
        };
        if let Ok(mut map) = self.limits.lock() {
            if map.len() >= MAX_TENANTS {
                map.retain(|_, (at, _)| now.duration_since(*at) < LIMITS_TTL);
            }
            map.insert(tenant, (now, limits.clone()));
        }
        Some(limits)
    }

    /// `Some`: the run must not start today (its tenant's quota for it is used up); it waits,
    /// without using an attempt, until 00:00 UTC. Trouble reading admits the run, as the API
    /// admits a submission when Redis is down (quotas guard capacity, they are not promises).
    pub(crate) async fn refuse(&self, s: &Shared, row: &JobRow) -> Option<ExecError> {
        let tokens = match row.kind.as_str() {
            "llm.chat" => true,
            "code.exec" => false,
            _ => return None,
        };
        let limits = self.limits(s, row.tenant_id).await?;
        let limit = if tokens {
            limits.llm_tokens_per_day?
        } else {
            limits.sandbox_cpu_seconds_per_day?.saturating_mul(1000)
        };
        let (day, left) = utc_day(chrono::Utc::now());
        let used =
            match tokio::time::timeout(USE_READ_TIMEOUT, s.quotas.daily_use(row.tenant_id, &day))
                .await
            {
                Ok(Ok(u)) if tokens => u.tokens,
                Ok(Ok(u)) => u.cpu_ms,
                _ => {
                    tracing::warn!("daily quota not checked: redis unavailable or slow");
                    return None;
                }
            };
        (used >= limit).then(|| {
            let what = if tokens {
                "LLM tokens"
            } else {
                "sandbox CPU-seconds"
            };
            ExecError::defer(
                "quota_exceeded",
                format!(
                    "the tenant's daily quota of {what} is used up; the job runs after 00:00 UTC"
                ),
                left + Duration::from_secs(1),
            )
        })
    }
}

/// Adds what the run used, `(tokens, sandbox ms)`, to its tenant's day (best effort: a Redis
/// error is logged, the job's outcome is already durable). Runs that did not succeed are
/// charged too: a reply paid for but not kept (its conversation deleted meanwhile, cut by a
/// cancel or a time limit) was used all the same.
pub(crate) async fn charge(s: &Shared, row: &JobRow, (tokens, cpu_ms): (u64, u64)) {
    if tokens == 0 && cpu_ms == 0 {
        return;
    }
    let (day, _) = switchyard_core::quota::utc_day(chrono::Utc::now());
    if let Err(e) = s.quotas.charge(row.tenant_id, &day, tokens, cpu_ms).await {
        tracing::warn!(error = %e, tokens, cpu_ms, "could not charge the tenant's quota");
    }
}
