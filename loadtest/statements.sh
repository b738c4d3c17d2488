#!/usr/bin/env bash
# The Postgres time of a job's statements (insert, claim, end, audit outbox drain) for 51,200
# jobs in statements of 256, on a fresh database migrated by this build; ROUNDS runs.
# Single-connection and deterministic enough to compare builds or schemas back to back.
#
# usage: loadtest/statements.sh [ROUNDS=2]    (BIN=path/to/switchyard to pick a build)
# needs: a build of switchyard, psql, Postgres at PGBASE (default postgres://postgres@127.0.0.1:5432)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
BIN=${BIN:-./target/release/switchyard}
[ -x "$BIN" ] || { echo "build first: cargo build --release -p switchyard" >&2; exit 1; }
PGBASE=${PGBASE:-postgres://postgres@127.0.0.1:5432}
DB=sy_stmt_bench
trap 'psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1' EXIT
psql "$PGBASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null 2>&1
DATABASE_URL=$PGBASE/$DB "$BIN" migrate >/dev/null
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  psql "$PGBASE/$DB" -q -f loadtest/sql/job-statements.sql 2>&1 | grep -v '^$' | paste - - | sed 's/^/  /'
done
