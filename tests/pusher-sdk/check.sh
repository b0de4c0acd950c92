#!/usr/bin/env bash
# soketi in front, checked with independent code on both sides:
#
#   tests/pusher-sdk/check.sh WASMHOOK_BIN
#
# Runs wasmhook (embedded queue), posts the fixture webhooks to
# POST /v1/pusher/webhooks signed the way soketi signs them (Node's crypto,
# HMAC-SHA256 hex over JSON.stringify of the body), and checks every
# delivery with Pusher's official Node.js server SDK (`pusher.webhook()`:
# key, signature, events). Needs node and npm (the `pusher` package from
# the npm registry, pinned in package.json).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 WASMHOOK_BIN" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
cd "$here"
npm ci --no-audit --no-fund --silent >/dev/null
node check.js "$bin" "$here/../fixtures/pusher-webhooks.json"
