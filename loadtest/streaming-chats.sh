#!/usr/bin/env bash
# 1,000 concurrent streaming chats: mock with 20 ms between tokens, 200-token replies.
set -u
cd "$(dirname "$0")/.."
KEY=sy_demo1234_0123456789abcdefghij0123456789ABCDEFGHIJ
# needs: cargo build --release -p switchyard -p switchyard-loadtest; psql; nothing else on :8080
./target/release/switchyard mock-llm --listen 127.0.0.1:18081 --inter-token-ms 20 > /tmp/mock.log 2>&1 &
MOCK=$!
psql -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS sybench" -c "CREATE DATABASE sybench" >/dev/null
DATABASE_URL=postgres://postgres@127.0.0.1:5432/sybench SWITCHYARD_REDIS_PREFIX=bench$RANDOM \
SWITCHYARD_DEV_API_KEY=$KEY SWITCHYARD_LLM__MOCK_BASE_URL=http://127.0.0.1:18081/v1 \
SWITCHYARD_WORKER__CONCURRENCY=1200 SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 SWITCHYARD_LOG=warn \
  ./target/release/switchyard dev > /tmp/dev.log 2>&1 &
DEV=$!
for i in $(seq 1 60); do curl -sf localhost:8080/readyz >/dev/null && break; sleep 1; done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
c0=$(cpu $DEV); m0=$(cpu $MOCK); t0=$(date +%s.%N)
./target/release/switchyard-loadtest --api-key $KEY --kind llm --model mock-echo --prompt-words 198 \
  --max-tokens 400 --jobs ${JOBS:-6000} --concurrency 1000 --rate ${RATE:-250} --ws-connections 16 --timeout-s 120 2>&1 | tail -30
c1=$(cpu $DEV); m1=$(cpu $MOCK); t1=$(date +%s.%N)
echo "dev CPU: $(echo "($c1-$c0)/100/($t1-$t0)" | bc -l | head -c 5) cores; mock CPU: $(echo "($m1-$m0)/100/($t1-$t0)" | bc -l | head -c 5) cores"
grep -E "VmHWM|VmRSS" /proc/$DEV/status
kill $DEV $MOCK; wait
