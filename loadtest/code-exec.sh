#!/usr/bin/env bash
# code.exec latency and throughput per sandbox tier: submit → first output and → completed
# (one job at a time), then executions per second at saturation. API, worker and scheduler
# run as separate processes (release build), both tiers on in the worker.
# Needs: cargo build --release -p switchyard -p switchyard-loadtest; psql; runsc and the
# sandbox runtimes (scripts/test.sh sets them up); nothing on :8080; root (gVisor).
set -u
cd "$(dirname "$0")/.."
BIN=./target/release/switchyard
LT=./target/release/switchyard-loadtest
N=${N:-100}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/sybench
export SWITCHYARD_REDIS_PREFIX=bench$RANDOM
export SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 SWITCHYARD_LOG=warn
export SWITCHYARD_CODE__TIERS='["wasm","gvisor"]'
psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS sybench" -c "CREATE DATABASE sybench" >/dev/null
$BIN migrate >/dev/null
$BIN admin create-tenant bench >/dev/null
KEY=$($BIN admin create-key --tenant bench | grep -o 'sy_[A-Za-z0-9_]*' | head -1)
$BIN api --listen 127.0.0.1:8080 > /tmp/api.log 2>&1 &
API=$!
$BIN scheduler > /tmp/scheduler.log 2>&1 &
SCHED=$!
start_worker() {
  $BIN worker > /tmp/worker.log 2>&1 &
  WORKER=$!
  sleep "${1:-3}"   # interpreters load, warm pools fill
}
for _ in $(seq 1 60); do curl -sf localhost:8080/readyz >/dev/null && break; sleep 1; done
start_worker 8
run() { echo "### $*"; $LT --api-key "$KEY" --timeout-s 60 "$@" 2>&1 | tail -4; }
run --code javascript --sandbox wasm --jobs "$N" --concurrency 1
run --code python --sandbox wasm --jobs "$N" --concurrency 1
# gVisor from the warm pool: paced at 2 jobs/s so the pool refills between jobs
run --code python --sandbox gvisor --jobs "$((N / 2))" --concurrency 1 --rate 2
run --code javascript --sandbox gvisor --jobs "$((N / 2))" --concurrency 1 --rate 2
# ... and back to back (the pool drains: sandbox starts bound the rate)
run --code python --sandbox gvisor --jobs "$((N / 2))" --concurrency 1
echo "### saturation (closed loops)"
run --code javascript --sandbox wasm --jobs $((N * 10)) --concurrency 8
run --code python --sandbox wasm --jobs $((N * 3)) --concurrency 8
run --code python --sandbox gvisor --jobs "$N" --concurrency 4
kill $WORKER; wait $WORKER 2>/dev/null
echo "### gVisor cold starts (no warm pool)"
SWITCHYARD_CODE__GVISOR_POOL=0 start_worker 5
run --code python --sandbox gvisor --jobs "$((N / 4))" --concurrency 1
kill $WORKER $API $SCHED; wait
