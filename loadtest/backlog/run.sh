#!/usr/bin/env bash
# Backlog benchmark: N committed-but-never-dispatched jobs (the reconciler's worst case: an API
# that died after its commits, or Redis that lost everything), DELAYED of them due at once after
# a wait, then a worker draining with the backlog in place. Prints dispatch rate, delayed-move
# rate and worker throughput per window (flat = no per-job cost grows with the backlog).
#
# usage: loadtest/backlog/run.sh [N=1000000] [DELAYED=200000] [DRAIN_S=60]
# needs: a release build (cargo build --release), psql, redis-cli, Postgres and Redis running.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-1000000}
DELAYED=${2:-200000}
DRAIN_S=${3:-60}
BIN=./target/release/switchyard
[ -x "$BIN" ] || { echo "build first: cargo build --release -p switchyard" >&2; exit 1; }
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
DB=sy_backlog_bench
export DATABASE_URL=$PGBASE/$DB
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PREFIX=bench$$
export SWITCHYARD_REDIS_PREFIX=$PREFIX SWITCHYARD_ENABLE_NOOP=true SWITCHYARD_LOG=warn
STREAM="{$PREFIX:q:system}:p0"
ZSET="{$PREFIX:q:system}:delayed"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -u "$REDIS_URL" --scan --pattern "*$PREFIX*" | xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null
  psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
}
trap cleanup EXIT
now() { date +%s.%N; }
q() { psql "$DATABASE_URL" -qtAc "$1"; }

psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PGBASE/postgres" -qc "CREATE DATABASE $DB" >/dev/null
$BIN migrate >/dev/null
T=$(q "INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'bench') RETURNING id")
LANE="{$PREFIX:q:system}:t:$T:p0" # the tenant's fairness lane (beyond queue_lane_depth)
echo "inserting $N jobs ($DELAYED of them due in 150 s) straight into Postgres, never dispatched..."
t0=$(now)
q "INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, max_attempts, input, created_at, run_at, event_seq)
   SELECT gen_random_uuid(), '$T', 'bench', 'system.noop', 'system', 'queued', 3, '{}'::jsonb,
          now() - interval '1 minute', CASE WHEN g <= $DELAYED THEN now() + interval '150 seconds' END, 1
   FROM generate_series(1, $N) g" >/dev/null
q "ANALYZE jobs" >/dev/null
echo "  inserted in $(echo "$(now) - $t0" | bc) s"

echo "scheduler: re-dispatching the backlog from Postgres into Redis..."
$BIN scheduler & PIDS+=($!)
t0=$(now)
while :; do
  s=$(( $(redis-cli -u "$REDIS_URL" xlen "$STREAM") + $(redis-cli -u "$REDIS_URL" llen "$LANE") )); z=$(redis-cli -u "$REDIS_URL" zcard "$ZSET")
  if [ $((s + z)) -ge "$N" ]; then break; fi
  sleep 1
  printf '  %8d in stream, %7d delayed (%.0f s)\n' "$s" "$z" "$(echo "$(now) - $t0" | bc)"
done
dt=$(echo "$(now) - $t0" | bc)
printf '  dispatched %d jobs in %.1f s: %.0f jobs/s\n' "$N" "$dt" "$(echo "$N / $dt" | bc -l)"

echo "waiting for the $DELAYED delayed jobs to fall due, then timing their move into the stream..."
while [ "$(q "SELECT (max(run_at) < now())::int FROM jobs WHERE run_at IS NOT NULL")" != 1 ]; do sleep 1; done
t0=$(now)
while [ "$(redis-cli -u "$REDIS_URL" zcard "$ZSET")" -gt 0 ]; do sleep 0.2; done
dt=$(echo "$(now) - $t0" | bc)
printf '  moved %d due jobs in %.1f s: %.0f jobs/s (in batches of 1000, never unpacking the set)\n' "$DELAYED" "$dt" "$(echo "$DELAYED / $dt" | bc -l)"

echo "worker (concurrency ${CONCURRENCY:-256}) draining with the backlog in place, ${DRAIN_S} s:"
SWITCHYARD_WORKER__CONCURRENCY=${CONCURRENCY:-256} SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 $BIN worker --queues system & PIDS+=($!)
prev=$(q "SELECT count(*) FROM jobs WHERE status = 'succeeded'"); t0=$(now); tp=$t0
for _ in $(seq $((DRAIN_S / 10))); do
  sleep 10
  cur=$(q "SELECT count(*) FROM jobs WHERE status = 'succeeded'"); tn=$(now)
  left=$(( $(redis-cli -u "$REDIS_URL" xlen "$STREAM") + $(redis-cli -u "$REDIS_URL" llen "$LANE") ))
  printf '  %6.0f jobs/s   (succeeded %8d, stream backlog %8d)\n' "$(echo "($cur - $prev) / ($tn - $tp)" | bc -l)" "$cur" "$left"
  prev=$cur; tp=$tn
done
echo "lost: $(q "SELECT count(*) FROM jobs WHERE status IN ('queued','running') AND dispatch_epoch = 0") jobs never dispatched (must be 0)"
