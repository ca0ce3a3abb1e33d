#!/usr/bin/env python3
"""v5 subscription identifiers with paho-mqtt: `sub/+/x` with id 1 and
`sub/#` with id 2 (two SUBSCRIBE packets). A message to `sub/a/x` arrives
once carrying both ids; one to `sub/b` once carrying only 2.
Usage: paho_subid.py HOST PORT. Exit 0 when that held."""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()
got = []
subacks = []
subscribed = threading.Semaphore(0)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subacks.extend(r.value for r in reason_codes)
    subscribed.release()


def on_message(client, userdata, msg):
    ids = getattr(msg.properties, "SubscriptionIdentifier", [])
    with lock:
        got.append((msg.topic, msg.payload.decode(), sorted(ids)))


sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="subid-sub", protocol=mqtt.MQTTv5)
sub.on_subscribe = on_subscribe
sub.on_message = on_message
sub.connect(host, port, keepalive=30)
sub.loop_start()
for ident, topic_filter in [(1, "sub/+/x"), (2, "sub/#")]:
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = ident
    sub.subscribe(topic_filter, qos=1, properties=props)
    if not subscribed.acquire(timeout=10):
        sys.exit(f"no SUBACK for {topic_filter}")
if subacks != [1, 1]:
    sys.exit(f"SUBACKs {subacks}")

pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="subid-pub", protocol=mqtt.MQTTv5)
pub.connect(host, port, keepalive=30)
pub.loop_start()
for topic in ["sub/a/x", "sub/b"]:
    info = pub.publish(topic, topic, qos=1)
    info.wait_for_publish(10)
deadline = time.monotonic() + 10
while time.monotonic() < deadline and len(got) < 2:
    time.sleep(0.05)
time.sleep(0.5)  # room for a second copy
want = [("sub/a/x", "sub/a/x", [1, 2]), ("sub/b", "sub/b", [2])]
with lock:
    if got != want:
        sys.exit(f"expected {want}, got {got}")
print(f"subscription identifiers: {got}")
