// mqtt.js (npm) over WebSockets against the complete broker: QoS 2 both
// ways on topic names with a leading slash, non-ASCII, spaces and `$`, a
// v5 subscription identifier on each delivery, and a shared subscription
// whose two members split the messages (each message to exactly one).
// Usage: node mqttjs_complete.js ws://HOST:PORT/mqtt. Exit 0 when all holds.
const mqtt = require("mqtt");
const url = process.argv[2];
const fail = (m) => { console.error(m); process.exit(1); };
setTimeout(() => fail("timed out"), 30000);

const topics = ["/leading/js", "Café/js", "spaces in/js", "$dollar/js"];
const N = 20;

async function main() {
  const sub = await mqtt.connectAsync(url, { clientId: "js-q2", protocolVersion: 5 });
  const got = [];
  sub.on("message", (t, p, packet) => {
    const ids = packet.properties ? packet.properties.subscriptionIdentifier : undefined;
    got.push({ t, p: p.toString(), qos: packet.qos, ids: [].concat(ids ?? []) });
  });
  const granted = await sub.subscribeAsync(
    { "/leading/#": { qos: 2 }, "Café/#": { qos: 2 }, "spaces in/#": { qos: 2 }, "$dollar/#": { qos: 2 } },
    { properties: { subscriptionIdentifier: 7 } },
  );
  if (granted.length !== 4 || granted.some((g) => g.qos !== 2)) fail(`granted ${JSON.stringify(granted)}`);

  const shared = [[], []];
  const members = [];
  for (let m = 0; m < 2; m++) {
    const c = await mqtt.connectAsync(url, { clientId: `js-member-${m}`, protocolVersion: m ? 4 : 5 });
    c.on("message", (t, p) => shared[m].push(p.toString()));
    const g = await c.subscribeAsync("$share/jsg/jshare/#", { qos: 1 });
    if (g[0].qos !== 1) fail(`shared granted ${JSON.stringify(g)}`);
    members.push(c);
  }

  const pub = await mqtt.connectAsync(url, { clientId: "js-pub", protocolVersion: 5 });
  for (const t of topics) await pub.publishAsync(t, `v-${t}`, { qos: 2 });
  for (let i = 0; i < N; i++) await pub.publishAsync(`jshare/${i}`, `s${i}`, { qos: 1 });

  for (let waited = 0; got.length < topics.length || shared[0].length + shared[1].length < N; waited += 100) {
    if (waited > 20000) fail(`got ${got.length} of ${topics.length}, shared ${shared[0].length}+${shared[1].length} of ${N}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  await new Promise((r) => setTimeout(r, 500)); // a duplicate would show up by now
  for (const t of topics) {
    const d = got.filter((x) => x.t === t);
    if (d.length !== 1) fail(`${t}: ${d.length} deliveries`);
    if (d[0].p !== `v-${t}` || d[0].qos !== 2) fail(`${t}: ${JSON.stringify(d[0])}`);
    if (!d[0].ids.includes(7)) fail(`${t}: subscription identifiers ${d[0].ids}`);
  }
  if (got.length !== topics.length) fail(`extra deliveries: ${JSON.stringify(got)}`);
  const all = shared[0].concat(shared[1]).sort();
  const want = [...Array(N).keys()].map((i) => `s${i}`).sort();
  if (JSON.stringify(all) !== JSON.stringify(want)) fail(`shared: ${JSON.stringify(shared)}`);
  if (!shared[0].length || !shared[1].length) fail(`one member got everything: ${shared[0].length}/${shared[1].length}`);
  console.log(`mqtt.js complete: ${topics.length} QoS 2 topics, shared ${shared[0].length}+${shared[1].length}`);
  process.exit(0);
}
main().catch((e) => fail(e.stack || String(e)));
