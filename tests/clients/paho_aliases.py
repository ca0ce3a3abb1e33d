#!/usr/bin/env python3
"""v5 topic aliases from the broker, seen by paho-mqtt with
TopicAliasMaximum 5: 10 messages on 2 topics arrive under the right names,
some by alias only.
paho 2.x hands an aliased delivery over with an empty topic and the
TopicAlias property, so this script keeps the alias map as the
specification tells a client to (MQTT 3.3.2.3.4), and fails on an alias it
was never told, one above the maximum, or a wrong resolved name.
Usage: paho_aliases.py HOST PORT. Exit 0 when that held."""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()
aliases = {}
got = []
errors = []
used_alias = 0
subscribed = threading.Event()


def on_message(client, userdata, msg):
    global used_alias
    alias = getattr(msg.properties, "TopicAlias", None)
    topic = msg.topic
    with lock:
        if alias is not None:
            if not 1 <= alias <= 5:
                errors.append(f"alias {alias} above the maximum 5")
            if topic:
                aliases[alias] = topic
            elif alias in aliases:
                topic = aliases[alias]
                used_alias += 1
            else:
                errors.append(f"unknown alias {alias}")
        got.append((topic, msg.payload.decode()))


sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alias-sub", protocol=mqtt.MQTTv5)
sub.on_message = on_message
sub.on_subscribe = lambda *a: subscribed.set()
props = Properties(PacketTypes.CONNECT)
props.TopicAliasMaximum = 5
sub.connect(host, port, keepalive=30, properties=props)
sub.loop_start()
sub.subscribe("alias/#", qos=1)
if not subscribed.wait(10):
    sys.exit("no SUBACK")
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alias-pub", protocol=mqtt.MQTTv5)
pub.connect(host, port, keepalive=30)
pub.loop_start()
want = []
for i in range(10):
    topic = f"alias/{'one' if i % 2 else 'two'}"
    want.append((topic, f"m{i}"))
    pub.publish(topic, f"m{i}", qos=1).wait_for_publish(10)
deadline = time.monotonic() + 10
while time.monotonic() < deadline and len(got) < 10:
    time.sleep(0.05)
time.sleep(0.3)
with lock:
    if errors or got != want:
        sys.exit(f"errors {errors}; got {got}")
    if used_alias == 0:
        sys.exit("no delivery came by alias only (empty topic name)")
    print(f"10 messages on 2 topics, right names; {used_alias} came by alias only")
