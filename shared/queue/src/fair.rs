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
-- how many more undelivered entries tenant t may have in the streams now
local function room(t)
  local w = num(redis.call('HGET', L, 'w:' .. t))
  if w <= 0 then w = 1 end
  local qa = num(redis.call('HGET', F, 'qa:' .. t))
  local n = K * w - qa
  if n <= 0 then return 0 end
  local lim = num(redis.call('HGET', L, 't:' .. t))
  if lim == 0 then lim = num(redis.call('HGET', L, 't:*')) end
  if lim > 0 then n = math.min(n, lim - qa - num(redis.call('HGET', F, 'r:' .. t))) end
  return n
end
-- moves as many of t's waiting jobs into the streams as it has room for, highest priority
-- first, popping each lane in bulk
local function refill(t)
  local o = num(redis.call('HGET', F, 'o:' .. t))
  if o <= 0 then
    if o < 0 then redis.call('HDEL', F, 'o:' .. t) end
    return 0
  end
  local n = math.min(room(t), o)
  local moved, p = 0, 9
  while n > 0 and p >= 0 do
    local jobs = redis.call('LPOP', B .. ':t:' .. t .. ':p' .. p, n)
    if jobs then
      for _, job in ipairs(jobs) do redis.call('XADD', B .. ':p' .. p, '*', 'job', job, 't', t) end
      redis.call('HINCRBY', F, 'ov' .. p, -#jobs)
      moved = moved + #jobs
      n = n - #jobs
    end
    -- fewer than asked: this lane is empty now
    if n > 0 then p = p - 1 end
  end
  if moved > 0 then redis.call('HINCRBY', F, 'qa:' .. t, moved) end
  -- p < 0: every lane was empty (the count had drifted)
  if p < 0 or o - moved <= 0 then
    redis.call('HDEL', F, 'o:' .. t)
  elseif moved > 0 then
    redis.call('HINCRBY', F, 'o:' .. t, -moved)
  end
  return moved
end
-- dispatches jobs one by one: into the stream while the tenant has room and nothing waiting,
-- else into its lane; remembers each tenant's room for the rest of the call
local function dispatcher()
  local left = {}
  return function(p, job, t)
    if left[t] == nil then
      left[t] = 0
      if num(redis.call('HGET', F, 'o:' .. t)) == 0 then left[t] = room(t) end
    end
    if left[t] > 0 then
      redis.call('XADD', B .. ':p' .. p, '*', 'job', job, 't', t)
      redis.call('HINCRBY', F, 'qa:' .. t, 1)
      left[t] = left[t] - 1
      return 1
    end
    redis.call('RPUSH', B .. ':t:' .. t .. ':p' .. p, job)
    redis.call('HINCRBY', F, 'o:' .. t, 1)
    redis.call('HINCRBY', F, 'ov' .. p, 1)
    return 0
  end
end
local function ring() redis.call('XADD', B .. ':bell', 'MAXLEN', '1', '*', 'b', '1') end
"#;

/// KEYS[1] = the fair hash (routes the call); ARGV: B, K, then (priority, job, tenant) triples.
pub(crate) const DISPATCH: &str = r#"
local dispatch = dispatcher()
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
local out, got, total = {}, {}, 0
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
      got[t] = (got[t] or 0) + 1
      total = total + 1
    end
  end
end
-- the delivered entries leave their tenants' undelivered counts and join the in-flight ones
for t, c in pairs(got) do
  if redis.call('HINCRBY', F, 'qa:' .. t, -c) <= 0 then redis.call('HDEL', F, 'qa:' .. t) end
  redis.call('HINCRBY', F, 'r:' .. t, c)
end
if total > 0 then redis.call('HINCRBY', F, 'r:*', total) end
local moved = 0
for t, _ in pairs(got) do moved = moved + refill(t) end
if moved > 0 then ring() end
local bell = redis.call('XREVRANGE', B .. ':bell', '+', '-', 'COUNT', 1)
local bid = '0-0'
if #bell > 0 then bid = bell[1][1] end
return {bid, out}
"#;

/// KEYS[1] = the fair hash; ARGV: B, K, group, then (stream, entry id, tenant) triples of
/// entries in this queue's streams. Acknowledges and deletes each entry; the first
/// acknowledgement of an entry frees its tenant's (and the queue's) slot, and each freed
/// tenant's waiting jobs move up once. Returns 1 or 0 per entry (acknowledged now, or
/// already). An error on one entry (its stream lost its group) counts as 0: counters change
/// only for what was acknowledged.
pub(crate) const ACK_MANY: &str = r#"
local freed, total, acked = {}, 0, {}
for i = 4, #ARGV, 3 do
  local s, id, t = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local n = redis.pcall('XACK', s, ARGV[3], id)
  if type(n) ~= 'number' then n = 0 end
  redis.pcall('XDEL', s, id)
  if n == 1 then
    freed[t] = (freed[t] or 0) + 1
    total = total + 1
  end
  table.insert(acked, n)
end
if total > 0 then
  -- every slot is given back before any job moves up (a script is not rolled back on error)
  if redis.call('HINCRBY', F, 'r:*', -total) <= 0 then redis.call('HDEL', F, 'r:*') end
  for t, c in pairs(freed) do
    if redis.call('HINCRBY', F, 'r:' .. t, -c) <= 0 then redis.call('HDEL', F, 'r:' .. t) end
  end
  local moved = 0
  for t, _ in pairs(freed) do moved = moved + refill(t) end
  if moved > 0 or num(redis.call('HGET', L, 'queue')) > 0 then ring() end
end
return acked
"#;

/// KEYS[1] = the delayed zset; ARGV: B, K, now ms, max items. Dispatches at most `max` due
/// members (`<job>:<tenant>:<prio>`) like new jobs.
pub(crate) const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
local dispatch = dispatcher()
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
