#!/usr/bin/env bash
# Offline checks of this folder (no cluster needed):
#   pip install kubernetes-validate yamllint jsonschema
#   bash validate.sh [path/to/wasmhook]
# 1. every Kubernetes object against the Kubernetes JSON schemas (strict:
#    unknown fields are errors), for the oldest and newest versions targeted;
# 2. the ScaledObject against KEDA's CRD fields (check_scaledobject.py);
# 3. YAML lint;
# 4. with a wasmhook binary: the ConfigMap's wasmhook.toml with
#    `wasmhook config check`, with and without the example Secret's values.
set -euo pipefail
cd "$(dirname "$0")"
objects=(namespace.yaml configmap.yaml secret.example.yaml server.yaml worker.yaml hpa.yaml)
for version in 1.30.0 1.37.0; do
  kubernetes-validate --strict --quiet -k "$version" "${objects[@]}"
done
python3 check_scaledobject.py keda-scaledobject.yaml
yamllint -d '{extends: default, rules: {line-length: {max: 100}, document-start: disable}}' \
  ./*.yaml
if [ $# -ge 1 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 - "$tmp" <<'PY'
import shlex, sys, yaml
out = sys.argv[1]
config = yaml.safe_load(open("configmap.yaml"))["data"]["wasmhook.toml"]
open(f"{out}/wasmhook.toml", "w").write(config)
secret = yaml.safe_load(open("secret.example.yaml"))["stringData"]
with open(f"{out}/env", "w") as f:
    for key, value in secret.items():
        f.write(f"export {key}={shlex.quote(value)}\n")
PY
  "$1" config check --config "$tmp/wasmhook.toml"
  (set -a; . "$tmp/env"; "$1" config check --config "$tmp/wasmhook.toml")
fi
echo "all checks passed"
