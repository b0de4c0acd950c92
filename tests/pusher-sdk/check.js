// See check.sh. Exits 0 when every fixture event reached the receiver once,
// in a request Pusher's SDK accepts, and the ingest refused a bad signature.
"use strict";
const { spawn } = require("node:child_process");
const crypto = require("node:crypto");
const fs = require("node:fs");
const http = require("node:http");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const Pusher = require("pusher");

const [bin, fixturesPath] = process.argv.slice(2);
const fixtures = JSON.parse(fs.readFileSync(fixturesPath, "utf8"));
const { id: appId, key, secret } = fixtures.app;
const pusher = new Pusher({ appId, key, secret, cluster: "mt1" });

function fail(msg) {
  console.error("FAIL " + msg);
  process.exitCode = 1;
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function main() {
  // The receiver: every request checked with the SDK.
  const received = [];
  const receiver = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const rawBody = Buffer.concat(chunks).toString("utf8");
      const webhook = pusher.webhook({ headers: req.headers, rawBody });
      if (!webhook.isValid()) fail("the SDK rejects a delivery: " + rawBody);
      received.push({ time: webhook.getTime().getTime(), events: webhook.getEvents() });
      res.writeHead(200).end();
    });
  });
  await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
  const hookUrl = `http://127.0.0.1:${receiver.address().port}/hook`;

  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "wasmhook-sdk-"));
  const config = path.join(dir, "wasmhook.toml");
  fs.writeFileSync(
    config,
    `[server]
listen = "127.0.0.1:${port}"

[delivery]
allow_networks = ["127.0.0.0/8"]

[log]
level = "warn"

[[apps]]
id = "${appId}"
key = "${key}"
secret = "${secret}"
ingest_token = "token"

[[apps.webhooks]]
url = "${hookUrl}"
`
  );
  const wh = spawn(bin, ["serve", "--config", config], { stdio: ["ignore", "inherit", "inherit"] });
  const base = `http://127.0.0.1:${port}`;
  try {
    for (let i = 0; ; i++) {
      try {
        if ((await fetch(`${base}/healthz`)).ok) break;
      } catch (_) {}
      if (i > 300) throw new Error("wasmhook did not start");
      await new Promise((r) => setTimeout(r, 100));
    }

    // What soketi sends: JSON.stringify({time_ms, events}), signed.
    const post = (body, signature) =>
      fetch(`${base}/v1/pusher/webhooks`, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          "x-pusher-key": key,
          "x-pusher-signature": signature,
        },
        body,
      });
    const sign = (body) => crypto.createHmac("sha256", secret).update(body).digest("hex");
    const sent = [];
    const times = [];
    for (const [i, example] of fixtures.examples.entries()) {
      const time_ms = Date.now() - i;
      times.push(time_ms);
      const body = JSON.stringify({ time_ms, events: example.events });
      const res = await post(body, sign(body));
      if (res.status !== 202) fail(`fixture answered ${res.status}: ${await res.text()}`);
      sent.push(...example.events);
    }
    const tampered = JSON.stringify({ time_ms: Date.now(), events: fixtures.examples[0].events });
    const bad = await post(tampered, sign(tampered + " "));
    if (bad.status !== 401) fail(`a wrong signature answered ${bad.status}`);

    for (let i = 0; received.length < sent.length && i < 300; i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 300));
    // Field order is not part of an event: compare with sorted keys.
    const canonical = (e) => JSON.stringify(e, Object.keys(e).sort());
    const got = received.flatMap((r) => r.events).map(canonical).sort();
    const want = sent.map(canonical).sort();
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      fail(`events differ:\n got ${JSON.stringify(got)}\nwant ${JSON.stringify(want)}`);
    }
    const gotTimes = received.map((r) => r.time).sort();
    if (JSON.stringify(gotTimes) !== JSON.stringify(times.sort())) {
      fail(`time_ms differs: got ${gotTimes}, want ${times}`);
    }
    if (process.exitCode !== 1) {
      console.log(`ok   ${sent.length} soketi-signed events delivered, each accepted by Pusher's SDK`);
    }
  } finally {
    wh.kill("SIGTERM");
    receiver.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
