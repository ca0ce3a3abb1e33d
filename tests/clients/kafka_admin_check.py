#!/usr/bin/env python3
"""librdkafka's admin client (confluent-kafka) against a Tributary node:
create a topic with configs, refuse it twice, describe and change its
configs, add partitions and produce to a new one, delete it.

usage: kafka_admin_check.py BOOTSTRAP PREFIX GROUP
Prints one JSON line {"created": ..., "retention_ms": ..., ...}; exits 1 on
any mismatch.
"""
import json
import sys

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry,
                                   ConfigResource, NewPartitions, NewTopic)

bootstrap, prefix, _group = sys.argv[1:4]
topic = f"{prefix}-admin"
admin = AdminClient({"bootstrap.servers": bootstrap})
errors = []
summary = {}


def wait(futures):
    return {k: f.result(timeout=30) for k, f in futures.items()}


wait(admin.create_topics([NewTopic(topic, 3, 1, config={
    "retention.ms": "3600000", "max.message.bytes": "4096"})]))
summary["created"] = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
try:
    wait(admin.create_topics([NewTopic(topic, 1, 1)]))
    errors.append("created twice")
except Exception as e:  # the future raises KafkaException(KafkaError)
    summary["again"] = e.args[0].name()

resource = ConfigResource("topic", topic)
described = wait(admin.describe_configs([resource]))[resource]
summary["retention_ms"] = described["retention.ms"].value
summary["max_message_bytes"] = described["max.message.bytes"].value

change = ConfigResource("topic", topic, incremental_configs=[
    ConfigEntry("retention.bytes", "1048576",
                incremental_operation=AlterConfigOpType.SET),
    ConfigEntry("max.message.bytes", None,
                incremental_operation=AlterConfigOpType.DELETE)])
wait(admin.incremental_alter_configs([change]))
described = wait(admin.describe_configs([resource]))[resource]
summary["retention_bytes"] = described["retention.bytes"].value
summary["max_message_bytes_after"] = described["max.message.bytes"].value
try:
    bad = ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("cleanup.policy", "compact,shred",
                    incremental_operation=AlterConfigOpType.SET)])
    wait(admin.incremental_alter_configs([bad]))
    errors.append("an unknown cleanup policy accepted")
except Exception as e:
    summary["bad_policy"] = e.args[0].name()
compact = ConfigResource("topic", topic, incremental_configs=[
    ConfigEntry("cleanup.policy", "compact,delete",
                incremental_operation=AlterConfigOpType.SET),
    ConfigEntry("min.cleanable.dirty.ratio", "0.2",
                incremental_operation=AlterConfigOpType.SET)])
wait(admin.incremental_alter_configs([compact]))
described = wait(admin.describe_configs([resource]))[resource]
summary["cleanup_policy"] = described["cleanup.policy"].value
summary["dirty_ratio"] = described["min.cleanable.dirty.ratio"].value
back = ConfigResource("topic", topic, incremental_configs=[
    ConfigEntry("cleanup.policy", None, incremental_operation=AlterConfigOpType.DELETE)])
wait(admin.incremental_alter_configs([back]))

wait(admin.create_partitions([NewPartitions(topic, 5)]))
summary["partitions"] = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
p.produce(topic, value=b"in the fifth", partition=4)
if p.flush(30) != 0:
    errors.append("produce to the new partition not acknowledged")
c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-admin-g",
              "enable.auto.commit": False})
c.assign([TopicPartition(topic, 4, 0)])
m = c.poll(15)
summary["read_back"] = m.value().decode() if m is not None and m.error() is None else None
c.close()

wait(admin.delete_topics([topic]))
summary["listed_after_delete"] = topic in admin.list_topics(timeout=10).topics
print(json.dumps(summary))
if errors:
    print("; ".join(errors), file=sys.stderr)
    sys.exit(1)
