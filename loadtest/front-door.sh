#!/usr/bin/env bash
# Overhead of the OpenAI-compatible front door: the same open-loop load of chat completions
# (RATE/s for DURATION s, not streamed) against Switchyard and against the mock directly.
# Needs: cargo build --release -p switchyard -p switchyard-loadtest; psql; nothing on :8080.
# BIN=path/to/switchyard picks another build (to compare builds back to back).
# PGBASE=postgres://user@host:port picks the Postgres server (default: the local one on 5432).
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-./target/release/switchyard}
KEY=sy_demo1234_0123456789abcdefghij0123456789ABCDEFGHIJ
RATE=${RATE:-500}
DURATION=${DURATION:-30}
"$BIN" mock-llm --listen 127.0.0.1:18081 > /tmp/mock.log 2>&1 &
MOCK=$!
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
psql -q "$PGBASE/postgres" -c "DROP DATABASE IF EXISTS sybench WITH (FORCE)" -c "CREATE DATABASE sybench" >/dev/null
DATABASE_URL=$PGBASE/sybench SWITCHYARD_REDIS_PREFIX=bench$RANDOM \
SWITCHYARD_DEV_API_KEY=$KEY SWITCHYARD_LLM__MOCK_BASE_URL=http://127.0.0.1:18081/v1 \
SWITCHYARD_WORKER__CONCURRENCY=512 SWITCHYARD_DATABASE_MAX_CONNECTIONS=32 SWITCHYARD_LOG=warn \
  "$BIN" dev > /tmp/dev.log 2>&1 &
DEV=$!
for _ in $(seq 1 60); do curl -sf localhost:8080/readyz >/dev/null && break; sleep 1; done
lt() {
  ./target/release/switchyard-loadtest --chat-completions --rate "$RATE" --model mock-echo \
    --max-tokens 16 --api-key "$KEY" "$@"
}
echo "== warm-up (5 s, not counted)"
lt --url http://127.0.0.1:8080 --duration-s 5 | tail -1
echo "== through Switchyard"
lt --url http://127.0.0.1:8080 --duration-s "$DURATION"
echo "== the mock directly"
lt --url http://127.0.0.1:18081 --duration-s "$DURATION"
kill $DEV $MOCK; wait
