#!/usr/bin/env bash
# Switchyard and BullMQ side by side, on this machine, in one run:
#   1. burn-down: N queued no-op jobs drained by one worker process (BullMQ: Worker with
#      concurrency 200, removeOnComplete; Switchyard: `switchyard worker`, every claim and
#      outcome committed to Postgres), with CPU microseconds per job of the worker, Redis
#      and (Switchyard) Postgres;
#   2. steady: jobs submitted at half of each system's burn-down rate for SECONDS, with the
#      enqueue -> start latency p50/p99 of every job.
#
# usage: loadtest/peers/run.sh [N=200000] [SECONDS=20]
#   PEERS="bullmq switchyard" (default: both) picks which systems run; STEADY=0 skips phase 2.
# needs: a release build (cargo build --release -p switchyard -p switchyard-loadtest), node
# and npm, psql, redis-cli, Postgres and Redis running (DATABASE_URL's server, REDIS_URL).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-200000}
SECS=${2:-20}
BIN=${BIN:-./target/release/switchyard}
LOAD=${LOAD:-./target/release/switchyard-loadtest}
[ -x "$BIN" ] && [ -x "$LOAD" ] || { echo "build first: cargo build --release -p switchyard -p switchyard-loadtest" >&2; exit 1; }
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
DB=sy_peer_bench
export DATABASE_URL=$PGBASE/$DB
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PREFIX=peer$$
export SWITCHYARD_REDIS_PREFIX=$PREFIX SWITCHYARD_ENABLE_NOOP=true SWITCHYARD_LOG=warn
CONC=${CONCURRENCY:-256}
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
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pg_ticks() { local t=0; for p in $(pgrep -x postgres || true); do t=$((t + $(ticks "$p" 2>/dev/null || echo 0))); done; echo "$t"; }
redis_cpu() { redis-cli -u "$REDIS_URL" info cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.6f", s}'; }
HZ=$(getconf CLK_TCK)

PEERS=${PEERS:-bullmq switchyard}
STEADY=${STEADY:-1}
if [[ " $PEERS " == *" bullmq "* ]]; then
echo "== BullMQ 6.7.0"
( cd loadtest/peers/bullmq && [ -d node_modules/bullmq ] || npm install --silent --no-audit --no-fund >/dev/null )
BULL_BURN=$(cd loadtest/peers/bullmq && node bench.mjs burn "$N")
echo "$BULL_BURN"
BULL_RATE=$(echo "$BULL_BURN" | sed -E 's/.*"jobs_per_s":([0-9.]+).*/\1/')
HALF=$(printf '%.0f' "$(echo "$BULL_RATE / 2" | bc -l)")
if [ "$STEADY" = 1 ]; then (cd loadtest/peers/bullmq && node bench.mjs steady "$HALF" "$SECS"); fi
fi
[[ " $PEERS " == *" switchyard "* ]] || exit 0

echo "== Switchyard"
psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PGBASE/postgres" -qc "CREATE DATABASE $DB" >/dev/null
$BIN migrate >/dev/null
T=$(q "INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'bench') RETURNING id")
# time-ordered ids (UUIDv7, as the API makes them): random ones would scatter every index insert
q "INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, max_attempts, input, created_at, event_seq)
   SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing
            substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
            FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid, '$T', 'bench', 'system.noop', 'system', 'queued', 3, '{}'::jsonb, now(), 1
   FROM generate_series(1, $N) g" >/dev/null
q "ANALYZE jobs" >/dev/null
$BIN scheduler & SPID=$!; PIDS+=($SPID)
# job state changes not chained yet, in whichever batch tables this build's schema has
OUTBOX_SQL="SELECT (SELECT count(*) FROM audit_outbox)$(q "SELECT string_agg(format(' + COALESCE((SELECT sum(n) FROM %I), 0)', t), '')
  FROM unnest(ARRAY['job_audit_batches', 'job_audit_changes']) t WHERE to_regclass(t) IS NOT NULL")"
outbox() { q "$OUTBOX_SQL"; }
# dispatched (into the stream, or the tenant's fairness lane beyond the lane depth), and the
# inserts' audit rows chained, so the window below holds only the work of running the jobs
while [ "$(q "SELECT count(*) FROM jobs WHERE dispatch_epoch = 0")" -gt 0 ] || [ "$(outbox)" -gt 0 ]; do sleep 0.5; done
echo "  $N jobs queued; starting one worker (concurrency $CONC)"
r0=$(redis_cpu); p0=$(pg_ticks); s0=$(ticks "$SPID"); t0=$(now)
SWITCHYARD_WORKER__CONCURRENCY=$CONC SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 $BIN worker --queues system & WPID=$!; PIDS+=($WPID)
# the harness's own queries should barely load the Postgres it measures: it polls the unfinished
# jobs (a partial index) twice a second and takes the end from the last `finished_at`
while [ "$(q "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")" -gt 0 ]; do sleep 0.5; done
wt=$(ticks "$WPID"); r1=$(redis_cpu); p1=$(pg_ticks)
dt=$(echo "$(q "SELECT extract(epoch FROM max(finished_at)) FROM jobs") - $t0" | bc)
# the scheduler chains the jobs' state changes into the audit trail behind the workers: the
# figures "with the audit trail" run until it has caught up
LEFT=$(outbox)
while [ "$(outbox)" -gt 0 ]; do sleep 0.2; done
da=$(echo "$(now) - $t0" | bc); p2=$(pg_ticks); s2=$(ticks "$SPID")
SY_RATE=$(echo "$N / $dt" | bc -l)
us() { echo "$1 * 1000000 / $N" | bc -l; }
printf '{"peer":"switchyard","phase":"burn-down","jobs":%d,"seconds":%.2f,"jobs_per_s":%.0f,"worker_cpu_us_per_job":%.1f,"redis_cpu_us_per_job":%.1f,"postgres_cpu_us_per_job":%.1f}\n' \
  "$N" "$dt" "$SY_RATE" "$(us "$wt / $HZ")" "$(us "($r1 - $r0)")" "$(us "($p1 - $p0) / $HZ")"
printf '{"peer":"switchyard","phase":"burn-down with the audit trail chained","unchained_at_end":%d,"seconds":%.2f,"jobs_per_s":%.0f,"postgres_cpu_us_per_job":%.1f,"scheduler_cpu_us_per_job":%.1f}\n' \
  "$LEFT" "$da" "$(echo "$N / $da" | bc -l)" "$(us "($p2 - $p0) / $HZ")" "$(us "($s2 - $s0) / $HZ")"

[ "$STEADY" = 1 ] || exit 0
HALF=$(printf '%.0f' "$(echo "$SY_RATE / 2" | bc -l)")
PORT=${PORT:-18080}
$BIN api --listen "127.0.0.1:$PORT" & PIDS+=($!)
KEY=$($BIN admin create-key --tenant bench --name peer 2>/dev/null | grep -o 'sy_[A-Za-z0-9_]*' | head -1)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
MARK=$(q "SELECT now()")
$LOAD --url "http://127.0.0.1:$PORT" --api-key "$KEY" --jobs $((HALF * SECS)) --rate "$HALF" \
  --concurrency 64 --ws-connections 1 --timeout-s 60 >/dev/null 2>&1 || true
q "SELECT json_build_object('peer', 'switchyard', 'phase', 'steady', 'rate', $HALF, 'jobs', count(*),
     'start_latency_ms', json_build_object(
       'p50', round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)) * 1000)::numeric, 1),
       'p99', round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)) * 1000)::numeric, 1),
       'max', round((max(extract(epoch FROM started_at - created_at)) * 1000)::numeric, 1)))
   FROM jobs WHERE created_at >= '$MARK' AND started_at IS NOT NULL"
