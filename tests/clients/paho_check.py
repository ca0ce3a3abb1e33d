#!/usr/bin/env python3
"""Publish and subscribe through an MQTT broker with paho-mqtt (a client we
did not write). Usage: paho_check.py HOST PORT 3|5. Exit 0 when every QoS 1
publish was acknowledged and every message came back to the subscriber."""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
N = 20
prefix = f"paho/v{version}"
got = []
subscribed = threading.Event()
done = threading.Event()


def client(name):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{version}-{name}", protocol=proto)
    c.connect(host, port, keepalive=30)
    return c


def on_subscribe(c, userdata, mid, reason_codes, properties):
    subscribed.set()


def on_message(c, userdata, msg):
    props = {}
    if msg.properties is not None and hasattr(msg.properties, "UserProperty"):
        props = dict(msg.properties.UserProperty)
    got.append((msg.topic, msg.payload.decode(), msg.qos, props))
    if len(got) >= N:
        done.set()


sub = client("sub")
sub.on_subscribe = on_subscribe
sub.on_message = on_message
sub.loop_start()
sub.subscribe(f"{prefix}/#", qos=1)
if not subscribed.wait(10):
    sys.exit("no SUBACK")

pub = client("pub")
pub.loop_start()
for i in range(N):
    props = None
    if proto == mqtt.MQTTv5:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("seq", str(i))]
    info = pub.publish(f"{prefix}/{i}", f"m{i}", qos=1, properties=props)
    info.wait_for_publish(10)
    if not info.is_published():
        sys.exit(f"publish {i} was not acknowledged")
if not done.wait(10):
    sys.exit(f"only {len(got)} of {N} messages arrived: {got}")
for i in range(N):
    topic, payload, qos, props = next(g for g in got if g[0] == f"{prefix}/{i}")
    assert payload == f"m{i}" and qos == 1, (topic, payload, qos)
    if proto == mqtt.MQTTv5:
        assert props.get("seq") == str(i), props
pub.disconnect()
sub.disconnect()
print(f"paho MQTT {version}: {N} acknowledged, {len(got)} delivered")
