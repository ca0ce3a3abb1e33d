// kafkajs against a Tributary node: produce keyed records with headers
// (gzip and uncompressed, acks all), then a consumer group of two kafkajs
// consumers reads every record, commits, and the committed offsets reach the
// partitions' ends.
//
// usage: node kafkajs_check.js BROKER TOPIC GROUP
// Prints one JSON line {"produced": N, "consumed": N, "committed": N, "ends": N};
// exits 1 on any mismatch.
const { Kafka, CompressionTypes, logLevel } = require("kafkajs");

const [broker, topic, group] = process.argv.slice(2);
const kafka = new Kafka({ clientId: "kafkajs-check", brokers: [broker], logLevel: logLevel.NOTHING });
const N = 400;

async function main() {
  const producer = kafka.producer();
  await producer.connect();
  const sent = new Map();
  for (const [i, compression] of [[0, CompressionTypes.None], [1, CompressionTypes.GZIP]]) {
    const messages = [];
    for (let j = 0; j < N / 2; j++) {
      const n = i * (N / 2) + j;
      const m = { key: `k${n % 13}`, value: `kafkajs ${n}`, headers: { n: String(n), bin: Buffer.from([0, 255]) } };
      messages.push(m);
      sent.set(m.value, m);
    }
    await producer.send({ topic, acks: -1, compression, messages });
  }
  await producer.disconnect();

  const got = new Map();
  const consumers = [];
  let done;
  const all = new Promise((resolve) => { done = resolve; });
  for (let c = 0; c < 2; c++) {
    const consumer = kafka.consumer({ groupId: group, sessionTimeout: 10000, heartbeatInterval: 500 });
    await consumer.connect();
    await consumer.subscribe({ topic, fromBeginning: true });
    await consumer.run({
      autoCommitInterval: 100,
      eachMessage: async ({ message }) => {
        const value = message.value.toString();
        got.set(value, message);
        if (got.size === sent.size) done();
      },
    });
    consumers.push(consumer);
  }
  const timeout = setTimeout(() => done(), 60000);
  await all;
  clearTimeout(timeout);

  const errors = [];
  for (const [value, m] of sent) {
    const g = got.get(value);
    if (!g) { errors.push(`missing ${value}`); continue; }
    if (g.key.toString() !== m.key) errors.push(`key of ${value}`);
    if (g.headers.n.toString() !== m.headers.n) errors.push(`header n of ${value}`);
    if (!Buffer.from(g.headers.bin).equals(m.headers.bin)) errors.push(`header bin of ${value}`);
  }
  // Offsets are committed as the consumers go; wait for them to reach the ends.
  const admin = kafka.admin();
  await admin.connect();
  const ends = (await admin.fetchTopicOffsets(topic)).reduce((s, p) => s + Number(p.high), 0);
  let committed = 0;
  for (let i = 0; i < 100 && committed !== ends; i++) {
    await new Promise((r) => setTimeout(r, 200));
    const offs = await admin.fetchOffsets({ groupId: group, topics: [topic] });
    committed = offs[0].partitions.reduce((s, p) => s + Math.max(0, Number(p.offset)), 0);
  }
  await admin.disconnect();
  for (const c of consumers) await c.disconnect();
  if (committed !== ends) errors.push(`committed ${committed} of ${ends}`);
  console.log(JSON.stringify({ produced: sent.size, consumed: got.size, committed, ends, errors: errors.slice(0, 5) }));
  process.exit(errors.length ? 1 : 0);
}

main().catch((e) => {
  console.log(JSON.stringify({ errors: [String(e && e.stack ? e.stack : e)] }));
  process.exit(1);
});
