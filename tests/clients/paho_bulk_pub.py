#!/usr/bin/env python3
"""Publishes N distinct messages with paho-mqtt and waits until every one is
acknowledged (QoS 1 PUBACK, QoS 2 PUBCOMP). Payload i is PREFIX-i (zero
padded); topic i is TOPIC, or TOPIC/(i % SPREAD) with --spread.
Usage: paho_bulk_pub.py HOST PORT 3|5 TOPIC N QOS PREFIX [--spread K].
Exit 0 and prints "published N" when all were acknowledged."""
import argparse
import sys
import threading
import time

import paho.mqtt.client as mqtt

ap = argparse.ArgumentParser()
for name in ["host", "port", "version", "topic", "n", "qos", "prefix"]:
    ap.add_argument(name)
ap.add_argument("--spread", type=int, default=0)
a = ap.parse_args()
n, qos = int(a.n), int(a.qos)
proto = mqtt.MQTTv5 if a.version == "5" else mqtt.MQTTv311
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bulk-{a.prefix}", protocol=proto)
c.max_inflight_messages_set(100)
c.max_queued_messages_set(0)
lock = threading.Lock()
acked = set()
failed = []


def on_publish(client, userdata, mid, reason_code, properties):
    with lock:
        if reason_code.is_failure:
            failed.append((mid, str(reason_code)))
        acked.add(mid)


c.on_publish = on_publish
c.connect(a.host, int(a.port), keepalive=30)
c.loop_start()
mids = []
for i in range(n):
    topic = f"{a.topic}/{i % a.spread}" if a.spread else a.topic
    mids.append(c.publish(topic, f"{a.prefix}-{i:05d}", qos=qos).mid)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    with lock:
        if acked.issuperset(mids):
            break
    time.sleep(0.05)
with lock:
    missing = len(set(mids) - acked)
if missing or failed:
    sys.exit(f"{missing} of {n} not acknowledged, refused: {failed[:5]}")
c.disconnect()
print(f"published {n}")
