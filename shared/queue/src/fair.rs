//! Fairness and concurrency limits inside a queue's hash slot (Lua).
//!
//! Each tenant may have at most `K × weight` undelivered entries in a queue's priority streams
//! (`qa:<tenant>` in `{P:q:<queue>}:fair`); what exceeds it waits in the tenant's overflow
//! lanes (`{P:q:<queue>}:t:<tenant>:p<prio>`, lists) and moves into the stream, highest
//! priority first, as the tenant's entries are delivered. A newcomer's job therefore lands
//! behind at most `K × weight` entries of each other busy tenant, whatever their backlog.
//! The same move also enforces concurrency limits across every worker: a tenant's undelivered
//! plus in-flight entries (`r:<tenant>`, counted from delivery to acknowledgement) stay under
//! its limit, and a fetch takes no more than the queue's own limit minus what is in flight
//! (`r:*`). Limits and weights are in `{P:q:<queue>}:limits` (written by the scheduler from
//! Postgres and the configuration). Every counter changes only inside these scripts, in the
//! same atomic step as the stream or list operation it counts, so they cannot drift; losing
//! Redis loses them together with the streams (the reconciler re-dispatches everything).
//! Idle workers wait on `{P:q:<queue>}:bell`, a one-entry stream rung whenever entries move
//! into a stream.

/// Default `K`: undelivered entries one tenant (of weight 1) may have in a queue's streams.
pub const DEFAULT_LANE_DEPTH: u64 = 256;

/// Shared Lua functions. `B` is the queue's key base `{P:q:<queue>}`, `K` the lane depth.
pub(crate) const PRELUDE: &str = r#"
local function num(v) return tonumber(v) or 0 end
local B, K = ARGV[1], tonumber(ARGV[2])
local F, L = B .. ':fair', B .. ':limits'
local function room(t)
  local w = num(redis.call('HGET', L, 'w:' .. t))
  if w <= 0 then w = 1 end
  local qa = num(redis.call('HGET', F, 'qa:' .. t))
  if qa >= K * w then return false end
  local lim = num(redis.call('HGET', L, 't:' .. t))
  if lim == 0 then lim = num(redis.call('HGET', L, 't:*')) end
  if lim > 0 and qa + num(redis.call('HGET', F, 'r:' .. t)) >= lim then return false end
  return true
end
local function push(p, job, t)
  redis.call('XADD', B .. ':p' .. p, '*', 'job', job, 't', t)
  redis.call('HINCRBY', F, 'qa:' .. t, 1)
end
local function refill(t)
  local moved = 0
  while num(redis.call('HGET', F, 'o:' .. t)) > 0 and room(t) do
    local got = false
    for p = 9, 0, -1 do
      local job = redis.call('LPOP', B .. ':t:' .. t .. ':p' .. p)
      if job then
        push(p, job, t)
        redis.call('HINCRBY', F, 'o:' .. t, -1)
        redis.call('HINCRBY', F, 'ov' .. p, -1)
        got = true
        moved = moved + 1
        break
      end
    end
    if not got then
      redis.call('HDEL', F, 'o:' .. t)
      break
    end
  end
  if num(redis.call('HGET', F, 'o:' .. t)) <= 0 then redis.call('HDEL', F, 'o:' .. t) end
  return moved
end
local function dispatch(p, job, t)
  if num(redis.call('HGET', F, 'o:' .. t)) == 0 and room(t) then
    push(p, job, t)
    return 1
  end
  redis.call('RPUSH', B .. ':t:' .. t .. ':p' .. p, job)
  redis.call('HINCRBY', F, 'o:' .. t, 1)
  redis.call('HINCRBY', F, 'ov' .. p, 1)
  return 0
end
local function ring() redis.call('XADD', B .. ':bell', 'MAXLEN', '1', '*', 'b', '1') end
local function dec(field)
  if redis.call('HINCRBY', F, field, -1) <= 0 then redis.call('HDEL', F, field) end
end
"#;

/// KEYS[1] = the fair hash (routes the call); ARGV: B, K, then (priority, job, tenant) triples.
pub(crate) const DISPATCH: &str = r#"
for i = 3, #ARGV, 3 do dispatch(tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]) end
ring()
return 1
"#;

/// KEYS[1] = the fair hash; ARGV: B, K, group, consumer, count. Takes up to `count` entries,
/// highest priority first, within the queue's limit; returns {bell id, {stream, id, job,
/// tenant}...}.
pub(crate) const FETCH: &str = r#"
local want = tonumber(ARGV[5])
local G = num(redis.call('HGET', L, 'queue'))
if G > 0 then want = math.min(want, G - num(redis.call('HGET', F, 'r:*'))) end
local out, touched = {}, {}
for p = 9, 0, -1 do
  if want <= 0 then break end
  local k = B .. ':p' .. p
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', want, 'STREAMS', k, '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      local job, t = '', ''
      local f = e[2]
      for i = 1, #f, 2 do
        if f[i] == 'job' then job = f[i + 1] elseif f[i] == 't' then t = f[i + 1] end
      end
      table.insert(out, {k, e[1], job, t})
      want = want - 1
      dec('qa:' .. t)
      redis.call('HINCRBY', F, 'r:' .. t, 1)
      redis.call('HINCRBY', F, 'r:*', 1)
      touched[t] = true
    end
  end
end
local moved = 0
for t, _ in pairs(touched) do moved = moved + refill(t) end
if moved > 0 then ring() end
local bell = redis.call('XREVRANGE', B .. ':bell', '+', '-', 'COUNT', 1)
local bid = '0-0'
if #bell > 0 then bid = bell[1][1] end
return {bid, out}
"#;

/// KEYS[1] = the entry's stream; ARGV: B, K, group, entry id, tenant. Acknowledges and
/// deletes the entry; the first acknowledgement frees the tenant's (and the queue's) slot.
pub(crate) const ACK: &str = r#"
local n = redis.call('XACK', KEYS[1], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[1], ARGV[4])
if n == 1 then
  local t = ARGV[5]
  dec('r:' .. t)
  dec('r:*')
  local moved = refill(t)
  if moved > 0 or num(redis.call('HGET', L, 'queue')) > 0 then ring() end
end
return n
"#;

/// KEYS[1] = the delayed zset; ARGV: B, K, now ms, max items. Dispatches at most `max` due
/// members (`<job>:<tenant>:<prio>`) like new jobs.
pub(crate) const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, m in ipairs(due) do
  local id, tenant, prio = string.match(m, '^([^:]+):([^:]*):(%d+)$')
  if id then dispatch(math.min(tonumber(prio), 9), id, tenant) end
  redis.call('ZREM', KEYS[1], m)
end
if #due > 0 then ring() end
return #due
"#;

/// A script: the prelude, then `body`.
pub(crate) fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}\n{body}"))
}
