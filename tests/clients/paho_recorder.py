#!/usr/bin/env python3
"""A paho-mqtt subscriber that records every payload it receives, one line
each, appended to OUT and flushed at once; it runs (reconnecting by itself)
until it is killed. With --persistent its session outlives the connection
(3.1.1 clean_session=False, v5 session expiry) and it subscribes only when
the broker has no session for it. --sleep-ms makes it slow, so deliveries
pile up unacknowledged; --receive-max caps them (v5).
Usage: paho_recorder.py HOST PORT 3|5 CLIENT_ID FILTER QOS OUT [options].
Prints CONNACK and SUBACK lines as they come."""
import argparse
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ap = argparse.ArgumentParser()
for name in ["host", "port", "version", "client_id", "filter", "qos", "out"]:
    ap.add_argument(name)
ap.add_argument("--persistent", action="store_true")
ap.add_argument("--sleep-ms", type=float, default=0)
ap.add_argument("--receive-max", type=int, default=0)
a = ap.parse_args()
v5 = a.version == "5"
out = open(a.out, "a", encoding="utf-8")

if v5:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id, protocol=mqtt.MQTTv5)
else:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id,
                    protocol=mqtt.MQTTv311, clean_session=not a.persistent)
c.reconnect_delay_set(min_delay=0.2, max_delay=1)


def on_connect(client, userdata, flags, reason_code, properties):
    print(f"CONNACK {reason_code} session_present={flags.session_present}", flush=True)
    if reason_code == 0 and not flags.session_present:
        client.subscribe(a.filter, qos=int(a.qos))


def on_subscribe(client, userdata, mid, reason_codes, properties):
    print(f"SUBACK {[r.value for r in reason_codes]}", flush=True)


def on_message(client, userdata, msg):
    out.write(msg.payload.decode() + "\n")
    out.flush()
    if a.sleep_ms:
        time.sleep(a.sleep_ms / 1000)


c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
props = None
if v5:
    props = Properties(PacketTypes.CONNECT)
    if a.persistent:
        props.SessionExpiryInterval = 600
    if a.receive_max:
        props.ReceiveMaximum = a.receive_max
    c.connect(a.host, int(a.port), keepalive=10, clean_start=not a.persistent, properties=props)
else:
    c.connect(a.host, int(a.port), keepalive=10)
c.loop_forever(retry_first_connection=True)
sys.exit("loop ended")
