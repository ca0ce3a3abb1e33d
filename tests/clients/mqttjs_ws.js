// MQTT over WebSockets with mqtt.js (the browser MQTT client): subscribe,
// publish QoS 1, receive. Usage: node mqttjs_ws.js ws://HOST:PORT/mqtt
const mqtt = require("mqtt");
const url = process.argv[2];
const N = 10;
const got = [];
const fail = (m) => { console.error(m); process.exit(1); };
setTimeout(() => fail(`timed out; got ${got.length}`), 15000);
const sub = mqtt.connect(url, { clientId: "mqttjs-sub", protocolVersion: 5 });
sub.on("error", (e) => fail(`sub: ${e}`));
sub.on("message", (topic, payload) => {
  got.push([topic, payload.toString()]);
  if (got.length === N) {
    for (let i = 0; i < N; i++) {
      if (!got.some(([t, p]) => t === `js/ws/${i}` && p === `m${i}`)) fail(`missing ${i}`);
    }
    console.log(`mqtt.js over WebSocket: ${N} acknowledged and delivered`);
    process.exit(0);
  }
});
sub.on("connect", () => {
  sub.subscribe("js/#", { qos: 1 }, (err) => {
    if (err) fail(`subscribe: ${err}`);
    const pub = mqtt.connect(url, { clientId: "mqttjs-pub", protocolVersion: 4 });
    pub.on("error", (e) => fail(`pub: ${e}`));
    pub.on("connect", async () => {
      for (let i = 0; i < N; i++) {
        await pub.publishAsync(`js/ws/${i}`, `m${i}`, { qos: 1 });
      }
    });
  });
});
