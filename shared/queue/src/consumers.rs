//! Housekeeping of the queues' slots: every worker start reads under a new consumer name,
//! which Redis keeps in each stream's group until it is deleted, so the scheduler deletes
//! consumers that hold no pending entry and have been idle for a while (a live worker's
//! consumer deleted this way is recreated by its next read: nothing is lost); and each queue's
//! slot carries the epoch, so that a Redis Cluster shard losing its data alone is noticed.

use std::time::Duration;

use redis::{RedisResult, Value};

use crate::keys::{GROUP, PRIORITIES};
use crate::Queue;

/// The fields of one `XINFO` entry (RESP2 flat array or RESP3 map).
pub(crate) fn info_fields(entry: Value) -> Vec<(String, Value)> {
    match entry {
        Value::Array(kv) => kv
            .chunks(2)
            .filter_map(|c| match c {
                [Value::BulkString(k), v] => {
                    Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                }
                [Value::SimpleString(k), v] => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv
            .into_iter()
            .filter_map(|(k, v)| match k {
                Value::BulkString(k) => Some((String::from_utf8_lossy(&k).into_owned(), v)),
                Value::SimpleString(k) => Some((k, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// KEYS[1] = a stream; ARGV: group, idle ms. Deletes the group's consumers without pending
/// entries idle at least that long; returns how many.
pub(crate) const PRUNE: &str = r#"
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(consumers) ~= 'table' or consumers.err then return 0 end
local min_idle = tonumber(ARGV[2])
local n = 0
for _, c in ipairs(consumers) do
  local name, pending, idle = nil, 1, 0
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = tonumber(c[i + 1])
    elseif c[i] == 'idle' then idle = tonumber(c[i + 1]) end
  end
  if name and pending == 0 and idle >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    n = n + 1
  end
end
return n
"#;

/// A field as an integer.
pub(crate) fn int_field(fields: &[(String, Value)], name: &str) -> Option<i64> {
    match fields.iter().find(|(k, _)| k == name).map(|(_, v)| v) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    }
}

impl Queue {
    /// Marks every queue's slot with `epoch` (those not marked in it yet) and returns the
    /// queues whose mark of `epoch` is gone: their shard lost its data while `{P:meta}` kept
    /// the epoch (the caller starts a new epoch, which re-dispatches from Postgres).
    pub async fn check_queue_epochs(&self, epoch: i64) -> RedisResult<Vec<String>> {
        let queues = self.queues().await?;
        let mut c = self.conn();
        let marked: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(self.keys().queue_marks())
            .arg(&queues)
            .query_async(&mut c)
            .await?;
        let mut pipe = redis::pipe();
        for q in &queues {
            pipe.get(self.keys().queue_epoch(q));
        }
        let marks: Vec<Option<i64>> = pipe.query_async(&mut c).await?;
        let mut lost = Vec::new();
        let mut fresh = Vec::new();
        for ((q, was), now) in queues.iter().zip(marked).zip(marks) {
            match (was == Some(epoch), now == Some(epoch)) {
                (_, true) => {}
                (true, false) => lost.push(q.clone()),
                (false, false) => fresh.push(q),
            }
        }
        if !fresh.is_empty() {
            // the slot first, then the record that it was marked
            let mut pipe = redis::pipe();
            for q in &fresh {
                pipe.set(self.keys().queue_epoch(q), epoch).ignore();
            }
            pipe.query_async::<()>(&mut c).await?;
            let entries: Vec<(&String, i64)> = fresh.iter().map(|q| (*q, epoch)).collect();
            redis::cmd("HSET")
                .arg(self.keys().queue_marks())
                .arg(entries)
                .query_async::<()>(&mut c)
                .await?;
        }
        Ok(lost)
    }

    /// Deletes the consumers of `queue`'s streams that hold no pending entry and were idle
    /// for at least `idle`; returns how many. Each stream's check and deletions are one script
    /// (atomic): a consumer that fetched an entry between a separate check and its deletion
    /// would lose the entry, and the entry's concurrency slot would never be given back.
    pub async fn prune_consumers(&self, queue: &str, idle: Duration) -> RedisResult<usize> {
        let mut c = self.conn();
        let mut pruned = 0;
        for p in PRIORITIES {
            let stream = self.keys().stream(queue, p);
            // (a stream or group that does not exist yet counts 0)
            let n: i64 = self
                .prune_script
                .key(&stream)
                .arg(GROUP)
                .arg(idle.as_millis() as u64)
                .invoke_async(&mut c)
                .await?;
            pruned += n.max(0) as usize;
        }
        Ok(pruned)
    }
}
