#!/usr/bin/env python3
"""Every MQTT topic name round-trips through the broker with paho-mqtt: a
leading slash, non-ASCII, spaces, a `$` first level and an empty level.
Subscribers see the original names; `#` and `+/x` do not match a topic
starting with `$` (MQTT 4.7.2), `$dollar/#` does.
Usage: paho_topics.py HOST PORT 3|5. Exit 0 when all of it held."""
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
NAMES = ["$dollar/x", "/leading/slash", "Café/temp", "spaces in/topic", "a//b"]
# Published last, into the same log topic as `$dollar/x` (its first level is
# empty): once `#` and `+/x` have it, they have gone past `$dollar/x`.
CONTROL = "/x"
lock = threading.Lock()
got = {}  # subscriber name -> [(topic, payload)]


def subscriber(name, filters):
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"topics-{version}-{name}", protocol=proto)
    c.on_subscribe = lambda *a: subscribed.set()

    def on_message(client, userdata, msg):
        with lock:
            got.setdefault(name, []).append((msg.topic, msg.payload.decode()))

    c.on_message = on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    c.subscribe([(f, 1) for f in filters])
    if not subscribed.wait(10):
        sys.exit(f"{name}: no SUBACK")
    return c


subs = [
    subscriber("exact", NAMES),
    subscriber("hash", ["#"]),
    subscriber("plus", ["+/x"]),
    subscriber("dollar", ["$dollar/#"]),
]
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"topics-{version}-pub", protocol=proto)
pub.connect(host, port, keepalive=30)
pub.loop_start()
for name in NAMES + [CONTROL]:
    info = pub.publish(name, f"v{version}:{name}", qos=1)
    info.wait_for_publish(10)
    if not info.is_published():
        sys.exit(f"publish to {name!r} was not acknowledged")

want = {
    "exact": NAMES,
    "hash": [n for n in NAMES if not n.startswith("$")] + [CONTROL],
    "plus": [CONTROL],
    "dollar": ["$dollar/x"],
}
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    with lock:
        if all(len(got.get(k, [])) >= len(v) for k, v in want.items()):
            break
    time.sleep(0.05)
time.sleep(0.5)  # room for anything that should not come
failed = False
for k, names in want.items():
    expected = sorted((n, f"v{version}:{n}") for n in names)
    if sorted(got.get(k, [])) != expected:
        print(f"{k}: expected {expected}, got {sorted(got.get(k, []))}")
        failed = True
for c in subs + [pub]:
    c.disconnect()
if failed:
    sys.exit(1)
print(f"paho MQTT {version}: {len(NAMES)} topic names round-tripped, $ topics kept out of wildcards")
