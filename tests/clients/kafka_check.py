#!/usr/bin/env python3
"""confluent-kafka (librdkafka) against a Tributary node: produce with every
codec and acks=all, then read everything back by assignment (no group) and
check keys, values (null ones too), headers and timestamps byte for byte.

usage: kafka_check.py BOOTSTRAP TOPIC
Prints one JSON line: {"produced": N, "consumed": N, "codecs": [...]}; exits 1
on any mismatch.
"""
import json
import sys

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

bootstrap, topic = sys.argv[1], sys.argv[2]
codecs = ["none", "gzip", "snappy", "lz4", "zstd"]
sent = {}
errors = []


def headers_of(codec):
    return [("codec", codec.encode()), ("bin", bytes([0, 1, 2, 255]))]


def delivered(err, msg):
    # Delivery reports carry no headers: the ones sent are known.
    if err is not None:
        errors.append(str(err))
    else:
        codec = msg.key().decode().split("-")[0]
        sent[(msg.partition(), msg.offset())] = (msg.key(), msg.value(), headers_of(codec), msg.timestamp()[1])


for codec in codecs:
    p = Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "compression.type": codec,
        "linger.ms": 5,
    })
    for i in range(200):
        p.produce(
            topic,
            key=f"{codec}-{i % 7}".encode(),
            # Every tenth a tombstone: a null value, not an empty one.
            value=None if i % 10 == 0 else (f"{codec} value {i} " + "x" * (i % 50)).encode(),
            headers=headers_of(codec),
            timestamp=1_700_000_000_000 + i,
            on_delivery=delivered,
        )
    left = p.flush(30)
    if left:
        errors.append(f"{codec}: {left} messages not delivered")

if errors:
    print(json.dumps({"errors": errors[:5]}))
    sys.exit(1)

meta = Consumer({"bootstrap.servers": bootstrap, "group.id": "kafka-check"}).list_topics(topic, timeout=10)
partitions = sorted(meta.topics[topic].partitions)
c = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": "kafka-check",
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
})
c.assign([TopicPartition(topic, p, 0) for p in partitions])
got = {}
idle = 0
while len(got) < len(sent) and idle < 20:
    m = c.poll(1.0)
    if m is None:
        idle += 1
        continue
    if m.error():
        if m.error().code() == KafkaError._PARTITION_EOF:
            continue
        print(json.dumps({"errors": [str(m.error())]}))
        sys.exit(1)
    got[(m.partition(), m.offset())] = (m.key(), m.value(), m.headers(), m.timestamp()[1])
c.close()

bad = [k for k in sent if got.get(k) != sent[k]]
if bad:
    print("first mismatch:", sent[bad[0]], got.get(bad[0]), file=sys.stderr)
nulls = sum(1 for v in got.values() if v[1] is None)
print(json.dumps({"produced": len(sent), "consumed": len(got), "codecs": codecs,
                  "mismatched": len(bad), "nulls": nulls}))
sys.exit(0 if not bad and len(got) == len(sent) else 1)
