//! Tenant quotas in Redis, shared by every API replica and worker: a request rate (GCRA, one
//! atomic script, Redis's clock) and daily counters of LLM tokens and sandbox time that workers
//! charge when jobs end. Redis is not the source of truth for use (`GET /v1/usage` reads
//! Postgres); if Redis loses its data the day's counters restart from zero.

use std::sync::Arc;
use std::time::Duration;

use crate::RedisConn;
use redis::Script;
use uuid::Uuid;

use crate::Keys;

/// GCRA. KEYS[1] = state (theoretical arrival time, µs); ARGV[1] = emission interval (µs),
/// ARGV[2] = capacity (requests that may arrive at once). Returns {allowed, remaining,
/// reset_us, retry_us}.
const RATE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > window then
  return {0, 0, math.floor(tat - now), math.floor(new_tat - now - window)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local remaining = math.floor((window - (new_tat - now)) / interval)
return {1, remaining, math.floor(new_tat - now), 0}
"#;

/// The outcome of one request against a tenant's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Requests that could still be made at once.
    pub remaining: u64,
    /// Until the allowance is whole again.
    pub reset: Duration,
    /// When refused: until the next request would be allowed.
    pub retry_after: Duration,
}

/// A tenant's use on the current UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DailyUse {
    pub tokens: u64,
    pub cpu_ms: u64,
}

#[derive(Clone)]
pub struct Quotas {
    keys: Keys,
    conn: RedisConn,
    rate: Arc<Script>,
}

/// How long a day's counters are kept (past the day, for `GET /v1/quotas` around midnight).
const DAY_TTL_S: i64 = 2 * 24 * 3600;

impl Quotas {
    pub fn new(keys: Keys, conn: RedisConn) -> Quotas {
        Quotas {
            keys,
            conn,
            rate: Arc::new(Script::new(RATE_LUA)),
        }
    }

    /// Counts one request of `tenant` against `per_minute` (bursts of a sixth of it, at least
    /// one, may arrive at once).
    pub async fn take_request(
        &self,
        tenant: Uuid,
        per_minute: u64,
    ) -> redis::RedisResult<RateDecision> {
        let per_minute = per_minute.max(1);
        let interval_us = 60_000_000 / per_minute;
        let capacity = burst(per_minute);
        let (allowed, remaining, reset, retry): (i64, i64, i64, i64) = self
            .rate
            .key(self.keys.quota_rate(tenant))
            .arg(interval_us.max(1))
            .arg(capacity)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining: remaining.max(0) as u64,
            reset: us(reset),
            retry_after: us(retry),
        })
    }

    /// `tenant`'s use on UTC day `day` (`YYYYMMDD`).
    pub async fn daily_use(&self, tenant: Uuid, day: &str) -> redis::RedisResult<DailyUse> {
        let (tokens, cpu_ms): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.keys.quota_day(tenant, day))
            .arg("tokens")
            .arg("cpu_ms")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(DailyUse {
            tokens: tokens.unwrap_or(0),
            cpu_ms: cpu_ms.unwrap_or(0),
        })
    }

    /// Adds a finished job's use to its tenant's day.
    pub async fn charge(
        &self,
        tenant: Uuid,
        day: &str,
        tokens: u64,
        cpu_ms: u64,
    ) -> redis::RedisResult<()> {
        if tokens == 0 && cpu_ms == 0 {
            return Ok(());
        }
        let key = self.keys.quota_day(tenant, day);
        redis::pipe()
            .atomic()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("tokens")
            .arg(tokens)
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("cpu_ms")
            .arg(cpu_ms)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(DAY_TTL_S)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
    }
}

/// Requests that may arrive at once under a per-minute rate: a sixth of it, at least one.
pub fn burst(per_minute: u64) -> u64 {
    (per_minute / 6).max(1)
}
