#!/usr/bin/env python3
"""kafka-python (a pure-Python client, no librdkafka) against a Tributary
node: produce keyed records with headers (gzip and uncompressed, acks all),
then one consumer in a group reads them all and commits; the committed
offsets reach the partitions' ends.

usage: kafka_python_check.py BOOTSTRAP TOPIC GROUP
Prints one JSON line {"produced": N, "consumed": N, "committed": N, "ends": N};
exits 1 on any mismatch.
"""
import json
import sys

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

bootstrap, topic, group = sys.argv[1:4]
errors = []
sent = {}
for codec in (None, "gzip"):
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type=codec)
    for i in range(200):
        value = f"kafka-python {codec} {i}".encode()
        key = f"k{i % 7}".encode()
        headers = [("i", str(i).encode()), ("bin", bytes([0, 1, 255]))]
        p.send(topic, key=key, value=value, headers=headers)
        sent[value] = (key, headers)
    p.flush(30)
    p.close()

c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                  auto_offset_reset="earliest", enable_auto_commit=False,
                  consumer_timeout_ms=15000)
got = {}
for m in c:
    got[m.value] = m
    if len(got) == len(sent):
        break
c.commit()
for value, (key, headers) in sent.items():
    m = got.get(value)
    if m is None:
        errors.append(f"missing {value!r}")
    elif m.key != key or list(m.headers) != headers:
        errors.append(f"key or headers of {value!r}: {m.key!r} {m.headers!r}")
parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic))]
ends = sum(c.end_offsets(parts).values())
committed = sum(c.committed(tp) or 0 for tp in parts)
c.close()
if committed != ends:
    errors.append(f"committed {committed} of {ends}")
print(json.dumps({"produced": len(sent), "consumed": len(got), "committed": committed,
                  "ends": ends, "errors": errors[:5]}))
sys.exit(1 if errors else 0)
