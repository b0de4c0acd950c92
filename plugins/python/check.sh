#!/usr/bin/env bash
# End-to-end check of the Python example plugin on the wasmhook host.
#
#   plugins/python/check.sh WASMHOOK_BIN UPPERCASE.wasm
#
# Runs `wasmhook plugin test` on three cases and checks the decisions:
# transform (field upper-cased), the plugin's own error (WIT err), and an
# uncaught Python exception (a trap). Exits non-zero on any mismatch. Needs
# python3 (to read the JSON output). The first run compiles the ~18 MB
# component (tens of seconds with a debug host); later runs of the same file
# hit wasmhook's compile cache.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 WASMHOOK_BIN UPPERCASE.wasm" >&2
    exit 2
fi
bin="$1"
wasm="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo '{"name":"client_event","channel":"private-a","event":"client-typing","data":"{}"}' >"$work/event.json"

# run NAME EXPECTED_DECISION PYTHON_ASSERTION [--config k=v ...]
failures=0
run() {
    local name="$1" want="$2" check="$3"
    shift 3
    local out
    # plugin test exits 1 when the plugin fails; the JSON line says how.
    out="$("$bin" plugin test "$wasm" --event "$work/event.json" --json --deadline 2s "$@" 2>"$work/stderr" || true)"
    if printf '%s' "$out" | python3 -c '
import json, sys
want, check = sys.argv[1], sys.argv[2]
r = json.loads(sys.stdin.read())
assert r["decision"] == want, r
assert eval(check, {"r": r}), r
print("    elapsed_us:", r["elapsed_us"])
' "$want" "$check"; then
        echo "ok   $name"
    else
        echo "FAIL $name: $out" >&2
        cat "$work/stderr" >&2
        failures=$((failures + 1))
    fi
}

run transform transform \
    'r["message"]["payload"]["event"] == "CLIENT-TYPING" and r["message"]["metadata"] == {"uppercase.field": "event"}' \
    --config field=event
run plugin-error failed \
    'r["error"].startswith("returned an error: uppercase: field `missing` is missing")' \
    --config field=missing --config strict=true
run exception-traps failed \
    'r["error"].startswith("trapped:") and "RuntimeError: explode=true" in r["error"]' \
    --config explode=true

echo "$((3 - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
