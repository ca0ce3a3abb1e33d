#!/usr/bin/env python3
"""Outbound QoS 2 with paho-mqtt: a QoS 2 subscription is granted QoS 2 and
QoS 2 messages arrive at QoS 2, each exactly once; a retained QoS 2 message
keeps its QoS (a QoS 2 subscriber gets 2, a QoS 1 subscriber 1).
Usage: paho_qos2.py HOST PORT 3|5. Exit 0 when all of it held."""
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
N = 50
lock = threading.Lock()


def subscriber(name, topic_filter, qos):
    got, granted = [], []
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"q2-{version}-{name}", protocol=proto)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        granted.extend(r.value for r in reason_codes)
        subscribed.set()

    def on_message(client, userdata, msg):
        with lock:
            got.append((msg.payload.decode(), msg.qos, msg.retain))

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    c.subscribe(topic_filter, qos=qos)
    if not subscribed.wait(10):
        sys.exit(f"{name}: no SUBACK")
    if granted != [qos]:
        sys.exit(f"{name}: asked QoS {qos}, SUBACK {granted}")
    return c, got


def wait_count(got, n, what):
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with lock:
            if len(got) >= n:
                break
        time.sleep(0.05)
    time.sleep(0.5)  # room for a duplicate to show
    with lock:
        if len(got) != n:
            sys.exit(f"{what}: {len(got)} messages, expected {n}: {got}")


sub, got = subscriber("sub", f"q2/{version}/#", 2)
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"q2-{version}-pub", protocol=proto)
pub.connect(host, port, keepalive=30)
pub.loop_start()
for i in range(N):
    info = pub.publish(f"q2/{version}/t", f"m{i}", qos=2)
    info.wait_for_publish(10)
    if not info.is_published():
        sys.exit(f"publish {i} not completed")
wait_count(got, N, "QoS 2 subscriber")
if sorted(got) != sorted((f"m{i}", 2, False) for i in range(N)):
    sys.exit(f"QoS 2 subscriber got {got}")
print(f"{N} QoS 2 messages, each once at QoS 2")

info = pub.publish(f"q2r/{version}/state", "kept", qos=2, retain=True)
info.wait_for_publish(10)
_, got2 = subscriber("ret2", f"q2r/{version}/state", 2)
_, got1 = subscriber("ret1", f"q2r/{version}/state", 1)
wait_count(got2, 1, "retained at QoS 2")
wait_count(got1, 1, "retained at QoS 1")
if got2 != [("kept", 2, True)] or got1 != [("kept", 1, True)]:
    sys.exit(f"retained QoS 2 message: a QoS 2 subscriber got {got2}, a QoS 1 one {got1}")
print(f"paho MQTT {version}: QoS 2 delivered once each; retained QoS 2 kept its QoS")
