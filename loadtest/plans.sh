#!/usr/bin/env bash
# End-to-end throughput on a fresh database and on the same database warm, in one run: the
# guard against the plan cliff (generic plans cached while `jobs` was empty; see
# Store::refresh_statistics). API, worker and scheduler run as separate release processes;
# the load tool submits N no-op jobs with 100 clients and follows each over WebSocket.
#   run 1 "fresh": a new database, `jobs` grows from 0 to N while the processes run
#   run 2 "warm":  the same processes and database (N more rows), statistics already taken
# Run it on an otherwise idle machine (this Postgres runs with autovacuum off: the worst case).
#
# usage: loadtest/plans.sh [N=100000]
# needs: cargo build --release -p switchyard -p switchyard-loadtest; psql, curl, jq.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BIN=${BIN:-./target/release/switchyard}
LOAD=${LOAD:-./target/release/switchyard-loadtest}
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
DB=sy_plans_bench
# PGQUERY: extra URL query for the services, e.g. to compare with per-statement planning:
#   PGQUERY="?options=-c%20plan_cache_mode%3Dforce_custom_plan"
export DATABASE_URL=$PGBASE/$DB${PGQUERY:-} REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export SWITCHYARD_ENABLE_NOOP=true SWITCHYARD_LOG=warn SWITCHYARD_QUOTAS__PER_CREDENTIAL_RPS=0
export SWITCHYARD_REDIS_PREFIX=plans$$ SWITCHYARD_DATABASE_MAX_CONNECTIONS=32
PORT=${PORT:-18091}
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap 'stop; psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT

psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -qc "CREATE DATABASE $DB" >/dev/null
DATABASE_URL=$PGBASE/$DB $BIN migrate >/dev/null
$BIN admin create-tenant bench >/dev/null
KEY=$($BIN admin create-key --tenant bench 2>/dev/null)
$BIN api --listen "127.0.0.1:$PORT" & PIDS+=($!)
$BIN scheduler & PIDS+=($!)
SWITCHYARD_WORKER__CONCURRENCY=512 $BIN worker --queues system & PIDS+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.2; done

# CPU per job of each process over a run (utime + stime, clock ticks): ours by pid, Redis
# by its pid, Postgres as the sum of its processes (the pools keep their sessions for the run)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_ticks() { local t=0 p; for p in $(pgrep -x postgres); do t=$((t + $(ticks "$p"))); done; echo $t; }
REDIS_PID=$(redis-cli -u "$REDIS_URL" info server 2>/dev/null | awk -F: '/^process_id/ {print $2+0}')
HZ=$(getconf CLK_TCK)
cpu_snapshot() {
  echo "$(ticks "${PIDS[0]}") $(ticks "${PIDS[1]}") $(ticks "${PIDS[2]}") $(ticks "${REDIS_PID:-0}") $(pg_ticks)"
}
cpu_per_job() { # before after jobs -> JSON of µs per job
  local -a b=($1) a=($2)
  jq -nc --argjson n "$3" --argjson hz "$HZ" --argjson d "[$((a[0]-b[0])),$((a[1]-b[1])),$((a[2]-b[2])),$((a[3]-b[3])),$((a[4]-b[4]))]" \
    '["api","scheduler","worker","redis","postgres"] as $k
     | [range(5)] | map({key: $k[.], value: ($d[.] * 1e6 / $hz / $n | round)}) | from_entries'
}

for label in fresh warm; do
  rows=$(psql "$PGBASE/$DB" -qtAc "SELECT count(*) FROM jobs")
  before=$(cpu_snapshot)
  out=$($LOAD --url "http://127.0.0.1:$PORT" --api-key "$KEY" --jobs "$N" --concurrency 100 --kind noop --json 2>/dev/null | tail -1)
  cpu=$(cpu_per_job "$before" "$(cpu_snapshot)" "$N")
  [ -z "${KEEP:-}" ] || echo "$out" >"$KEEP/plans-$label.json"  # the load tool's whole report
  echo "$out" | jq -c --arg run "$label" --argjson rows_before "$rows" --argjson cpu "$cpu" \
    '{run: $run, rows_before: $rows_before, jobs: .submitted, e2e_jobs_per_s: .e2e_throughput_jobs_per_s,
      submit_p50_ms: .submit_latency_ms.p50_ms, submit_p99_ms: .submit_latency_ms.p99_ms, lost: .lost,
      cpu_us_per_job: $cpu}'
done
psql "$PGBASE/$DB" -qtAc "SELECT 'jobs analyzed by us: ' || coalesce(analyze_count, 0) || ', by autovacuum: ' || coalesce(autoanalyze_count, 0) FROM pg_stat_user_tables WHERE relname = 'jobs'"
# where Postgres writes go, per job run (rows inserted / updated / deleted per table)
psql "$PGBASE/$DB" -qtAc "SELECT relname || ': ' || round(n_tup_ins / $((2 * N)).0, 2) || ' ins, ' || round(n_tup_upd / $((2 * N)).0, 2) || ' upd, ' || round(n_tup_del / $((2 * N)).0, 2) || ' del, ' || round(n_tup_hot_upd / $((2 * N)).0, 2) || ' hot upd per job' FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC"
