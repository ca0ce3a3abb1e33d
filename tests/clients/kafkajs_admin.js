// kafkajs's admin client against a Tributary node: create a topic with
// configs, describe and change them, add partitions, delete the topic.
//
// usage: node kafkajs_admin.js BOOTSTRAP PREFIX GROUP
// Prints one JSON line; exits 1 on any mismatch.
const { Kafka, ConfigResourceTypes, logLevel } = require('kafkajs');

const [bootstrap, prefix] = process.argv.slice(2);
const topic = `${prefix}-kjs-admin`;

async function main() {
  const kafka = new Kafka({ brokers: [bootstrap], clientId: 'kafkajs-admin', logLevel: logLevel.NOTHING });
  const admin = kafka.admin();
  await admin.connect();
  const summary = {};
  summary.created = await admin.createTopics({
    topics: [{ topic, numPartitions: 2, configEntries: [{ name: 'retention.ms', value: '60000' }] }],
  });
  summary.created_again = await admin.createTopics({ topics: [{ topic, numPartitions: 2 }] });
  const describe = async () => {
    const d = await admin.describeConfigs({
      includeSynonyms: false,
      resources: [{ type: ConfigResourceTypes.TOPIC, name: topic }],
    });
    const entries = d.resources[0].configEntries;
    return Object.fromEntries(entries.map((e) => [e.configName, e.configValue]));
  };
  summary.retention_ms = (await describe())['retention.ms'];
  await admin.alterConfigs({
    validateOnly: false,
    resources: [{ type: ConfigResourceTypes.TOPIC, name: topic,
                  configEntries: [{ name: 'retention.bytes', value: '2097152' }] }],
  });
  const after = await describe();
  summary.retention_bytes = after['retention.bytes'];
  summary.retention_ms_after = after['retention.ms'];
  await admin.createPartitions({ topicPartitions: [{ topic, count: 4 }] });
  const meta = await admin.fetchTopicMetadata({ topics: [topic] });
  summary.partitions = meta.topics[0].partitions.length;
  await admin.deleteTopics({ topics: [topic] });
  summary.listed_after_delete = (await admin.listTopics()).includes(topic);
  await admin.disconnect();
  console.log(JSON.stringify(summary));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
