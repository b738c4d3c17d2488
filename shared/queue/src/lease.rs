//! Leases on stream entries: the heartbeat that keeps a running job's entry its worker's,
//! reclaim (XAUTOCLAIM) of entries whose worker stopped heartbeating, and handing a reclaimed
//! entry back to the worker whose lease still runs its job.

use std::time::Duration;

use redis::{RedisResult, Value};

use crate::keys::GROUP;
use crate::queue::{field, to_delivery};
use crate::{Delivery, Queue};

/// KEYS[1] = stream; ARGV: group, owner, job id, entry id. 0 when the owner holds another
/// pending entry of the job; else claims the entry for the owner and returns 1.
pub(crate) const GIVE_BACK_LUA: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
for _, e in ipairs(pending) do
  if e[1] ~= ARGV[4] then
    local r = redis.call('XRANGE', KEYS[1], e[1], e[1])
    if #r > 0 then
      local f = r[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'job' and f[i + 1] == ARGV[3] then return 0 end
      end
    end
  end
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'JUSTID')
return 1
"#;

pub(crate) const HEARTBEAT_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#;

impl Queue {
    /// Renews the lease of a delivery (resets its idle time) if `consumer` still owns it.
    pub async fn heartbeat(&self, d: &Delivery, consumer: &str) -> RedisResult<bool> {
        let mut c = self.conn();
        let owned: i64 = self
            .heartbeat_script
            .key(&d.stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(&d.entry_id)
            .invoke_async(&mut c)
            .await?;
        Ok(owned == 1)
    }

    /// Hands a reclaimed entry back to `owner` (the consumer whose live lease runs its job),
    /// still pending: its concurrency slot stays taken until the owner acknowledges it. Unless
    /// the owner holds another entry of the same job (then this one is a stale duplicate, and
    /// `false` says to acknowledge it).
    pub async fn give_back(&self, d: &Delivery, owner: &str) -> RedisResult<bool> {
        let mut c = self.conn();
        let handed: i64 = self
            .give_back_script
            .key(&d.stream)
            .arg(GROUP)
            .arg(owner)
            .arg(d.job_id.to_string())
            .arg(&d.entry_id)
            .invoke_async(&mut c)
            .await?;
        Ok(handed == 1)
    }

    /// Takes over up to `count` entries idle for longer than `min_idle` (their worker stopped
    /// heartbeating). `cursor` is per stream and carried between calls (XAUTOCLAIM's cursor).
    pub async fn reclaim(
        &self,
        queue: &str,
        priority: i16,
        consumer: &str,
        min_idle: Duration,
        cursor: &mut String,
        count: usize,
    ) -> RedisResult<Vec<Delivery>> {
        let stream = self.keys().stream(queue, priority);
        let mut c = self.conn();
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor.as_str())
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        if let Value::Array(parts) = reply {
            if let Some(Value::BulkString(next)) = parts.first() {
                *cursor = String::from_utf8_lossy(next).into_owned();
            }
            if let Some(Value::Array(entries)) = parts.get(1) {
                for e in entries {
                    // deleted entries come back as nil and are dropped from the PEL by Redis
                    if let Value::Array(pair) = e {
                        let id = match pair.first() {
                            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                            _ => continue,
                        };
                        let (job, tenant) = match pair.get(1) {
                            Some(Value::Array(fields)) => {
                                (field(fields, "job"), field(fields, "t").unwrap_or_default())
                            }
                            _ => (None, String::new()),
                        };
                        out.push(Delivery {
                            reclaimed: true,
                            ..to_delivery(queue, &stream, &id, job, tenant)
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}
