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
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian's postgresql package creates and starts a `main` cluster on 5432 that wants passwords
# on 127.0.0.1: it would take the port of the private trust cluster started below (and every
# login would fail). Only the binaries are wanted.
install_postgres() {
  if [ "$(id -u)" = 0 ] && [ ! -f /etc/postgresql-common/createcluster.conf ]; then
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
  fi
  apt_install postgresql
}

# host and port of a redis:// / rediss:// / postgres:// URL (userinfo may hold a password)
url_host_port() {
  local url=$1 default_port=$2
  if [[ "$url" =~ ^[a-z]+://([^@/]*@)?([^:/?]+)(:([0-9]+))? ]]; then
    echo "${BASH_REMATCH[2]} ${BASH_REMATCH[4]:-$default_port}"
  else
    echo "127.0.0.1 $default_port"
  fi
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pg_bin() {
  local name=$1
  if command -v "$name" >/dev/null; then command -v "$name"; return; fi
  ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -1
}

ensure_redis() {
  local host port
  read -r host port <<<"$(url_host_port "${REDIS_URL:-redis://127.0.0.1:6379}" 6379)"
  if port_open "$host" "$port"; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting redis-server on $host:$port (no persistence)"
  mkdir -p .switchyard/redis
  redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
    --dir "$PWD/.switchyard/redis" --logfile "$PWD/.switchyard/redis/redis.log"
  for _ in $(seq 50); do port_open "$host" "$port" && return; sleep 0.1; done
  die "redis-server did not start; see .switchyard/redis/redis.log"
}

# A server answering at DATABASE_URL must also take its login (another Postgres on the port
# that wants a password would fail every test with an authentication error).
check_postgres_login() {
  local url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres} psql
  psql=$(pg_bin psql || true)
  [ -n "$psql" ] || return 0
  local out
  if ! out=$(PGCONNECT_TIMEOUT=5 "$psql" "$url" -Atqc 'select 1' 2>&1); then
    case "$out" in
      *password*|*authentication*|*"no pg_hba.conf entry"*|*"role"*"does not exist"*)
        die "the postgres at DATABASE_URL refuses its login ($(echo "$out" | head -1)): set DATABASE_URL to a user it accepts (e.g. postgres://user:password@host:port/db), or stop that server so a private one can start" ;;
    esac
  fi
}

ensure_postgres() {
  local host port
  read -r host port <<<"$(url_host_port "${DATABASE_URL:-postgres://127.0.0.1:5432}" 5432)"
  if port_open "$host" "$port"; then check_postgres_login; return; fi
  # a Debian cluster that is merely stopped
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
    say "starting the local postgres cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
    for _ in $(seq 50); do port_open "$host" "$port" && { check_postgres_login; return; }; sleep 0.1; done
  fi
  [ -n "$(pg_bin initdb || true)" ] || install_postgres
  local initdb postgres dir
  initdb=$(pg_bin initdb || true); postgres=$(pg_bin postgres || true)
  [ -n "$initdb" ] && [ -n "$postgres" ] || die "postgres binaries not found after install"
  dir="$PWD/.switchyard/pg"
  if [ "$(id -u)" = 0 ]; then
    # the `postgres` user runs it: a checkout under /root (mode 0700) is out of its reach;
    # a short path also keeps the socket under the 107-byte limit
    dir="/var/tmp/switchyard-pg-$(printf '%s' "$PWD" | md5sum | cut -c1-8)"
  fi
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
