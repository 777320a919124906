#!/usr/bin/env bash
# Offline validation of deploy/: renders the kustomization, validates every resource against the
# Kubernetes JSON schemas shipped in the PyPI package kubernetes-validate (no download at run
# time), checks the CRDs (Certificate, PodMonitor, PrometheusRule), proxy.toml against
# proxy.toml.example and the manifests against each other (deploy/validate.py), checks every alert
# and dashboard query with promtool and runs the alert unit tests.
#
# Installs nothing. Tools it expects on PATH:
#   kubectl (for `kubectl kustomize`) or kustomize
#   python3 >= 3.11 with PyYAML and kubernetes-validate   (pip install kubernetes-validate==1.37.0)
#   promtool                                              (Debian: apt-get install prometheus)
#
# Usage: bash deploy/validate.sh           K8S_VERSION=1.31 bash deploy/validate.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
k8s_version="${K8S_VERSION:-1.30}"

missing=()
if command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build "$here")
elif command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize "$here")
else
  missing+=("kubectl or kustomize (renders deploy/kustomization.yaml)")
fi
if ! command -v python3 >/dev/null 2>&1; then
  missing+=("python3 >= 3.11")
elif ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  missing+=("python3 >= 3.11 (found $(python3 --version 2>&1); tomllib is needed)")
else
  python3 -c 'import yaml' 2>/dev/null || missing+=("Python package PyYAML (pip install PyYAML)")
  python3 -c 'import kubernetes_validate' 2>/dev/null \
    || missing+=("Python package kubernetes-validate (pip install kubernetes-validate==1.37.0)")
fi
command -v promtool >/dev/null 2>&1 || missing+=("promtool (apt-get install prometheus)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "deploy/validate.sh: missing tool(s):" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== render: ${render[*]}"
case "${render[0]}" in
  kustomize) kustomize version 2>/dev/null | sed 's/^/     /' || true ;;
  kubectl) kubectl version --client 2>/dev/null | sed 's/^/     /' || true ;;
esac
"${render[@]}" >"$work/rendered.yaml"

status=0
python3 "$here/validate.py" \
  --rendered "$work/rendered.yaml" \
  --proxy-toml "$here/proxy.toml" \
  --example "$repo/proxy.toml.example" \
  --dashboard "$here/grafana-dashboard.json" \
  --metrics-rs "$repo/src" \
  --k8s-version "$k8s_version" \
  --promql-dir "$work" || status=1

# Each component of deploy/components/ (egress proxy, HSM key): the base rendered with it, from a
# throwaway overlay outside deploy/ (kustomize refuses an overlay inside its base).
component_passed=0
component_failed=0
for dir in "$here"/components/*/; do
  name="$(basename "$dir")"
  overlay="$work/overlay-$name"
  mkdir -p "$overlay"
  rel="$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$here" "$overlay")"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s/components/%s\n' \
    "$rel" "$rel" "$name" >"$overlay/kustomization.yaml"
  echo "== render with components/$name"
  if ! "${render[0]}" "${render[@]:1:$((${#render[@]} - 2))}" "$overlay" >"$overlay/rendered.yaml"; then
    echo "FAIL render with components/$name"
    component_failed=$((component_failed + 1))
    status=1
    continue
  fi
  python3 "$here/validate.py" \
    --rendered "$overlay/rendered.yaml" \
    --proxy-toml "$dir/proxy.toml" \
    --example "$repo/proxy.toml.example" \
    --dashboard "$here/grafana-dashboard.json" \
    --metrics-rs "$repo/src" \
    --k8s-version "$k8s_version" \
    --promql-dir "$overlay" \
    --component "$name" || status=1
  c_passed=0 c_failed=1
  [ -f "$overlay/counts" ] && read -r c_passed c_failed <"$overlay/counts"
  component_passed=$((component_passed + c_passed))
  component_failed=$((component_failed + c_failed))
done

echo "== promtool ($(promtool --version 2>&1 | head -n1))"
promtool_checks=0
promtool_failed=0
run() { # run <description> <command...>: one ok/FAIL line, the command's output only on failure
  local what="$1"; shift
  promtool_checks=$((promtool_checks + 1))
  if out="$("$@" 2>&1)"; then
    echo "ok   $what"
  else
    echo "FAIL $what:"
    printf '%s\n' "$out" | sed 's/^/       /'
    promtool_failed=$((promtool_failed + 1))
  fi
}
if [ -f "$work/prometheus-rules.yaml" ]; then
  run "promtool check rules: PrometheusRule spec" promtool check rules "$work/prometheus-rules.yaml"
  cp "$here/prometheus-rules.test.yaml" "$work/"
  run "promtool test rules: deploy/prometheus-rules.test.yaml" \
    bash -c 'cd "$1" && promtool test rules prometheus-rules.test.yaml' _ "$work"
fi
if [ -f "$work/dashboard-exprs.yaml" ]; then
  run "promtool check rules: every dashboard query parses as PromQL" \
    promtool check rules "$work/dashboard-exprs.yaml"
fi
[ "$promtool_failed" -eq 0 ] || status=1

py_passed=0 py_failed=1
[ -f "$work/counts" ] && read -r py_passed py_failed <"$work/counts"
passed=$((py_passed + component_passed + promtool_checks - promtool_failed))
failed=$((py_failed + component_failed + promtool_failed))
[ "$failed" -eq 0 ] || status=1
[ "$status" -eq 0 ] || echo "deploy/validate.sh: FAILED (see the FAIL lines above)"
echo "validate: $passed passed, $failed failed"
exit "$status"
