//! The registries in Redis: the queues jobs were dispatched to or workers serve
//! (`{P:meta}:queues`, with the tenant that named each named queue first in
//! `{P:meta}:queue_owners`), and the workers (`{P:meta}:workers`): each worker's periodic
//! report, read by `GET /v1/workers`; reports older than the liveness window are dropped on
//! read.

use std::time::Duration;

use chrono::Utc;
use redis::{AsyncCommands, RedisResult};
use switchyard_core::queueing::WorkerInfo;

use crate::Queue;
use switchyard_core::job::known_queues;

impl Queue {
    /// Drops a named queue from the registry (the scheduler's pruning of unused ones), and its
    /// lease-reclaim count (a `/metrics` series). Its slot's keys stay: empty streams with
    /// their consumer group, its fairness and limit hashes and its epoch mark, which a job
    /// dispatched to it again finds as it left them (deleting them would race that dispatch).
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
