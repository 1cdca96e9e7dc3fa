#!/usr/bin/env bash
# The Kubernetes manifests and the Dockerfile, checked without a cluster or a
# container engine:
#
#  * packaging/k8s/*.yaml against the Kubernetes schemas with
#    kubernetes-validate --strict (unknown fields are errors), for the
#    oldest and newest Kubernetes versions it knows of the range we claim;
#    a deliberately broken copy must be refused, so the validator is shown
#    to fail on an invalid manifest;
#  * tests/packaging/manifests.py: what the schemas cannot see (replicas 1,
#    probes on /health at the container's port, the grace period above the
#    drain, the restrictive securityContext, the same UID, state dir and port
#    in the manifest and the Dockerfile) and a static reading of the
#    Dockerfile (stages, COPY sources that exist, the binary path, the user,
#    tini installed, HEALTHCHECK using flags `agentd health --help` lists).
#
# Not tested (no engine here): that the image builds and runs.
#
#   bash tests/packaging/manifests.sh
#
# kubernetes-validate comes from a virtualenv outside the repository,
# AGENTD_TEST_VENV (default /var/cache/agentd-tests/venv; .ci/run creates it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${AGENTD_TEST_VENV:-/var/cache/agentd-tests/venv}
KV=$VENV/bin/kubernetes-validate
[ -x "$KV" ] || {
  echo "error: $KV missing; create it: python3 -m venv $VENV && $VENV/bin/pip install kubernetes-validate==1.37.0" >&2
  exit 1
}
# The Kubernetes versions the manifests must be valid for.
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}

checks=0
failed=0
ok() { checks=$((checks + 1)); printf '  ok    %s\n' "$*"; }
fail() { checks=$((checks + 1)); failed=$((failed + 1)); printf '  FAIL  %s\n' "$*"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== kubernetes-validate --strict"
for manifest in "$ROOT"/packaging/k8s/*.yaml; do
  for v in $K8S_VERSIONS; do
    if "$KV" --strict -k "$v" "$manifest" >"$work/kv.log" 2>&1; then
      ok "$(basename "$manifest") is valid for Kubernetes $v ($(grep -c passed "$work/kv.log") resources)"
    else
      sed 's/^/    /' "$work/kv.log"
      fail "$(basename "$manifest") is invalid for Kubernetes $v"
    fi
  done
done
# Negative controls: a misspelt field and a wrong type must be refused.
sed 's/^  replicas: 1$/  replica: 1/' "$ROOT/packaging/k8s/agentd.yaml" >"$work/typo.yaml"
sed 's/terminationGracePeriodSeconds: 30/terminationGracePeriodSeconds: "thirty"/' \
  "$ROOT/packaging/k8s/agentd.yaml" >"$work/type.yaml"
for bad in typo type; do
  if cmp -s "$work/$bad.yaml" "$ROOT/packaging/k8s/agentd.yaml"; then
    fail "negative control '$bad' did not change the manifest"
  elif "$KV" --strict "$work/$bad.yaml" >"$work/kv.log" 2>&1; then
    fail "kubernetes-validate accepted a broken manifest ($bad)"
  else
    ok "kubernetes-validate refuses a broken manifest ($bad): $(grep -m1 -oE 'ERROR.{0,90}' "$work/kv.log")"
  fi
done

echo "== manifest and Dockerfile consistency"
AGENTD_BIN=${AGENTD_BIN:-$ROOT/target/debug/agentd}
[ -x "$AGENTD_BIN" ] || (cd "$ROOT" && cargo build --locked --quiet --bin agentd)
"$VENV/bin/python" "$ROOT/tests/packaging/manifests.py" "$ROOT" "$AGENTD_BIN" | tee "$work/py.log"
read -r c f < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$work/py.log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}')
checks=$((checks + ${c:-0}))
failed=$((failed + ${f:-1}))

echo "checks: $checks, failed: $failed"
[ "$failed" = 0 ]
