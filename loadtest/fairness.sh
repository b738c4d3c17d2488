#!/usr/bin/env bash
# Fairness and its cost. Tenant A queues N no-op jobs (a flood), one worker starts draining
# them, and after 2 s tenant B submits one job: how long does B's job wait (enqueue -> start),
# and how many of A's jobs were still waiting then? Run with lanes on (queue_lane_depth 256,
# plus a per-tenant concurrency limit high enough never to bind, so its bookkeeping is paid)
# and off (a lane depth no flood reaches), reporting A's drain rate for each.
#
# usage: loadtest/fairness.sh [N=100000]
# needs: cargo build --release -p switchyard; psql, curl, jq; Postgres and Redis running.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BIN=${BIN:-./target/release/switchyard}
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
DB=sy_fair_bench
export DATABASE_URL=$PGBASE/$DB REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export SWITCHYARD_ENABLE_NOOP=true SWITCHYARD_LOG=warn SWITCHYARD_QUOTAS__PER_CREDENTIAL_RPS=0
PORT=${PORT:-18090}
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap 'stop; psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
q() { psql "$DATABASE_URL" -qtAc "$1"; }
body=$(jq -cn '{jobs: [range(1000) | {kind: "system.noop", input: {}}]}')

run() {
  local label=$1 depth=$2 limit=$3
  stop
  export SWITCHYARD_REDIS_PREFIX=fair$$$label SWITCHYARD_QUEUE_LANE_DEPTH=$depth
  if [ "$limit" -gt 0 ]; then export SWITCHYARD_QUOTAS__CONCURRENT_JOBS=$limit; else unset SWITCHYARD_QUOTAS__CONCURRENT_JOBS; fi
  psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -qc "CREATE DATABASE $DB" >/dev/null
  $BIN migrate >/dev/null
  $BIN admin create-tenant a >/dev/null; $BIN admin create-tenant b >/dev/null
  local ka kb
  ka=$($BIN admin create-key --tenant a 2>/dev/null); kb=$($BIN admin create-key --tenant b 2>/dev/null)
  $BIN api --listen "127.0.0.1:$PORT" & PIDS+=($!)
  $BIN scheduler & PIDS+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.2; done
  for _ in $(seq $((N / 1000))); do
    curl -fs -o /dev/null -X POST "http://127.0.0.1:$PORT/v1/jobs/batch" -H "authorization: Bearer $ka" \
      -H 'content-type: application/json' -d "$body"
  done
  sleep 6 # the scheduler writes the limits within 5 s
  SWITCHYARD_WORKER__CONCURRENCY=256 SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 $BIN worker --queues system & PIDS+=($!)
  local t0; t0=$(date +%s.%N)
  sleep 2
  local bid
  bid=$(curl -fs -X POST "http://127.0.0.1:$PORT/v1/jobs" -H "authorization: Bearer $kb" \
    -H 'content-type: application/json' -d '{"kind":"system.noop","input":{}}' | jq -r .id)
  while [ "$(q "SELECT (started_at IS NOT NULL)::int FROM jobs WHERE id = '$bid'")" != 1 ]; do sleep 0.05; done
  local wait_ms ahead
  wait_ms=$(q "SELECT round(extract(epoch FROM started_at - created_at) * 1000) FROM jobs WHERE id = '$bid'")
  ahead=$(q "SELECT count(*) FROM jobs j, jobs b WHERE b.id = '$bid' AND j.tenant_id <> b.tenant_id
             AND (j.started_at IS NULL OR j.started_at > b.started_at)")
  while [ "$(q "SELECT count(*) FROM jobs WHERE status = 'succeeded'")" -lt $((N + 1)) ]; do sleep 0.2; done
  local dt; dt=$(echo "$(date +%s.%N) - $t0" | bc)
  printf '{"lanes":"%s","lane_depth":%s,"tenant_limit":%s,"flood":%d,"b_wait_ms":%s,"a_jobs_still_waiting_when_b_started":%s,"a_drain_jobs_per_s":%.0f}\n' \
    "$label" "$depth" "$limit" "$N" "$wait_ms" "$ahead" "$(echo "($N + 1) / $dt" | bc -l)"
}

run on 256 100000
run off 1000000000 0
