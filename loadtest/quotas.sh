#!/usr/bin/env bash
# A tenant's requests per minute across several API replicas: REPLICAS `switchyard api`
# processes share Redis; CLIENTS clients of one tenant (limit RPM/min) hammer all of them for
# DURATION s. Reports admitted vs refused and the most admitted in any 60 s window.
# Needs: cargo build --release -p switchyard -p switchyard-loadtest (or BIN=target/debug: the
# counts, not the speed, matter here); psql; ports 18101.. free.
set -u
cd "$(dirname "$0")/.."
RPM=${RPM:-600}
REPLICAS=${REPLICAS:-3}
CLIENTS=${CLIENTS:-48}
DURATION=${DURATION:-120}
BIN=${BIN:-./target/release}
DB=postgres://postgres@127.0.0.1:5432/syquota
export SWITCHYARD_REDIS_PREFIX=quota$RANDOM SWITCHYARD_LOG=warn DATABASE_URL=$DB
export SWITCHYARD_QUOTAS__PER_CREDENTIAL_RPS=0
psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS syquota" -c "CREATE DATABASE syquota" >/dev/null
"$BIN"/switchyard admin create-tenant quota >/dev/null
"$BIN"/switchyard admin set-tenant quota --quotas "requests_per_minute=$RPM" >/dev/null
KEY=$("$BIN"/switchyard admin create-key --tenant quota --name bench 2>/dev/null)
PIDS=()
URLS=()
for i in $(seq 1 "$REPLICAS"); do
  port=$((18100 + i))
  "$BIN"/switchyard api --listen "127.0.0.1:$port" > "/tmp/quota-api-$i.log" 2>&1 &
  PIDS+=($!)
  URLS+=("http://127.0.0.1:$port")
done
for u in "${URLS[@]}"; do
  for _ in $(seq 1 60); do curl -sf "$u/readyz" >/dev/null && break; sleep 1; done
done
"$BIN"/switchyard-loadtest --api-key "$KEY" --quota-urls "$(IFS=,; echo "${URLS[*]}")" \
  --quota-rpm "$RPM" --concurrency "$CLIENTS" --duration-s "$DURATION" --json
RC=$?
kill "${PIDS[@]}"; wait
exit $RC
