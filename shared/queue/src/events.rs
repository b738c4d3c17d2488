//! Live job events in Redis: one stream per job (entry id `<seq>-0`), fenced by attempt, plus a
//! pub/sub notification per event. The final state of a job is in Postgres, not here.

use std::sync::Arc;
use std::time::Duration;

use crate::RedisConn;
use redis::{RedisResult, Script, Value};
use switchyard_core::Event;
use uuid::Uuid;

use crate::keys::Keys;

/// Result of publishing an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Ok,
    /// A newer attempt owns the job: the publisher is stale and must stop.
    Fenced,
    /// The seq is below the last one in the stream (out of order).
    Stale,
}

// KEYS: ev stream, meta hash. ARGV: attempt, seq, payload, channel, ttl_s, terminal (1/0).
// Returns 1 (published), 2 (this seq is already the stream's last entry: a retried publish that
// had gone through), -1 (fenced) or -2 (stale). The keys' time to live is set by the first
// event of an attempt (here or by BEGIN_PUBLISH_LUA), by the terminal one and by an event that
// creates the stream: the events in between (an LLM's deltas, most of a stream) skip the two
// EXPIREs.
const PUBLISH_LUA: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[2], 'attempt') or '0')
local att = tonumber(ARGV[1])
if att < cur then return -1 end
local refresh = att > cur or ARGV[6] == '1'
if att > cur then
  redis.call('HSET', KEYS[2], 'attempt', att)
  -- the run's earlier events are gone (Redis lost them, or they expired): the stream starts
  -- again at this seq, and a reader behind it has a gap that no history can fill
  if cur == 0 and tonumber(ARGV[2]) > 1 and redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[2], 'base', ARGV[2])
  end
end
-- a stream gone mid-attempt (lost, deleted) is created again here: with a time to live
if not refresh and redis.call('EXISTS', KEYS[1]) == 0 then refresh = true end
local r = redis.pcall('XADD', KEYS[1], ARGV[2] .. '-0', 'e', ARGV[3])
if type(r) == 'table' and r.err then
  local l = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  -- the same event again (a retry whose first reply was lost); another event under this seq
  -- (a begin whose reply was lost numbered one already) is stale: it goes after the head
  if #l > 0 and l[1][1] == ARGV[2] .. '-0' and l[1][2][2] == ARGV[3] then return 2 end
  return -2
end
redis.call('PUBLISH', ARGV[4], ARGV[3])
if refresh then
  local ttl = tonumber(ARGV[5])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"#;

// KEYS: ev stream, meta hash. ARGV: attempt, ttl. Returns last seq, or -1 if fenced.
const BEGIN_LUA: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[2], 'attempt') or '0')
local att = tonumber(ARGV[1])
if att < cur then return -1 end
redis.call('HSET', KEYS[2], 'attempt', att)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return 0 end
local ms = string.match(last[1][1], '^(%d+)-')
return tonumber(ms)
"#;

// Starts an attempt and publishes its first event in one round trip: fences older attempts,
// numbers the event after the highest seq in the stream (or ARGV[2], Postgres' durable seq),
// and returns that seq (-1 if a newer attempt owns the job). A stream that is gone starts
// again at that seq plus ARGV[7] (the gap: see `LOST_GAP`), which its meta hash keeps as
// `base`.
// KEYS: ev stream, meta hash. ARGV: attempt, durable seq, payload head, payload tail, channel,
// ttl, gap
const BEGIN_PUBLISH_LUA: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[2], 'attempt') or '0')
local att = tonumber(ARGV[1])
if att < cur then return -1 end
redis.call('HSET', KEYS[2], 'attempt', att)
local last = 0
local l = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #l > 0 then last = tonumber(string.match(l[1][1], '^(%d+)-')) end
local seq = math.max(last, tonumber(ARGV[2])) + 1
if #l == 0 then
  seq = seq + tonumber(ARGV[7])
  -- (a base of 2 resets no reader: a first run whose `queued` event was never written, as
  -- every job the reconciler dispatched, skips the write)
  if seq > 2 then redis.call('HSET', KEYS[2], 'base', string.format('%d', seq)) end
end
local payload = ARGV[3] .. string.format('%d', seq) .. ARGV[4]
redis.call('XADD', KEYS[1], string.format('%d', seq) .. '-0', 'e', payload)
redis.call('PUBLISH', ARGV[5], payload)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
return seq
"#;

/// How long a job's stream and meta hash live while the job is unfinished.
pub const LIVE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Adds to `pipe` the owner of `job` (its tenant and creator) in its meta hash, which
/// [`EventBus::owner`] reads: a follow of the job is then authorized without Postgres.
pub fn pipe_owner(pipe: &mut redis::Pipeline, keys: &Keys, job: Uuid, tenant: Uuid, creator: &str) {
    let meta = keys.event_meta(job);
    pipe.hset_multiple(
        &meta,
        &[("t", tenant.to_string()), ("c", creator.to_string())],
    )
    .ignore();
    pipe.expire(&meta, LIVE_TTL.as_secs() as i64).ignore();
}

fn payload(ev: &Event) -> RedisResult<String> {
    serde_json::to_string(ev).map_err(|e| {
        redis::RedisError::from((redis::ErrorKind::TypeError, "event json", e.to_string()))
    })
}

fn published(r: i64) -> Published {
    match r {
        1 | 2 => Published::Ok,
        -1 => Published::Fenced,
        _ => Published::Stale,
    }
}

/// Placeholder seq used to split an event's JSON around its seq (filled in by Redis).
const SEQ_PLACEHOLDER: u64 = 9_007_199_254_740_991;

/// How far a new attempt's numbering jumps when it finds its job's stream gone although an
/// earlier attempt ran (Redis lost the data): past every seq the lost stream can have held
/// (Postgres' durable seq lags the deltas a run streamed), so that a client's `after` from the
/// lost stream never names an event of the new one, and its feed can tell it to start over
/// (`reset`) instead of splicing two attempts' output.
pub const LOST_GAP: u64 = 1_000_000_000;

/// What `read` found of a job's event history.
#[derive(Debug, Clone)]
pub struct History {
    pub events: Vec<Event>,
    /// Whether the job's event stream exists at all (absent: expired or lost).
    pub exists: bool,
    /// The stream was written anew from this seq after its earlier events were lost (0: it
    /// holds the job's events from the start). A reader that saw events before `base - 1`
    /// cannot be brought up to date from it.
    pub base: u64,
}

#[derive(Clone)]
pub struct EventBus {
    keys: Keys,
    conn: RedisConn,
    publish_script: Arc<Script>,
    begin_script: Arc<Script>,
    begin_publish_script: Arc<Script>,
    /// TTL of a live (unfinished) job's stream, refreshed by every event.
    live_ttl: Duration,
    /// TTL after the terminal event.
    done_ttl: Duration,
}

impl EventBus {
    pub fn new(keys: Keys, conn: RedisConn, done_ttl: Duration) -> EventBus {
        EventBus {
            keys,
            conn,
            publish_script: Arc::new(Script::new(PUBLISH_LUA)),
            begin_script: Arc::new(Script::new(BEGIN_LUA)),
            begin_publish_script: Arc::new(Script::new(BEGIN_PUBLISH_LUA)),
            live_ttl: LIVE_TTL,
            done_ttl,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Registers `attempt` as the job's current run (fencing out older ones) and returns the
    /// highest seq already in the stream (0 if none), so the run continues numbering from there.
    pub async fn begin_attempt(&self, job: Uuid, attempt: i32) -> RedisResult<Option<u64>> {
        let mut c = self.conn.clone();
        let last: i64 = self
            .begin_script
            .key(self.keys.events(job))
            .key(self.keys.event_meta(job))
            .arg(attempt)
            .arg(self.live_ttl.as_secs())
            .invoke_async(&mut c)
            .await?;
        Ok(if last < 0 { None } else { Some(last as u64) })
    }

    /// [`EventBus::begin_attempt`] and the publication of `first` (whose `seq` is ignored) in
    /// one round trip: `first` gets seq = max(last seq in the stream, `durable_seq`) + 1, which
    /// is returned; `None` if a newer attempt owns the job.
    /// A later attempt (`first.attempt > 1`) that finds the stream gone numbers from
    /// `durable_seq + LOST_GAP + 1` ([`LOST_GAP`]).
    pub async fn begin_attempt_with(
        &self,
        first: &Event,
        durable_seq: u64,
    ) -> RedisResult<Option<u64>> {
        let gap = if first.attempt > 1 { LOST_GAP } else { 0 };
        self.publish_numbered(first, durable_seq, gap).await
    }

    /// Publishes `ev` (whose `seq` is ignored) numbered after both the stream's last event and
    /// `durable_seq`, for an event written by someone other than the run that streamed (a job
    /// finalized after its worker died mid-stream, a retry): Postgres' seq may lag the events
    /// that run published, and an event numbered below them would be refused as stale. Returns
    /// the seq given, `None` if a newer attempt owns the job.
    pub async fn publish_after(&self, ev: &Event, durable_seq: u64) -> RedisResult<Option<u64>> {
        self.publish_numbered(ev, durable_seq, 0).await
    }

    async fn publish_numbered(
        &self,
        ev: &Event,
        durable_seq: u64,
        gap: u64,
    ) -> RedisResult<Option<u64>> {
        let ttl = if ev.is_terminal() {
            self.done_ttl
        } else {
            self.live_ttl
        };
        let mut ev = ev.clone();
        ev.seq = SEQ_PLACEHOLDER;
        let json = serde_json::to_string(&ev).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::TypeError, "event json", e.to_string()))
        })?;
        let marker = format!("\"seq\":{SEQ_PLACEHOLDER}");
        let at = json.find(&marker).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "event json",
                "no seq".to_string(),
            ))
        })?;
        let head = &json[..at + "\"seq\":".len()];
        let tail = &json[at + marker.len()..];
        let mut c = self.conn.clone();
        let seq: i64 = self
            .begin_publish_script
            .key(self.keys.events(ev.job_id))
            .key(self.keys.event_meta(ev.job_id))
            .arg(ev.attempt)
            .arg(durable_seq)
            .arg(head)
            .arg(tail)
            .arg(self.keys.event_channel(ev.job_id))
            .arg(ttl.as_secs().max(1))
            .arg(gap)
            .invoke_async(&mut c)
            .await?;
        Ok(if seq < 0 { None } else { Some(seq as u64) })
    }

    /// Appends an event and notifies live subscribers, unless a newer attempt owns the job.
    /// Publishing the same event again is harmless (answered `Ok`, nothing sent twice).
    pub async fn publish(&self, ev: &Event) -> RedisResult<Published> {
        let payload = payload(ev)?;
        let mut inv = self.publish_script.prepare_invoke();
        self.publish_args(&mut inv, ev, payload);
        let mut c = self.conn.clone();
        let r: i64 = inv.invoke_async(&mut c).await?;
        Ok(published(r))
    }

    /// Publishes events of several jobs (at most one per job) in one pipeline: one round trip
    /// for a burst of streaming jobs. Answers per event, in order. If the pipeline fails as a
    /// whole (the script is not loaded on a node, a connection broke), each event is published
    /// on its own, which is safe for those that had gone through (see [`EventBus::publish`]).
    pub async fn publish_many(&self, evs: &[Event]) -> Vec<RedisResult<Published>> {
        if evs.len() == 1 {
            return vec![self.publish(&evs[0]).await];
        }
        let mut pipe = redis::pipe();
        let mut ok = true;
        for ev in evs {
            match payload(ev) {
                Ok(p) => {
                    let mut inv = self.publish_script.prepare_invoke();
                    self.publish_args(&mut inv, ev, p);
                    pipe.invoke_script(&inv);
                }
                Err(_) => ok = false,
            }
        }
        if ok {
            let mut c = self.conn.clone();
            if let Ok(rs) = pipe.query_async::<Vec<i64>>(&mut c).await {
                if rs.len() == evs.len() {
                    return rs.into_iter().map(|r| Ok(published(r))).collect();
                }
            }
        }
        let mut out = Vec::with_capacity(evs.len());
        for ev in evs {
            out.push(self.publish(ev).await);
        }
        out
    }

    fn publish_args(&self, inv: &mut redis::ScriptInvocation<'_>, ev: &Event, payload: String) {
        let ttl = if ev.is_terminal() {
            self.done_ttl
        } else {
            self.live_ttl
        };
        inv.key(self.keys.events(ev.job_id))
            .key(self.keys.event_meta(ev.job_id))
            .arg(ev.attempt)
            .arg(ev.seq)
            .arg(payload)
            .arg(self.keys.event_channel(ev.job_id))
            .arg(ttl.as_secs().max(1))
            .arg(u8::from(ev.is_terminal()));
    }

    /// The tenant and creator a job's events were opened for (recorded by the API beside
    /// the job's INSERT, or when it dispatched it), while its stream exists or no run of it
    /// has begun (the API's dispatch is still to write the stream); `None` otherwise (a job
    /// dispatched by the reconciler or a schedule; a stream expired or lost after a run
    /// began, when the job may have ended: its row says how).
    pub async fn owner(&self, job: Uuid) -> RedisResult<Option<(Uuid, String)>> {
        let mut c = self.conn.clone();
        let meta = self.keys.event_meta(job);
        type Owner = ((Option<String>, Option<String>, Option<String>), bool);
        let ((tenant, creator, attempt), exists): Owner = redis::pipe()
            .hget(&meta, &["t", "c", "attempt"])
            .exists(self.keys.events(job))
            .query_async(&mut c)
            .await?;
        let current = exists || attempt.is_none();
        Ok(match (tenant.and_then(|t| t.parse().ok()), creator) {
            (Some(t), Some(c)) if current => Some((t, c)),
            _ => None,
        })
    }

    /// Events with seq > `after`, at most `limit`, in order.
    pub async fn read(&self, job: Uuid, after: u64, limit: usize) -> RedisResult<History> {
        let mut c = self.conn.clone();
        let key = self.keys.events(job);
        let (raw, exists, base): (Value, bool, Option<u64>) = redis::pipe()
            .cmd("XRANGE")
            .arg(&key)
            .arg(format!("{}-0", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .exists(&key)
            .hget(self.keys.event_meta(job), "base")
            .query_async(&mut c)
            .await?;
        let mut events = Vec::new();
        if let Value::Array(entries) = raw {
            for e in entries {
                let Value::Array(pair) = e else { continue };
                let Some(Value::Array(fields)) = pair.get(1) else {
                    continue;
                };
                for kv in fields.chunks(2) {
                    if let [Value::BulkString(k), Value::BulkString(v)] = kv {
                        if k == b"e" {
                            if let Ok(ev) = serde_json::from_slice::<Event>(v) {
                                events.push(ev);
                            }
                        }
                    }
                }
            }
        }
        Ok(History {
            events,
            exists,
            base: base.unwrap_or(0),
        })
    }
}
