#!/usr/bin/env bash
# Makes sure Redis and Postgres answer at REDIS_URL / DATABASE_URL's host and port.
# Installs (Debian/Ubuntu, as root) and starts them when missing; fails with a clear message
# when it cannot. Sourced by scripts/test.sh and scripts/dev.sh.
set -euo pipefail

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "missing $*: install it (Debian/Ubuntu: sudo apt-get install $*) and run again"
  fi
  say "installing $* with apt-get"
  if [ -z "${SWITCHYARD_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    export SWITCHYARD_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pg_bin() {
  local name=$1
  if command -v "$name" >/dev/null; then command -v "$name"; return; fi
  ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -1
}

ensure_redis() {
  local host=127.0.0.1 port=6379
  if [[ "${REDIS_URL:-}" =~ ^redis://([^:/@]+@)?([^:/]+):([0-9]+) ]]; then
    host=${BASH_REMATCH[2]}; port=${BASH_REMATCH[3]}
  fi
  if port_open "$host" "$port"; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting redis-server on $host:$port (no persistence)"
  mkdir -p .switchyard/redis
  redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
    --dir "$PWD/.switchyard/redis" --logfile "$PWD/.switchyard/redis/redis.log"
  for _ in $(seq 50); do port_open "$host" "$port" && return; sleep 0.1; done
  die "redis-server did not start; see .switchyard/redis/redis.log"
}

ensure_postgres() {
  local host=127.0.0.1 port=5432
  if [[ "${DATABASE_URL:-}" =~ ^postgres(ql)?://([^@/]+@)?([^:/]+):([0-9]+) ]]; then
    host=${BASH_REMATCH[3]}; port=${BASH_REMATCH[4]}
  fi
  if port_open "$host" "$port"; then return; fi
  # a Debian cluster that is merely stopped
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
    say "starting the local postgres cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
    for _ in $(seq 50); do port_open "$host" "$port" && return; sleep 0.1; done
  fi
  [ -n "$(pg_bin initdb)" ] || apt_install postgresql
  local initdb postgres dir
  initdb=$(pg_bin initdb); postgres=$(pg_bin postgres)
  [ -n "$initdb" ] && [ -n "$postgres" ] || die "postgres binaries not found after install"
  dir="$PWD/.switchyard/pg"
  mkdir -p "$dir"
  local run=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user (install the postgresql package)"
    chown -R postgres "$dir"
    run=(runuser -u postgres --)
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    say "initialising a private postgres in $dir"
    "${run[@]}" "$initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  say "starting a private postgres on $host:$port"
  "${run[@]}" "$postgres" -D "$dir/data" -p "$port" -h "$host" -k "$dir" >"$dir/log" 2>&1 &
  for _ in $(seq 100); do port_open "$host" "$port" && return; sleep 0.2; done
  die "postgres did not start; see $dir/log"
}
