//! Job dispatch over Redis Streams: XADD to dispatch, XREADGROUP to fetch, XACK+XDEL when
//! done, and a delayed zset moved into the streams in bounded batches (leases: heartbeat and
//! reclaim, in `lease.rs`). No operation costs O(backlog).

use std::sync::Arc;
use std::time::Duration;

use crate::RedisConn;
use chrono::Utc;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisResult, Script, Value};
use switchyard_core::job::{known_queues, DispatchItem};
use uuid::Uuid;

use crate::fair;
use crate::keys::{Keys, GROUP, PRIORITIES};

/// One fetched stream entry: a job to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub queue: String,
    pub stream: String,
    pub entry_id: String,
    pub job_id: Uuid,
    /// The job's tenant (its fairness lane and concurrency slot).
    pub tenant: String,
    /// Taken over from another consumer (lease reclaim), not read fresh.
    pub reclaimed: bool,
}

/// Dispatch and lease operations on the queue streams.
#[derive(Clone)]
pub struct Queue {
    keys: Keys,
    conn: RedisConn,
    pub(crate) heartbeat_script: Arc<Script>,
    move_due_script: Arc<Script>,
    fetch_script: Arc<Script>,
    dispatch_script: Arc<Script>,
    ack_script: Arc<Script>,
    pub(crate) prune_script: Arc<Script>,
    pub(crate) give_back_script: Arc<Script>,
    /// Undelivered entries one tenant (weight 1) may have in a queue's streams (`fair.rs`).
    lane_depth: u64,
}

impl Queue {
    pub fn new(keys: Keys, conn: RedisConn) -> Queue {
        Queue {
            keys,
            conn,
            heartbeat_script: Arc::new(Script::new(crate::lease::HEARTBEAT_LUA)),
            move_due_script: Arc::new(fair::script(fair::MOVE_DUE)),
            fetch_script: Arc::new(fair::script(fair::FETCH)),
            dispatch_script: Arc::new(fair::script(fair::DISPATCH)),
            ack_script: Arc::new(fair::script(fair::ACK_MANY)),
            prune_script: Arc::new(Script::new(crate::consumers::PRUNE)),
            give_back_script: Arc::new(Script::new(crate::lease::GIVE_BACK_LUA)),
            lane_depth: fair::DEFAULT_LANE_DEPTH,
        }
    }

    /// The same queue with another lane depth (`queue_lane_depth`).
    pub fn with_lane_depth(mut self, depth: u64) -> Queue {
        self.lane_depth = depth.max(1);
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Creates the consumer group of every priority stream of `queue` (idempotent; needed again
    /// after Redis lost its data).
    pub async fn ensure_group(&self, queue: &str) -> RedisResult<()> {
        let mut c = self.conn.clone();
        let _: () = c.sadd(self.keys.queues(), queue).await?;
        for p in PRIORITIES {
            let res: RedisResult<()> = c
                .xgroup_create_mkstream(self.keys.stream(queue, p), GROUP, "0")
                .await;
            match res {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Hands jobs to Redis in one pipeline: ready ones to their stream, future ones to the
    /// delayed set.
    pub async fn dispatch(&self, items: &[DispatchItem]) -> RedisResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.pipe_dispatch(&mut pipe, items.iter(), Utc::now());
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await
    }

    /// Adds the dispatch of `items` to `pipe` (replies ignored): each ready job to its priority
    /// stream, each future one to the delayed set, and named queues to the queue registry.
    pub fn pipe_dispatch<'a>(
        &self,
        pipe: &mut redis::Pipeline,
        items: impl Iterator<Item = &'a DispatchItem>,
        now: chrono::DateTime<Utc>,
    ) {
        let known = known_queues();
        let mut named: Vec<&str> = Vec::new();
        // ready jobs per queue: one fairness-aware dispatch script call each (`fair.rs`)
        let mut ready: Vec<(&str, Vec<&DispatchItem>)> = Vec::new();
        for it in items {
            match it.run_at {
                Some(t) if t > now => {
                    pipe.zadd(
                        self.keys.delayed(&it.queue),
                        delayed_member(it),
                        t.timestamp_millis(),
                    )
                    .ignore();
                }
                _ => match ready.iter_mut().find(|(q, _)| *q == it.queue.as_str()) {
                    Some((_, v)) => v.push(it),
                    None => ready.push((&it.queue, vec![it])),
                },
            }
            if !known.contains(&it.queue.as_str()) && !named.contains(&it.queue.as_str()) {
                named.push(&it.queue);
            }
        }
        for (queue, items) in ready {
            // loaded next to each call: on a cluster each queue's slot may be another node
            pipe.load_script(&self.dispatch_script).ignore();
            let mut inv = self.dispatch_script.prepare_invoke();
            inv.key(self.keys.fair(queue))
                .arg(self.keys.queue_base(queue))
                .arg(self.lane_depth);
            for it in items {
                inv.arg(it.priority.clamp(0, 9))
                    .arg(it.id.to_string())
                    .arg(it.tenant_id.to_string());
            }
            pipe.invoke_script(&inv).ignore();
        }
        // named queues become known to the scheduler and /metrics (one SADD per batch)
        if !named.is_empty() {
            pipe.sadd(self.keys.queues(), named).ignore();
        }
    }

    /// Drops the events of jobs that were pruned from Postgres.
    pub async fn forget_jobs(&self, ids: &[Uuid]) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.unlink(self.keys.events(*id))
                .ignore()
                .unlink(self.keys.event_meta(*id))
                .ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await
    }

    /// Replaces the queue's limits and tenant weights (`fair.rs`): `queue` (jobs of the queue in
    /// flight across all workers), `t:*` (a tenant's default), `t:<tenant>`, `w:<tenant>`.
    pub async fn set_limits(&self, queue: &str, entries: &[(String, u64)]) -> RedisResult<()> {
        let key = self.keys.limits(queue);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !entries.is_empty() {
            pipe.hset_multiple(&key, entries).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await
    }

    /// Reads up to `count` new entries of `queue` for `consumer`, highest priority first,
    /// within the queue's concurrency limit (see `fair.rs`); when there are none, waits up to
    /// `block` for the queue's bell and returns nothing (the caller fetches again).
    /// Use a connection of its own for this (a blocking read stalls other commands).
    pub async fn fetch(
        &self,
        conn: &mut RedisConn,
        queue: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> RedisResult<Vec<Delivery>> {
        let got = self.try_fetch(conn, queue, consumer, count).await?;
        if got.deliveries.is_empty() {
            self.wait_bell(conn, queue, &got.bell, block).await?;
        }
        Ok(got.deliveries)
    }

    /// [`Queue::fetch`] without the wait: the entries read, and the bell's id to wait on
    /// ([`Queue::wait_bell`]) when there were none. A worker waits without holding its slots,
    /// so that lease reclaim can use them meanwhile.
    pub async fn try_fetch(
        &self,
        conn: &mut RedisConn,
        queue: &str,
        consumer: &str,
        count: usize,
    ) -> RedisResult<Fetched> {
        let mut inv = self.fetch_script.prepare_invoke();
        inv.key(self.keys.fair(queue))
            .arg(self.keys.queue_base(queue))
            .arg(self.lane_depth)
            .arg(GROUP)
            .arg(consumer)
            .arg(count.max(1));
        let (bell, got): (String, Vec<(String, String, String, String)>) =
            inv.invoke_async(conn).await?;
        let deliveries = got
            .into_iter()
            .map(|(stream, id, job, tenant)| to_delivery(queue, &stream, &id, Some(job), tenant))
            .collect();
        Ok(Fetched { bell, deliveries })
    }

    /// Waits up to `block` for the queue's bell to ring after `bell` (the id a fetch that
    /// found nothing returned, read in the same step: nothing rung since is missed).
    pub async fn wait_bell(
        &self,
        conn: &mut RedisConn,
        queue: &str,
        bell: &str,
        block: Duration,
    ) -> RedisResult<()> {
        let opts = StreamReadOptions::default().block(block.as_millis() as usize);
        let _: Option<StreamReadReply> = conn
            .xread_options(&[self.keys.bell(queue)], &[bell], &opts)
            .await?;
        Ok(())
    }

    /// Removes a delivery for good (the job's state lives in Postgres).
    pub async fn ack(&self, d: &Delivery) -> RedisResult<()> {
        self.ack_many(&d.queue, &[d]).await.map(|_| ())
    }

    /// Removes many deliveries of one queue in one script call; per delivery, whether this
    /// call acknowledged it (false: it was already, or its stream lost its group). Safe to
    /// repeat: a repeated acknowledgement changes nothing.
    pub async fn ack_many(&self, queue: &str, ds: &[&Delivery]) -> RedisResult<Vec<bool>> {
        if ds.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let mut inv = self.ack_script.prepare_invoke();
        inv.key(self.keys.fair(queue))
            .arg(self.keys.queue_base(queue))
            .arg(self.lane_depth)
            .arg(GROUP);
        for d in ds {
            debug_assert_eq!(d.queue, queue);
            inv.arg(&d.stream).arg(&d.entry_id).arg(&d.tenant);
        }
        let acked: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(acked.into_iter().map(|n| n == 1).collect())
    }

    /// Parks a job until `run_at` (retry backoff).
    pub async fn delay(&self, item: &DispatchItem) -> RedisResult<()> {
        self.dispatch(std::slice::from_ref(item)).await
    }

    /// Takes a job out of its queue's delayed set (a cancelled delayed job: its member would
    /// stay until its due time, up to a year, and then take lane room to be fetched and
    /// dropped). Nothing happens if it is not there.
    pub async fn undelay(&self, item: &DispatchItem) -> RedisResult<()> {
        let mut c = self.conn.clone();
        c.zrem(self.keys.delayed(&item.queue), delayed_member(item))
            .await
    }

    /// Moves at most `limit` due jobs of `queue` from the delayed set to its streams.
    pub async fn move_due(&self, queue: &str, limit: usize) -> RedisResult<usize> {
        let mut c = self.conn.clone();
        let n: usize = self
            .move_due_script
            .key(self.keys.delayed(queue))
            .arg(self.keys.queue_base(queue))
            .arg(self.lane_depth)
            .arg(Utc::now().timestamp_millis())
            .arg(limit)
            .invoke_async(&mut c)
            .await?;
        Ok(n)
    }

    /// Entries in the streams of `queue` (waiting + in flight) and in its delayed set.
    pub async fn depth(&self, queue: &str) -> RedisResult<(u64, u64)> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for p in PRIORITIES {
            pipe.xlen(self.keys.stream(queue, p));
        }
        pipe.zcard(self.keys.delayed(queue));
        let v: Vec<u64> = pipe.query_async(&mut c).await?;
        let delayed = v.last().copied().unwrap_or(0);
        let streams: u64 = v[..v.len().saturating_sub(1)].iter().sum();
        Ok((streams, delayed))
    }

    /// Entries Redis holds for `queue`'s jobs: its streams (waiting and delivered), its
    /// tenants' lanes and its delayed set. (A slot that lost some writes, not all: a replica
    /// promoted before it had them, holds fewer than Postgres says it should.)
    pub async fn held(&self, queue: &str) -> RedisResult<u64> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for p in PRIORITIES {
            pipe.xlen(self.keys.stream(queue, p));
        }
        let fair = self.keys.fair(queue);
        for p in PRIORITIES {
            pipe.hget(&fair, format!("ov{p}"));
        }
        pipe.zcard(self.keys.delayed(queue));
        let v: Vec<Option<i64>> = pipe.query_async(&mut c).await?;
        Ok(v.into_iter().flatten().map(|n| n.max(0) as u64).sum())
    }

    /// Drops `queue`'s epoch mark: the next epoch check takes the queue's data for lost and
    /// starts a new epoch (every unfinished job dispatched again from Postgres).
    pub async fn forget_queue_epoch(&self, queue: &str) -> RedisResult<()> {
        let mut c = self.conn.clone();
        c.del(self.keys.queue_epoch(queue)).await
    }

    /// Per priority of `queue`: the backlog (entries not yet delivered to any worker: the
    /// group's `lag`; `None` when Redis cannot tell) and the entries in flight (delivered, not
    /// acknowledged). Streams without the group are left out.
    pub async fn backlog(&self, queue: &str) -> RedisResult<Vec<(i16, Option<u64>, u64)>> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for p in PRIORITIES {
            pipe.xlen(self.keys.stream(queue, p));
        }
        let lens: Vec<u64> = pipe.query_async(&mut c).await?;
        // XINFO fails on a missing stream: ask only about non-empty ones
        let busy: Vec<(i16, u64)> = PRIORITIES
            .iter()
            .zip(&lens)
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| (*p, *n))
            .collect();
        let mut pipe = redis::pipe();
        for (p, _) in &busy {
            pipe.cmd("XINFO")
                .arg("GROUPS")
                .arg(self.keys.stream(queue, *p));
        }
        let replies: Vec<Value> = if busy.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut c).await?
        };
        let mut out: Vec<(i16, Option<u64>, u64)> = PRIORITIES
            .iter()
            .zip(&lens)
            .filter(|(_, n)| **n == 0)
            .map(|(p, _)| (*p, Some(0), 0))
            .collect();
        for ((p, len), reply) in busy.iter().zip(replies) {
            let Value::Array(groups) = reply else {
                continue;
            };
            // no worker has served this queue yet: everything in it is backlog
            let before = out.len();
            for g in groups {
                let fields = crate::consumers::info_fields(g);
                let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                let is_ours =
                    matches!(get("name"), Some(Value::BulkString(n)) if n == GROUP.as_bytes());
                if !is_ours {
                    continue;
                }
                let num = |name: &str| {
                    crate::consumers::int_field(&fields, name).map(|n| n.max(0) as u64)
                };
                out.push((*p, num("lag"), num("pending").unwrap_or(0)));
            }
            if out.len() == before {
                out.push((*p, Some(*len), 0));
            }
        }
        // jobs waiting in tenants' overflow lanes are backlog too
        let fields: Vec<String> = PRIORITIES.iter().map(|p| format!("ov{p}")).collect();
        let over: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(self.keys.fair(queue))
            .arg(&fields)
            .query_async(&mut c)
            .await?;
        for (p, n) in PRIORITIES.iter().zip(over) {
            let n = n.unwrap_or(0);
            if n == 0 {
                continue;
            }
            match out.iter_mut().find(|r| r.0 == *p) {
                Some(r) => r.1 = Some(r.1.unwrap_or(0) + n),
                None => out.push((*p, Some(n), 0)),
            }
        }
        out.sort_unstable_by_key(|r| r.0);
        Ok(out)
    }

    /// Counts reclaimed deliveries (a worker took over an expired lease) per queue.
    pub async fn count_reclaims(&self, queue: &str, n: u64) -> RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("HINCRBY")
            .arg(self.keys.reclaims())
            .arg(queue)
            .arg(n)
            .query_async::<()>(&mut c)
            .await
    }

    /// Reclaimed deliveries per queue since Redis started.
    pub async fn reclaims(&self) -> RedisResult<Vec<(String, i64)>> {
        let mut c = self.conn.clone();
        redis::cmd("HGETALL")
            .arg(self.keys.reclaims())
            .query_async(&mut c)
            .await
    }

    /// The LLM response cache's counters (`hits`, `misses`, `shared`), cluster-wide.
    pub async fn llm_cache_stats(&self) -> RedisResult<Vec<(String, i64)>> {
        let mut c = self.conn.clone();
        redis::cmd("HGETALL")
            .arg(self.keys.llm_cache_stats())
            .query_async(&mut c)
            .await
    }

    /// `code.exec` counters and the warm-pool reports of the workers.
    pub async fn code_stats(&self) -> RedisResult<(Vec<(String, i64)>, Vec<(String, String)>)> {
        let mut c = self.conn.clone();
        redis::pipe()
            .cmd("HGETALL")
            .arg(self.keys.code_stats())
            .cmd("HGETALL")
            .arg(self.keys.code_pool())
            .query_async(&mut c)
            .await
    }

    /// Deletes warm-pool reports (fields of the `code_pool` hash) that went stale.
    pub async fn forget_code_pool_reports(&self, fields: &[String]) -> RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("HDEL")
            .arg(self.keys.code_pool())
            .arg(fields)
            .query_async(&mut c)
            .await
    }

    /// The current epoch, or `None` if Redis lost it (fresh or flushed Redis).
    pub async fn epoch(&self) -> RedisResult<Option<i64>> {
        let mut c = self.conn.clone();
        c.get(self.keys.epoch()).await
    }

    pub async fn set_epoch(&self, epoch: i64) -> RedisResult<()> {
        let mut c = self.conn.clone();
        c.set(self.keys.epoch(), epoch).await
    }

    /// Announces a cancel request to the workers.
    pub async fn notify_cancel(&self, job: Uuid) -> RedisResult<()> {
        let mut c = self.conn.clone();
        c.publish(self.keys.cancel_channel(), job.to_string()).await
    }

    /// Tells every API replica that credentials or tenant settings changed (a key revoked):
    /// they drop their cached credential lookups now.
    pub async fn announce_credentials_change(&self) -> RedisResult<()> {
        let mut c = self.conn.clone();
        c.publish(self.keys.credentials_channel(), "changed").await
    }

    pub async fn ping(&self) -> RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut c).await
    }
}

/// A job's member in its queue's delayed set (`<id>:<tenant>:<priority>`, score = run_at ms).
/// What one [`Queue::try_fetch`] read.
#[derive(Debug)]
pub struct Fetched {
    /// The queue's bell id when the entries were read.
    pub bell: String,
    pub deliveries: Vec<Delivery>,
}

pub fn delayed_member(it: &DispatchItem) -> String {
    format!("{}:{}:{}", it.id, it.tenant_id, it.priority.clamp(0, 9))
}

pub(crate) fn field(fields: &[Value], name: &str) -> Option<String> {
    fields.chunks(2).find_map(|kv| match kv {
        [Value::BulkString(k), Value::BulkString(v)] if k == name.as_bytes() => {
            Some(String::from_utf8_lossy(v).into_owned())
        }
        _ => None,
    })
}

pub(crate) fn to_delivery(
    queue: &str,
    stream: &str,
    id: &str,
    job: Option<String>,
    tenant: String,
) -> Delivery {
    Delivery {
        reclaimed: false,
        tenant,
        queue: queue.to_string(),
        stream: stream.to_string(),
        entry_id: id.to_string(),
        job_id: job
            .and_then(|j| Uuid::parse_str(&j).ok())
            .unwrap_or(Uuid::nil()),
    }
}
