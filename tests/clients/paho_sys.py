#!/usr/bin/env python3
"""`$SYS` with paho-mqtt: clients cannot publish under `$SYS/` (v5: PUBACK
0x90; 3.1.1: the connection is closed), and the broker publishes its
statistics there as retained messages every second (the test sets
`mqtt.sys_interval_secs = 1`). Usage: paho_sys.py HOST PORT. Exit 0 when
all of it held."""
import re
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port = sys.argv[1], int(sys.argv[2])
STATS = ["version", "uptime", "clients/connected", "messages/received", "messages/sent"]


def client(name, proto=mqtt.MQTTv5):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sys-{name}", protocol=proto)
    c.connect(host, port, keepalive=30)
    c.loop_start()
    return c


def number(text):
    m = re.match(r"^(\d+)( seconds)?$", text)
    if not m:
        sys.exit(f"not a number: {text!r}")
    return int(m.group(1))


# v5: PUBACK with reason 0x90 (topic name invalid).
acked = {}
done = threading.Event()
c5 = client("pub5")


def on_publish(c, userdata, mid, reason_code, properties):
    acked[mid] = reason_code.value
    done.set()


c5.on_publish = on_publish
info = c5.publish("$SYS/anything", "x", qos=1)
if not done.wait(10):
    sys.exit("v5: no PUBACK for $SYS/anything")
if acked.get(info.mid) != 0x90:
    sys.exit(f"v5: PUBACK reason {acked} for $SYS/anything, expected 0x90")
c5.disconnect()
print("v5 publish to $SYS/anything: PUBACK 0x90")

# 3.1.1: no negative acknowledgement exists, the connection is closed.
closed = threading.Event()
c3 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sys-pub3", protocol=mqtt.MQTTv311)
acked3 = threading.Event()
c3.on_disconnect = lambda *a: closed.set()
c3.on_publish = lambda *a: acked3.set()
c3.connect(host, port, keepalive=30)
c3.loop_start()
c3.publish("$SYS/anything", "x", qos=1)
if not closed.wait(10):
    sys.exit("3.1.1: the connection stayed open after a publish to $SYS")
c3.loop_stop()
if acked3.is_set():
    sys.exit("3.1.1: a publish to $SYS was acknowledged")
print("3.1.1 publish to $SYS/anything: connection closed")

# The statistics, as a subscriber to $SYS/broker/# sees them.
lock = threading.Lock()
latest = {}  # stat -> [values]
subscribed = threading.Event()
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sys-sub", protocol=mqtt.MQTTv5)
sub.on_subscribe = lambda *a: subscribed.set()


def on_message(c, userdata, msg):
    with lock:
        latest.setdefault(msg.topic.removeprefix("$SYS/broker/"), []).append(msg.payload.decode())


sub.on_message = on_message
sub.connect(host, port, keepalive=30)
sub.loop_start()
sub.subscribe("$SYS/broker/#", qos=1)
if not subscribed.wait(10):
    sys.exit("no SUBACK for $SYS/broker/#")


def wait_for(what, cond, secs=6):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        with lock:
            if cond():
                return
        time.sleep(0.05)
    with lock:
        sys.exit(f"{what}: after {secs} s the subscriber has {latest}")


wait_for("every statistic", lambda: all(s in latest for s in STATS))
# Published while this subscriber is connected: it counts.
wait_for("clients/connected >= 1", lambda: number(latest["clients/connected"][-1]) >= 1)
with lock:
    if not latest["version"][-1]:
        sys.exit("empty $SYS/broker/version")
    number(latest["uptime"][-1])
    number(latest["messages/sent"][-1])
    received = number(latest["messages/received"][-1])
pub = client("pub")
for i in range(5):
    info = pub.publish(f"sys-test/{i}", "x", qos=1)
    info.wait_for_publish(10)
wait_for("messages/received to grow by 5", lambda: number(latest["messages/received"][-1]) >= received + 5)

# Retained: a later subscriber gets the version at once, retain flag set.
retained = threading.Event()
late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sys-late", protocol=mqtt.MQTTv311)
late.on_message = lambda c, u, msg: msg.retain and msg.payload and retained.set()
late.connect(host, port, keepalive=30)
late.loop_start()
late.subscribe("$SYS/broker/version", qos=0)
if not retained.wait(5):
    sys.exit("$SYS/broker/version is not retained")
for c in (sub, pub, late):
    c.disconnect()
with lock:
    print("$SYS/broker: " + ", ".join(f"{s}={latest[s][-1]}" for s in STATS))
