#!/usr/bin/env bash
# Smoke-test the gVisor sandbox: config.template.json + the rootfs from build-rootfs.sh + runsc.
# Usage: smoke-test.sh [ROOTFS]   (needs root and runsc; `apt-get install -y runsc`)
# Checks hello world (python, node), stdin/stdout/stderr/exit code, the warm-loader protocol,
# the memory limit (OOM kill), a fork bomb, kill latency, no network, no host files.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOTFS="${1:-${SWITCHYARD_SANDBOX_DIR:-$HOME/.cache/switchyard/sandbox}/gvisor/rootfs}"
[ "$(id -u)" = 0 ] || { echo "smoke-test: needs root" >&2; exit 2; }
command -v runsc >/dev/null || { echo "smoke-test: runsc not installed (apt-get install -y runsc)" >&2; exit 2; }
[ -x "$ROOTFS/usr/bin/python3" ] || { echo "smoke-test: no rootfs at $ROOTFS (run build-rootfs.sh)" >&2; exit 2; }

WORK="$(mktemp -d /tmp/switchyard-gvisor-smoke.XXXXXX)"
STATE="$WORK/state"
RUNSC=(runsc --root "$STATE" --platform=ptrace --network=none --file-access=exclusive)
PASS=0; FAIL=0
ok()  { PASS=$((PASS + 1)); printf 'ok   %s\n' "$*"; }
bad() { FAIL=$((FAIL + 1)); printf 'FAIL %s\n' "$*"; }
ms()  { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
cleanup() {
  local id
  for id in $("${RUNSC[@]}" list -quiet 2>/dev/null); do "${RUNSC[@]}" delete --force "$id" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# bundle ID [args...]  -> bundle dir on stdout; args replace process.args when given
bundle() {
  local id="$1"; shift
  mkdir -p "$WORK/$id"
  sed -e "s|@ROOTFS@|$ROOTFS|" -e "s|@ID@|$id|" "$HERE/config.template.json" >"$WORK/$id/config.json"
  if [ $# -gt 0 ]; then
    python3 - "$WORK/$id/config.json" "$@" <<'EOF'
import json, sys
p = sys.argv[1]; c = json.load(open(p)); c["process"]["args"] = sys.argv[2:]
c["process"]["env"] = [e for e in c["process"]["env"] if not e.startswith("SWITCHYARD_READY=")]
json.dump(c, open(p, "w"), indent=2)
EOF
  fi
  echo "$WORK/$id"
}
# payload JSON -> "<len>\n<json>" (byte length)
payload() { local LC_ALL=C; printf '%d\n%s' "${#1}" "$1"; }

# 1. python hello world: stdin in, stdout and stderr apart, exit code out
B=$(bundle py1 /usr/bin/python3 -c 'import sys; d=sys.stdin.read(); print("out", d.upper()); print("err", file=sys.stderr); sys.exit(3)')
set +e; printf 'hello' | "${RUNSC[@]}" run --bundle "$B" py1 >"$WORK/o" 2>"$WORK/e"; rc=$?; set -e
[ $rc = 3 ] && [ "$(cat "$WORK/o")" = "out HELLO" ] && [ "$(cat "$WORK/e")" = "err" ] &&
  ok "python: stdin, stdout, stderr, exit 3" || bad "python: rc=$rc out=$(head -c 200 "$WORK/o") err=$(head -c 300 "$WORK/e")"

# 2. node hello world
B=$(bundle js1 /usr/bin/node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{console.log("out",s);console.error("err");process.exit(4)})')
set +e; printf 'hi' | "${RUNSC[@]}" run --bundle "$B" js1 >"$WORK/o" 2>"$WORK/e"; rc=$?; set -e
[ $rc = 4 ] && [ "$(cat "$WORK/o")" = "out hi" ] && [ "$(cat "$WORK/e")" = "err" ] &&
  ok "node: stdin, stdout, stderr, exit 4" || bad "node: rc=$rc out=$(head -c 200 "$WORK/o") err=$(head -c 300 "$WORK/e")"

# 3. warm loader: sandbox started first, payload written later (template args = loader.py)
warm() { # warm ID LOADER_ARGS_JSON PAYLOAD_JSON EXPECTED_STDOUT
  local id="$1" args="$2" pl="$3" want="$4" t0 t1 rc
  B=$(bundle "$id")
  python3 - "$B/config.json" "$args" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1])); c["process"]["args"] = json.loads(sys.argv[2]); json.dump(c, open(sys.argv[1], "w"))
EOF
  mkfifo "$WORK/$id.in"
  t0=$(date +%s%N)
  "${RUNSC[@]}" run --bundle "$B" "$id" <"$WORK/$id.in" >"$WORK/$id.out" 2>"$WORK/$id.err" &
  local pid=$!
  exec 7>"$WORK/$id.in"
  for _ in $(seq 1 300); do grep -qa READY "$WORK/$id.err" 2>/dev/null && break; sleep 0.01; done
  local ready; ready=$(ms "$t0")
  sleep 0.2
  t1=$(date +%s%N)
  { payload "$pl"; printf 'STDIN'; } >&7
  exec 7>&-
  set +e; wait "$pid"; rc=$?; set -e
  local done_ms; done_ms=$(ms "$t1")
  if [ $rc = 0 ] && [ "$(cat "$WORK/$id.out")" = "$want" ]; then
    ok "warm loader $id: ready after ${ready}ms, payload->exit ${done_ms}ms"
  else
    bad "warm loader $id: rc=$rc out=$(head -c 200 "$WORK/$id.out") err=$(head -c 300 "$WORK/$id.err" | tr -d '\0')"
  fi
}
warm warmpy '["/usr/bin/python3","-B","/opt/switchyard/loader.py"]' \
  '{"argv":["python3","main.py","x"],"files":{"main.py":"import sys\nprint(sys.argv[1], sys.stdin.read())\n"}}' "x STDIN"
warm warmjs '["/usr/bin/node","/opt/switchyard/loader.js"]' \
  '{"argv":["node","main.js","y"],"files":{"main.js":"let s=\"\";process.stdin.on(\"data\",d=>s+=d).on(\"end\",()=>console.log(process.argv[2],s))\n"}}' "y STDIN"
warm warmexec '["/usr/bin/python3","-B","/opt/switchyard/loader.py"]' \
  '{"argv":["node","main.js"],"files":{"main.js":"process.stdin.pipe(process.stdout)\n"}}' "STDIN"

# 4. memory bomb under the 128 MiB limit: killed (137); with a pre-created v1 memory cgroup
#    the caller can read memory.oom_control afterwards (runsc does not write limits into it!)
B=$(bundle oom1 /usr/bin/python3 -c 'a=[]
while True: a.append(bytearray(1<<20))')
MEMCG=""
if [ -d /sys/fs/cgroup/memory ]; then
  MEMCG=/sys/fs/cgroup/memory/switchyard/oom1
  mkdir -p "$MEMCG"; echo 134217728 >"$MEMCG/memory.limit_in_bytes"
fi
t0=$(date +%s%N)
set +e; timeout 60 "${RUNSC[@]}" run --bundle "$B" oom1 >/dev/null 2>&1; rc=$?; set -e
t=$(ms "$t0")
oomk=""; [ -n "$MEMCG" ] && oomk=$(awk '/oom_kill /{print $2}' "$MEMCG/memory.oom_control") && rmdir "$MEMCG"
[ $rc = 137 ] && { [ -z "$MEMCG" ] || [ "$oomk" = 1 ]; } &&
  ok "memory bomb: exit 137 after ${t}ms${MEMCG:+, oom_kill=$oomk}" || bad "memory bomb: rc=$rc oom_kill=$oomk"

# 5. fork bomb: contained by pids/memory limits, the sandbox dies, the host is fine
B=$(bundle fork1 /usr/bin/python3 -c 'import os, time
while True:
    if os.fork() == 0: time.sleep(60)')
t0=$(date +%s%N)
set +e; timeout 60 "${RUNSC[@]}" run --bundle "$B" fork1 >/dev/null 2>&1; rc=$?; set -e
t=$(ms "$t0")
[ $rc != 0 ] && [ $rc != 124 ] && ok "fork bomb: sandbox ended with $rc after ${t}ms" || bad "fork bomb: rc=$rc"

# 6. busy loop: runsc kill ID KILL, then delete
B=$(bundle busy1 /usr/bin/python3 -c 'print("go", flush=True)
while True: pass')
"${RUNSC[@]}" run --bundle "$B" busy1 >"$WORK/busy.out" 2>/dev/null &
pid=$!
for _ in $(seq 1 300); do grep -q go "$WORK/busy.out" && break; sleep 0.01; done
t0=$(date +%s%N)
"${RUNSC[@]}" kill busy1 KILL
set +e; wait $pid; rc=$?; set -e
t=$(ms "$t0")
"${RUNSC[@]}" delete --force busy1 >/dev/null 2>&1 || true
[ $rc = 137 ] && ok "busy loop: runsc kill -> exit 137 in ${t}ms" || bad "busy loop: rc=$rc"

# 7. isolation: no network to the host's loopback services, only the rootfs (no host files),
#    read-only root, unprivileged user
echo secret >"$WORK/host-marker"
B=$(bundle iso1 /usr/bin/python3 -c 'import os, socket, sys
r = []
try:
    socket.create_connection(("127.0.0.1", 5432), timeout=2); r.append("connected")
except OSError as e: r.append(type(e).__name__)
try: open("/etc/shadow").read(); r.append("read shadow")
except OSError as e: r.append("no shadow")
r.append(os.path.exists(sys.argv[1]))
try: open("/usr/x", "w"); r.append("wrote")
except OSError as e: r.append(type(e).__name__)
r.append(os.getuid())
print(r)' "$WORK/host-marker")
set +e; "${RUNSC[@]}" run --bundle "$B" iso1 >"$WORK/o" 2>"$WORK/e"; rc=$?; set -e
[ "$(cat "$WORK/o")" = "['ConnectionRefusedError', 'no shadow', False, 'PermissionError', 65534]" ] &&
  ok "isolation: $(cat "$WORK/o")" || bad "isolation: rc=$rc $(cat "$WORK/o") $(head -c 300 "$WORK/e")"

echo "smoke-test: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
