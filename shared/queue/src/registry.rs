//! The worker registry in Redis (`{P:meta}:workers`): each worker's periodic report, read by
//! `GET /v1/workers`; reports older than the liveness window are dropped on read.

use std::time::Duration;

use chrono::Utc;
use redis::{AsyncCommands, RedisResult};
use switchyard_core::queueing::WorkerInfo;

use crate::Queue;

impl Queue {
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
