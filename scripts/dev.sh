#!/usr/bin/env bash
# Starts the whole system locally: API on 127.0.0.1:8080, worker, scheduler, mock LLM, a demo
# tenant and API key (printed). Uses Postgres/Redis at DATABASE_URL/REDIS_URL when reachable,
# otherwise `switchyard dev` starts private ones under ./.switchyard/ (installing them if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
# binaries switchyard dev needs if it must start private services
read -r rhost rport <<<"$(url_host_port "${REDIS_URL:-redis://127.0.0.1:6379}" 6379)"
command -v redis-server >/dev/null || port_open "$rhost" "$rport" || apt_install redis-server
read -r phost pport <<<"$(url_host_port "${DATABASE_URL:-postgres://127.0.0.1:5432}" 5432)"
[ -n "$(pg_bin initdb || true)" ] || port_open "$phost" "$pport" || install_postgres
# code.exec in the wasm sandbox: CPython and QuickJS builds for WASI (pinned, sha256-checked)
bash sandbox-images/wasm/fetch.sh || say "warning: no wasm runtimes; code.exec runs only raw wasm modules"
cargo build --release --locked -p switchyard
exec ./target/release/switchyard dev "$@"
