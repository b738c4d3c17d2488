//! The registries in Redis: the queues jobs were dispatched to or workers serve
//! (`{P:meta}:queues`, with the tenant that named each named queue first in
//! `{P:meta}:queue_owners`), and the workers (`{P:meta}:workers`): each worker's periodic
//! report, read by `GET /v1/workers`; reports older than the liveness window are dropped on
//! read.

use std::time::Duration;

use chrono::Utc;
use redis::{AsyncCommands, RedisResult};
use switchyard_core::queueing::WorkerInfo;

use crate::keys::PRIORITIES;
use crate::Queue;
use switchyard_core::job::known_queues;

/// KEYS: a queue's priority streams (one per priority), bell, fairness hash, limits hash,
/// delayed set. Deletes them all when the streams hold no entry (pending ones included), the
/// delayed set is empty and no fairness counter is above 0 (nothing waits in a lane, nothing
/// is in flight); returns 1, else 0.
const DELETE_IF_EMPTY: &str = r#"
local n = #KEYS - 4
for i = 1, n do
  if redis.call('XLEN', KEYS[i]) > 0 then return 0 end
end
if redis.call('ZCARD', KEYS[n + 4]) > 0 then return 0 end
local f = redis.call('HGETALL', KEYS[n + 2])
for i = 2, #f, 2 do
  if (tonumber(f[i]) or 0) > 0 then return 0 end
end
redis.call('DEL', unpack(KEYS))
return 1
"#;

impl Queue {
    /// Drops a named queue from the registry (the scheduler's pruning of unused ones), and its
    /// lease-reclaim count (a `/metrics` series). Its slot's keys stay until
    /// [`Queue::delete_queue_keys`].
    pub async fn unregister_queue(&self, queue: &str) -> RedisResult<()> {
        let mut c = self.conn();
        let mut pipe = redis::pipe();
        pipe.srem(self.keys().queues(), queue)
            .ignore()
            .hdel(self.keys().reclaims(), queue)
            .ignore()
            .hdel(self.keys().queue_owners(), queue)
            .ignore();
        pipe.query_async(&mut c).await
    }

    /// Deletes the keys of a named queue dropped from the registry — its priority streams
    /// (with their consumer group), bell, fairness and limit hashes, delayed set and epoch
    /// mark — if it holds nothing: one script checks and deletes in the queue's slot, so a job
    /// dispatched meanwhile keeps them. A job dispatched afterwards writes a stream anew, as
    /// for a new queue: the worker that serves it next creates the group (at start, or on the
    /// `NOGROUP` of its fetch) and reads it from the beginning, and the scheduler writes its
    /// limits and marks its epoch again. Call it where no epoch check runs at the same time
    /// (the scheduler holds the dispatch lock): the epoch mark goes last, after the record that
    /// it was set, so a check never finds a recorded mark gone (that reads as a shard's lost
    /// data), and a queue whose keys stay keeps both. Whether the keys were deleted.
    pub async fn delete_queue_keys(&self, queue: &str) -> RedisResult<bool> {
        let mut c = self.conn();
        let script = redis::Script::new(DELETE_IF_EMPTY);
        let mut inv = script.prepare_invoke();
        for p in PRIORITIES {
            inv.key(self.keys().stream(queue, p));
        }
        inv.key(self.keys().bell(queue))
            .key(self.keys().fair(queue))
            .key(self.keys().limits(queue))
            .key(self.keys().delayed(queue));
        let deleted: i64 = inv.invoke_async(&mut c).await?;
        if deleted != 1 {
            return Ok(false);
        }
        let _: () = c.hdel(self.keys().queue_marks(), queue).await?;
        let _: () = c.del(self.keys().queue_epoch(queue)).await?;
        Ok(true)
    }

    /// Lists a named queue in the registry again.
    pub async fn register_queue(&self, queue: &str) -> RedisResult<()> {
        let mut c = self.conn();
        c.sadd(self.keys().queues(), queue).await
    }

    /// The named queues (beyond the kinds' own) in the registry, and which tenant named each
    /// first (those with an owner), in one round trip.
    pub async fn named_queues(
        &self,
    ) -> RedisResult<(Vec<String>, std::collections::HashMap<String, String>)> {
        let mut c = self.conn();
        let (mut all, owners): (Vec<String>, std::collections::HashMap<String, String>) =
            redis::pipe()
                .smembers(self.keys().queues())
                .hgetall(self.keys().queue_owners())
                .query_async(&mut c)
                .await?;
        let known = known_queues();
        all.retain(|q| !known.contains(&q.as_str()));
        Ok((all, owners))
    }

    /// Records `tenant` as the one that named `queues` first, where none is recorded.
    pub async fn own_queues(&self, queues: &[&str], tenant: &str) -> RedisResult<()> {
        let mut c = self.conn();
        let mut pipe = redis::pipe();
        for q in queues {
            pipe.hset_nx(self.keys().queue_owners(), *q, tenant)
                .ignore();
        }
        pipe.query_async(&mut c).await
    }

    /// Every queue: the kinds' own and the named ones seen (sorted).
    pub async fn queues(&self) -> RedisResult<Vec<String>> {
        let mut c = self.conn();
        let mut all: Vec<String> = c.smembers(self.keys().queues()).await?;
        all.extend(known_queues().into_iter().map(String::from));
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// Records a worker's report (see `GET /v1/workers`).
    pub async fn report_worker(&self, info: &WorkerInfo) -> RedisResult<()> {
        let json = serde_json::to_string(info).unwrap_or_default();
        let mut c = self.conn();
        c.hset(self.keys().workers(), &info.id, json).await
    }

    /// Forgets a worker that stopped.
    pub async fn remove_worker(&self, id: &str) -> RedisResult<()> {
        let mut c = self.conn();
        c.hdel(self.keys().workers(), id).await
    }

    /// Workers that reported within `live`, by id; older reports (workers that died) are
    /// removed.
    pub async fn workers(&self, live: Duration) -> RedisResult<Vec<WorkerInfo>> {
        let mut c = self.conn();
        let all: Vec<(String, String)> = c.hgetall(self.keys().workers()).await?;
        let cutoff = Utc::now() - chrono::Duration::from_std(live).unwrap_or_default();
        let mut out = Vec::new();
        for (id, json) in all {
            match serde_json::from_str::<WorkerInfo>(&json) {
                Ok(w) if w.heartbeat_at >= cutoff => out.push(w),
                _ => {
                    let _: RedisResult<()> = c.hdel(self.keys().workers(), &id).await;
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
