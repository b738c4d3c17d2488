#!/usr/bin/env bash
# 1,000 concurrent streaming chats: the mock streams 200-token replies with 20 ms between
# tokens; jobs are submitted at RATE/s (250/s × ~4 s per reply ≈ 1,000 in flight) and followed
# over WebSocket. API, worker and scheduler run as separate processes so each role's CPU and
# memory are measured on its own.
# Needs: cargo build --release -p switchyard -p switchyard-loadtest; psql; nothing on :8080.
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-./target/release/switchyard}
JOBS=${JOBS:-5000}
RATE=${RATE:-250}
# PGBASE: the Postgres server (default: the local one on 5432)
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
export DATABASE_URL=$PGBASE/sybench
export SWITCHYARD_REDIS_PREFIX=bench$RANDOM
export SWITCHYARD_LLM__MOCK_BASE_URL=http://127.0.0.1:18081/v1
export SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 SWITCHYARD_LOG=warn
psql -q "$PGBASE/postgres" -c "DROP DATABASE IF EXISTS sybench WITH (FORCE)" -c "CREATE DATABASE sybench" >/dev/null
$BIN migrate >/dev/null
$BIN admin create-tenant bench >/dev/null
KEY=$($BIN admin create-key --tenant bench | grep -o 'sy_[A-Za-z0-9_]*' | head -1)
$BIN mock-llm --listen 127.0.0.1:18081 --inter-token-ms 20 > /tmp/mock.log 2>&1 &
MOCK=$!
# each role under its own application_name (pg_stat_activity, per-client CPU)
DATABASE_URL=$DATABASE_URL?application_name=sy-api $BIN api --listen 127.0.0.1:8080 > /tmp/api.log 2>&1 &
API=$!
DATABASE_URL=$DATABASE_URL?application_name=sy-worker $BIN worker --concurrency 1200 > /tmp/worker.log 2>&1 &
WORKER=$!
DATABASE_URL=$DATABASE_URL?application_name=sy-scheduler $BIN scheduler > /tmp/scheduler.log 2>&1 &
SCHED=$!
for _ in $(seq 1 60); do curl -sf localhost:8080/readyz >/dev/null && break; sleep 1; done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
REDIS_PID=$(redis-cli info server 2>/dev/null | awk -F: '/^process_id/ {print $2+0}')
# all of Postgres' processes (postmaster and backends), and the whole box (idle share)
pg_cpu() { local t=0; for p in $(pgrep -x postgres); do t=$((t + $(cpu "$p" 2>/dev/null || echo 0))); done; echo $t; }
box_idle() { awk '/^cpu / {print $5+$6, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
declare -A c0
for p in $API $WORKER $MOCK $REDIS_PID; do c0[$p]=$(cpu "$p"); done
pg0=$(pg_cpu); read -r idle0 total0 < <(box_idle)
t0=$(date +%s.%N)
/usr/bin/time -f "LOADTEST: CPU %P of one core, peak RSS %M KB" ./target/release/switchyard-loadtest --api-key "$KEY" --kind llm --model mock-echo --prompt-words 198 \
  --max-tokens 400 --jobs "$JOBS" --concurrency 1000 --rate "$RATE" --ws-connections 16 --timeout-s 120 2>&1 | tail -14
t1=$(date +%s.%N)
for p in API:$API WORKER:$WORKER MOCK:$MOCK; do
  name=${p%%:*}; pid=${p##*:}
  cores=$(echo "($(cpu "$pid")-${c0[$pid]})/100/($t1-$t0)" | bc -l | head -c 5)
  peak=$(awk '/VmHWM/ {print $2/1024 " MB"}' "/proc/$pid/status")
  echo "$name: CPU $cores cores, peak RSS $peak"
done
if [ -n "$REDIS_PID" ] && [ -r "/proc/$REDIS_PID/stat" ]; then
  echo "REDIS: CPU $(echo "($(cpu "$REDIS_PID")-${c0[$REDIS_PID]})/100/($t1-$t0)" | bc -l | head -c 5) cores"
fi
echo "POSTGRES (all processes): CPU $(echo "($(pg_cpu)-$pg0)/100/($t1-$t0)" | bc -l | head -c 5) cores"
read -r idle1 total1 < <(box_idle)
echo "BOX: $(echo "100*($idle1-$idle0)/($total1-$total0)" | bc -l | head -c 4) % idle over the run ($(nproc) cores)"
kill $API $WORKER $SCHED $MOCK; wait
