// Publish through an AMQP 0-9-1 server with amqplib (npm, the Node.js client,
// one we did not write) on a confirm channel.
//
// Usage:
//   node amqplib_check.js --host H --port P --exchange E --routing-key R --count N
//        [--user U --password PW] [--vhost V] [--body-size B] [--amqplain]
//        [--expect-auth-failure | --mandatory-unroutable | --expect-nack]
//        [--verify-url http://H:P]
//
// Default mode: publish N persistent messages, body {"n": i, "src": "amqplib"}
// (or B pseudo-random non-UTF-8 bytes with --body-size), contentType
// application/json, messageId amqplib-{i}, headers {"n": i, "client":
// "amqplib"}, timestamp = the run's start in whole seconds; each publish's
// confirm callback must report an ack, then waitForConfirms() must resolve.
// Prints {"published": N}, exit 0. frameMax 131072 is asked for.
// --amqplain: log in with AMQPLAIN instead of PLAIN.
// --expect-auth-failure: connect must fail with an error naming 403 /
//   ACCESS_REFUSED; exit 0 if so, 1 if the connection opens.
// --mandatory-unroutable: publish N with mandatory; each must come back as a
//   basic.return (the channel's 'return' event) and still be acked.
// --expect-nack: each of the N publishes must be nacked.
// --verify-url: read the records back over Tributary's HTTP API (topic E, or R
//   when E is ""; key R) and check body, key, headers and timestamp.
// Exit 1 (reason on stderr) on anything else; 30 s overall timeout.
"use strict";
const amqp = require("amqplib");
const credentials = require("amqplib/lib/credentials");

const SRC = "amqplib";
const fail = (m) => {
  console.error(`amqplib_check: ${m}`);
  process.exit(1);
};

function parseArgs(argv) {
  const flags = new Set(["--expect-auth-failure", "--mandatory-unroutable", "--expect-nack", "--amqplain"]);
  const a = {
    host: "127.0.0.1", port: null, exchange: "", "routing-key": null, count: "10",
    user: "guest", password: "guest", vhost: "/", "body-size": null, "verify-url": null,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (flags.has(arg)) { a[arg.slice(2)] = true; continue; }
    if (!arg.startsWith("--") || !(arg.slice(2) in a) || i + 1 >= argv.length) fail(`bad argument ${arg}`);
    a[arg.slice(2)] = argv[++i];
  }
  if (a.port === null || a["routing-key"] === null) fail("--port and --routing-key are required");
  const modes = ["expect-auth-failure", "mandatory-unroutable", "expect-nack"].filter((m) => a[m]);
  if (modes.length > 1) fail(`choose one of ${modes.join(", ")}`);
  return {
    host: a.host, port: Number(a.port), exchange: a.exchange, routingKey: a["routing-key"],
    count: Number(a.count), user: a.user, password: a.password, vhost: a.vhost,
    bodySize: a["body-size"] === null ? null : Number(a["body-size"]),
    amqplain: !!a.amqplain, expectAuthFailure: !!a["expect-auth-failure"],
    mandatoryUnroutable: !!a["mandatory-unroutable"], expectNack: !!a["expect-nack"],
    verifyUrl: a["verify-url"] && a["verify-url"].replace(/\/+$/, ""),
  };
}

// Deterministic per message (xorshift); 0xff first marks it as not UTF-8.
function bodyFor(i, size) {
  if (size === null) return Buffer.from(JSON.stringify({ n: i, src: SRC }));
  const b = Buffer.alloc(size);
  let x = (i + 1) * 2654435761 >>> 0 || 1;
  for (let k = 0; k < size; k++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[k] = x & 0xff;
  }
  if (size) b[0] = 0xff;
  return b;
}

async function httpJson(url) {
  const r = await fetch(url, { signal: AbortSignal.timeout(10000) });
  if (r.status === 404) return null;
  if (!r.ok) fail(`GET ${url}: ${r.status} ${await r.text()}`);
  return r.json();
}

async function endOffsets(base, topic) {
  const t = await httpJson(`${base}/v1/topics/${encodeURIComponent(topic)}`);
  const m = new Map();
  if (t) for (const p of t.partitions) m.set(p.partition, p.end_offset);
  return m;
}

function header(rec, name) {
  const h = rec.headers || [];
  if (!Array.isArray(h)) return h[name];
  const kv = h.find((x) => x.key === name);
  return kv ? kv.value : undefined;
}

async function verify(a, topic, before, tsSeconds) {
  const after = await endOffsets(a.verifyUrl, topic);
  const seen = new Map();
  for (const [part, end] of after) {
    let off = before.get(part) || 0;
    while (off < end) {
      const page = await httpJson(
        `${a.verifyUrl}/v1/topics/${encodeURIComponent(topic)}/partitions/${part}/records?offset=${off}&limit=1000`);
      if (!page || page.records.length === 0) break;
      for (const rec of page.records) {
        const mid = header(rec, "amqp.message_id");
        if (typeof mid === "string" && mid.startsWith(`${SRC}-`)) seen.set(mid, rec);
      }
      off = page.next_offset;
    }
  }
  for (let i = 0; i < a.count; i++) {
    const id = `${SRC}-${i}`;
    const rec = seen.get(id);
    if (!rec) fail(`verify: message ${id} not found in topic ${topic} (${seen.size} found)`);
    let key = rec.key;
    if (key != null && rec.encoding === "base64") key = Buffer.from(key, "base64").toString();
    if (key !== a.routingKey) fail(`verify: ${id} key ${JSON.stringify(key)} != ${a.routingKey}`);
    if (a.bodySize === null) {
      const v = rec.value;
      if (!v || v.n !== i || v.src !== SRC || Object.keys(v).length !== 2) fail(`verify: ${id} value ${JSON.stringify(v)}`);
    } else if (rec.encoding !== "base64") {
      fail(`verify: ${id} binary body not fetched as base64`);
    } else if (!Buffer.from(rec.value, "base64").equals(bodyFor(i, a.bodySize))) {
      fail(`verify: ${id} body differs`);
    }
    if (header(rec, "client") !== SRC) fail(`verify: ${id} header client = ${header(rec, "client")}`);
    if (header(rec, "content-type") !== "application/json") fail(`verify: ${id} header content-type = ${header(rec, "content-type")}`);
    if (rec.timestamp !== tsSeconds * 1000) fail(`verify: ${id} timestamp ${rec.timestamp} != ${tsSeconds * 1000}`);
  }
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const topic = a.exchange || a.routingKey;
  const before = a.verifyUrl ? await endOffsets(a.verifyUrl, topic) : new Map();
  const sockOpts = { timeout: 10000 };
  if (a.amqplain) sockOpts.credentials = credentials.amqplain(a.user, a.password);

  let conn;
  try {
    conn = await amqp.connect({
      protocol: "amqp", hostname: a.host, port: a.port, username: a.user, password: a.password,
      vhost: a.vhost, frameMax: 131072,
    }, sockOpts);
  } catch (e) {
    const msg = String(e && e.message);
    if (a.expectAuthFailure && /403|ACCESS[-_]REFUSED/.test(msg)) {
      console.log(JSON.stringify({ auth_failure: msg }));
      process.exit(0);
    }
    fail(`connect failed: ${msg}`);
  }
  if (a.expectAuthFailure) {
    await conn.close();
    fail("connection opened although authentication failure was expected");
  }
  conn.on("error", (e) => fail(`connection error: ${e.message}`));
  conn.on("blocked", (reason) => console.error(`amqplib_check: connection blocked: ${reason}`));
  const ch = await conn.createConfirmChannel();
  ch.on("error", (e) => fail(`channel error: ${e.message}`));
  const returns = [];
  ch.on("return", (msg) => returns.push(msg));

  const ts = Math.floor(Date.now() / 1000);
  let acks = 0, nacks = 0;
  const tally = (results) => {
    for (const r of results) { if (r === "ack") acks++; else nacks++; }
  };
  let pending = [];
  for (let i = 0; i < a.count; i++) {
    const opts = {
      contentType: "application/json", messageId: `${SRC}-${i}`, headers: { n: i, client: SRC },
      persistent: true, timestamp: ts, mandatory: a.mandatoryUnroutable,
    };
    let ok;
    pending.push(new Promise((resolve) => {
      ok = ch.publish(a.exchange, a.routingKey, bodyFor(i, a.bodySize), opts,
        (err) => resolve(err ? "nack" : "ack"));
    }));
    if (!ok) await new Promise((r) => ch.once("drain", r));
    // Bound the unconfirmed window.
    if (pending.length >= 256) { tally(await Promise.all(pending)); pending = []; }
  }
  tally(await Promise.all(pending));
  try {
    await ch.waitForConfirms();
  } catch (e) {
    if (!a.expectNack) fail(`waitForConfirms: ${e.message}`);
  }
  if (a.expectNack) {
    if (nacks !== a.count) fail(`${nacks} of ${a.count} nacked (${acks} acked)`);
    console.log(JSON.stringify({ nacked: nacks }));
  } else if (nacks) {
    fail(`${nacks} of ${a.count} publishes were nacked`);
  } else if (acks !== a.count) {
    fail(`${acks} of ${a.count} publishes acked`);
  } else if (a.mandatoryUnroutable) {
    // basic.return arrives before the ack of the same message.
    if (returns.length !== a.count) fail(`${returns.length} of ${a.count} came back as basic.return`);
    const f = returns[0].fields;
    console.log(JSON.stringify({ unroutable: returns.length, reply_code: f.replyCode, reply_text: f.replyText }));
  } else {
    if (returns.length) fail(`${returns.length} messages came back as basic.return`);
    const out = { published: acks };
    if (a.verifyUrl) {
      await verify(a, topic, before, ts);
      out.verified = a.count;
    }
    console.log(JSON.stringify(out));
  }
  await ch.close();
  await conn.close();
}

setTimeout(() => fail("timed out after 30 s"), 30000).unref();
main().then(() => process.exit(0), (e) => fail(e && e.stack || String(e)));
