#!/usr/bin/env bash
# Build the read-only root filesystem that Switchyard's gVisor (runsc) sandboxes run in:
# python3 + its standard library, node, the shared libraries they need, and the loaders.
#
# Usage: build-rootfs.sh [--force] [--source=host|debootstrap] [OUT_DIR]
#   OUT_DIR  default: ${SWITCHYARD_SANDBOX_DIR:-$HOME/.cache/switchyard/sandbox}/gvisor/rootfs
#   --source=host         (default) copy this machine's Debian python3 (/usr/bin/python3.X with
#                         /usr/lib/python3.X) and node, plus the libraries `ldd` names. A few seconds.
#                         Missing interpreters are installed with apt-get when running as root.
#   --source=debootstrap  debootstrap --variant=minbase bookworm + python3 + nodejs (Debian's
#                         Node 18). Needs root and the Debian mirror; about 70 s and ~240 MB.
#   --force               rebuild even if OUT_DIR is up to date.
# Env: SWITCHYARD_PYTHON (default /usr/bin/python3), SWITCHYARD_NODE (default: node on PATH),
#      SWITCHYARD_DEBIAN_MIRROR (default http://deb.debian.org/debian).
#
# Idempotent: OUT_DIR/.switchyard-rootfs records a key of the inputs; a rerun with the same
# inputs does nothing. The tree is built next to OUT_DIR and moved into place at the end.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE=host
FORCE=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --source=host|--source=debootstrap) SOURCE="${arg#--source=}" ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build-rootfs: unknown option: $arg" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "build-rootfs: only one OUT_DIR" >&2; exit 2; }; OUT="$arg" ;;
  esac
done
OUT="${OUT:-${SWITCHYARD_SANDBOX_DIR:-$HOME/.cache/switchyard/sandbox}/gvisor/rootfs}"

log() { printf '[build-rootfs] %s\n' "$*" >&2; }
die() { printf '[build-rootfs] ERROR: %s\n' "$*" >&2; exit 1; }

case "$OUT" in /|/usr|/usr/*|/bin|/lib|/etc|"$HOME") die "refusing to build into $OUT" ;; esac
mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
for tool in ldd sha256sum; do command -v "$tool" >/dev/null || die "'$tool' not found"; done
for f in loader/loader.py loader/loader.js; do [ -f "$HERE/$f" ] || die "missing $HERE/$f"; done

IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
apt_install() {
  [ "$IS_ROOT" = 1 ] && command -v apt-get >/dev/null ||
    die "$1 is missing and cannot be installed here (need root + apt-get): install package(s) $2"
  log "installing $2 with apt-get (for $1)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $2 >/dev/null; then
    apt-get update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $2 >/dev/null ||
      die "apt-get install $2 failed"
  fi
}

# ---------------------------------------------------------------- inputs and up-to-date key
if [ "$SOURCE" = host ]; then
  PY="${SWITCHYARD_PYTHON:-/usr/bin/python3}"
  [ -x "$PY" ] || apt_install python3 python3
  PY="$(readlink -f "$PY")"
  # The stdlib must live where the copied binary will look for it (its own prefix).
  PY_INFO="$("$PY" -S -c 'import sys, sysconfig
print(sysconfig.get_path("stdlib")); print(sysconfig.get_path("platstdlib"))
print("%d.%d" % sys.version_info[:2]); print(sys.version.split()[0])')" ||
    die "$PY does not run"
  { read -r PY_STDLIB; read -r PY_PLATSTDLIB; read -r PY_MM; read -r PY_VER; } <<<"$PY_INFO"
  [ -f "$PY_STDLIB/json/__init__.py" ] || apt_install "the python$PY_MM stdlib" "libpython$PY_MM-stdlib"
  [ -d "$PY_PLATSTDLIB/lib-dynload" ] || die "no lib-dynload in $PY_PLATSTDLIB"

  NODE="${SWITCHYARD_NODE:-$(command -v node || true)}"
  [ -n "$NODE" ] && [ -x "$NODE" ] || { apt_install node nodejs; NODE="$(command -v node)"; }
  NODE="$(readlink -f "$NODE")"
  NODE_VER="$("$NODE" --version)" || die "$NODE does not run"
  KEY_INPUTS="host $PY $PY_VER $(stat -c '%s %Y' "$PY") $NODE $NODE_VER $(stat -c '%s %Y' "$NODE")"
else
  [ "$IS_ROOT" = 1 ] || die "--source=debootstrap needs root"
  command -v debootstrap >/dev/null || apt_install debootstrap debootstrap
  MIRROR="${SWITCHYARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  KEY_INPUTS="debootstrap bookworm $MIRROR"
fi
KEY="$(cat "$0" "$HERE/loader/loader.py" "$HERE/loader/loader.js" | sha256sum | cut -c1-16) $KEY_INPUTS"

if [ "$FORCE" = 0 ] && [ -f "$OUT/.switchyard-rootfs" ] && [ "$(cat "$OUT/.switchyard-rootfs")" = "$KEY" ]; then
  log "up to date: $OUT"
  echo "$OUT"
  exit 0
fi

START=$(date +%s)
TMP="$OUT.tmp.$$"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
rm -rf "$TMP"
mkdir -p "$TMP"

# ---------------------------------------------------------------- helpers (host copy)
# copy PATH into the tree at the same absolute path (following symlinks for the file itself)
put() {
  local src="$1" dst="$TMP$1"
  [ -e "$dst" ] && return 0
  mkdir -p "$(dirname "$dst")"
  cp -L --preserve=mode,timestamps "$src" "$dst"
}
# copy an ELF file and every shared library ldd resolves for it
put_elf() {
  local f="$1" lib
  put "$f"
  if ! ldd "$f" >/dev/null 2>&1; then return 0; fi # static or not an ELF object
  ldd "$f" | grep -q 'not found' && die "ldd: unresolved library for $f: $(ldd "$f" | grep 'not found' | head -1)"
  for lib in $(ldd "$f" | grep -oE '(=> )?/[^ ]+' | sed 's/^=> //'); do
    put "$lib"
  done
}

# ---------------------------------------------------------------- build
if [ "$SOURCE" = host ]; then
  log "source: host python $PY_VER ($PY) and node $NODE_VER ($NODE)"
  # merged-/usr layout like Debian 12: /bin, /lib, /lib64 are links into /usr
  mkdir -p "$TMP"/usr/bin "$TMP"/usr/lib "$TMP"/usr/lib64 "$TMP"/usr/sbin
  ln -s usr/bin "$TMP/bin"; ln -s usr/lib "$TMP/lib"; ln -s usr/lib64 "$TMP/lib64"; ln -s usr/sbin "$TMP/sbin"

  log "copying python $PY_VER and its standard library"
  put_elf "$PY"
  mkdir -p "$TMP$PY_STDLIB"
  # Debian ships precompiled __pycache__ for the stdlib; cp -a keeps the mtimes the .pyc check uses.
  tar -C "$PY_STDLIB" -cf - \
    --exclude=./test --exclude=./idlelib --exclude=./tkinter --exclude=./turtledemo \
    --exclude=./ensurepip --exclude=./lib2to3 --exclude='./config-*' --exclude=./site-packages \
    --exclude=./dist-packages --exclude=./lib-dynload --exclude='*/tests' --exclude='*/idle_test' \
    --exclude=./sitecustomize.py --exclude=./EXTERNALLY-MANAGED . | tar -C "$TMP$PY_STDLIB" -xf -
  mkdir -p "$TMP$PY_PLATSTDLIB/lib-dynload"
  for so in "$PY_PLATSTDLIB"/lib-dynload/*.so; do
    case "$(basename "$so")" in
      _test*|_ctypes_test*|_xxtestfuzz*|xxlimited*|nis.*|ossaudiodev.*|_tkinter*) continue ;;
    esac
    put_elf "$so"
  done
  ln -sf "$(basename "$PY")" "$TMP/usr/bin/python3"
  [ -e "$TMP/usr/bin/python" ] || ln -s python3 "$TMP/usr/bin/python"

  log "copying node $NODE_VER"
  put_elf "$NODE"
  [ "$NODE" = /usr/bin/node ] || ln -sf "$NODE" "$TMP/usr/bin/node"
  [ -e "$TMP/usr/bin/nodejs" ] || ln -s node "$TMP/usr/bin/nodejs"

  mkdir -p "$TMP/etc"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n' >"$TMP/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$TMP/etc/group"
  printf 'sandbox\n' >"$TMP/etc/hostname"
else
  log "debootstrap --variant=minbase bookworm from $MIRROR (about a minute)"
  debootstrap --variant=minbase --include=python3,nodejs bookworm "$TMP" "$MIRROR" >"$TMP.debootstrap.log" 2>&1 ||
    { tail -20 "$TMP.debootstrap.log" >&2; rm -f "$TMP.debootstrap.log"; die "debootstrap failed"; }
  rm -f "$TMP.debootstrap.log"
  log "pruning apt caches, docs and locales"
  rm -rf "$TMP"/var/cache/apt/* "$TMP"/var/lib/apt/lists/* "$TMP"/usr/share/doc/* \
    "$TMP"/usr/share/man/* "$TMP"/usr/share/locale/* "$TMP"/usr/share/info/* "$TMP"/var/log/*
fi

log "installing loaders into /opt/switchyard"
mkdir -p "$TMP/opt/switchyard" "$TMP/tmp" "$TMP/proc" "$TMP/dev" "$TMP/sys" "$TMP/work"
install -m 0644 "$HERE/loader/loader.py" "$HERE/loader/loader.js" "$TMP/opt/switchyard/"
chmod 1777 "$TMP/tmp"
# the sandbox runs as uid 65534: everything copied from the host must be world-readable
# (a restrictive umask would break it). Not for debootstrap: that tree has its own /etc/shadow.
[ "$SOURCE" = host ] && chmod -R a+rX "$TMP"

# ---------------------------------------------------------------- check the tree
CHROOT="$(command -v chroot || true)"
if [ "$IS_ROOT" = 1 ] && [ -n "$CHROOT" ]; then
  log "checking the interpreters inside the tree (chroot)"
  env -i PATH=/usr/bin:/bin HOME=/tmp "$CHROOT" "$TMP" /usr/bin/python3 -B -c \
    'import json, hashlib, ssl, sqlite3, ctypes, decimal, zlib, bz2, lzma, asyncio, uuid, base64, runpy, subprocess' ||
    die "python3 in the tree cannot import its standard modules"
  env -i PATH=/usr/bin:/bin HOME=/tmp "$CHROOT" "$TMP" /usr/bin/node -e \
    'require("crypto").createHash("sha256"); require("zlib").gzipSync("x"); new Intl.NumberFormat("de").format(1)' ||
    die "node in the tree does not start"
else
  log "not root: skipping the chroot check"
fi

echo "$KEY" >"$TMP/.switchyard-rootfs"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
log "built $OUT in $(( $(date +%s) - START ))s, $(du -sh "$OUT" | cut -f1)"
command -v runsc >/dev/null || log "note: runsc is not installed (apt-get install -y runsc)"
echo "$OUT"
