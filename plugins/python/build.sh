#!/usr/bin/env bash
# Build the Python example plugin `uppercase` into a WebAssembly component.
#
#   plugins/python/build.sh OUTPUT.wasm
#
# Creates a virtualenv (default plugins/python/.venv, or $VENV) when missing,
# installs the pinned componentize-py into it, and runs componentize-py
# against wit/plugin.wit, world wasmhook:plugin/plugin. Exits non-zero on any
# failure. Needs python3 (with venv) and access to PyPI on the first run.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTPUT.wasm" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$here/../../wit"
venv="${VENV:-$here/.venv}"
out="$1"
case "$out" in
    /*) ;;
    *) out="$PWD/$out" ;;
esac
mkdir -p "$(dirname "$out")"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ "$("$venv/bin/python" -m pip show componentize-py 2>/dev/null | sed -n 's/^Version: //p')" != "$COMPONENTIZE_PY_VERSION" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# Build from a copy of the sources: componentize-py writes __pycache__ next to
# the modules it loads, and this keeps stray files out of the component.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/uppercase/app.py" "$work/"
cd "$work"
"$venv/bin/componentize-py" -q \
    -d "$wit" -w wasmhook:plugin/plugin \
    componentize app -p . -o "$out"
test -s "$out"
echo "built $out ($(stat -c %s "$out") bytes)"
